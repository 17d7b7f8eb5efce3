"""Issue 5's pipeline figure: `tiny` encode/decode at 17x256x256 on the fast backends and on the
reference, in one run (the full `decovae bench` has these rows too, but takes over 30 minutes on a
2-core CPU). Writes bench/results/<device>-tiny-17x256x256.json.

    python bench/tiny_17x256.py
"""
import json
import os

import torch

from decovae_fast.benchmark import pipeline as P
from decovae_fast.benchmark import harness as H, suite as S

plan = S.make_plan(True, torch.device("cpu"))
plan.pipeline_shapes = [(17, 256, 256)]
plan.pipeline_models = ("tiny",)
plan.pipeline_rounds = 1
plan.stream_shapes = ()
rows, notes = P.run_pipeline(plan, peers=False, log=print)
out = os.path.join(os.path.dirname(__file__), "results", f"{H.device_slug(torch.device('cpu'))}-tiny-17x256x256.json")
with open(out, "w") as f:
    json.dump({"device": H.device_slug(torch.device('cpu')), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "rows": rows, "pipeline_notes": notes}, f, indent=1)
for r in rows:
    print(r["name"], r["shape"], r["backend"], r["fps"], "frames/s, peak", r["peak_mem_mb"], "MB")
