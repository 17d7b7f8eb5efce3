"""`decovae bench`: the benchmark suite (decovae_fast.benchmark) from the command line."""
from __future__ import annotations

import json
import os
import sys

import torch

from decovae_fast.benchmark.harness import reproduce_command, validate
from decovae_fast.benchmark.suite import make_plan, run_suite
from decovae_fast.benchmark.table import format_table
from decovae_fast.errors import UserError
from decovae_fast.io.outputs import write_text


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time every op against its reference and the pipeline against its peers")
    p.add_argument("--quick", action="store_true", help="fewer timed repeats, pipeline at 9x128x128, streaming at 64x64")
    p.add_argument("--json", metavar="OUT", help="write the results (bench/results/<device>.json)")
    p.add_argument("--table", metavar="OUT", help="also write the markdown table")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--skip", action="append", choices=("ops", "pipeline", "peers", "training"), default=[],
                   help="leave a part out (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    for out in (args.json, args.table):
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UserError(f"{out}: the folder does not exist")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    plan = make_plan(args.quick, device)
    result = run_suite(plan, ops="ops" not in args.skip, pipeline="pipeline" not in args.skip,
                       peers="peers" not in args.skip, training="training" not in args.skip, log=log)
    result["skipped_parts"] = sorted(set(args.skip))
    result["command"] = reproduce_command(result, args.json)
    validate(result)
    table = format_table(result, args.json)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n")
    if args.table:
        write_text(args.table, table)
    print(table)
    return 0

