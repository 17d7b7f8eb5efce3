"""`decovae encode-dataset --shard-clips`: packed latents of clips into shards, split over torchrun
ranks, exactly once across a SIGKILL and a rerun; read back by LatentDataset (io/shards.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decovae_fast.io.shards import LatentDataset, LatentIterableDataset, read_header


def _videos(folder: Path, make_clip, n: int, frames=(9, 12, 16)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"v{i:02d}.mp4"
        shutil.copy(make_clip(frames[i % len(frames)], 32, 32), p)
        paths.append(p)
    return paths


def _expected(paths, clip, stride) -> set:
    """Every (video, first frame) of a whole clip (the clips are 9, 12 or 16 frames long)."""
    from decovae_fast.io.video import read_video

    out = set()
    for p in paths:
        n = len(read_video(p)[0])
        out |= {(str(p), s) for s in range(0, n - clip + 1, stride)}
    return out


def _clips_in(out: Path) -> list:
    return [tuple(s) for p in sorted(out.glob("shard-*.safetensors")) for s in read_header(p)["sources"]]


def _cmd(src, out, weights, *extra):
    return [sys.executable, "-m", "decovae_fast.cli", "encode-dataset", "--inputs", str(src), "--out", str(out),
            "--weights", str(weights), "--shard-clips", "3", "--clip-frames", "8", "--clip-stride", "4",
            "--quiet", *extra]


def test_two_torchrun_ranks_encode_every_good_clip_exactly_once(tmp_path, make_clip, small_weights, cli_env):
    src, out = tmp_path / "videos", tmp_path / "shards"
    paths = _videos(src, make_clip, 10)
    (src / "v99_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 300)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port", "29531", "--no-python", *_cmd(src, out, small_weights)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    clips = _clips_in(out)
    assert len(clips) == len(set(clips)) and set(clips) == _expected(paths, 8, 4)
    assert {p.name[:10] for p in out.glob("shard-*.safetensors")} == {"shard-r000", "shard-r001"}
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "v99_corrupt.mp4" in failed[0]["input"]
    index = json.loads((out / "index.json").read_text())
    assert index["clips"] == len(clips)
    # read back: map-style, and streamed over 2 DataLoader workers
    ds = LatentDataset(out)
    assert len(ds) == len(clips) and ds[0]["latent"].dim() == 4
    loader = torch.utils.data.DataLoader(LatentIterableDataset(out), batch_size=None, num_workers=2)
    streamed = [(item["source"], item["start"]) for item in loader]
    assert sorted(streamed) == sorted(clips)
    # as two DDP ranks would read it (rank and world given; torch.distributed's when initialised)
    per_rank = [[(i["source"], i["start"]) for i in LatentIterableDataset(out, rank=r, world_size=2)] for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(clips)


def test_sigkill_midway_and_rerun_give_the_same_shards_bit_for_bit(tmp_path, make_clip, small_weights, cli_env):
    src = tmp_path / "videos"
    _videos(src, make_clip, 8, frames=(16,))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert subprocess.run(_cmd(src, whole, small_weights, "--batch", "2"), env=cli_env, capture_output=True,
                          timeout=600).returncode == 0
    proc = subprocess.Popen(_cmd(src, resumed, small_weights, "--batch", "2"), env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(resumed.glob("shard-*.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed:
        pytest.skip("the run finished before it could be killed")
    before = len(list(resumed.glob("shard-*.safetensors")))
    assert before < len(list(whole.glob("shard-*.safetensors")))
    assert subprocess.run(_cmd(src, resumed, small_weights, "--batch", "2"), env=cli_env, capture_output=True,
                          timeout=600).returncode == 0
    names = sorted(p.name for p in whole.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in resumed.glob("shard-*.safetensors"))
    assert not list(resumed.glob(".shard-*"))  # no half-written shard left
    for name in names:
        a, b = load_file(whole / name), load_file(resumed / name)
        assert torch.equal(a["latents"], b["latents"]), name
        assert read_header(whole / name)["sources"] == read_header(resumed / name)["sources"]
