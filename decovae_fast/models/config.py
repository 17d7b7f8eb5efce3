"""Configuration dataclasses of the models. Both are asdict-able and round-trip through JSON.

Temporal layout (one scheme for both models, documented here once): a video is cut into GOPs
(groups of pictures). A GOP of n frames is its first frame (the keyframe) plus n - 1 "inner" frames;
the inner frames are padded to a multiple of 4 by repeating the last frame and compressed 4x in
time, so a GOP of 1 + 4k frames has one keyframe latent and k motion/residual latent frames.
A new GOP starts every `keyframe_interval` frames, or earlier when the warp of the keyframe fails
(mean squared residual over `scene_cut_threshold`, e.g. a scene cut). GOPs are coded
independently, which is what makes streaming simple: one GOP at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass


def _tuples(obj) -> None:
    """JSON gives lists; keep the tuple fields tuples so configs compare equal after a round trip."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, list):
            setattr(obj, f.name, tuple(v))


class _ConfigMixin:
    model_type = ""

    def _check_gop_and_tiles(self) -> None:
        """Checks of the fields both model configs have."""
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if self.tile_size % 16 or self.tile_halo % 16:
            raise ValueError("tile_size and tile_halo must be multiples of 16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        d = {k: v for k, v in d.items() if k != "model_type"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps({"model_type": self.model_type, **self.to_dict()}, indent=2, sort_keys=True)

    # fields that do not change what a latent decodes to: latent files made before they existed
    # stay decodable (the hash is checked at decode)
    _NOT_HASHED = ("min_gop_frames", "latents_mean", "latents_std")

    def _check_latent_stats(self) -> None:
        mean, std = self.latents_mean, self.latents_std
        if (mean is None) != (std is None):
            raise ValueError("latents_mean and latents_std come together")
        if mean is not None:
            n = self.pack_layout().channels
            if len(mean) != n or len(std) != n or min(std) <= 0:
                raise ValueError(f"latents_mean and latents_std need {n} values (the packed channels), std > 0")

    def config_hash(self) -> str:
        """Short stable hex digest of the config (latent files carry it)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in self._NOT_HASHED}
        blob = json.dumps({"model_type": self.model_type, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class DeCoVAEConfig(_ConfigMixin):
    # latent channels of the three parts (keyframe 8x spatial; motion 16x spatial, 4x temporal;
    # residual 8x spatial, 4x temporal)
    keyframe_channels: int = 16
    motion_channels: int = 4
    residual_channels: int = 4
    # GOPs
    keyframe_interval: int = 17
    scene_cut_threshold: float | None = 0.08  # mean squared warp residual in [-1,1] units; None: off
    # a scene cut starts a new GOP only once the current one has this many frames (min_gop());
    # None: the fewest that keep any video's latent within the size of a 16-channel latent at 4x
    # time and 8x8 space (7 for tiny; docs/latent_format.md)
    min_gop_frames: int | None = None
    # scale-space warp
    volume_levels: int = 5
    volume_sigma0: float = 1.0
    motion_scale: float = 16.0  # u, v (pixels) are divided by this at the encoder and decoder
    # motion estimator: channels at 1/4, 1/8, 1/16 resolution
    motion_estimator_channels: tuple = (24, 32, 48)
    # where the encoder's motion comes from: "learned" (MotionEstimator, the channels above) or
    # OpenCV's DIS optical flow ("dis_fast" | "dis_medium": ClassicalMotion, needs opencv)
    motion_source: str = "learned"
    # keyframe and residual encoders: channels at 1/2, 1/4, 1/8; ResBlocks per stage
    encoder_channels: tuple = (32, 64, 96)
    encoder_blocks: tuple = (1, 1, 1)
    # motion encoder: channels at 1/4, 1/8, 1/16
    motion_encoder_channels: tuple = (32, 48, 64)
    # shared decoder trunk: channels at 1/8, 1/4, 1/2 (coarse to fine); ResBlocks per stage
    decoder_channels: tuple = (128, 96, 64)
    decoder_blocks: tuple = (2, 1, 1)
    # tiling (enable_tiling): tile core size and halo (context on every side), in pixels
    tile_size: int = 256
    tile_halo: int = 64
    # linear patch codes (PatchLinear, PCA-initialised by training) beside each encoder's head and
    # the decoder's outputs: 8x8 RGB patches of the keyframe, 4x16x16 (u, v) patches of the motion,
    # 4x8x8 RGB patches of the residual. The learned paths start at zero and learn the correction
    # to the linear floor (issue 18). False: the first bundled weights' architecture.
    linear_paths: bool = False
    # per-channel statistics of the packed latent (pack_layout().channels values each; `decovae
    # latent-stats`), used by normalize / denormalize as diffusers' Wan VAE uses its own
    latents_mean: tuple | None = None
    latents_std: tuple | None = None

    model_type = "decovae"

    def __post_init__(self):
        _tuples(self)
        self._check_gop_and_tiles()
        self._check_latent_stats()
        if self.min_gop_frames is not None and self.min_gop_frames < 1:
            raise ValueError(f"min_gop_frames must be >= 1, got {self.min_gop_frames}")
        if self.motion_source not in ("learned", "dis_fast", "dis_medium"):
            raise ValueError(f"motion_source must be 'learned', 'dis_fast' or 'dis_medium', got {self.motion_source!r}")
        for name in ("keyframe_channels", "motion_channels", "residual_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def tiny(cls) -> "DeCoVAEConfig":
        """A few million parameters: trainable on a CPU; the configuration that ships with weights."""
        return cls()

    @classmethod
    def base(cls) -> "DeCoVAEConfig":
        """The size a GPU user would train."""
        return cls(motion_estimator_channels=(32, 64, 96), encoder_channels=(64, 128, 256),
                   encoder_blocks=(1, 2, 2), motion_encoder_channels=(64, 96, 128),
                   decoder_channels=(384, 256, 128), decoder_blocks=(3, 2, 2))

    @property
    def spatial_factor(self) -> int:
        """H and W are padded to a multiple of this (the motion latent's 16x)."""
        return 16

    def gop_cell_elements(self, n: int) -> int:
        """Latent elements of a GOP of n frames per 16x16 pixels."""
        return 4 * self.keyframe_channels + math.ceil((n - 1) / 4) * (self.motion_channels + 4 * self.residual_channels)

    def min_gop(self) -> int:
        """Frames a GOP reaches before an adaptive cut may start the next one: min_gop_frames, or
        the fewest m such that every GOP of m to keyframe_interval frames costs at most the 16
        elements per frame and 16x16 pixels of a 16-channel 4x8x8 latent (with the short last GOP
        paid for by that latent's separate first frame; tests/models/test_packing.py checks the
        whole-video bound for every T up to 200)."""
        if self.min_gop_frames is not None:
            return self.min_gop_frames
        n_max = self.keyframe_interval
        for m in range(1, n_max + 1):
            if all(self.gop_cell_elements(n) <= 16 * n for n in range(m, n_max + 1)):
                return m
        return n_max

    def pack_layout(self):
        """The packed latent's layout (DeCoLatent.pack). (Imported here: configs import no torch.)"""
        from decovae_fast.models.latent import PackLayout
        return PackLayout(self.keyframe_interval, self.keyframe_channels, self.motion_channels,
                          self.residual_channels, cell=16)

    def latent_elements(self, frames: int, height: int, width: int) -> int:
        """Latent elements (per batch item) of a video cut only at the keyframe interval."""
        cells = math.ceil(height / 16) * math.ceil(width / 16)
        starts = range(0, frames, self.keyframe_interval)
        return cells * sum(self.gop_cell_elements(min(self.keyframe_interval, frames - s)) for s in starts)


@dataclass
class PlainVAEConfig(_ConfigMixin):
    """One RGB causal encoder (8x spatial, 4x temporal) and the DeCo-VAE decoder trunk."""
    latent_channels: int = 7
    keyframe_interval: int = 17  # segments coded independently, as DeCo-VAE's GOPs (no adaptive cut)
    encoder_channels: tuple = (32, 64, 96)
    encoder_blocks: tuple = (1, 1, 1)
    decoder_channels: tuple = (128, 96, 64)
    decoder_blocks: tuple = (2, 1, 1)
    tile_size: int = 256
    tile_halo: int = 64
    # linear 8x8 patch codes beside the encoder head and decoder output, one for the first frame
    # and one for each group of 4 frames (PatchLinear): the counterpart of DeCoVAE's linear_paths
    linear_path: bool = False
    # per-channel statistics of the packed latent (as DeCoVAEConfig's)
    latents_mean: tuple | None = None
    latents_std: tuple | None = None

    model_type = "plain"

    def __post_init__(self):
        _tuples(self)
        self._check_gop_and_tiles()
        self._check_latent_stats()

    @classmethod
    def matching(cls, deco: DeCoVAEConfig) -> "PlainVAEConfig":
        """Same decoder trunk, encoder widths and GOP length as `deco`, and the latent channel count
        whose element count per GOP is closest to deco's (with interval 1 + 4k both have 1 + k
        latent frames per GOP at 8x spatial; deco's motion part is at 16x)."""
        k = math.ceil((deco.keyframe_interval - 1) / 4)
        deco_units = deco.keyframe_channels + k * (deco.motion_channels / 4 + deco.residual_channels)
        channels = max(1, round(deco_units / (1 + k)))
        return cls(latent_channels=channels, keyframe_interval=deco.keyframe_interval,
                   encoder_channels=deco.encoder_channels, encoder_blocks=deco.encoder_blocks,
                   decoder_channels=deco.decoder_channels, decoder_blocks=deco.decoder_blocks,
                   tile_size=deco.tile_size, tile_halo=deco.tile_halo, linear_path=deco.linear_paths)

    @property
    def spatial_factor(self) -> int:
        return 8

    def pack_layout(self):
        """The packed latent's layout (DeCoLatent.pack): no motion part, cells of 8 pixels.
        (Imported here: configs import no torch.)"""
        from decovae_fast.models.latent import PackLayout
        return PackLayout(self.keyframe_interval, self.latent_channels, 0, self.latent_channels, cell=8)

    def latent_elements(self, frames: int, height: int, width: int) -> int:
        h, w = math.ceil(height / 8), math.ceil(width / 8)
        total = 0
        for start in range(0, frames, self.keyframe_interval):
            n = min(self.keyframe_interval, frames - start)
            total += self.latent_channels * (1 + math.ceil((n - 1) / 4)) * h * w
        return total

