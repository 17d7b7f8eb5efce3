"""scripts/gpu_check.py (`make gpu-check`): its dry run resolves every step on any machine, and a
step that could not run fails the dry run."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_resolves_every_step():
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    mod = _module()
    names = [name for name, _, _ in mod.steps(sys.executable, "x")]
    assert names == ["build", "gpu tests", "bench", "train base"]
    for name in names:
        assert f"[dry-run] {name}: resolved" in res.stdout
    assert "4 steps resolved" in res.stdout


def test_a_step_that_cannot_run_fails_the_dry_run():
    mod = _module()
    with pytest.raises(SystemExit):  # a flag the real parser does not know
        mod.resolve("bench", [sys.executable, "-m", "decovae_fast.cli", "bench", "--no-such-flag"])
    with pytest.raises(RuntimeError, match="not installed"):
        mod.resolve("x", [sys.executable, "-m", "no_such_module_here"])
    with pytest.raises(Exception):  # a training config that does not load
        mod.resolve("train", [sys.executable, "-m", "decovae_fast.cli", "train", "--config", "/nonexistent.toml"])
