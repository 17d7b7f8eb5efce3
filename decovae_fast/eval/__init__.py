"""Evaluation beyond the per-frame metrics: the stage-by-stage diagnosis (`decovae diagnose`)."""
