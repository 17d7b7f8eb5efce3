"""AutoencoderDeCo (decovae_fast/autoencoder_deco.py): DeCoVAE behind diffusers' autoencoder API,
against the installed diffusers (skipped without it)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from decovae_fast import DeCoVAE  # noqa: E402
from decovae_fast.autoencoder_deco import AutoencoderDeCo  # noqa: E402
from tests.models.test_model import small_config, smooth_video  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    vae = DeCoVAE(small_config())
    n = vae.pack_layout().channels
    vae.config = dataclasses.replace(vae.config, latents_mean=tuple(0.1 * i for i in range(n)),
                                     latents_std=tuple(1.0 + 0.01 * i for i in range(n)))
    folder = tmp_path_factory.mktemp("deco")
    vae.save_pretrained(folder)
    return folder, vae.eval()


def test_encode_decode_match_the_package_and_the_layout(weights):
    folder, vae = weights
    ae = AutoencoderDeCo.from_decovae(folder)
    x = smooth_video(13, 32, 48)
    with torch.no_grad():
        dist = ae.encode(x).latent_dist
        z = dist.mode()
        assert tuple(z.shape) == (1,) + vae.pack_layout().shape(13, 32, 48)
        latent = vae.encode(x, fixed_gops=True)
        assert torch.equal(z, latent.pack(vae.pack_layout()))
        out = ae.decode(z, num_frames=13).sample
        assert torch.equal(out, vae.decode(latent))
        assert dist.sample(generator=torch.Generator().manual_seed(0)).shape == z.shape
        full = ae.decode(z).sample  # no num_frames: whole GOPs
        assert full.shape == (1, 3, 2 * vae.config.keyframe_interval, 32, 48)
    assert list(ae.config.latents_mean) == list(vae.config.latents_mean)
    ae.enable_tiling(64, 16)
    assert ae.vae.use_tiling
    ae.disable_tiling()


def test_diffusers_save_and_load_round_trip(weights, tmp_path):
    folder, _ = weights
    ae = AutoencoderDeCo.from_decovae(folder)
    ae.save_pretrained(tmp_path / "diffusers_vae")
    back = AutoencoderDeCo.from_pretrained(tmp_path / "diffusers_vae").eval()
    x = smooth_video(9, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.encode(x).latent_dist.mode(), ae.encode(x).latent_dist.mode())
    assert back.config.latents_std == ae.config.latents_std
    assert (tmp_path / "diffusers_vae" / "diffusion_pytorch_model.safetensors").exists()
