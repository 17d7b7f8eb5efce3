"""The benchmark behind `decovae bench`: harness (rows, timing, ceilings, validation), op cases,
pipeline and streaming rows, training-step rows, the suite that runs them, and the table."""
