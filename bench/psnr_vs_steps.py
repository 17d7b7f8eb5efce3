"""PSNR against training steps of the bundled DeCoVAE and its plain ablation, from the validation
history that `export_weights` stores in each training_state.json (held-out clips, 33x256x256, EMA
weights). Writes bench/results/psnr_vs_steps.png and prints the README's table.

    .venv/bin/python bench/psnr_vs_steps.py
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"DeCoVAE tiny": ROOT / "decovae_fast" / "weights" / "tiny" / "training_state.json",
        "plain ablation": ROOT / "bench" / "ablation" / "plain_tiny" / "training_state.json"}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: json.loads(path.read_text()).get("validation") or [] for name, path in RUNS.items()}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, vals in curves.items():
        ax.plot([v["step"] for v in vals], [v["psnr"] for v in vals], marker="o", label=name)
    ax.axhline(30, color="grey", ls="--", lw=1, label="target 30 dB")
    ax.set_xlabel("optimizer steps (batch 2 x 17 frames, 64x64 crops)")
    ax.set_ylabel("held-out PSNR, dB (33x256x256)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = ROOT / "bench" / "results" / "psnr_vs_steps.png"
    fig.savefig(out, dpi=110)
    steps = sorted({v["step"] for vals in curves.values() for v in vals})
    print("| steps | " + " | ".join(curves) + " | difference |")
    print("|---:|" + "---:|" * (len(curves) + 1))
    for s in steps:
        cells = [next((v["psnr"] for v in vals if v["step"] == s), None) for vals in curves.values()]
        diff = f"{cells[0] - cells[1]:+.2f}" if None not in cells else ""
        print(f"| {s} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + f" | {diff} |")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
