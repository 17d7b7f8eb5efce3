"""`make gpu-check`: everything the GPU code has to prove, in one command, on a machine with a CUDA
GPU (within ~10 minutes on an H100/H200):

  1. build the extension for the visible GPU (its compute capability as TORCH_CUDA_ARCH_LIST),
  2. every GPU test (CUDA ops against the reference, the GPU training step),
  3. `decovae bench --quick` on CUDA (warp on Triton, conv on CUDA vs cuDNN, the pipeline against
     the reference and Wan 2.1 when diffusers is there) -> bench/results/<gpu>.json and .md,
  4. a short training of `base` on CUDA (20 steps from scratch),
  5. a one-page summary, bench/results/<gpu>-gpu-check.md: each step, its exit code and time, and
     the tail of its output.

`--dry-run` (run by the test suite on every machine, GPU or not): every step is resolved (its
program exists, its module imports, its command line parses with the real parsers, the training
config loads) and printed, and nothing runs on CUDA, so the check cannot rot before the first
lease.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cuda-gpu"
    name = torch.cuda.get_device_name(0).lower()
    return "cuda-" + "-".join(p for p in name.replace("nvidia", "").replace("/", " ").split() if p)


def arch_list() -> str:
    import torch

    if not torch.cuda.is_available():
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def steps(py: str, slug: str) -> list[tuple[str, list[str], dict]]:
    """(name, argv, extra environment) of every step, in order."""
    results = ROOT / "bench" / "results"
    env_build = {"DECOVAE_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch_list(), "MAX_JOBS": str(os.cpu_count() or 2)}
    decovae = [py, "-m", "decovae_fast.cli"]
    return [
        ("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(ROOT)], env_build),
        ("gpu tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests"), "-k",
                       "cuda or gpu or triton"], {}),
        ("bench", decovae + ["bench", "--quick", "--device", "cuda", "--json", str(results / f"{slug}.json"),
                             "--table", str(results / f"{slug}.md")], {}),
        ("train base", decovae + ["train", "--config", str(ROOT / "decovae_fast/configs/base.toml"), "--fresh",
                                  "--max-steps", "20", "--out", "/tmp/decovae_gpu_check_train", "--quiet"], {}),
    ]


def resolve(name: str, argv: list[str]) -> str:
    """Raises unless the step could run: its program exists and its command line parses."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise RuntimeError(f"{name}: program {argv[0]} not found")
    from importlib.util import find_spec

    if argv[1] == "-m" and find_spec(argv[2]) is None:
        raise RuntimeError(f"{name}: module {argv[2]} not installed")
    if argv[1:3] == ["-m", "pip"] and (find_spec("setuptools") is None or not (ROOT / "setup.py").exists()):
        raise RuntimeError(f"{name}: setuptools or setup.py missing")
    if argv[1:3] == ["-m", "decovae_fast.cli"]:
        from decovae_fast.cli.main import build_parser

        args = build_parser().parse_args(argv[3:])  # SystemExit on a bad flag
        if args.command == "train":
            from decovae_fast.training.config import load_config

            load_config(args.config)
    return "resolved"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="resolve every step, run none")
    args = p.parse_args(argv)
    py = sys.executable
    slug = gpu_slug()
    plan = steps(py, slug)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU visible (use --dry-run to check the steps)", file=sys.stderr)
            return 2
    lines = [f"# gpu-check on {slug}", "", "| step | exit code | seconds | command |", "|---|---:|---:|---|"]
    tails, failed = [], 0
    for name, argv_, env in plan:
        shown = " ".join(shlex.quote(a) for a in argv_)
        if args.dry_run:
            print(f"[dry-run] {name}: {resolve(name, argv_)}: {' '.join(f'{k}={v}' for k, v in env.items())} {shown}")
            continue
        start = time.perf_counter()
        res = subprocess.run(argv_, env=dict(os.environ, **env), capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        failed += res.returncode != 0
        print(f"{name}: exit {res.returncode} in {seconds:.0f} s", flush=True)
        lines.append(f"| {name} | {res.returncode} | {seconds:.0f} | `{shown}` |")
        tails += ["", f"## {name}", "```", *(res.stdout + res.stderr).strip().splitlines()[-25:], "```"]
        if name == "build" and res.returncode:
            break  # nothing else can run without the extension
    if args.dry_run:
        print(f"gpu-check dry run: {len(plan)} steps resolved")
        return 0
    out = ROOT / "bench" / "results" / f"{slug}-gpu-check.md"
    out.write_text("\n".join(lines + tails) + "\n")
    print(f"gpu-check: {len(plan) - failed} of {len(plan)} steps passed; summary in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
