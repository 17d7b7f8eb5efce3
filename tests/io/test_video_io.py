"""Video reading/writing, tensor conversions, metrics and the latent file, in process (fast)."""
from __future__ import annotations

import json
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from decovae_fast.eval import metrics
from decovae_fast.errors import UserError
from decovae_fast.io.video import (VideoReader, VideoWriter, frames_to_tensor, parse_size, read_video,
                                   tensor_to_frames)

from conftest import make_truncated_video, make_zero_frame_video  # shared with tests/cli


# --- sizes and conversions ---------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("64x48") == (64, 48)
    assert parse_size(" 7X9 ") == (7, 9)
    assert parse_size(None) is None
    for bad in ("64", "0x64", "64x0", "ax64", "-1x4", "99999x4", "64x64x3"):
        with pytest.raises(UserError, match="--size"):
            parse_size(bad)


def test_tensor_conversions_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (1, 3, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert float(x[0, 0, 0, 0, 0]) == pytest.approx(frames[0, 0, 0, 0] / 127.5 - 1)
    np.testing.assert_array_equal(tensor_to_frames(x), frames)  # exact: 255 levels map back
    # bf16 keeps 8 significant bits: within one level of 255
    bf16 = tensor_to_frames(frames_to_tensor(frames, dtype=torch.bfloat16))
    assert np.abs(bf16.astype(int) - frames).max() <= 1
    clipped = tensor_to_frames(torch.full((1, 3, 1, 2, 2), 3.0))
    assert (clipped == 255).all()
    with pytest.raises(ValueError, match="video must have shape"):
        tensor_to_frames(torch.zeros(2, 3, 1, 2, 2))


# --- reading and writing -----------------------------------------------------------------------------
def test_write_then_read_keeps_frames_fps_and_odd_size(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (7, 33, 45, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(frames[:, ::3, ::3], 3, 1), 3, 2)[:, :33, :45]  # blocky: compressible
    fps = Fraction(30000, 1001)
    path = tmp_path / "odd.mp4"
    with VideoWriter(path, fps, 33, 45, crf=0) as w:  # crf 0: lossless 4:4:4 up to RGB<->YUV rounding
        w.write(frames[:3])
        w.write(frames[3])  # a single (H, W, 3) frame is accepted too
        w.write(frames[4:])
    got, got_fps = read_video(path)
    assert got.shape == frames.shape and got_fps == fps
    # RGB -> YUV -> RGB in 8 bits: off by a few levels at most
    assert np.abs(got.astype(int) - frames).max() <= 6


def test_reader_resize_limit_and_chunks(make_clip):
    path = make_clip(10, 48, 64, Fraction(25))
    with VideoReader(path, size=(20, 30), max_frames=7) as r:
        assert (r.height, r.width, r.source_height, r.source_width) == (20, 30, 48, 64)
        assert r.fps == 25 and r.frames_hint == 7
        sizes = [c.shape for c in r.chunks(3)]
    assert sizes == [(3, 20, 30, 3), (3, 20, 30, 3), (1, 20, 30, 3)]
    full, _ = read_video(path)
    assert full.shape == (10, 48, 64, 3)


def _assert_user_error(path, match):
    with pytest.raises(UserError) as info:
        list(VideoReader(path))
    assert str(path) in str(info.value)
    assert match in str(info.value)


def test_reader_errors_name_the_file(tmp_path, make_clip):
    _assert_user_error(tmp_path / "missing.mp4", "no such file")
    _assert_user_error(tmp_path, "is a directory")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _assert_user_error(empty, "empty file")
    text = tmp_path / "text.mp4"
    text.write_text("not a video at all\n" * 50)
    _assert_user_error(text, "not a readable video")


def test_zero_frame_and_truncated_videos(tmp_path, make_clip):
    zero = make_zero_frame_video(tmp_path / "zero.mp4")
    with pytest.raises(UserError, match="no decodable frames|no video stream|not a readable video") as info:
        list(VideoReader(zero))
    assert str(zero) in str(info.value)
    cut = make_truncated_video(make_clip, tmp_path / "cut.mp4")
    with pytest.raises(UserError, match="truncated") as info:
        list(VideoReader(cut))
    assert str(cut) in str(info.value)


def test_writer_rejects_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="cannot create a video file"):
        VideoWriter(tmp_path / "out.notavideo", Fraction(24), 16, 16)


# --- metrics -----------------------------------------------------------------------------------------
def test_psnr_known_values():
    x = torch.zeros(1, 3, 2, 4, 4)
    y = x.clone()
    y[:, :, 1] += 0.2  # mse 0.04 on data range 2: 10*log10(4/0.04) = 20 dB
    p = metrics.psnr(x, y)
    assert p.shape == (1, 2)
    assert float(p[0, 0]) == metrics.MAX_PSNR
    assert float(p[0, 1]) == pytest.approx(20.0, abs=1e-4)


def _ssim_direct(a: np.ndarray, b: np.ndarray, L=255.0, win=11, sigma=1.5) -> float:
    """SSIM of two 2-D images with an explicit 2-D Gaussian window at every valid position."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            pa, pb = a[i:i + win, j:j + win], b[i:i + win, j:j + win]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula_and_orders_noise():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (1, 20, 23, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    c = np.clip(a + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
    p_b, s_b = metrics.frame_metrics(a, b)
    _, s_c = metrics.frame_metrics(a, c)
    want = np.mean([_ssim_direct(a[0, ..., k].astype(float), b[0, ..., k].astype(float)) for k in range(3)])
    assert s_b[0] == pytest.approx(want, abs=1e-4)  # fp32 sums of ~100 terms: 1e-4 is ample
    assert metrics.frame_metrics(a, a)[1][0] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > s_b[0] > s_c[0]
    # frames smaller than the window still work
    tiny = torch.rand(1, 3, 1, 5, 4)
    assert float(metrics.ssim(tiny, tiny)[0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_ssim_is_differentiable():
    x = torch.rand(1, 3, 2, 16, 16, requires_grad=True)
    y = torch.rand(1, 3, 2, 16, 16)
    (1 - metrics.ssim(x, y).mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- latent file -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(small_weights):
    from decovae_fast.models import load_pretrained

    model = load_pretrained(small_weights).eval()
    video = torch.rand(1, 3, 6, 20, 24) * 2 - 1
    with torch.no_grad():
        latent = model.encode(video)
    return model, latent


def test_latent_file_round_trip(tmp_path, encoded):
    from decovae_fast.io.latent_file import load_latent, save_latent

    model, latent = encoded
    path = tmp_path / "lat.safetensors"
    save_latent(path, latent, model_type="decovae", config_hash=model.config_hash(), fps=Fraction(30000, 1001))
    lf = load_latent(path, expect_config_hash=model.config_hash())
    assert (lf.frames, lf.height, lf.width) == (6, 20, 24)
    assert lf.fps == Fraction(30000, 1001) and lf.gop_starts == latent.gop_starts
    assert lf.model_type == "decovae"
    for name, g in latent.parts().items():
        torch.testing.assert_close(getattr(lf.latent, name).mean, g.mean, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*partial*"))  # the temporary name was renamed away


def _save(tmp_path, encoded, name="lat.safetensors"):
    from decovae_fast.io.latent_file import save_latent

    model, latent = encoded
    path = tmp_path / name
    save_latent(path, latent, model_type="decovae", config_hash=model.config_hash(), fps=Fraction(24))
    return path, model


def _header(path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data


def test_latent_file_errors(tmp_path, encoded):
    from decovae_fast.io.latent_file import load_latent

    path, model = _save(tmp_path, encoded)
    n, header, data = _header(path)

    # tampered metadata (same length, still valid JSON): the checksum catches it
    bad = tmp_path / "tampered.safetensors"
    head = data[8:8 + n].replace(b'"frames":"6"', b'"frames":"5"')
    assert head != data[8:8 + n]
    bad.write_bytes(data[:8] + head + data[8 + n:])
    with pytest.raises(UserError, match="checksum") as info:
        load_latent(bad)
    assert str(bad) in str(info.value)

    # a damaged header (not JSON) and a truncated body
    for name, blob in (("garbled.safetensors", data[:8] + b"{" * n + data[8 + n:]),
                       ("truncated.safetensors", data[:len(data) - 100]),
                       ("short.safetensors", data[:5])):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(UserError, match="not a readable latent file") as info:
            load_latent(p)
        assert str(p) in str(info.value)

    # another model's file
    with pytest.raises(UserError, match="config hash") as info:
        load_latent(path, expect_config_hash="0123456789abcdef")
    assert str(path) in str(info.value)

    # a safetensors file that is not a latent file
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not a decovae latent file"):
        load_latent(other)
    with pytest.raises(UserError, match="no such file"):
        load_latent(tmp_path / "nope.safetensors")


def test_latent_file_rejects_nan(tmp_path, encoded):
    from decovae_fast.io.latent_file import load_latent, save_latent

    model, latent = encoded
    latent = latent.detach()
    latent.motion.mean[0, 0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_latent(path, latent, model_type="decovae", config_hash=model.config_hash(), fps=Fraction(24))
    with pytest.raises(UserError, match="NaN"):
        load_latent(path)


def test_crop_scales_to_cover_and_takes_the_centre(tmp_path):
    """--size with crop keeps the aspect: a 48x96 frame read at 32x32 is scaled to 32x64 and its
    middle 32 columns kept (stretching would squeeze the whole width in)."""
    from conftest import write_clip

    frames = np.zeros((3, 48, 96, 3), np.uint8)
    frames[:, :, 24:72] = 255  # a white band over the middle half of the width
    path = write_clip(tmp_path / "band.mp4", frames, Fraction(24), pix_fmt="yuv444p")
    with VideoReader(path, size=(32, 32), crop=True) as r:
        cropped = np.stack(list(r))
    with VideoReader(path, size=(32, 32)) as r:
        stretched = np.stack(list(r))
    assert cropped.shape == stretched.shape == (3, 32, 32, 3)
    assert cropped[:, :, 2:30].min() > 200  # the band fills the centre crop
    assert stretched[:, :, :6].max() < 60 and stretched[:, :, 10:22].min() > 200  # black edges squeezed in
