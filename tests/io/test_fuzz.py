"""Fuzzing the two readers of untrusted files with hypothesis: the latent file reader
(io/latent_file.load_latent) and the video input path (io/video.VideoReader), on mutated real
files (truncations, flipped bytes, overwritten headers, huge declared sizes, garbage). Every case
must end in a clean read or a UserError (what the command line turns into exit 2 and one line),
within a time limit: never another exception, never a hang. The examples per test come from
DECOVAE_FUZZ_EXAMPLES (default 300 each, the same cases every run: under a minute in all in
`make test`; `make fuzz` runs 5000 new ones each), and a third as many through the command line
(`decovae encode` / `decode` on mutated files: exit 0 with exactly the output, or exit 2 with one
line and nothing left behind). The outcomes are counted (printed with -s)."""
from __future__ import annotations

import collections
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decovae_fast.cli.main import main
from decovae_fast.errors import UserError
from decovae_fast.io.latent_file import load_latent, save_latent
from decovae_fast.io.video import VideoReader
from decovae_fast.models.latent import DeCoLatent, DiagonalGaussian

EXAMPLES = int(os.environ.get("DECOVAE_FUZZ_EXAMPLES", "300"))
# the bounded run in `make test` replays the same cases every time; a longer run explores new ones
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# A mutation: ("truncate", n) keeps n bytes; ("flip", [(i, byte)]) xors bytes; ("header", i, data)
# overwrites bytes at i (i < 64: the container's or safetensors' header); ("huge", i) writes a
# 64-bit 2^62 at i; ("garbage", data) replaces the file.
MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("header"), st.integers(0, 63), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("huge"), st.integers(0, 200)),
    st.tuples(st.just("garbage"), st.binary(max_size=512)),
)


def mutate(data: bytes, m) -> bytes:
    b = bytearray(data)
    kind = m[0]
    if kind == "truncate":
        return bytes(b[:int(m[1] * len(b))])
    if kind == "flip":
        for pos, x in m[1]:
            i = min(int(pos * len(b)), len(b) - 1)
            b[i] ^= x
        return bytes(b)
    if kind == "header":
        i, d = m[1], m[2]
        b[i:i + len(d)] = d
        return bytes(b)
    if kind == "huge":
        i = min(m[1], len(b) - 8)
        b[i:i + 8] = struct.pack("<Q", 1 << 62)
        return bytes(b)
    return bytes(m[1])


@pytest.fixture(scope="module")
def latent_bytes(tmp_path_factory) -> bytes:
    g = torch.Generator().manual_seed(0)

    def gauss(*shape):
        return DiagonalGaussian(torch.randn(*shape, generator=g))

    lat = DeCoLatent(gauss(1, 4, 2, 4, 4), gauss(1, 2, 3, 2, 2), gauss(1, 2, 3, 4, 4), [0, 5], 9, 32, 32,
                     info={"config_hash": "0" * 16})
    path = tmp_path_factory.mktemp("fuzz") / "ok.safetensors"
    save_latent(path, lat, model_type="decovae", config_hash="0" * 16, fps=Fraction(24))
    return path.read_bytes()


@pytest.fixture(scope="module")
def video_bytes(make_clip) -> bytes:
    return make_clip(5, 32, 32).read_bytes()


def _outcome(kind: str, fn) -> None:
    try:
        with time_limit(10):
            fn()
        OUTCOMES[kind]["read"] += 1
    except UserError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        OUTCOMES[kind]["UserError"] += 1


@FUZZ
@given(m=MUTATIONS)
def test_fuzz_latent_file_reader(m, latent_bytes, tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(mutate(latent_bytes, m))
    _outcome("latent file", lambda: load_latent(path, expect_config_hash="0" * 16))


@FUZZ
@given(m=MUTATIONS)
def test_fuzz_video_reader(m, video_bytes, tmp_path):
    path = tmp_path / "f.mp4"
    path.write_bytes(mutate(video_bytes, m))

    def read():
        with VideoReader(path, size=(16, 16)) as r:
            for _ in r:
                pass
    _outcome("video", read)


# The command line end to end on mutated files: `decovae encode` of a mutated video and `decovae
# decode` of a mutated latent file written by `decovae encode` (in-process, the small weights):
# exit 0 with exactly the output, or exit 2 with one line and nothing left in the output folder.
CLI_FUZZ = settings(FUZZ, max_examples=max(20, EXAMPLES // 3))


@pytest.fixture(scope="module")
def cli_latent_bytes(video_bytes, small_weights, tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("cli-latent")
    (folder / "v.mp4").write_bytes(video_bytes)
    assert main(["encode", str(folder / "v.mp4"), "-o", str(folder / "z.safetensors"),
                 "--weights", str(small_weights), "--quiet"]) == 0
    return (folder / "z.safetensors").read_bytes()


def _cli_case(kind, command, data: bytes, suffix: str, out_name: str, weights, tmp_path, capsys) -> None:
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    (case / "in").mkdir()
    (case / "out").mkdir()
    src = case / "in" / f"f{suffix}"
    src.write_bytes(data)
    capsys.readouterr()
    with time_limit(60):
        rc = main([command, str(src), "-o", str(case / "out" / out_name), "--weights", str(weights), "--quiet"])
    err = capsys.readouterr().err.strip()
    left = sorted(p.name for p in (case / "out").iterdir())
    if rc == 0:
        assert left == [out_name], left
        OUTCOMES[kind]["exit 0"] += 1
    else:
        assert rc == 2, (rc, err)
        assert len(err.splitlines()) == 1 and err.startswith(f"decovae {command}: error:"), err
        assert left == [], left
        OUTCOMES[kind]["exit 2"] += 1


@CLI_FUZZ
@given(m=MUTATIONS)
def test_fuzz_cli_encode(m, video_bytes, small_weights, tmp_path, capsys):
    _cli_case("cli encode", "encode", mutate(video_bytes, m), ".mp4", "z.safetensors", small_weights, tmp_path,
              capsys)


@CLI_FUZZ
@given(m=MUTATIONS)
def test_fuzz_cli_decode(m, cli_latent_bytes, small_weights, tmp_path, capsys):
    _cli_case("cli decode", "decode", mutate(cli_latent_bytes, m), ".safetensors", "v.mp4", small_weights,
              tmp_path, capsys)


@pytest.mark.parametrize("target", ["latent", "video"])
def test_atheris_harness_runs_clean(target, tmp_path):
    """scripts/fuzz_atheris.py (`make fuzz-atheris`, 60 s each) for 5 s: libFuzzer finishes its
    time with no crash or hang saved."""
    pytest.importorskip("atheris")
    script = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_atheris.py"
    result = subprocess.run([sys.executable, str(script), target, "5", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = re.search(r"Done (\d+) runs", result.stderr)
    assert runs and int(runs.group(1)) > 100, result.stderr[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]


def test_zz_fuzz_outcomes_are_counted():
    """Runs last in this file: prints the outcome counts (seen with -s, and in `make fuzz`)."""
    for kind, counts in sorted(OUTCOMES.items()):
        print(f"fuzz {kind}: {sum(counts.values())} cases: {dict(counts)}")
    assert not OUTCOMES or all(sum(c.values()) > 0 for c in OUTCOMES.values())
