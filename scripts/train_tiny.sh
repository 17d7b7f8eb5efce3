#!/usr/bin/env bash
# Rebuilds the bundled `tiny` weights (decovae_fast/weights/tiny/) and the ablation baseline
# (bench/ablation/plain_tiny/), then evaluates both on the held-out clips at 33 frames, 256x256.
# Every run resumes from its checkpoint under /tmp/decovae_train/ if interrupted; pass --fresh
# through FRESH=--fresh to start over. On this 2-core CPU the whole script took about 1.5 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FRESH=${FRESH:-}
C=decovae_fast/configs
OUT=/tmp/decovae_train

# Stage 0: the motion estimator alone (DIS-flow distillation + photometric loss), then frozen.
$PY -m decovae_fast.cli train --config $C/tiny_motion.toml $FRESH
# Stages 1-4 of DeCoVAE on top of it, and the plain baseline with the same data, steps and seed
# (the two are independent: they may run at the same time, as they did for the bundled weights).
$PY -m decovae_fast.cli train --config $C/tiny.toml $FRESH
$PY -m decovae_fast.cli train --config $C/plain_tiny.toml $FRESH

# Bundle the final EMA weights of both (equal steps), stored as fp16.
$PY -c "from decovae_fast.train import export_weights as e
e('$OUT/tiny/final_ema', 'decovae_fast/weights/tiny', '$OUT/tiny')
e('$OUT/plain_tiny/final_ema', 'bench/ablation/plain_tiny', '$OUT/plain_tiny')"

# The README's figures: held-out clips, 33 frames, 256x256, fp32.
$PY -m decovae_fast.cli train --config $C/tiny.toml --evaluate decovae_fast/weights/tiny \
    --json $OUT/eval_tiny.json
$PY -m decovae_fast.cli train --config $C/plain_tiny.toml --evaluate bench/ablation/plain_tiny \
    --json $OUT/eval_plain_tiny.json
