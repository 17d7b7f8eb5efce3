"""The reconstruction report: a JSON file (the fields DESIGN.md lists) and a PNG next to it with the
per-frame PSNR and, for one frame, the keyframe, the flow (colour wheel), the scale field, the
residual, the reconstruction and the original side by side.

PSNR and SSIM come from decovae_fast.eval.metrics (uint8 frames, data range 255): `psnr` is the mean of
the per-frame PSNRs (each capped at metrics.MAX_PSNR dB), `ssim` the mean of the per-frame SSIMs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from decovae_fast.io.outputs import atomic_output


def build(*, psnr_per_frame, ssim_per_frame, height, width, fps, latent_elements, keyframes,
          encode_seconds, decode_seconds, backend, op_backends, model_type, config_hash, device,
          dtype, chunk_frames) -> dict:
    frames = len(psnr_per_frame)
    input_elements = 3 * frames * height * width
    return {
        "psnr": float(np.mean(psnr_per_frame)),
        "ssim": float(np.mean(ssim_per_frame)),
        "psnr_per_frame": [float(v) for v in psnr_per_frame],
        "ssim_per_frame": [float(v) for v in ssim_per_frame],
        "frames": frames,
        "size": [height, width],
        "fps": float(fps),
        "latent_elements": int(latent_elements),
        "input_elements": int(input_elements),
        "compression_ratio": input_elements / latent_elements,
        "keyframes": [int(k) for k in keyframes],
        "encode_fps": frames / encode_seconds if encode_seconds > 0 else None,
        "decode_fps": frames / decode_seconds if decode_seconds > 0 else None,
        "backend": backend,
        "op_backends": op_backends,
        "model_type": model_type,
        "config_hash": config_hash,
        "device": device,
        "dtype": dtype,
        "chunk_frames": chunk_frames,
    }


def figure_path(report_path) -> Path:
    return Path(report_path).with_suffix(".png")


def write(report_path, report: dict, panels: dict | None) -> Path:
    """Writes the JSON and the PNG (figure_path) atomically; returns the PNG's path."""
    png = figure_path(report_path)
    with atomic_output(png) as tmp:
        plot(tmp, report, panels)
    with atomic_output(report_path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    return png


def flow_to_rgb(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Flow (pixels) as an image on the usual colour wheel: hue = direction, saturation = speed
    relative to the largest in the frame; white is no motion."""
    from matplotlib.colors import hsv_to_rgb

    mag = np.hypot(u, v)
    hue = (np.arctan2(-v, -u) / np.pi + 1) / 2  # 0..1 around the wheel
    sat = mag / max(float(mag.max()), 1e-6)
    return hsv_to_rgb(np.stack([hue, sat, np.ones_like(hue)], axis=-1))


def _image(chw: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return np.clip((np.moveaxis(chw, 0, -1) + 1) / 2, 0, 1)


def plot(path, report: dict, panels: dict | None) -> None:
    """panels: {"frame": index, "keyframe_index", "keyframe", "original", "reconstruction",
    "residual" (3,H,W in [-1,1] units), "motion" (3,H,W: u, v, s)}; keys may be missing (the plain
    model has no motion or residual); None draws the PSNR curve only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels or {}
    images = []
    if "keyframe" in panels:
        images.append((f"keyframe (frame {panels['keyframe_index']})", _image(panels["keyframe"]), None))
    if "motion" in panels:
        u, v, s = panels["motion"]
        speed = float(np.hypot(u, v).max())
        images.append((f"flow (max {speed:.1f} px)", flow_to_rgb(u, v), None))
        images.append(("scale field s", s, "viridis"))
    if "residual" in panels:
        r = panels["residual"]
        gain = 1.0 / max(float(np.abs(r).max()), 1e-6)
        images.append((f"residual (x{gain:.1f})", _image(r * gain), None))
    if "reconstruction" in panels:
        images.append((f"reconstruction (frame {panels['frame']})", _image(panels["reconstruction"]), None))
    if "original" in panels:
        images.append((f"original (frame {panels['frame']})", _image(panels["original"]), None))

    cols = max(len(images), 1)
    fig = plt.figure(figsize=(max(3.0 * cols, 8.0), 6.5 if images else 3.5), dpi=100)
    grid = fig.add_gridspec(2 if images else 1, cols, height_ratios=[1, 1.3] if images else [1])
    ax = fig.add_subplot(grid[0, :])
    frames = np.arange(report["frames"])
    ax.plot(frames, report["psnr_per_frame"], marker=".", label="PSNR")
    for i, k in enumerate(report["keyframes"]):
        ax.axvline(k, color="tab:red", alpha=0.4, linestyle="--", label="keyframe" if i == 0 else None)
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{report['model_type']}: mean PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.3f}, "
                 f"compression {report['compression_ratio']:.1f}x")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    for i, (title, img, cmap) in enumerate(images):
        a = fig.add_subplot(grid[1, i])
        shown = a.imshow(img, cmap=cmap, interpolation="nearest")
        if cmap is not None:
            fig.colorbar(shown, ax=a, fraction=0.046)
        a.set_title(title, fontsize=9)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
