"""DTYPES: the compute dtypes by the names the command line, the benchmark and its JSON use."""
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
