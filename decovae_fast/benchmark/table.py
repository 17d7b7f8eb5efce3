"""The markdown table of a benchmark result, with the targets it is read against."""
from __future__ import annotations

import math

from decovae_fast.benchmark.harness import (COPY_SAME_BYTES, NOT_FAST, TORCH_GRID_SAMPLE, TORCH_SEQUENCE,
                                            reproduce_command)


# ---- the markdown table -------------------------------------------------------------------------

def _fmt(x, spec: str = "") -> str:
    """Three significant digits without exponents (2593 -> "2593", 0.0164 -> "0.0164")."""
    if x is None:
        return ""
    if spec:
        return format(x, spec)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def _ratio(a, b, spec=".2f") -> str:
    return "" if a is None or b in (None, 0) else format(a / b, spec) + "x"


def format_table(result: dict, json_path: str | None = None) -> str:
    """The README's benchmark section, generated from one result document."""
    rows = result["rows"]
    c = result["ceilings"]
    samples = [x["copy_gbps"] for x in result.get("ceiling_samples", [])] or [c["copy_gbps"]]
    tun = result.get("allocator", {}).get("GLIBC_TUNABLES")
    lines = [
        f"Measured on {result['device']}, torch {result['torch']}, {result['threads']} threads, "
        f"allocator: {'GLIBC_TUNABLES=' + tun if tun else 'glibc default'}, load average "
        f"{result.get('loadavg_start')} at start, {result.get('loadavg_end')} at end"
        f"{'' if not result.get('quick') else ' (--quick)'}."
        + "".join(f" Left out: {why}." for why in result.get("left_out", [])),
        f"Ceilings measured in the same run: copy {c['copy_gbps']:.1f} GB/s (read + write; the best of "
        f"{len(samples)} samples: {', '.join(f'{x:.1f}' for x in samples)}), matmul "
        + ", ".join(f"{d} {v:.0f}" for d, v in c["matmul_gflops"].items()) + " GFLOP/s.",
        "",
    ]
    op_rows = [r for r in rows if r["fps"] is None]
    if op_rows:
        lines += ["| op | shape | dtype | backend | median ms | vs reference | vs PyTorch way | GB/s | GFLOP/s "
                  "| of ceiling |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        torch_ms = {(r["name"], r["shape"], r["dtype"]): r["median_ms"] for r in op_rows
                    if r["backend"] in (TORCH_GRID_SAMPLE, TORCH_SEQUENCE)}
        for r in op_rows:
            t = torch_ms.get((r["name"], r["shape"], r["dtype"]))
            frac = "" if r["ceiling_fraction"] is None else f"{100 * r['ceiling_fraction']:.1f}%"
            lines.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | {r['backend']} | {_fmt(r['median_ms'])} "
                         f"| {_fmt(r['speedup'], '.2f')}x | {_ratio(t, r['median_ms'])} | {_fmt(r['gbps'])} "
                         f"| {_fmt(r['gflops'])} | {frac} |")
        lines += ["", "vs reference: time of the pure-PyTorch oracle / this time; vs PyTorch way: time of "
                  f"`{TORCH_GRID_SAMPLE}` (5-D grid_sample + add/sub) or `{TORCH_SEQUENCE}` (Wan 2.1's RMSNorm, "
                  "SiLU, cat cache, F.pad, conv3d) / this time; all backends of a row group timed interleaved "
                  "in the same run. Ceiling: copy bandwidth for the warp and blur ops (GB/s of ideal traffic: each "
                  "input read once, each output written once; for a warp forward only the frames and motion "
                  "read and the output written, as issue 3 counts them), matmul throughput of the dtype for the "
                  "convolutions (GFLOP/s counts a direct convolution's multiply-adds, so a kernel that does "
                  "fewer of them, e.g. Winograd, can pass 100%; so can any row when other work on the machine "
                  f"depressed the ceiling measurements). `{COPY_SAME_BYTES}`: a plain copy moving the warp's ideal "
                  "bytes, timed interleaved with it: the copy bandwidth at the same moment.", ""]
    pipe = [r for r in rows if r["fps"] is not None and not r["name"].startswith(("stream.", "train."))]
    if pipe:
        lines += pipeline_table(pipe)
    stream = [r for r in rows if r["name"].startswith("stream.")]
    if stream:
        lines += stream_table(stream, result.get("pipeline_notes", {}))
    train = [r for r in rows if r["name"].startswith("train.")]
    if train:
        from decovae_fast.benchmark.training import training_table

        lines += training_table(train)
    targets = target_lines(result)
    if targets:
        lines += ["Targets:", ""] + [f"- {t}" for t in targets] + [""]
    lines.append(f"Reproduce: `{reproduce_command(result, json_path)}`")
    return "\n".join(lines) + "\n"


def _model_of(name: str) -> str:
    return name.split(".", 1)[1]


def pipeline_table(pipe: list[dict]) -> list[str]:
    by = {}
    for r in pipe:
        phase, model = r["name"].split(".", 1)
        by.setdefault((model, r["shape"], r["backend"]), {})[phase] = r
    wan = {shape: v for (m, shape, _), v in by.items() if m == "wan2.1"}
    lines = ["| model | video | backend | encode frames/s | decode frames/s | encode peak MB | decode peak MB "
             "| latent elements | latent vs Wan 2.1 | encode vs Wan 2.1 | decode vs Wan 2.1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, shape, backend), v in by.items():
        e, d = v.get("encode", {}), v.get("decode", {})
        w = wan.get(shape, {})
        we, wd = w.get("encode", {}), w.get("decode", {})
        lat = e.get("latent_elements") or d.get("latent_elements")
        lines.append(f"| {model} | {shape} | {backend} | {_fmt(e.get('fps'))} | {_fmt(d.get('fps'))} "
                     f"| {_fmt(e.get('peak_mem_mb'), '.0f')} | {_fmt(d.get('peak_mem_mb'), '.0f')} | {_fmt(lat, 'd')} "
                     f"| {_ratio(lat, we.get('latent_elements'))} | {_ratio(e.get('fps'), we.get('fps'))} "
                     f"| {_ratio(d.get('fps'), wd.get('fps'))} |")
    lines += ["", "Peak MB: peak memory during one call above what was resident before it (weights and input "
              "excluded): peak RSS on a CPU (each model in its own process), torch.cuda.max_memory_allocated "
              "on a GPU. Peers use diffusers' default configs with random weights (same cost as trained).", ""]
    return lines


def _frames_and_size(shape: str) -> tuple[int, str]:
    """(T, "HxW") of a stream row's shape "1x3xTxHxW chunk=c"."""
    dims = shape.split()[0].split("x")
    return int(dims[2]), f"{dims[3]}x{dims[4]}"


def stream_table(stream: list[dict], notes: dict) -> list[str]:
    sn = notes.get("stream.tiny", {})
    fixed = sn.get("fixed_mmap_threshold", {})
    lines = ["| model | video | backend | encode + decode frames/s | peak MB | peak MB, fixed mmap threshold "
             "| latent elements |", "|---|---|---|---:|---:|---:|---:|"]
    for r in stream:
        f = fixed.get(r["shape"], {})
        lines.append(f"| {_model_of(r['name'])} | {r['shape']} | {r['backend']} | {_fmt(r['fps'])} "
                     f"| {_fmt(r['peak_mem_mb'], '.0f')} | {_fmt(f.get('peak_mem_mb'), '.0f')} "
                     f"| {_fmt(r['latent_elements'], 'd')} |")
    weights = sn.get("weights", "")
    lines += ["", "Streaming: the command line's path without the file I/O: frames made chunk by chunk (a moving "
              "texture), `encode_stream` -> `decode_stream`, decoded chunks dropped as they come; one process "
              "per frame size, peak RSS above the RSS before the call. `fixed mmap threshold`: the same run "
              f"in a process started with GLIBC_TUNABLES={fixed.get('GLIBC_TUNABLES', '...')}, which stops glibc's "
              "default malloc from keeping freed buffers in a fragmented heap (empty: not run)."
              + (f" Weights: {weights}." if weights else "")
              + (f" Adaptive keyframes {sn['adaptive_keyframes']}." if "adaptive_keyframes" in sn else ""), ""]
    return lines


def stream_target_lines(result: dict) -> list[str]:
    """Peak of the longest streamed clip over the peak of the shortest, per frame size and backend."""
    fixed = result.get("pipeline_notes", {}).get("stream.tiny", {}).get("fixed_mmap_threshold", {})
    groups = {}
    for r in result["rows"]:
        if r["name"] == "stream.tiny":
            T, size = _frames_and_size(r["shape"])
            groups.setdefault((size, r["backend"]), []).append((T, r))
    out = []
    for (size, backend), runs in groups.items():
        if len(runs) < 2:
            continue
        (t_lo, lo), (t_hi, hi) = min(runs, key=lambda x: x[0]), max(runs, key=lambda x: x[0])
        label = f"{t_hi}-frame streaming peak / {t_lo}-frame peak at {size} ({backend})"
        if not lo["peak_mem_mb"] or hi["peak_mem_mb"] is None:
            out.append(f"{label}: peak memory not measured")
            continue
        ratio = hi["peak_mem_mb"] / lo["peak_mem_mb"]
        line = (f"{label}: {ratio:.2f}x ({hi['peak_mem_mb']:.0f} / {lo['peak_mem_mb']:.0f} MB) (target <= 1.25x): "
                f"{'met' if ratio <= 1.25 else 'MISSED'}")
        f_lo, f_hi = fixed.get(lo["shape"], {}).get("peak_mem_mb"), fixed.get(hi["shape"], {}).get("peak_mem_mb")
        if f_lo and f_hi is not None:
            line += f"; with a fixed mmap threshold {f_hi / f_lo:.2f}x ({f_hi:.0f} / {f_lo:.0f} MB)"
        elif ratio > 1.25:
            line += " (under glibc's default malloc; the full suite also measures with a fixed mmap threshold)"
        out.append(line)
    return out


def _get(rows, name, backend=None, shape=None, dtype="fp32"):
    for r in rows:
        if r["name"] == name and r["dtype"] == dtype and (backend is None or r["backend"] == backend) \
                and (shape is None or r["shape"] == shape):
            yield r


def target_lines(result: dict) -> list[str]:
    """The project's targets, met or missed, from this run's rows (nothing is claimed without a row)."""
    rows = result["rows"]
    out = []

    def verdict(ok):
        return "met" if ok else "MISSED"

    for t in _get(rows, "encode.tiny"):
        if t["backend"] == "reference" and any(r["shape"] == t["shape"] and r["backend"] != "reference"
                                               for r in _get(rows, "encode.tiny")):
            continue
        for phase in ("encode", "decode"):
            mine = next(_get(rows, f"{phase}.tiny", t["backend"], t["shape"]), None)
            wan = next(_get(rows, f"{phase}.wan2.1", None, t["shape"]), None)
            if mine and wan and mine["fps"] and wan["fps"]:
                ratio = mine["fps"] / wan["fps"]
                out.append(f"tiny {phase} at {t['shape']}: {ratio:.2f}x the Wan 2.1 VAE's frames/s "
                           f"(target >= 3x): {verdict(ratio >= 3)}")
        if t["latent_elements"]:  # against the 16-channel 4x8x8 size; fixed GOPs from the config
            from decovae_fast.models.config import DeCoVAEConfig

            _, _, T, H, W = (int(v) for v in t["shape"].split("x"))
            bound = 16 * (1 + math.ceil((T - 1) / 4)) * math.ceil(H / 8) * math.ceil(W / 8)
            fixed = DeCoVAEConfig().latent_elements(T, H, W) / bound
            out.append(f"tiny latent at {t['shape']} ({t['backend']}): {fixed:.2f}x the 16-channel 4x8x8 size at "
                       f"fixed GOPs (target <= 0.55x): {verdict(fixed <= 0.55)}; as encoded, adaptive keyframes "
                       f"on: {t['latent_elements'] / bound:.2f}x")
        wan = next(_get(rows, "encode.wan2.1", None, t["shape"]), None)
        if wan and t["latent_elements"] and wan["latent_elements"]:
            ratio = t["latent_elements"] / wan["latent_elements"]
            out.append(f"tiny latent at {t['shape']}: {ratio:.2f}x the Wan 2.1 VAE's elements (target <= 0.6x): "
                       f"{verdict(ratio <= 0.6)}")
    fast = [r for r in _get(rows, "warp_residual.fwd") if r["backend"] not in NOT_FAST]
    for r in fast:
        copy = next(_get(rows, "warp_residual.fwd", COPY_SAME_BYTES, r["shape"]), None)
        # the bandwidth target reads against the copy of the same bytes timed interleaved with the
        # kernel (>= 50%): the run's copy ceiling, measured at another moment, moves by half on a VM
        if copy and copy["gbps"]:
            frac = r["gbps"] / copy["gbps"]
            bandwidth = (f"{100 * frac:.0f}% of the same-size copy timed interleaved with it (target >= 50%): "
                         f"{verdict(frac >= 0.5)}; {100 * r['ceiling_fraction']:.1f}% of the run's copy ceiling")
        else:
            bandwidth = (f"{100 * r['ceiling_fraction']:.1f}% of the run's copy ceiling (no same-size copy in "
                         f"this run; target >= 40%): {verdict(r['ceiling_fraction'] >= 0.4)}")
        out.append(f"warp_residual.fwd {r['backend']} {r['shape']}: {r['speedup']:.2f}x the reference (target >= 8x): "
                   f"{verdict(r['speedup'] >= 8)}; {bandwidth}")
        if r["backend"] == "cpu@avx2" and copy and copy["gbps"]:  # the AVX2 kernels' own target
            frac = r["gbps"] / copy["gbps"]
            out.append(f"warp_residual.fwd cpu@avx2 {r['shape']}: {100 * frac:.0f}% of the same-size copy "
                       f"(AVX2 target >= 35%): {verdict(frac >= 0.35)}")
    for r in _get(rows, "warp_residual.fwd_bwd"):
        if r["backend"] not in NOT_FAST:
            out.append(f"warp_residual.fwd_bwd {r['backend']} {r['shape']}: {r['speedup']:.2f}x the reference "
                       f"(target >= 4x): {verdict(r['speedup'] >= 4)}")
    if not fast and any(_get(rows, "warp_residual.fwd")):
        out.append("warp_residual.fwd: no fast backend was available in this run: targets not measured")
    blocks = list(_get(rows, "causal_conv3d.block"))
    for r in blocks:
        if r["backend"] in NOT_FAST:
            continue
        t = next((s for s in blocks if s["shape"] == r["shape"] and s["backend"] == TORCH_SEQUENCE), None)
        if t:
            ratio = t["median_ms"] / r["median_ms"]
            out.append(f"causal_conv3d.block {r['backend']} {r['shape']}: {ratio:.2f}x the PyTorch sequence "
                       f"(target >= 1.3x): {verdict(ratio >= 1.3)}")
    if blocks and all(r["backend"] in NOT_FAST for r in blocks):
        out.append("causal_conv3d.block: no fast backend was available in this run: target not measured")
    return out + stream_target_lines(result)


