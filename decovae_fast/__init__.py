"""decovae_fast: a fast DeCo-VAE (keyframe + motion + residual video VAE)."""
__version__ = "0.1.0"

from decovae_fast import ops  # noqa: E402,F401
from decovae_fast.models import DeCoVAE, DeCoVAEConfig, PlainCausalVAE, PlainVAEConfig  # noqa: E402,F401
