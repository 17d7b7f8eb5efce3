"""Every Triton kernel in decovae_fast.ops.triton compiles for a CUDA target (sm_90) with
triton.compile, without a GPU, so a kernel that only compiles on a GPU cannot land.

Kernel modules list what to compile in decovae_fast.ops.triton.COMPILE_SPECS as (kernel, signature,
constexprs) tuples, one per dtype/variant they are launched with. The compile runs in a fresh
process without TRITON_INTERPRET: under the interpreter triton.jit builds no compilable kernels,
and other tests in this pytest process may have set it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from decovae_fast.ops.triton import COMPILE_SPECS

target = GPUTarget("cuda", 90, 32)
results = []
for kernel, signature, constexprs in COMPILE_SPECS:
    name = f"{kernel.__name__}{sorted(signature.items())}{sorted(constexprs.items())}"
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target)
        ok, error = "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, ""
    except Exception as exc:  # report every failure, not only the first
        ok, error = False, f"{type(exc).__name__}: {exc}"[-2000:]
    results.append({"kernel": kernel.__name__, "spec": name, "ok": ok, "error": error})
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def compile_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_has_compile_specs(compile_results):
    import inspect

    from triton.runtime.jit import KernelInterface

    import decovae_fast.ops.triton as kernels

    # Launchable kernels are named *_kernel by convention (helpers called from kernels are not);
    # each one defined in a kernel module must appear in COMPILE_SPECS.
    defined = {attr for _, module in inspect.getmembers(kernels, inspect.ismodule)
               if module.__name__.startswith(kernels.__name__ + ".")
               for attr, obj in vars(module).items()
               if isinstance(obj, KernelInterface) and attr.endswith("_kernel")}
    compiled = {r["kernel"] for r in compile_results}
    assert defined, "no Triton kernels found"
    assert defined <= compiled, f"kernels without compile specs: {sorted(defined - compiled)}"


def test_every_spec_compiles_for_sm90(compile_results):
    failed = [f"{r['spec']}: {r['error']}" for r in compile_results if not r["ok"]]
    assert not failed, "\n".join(failed)
    # fp32, fp16 and bf16 are each compiled.
    sigs = json.dumps([r["spec"] for r in compile_results])
    for dt in ("fp32", "fp16", "bf16"):
        assert f"*{dt}" in sigs
