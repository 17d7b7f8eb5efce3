"""The `decovae` command run for real (subprocess) on generated and real clips, with small random
models passed by --weights: outputs, reports, latent files, bad input, and encode-dataset."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from decovae_fast.eval import metrics
from decovae_fast.io.video import read_video

REPORT_FIELDS = ("psnr", "ssim", "psnr_per_frame", "ssim_per_frame", "frames", "size", "latent_elements",
                 "input_elements", "compression_ratio", "keyframes", "encode_fps", "decode_fps", "backend")


def decovae(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    from conftest import subprocess_env

    cmd = [sys.executable, "-m", "decovae_fast.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout)


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".partial-" in p.name)


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory, clip, small_weights):
    """reconstruct of the generated clip with a report (shared by the tests that inspect it)."""
    folder = tmp_path_factory.mktemp("reconstruct")
    out, rep = folder / "out.mp4", folder / "report.json"
    result = decovae("reconstruct", clip, "-o", out, "--report", rep, "--weights", small_weights)
    assert_ok(result)
    return out, rep, result


def test_reconstruct_generated_clip(reconstructed, clip, small_weights):
    from decovae_fast.models import load_pretrained

    out, rep, result = reconstructed
    assert str(out) in result.stdout  # the summary line
    frames, fps = read_video(out)
    assert frames.shape == (11, 48, 64, 3) and fps == 24

    report = json.loads(rep.read_text())
    for key in REPORT_FIELDS:
        assert key in report, key
    assert report["frames"] == 11 and report["size"] == [48, 64]
    assert len(report["psnr_per_frame"]) == len(report["ssim_per_frame"]) == 11
    assert report["psnr"] == pytest.approx(np.mean(report["psnr_per_frame"]))
    assert report["ssim"] == pytest.approx(np.mean(report["ssim_per_frame"]))
    assert report["keyframes"] == [0, 8]  # the small model's keyframe interval is 8, cuts are off
    assert report["input_elements"] == 3 * 11 * 48 * 64
    model = load_pretrained(small_weights)
    assert report["latent_elements"] == model.config.latent_elements(11, 48, 64)
    assert report["compression_ratio"] == pytest.approx(report["input_elements"] / report["latent_elements"])
    assert report["encode_fps"] > 0 and report["decode_fps"] > 0
    assert report["backend"] and set(report["op_backends"]) >= {"warp_residual", "warp_add"}

    # the report's PSNR is that of the frames handed to the encoder of OUT: recomputed from the
    # two files it differs only by OUT's near-lossless H.264 (CRF 10, 4:4:4) coding error
    original, _ = read_video(clip)
    psnr_files, ssim_files = metrics.frame_metrics(original, frames)
    np.testing.assert_allclose(psnr_files, report["psnr_per_frame"], atol=0.3)
    np.testing.assert_allclose(ssim_files, report["ssim_per_frame"], atol=0.03)

    png = rep.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert leftovers(out.parent) == []


def test_encode_then_decode_equals_reconstruct(reconstructed, clip, small_weights, tmp_path):
    out, _, _ = reconstructed
    lat, dec = tmp_path / "clip.safetensors", tmp_path / "dec.mp4"
    assert_ok(decovae("encode", clip, "-o", lat, "--weights", small_weights, "--quiet"))
    assert_ok(decovae("decode", lat, "-o", dec, "--weights", small_weights, "--quiet"))
    a, fps_a = read_video(out)
    b, fps_b = read_video(dec)
    assert fps_a == fps_b == 24
    np.testing.assert_array_equal(a, b)


def test_reconstruct_real_clip_resized_and_chunked(real_clip, small_weights, tmp_path):
    out, rep = tmp_path / "car.mp4", tmp_path / "car.json"
    assert_ok(decovae("reconstruct", real_clip, "-o", out, "--report", rep, "--size", "40x56", "--frames", "9",
                      "--chunk-frames", "3", "--weights", small_weights, "--quiet"))
    frames, fps = read_video(out)
    assert frames.shape == (9, 40, 56, 3)
    assert fps == Fraction(30000, 1001)
    report = json.loads(rep.read_text())
    assert report["frames"] == 9 and report["size"] == [40, 56] and report["keyframes"] == [0, 8]
    assert report["chunk_frames"] == 3
    original, _ = read_video(real_clip, size=(40, 56), max_frames=9)
    psnr_files, _ = metrics.frame_metrics(original, frames)
    assert np.mean(psnr_files) == pytest.approx(report["psnr"], abs=0.3)


class IdentityVAE:
    """A stand-in model whose latent is the frames themselves, coded in GOPs of `interval` frames and
    released a GOP late like the real one: a reconstruction is exact, so any misalignment between
    the frames read, the frames written and the per-frame metrics shows up as a PSNR drop."""

    def __init__(self, interval):
        self.config = SimpleNamespace(keyframe_interval=interval, model_type="identity")

    def config_hash(self):
        return "identity"

    def _piece(self, x):
        return SimpleNamespace(frames=x.shape[2], gop_starts=[0], video=x, numel=lambda: x[0].numel())

    def encode_stream(self, chunks, on_gop=None):
        buf = None
        for chunk in chunks:
            buf = chunk if buf is None else torch.cat([buf, chunk], 2)
            while buf.shape[2] > self.config.keyframe_interval:
                yield self._piece(buf[:, :, :self.config.keyframe_interval])
                buf = buf[:, :, self.config.keyframe_interval:]
        yield self._piece(buf)

    def decode_stream(self, pieces, chunk_frames=None):
        for piece in pieces:
            yield from piece.video.split(chunk_frames or piece.frames, dim=2)


@pytest.mark.parametrize("chunk", [None, 2, 5])
def test_reconstruct_pipeline_alignment(tmp_path, make_clip, monkeypatch, capsys, chunk):
    from decovae_fast.cli import codec as commands
    from decovae_fast.cli.main import main

    monkeypatch.setattr(commands, "load_model", lambda *a: IdentityVAE(interval=4))
    src = make_clip(11, 32, 48)
    out, rep = tmp_path / "id.mp4", tmp_path / "id.json"
    args = ["reconstruct", src, "-o", out, "--report", rep, "--crf", "0", "--quiet"]
    args += ["--chunk-frames", chunk] if chunk else []
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    assert report["psnr_per_frame"] == [metrics.MAX_PSNR] * 11  # every frame compared with itself
    assert report["keyframes"] == [0, 4, 8] and report["frames"] == 11
    assert report["latent_elements"] == report["input_elements"]
    written, _ = read_video(out)
    original, _ = read_video(src)
    assert np.abs(written.astype(int) - original).max() <= 6  # lossless 4:4:4 up to RGB<->YUV rounding


def test_plain_model_weights(real_clip, plain_weights, tmp_path):
    """--weights loads either model type (config.json says which)."""
    out, rep = tmp_path / "plain.mp4", tmp_path / "plain.json"
    assert_ok(decovae("reconstruct", real_clip, "-o", out, "--report", rep, "--size", "32x32", "--frames", "5",
                      "--weights", plain_weights, "--quiet"))
    assert read_video(out)[0].shape == (5, 32, 32, 3)
    report = json.loads(rep.read_text())
    assert report["model_type"] == "plain" and report["frames"] == 5
    assert rep.with_suffix(".png").is_file()


# --- bad input: exit 2, one line naming the file, no output left -----------------------------------
# Most cases call the command's entry point in process (the same code, without a new interpreter
# per case, which costs seconds here); test_bad_input_subprocess checks real processes.
def main_in_process(capsys, *args) -> tuple[int, str]:
    from decovae_fast.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_bad(code, err, named, why=None):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert named in lines[0], err
    if why:
        assert why in lines[0], err


def _bad_inputs(tmp: Path, make_clip):
    from conftest import make_truncated_video, make_zero_frame_video

    text = tmp / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    good = make_clip(5, 32, 32)
    return {
        "missing": (tmp / "missing.mp4", [], "no such file"),
        "directory": (tmp, [], "is a directory"),
        "not_a_video": (text, [], "not a readable video"),
        "zero_frames": (make_zero_frame_video(tmp / "zero.mp4"), [], None),
        "truncated": (make_truncated_video(make_clip, tmp / "cut.mp4"), [], "truncated"),
        "bad_size": (good, ["--size", "0x32"], "--size"),
        "bad_frames": (good, ["--frames", "0"], "--frames"),
        "bad_chunk": (good, ["--chunk-frames", "0"], "--chunk-frames"),
    }


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
def test_bad_input_video(command, tmp_path, make_clip, small_weights, capsys):
    for case, (path, extra, why) in _bad_inputs(tmp_path, make_clip).items():
        outdir = tmp_path / f"out_{case}"
        outdir.mkdir()
        out = outdir / ("o.mp4" if command == "reconstruct" else "o.safetensors")
        args = [command, path, "-o", out, "--weights", small_weights, *extra]
        if command == "reconstruct":
            args += ["--report", outdir / "r.json"]
        code, err = main_in_process(capsys, *args)
        named = extra[0] if extra else str(path)
        assert_bad(code, err, named, why)
        assert list(outdir.iterdir()) == [], case


def test_bad_input_subprocess(tmp_path, make_clip, small_weights):
    """As a real process: exit status 2 and one line on stderr (no traceback), nothing written."""
    from conftest import make_truncated_video

    for path in (tmp_path / "missing.mp4", make_truncated_video(make_clip, tmp_path / "cut.mp4")):
        out = tmp_path / "out.mp4"
        result = decovae("reconstruct", path, "-o", out, "--weights", small_weights)
        assert_bad(result.returncode, result.stderr, str(path))
        assert not out.exists() and leftovers(tmp_path) == []


def test_bad_outputs(tmp_path, clip, small_weights, capsys):
    cases = {
        tmp_path / "no_such_folder" / "o.mp4": "does not exist",
        tmp_path: "is a directory",
        tmp_path / "o.notavideo": "cannot create a video file",
    }
    for out, why in cases.items():
        code, err = main_in_process(capsys, "reconstruct", clip, "-o", out, "--weights", small_weights)
        assert_bad(code, err, str(out), why)
    code, err = main_in_process(capsys, "reconstruct", clip, "-o", tmp_path / "o.mp4", "--report",
                                tmp_path / "nowhere" / "r.json", "--weights", small_weights)
    assert_bad(code, err, str(tmp_path / "nowhere" / "r.json"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_latent_files(tmp_path, clip, small_weights, other_weights, capsys):
    lat = tmp_path / "lat.safetensors"
    code, err = main_in_process(capsys, "encode", clip, "-o", lat, "--frames", "5", "--size", "32x32",
                                "--weights", small_weights, "--quiet")
    assert code == 0, err
    data = lat.read_bytes()
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(data.replace(b'"frames":"5"', b'"frames":"4"'))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    cases = [(tampered, small_weights, "checksum"), (truncated, small_weights, "not a readable latent file"),
             (lat, other_weights, "config hash"), (clip, small_weights, "not a readable latent file"),
             (tmp_path / "missing.safetensors", small_weights, "no such file"),
             (tmp_path, small_weights, "is a directory")]
    out = tmp_path / "dec.mp4"
    for path, weights, why in cases:
        code, err = main_in_process(capsys, "decode", path, "-o", out, "--weights", weights)
        assert_bad(code, err, str(path), why)
        assert not out.exists() and leftovers(tmp_path) == []
    # and once as a real process
    result = decovae("decode", tampered, "-o", out, "--weights", small_weights)
    assert_bad(result.returncode, result.stderr, str(tampered), "checksum")
    assert not out.exists()


def test_missing_weights(tmp_path, clip, capsys):
    from decovae_fast.models.pretrained import BUNDLED

    missing = tmp_path / "no_weights"
    code, err = main_in_process(capsys, "reconstruct", clip, "-o", tmp_path / "o.mp4", "--weights", missing)
    assert_bad(code, err, str(missing))
    if (BUNDLED / "model.safetensors").is_file():
        return  # the bundled weights exist: the default works (covered where they are trained)
    code, err = main_in_process(capsys, "reconstruct", clip, "-o", tmp_path / "o.mp4")
    assert_bad(code, err, str(BUNDLED), "--weights")
    assert not (tmp_path / "o.mp4").exists()


# --- encode-dataset ----------------------------------------------------------------------------------
def test_encode_dataset_two_ranks_resume_and_manifest(tmp_path, make_clip, small_weights, cli_env):
    src, out = tmp_path / "videos", tmp_path / "latents"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.mp4", "b.mp4", "sub/c.mp4"]):
        shutil.copy(make_clip(3 + i, 32, 32), src / name)
    (src / "sub" / "broken.mp4").write_bytes(b"\x00\x01garbage" * 40)
    inputs = sorted((src / n) for n in ["a.mp4", "b.mp4", "sub/broken.mp4", "sub/c.mp4"])

    cmd = [sys.executable, "-m", "decovae_fast.cli", "encode-dataset", "--inputs", str(src), "--out", str(out),
           "--weights", str(small_weights), "--quiet"]
    procs = [subprocess.Popen(cmd, env=dict(cli_env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["input"] for r in records) == [str(p) for p in inputs]
    for r in records:  # deterministic split: rank = index in the sorted list modulo 2
        assert r["rank"] == inputs.index(Path(r["input"])) % 2
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "broken.mp4" in failed[0]["reason"]
    done = {Path(r["output"]).relative_to(out).as_posix(): r for r in records if r["status"] == "ok"}
    assert sorted(done) == ["a.mp4.safetensors", "b.mp4.safetensors", "sub/c.mp4.safetensors"]
    assert done["sub/c.mp4.safetensors"]["frames"] == 5
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert len(mtimes) == 3 and leftovers(out) == [] and leftovers(out / "sub") == []

    # rerun under torchrun: what is done is skipped, only the broken input is tried again
    torchrun = Path(sys.executable).with_name("torchrun")
    rerun = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "decovae_fast.cli", *cmd[3:]]
    rerun[rerun.index("--quiet")] = "--device=cpu"
    result = subprocess.run(rerun, capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "0 encoded, 3 already done, 1 failed" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 5 and records[-1]["status"] == "failed" and "broken.mp4" in records[-1]["input"]

    # a dataset latent decodes like any other
    dec = tmp_path / "c.mp4"
    assert_ok(decovae("decode", out / "sub" / "c.mp4.safetensors", "-o", dec, "--weights", small_weights,
                      "--quiet"))
    assert read_video(dec)[0].shape == (5, 32, 32, 3)


def test_encode_dataset_from_list(tmp_path, make_clip, small_weights):
    a = make_clip(2, 16, 16)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# videos\n{a}\n\n{tmp_path / 'missing.mp4'}\n")
    out = tmp_path / "lat"
    result = decovae("encode-dataset", "--inputs", listing, "--out", out, "--weights", small_weights, "--quiet")
    assert result.returncode == 0, result.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert records[a.name]["status"] == "ok" and Path(records[a.name]["output"]).is_file()
    assert records["missing.mp4"]["status"] == "failed" and "no such file" in records["missing.mp4"]["reason"]
    bad = decovae("encode-dataset", "--inputs", tmp_path / "nope", "--out", out, "--weights", small_weights)
    assert bad.returncode == 2 and str(tmp_path / "nope") in bad.stderr


def test_latent_stats_writes_json_and_the_config(tmp_path, make_clip, small_weights):
    weights = tmp_path / "w"
    shutil.copytree(small_weights, weights)
    a, b = make_clip(9, 32, 48), make_clip(12, 32, 48)
    out = tmp_path / "stats.json"
    result = decovae("latent-stats", a, b, "-o", out, "--weights", weights, "--write-config", "--quiet")
    assert result.returncode == 0, result.stderr
    stats = json.loads(out.read_text())
    from decovae_fast.models import load_pretrained
    model = load_pretrained(weights)
    assert len(stats["latents_mean"]) == model.pack_layout().channels
    assert list(model.config.latents_mean) == stats["latents_mean"]
    assert list(model.config.latents_std) == stats["latents_std"] and min(stats["latents_std"]) > 0
    assert model.config_hash() == load_pretrained(small_weights).config_hash()  # statistics do not change it
    bad = decovae("latent-stats", a, "-o", tmp_path / "s2.json", "--write-config")
    assert bad.returncode == 2 and "--weights" in bad.stderr and not (tmp_path / "s2.json").exists()
    missing = decovae("latent-stats", tmp_path / "nope.mp4", "-o", tmp_path / "s3.json", "--weights", weights)
    assert missing.returncode == 2 and "nope.mp4" in missing.stderr


def test_nan_produced_by_the_model_is_reported_and_nothing_is_written(tmp_path, clip, small_weights):
    """Weights with a NaN (a diverged training run) make NaN latents and frames: encode, reconstruct
    and encode-dataset --shard-clips report it with exit 2 / a failed record, and write nothing."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_weights"
    shutil.copytree(small_weights, bad)
    state = load_file(bad / "model.safetensors")
    key = next(k for k in state if k.startswith("keyframe_encoder") and k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(bad / "model.safetensors"))
    out = tmp_path / "z.safetensors"
    result = decovae("encode", clip, "-o", out, "--weights", bad)
    assert result.returncode == 2 and "NaN or Inf" in result.stderr and not out.exists()
    assert len(result.stderr.strip().splitlines()) == 1
    video = tmp_path / "r.mp4"
    result = decovae("reconstruct", clip, "-o", video, "--weights", bad)
    assert result.returncode == 2 and "NaN or Inf" in result.stderr and not video.exists()
    src = tmp_path / "videos"
    src.mkdir()
    shutil.copy(clip, src / "a.mp4")
    shards = tmp_path / "shards"
    result = decovae("encode-dataset", "--inputs", src, "--out", shards, "--weights", bad, "--shard-clips", "2",
                     "--clip-frames", "8")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (shards / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed"] and "NaN or Inf" in records[0]["reason"]
    assert not list(shards.glob("shard-*"))


def _file_size_limit(nbytes):
    """preexec_fn: files may not grow past nbytes (as a full disk would stop them); the write fails
    with EFBIG instead of the process being killed by SIGXFSZ."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_a_full_disk_is_reported_and_leaves_nothing(tmp_path, clip, small_weights, cli_env):
    """encode, decode, reconstruct and encode-dataset with a file-size limit (a disk that fills up
    midway): exit 2 with one line naming the output, no file or temporary left; encode-dataset
    records each video failed and goes on to the next; in shard mode a shard that cannot be written
    stops the rank (exit 2) before its journal line, so a rerun writes it."""
    def run(*args, limit=1500):
        cmd = [sys.executable, "-m", "decovae_fast.cli", *map(str, args), "--weights", str(small_weights)]
        return subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=300,
                              preexec_fn=None if limit is None else _file_size_limit(limit))
    latent = tmp_path / "z.safetensors"
    assert run("encode", clip, "-o", latent, limit=None).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    for args in (["encode", clip, "-o", out / "z.safetensors"], ["decode", latent, "-o", out / "d.mp4"],
                 ["reconstruct", clip, "-o", out / "r.mp4"]):
        result = run(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "cannot write the output" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert list(out.iterdir()) == []
    src = tmp_path / "videos"
    src.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(clip, src / name)
    result = run("encode-dataset", "--inputs", src, "--out", tmp_path / "lat")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "lat" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("cannot write the output" in r["reason"] for r in records)
    assert [p.name for p in (tmp_path / "lat").iterdir()] == ["manifest.jsonl"]
    shards = tmp_path / "shards"
    result = run("encode-dataset", "--inputs", src, "--out", shards, "--shard-clips", "2", "--clip-frames", "8")
    assert result.returncode == 2 and "cannot write the output" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(shards.glob("shard-*")) and not list(shards.glob(".*partial*"))
    result = run("encode-dataset", "--inputs", src, "--out", shards, "--shard-clips", "2", "--clip-frames", "8",
                 limit=None)  # the disk has room again: the rerun writes every shard
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(shards.glob("shard-*"))
