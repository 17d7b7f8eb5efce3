"""The CPU kernels' instruction set: chosen at run time, forced with DECOVAE_CPU_CAPABILITY, a clear
error when forced to one the CPU lacks, and no ISA-specific code outside the per-ISA kernels in the
built library (which would crash a CPU without that ISA). The kernels' results per variant are
tested by the whole CPU matrix of test_warp_ops.py and test_causal_conv3d.py (tests/conftest.py)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from decovae_fast import _ext

pytestmark = pytest.mark.skipif(not _ext.cpu_compiled(), reason="C++ extension not built")
LEVELS = ["default", "avx2", "avx512"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DECOVAE_CPU_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_supported_variants_are_a_prefix_of_the_levels():
    sup = _ext.supported_cpu_capabilities()
    assert sup == LEVELS[:len(sup)] and sup[0] == "default"
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512bw " in flags and " avx512vl " in flags and " avx512dq " in flags:
        assert sup == LEVELS
    elif " avx2 " in flags and " fma " in flags:
        assert "avx2" in sup


def test_best_variant_is_chosen_without_override():
    out = _python("from decovae_fast import _ext; print(_ext.cpu_capability()); print(_ext.cpu_capability_reason())")
    assert out.returncode == 0, out.stderr
    chosen, reason = out.stdout.splitlines()
    assert chosen == _ext.supported_cpu_capabilities()[-1]
    assert reason.startswith(chosen) and "unset" in reason


def test_override_is_used(cpu_isa):
    out = _python("from decovae_fast import _ext; print(_ext.cpu_capability_reason())",
                  DECOVAE_CPU_CAPABILITY=cpu_isa)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{cpu_isa} (forced by DECOVAE_CPU_CAPABILITY")


@pytest.mark.parametrize("pretend,force", [("default", "avx2"), ("avx2", "avx512"), ("default", "avx512")])
def test_forcing_a_variant_the_cpu_lacks_is_a_clear_error(pretend, force):
    # DECOVAE_CPU_PRETEND caps what the CPU is taken to run, so any host can play an older one
    code = ("import torch\nfrom decovae_fast import ops\n"
            "try:\n    ops.gaussian_volume(torch.rand(1, 1, 8, 8), 1, 1.0)\n"
            "except RuntimeError as e:\n    print('ERR', str(e).splitlines()[0])\n")
    out = _python(code, DECOVAE_CPU_PRETEND=pretend, DECOVAE_CPU_CAPABILITY=force)
    assert out.returncode == 0, out.stderr  # an exception, not a crash
    assert out.stdout.startswith("ERR DECOVAE_CPU_CAPABILITY=" + force + " but this CPU does not run it")
    cli = subprocess.run([sys.executable, "-c", "import sys; from decovae_fast.cli.main import main; sys.exit(main())",
                          "encode", "missing.mp4", "-o", "x.npz"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DECOVAE_CPU_PRETEND": pretend, "DECOVAE_CPU_CAPABILITY": force})
    assert cli.returncode == 2
    assert cli.stderr.strip().count("\n") == 0 and "does not run it" in cli.stderr


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not a CPU capability"):
        _ext.set_cpu_capability("avx9")
    out = _python("from decovae_fast import _ext\nprint(_ext.cpu_capability_reason())", DECOVAE_CPU_CAPABILITY="sse9")
    assert out.returncode == 0 and out.stdout.startswith("error: DECOVAE_CPU_CAPABILITY='sse9' is not")


def test_variants_agree_with_each_other(cpu_isa):
    # the same call under each variant: within fp32 rounding of one another (each is also held to
    # the reference by the kernel tests)
    g = torch.Generator().manual_seed(3)
    vol = torch.rand(1, 3, 4, 37, 45, generator=g)
    mot = torch.randn(1, 3, 5, 37, 45, generator=g) * 4
    mot[:, 2] = mot[:, 2].abs()
    frames = torch.rand(1, 3, 5, 37, 45, generator=g)
    out = torch.ops.decovae.warp_residual(vol, mot, frames)
    _ext.set_cpu_capability("default")
    base = torch.ops.decovae.warp_residual(vol, mot, frames)
    torch.testing.assert_close(out, base, rtol=0, atol=2e-6)


@functools.lru_cache(maxsize=1)
def _mnemonics(lib: str) -> dict[str, frozenset[str]]:
    """{function: the instruction mnemonics it uses} of the library, from objdump."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", lib], capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, set[str]] = {}
    name = None
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in dis.splitlines():
        m = head.match(line)
        if m:
            name = m.group(1)
            continue
        parts = line.split("\t")
        if name and len(parts) >= 2 and parts[1].strip():
            found.setdefault(name, set()).add(parts[1].split()[0])
    return {f: frozenset(m) for f, m in found.items()}


needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")


@needs_objdump
def test_no_isa_specific_code_outside_the_per_isa_kernels():
    from decovae_fast import _C

    if _C.build_march() != "x86-64-v2":
        pytest.skip(f"built with -march={_C.build_march()}: the baseline itself may use AVX")
    # VEX/EVEX encoded instructions: objdump's mnemonics start with v
    found = {f: {m for m in ms if m.startswith("v")} for f, ms in _mnemonics(_C.__file__).items()}
    found = {f: ms for f, ms in found.items() if ms}
    assert any("avx512::" in f for f in found) and any("avx2::" in f for f in found), "no per-ISA kernels found"
    leaks = {f: sorted(m)[:5] for f, m in found.items() if "::avx2::" not in f and "::avx512::" not in f}
    assert not leaks, f"AVX code outside the per-ISA kernels (would crash CPUs without it): {leaks}"


@needs_objdump
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_simd_warp_rows_prefetch(isa):
    # GCC deletes calls to a function that only prefetches unless it inlined it first: the
    # prefetches of the next rows must be in every SIMD forward_row (they are worth up to 2x)
    from decovae_fast import _C

    # the row functions themselves: not their lambdas, PLT stubs or split-off cold parts
    rows = {f: ms for f, ms in _mnemonics(_C.__file__).items()
            if f"::{isa}::warp::forward_row<" in f and "{lambda" not in f and f.endswith("bool)")}
    assert rows, f"no {isa} forward_row in the library"
    missing = [f.split("(")[0] for f, ms in rows.items() if not any(m.startswith("prefetch") for m in ms)]
    assert not missing, f"forward_row without prefetches: {missing}"
