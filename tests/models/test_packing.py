"""The packed latent (DeCoLatent.pack / unpack, PackLayout in models/latent.py) and the bound on
adaptive keyframes (min_gop_frames / DeCoVAEConfig.min_gop)."""
from __future__ import annotations

import math

import pytest
import torch

from decovae_fast import DeCoVAE, PlainCausalVAE, PlainVAEConfig
from decovae_fast.models import DeCoLatent
from decovae_fast.models.latent import DiagonalGaussian

from tests.models.test_model import small_config, smooth_video


def random_latent(layout, T, H, W, seed=0):
    """A latent with fixed GOPs and random means in the shapes a model of `layout` gives."""
    g = torch.Generator().manual_seed(seed)
    starts = layout.gop_starts(T)
    K = sum(math.ceil((min(s + layout.keyframe_interval, T) - s - 1) / 4) for s in starts)
    c = layout.cell
    h8, w8 = math.ceil(H / c) * c // 8, math.ceil(W / c) * c // 8

    def gauss(C, t, h, w):
        return DiagonalGaussian(torch.randn(2, C, t, h, w, generator=g))

    motion = gauss(layout.motion_channels, K, h8 // 2, w8 // 2) if layout.motion_channels else None
    return DeCoLatent(gauss(layout.keyframe_channels, len(starts), h8, w8), motion,
                      gauss(layout.residual_channels, K, h8, w8), starts, T, H, W)


LAYOUTS = {"deco": small_config().pack_layout(), "deco_tiny": DeCoVAE(small_config(keyframe_interval=17)).pack_layout(),
           "plain": PlainVAEConfig(latent_channels=3, keyframe_interval=9).pack_layout()}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [1, 5, 17, 33, 50])
@pytest.mark.parametrize("H, W", [(32, 48), (23, 37)])
def test_pack_unpack_round_trip_is_exact(name, T, H, W):
    layout = LAYOUTS[name]
    lat = random_latent(layout, T, H, W)
    packed = lat.pack(layout)
    assert tuple(packed.shape) == (2,) + layout.shape(T, H, W)  # shape from (T, H, W) and the config only
    back = DeCoLatent.unpack(packed, layout, T, H, W)
    assert back.gop_starts == lat.gop_starts and (back.frames, back.height, back.width) == (T, H, W)
    for part, g in lat.parts().items():
        assert torch.equal(getattr(back, part).mean, g.mean), part
    # padding (a short last GOP's missing steps) is exactly zero, and only there
    valid = layout.valid(T)
    assert torch.all(packed[:, ~valid] == 0)
    assert torch.all(packed[:, valid] != 0)


def test_packed_channels_are_documented_layout():
    layout = LAYOUTS["deco"]  # interval 9: 2 inner steps; fold 2
    assert layout.steps == 2 and layout.fold == 2
    assert layout.channels == 4 * 4 + 2 * (2 + 2 * 4)
    lat = random_latent(layout, 9, 32, 32)
    packed = lat.pack(layout)
    # step 1's motion channels sit after the keyframe's 16 and step 0's 10
    assert torch.equal(packed[:, 16 + 10:16 + 12, 0], lat.motion.mean[:, :, 1])


def test_decode_of_unpacked_equals_decode_of_original():
    torch.manual_seed(0)
    model = DeCoVAE(small_config()).eval()
    x = smooth_video(13, 24, 40)
    with torch.no_grad():
        lat = model.encode(x, fixed_gops=True)
        back = DeCoLatent.unpack(lat.pack(model.pack_layout()), model.pack_layout(), 13, 24, 40)
        assert torch.equal(model.decode(back), model.decode(lat))
    plain = PlainCausalVAE(PlainVAEConfig(latent_channels=3, keyframe_interval=9, encoder_channels=(8, 8, 8),
                                          decoder_channels=(8, 8, 8), decoder_blocks=(1, 1, 1))).eval()
    with torch.no_grad():
        lat = plain.encode(x)
        back = DeCoLatent.unpack(lat.pack(plain.pack_layout()), plain.pack_layout(), 13, 24, 40)
        assert torch.equal(plain.decode(back), plain.decode(lat))


def test_pack_refuses_adaptive_gops_and_unpack_a_wrong_shape():
    layout = LAYOUTS["deco"]
    lat = random_latent(layout, 17, 32, 32)
    lat.gop_starts = [0, 5, 14]
    with pytest.raises(ValueError, match="fixed_gops"):
        lat.pack(layout)
    with pytest.raises(ValueError, match="does not match"):
        DeCoLatent.unpack(torch.zeros(1, layout.channels, 2, 2, 2), layout, 17, 33, 32)


def _bound(T, H, W):
    """Elements of a 16-channel latent at 4x time (first frame alone) and 8x8 space."""
    return 16 * (1 + math.ceil((T - 1) / 4)) * math.ceil(H / 8) * math.ceil(W / 8)


def test_the_default_min_gop_bounds_every_video_by_the_16_channel_4x8x8_size():
    """For every T up to 200, the costliest cut of T frames into GOPs of min_gop() to
    keyframe_interval frames (the last one any length) stays within the 16-channel 4x8x8 latent's
    64 * (1 + ceil((T-1)/4)) elements per 16x16 pixels, and one frame fewer would not."""
    from decovae_fast import DeCoVAEConfig

    cfg = DeCoVAEConfig()  # tiny's channels and interval
    assert cfg.min_gop() == 7

    def worst(T, m):
        best = [0] + [-1] * T  # costliest cut of t frames into GOPs of m..N frames (-1: none)
        for t in range(1, T + 1):
            best[t] = max([best[t - n] + cfg.gop_cell_elements(n) for n in range(m, cfg.keyframe_interval + 1)
                           if n <= t and best[t - n] >= 0] or [-1])
        return max(best[T - n] + cfg.gop_cell_elements(n) for n in range(1, min(T, cfg.keyframe_interval) + 1)
                   if best[T - n] >= 0)

    def bound(T):
        return 64 * (1 + math.ceil((T - 1) / 4))

    assert all(worst(T, 7) <= bound(T) for T in range(1, 201))
    assert any(worst(T, 6) > bound(T) for T in range(1, 201))


@pytest.mark.parametrize("min_gop", [None, 1])
def test_adaptive_keyframes_are_capped_on_noise(min_gop):
    """Noise defeats the warp at every frame, so every frame asks for a keyframe: with the default
    floor GOPs are 7 frames and the latent stays under the bound; without one (min_gop_frames=1)
    every frame is a keyframe and it does not."""
    torch.manual_seed(0)
    cfg = small_config(keyframe_channels=16, motion_channels=4, residual_channels=4, keyframe_interval=17,
                       scene_cut_threshold=1e-4, min_gop_frames=min_gop)
    model = DeCoVAE(cfg).eval()
    x = torch.rand(1, 3, 33, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = model.encode(x)
    if min_gop is None:
        assert lat.gop_starts == [0, 7, 14, 21, 28]
        assert lat.numel() <= _bound(33, 32, 32)
        fixed = model.encode(x, fixed_gops=True)
        assert fixed.gop_starts == [0, 17] and fixed.numel() <= 0.55 * _bound(33, 32, 32)
    else:
        assert lat.gop_starts == list(range(33))
        assert lat.numel() > _bound(33, 32, 32)


def test_channel_stats_normalise_their_own_data_to_mean_0_std_1():
    import dataclasses

    from decovae_fast.models.latent import ChannelStats

    torch.manual_seed(0)
    model = DeCoVAE(small_config()).eval()
    layout = model.pack_layout()
    stats = ChannelStats(layout.channels)
    packed = []
    with torch.no_grad():
        for seed, T in [(0, 13), (1, 9), (2, 20)]:
            x = smooth_video(T, 32, 48, phase=seed, seed=seed)
            p = model.encode(x, fixed_gops=True).pack(layout)
            stats.update(p, layout.valid(T))
            packed.append((p, layout.valid(T)))
    mean, std = stats.result()
    with pytest.raises(ValueError, match="normalize|latent-stats"):
        model.normalize(packed[0][0])
    model.config = dataclasses.replace(model.config, latents_mean=tuple(mean), latents_std=tuple(std))
    per_channel = [torch.cat([_valid_values(model.normalize(p), v)[c] for p, v in packed]).double()
                   for c in range(layout.channels)]
    assert max(abs(v.mean().item()) for v in per_channel) < 1e-5
    assert max(abs(v.std().item() - 1) for v in per_channel) < 1e-4
    p = packed[0][0]
    assert torch.allclose(model.denormalize(model.normalize(p)), p, atol=1e-5)
    with pytest.raises(ValueError, match="latents_mean"):
        dataclasses.replace(model.config, latents_mean=(0.0,), latents_std=(1.0,))


def _valid_values(x, valid):
    """[the valid entries of channel c of a packed (B, C, G, h, w) tensor, for every c]."""
    x = x.movedim(1, 0)  # (C, B, G, h, w)
    return [x[c][:, valid[c]].reshape(-1) for c in range(x.shape[0])]
