"""The `decovae` command. Each command family lives in its own module of decovae_fast.cli, which
provides add_parser(subparsers) and run(args) -> exit code; this file only wires them together.

Exit codes: 0 success, 2 bad input (one line naming the file and the problem), 1 internal error.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from decovae_fast.errors import UserError  # noqa: F401  (re-exported: `from decovae_fast.errors import UserError`)

# subcommand name -> module providing add_parser(subparsers) and run(args)
SUBCOMMANDS = {
    "info": "decovae_fast.cli.info",
    "reconstruct": "decovae_fast.cli.codec",
    "encode": "decovae_fast.cli.codec",
    "decode": "decovae_fast.cli.codec",
    "encode-dataset": "decovae_fast.cli.encode_dataset",
    "latent-stats": "decovae_fast.cli.latent_stats",
    "train": "decovae_fast.cli.train",
    "diagnose": "decovae_fast.cli.diagnose",
    "bench": "decovae_fast.cli.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decovae", description="DeCo-VAE video latents, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    seen = set()
    for module in SUBCOMMANDS.values():
        if module in seen:
            continue
        seen.add(module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # subcommand not built yet
        mod.add_parser(sub)
    return parser


def _check_cpu_capability() -> None:
    """DECOVAE_CPU_CAPABILITY naming an instruction set this CPU lacks is a user error, not a crash
    in the middle of a run."""
    from decovae_fast import _ext

    try:
        _ext.cpu_capability()
    except RuntimeError as exc:
        raise UserError(str(exc).splitlines()[0]) from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "info":  # info reports it; every other command needs it to be valid
            _check_cpu_capability()
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"decovae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("decovae: interrupted", file=sys.stderr)
        return 130
