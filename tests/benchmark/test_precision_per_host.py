"""bf16 only where the CPU runs it natively: the bench leaves its bf16 rows out (and says so), and
--dtype bf16 computes in fp32 with a one-line note (issue 21: bf16 convolutions crawl elsewhere)."""
from __future__ import annotations

import torch

from decovae_fast.benchmark import suite
from decovae_fast.cli import flags


def test_bench_leaves_bf16_out_without_native_bf16(monkeypatch):
    monkeypatch.setattr(suite, "cpu_has_native_bf16", lambda: False)
    plan = suite.make_plan(True, torch.device("cpu"))
    assert "bf16" not in plan.op_dtypes and "bf16" not in plan.ceiling_dtypes
    assert any("bf16" in why for why in plan.left_out)
    monkeypatch.setattr(suite, "cpu_has_native_bf16", lambda: True)
    plan = suite.make_plan(True, torch.device("cpu"))
    assert "bf16" in plan.op_dtypes and not plan.left_out


def test_dtype_flag_falls_back_to_fp32_without_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(flags, "cpu_has_native_bf16", lambda: False)
    assert flags.compute_dtype("bf16", torch.device("cpu")) == torch.float32
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no native bf16" in err
    assert flags.compute_dtype("fp16", torch.device("cpu")) == torch.float16
    monkeypatch.setattr(flags, "cpu_has_native_bf16", lambda: True)
    assert flags.compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert capsys.readouterr().err == ""
