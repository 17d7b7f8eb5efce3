"""`decovae latent-stats VIDEO|DIR... -o STATS.json`: per-channel mean and std of the packed latent
(DeCoLatent.pack, fixed GOPs) over videos, for the model's normalize / denormalize. With
--write-config they are also stored as latents_mean / latents_std in the --weights folder's
config.json (as diffusers' Wan VAE keeps its statistics in its config)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from decovae_fast.cli.flags import device_and_dtype, load_model, model_flags, video_flags
from decovae_fast.errors import UserError
from decovae_fast.io.outputs import check_writable, write_text


def add_parser(sub) -> None:
    p = sub.add_parser("latent-stats", help="per-channel statistics of the packed latent over videos")
    p.add_argument("inputs", nargs="+", metavar="VIDEO|DIR", help="videos, or folders searched for videos")
    p.add_argument("-o", "--output", required=True, metavar="STATS.json", help="the statistics (JSON)")
    p.add_argument("--write-config", action="store_true",
                   help="also store them in the config.json of the --weights folder")
    video_flags(p)
    model_flags(p)
    p.set_defaults(run=run)


def _videos(inputs) -> list[Path]:
    from decovae_fast.io.video import find_videos

    paths = []
    for name in inputs:
        p = Path(name)
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
        paths += find_videos(p) if p.is_dir() else [p]
    if not paths:
        raise UserError("no video files among the inputs")
    return paths


def run(args) -> int:
    import torch

    from decovae_fast.cli.codec import frame_chunks
    from decovae_fast.io.video import VideoReader, parse_size
    from decovae_fast.models import DeCoLatent
    from decovae_fast.models.latent import ChannelStats
    from decovae_fast.models.pretrained import CONFIG_NAME

    if args.write_config and not args.weights:
        raise UserError("--write-config needs --weights DIR (the folder whose config.json gets the statistics)")
    size = parse_size(args.size)
    check_writable(args.output)
    paths = _videos(args.inputs)
    device, dtype = device_and_dtype(args)
    model = load_model(args.weights, device, dtype)
    layout = model.pack_layout()
    stats = ChannelStats(layout.channels)
    for path in paths:
        with VideoReader(path, size=size, max_frames=args.frames) as reader, torch.no_grad():
            chunks = frame_chunks(reader, args.chunk_frames or model.config.keyframe_interval, device, dtype)
            latent = DeCoLatent.concat(list(model.encode_stream(chunks, fixed_gops=True)))
        stats.update(latent.pack(layout), layout.valid(latent.frames))
    try:
        mean, std = stats.result()
    except ValueError as exc:
        raise UserError(f"{exc} (more or longer videos needed)") from None
    result = {"latents_mean": mean, "latents_std": std, "videos": [str(p) for p in paths],
              "values_per_channel": int(stats.n.min()), "config_hash": model.config_hash()}
    write_text(args.output, json.dumps(result, indent=1) + "\n")
    if args.write_config:
        config = dataclasses.replace(model.config, latents_mean=tuple(mean), latents_std=tuple(std))
        write_text(Path(args.weights) / CONFIG_NAME, config.to_json() + "\n")
    if not args.quiet:
        print(f"wrote {args.output}: {layout.channels} channels over {len(paths)} videos "
              f"({int(stats.n.min())} values each)" + (f"; stored in {args.weights}/{CONFIG_NAME}"
                                                     if args.write_config else ""))
    return 0
