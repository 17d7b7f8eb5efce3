"""The loop's validation: reconstruction PSNR/SSIM per clip plus their mean, the motion stage's warp
against copying the keyframe, and the module's training flag left as it was."""
from __future__ import annotations

import dataclasses

import torch

from decovae_fast.models.decovae import DeCoVAE, DeCoVAEConfig
from decovae_fast.training.loop import evaluate, evaluate_motion


def _model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(DeCoVAEConfig.tiny(), motion_source="learned")
    return DeCoVAE(cfg)


def _clips():
    g = torch.Generator().manual_seed(1)
    return [("a", torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1),
            ("b", torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1)]


def test_evaluate_reports_each_clip_and_the_mean_and_restores_train_mode():
    model = _model().train()
    res = evaluate(model, _clips())
    assert set(res) == {"a", "b", "mean"} and model.training
    assert abs(res["mean"]["psnr"] - (res["a"]["psnr"] + res["b"]["psnr"]) / 2) < 1e-9
    model.eval()
    evaluate(model, _clips())
    assert not model.training
    assert evaluate(model, []) == {}


def test_evaluate_motion_beside_the_keyframe_copy():
    model = _model().train()
    res = evaluate_motion(model, _clips(), gop=5)
    assert set(res) == {"a", "b", "mean"} and set(res["mean"]) == {"psnr", "copy_psnr", "ssim"}
    assert model.motion_estimator.training
    for r in res.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in r.values())
