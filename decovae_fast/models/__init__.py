"""Models: DeCoVAE (keyframe + motion + residual), its motion estimator, and the plain baseline."""
from decovae_fast.models.config import DeCoVAEConfig, PlainVAEConfig
from decovae_fast.models.decovae import DeCoVAE
from decovae_fast.models.latent import DeCoLatent, DiagonalGaussian, PackLayout
from decovae_fast.models.layers import StreamCache
from decovae_fast.models.motion import MotionEstimator
from decovae_fast.models.plain import PlainCausalVAE
from decovae_fast.models.auto import load_pretrained

__all__ = ["DeCoVAE", "DeCoVAEConfig", "PlainCausalVAE", "PlainVAEConfig", "DeCoLatent", "DiagonalGaussian", "PackLayout",
           "MotionEstimator", "StreamCache", "load_pretrained"]
