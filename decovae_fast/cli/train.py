"""`decovae train --config FILE`: staged training of DeCoVAE (or of the PlainCausalVAE baseline),
resumed from its checkpoint; --evaluate scores saved weights, --profile times a stage's step."""
from __future__ import annotations

import json
from pathlib import Path

from decovae_fast.errors import UserError
from decovae_fast.io.outputs import write_text
from decovae_fast.training.config import load_config
from decovae_fast.training.loop import evaluate_weights, profile_step, train


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="staged training from a TOML config (resumes from its checkpoint)")
    p.add_argument("--config", required=True, help="TOML training config (see decovae_fast/configs/)")
    p.add_argument("--out", help="output folder (overrides the config's out_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (resume later)")
    p.add_argument("--profile", type=int, metavar="STAGE", help="profile a few steps of this stage and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--evaluate", metavar="WEIGHTS_DIR",
                   help="instead of training: PSNR/SSIM of saved weights on the config's held-out clips")
    p.add_argument("--eval-frames", type=int, default=33, help="frames per held-out clip (--evaluate)")
    p.add_argument("--eval-size", type=int, default=256, help="centre crop size (--evaluate)")
    p.add_argument("--json", metavar="FILE", help="also write the --evaluate result here")
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = load_config(args.config)
    if args.out:
        cfg.out_dir = args.out
    if args.evaluate:
        if not Path(args.evaluate, "config.json").is_file():
            raise UserError(f"{args.evaluate}: no config.json (not a save_pretrained folder)")
        res = evaluate_weights(cfg, args.evaluate, args.eval_frames, args.eval_size)
        text = json.dumps(res, indent=1)
        print(text)
        if args.json:
            write_text(args.json, text + "\n")
        return 0
    if args.profile is not None:
        if not 0 <= args.profile < len(cfg.stages):
            raise UserError(f"--profile {args.profile}: the config has stages 0..{len(cfg.stages) - 1}")
        print(profile_step(cfg, args.profile))
        return 0
    quiet = args.quiet
    state = train(cfg, resume=not args.fresh, quiet=quiet, max_steps=args.max_steps)
    summary = {"step": state["step"], "hours": state["seconds"] / 3600, "best_psnr": state.get("best_psnr"),
               "best_step": state.get("best_step"), "last_val": state["val"][-1] if state["val"] else None}
    print(json.dumps(summary, indent=1))
    return 0
