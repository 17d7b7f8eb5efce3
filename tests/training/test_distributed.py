"""Training under torchrun: 2 CPU ranks (gloo) average their gradients like one process over both
ranks' batches, and a short run keeps the ranks' weights identical with rank 0 alone writing."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from decovae_fast.training import data as D
from decovae_fast.models import DeCoVAE, DeCoVAEConfig
from decovae_fast.training.config import config_from_dict
from decovae_fast.training.loop import loss_runner, train
from decovae_fast.training.losses import autoencoder_losses
from decovae_fast.training.runtime import distributed

MICRO = dict(keyframe_interval=5, motion_estimator_channels=[4, 8, 8], encoder_channels=[8, 8, 8],
             encoder_blocks=[1, 1, 1], motion_encoder_channels=[8, 8, 8], decoder_channels=[16, 8, 8],
             decoder_blocks=[1, 1, 1])


def micro_model():
    torch.manual_seed(0)
    return DeCoVAE(DeCoVAEConfig.from_dict({**DeCoVAEConfig.tiny().to_dict(), **MICRO}))


def batch(rank):
    return D.SyntheticVideos(5, 32, seed=5, cut_prob=0.0).sample(rank)[None]


def cfg_for(out_dir):
    return config_from_dict({
        "model": {"type": "decovae", "config": "tiny", "overrides": MICRO},
        "data": {"frames": 5, "size": 32, "batch_size": 1, "synthetic_prob": 1.0},
        "train": {"out_dir": str(out_dir), "amp": "none", "device": "cpu", "threads": 1, "ema_decay": 0.9,
                  "ckpt_every": 1000, "val_every": 1000, "log_every": 1, "seed": 0},
        "stage": [{"name": "joint", "steps": 2, "lr": 1e-3, "train": ["all"]}]})


def _rank(rank, world, port, out_dir, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r, w = distributed()
    assert (r, w) == (rank, world)
    cfg = cfg_for(out_dir)
    model = micro_model()
    runner = loss_runner(model, autoencoder_losses, cfg, torch.device("cpu"), w)
    torch.manual_seed(100 + rank)  # the posterior noise of this rank's batch
    runner(batch(rank))["loss"].backward()
    results[f"grads{rank}"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trained = micro_model()
    state = train(cfg, resume=False, quiet=True, model=trained)
    results[f"params{rank}"] = {n: p.detach().clone() for n, p in trained.named_parameters()}
    results[f"steps{rank}"] = state["step"]
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_match_one_process(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path), results), nprocs=2, join=True)
    # one process: the mean of the two ranks' losses, same batches, same noise
    model = micro_model()
    cfg = cfg_for(tmp_path / "single")
    total = 0
    for rank in range(2):
        torch.manual_seed(100 + rank)
        total = total + autoencoder_losses(model, batch(rank), cfg)["loss"] / 2
    total.backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    g0, g1 = results["grads0"], results["grads1"]
    assert set(g0) == set(single) and len(single) > 10
    for n, g in single.items():
        assert torch.allclose(g0[n], g, rtol=1e-4, atol=1e-6), n
        assert torch.equal(g0[n], g1[n]), n  # every rank holds the same averaged gradient
    assert results["steps0"] == results["steps1"] == 2
    for n, t in results["params0"].items():  # the short run: weights identical on both ranks
        assert torch.equal(t, results["params1"][n]), n
    assert (tmp_path / "checkpoint" / "state.json").is_file() and (tmp_path / "final_ema").is_dir()
