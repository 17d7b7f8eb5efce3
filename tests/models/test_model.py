"""Tests of the models (decovae_fast.models): shapes for any T, H, W; chunked == whole streaming;
adaptive GOPs; save/load; bf16; latent budget; input errors; decompose. Small configs keep them fast."""
from __future__ import annotations

import json

import pytest
import torch

from decovae_fast import DeCoVAE, DeCoVAEConfig, PlainCausalVAE, PlainVAEConfig
from decovae_fast.models import DeCoLatent, MotionEstimator, load_pretrained

# chunked vs whole: the same bits (every kernel computes an output the same way however the
# frames arrive; docs/ops.md, "Same bits however the work is split").
STREAM_TOL = 0.0


def small_config(**kw) -> DeCoVAEConfig:
    base = dict(keyframe_channels=4, motion_channels=2, residual_channels=2, keyframe_interval=9,
                motion_estimator_channels=(8, 8, 8), encoder_channels=(8, 16, 16), motion_encoder_channels=(8, 8, 8),
                decoder_channels=(16, 16, 8), decoder_blocks=(1, 1, 1))
    base.update(kw)
    return DeCoVAEConfig(**base)


def smooth_video(T, H, W, phase=0.0, speed=0.3, B=1, seed=0):
    """Smooth moving pattern in [-1, 1] (warpable, so no spurious scene cuts)."""
    g = torch.Generator().manual_seed(seed)
    fx, fy = (torch.rand(2, generator=g) * 0.2 + 0.1).tolist()
    t = torch.arange(T).view(T, 1, 1).float()
    y = torch.arange(H).view(1, H, 1).float()
    x = torch.arange(W).view(1, 1, W).float()
    r = torch.sin(fx * (x + speed * t) + phase) * torch.cos(fy * y)
    gch = torch.sin(fy * (y - speed * t) + 0 * x + 2 * phase)
    b = torch.cos(fx * 0.5 * (x + y) + 0.1 * t + phase)
    return (0.7 * torch.stack([r, gch, b])).unsqueeze(0).expand(B, -1, -1, -1, -1).contiguous()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeCoVAE(small_config(scene_cut_threshold=None)).eval()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("T", [1, 2, 5, 17, 33, 50])
def test_round_trip_shape_any_length(model, T):
    H, W = (13, 19) if T > 17 else (21, 35)
    x = smooth_video(T, H, W)
    with torch.no_grad():
        lat = model.encode(x)
        y = model.decode(lat)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.abs().max() <= 1
    assert (lat.frames, lat.height, lat.width) == (T, H, W)
    # interval 9: GOPs start every 9 frames (scene cuts off)
    assert lat.gop_starts == list(range(0, T, 9))
    assert lat.numel() == model.config.latent_elements(T, H, W)


def test_chunked_encode_decode_equal_whole(model):
    x = smooth_video(23, 20, 36, B=2)
    with torch.no_grad():
        whole = model.encode(x)
        for chunk in (1, 3, 8):
            part = model.encode(x, chunk_frames=chunk)
            assert part.gop_starts == whole.gop_starts
            for k, g in whole.parts().items():
                assert max_diff(g.mean, part.parts()[k].mean) <= STREAM_TOL, (chunk, k)
                assert max_diff(g.logvar, part.parts()[k].logvar) <= STREAM_TOL, (chunk, k)
        y = model.decode(whole)
        for chunk in (1, 4, 9):
            assert max_diff(y, model.decode(whole, chunk_frames=chunk)) <= STREAM_TOL, chunk
        # the streaming variants: pieces in, chunks out
        pieces = list(model.encode_stream(iter(x.split(5, dim=2))))
        assert len(pieces) == len(whole.gop_starts)
        assert max_diff(torch.cat(list(model.decode_stream(iter(pieces), chunk_frames=4)), 2), y) <= STREAM_TOL


def test_scene_cut_starts_new_gop():
    torch.manual_seed(0)
    m = DeCoVAE(small_config(keyframe_interval=17, scene_cut_threshold=0.08)).eval()
    a = smooth_video(6, 24, 24, speed=0.0, seed=1)
    b = -smooth_video(7, 24, 24, phase=1.3, speed=0.0, seed=2)
    x = torch.cat([a, b], 2)
    with torch.no_grad():
        lat = m.encode(x)
        assert lat.gop_starts == [0, 6]
        assert m.decompose(x)["keyframe_index"] == [0, 6]
        assert m.decode(lat).shape == x.shape
        # without the cut the whole clip is one GOP
        m.config.scene_cut_threshold = None
        assert m.encode(x).gop_starts == [0]


def test_batch_clips_cutting_differently_error_but_training_shares_the_cut():
    """encode decides cuts per clip (a batch cannot hold two structures: ValueError naming each
    clip's cut); training's forward cuts the whole batch where any clip cuts."""
    torch.manual_seed(0)
    m = DeCoVAE(small_config(keyframe_interval=17, scene_cut_threshold=0.08))
    a = smooth_video(6, 24, 24, speed=0.0, seed=1)
    cut = torch.cat([a, -smooth_video(7, 24, 24, phase=1.3, speed=0.0, seed=2)], 2)
    batch = torch.cat([smooth_video(13, 24, 24, speed=0.0, seed=1), cut])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\(clip 0: (\d+|none), clip 1: 6\).*fixed_gops=True"):
            m.eval().encode(batch)
        assert m.encode(batch, fixed_gops=True).gop_starts == [0]
    out = m.train()(batch)
    assert out.latent.gop_starts == [0, 6] and out.sample.shape == batch.shape


def test_save_load_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "decovae"
    loaded = DeCoVAE.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert isinstance(load_pretrained(tmp_path), DeCoVAE)
    x = smooth_video(5, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)), loaded.eval().decode(loaded.encode(x)))
    # latent to tensors and back
    lat = model.encode(x)
    t, meta = lat.to_tensors()
    assert all(isinstance(v, str) for v in meta.values())
    back = DeCoLatent.from_tensors(t, meta)
    assert back.gop_starts == lat.gop_starts and back.numel() == lat.numel()
    with torch.no_grad():
        assert torch.equal(model.decode(back), model.decode(lat))


def test_load_errors_name_the_file(model, tmp_path):
    model.save_pretrained(tmp_path / "ok")
    # wrong shapes: another config
    DeCoVAE(small_config(keyframe_channels=6)).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match="model.safetensors.*shapes"):
        DeCoVAE.from_pretrained(tmp_path / "other")
    # corrupt weights
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        DeCoVAE.from_pretrained(tmp_path / "ok")
    # other model type
    PlainCausalVAE(PlainVAEConfig(latent_channels=2, encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8))
                   ).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="config.json.*model_type"):
        DeCoVAE.from_pretrained(tmp_path / "plain")
    assert isinstance(load_pretrained(tmp_path / "plain"), PlainCausalVAE)
    # missing folder, broken JSON
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DeCoVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "plain" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        PlainCausalVAE.from_pretrained(tmp_path / "plain")


def test_bf16_runs(model):
    m = DeCoVAE(model.config).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16)
    x = smooth_video(6, 16, 24)
    with torch.no_grad():
        y = m.decode(m.encode(x.bfloat16()))
        ref = model.decode(model.encode(x))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    # bf16 has 8 mantissa bits; through ~20 layers of random weights errors compound to a few %
    assert max_diff(y, ref) < 0.15


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_latent_budget_named_configs(name):
    cfg = getattr(DeCoVAEConfig, name)()
    assert cfg.keyframe_interval <= 17
    H = W = 256
    T = cfg.keyframe_interval * 8
    per4 = cfg.latent_elements(T, H, W) * 4 / T
    baseline = 16 * H * W / 64  # a 16-channel latent at 4x8x8
    assert per4 <= 0.6 * baseline
    plain = PlainVAEConfig.matching(cfg)
    # the ablation's latent is within 5% of the DeCo latent
    assert abs(plain.latent_elements(T, H, W) / cfg.latent_elements(T, H, W) - 1) < 0.05


def test_latent_count_matches_encoded(model):
    cfg = DeCoVAEConfig.tiny()
    x = smooth_video(T=1, H=16, W=16)
    assert cfg.latent_elements(1, 16, 16) == cfg.keyframe_channels * 4
    with torch.no_grad():
        assert model.encode(x).numel() == model.config.latent_elements(1, 16, 16)


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match="video.*B, 3, T, H, W"):
        model.encode(torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model.encode(torch.zeros(1, 4, 2, 16, 16))
    bad = torch.zeros(1, 3, 2, 16, 16)
    bad[0, 1, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.encode(bad)
    with pytest.raises(ValueError, match="float"):
        model.encode(torch.zeros(1, 3, 2, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="chunk_frames"):
        model.encode(torch.zeros(1, 3, 2, 16, 16), chunk_frames=0)
    with pytest.raises(TypeError):
        model.encode(None)


def test_decompose_shapes_and_zero_motion(model, monkeypatch):
    x = smooth_video(12, 17, 22, B=2)
    parts = model.decompose(x)
    assert parts["keyframe_index"] == [0, 9]
    assert parts["keyframes"].shape == (2, 3, 2, 17, 22)
    for k in ("motion", "prediction", "residual"):
        assert parts[k].shape == (2, 3, 12, 17, 22), k
    assert torch.allclose(parts["prediction"] + parts["residual"], x, atol=1e-6)
    # zero motion and s = 0: the prediction of every frame is its GOP's keyframe
    monkeypatch.setattr(model.motion_estimator, "forward",
                        lambda frames, keyframe: torch.zeros(frames.shape[0], 3, *frames.shape[2:]))
    parts = model.decompose(x)
    for t in range(12):
        kf = x[:, :, 0 if t < 9 else 9]
        assert torch.allclose(parts["prediction"][:, :, t], kf, atol=1e-6), t


def test_encode_stream_hands_out_the_decomposition_it_computed(model):
    """on_gop gets each GOP's keyframe, motion and residual as the encoder computed them (the
    reconstruct report's figure uses it instead of decomposing again): equal to decompose(), and
    the latent is unchanged by asking."""
    x = smooth_video(12, 17, 22, B=2)
    gops = []
    with torch.no_grad():
        pieces = list(model.encode_stream(x.split(5, dim=2), on_gop=gops.append))
        plain = list(model.encode_stream(x.split(5, dim=2)))
    assert all(torch.equal(a.keyframe.mean, b.keyframe.mean) and torch.equal(a.residual.mean, b.residual.mean)
               for a, b in zip(pieces, plain))
    parts = model.decompose(x)
    assert [g["start"] for g in gops] == parts["keyframe_index"] == [0, 9]
    for i, (g, (start, end)) in enumerate(zip(gops, [(0, 9), (9, 12)])):
        assert torch.equal(g["keyframe"], parts["keyframes"][:, :, i:i + 1])
        assert g["motion"].shape == (2, 3, end - start - 1, 17, 22)
        assert torch.allclose(g["motion"], parts["motion"][:, :, start + 1:end], atol=1e-6)
        assert torch.allclose(g["residual"], parts["residual"][:, :, start + 1:end], atol=1e-6)


def test_motion_estimator_contract():
    m = MotionEstimator((8, 8, 8), levels=5)
    x = smooth_video(3, 19, 23)
    mo = m(x, x[:, :, 0])
    assert mo.shape == (1, 3, 3, 19, 23) and mo.dtype == torch.float32
    assert (mo[:, 2] >= 0).all() and (mo[:, 2] <= 5).all()
    mo.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_forward_parts_and_gradients(model):
    x = smooth_video(9, 16, 16)
    m = DeCoVAE(model.config)
    out = m(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == x.shape
    assert out.parts["keyframe"].shape == out.parts["target_keyframe"].shape == (1, 3, 1, 16, 16)
    for k in ("motion", "residual", "target_motion", "target_residual"):
        assert out.parts[k].shape == (1, 3, 9, 16, 16), k
    loss = (out.sample - x).abs().mean() + 1e-3 * out.latent.kl().mean()
    loss.backward()
    for name in ("keyframe_encoder", "motion_encoder", "residual_encoder", "decoder"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_plain_vae_round_trip_and_streaming():
    torch.manual_seed(0)
    cfg = PlainVAEConfig.matching(small_config())
    m = PlainCausalVAE(cfg).eval()
    x = smooth_video(11, 13, 21)
    with torch.no_grad():
        lat = m.encode(x)
        assert lat.motion is None and lat.gop_starts == [0, 9]
        assert lat.numel() == cfg.latent_elements(11, 13, 21)
        y = m.decode(lat)
        assert y.shape == x.shape
        assert max_diff(y, m.decode(m.encode(x, chunk_frames=2), chunk_frames=4)) <= STREAM_TOL
    out = m(x)
    assert out.sample.shape == x.shape


def test_tiling(model):
    x = smooth_video(5, 40, 72)
    with torch.no_grad():
        lat = model.encode(x)
        ref = model.decode(lat)
        try:
            # a halo covering the whole frame: every tile sees everything, so stitching must be exact
            model.enable_tiling(tile_size=32, halo=80)
            full = model.encode(x)
            for k, g in lat.parts().items():
                assert torch.equal(g.mean, full.parts()[k].mean), k
            assert torch.equal(model.decode(lat), ref)
            # a halo wider than the decoder's receptive field (small config): decode equals untiled
            model.enable_tiling(tile_size=32, halo=48)
            y = model.decode(lat)
            assert y.shape == x.shape and max_diff(y, ref) < 1e-3
            assert model.encode(x).numel() == lat.numel()
        finally:
            model.disable_tiling()
            model.config.tile_size, model.config.tile_halo = 256, 64
