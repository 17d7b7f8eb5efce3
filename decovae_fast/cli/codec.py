"""`decovae reconstruct`, `decovae encode`, `decovae decode`: video file -> latents -> video file,
streamed (frames are read as the encoder consumes them and written as the decoder produces them).

Bad input (files, sizes, flags, missing weights) is a UserError: one line, exit code 2. Outputs are
written under a temporary name and renamed when complete, so a failure leaves none behind.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from decovae_fast.cli.flags import (device_and_dtype, load_model, model_flags, output_video_flags, progress,
                                    video_flags)
from decovae_fast.errors import UserError
from decovae_fast.io.outputs import atomic_output, check_writable


def add_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="encode and decode a video; optional quality report")
    p.add_argument("input", metavar="IN", help="input video")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4", help="reconstructed video")
    p.add_argument("--report", metavar="R.json", help="write a JSON report and a PNG next to it")
    output_video_flags(p)
    video_flags(p)
    model_flags(p)
    p.set_defaults(run=run_reconstruct)

    p = sub.add_parser("encode", help="encode a video into a latent file (.safetensors)")
    p.add_argument("input", metavar="IN", help="input video")
    p.add_argument("-o", "--output", required=True, metavar="LAT.safetensors", help="latent file")
    video_flags(p)
    model_flags(p)
    p.set_defaults(run=run_encode)

    p = sub.add_parser("decode", help="decode a latent file into a video")
    p.add_argument("input", metavar="LAT", help="latent file written by `decovae encode`")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4", help="decoded video")
    output_video_flags(p)
    model_flags(p)
    p.set_defaults(run=run_decode)


def _check_common(args) -> None:
    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise UserError(f"--chunk-frames {args.chunk_frames}: must be at least 1")
    crf = getattr(args, "crf", 0)  # encode has no output video, so no --crf
    if not 0 <= crf <= 51:
        raise UserError(f"--crf {crf}: must be between 0 and 51")
    if Path(args.output).exists() and Path(args.input).exists() and Path(args.output).samefile(args.input):
        raise UserError(f"{args.output}: output would overwrite the input")


def check_finite(t: torch.Tensor, source, what: str) -> torch.Tensor:
    """A NaN or Inf the model produced is an error naming the input, never data in an output file."""
    if not torch.isfinite(t).all():
        raise UserError(f"{source}: the model produced NaN or Inf values in the {what}; nothing was written "
                        f"(check the weights, or try --dtype fp32)")
    return t


# --- model -------------------------------------------------------------------------------------------
def latent_to(latent, device):
    for g in latent.parts().values():
        g.mean, g.logvar = g.mean.to(device), g.logvar.to(device)
    return latent


def op_backends(device: torch.device) -> dict:
    from decovae_fast import ops

    return {op: ops.backend_for(op, device) for op in ops.OPS}


# --- streaming helpers -------------------------------------------------------------------------------
class Clock:
    """Seconds spent inside next() of the iterators it wraps (nested clocks include inner ones)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, iterable):
        it = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item


def frame_chunks(reader, chunk_frames, device, dtype, tap=None):
    """Model-ready (1, 3, t, H, W) chunks from a VideoReader; tap(uint8 frames) sees each chunk."""
    from decovae_fast.io.video import frames_to_tensor

    for arr in reader.chunks(chunk_frames):
        if tap is not None:
            tap(arr)
        yield frames_to_tensor(arr, device, dtype)


def default_chunk(model, args) -> int:
    return args.chunk_frames or model.config.keyframe_interval


# --- reconstruct -------------------------------------------------------------------------------------
def run_reconstruct(args) -> int:
    from decovae_fast.eval import metrics, report
    from decovae_fast.io.video import VideoReader, VideoWriter, parse_size, tensor_to_frames

    _check_common(args)
    size = parse_size(args.size)
    device, dtype = device_and_dtype(args)
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
        check_writable(report.figure_path(args.report))
    with VideoReader(args.input, size=size, max_frames=args.frames) as reader, \
            atomic_output(args.output) as tmp, \
            VideoWriter(tmp, reader.fps, reader.height, reader.width, crf=args.crf,
                        display_name=args.output) as writer, \
            torch.no_grad():
        model = load_model(args.weights, device, dtype)
        chunk = default_chunk(model, args)
        keep = model.config.keyframe_interval  # first GOP kept for the report's figure
        pending = deque()          # original frames read but not yet decoded (about one GOP)
        first_orig, first_recon = [], []
        psnr_pf, ssim_pf, keyframes = [], [], []
        totals = {"frames": 0, "latent": 0}

        def tap(arr):
            pending.extend(arr)
            first_orig.extend(arr[:max(0, keep - len(first_orig))])

        def record(pieces):
            for piece in pieces:
                keyframes.extend(totals["frames"] + s for s in piece.gop_starts)
                totals["frames"] += piece.frames
                totals["latent"] += piece.numel()
                yield piece

        read_clock, enc_clock, dec_clock = Clock(), Clock(), Clock()
        chunks = read_clock.wrap(frame_chunks(reader, chunk, device, dtype, tap))
        first_gop = []  # the encoder's own decomposition of the first GOP, for the report's figure

        def on_gop(parts):
            if not first_gop:
                first_gop.append(parts)

        pieces = record(enc_clock.wrap(model.encode_stream(chunks, on_gop=on_gop if args.report else None)))
        bar = progress(args, reader.frames_hint, "reconstruct")
        for out in dec_clock.wrap(model.decode_stream(pieces, args.chunk_frames)):
            recon = tensor_to_frames(check_finite(out, args.input, "reconstruction"))
            writer.write(recon)
            orig = np.stack([pending.popleft() for _ in range(len(recon))])
            p, s = metrics.frame_metrics(orig, recon)
            psnr_pf += p
            ssim_pf += s
            first_recon.extend(recon[:max(0, keep - len(first_recon))])
            bar.update(len(recon))
        bar.close()
        if pending or totals["frames"] != len(psnr_pf):
            raise RuntimeError(f"model returned {len(psnr_pf)} frames for {totals['frames']} encoded "
                               f"({len(pending)} unmatched)")
        if args.report:
            result = report.build(
                psnr_per_frame=psnr_pf, ssim_per_frame=ssim_pf, height=reader.height, width=reader.width,
                fps=reader.fps, latent_elements=totals["latent"], keyframes=keyframes,
                encode_seconds=enc_clock.seconds - read_clock.seconds,
                decode_seconds=dec_clock.seconds - enc_clock.seconds,
                backend=_forced_backend(), op_backends=op_backends(device),
                model_type=model.config.model_type, config_hash=model.config_hash(), device=str(device),
                dtype=args.dtype, chunk_frames=args.chunk_frames)
            panels = figure_panels(first_orig, first_recon, keyframes, first_gop[0] if first_gop else None)
    if args.report:
        png = report.write(args.report, result, panels)
    if not args.quiet:
        print(f"wrote {args.output}: {len(psnr_pf)} frames {reader.height}x{reader.width} at "
              f"{float(reader.fps):g} fps" + (f"; PSNR {result['psnr']:.2f} dB, report {args.report} "
                                               f"and {png}" if args.report else ""))
    return 0


def _forced_backend() -> str:
    from decovae_fast import ops

    return ops.forced_backend() or "auto"


def figure_panels(first_orig, first_recon, keyframes, gop) -> dict:
    """The report figure's images for the last frame of the first GOP (furthest from its keyframe,
    so the most motion): reconstruction and original and, from the encoder's decomposition of that
    GOP (DeCoVAE's on_gop; None for a plain VAE), keyframe, motion [u, v, s] and residual. Arrays
    (3, H, W) in [-1, 1] units."""
    from decovae_fast.io.video import frames_to_tensor

    gop_end = keyframes[1] if len(keyframes) > 1 else len(first_orig)
    frame = min(gop_end, len(first_orig), len(first_recon)) - 1

    def chw(arr):
        return frames_to_tensor(arr[None])[0, :, 0].numpy()

    panels = {"frame": frame, "original": chw(first_orig[frame]), "reconstruction": chw(first_recon[frame])}
    if gop is not None:
        panels["keyframe_index"] = gop["start"]
        panels["keyframe"] = gop["keyframe"][0, :, 0].float().cpu().numpy()
        inner = frame - gop["start"] - 1  # the keyframe itself has no motion and no residual
        shape = gop["keyframe"].shape[1:2] + gop["keyframe"].shape[3:]
        panels["motion"] = gop["motion"][0, :, inner].float().cpu().numpy() if inner >= 0 else np.zeros(shape, np.float32)
        panels["residual"] = gop["residual"][0, :, inner].float().cpu().numpy() if inner >= 0 else np.zeros(shape, np.float32)
    return panels


# --- encode / decode ---------------------------------------------------------------------------------
def encode_file(model, input_path, output_path, *, size=None, max_frames=None, chunk_frames=None,
                device=torch.device("cpu"), dtype=torch.float32, make_bar=None) -> dict:
    """Encodes one video file into a latent file (atomically). Returns a summary dict."""
    from decovae_fast.io.latent_file import save_latent
    from decovae_fast.models import DeCoLatent
    from decovae_fast.io.video import VideoReader

    check_writable(output_path)
    with VideoReader(input_path, size=size, max_frames=max_frames) as reader, torch.no_grad():
        chunk = chunk_frames or model.config.keyframe_interval
        bar = make_bar(reader.frames_hint) if make_bar else None

        def tap(arr):
            if bar is not None:
                bar.update(len(arr))

        pieces = list(model.encode_stream(frame_chunks(reader, chunk, device, dtype, tap)))
        if bar is not None:
            bar.close()
        latent = DeCoLatent.concat(pieces)
        for name, g in latent.parts().items():
            check_finite(g.mean, input_path, f"{name} latent")
        save_latent(output_path, latent, model_type=model.config.model_type,
                    config_hash=model.config_hash(), fps=reader.fps)
    return {"frames": latent.frames, "size": [latent.height, latent.width], "fps": float(reader.fps),
            "latent_elements": int(latent.numel()), "keyframes": list(latent.gop_starts)}


def run_encode(args) -> int:
    from decovae_fast.io.video import check_input_file, parse_size

    _check_common(args)
    size = parse_size(args.size)
    device, dtype = device_and_dtype(args)
    check_input_file(args.input)
    check_writable(args.output)
    model = load_model(args.weights, device, dtype)
    summary = encode_file(model, args.input, args.output, size=size, max_frames=args.frames,
                          chunk_frames=args.chunk_frames, device=device, dtype=dtype,
                          make_bar=lambda total: progress(args, total, "encode"))
    if not args.quiet:
        h, w = summary["size"]
        print(f"wrote {args.output}: {summary['frames']} frames {h}x{w}, {summary['latent_elements']} latent "
              f"elements, {len(summary['keyframes'])} GOPs")
    return 0


def run_decode(args) -> int:
    from decovae_fast.io.latent_file import load_latent
    from decovae_fast.io.video import VideoWriter, tensor_to_frames

    _check_common(args)
    device, dtype = device_and_dtype(args)
    check_writable(args.output)
    model = load_model(args.weights, device, dtype)
    lat = load_latent(args.input, expect_config_hash=model.config_hash())
    latent = latent_to(lat.latent, device)
    try:
        model._check_latent(latent)
    except ValueError as exc:
        raise UserError(f"{args.input}: latent does not fit the model ({exc})") from None
    with atomic_output(args.output) as tmp, \
            VideoWriter(tmp, lat.fps, lat.height, lat.width, crf=args.crf, display_name=args.output) as writer, \
            torch.no_grad():
        bar = progress(args, lat.frames, "decode")
        for out in model.decode_stream(latent, args.chunk_frames):
            frames = tensor_to_frames(check_finite(out, args.input, "decoded frames"))
            writer.write(frames)
            bar.update(len(frames))
        bar.close()
        if writer.frames_written != lat.frames:
            raise RuntimeError(f"decoded {writer.frames_written} frames, the latent holds {lat.frames}")
    if not args.quiet:
        print(f"wrote {args.output}: {lat.frames} frames {lat.height}x{lat.width} at {float(lat.fps):g} fps")
    return 0
