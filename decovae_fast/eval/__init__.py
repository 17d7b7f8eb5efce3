"""Evaluation: per-frame metrics (PSNR, SSIM), the reconstruction report, and the stage-by-stage
diagnosis behind `decovae diagnose`."""
