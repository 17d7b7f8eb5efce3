"""save_pretrained / from_pretrained: config.json (with "model_type") + model.safetensors, never pickle.
Every failure names the file and the problem. Which class a folder holds is models.auto's business
(load_pretrained), so this module imports no model class."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from decovae_fast.io.outputs import save_safetensors, write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLED = Path(__file__).resolve().parent.parent / "weights" / "tiny"


def save(model, directory) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(d / WEIGHTS_NAME, state, {"model_type": model.config.model_type,  # whole or not at all
                                               "config_hash": model.config.config_hash()})
    write_text(d / CONFIG_NAME, model.config.to_json() + "\n")  # last: it names what the weights are
    return d


def read_config(directory=None) -> tuple[Path, dict]:
    d = BUNDLED if directory is None else Path(directory)
    if not d.is_dir():
        what = "bundled weights folder" if directory is None else "weights folder"
        raise FileNotFoundError(f"{what} {d} does not exist")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON config ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"{path}: config has no \"model_type\"")
    return d, cfg


def load_into(cls, directory=None):
    """Build cls from directory's config.json and load its model.safetensors, checking everything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d, raw = read_config(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if raw["model_type"] != cls.config_class.model_type:
        raise ValueError(f"{cfg_path}: model_type is {raw['model_type']!r} but {cls.__name__} needs "
                         f"{cls.config_class.model_type!r}")
    try:
        config = cls.config_class.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid {cls.config_class.__name__}: {e}") from None
    if not w_path.is_file():
        raise FileNotFoundError(f"{w_path}: weights file not found")
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{w_path}: corrupt or unreadable safetensors file ({e})") from None
    model = cls(config)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"{w_path}: weights do not match {cls.__name__}({cfg_path.name}): "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{w_path}: tensor shapes do not match the config: {'; '.join(bad[:5])}")
    with torch.no_grad():
        for k, v in want.items():
            v.copy_(state[k])
    return model
