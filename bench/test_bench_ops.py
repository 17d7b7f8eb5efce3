"""pytest-benchmark view of the op rows of `decovae bench`: the same cases (decovae_fast.benchmark),
every backend of a case in one benchmark group, so pytest-benchmark's table compares them.

    pytest bench/test_bench_ops.py --benchmark-only            # --quick sizes and dtypes
    DECOVAE_BENCH_FULL=1 pytest bench/ --benchmark-only        # the full suite's

On a GPU the cases live on the GPU, but pytest-benchmark times with the wall clock: each call
is synchronised so the time is the kernel's (the `decovae bench` runner uses CUDA events).
"""
import os

import pytest
import torch

from decovae_fast.benchmark import suite as S

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = S.make_plan(quick=os.environ.get("DECOVAE_BENCH_FULL") != "1", device=DEVICE)
CASES = S.op_cases(PLAN)
PARAMS = [pytest.param(case, backend, id=f"{case.name}-{case.dtype}-{case.shape.replace(' ', '_')}-{backend}")
          for case in CASES for backend in case.fns]


@pytest.mark.parametrize("case,backend", PARAMS)
def test_op(benchmark, case, backend):
    fn = case.fns[backend]
    benchmark.group = f"{case.name} {case.shape} {case.dtype}"
    benchmark.extra_info.update(name=case.name, shape=case.shape, dtype=case.dtype, backend=backend,
                                bytes=case.bytes, flops=case.flops)

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(call)
