"""load_pretrained: the model class a weights folder holds, chosen by its config.json's
"model_type". The registry lives here, above decovae.py and plain.py, so that base.py (which
save/load through pretrained.py) never imports the classes built on it."""
from __future__ import annotations

from decovae_fast.models.decovae import DeCoVAE
from decovae_fast.models.plain import PlainCausalVAE
from decovae_fast.models.pretrained import CONFIG_NAME, read_config

MODEL_TYPES = {"decovae": DeCoVAE, "plain": PlainCausalVAE}  # config.json "model_type" -> class


def load_pretrained(directory=None):
    """Load whichever model config.json names ("decovae" or "plain"); None: the bundled weights."""
    d, raw = read_config(directory)
    if raw["model_type"] not in MODEL_TYPES:
        raise ValueError(f"{d / CONFIG_NAME}: unknown model_type {raw['model_type']!r}")
    return MODEL_TYPES[raw["model_type"]].from_pretrained(d)
