"""Video files in and out with PyAV, streamed: frames are decoded as the encoder asks for them and
encoded as the decoder produces them, so a long video never sits in memory whole.

Frames travel as uint8 RGB arrays (t, H, W, 3); the model sees float tensors (B, 3, t, H, W) in
[-1, 1]. `av` is imported inside the functions so that the package imports without PyAV.
Every problem with a user's file is raised as UserError naming the file.
"""
from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from decovae_fast.errors import UserError

MAX_SIDE = 16384  # beyond this the scaler and the H.264 encoder refuse the frame anyway
DEFAULT_FPS = Fraction(25)  # for streams that declare no rate at all
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                    ".y4m"}


def find_videos(folder) -> list[Path]:
    """Video files under `folder` (recursive, sorted by path). Hidden files are skipped: they are
    the partial outputs of a write in progress (io.outputs.temporary_name)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                  and not p.name.startswith("."))


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'HxW' -> (H, W); None -> None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 64x64")
    h, w = int(m.group(1)), int(m.group(2))
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise UserError(f"--size {text!r}: height and width must be between 1 and {MAX_SIDE}")
    return h, w


def check_input_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: not readable")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    return path


def _describe(exc: Exception) -> str:
    """FFmpeg's message without the errno prefix and the repeated file name."""
    text = getattr(exc, "strerror", None) or str(exc)
    return text.rstrip(".")


class VideoReader:
    """Decodes the first video stream of `path` frame by frame, optionally resized to `size`
    (H, W) and limited to `max_frames`. With crop=True the frame is scaled (aspect kept) to cover
    `size` and centre-cropped to it instead of stretched. Use as a context manager or call close()."""

    def __init__(self, path, size: tuple[int, int] | None = None, max_frames: int | None = None,
                 crop: bool = False):
        import av

        self.path = check_input_file(path)
        if max_frames is not None and max_frames < 1:
            raise UserError(f"--frames {max_frames}: must be at least 1")
        self.max_frames = max_frames
        try:
            self._container = av.open(str(self.path), mode="r")
        except av.FFmpegError as exc:
            raise UserError(f"{self.path}: not a readable video ({_describe(exc)})") from None
        except UnicodeDecodeError:  # PyAV decodes the container's metadata as UTF-8 (found by tests/io/test_fuzz.py)
            raise UserError(f"{self.path}: not a readable video (its header holds text that is not UTF-8)") from None
        if not self._container.streams.video:
            self._container.close()
            raise UserError(f"{self.path}: contains no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        cc = self._stream.codec_context
        if cc is None:  # a stream whose codec FFmpeg could not open (found by tests/io/test_fuzz.py)
            self._container.close()
            raise UserError(f"{self.path}: video stream has no decodable codec (truncated or corrupt)")
        self.source_height, self.source_width = cc.height, cc.width
        if self.source_height <= 0 or self.source_width <= 0:
            self._container.close()
            raise UserError(f"{self.path}: video stream has no frame size")
        self.height, self.width = size or (self.source_height, self.source_width)
        self._scaled = (self.height, self.width)  # what the decoder resizes to, before any crop
        if crop and size is not None:
            scale = max(self.height / self.source_height, self.width / self.source_width)
            self._scaled = (max(self.height, round(self.source_height * scale)),
                            max(self.width, round(self.source_width * scale)))
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.fps = Fraction(rate) if rate and rate > 0 else DEFAULT_FPS
        self.declared_frames = int(self._stream.frames or 0)  # 0 when the container does not say
        self.frames_read = 0

    @property
    def frames_hint(self) -> int | None:
        """Expected number of frames (for progress bars), None when unknown."""
        n = self.declared_frames or None
        if self.max_frames is not None:
            n = min(n, self.max_frames) if n else self.max_frames
        return n

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yields uint8 (H, W, 3) RGB frames."""
        import av

        (sh, sw), (h, w) = self._scaled, (self.height, self.width)
        resize = (sh, sw) != (self.source_height, self.source_width)
        top, left = (sh - h) // 2, (sw - w) // 2
        try:
            for frame in self._container.decode(self._stream):
                if self.max_frames is not None and self.frames_read >= self.max_frames:
                    return
                if resize:
                    # AREA averages when shrinking (no aliasing) and is bilinear when enlarging.
                    arr = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation="AREA")
                else:
                    arr = frame.to_ndarray(format="rgb24")
                if (sh, sw) != (h, w):
                    arr = np.ascontiguousarray(arr[top:top + h, left:left + w])
                self.frames_read += 1
                yield arr
        except (av.FFmpegError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path}: cannot decode frame {self.frames_read} "
                            f"(truncated or corrupt: {_describe(exc)})") from None
        if self.frames_read == 0:
            raise UserError(f"{self.path}: contains no decodable frames")
        limit_reached = self.max_frames is not None and self.frames_read >= self.max_frames
        if not limit_reached and self.frames_read < self.declared_frames:
            raise UserError(f"{self.path}: truncated: the container declares {self.declared_frames} "
                            f"frames but only {self.frames_read} could be decoded")

    def chunks(self, chunk_frames: int) -> Iterator[np.ndarray]:
        """Yields uint8 (t, H, W, 3) arrays of up to `chunk_frames` frames."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        buf = []
        for frame in self:
            buf.append(frame)
            if len(buf) == chunk_frames:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    def close(self) -> None:
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoWriter:
    """Encodes uint8 (t, H, W, 3) RGB frames to `path` (format from its extension) at `fps`.

    Default codec: H.264 in 4:4:4 (odd sizes allowed, no chroma subsampling blurring the colour of
    small frames) at CRF 10, visually lossless, so the file shows the model's error, not the codec's.
    """

    def __init__(self, path, fps: Fraction, height: int, width: int, crf: int = 10,
                 codec: str = "libx264", pix_fmt: str = "yuv444p", display_name=None):
        import av

        self.path = Path(path)
        name = display_name or self.path
        try:
            self._container = av.open(str(self.path), mode="w")
        except (av.FFmpegError, ValueError) as exc:
            raise UserError(f"{name}: cannot create a video file here ({_describe(exc)}); "
                            f"use an extension such as .mp4 or .mkv") from None
        try:
            self._stream = self._container.add_stream(codec, rate=Fraction(fps))
            self._stream.height, self._stream.width = height, width
            self._stream.pix_fmt = pix_fmt
            if codec == "libx264":
                self._stream.options = {"crf": str(crf), "preset": "medium"}
        except (av.FFmpegError, ValueError) as exc:
            self._container.close()
            raise UserError(f"{name}: the container cannot hold {codec} video ({_describe(exc)})") from None
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        if frames.ndim == 3:
            frames = frames[None]
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        """Flushes the encoder and finishes the file."""
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # the caller discards the file: just release it
            self._container.close()


def read_video(path, size=None, max_frames=None) -> tuple[np.ndarray, Fraction]:
    """Whole video as uint8 (T, H, W, 3) plus its fps. For tests and short clips only."""
    with VideoReader(path, size=size, max_frames=max_frames) as reader:
        frames = np.stack(list(reader))
        return frames, reader.fps


def frames_to_tensor(frames: np.ndarray, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """uint8 (t, H, W, 3) -> float (1, 3, t, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    x = x.permute(3, 0, 1, 2).unsqueeze(0).to(torch.float32)
    return (x / 127.5 - 1.0).to(dtype).contiguous()  # contiguous: kernels take strided input slowly


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (1, 3, t, H, W) in [-1, 1] -> uint8 (t, H, W, 3) (values outside are clipped)."""
    if video.dim() != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"video must have shape (1, 3, T, H, W), got {tuple(video.shape)}")
    x = ((video[0].detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
