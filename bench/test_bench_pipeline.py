"""pytest-benchmark view of the pipeline rows: encode and decode of DeCo-VAE (tiny, base) and of the
diffusers peers (skipped without diffusers) at the --quick size, in this process. Peak memory and
interleaving are the `decovae bench` runner's job (one process per model); this file only times.

    pytest bench/test_bench_pipeline.py --benchmark-only          # several minutes on a 2-core CPU
"""
import importlib.util

import pytest
import torch

from decovae_fast.benchmark import pipeline as P

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, H, W = 9, 128, 128
MODELS = list(P.DECOVAE_MODELS) + list(P.PEERS)


@pytest.fixture(scope="module")
def video():
    return torch.from_numpy(P.load_video(T, H, W)[0]).to(DEVICE)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    if request.param in P.PEERS and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers not installed (pip install -e .[peers])")
    return request.param, P.build(request.param, DEVICE)


def _timed(benchmark, fn):
    def call():
        with torch.no_grad():
            fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("phase", ["encode", "decode"])
def test_pipeline(benchmark, model, video, phase):
    name, (encode, decode, numel, notes) = model
    with torch.no_grad():
        latent = encode(video)
    benchmark.group = f"{phase} 1x3x{T}x{H}x{W}"
    benchmark.extra_info.update(model=name, frames=T, latent_elements=numel(latent), **notes)
    _timed(benchmark, (lambda: encode(video)) if phase == "encode" else (lambda: decode(latent)))
