"""`decovae diagnose`: where the dB are lost, stage by stage, on the held-out clips of a training
config (eval/diagnose.py computes the rows)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from decovae_fast.errors import UserError
from decovae_fast.eval.diagnose import diagnose, table
from decovae_fast.io.outputs import write_text
from decovae_fast.training.config import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="PSNR of every stage of the pipeline on the held-out clips")
    p.add_argument("--weights", metavar="DIR", help="model folder (default: the bundled weights)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config naming the held-out "
                                                                   "(val) and training (real) clips")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--no-floors", action="store_true", help="skip the PCA floors (fitted on the training clips)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.weights and not Path(args.weights, "config.json").is_file():
        raise UserError(f"{args.weights}: no config.json (not a save_pretrained folder)")
    cfg = load_config(args.config)  # the held-out (val) and training (real) clip lists
    res = diagnose(cfg.val, cfg.real, cfg.short_side, args.weights, args.frames, args.size, not args.no_floors)
    print(table(res))
    if args.json:
        write_text(args.json, json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
