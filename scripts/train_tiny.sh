#!/usr/bin/env bash
# Rebuilds the bundled `tiny` weights (decovae_fast/weights/tiny/) and the ablation baseline
# (bench/ablation/plain_tiny/) with the second recipe (linear paths, DIS motion; configs
# tiny.toml and plain_tiny.toml: same data, steps and seed), then diagnoses both on the held-out
# clips at 33 frames, 256x256. Every run resumes from its full checkpoint under
# ~/.cache/decovae_train/ when interrupted; FRESH=--fresh starts over. The two runs are
# independent: run them at the same time on two cores (as the bundled weights were trained).
# tiny_v1.toml / plain_tiny_v1.toml / tiny_motion.toml: the first recipe, kept for the record.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FRESH=${FRESH:-}
C=decovae_fast/configs
OUT=~/.cache/decovae_train

$PY -m decovae_fast.cli train --config $C/tiny.toml $FRESH &
$PY -m decovae_fast.cli train --config $C/plain_tiny.toml $FRESH &
wait

# Bundle the final EMA weights of both (equal steps), stored as fp16.
$PY -c "from decovae_fast.training.checkpoint import export_weights as e
e('$OUT/tiny/final_ema', 'decovae_fast/weights/tiny', '$OUT/tiny')
e('$OUT/plain_tiny/final_ema', 'bench/ablation/plain_tiny', '$OUT/plain_tiny')"

# The README's tables: every stage of the pipeline on the held-out clips, fp32, beside the floors.
$PY -m decovae_fast.cli diagnose --json bench/results/diagnose_tiny.json
$PY -m decovae_fast.cli diagnose --weights bench/ablation/plain_tiny --no-floors \
    --json bench/results/diagnose_plain_tiny.json
