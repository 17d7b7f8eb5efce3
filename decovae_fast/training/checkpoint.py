"""Checkpoints without pickle: weights, EMA weights and the optimizer's moment tensors go to
safetensors files, step counters and loss history to state.json, each written atomically
(io.outputs) and state.json last, so an interrupted save leaves the previous checkpoint intact.
Also the EMA itself and export_weights (the bundled fp16 copy of trained weights)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from decovae_fast.io.outputs import atomic_output, write_text


class EMA:
    """Exponential moving average of every floating tensor of the model's state."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget the init
        state = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach() for k in keys], 1 - d)

    def copy_to(self, model) -> None:
        model.load_state_dict(self.shadow, strict=False)


def save_tensors(tensors: dict, path: Path, metadata=None) -> None:
    """A safetensors file of `tensors` (on the CPU), written atomically."""
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict) -> tuple[dict, dict]:
    """Adam(W) state as named tensors + JSON scalars (keyed by parameter name, not position)."""
    tensors, scalars = {}, {}
    for p, st in opt.state.items():
        n = names[p]
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{n}/{k}"] = v
            else:
                scalars[f"{n}/{k}"] = float(v)
    return tensors, scalars


def load_optimizer_tensors(opt, names: dict, tensors: dict, scalars: dict) -> None:
    by_name = {n: p for p, n in names.items()}
    for key, v in tensors.items():
        n, k = key.rsplit("/", 1)
        if n in by_name:
            opt.state[by_name[n]][k] = v.to(by_name[n].device, copy=True)
    for key, v in scalars.items():
        n, k = key.rsplit("/", 1)
        if n in by_name:
            opt.state[by_name[n]][k] = torch.tensor(v)


def save_checkpoint(ckpt: Path, model, ema: EMA, opt, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    names = {p: n for n, p in model.named_parameters()}
    otensors, oscalars = optimizer_tensors(opt, names)
    save_tensors(model.state_dict(), ckpt / "model.safetensors")
    save_tensors(ema.shadow, ckpt / "ema.safetensors")
    save_tensors(otensors or {"_empty": torch.zeros(0)}, ckpt / "optimizer.safetensors")
    # state.json last: it names the step the three tensor files belong to
    write_text(ckpt / "state.json", json.dumps({**state, "optimizer_scalars": oscalars}, indent=1))


def export_weights(src, dst, run_dir=None, dtype: str = "float16", machine: str | None = None) -> Path:
    """Copies save_pretrained weights from `src` to `dst` with the tensors stored as `dtype` (fp16
    halves the bundled file; from_pretrained casts back to the model's fp32), plus
    training_state.json: steps, hours and machine of the run in `run_dir` (its checkpoint)."""
    import platform
    import shutil

    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cast = getattr(torch, dtype)
    tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
    save_tensors(tensors, dst / "model.safetensors", metadata=meta)
    os.chmod(dst / "model.safetensors", 0o644)  # package data: readable by every user
    shutil.copyfile(src / "config.json", dst / "config.json")
    if run_dir is not None:
        state = json.loads((Path(run_dir) / "checkpoint" / "state.json").read_text())
        stages = {}
        for h in state["history"]:
            stages[h["stage"]] = stages.get(h["stage"], 0) + 1
        info = {"steps": state["step"], "steps_per_stage": stages, "hours": round(state["seconds"] / 3600, 3),
                "machine": machine or f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores (shared), torch {torch.__version__}",
                "stored_dtype": dtype, "source": str(src),
                "last_validation": state["val"][-1] if state["val"] else None,
                # the PSNR-against-steps curve of the run (held-out clips, EMA weights)
                "validation": [{"step": v["step"], "psnr": v["psnr"], "ssim": v["ssim"],
                                "clips": {c: r["psnr"] for c, r in v["clips"].items() if c != "mean"}}
                               for v in state["val"]]}
        write_text(dst / "training_state.json", json.dumps(info, indent=1) + "\n")
    return dst
