"""The model a config trains and its initialisation: fresh or from saved weights, the posterior
log-variance of fresh encoders, a pre-trained motion estimator, and the PCA fit of the linear paths."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from decovae_fast.errors import UserError
from decovae_fast.io.outputs import write_text
from decovae_fast.training import data as D
from decovae_fast.training.checkpoint import save_tensors
from decovae_fast.training.config import TrainConfig
from decovae_fast.training.data import train_data


class MotionOnly(torch.nn.Module):
    """Stage 0 on its own: the motion estimator of a DeCoVAE config, for pre-training it before
    the rest of the model is built. save_pretrained writes motion_estimator.safetensors, which a
    later config loads with `motion_init`."""

    def __init__(self, config):
        super().__init__()
        from decovae_fast.models.motion import MotionEstimator

        self.config = config
        self.motion_estimator = MotionEstimator(config.motion_estimator_channels, config.volume_levels)

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(self.motion_estimator.state_dict(), folder / "motion_estimator.safetensors")
        write_text(folder / "config.json", self.config.to_json())


def decovae_config(cfg: TrainConfig):
    from decovae_fast.models.config import DeCoVAEConfig

    mc = getattr(DeCoVAEConfig, cfg.model_config)()
    for k, v in cfg.model_overrides.items():
        if not hasattr(mc, k):
            raise UserError(f"model override {k!r}: DeCoVAEConfig has no such field")
        setattr(mc, k, tuple(v) if isinstance(v, list) else v)
    mc.__post_init__()
    return mc


def build_model(cfg: TrainConfig, init: bool = True):
    """The model a config trains; init=False skips the data-dependent initialisation (the PCA fit
    of the linear paths), for a run whose checkpoint is about to replace the weights."""
    if cfg.model_type == "motion":
        model = MotionOnly(decovae_config(cfg))
    else:
        from decovae_fast.models import DeCoVAE, PlainCausalVAE, PlainVAEConfig, load_pretrained

        if cfg.init_from:
            model = load_pretrained(cfg.init_from)
            if (cfg.model_type == "plain") != isinstance(model, PlainCausalVAE):
                raise UserError(f"{cfg.init_from}: holds a {type(model).__name__}, "
                                f"the config trains {cfg.model_type}")
        elif cfg.model_type == "decovae":
            model = DeCoVAE(decovae_config(cfg))
        else:
            model = PlainCausalVAE(PlainVAEConfig.matching(decovae_config(cfg)))
    if cfg.init_logvar is not None and not cfg.init_from:
        init_posteriors(model, cfg.init_logvar)
    if cfg.motion_init and not cfg.init_from:
        model.motion_estimator.load_state_dict(motion_state(cfg.motion_init))
    if not cfg.init_from and init:
        init_linear_paths(model, cfg)
    return model


def motion_state(source: str) -> dict:
    """The motion estimator's weights from a stage-0 file or from a DeCoVAE weights folder."""
    from decovae_fast.models.pretrained import BUNDLED, WEIGHTS_NAME

    path = BUNDLED if source == "bundled" else Path(source)
    if path.is_dir():
        state = load_file(str(path / WEIGHTS_NAME))
        prefix = "motion_estimator."
        state = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise UserError(f"motion_init {path}: the weights hold no motion estimator")
        return state
    if not path.is_file():
        raise UserError(f"motion_init {path}: no such file (run the stage-0 config first)")
    return load_file(str(path))


LINEAR_PCA_PATCHES = 60_000


INNER_PCA_BATCHES = 48


@torch.no_grad()
def init_linear_paths(model, cfg: TrainConfig) -> None:
    """Fits the models' linear patch codes (PatchLinear) to the PCA of what each one codes, so
    training starts on the linear floor: frame patches of the training clips (synthetic video if
    `real` is empty) for the keyframe and plain codes; for DeCoVAE's motion and residual codes,
    the encoder's own targets (motion / motion_scale, warp residual) on training batches."""
    from decovae_fast.models.patch_linear import PatchLinear, patch_rows, sample_patches

    inner = [getattr(model, n, None) for n in ("motion_linear", "residual_linear")]
    inner = [] if None in inner else inner
    frame_lins = [m for m in model.modules() if isinstance(m, PatchLinear) and not any(m is x for x in inner)]
    if frame_lins:
        if cfg.real:
            videos = [D.read_clip(s.path, cfg.short_side, s.start, s.stop) for s in map(D.resolve_clip, cfg.real)]
        else:
            synth = D.SyntheticVideos(cfg.frames, max(cfg.size, 64), seed=cfg.seed)
            videos = [synth.sample(i).add(1).mul(127.5).round().to(torch.uint8).permute(1, 0, 2, 3) for i in range(8)]
        for i, lin in enumerate(frame_lins):
            lin.init_from_pca(sample_patches(videos, LINEAR_PCA_PATCHES, lin.patch, lin.frames, seed=cfg.seed + i))
    if inner:
        motion_lin, residual_lin = inner
        stream = train_data(cfg, cfg.seed + 1, cut_prob=0.0)
        m_rows, r_rows = [], []
        for _ in range(INNER_PCA_BATCHES):
            video = next(stream)
            for _, gop in model._gops([video], encode=False, keep=True):
                if not gop.targets:
                    continue
                m = torch.cat([t[0] for t in gop.targets], 2)
                r = torch.cat([t[1] for t in gop.targets], 2)
                full = m.shape[2] // 4 * 4  # the groups of 4 inner frames the encoders see
                if full == 0:
                    continue
                m = m[:, :2, :full] / model.config.motion_scale  # (frames were padded to 16 already)
                m_rows.append(patch_rows(m.float(), motion_lin.patch, 4))
                r_rows.append(patch_rows(r[:, :, :full].float(), residual_lin.patch, 4))
        if not m_rows:
            raise UserError("no groups of 4 inner frames in the training batches: frames must be >= 5")
        motion_lin.init_from_pca(torch.cat(m_rows))
        residual_lin.init_from_pca(torch.cat(r_rows))


@torch.no_grad()
def init_posteriors(model, logvar: float) -> None:
    """Sets every encoder head's log-variance half (the second half of its output channels) to
    start near `logvar`: bias = logvar, weights scaled down 10x."""
    from decovae_fast.models.encoders import Encoder

    for m in model.modules():
        if isinstance(m, Encoder):
            half = m.head.bias.shape[0] // 2
            m.head.bias[half:] = logvar
            m.head.weight[half:] *= 0.1
