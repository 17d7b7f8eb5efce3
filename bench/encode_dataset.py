"""Dataset encoding throughput (`decovae encode-dataset --shard-clips`, the bundled model): clips/s
with 1 rank of 2 threads and with 2 torchrun ranks of 1 thread each, on 12 generated videos of 34
frames at 128x128 (one 34-frame clip each), and the share of the work spent decoding video.

    python bench/encode_dataset.py
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_clip  # noqa: E402  (the tests' clip writer: a moving pattern, H.264)


def videos(folder: Path, n=12, frames=34, size=128) -> None:
    folder.mkdir(parents=True)
    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[:size, :size]
    for i in range(n):
        r = 127 + 100 * np.sin(0.1 * (x + 2 * t + 7 * i))
        g = 127 + 100 * np.cos(0.08 * (y - t + 3 * i))
        b = 127 + 80 * np.sin(0.05 * (x + y) + 0.2 * t)
        frames_ = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
        write_clip(folder / f"v{i:02d}.mp4", frames_, Fraction(24))


def run(cmd, env):
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(res.stderr[-2000:])
    shares = [int(m) for m in re.findall(r"decoding video (\d+)%", res.stdout + res.stderr)]
    return time.perf_counter() - start, shares


if __name__ == "__main__":
    work = Path(tempfile.mkdtemp())
    try:
        videos(work / "videos")
        args = ["encode-dataset", "--inputs", str(work / "videos"), "--shard-clips", "4", "--clip-frames", "34"]
        py = [sys.executable, "-m", "decovae_fast.cli"]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        for name, cmd, threads in [
            ("1 rank, 2 threads", py + args + ["--out", str(work / "a")], "2"),
            ("2 ranks, 1 thread each", [torchrun, "--nproc_per_node=2", "--no-python"] + py + args
             + ["--out", str(work / "b")], "1"),
        ]:
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            seconds, shares = run(cmd, env)
            print(f"| {name} | {12 / seconds:.2f} clips/s ({seconds:.1f} s for 12 clips of 34x128x128) | "
                  f"decoding video {', '.join(f'{s}%' for s in shares)} of each rank's work |")
    finally:
        shutil.rmtree(work)
