"""`decovae encode-dataset --inputs LIST|DIR --out DIR`: many videos to latent files.

- Inputs: a folder (searched recursively for video files) or a text file with one path per line
  (blank lines and lines starting with '#' skipped; relative paths are relative to the list).
- Output of input `a/b.mp4` (relative to the inputs' common folder): OUT/a/b.mp4.safetensors,
  written atomically, so a file that exists is complete: a rerun skips it (resume loses nothing).
- Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) rank r takes inputs
  r, r + W, r + 2W, ... of the sorted list: a deterministic split with no communication. A process
  group (gloo on CPU, nccl on CUDA) is only used, when torchrun provides one, to wait for all ranks
  and print the totals once.
- Each input's result goes to OUT/manifest.jsonl (one JSON object per line, appended atomically):
  status "ok" with sizes and time, or "failed" with the reason. A failure does not stop the run.
- With --shard-clips N: clips of --clip-frames frames every --clip-stride frames (--size HxW
  stretched, or with --crop scaled and centre-cropped), encoded with
  fixed GOPs and packed (optionally normalised), go into safetensors shards of N clips
  (io/shards.py) instead of one file per video. Rank r's clips, in order, fill its shards
  shard-r<r>-<k>; each shard is written whole, then a line in OUT/progress-r<r>.jsonl records it
  and where the next one starts (video, clip). A run killed at any point and rerun resumes there
  and writes the same shards, bit for bit: nothing lost, nothing twice. The next video is decoded
  in a thread while the current one is encoded; a video's clips are encoded in batches.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from decovae_fast.cli.flags import compute_dtype, load_model, model_flags, progress, resolve_device, video_flags
from decovae_fast.errors import UserError
from decovae_fast.io.video import find_videos

LATENT_SUFFIX = ".safetensors"


def add_parser(sub) -> None:
    p = sub.add_parser("encode-dataset", help="encode many videos (split across torchrun ranks)")
    p.add_argument("--inputs", required=True, metavar="LIST|DIR",
                   help="folder of videos (recursive) or text file with one video path per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the latent files")
    p.add_argument("--manifest", metavar="FILE", help="JSON-lines log of results (default OUT/manifest.jsonl)")
    p.add_argument("--shard-clips", type=int, metavar="N",
                   help="write packed latents of clips into shards of N clips (for training a generator)")
    p.add_argument("--clip-frames", type=int, metavar="F", help="frames per clip (default 2 GOPs)")
    p.add_argument("--clip-stride", type=int, metavar="S", help="frames between clip starts (default F)")
    p.add_argument("--normalize", action="store_true", help="store latents normalised (the model's latents_mean/std)")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="clips per encoder call (default 4)")
    p.add_argument("--crop", action="store_true",
                   help="with --size: scale (aspect kept) to cover HxW and centre-crop, instead of stretching")
    video_flags(p)
    model_flags(p)
    p.set_defaults(run=run)


def list_inputs(inputs) -> tuple[list[Path], Path]:
    """(sorted input paths, their common root folder)."""
    src = Path(inputs)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if src.is_dir():
        paths = find_videos(src)
        root = src
    else:
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as exc:
            raise UserError(f"{src}: not a text file listing videos ({exc.__class__.__name__})") from None
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        paths = [(src.parent / e) if not os.path.isabs(e) else Path(e) for e in entries]
        paths = [Path(os.path.normpath(p)) for p in paths]
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else src.parent
    paths = sorted(set(paths))
    if not paths:
        raise UserError(f"{src}: no video files found")
    return paths, root


def output_path(src: Path, root: Path, out: Path) -> Path:
    rel = os.path.relpath(src, root)
    return out / (rel + LATENT_SUFFIX)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when absent."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world, local


def append_line(path: Path, record: dict) -> None:
    """One write() with O_APPEND: lines from concurrent ranks never interleave."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def remove_stale_partials(dst: Path) -> None:
    """Temporary files a crashed earlier run left for this output (only this rank writes it)."""
    for p in dst.parent.glob(f".{dst.stem}.partial-*{dst.suffix}"):
        p.unlink(missing_ok=True)


def _process_group(device):
    """torch.distributed group when torchrun set one up, else None."""
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist


def run(args) -> int:
    import torch

    from decovae_fast.cli.codec import encode_file
    from decovae_fast.io.video import parse_size

    size = parse_size(args.size)
    rank, world, local_rank = dist_env()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", local_rank)
    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise UserError(f"--chunk-frames {args.chunk_frames}: must be at least 1")
    paths, root = list_inputs(args.inputs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{out}: output folder is not writable")
    manifest = Path(args.manifest) if args.manifest else out / "manifest.jsonl"
    dist = _process_group(device)

    mine = paths[rank::world]
    if args.shard_clips is not None:
        return run_shards(args, mine, out, manifest, rank, world, device, size, dist)
    todo = [(src, output_path(src, root, out)) for src in mine]
    todo = [(src, dst) for src, dst in todo if not dst.exists()]
    counts = {"ok": 0, "failed": 0, "skipped": len(mine) - len(todo)}
    dtype = compute_dtype(args.dtype, device)
    model = load_model(args.weights, device, dtype) if todo else None
    bar = progress(args, len(todo), f"encode-dataset rank {rank}/{world}")
    bar.unit = "video"
    for src, dst in todo:
        start = time.perf_counter()
        record = {"input": str(src), "output": str(dst), "rank": rank}
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(dst)
            summary = encode_file(model, src, dst, size=size, max_frames=args.frames,
                                  chunk_frames=args.chunk_frames, device=device, dtype=dtype)
            record.update(status="ok", **summary)
            counts["ok"] += 1
        except UserError as exc:
            record.update(status="failed", reason=str(exc))
            counts["failed"] += 1
        except Exception as exc:  # an internal error on one video must not stop the others
            record.update(status="failed", reason=f"internal error: {type(exc).__name__}: {exc}")
            counts["failed"] += 1
        record["seconds"] = round(time.perf_counter() - start, 3)
        append_line(manifest, record)
        bar.update(1)
    bar.close()

    if dist is not None:
        totals = torch.tensor([counts["ok"], counts["failed"], counts["skipped"]], dtype=torch.int64,
                              device=device)
        dist.all_reduce(totals)
        counts = dict(zip(("ok", "failed", "skipped"), totals.tolist()))
        dist.destroy_process_group()
        scope = "all ranks"
    else:
        scope = f"rank {rank}/{world}" if world > 1 else "all"
    if rank == 0 or dist is None:
        if not args.quiet or counts["failed"]:
            print(f"encode-dataset ({scope}): {counts['ok']} encoded, {counts['skipped']} already done, "
                  f"{counts['failed']} failed" + (f" (reasons in {manifest})" if counts["failed"] else ""),
                  file=sys.stderr if counts["failed"] else sys.stdout)
    return 0


# --- shards ------------------------------------------------------------------------------------------
def video_clips(src, size, frames: int, stride: int, crop: bool = False) -> list:
    """[(first frame, uint8 (frames, H, W, 3))] of every whole clip of the video."""
    import numpy as np

    from decovae_fast.io.video import VideoReader

    clips, window, start = [], [], 0
    with VideoReader(src, size=size, crop=crop) as reader:
        for i, frame in enumerate(reader):
            window.append(frame)
            if i + 1 == start + frames:
                clips.append((start, np.stack(window[:frames])))
                window = window[stride:] if stride <= frames else []
                start += stride
            elif i + 1 <= start:  # stride > frames: frames between clips are skipped
                window = []
    return clips


def _journal_state(journal: Path) -> dict:
    state = {"shard": 0, "video": 0, "clip": 0, "final": False}
    if journal.exists():
        lines = [line for line in journal.read_text().splitlines() if line.strip()]
        if lines:
            last = json.loads(lines[-1])
            state.update(shard=last["shard"] + 1, video=last["next_video"], clip=last["next_clip"],
                         final=last.get("final", False))
    return state


def run_shards(args, mine, out, manifest, rank, world, device, size, dist) -> int:
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from decovae_fast.cli.codec import check_finite
    from decovae_fast.io.shards import build_index, shard_name, write_shard
    from decovae_fast.io.video import frames_to_tensor

    if args.shard_clips < 1 or (args.batch or 1) < 1:
        raise UserError("--shard-clips and --batch must be at least 1")
    dtype = compute_dtype(args.dtype, device)
    model = load_model(args.weights, device, dtype)
    layout = model.pack_layout()
    frames = args.clip_frames or 2 * model.config.keyframe_interval
    stride = args.clip_stride or frames
    if frames < 1 or stride < 1:
        raise UserError("--clip-frames and --clip-stride must be at least 1")
    if args.normalize and model.config.latents_mean is None:
        raise UserError("--normalize: the model has no latents_mean / latents_std (`decovae latent-stats`)")
    journal = out / f"progress-r{rank:03d}.jsonl"
    state = _journal_state(journal)
    for p in out.glob(f".shard-r{rank:03d}-*.partial-*"):  # what a killed run left half-written
        p.unlink(missing_ok=True)
    meta = {"clip_frames": frames, "normalized": bool(args.normalize), "config_hash": model.config_hash(),
            "layout": json.dumps(dataclasses.asdict(layout))}
    counts = {"clips": 0, "failed": 0, "shards": 0, "decode_s": 0.0, "encode_s": 0.0}
    buffer, k = [], state["shard"]

    def commit(next_video, next_clip, final=False):
        nonlocal buffer, k
        if buffer:
            write_shard(out / shard_name(rank, k), torch.stack([z for z, _ in buffer]), [src for _, src in buffer],
                        dict(meta, height=buffer[0][0].shape[-2] * layout.cell, width=buffer[0][0].shape[-1] * layout.cell))
            counts["shards"] += 1
        append_line(journal, {"shard": k if buffer else k - 1, "clips": len(buffer), "next_video": next_video,
                              "next_clip": next_clip, "final": final})
        if buffer:
            k += 1
        buffer = []

    def fail(vi, reason):
        counts["failed"] += 1
        append_line(manifest, {"input": str(mine[vi]), "rank": rank, "status": "failed", "reason": reason})

    def decode(vi):
        start = time.perf_counter()
        try:
            return vi, video_clips(mine[vi], size, frames, stride, args.crop), None, time.perf_counter() - start
        except UserError as exc:
            return vi, [], str(exc), time.perf_counter() - start

    bar = progress(args, len(mine) - state["video"], f"encode-dataset rank {rank}/{world}")
    bar.unit = "video"
    with ThreadPoolExecutor(1) as pool:  # decodes the next video while this one is encoded
        pending = pool.submit(decode, state["video"]) if not state["final"] and state["video"] < len(mine) else None
        while pending is not None:
            vi, clips, error, seconds = pending.result()
            counts["decode_s"] += seconds
            pending = pool.submit(decode, vi + 1) if vi + 1 < len(mine) else None
            if error is not None:
                fail(vi, error)
            first = state["clip"] if vi == state["video"] else 0
            start = time.perf_counter()
            # batches aligned to the video's first clip whatever the resume point, so a resumed run
            # encodes every clip in the same batch as an uninterrupted one (same bits)
            encoded = []
            try:  # a video's clips go to the shards all or none
                for b in range(first - first % args.batch, len(clips), args.batch):
                    group = clips[b:b + args.batch]
                    video = torch.cat([frames_to_tensor(c, device, dtype) for _, c in group])
                    with torch.no_grad():
                        packed = model.encode(video, fixed_gops=True).pack(layout)
                        if args.normalize:
                            packed = model.normalize(packed)
                    check_finite(packed, mine[vi], "latent")
                    encoded += [(b + j, z, s0) for j, (z, (s0, _)) in enumerate(zip(packed.float().cpu(), group))]
            except UserError as exc:
                error, encoded = str(exc), []
                fail(vi, error)
            for ci, z, s0 in encoded:
                if ci < first:
                    continue
                buffer.append((z, [str(mine[vi]), s0]))
                counts["clips"] += 1
                if len(buffer) == args.shard_clips:
                    nxt = ci + 1
                    commit(vi if nxt < len(clips) else vi + 1, nxt if nxt < len(clips) else 0)
            counts["encode_s"] += time.perf_counter() - start
            if error is None:
                append_line(manifest, {"input": str(mine[vi]), "rank": rank, "status": "ok", "clips": len(clips) - first})
            bar.update(1)
    if not state["final"]:
        commit(len(mine), 0, final=True)
    bar.close()
    if dist is not None:
        dist.barrier()
    build_index(out)  # every rank: the last to finish lists every shard
    if dist is not None:
        dist.destroy_process_group()
    if not args.quiet or counts["failed"]:
        share = counts["decode_s"] / max(1e-9, counts["decode_s"] + counts["encode_s"])
        print(f"encode-dataset rank {rank}/{world}: {counts['clips']} clips into {counts['shards']} shards, "
              f"{counts['failed']} videos failed; decoding video {100 * share:.0f}% of the time",
              file=sys.stderr if counts["failed"] else sys.stdout)
    return 0
