"""Spatial tiling for large frames (enable_tiling).

The padded frame is cut into tiles whose cores (tile_size px, the last one shorter) partition it; each
tile is computed with up to `halo` px of real context on every side and only its core is kept (no
blending is needed since the cores do not overlap). What it guarantees: the same output shape, peak
activation memory set by (tile_size + 2 * halo)^2 instead of H * W, and each streaming layer keeping
its own cache per tile. The output equals the untiled one wherever a layer's receptive field stays
within the halo; beyond that, the zero/replicate border of the tile replaces the real neighbours
(small differences near tile seams, largest for the decoder, whose receptive field is widest).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    core: tuple[int, int, int, int]  # y0, y1, x0, x1 in full-resolution pixels
    ext: tuple[int, int, int, int]   # core grown by the halo, clipped to the frame


def make_tiles(height: int, width: int, tile: int, halo: int) -> list[Tile]:
    def spans(n):
        return [(a, min(a + tile, n)) for a in range(0, n, tile)]

    return [Tile((y0, y1, x0, x1), (max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)))
            for y0, y1 in spans(height) for x0, x1 in spans(width)]


def run_tiled(fn, inputs, out_px: int, tiles: list[Tile]) -> torch.Tensor:
    """out = fn(*inputs) computed tile by tile. inputs: (tensor (..., h, w), px per element) pairs;
    fn(*crops, tile_index) returns (..., h', w') with out_px px per element. Cores are stitched."""
    out = None
    for i, t in enumerate(tiles):
        crops = []
        for x, px in inputs:
            y0, y1, x0, x1 = (v // px for v in t.ext)
            crops.append(x[..., y0:y1, x0:x1])
        y = fn(*crops, i)
        if out is None:
            H = max(tt.core[1] for tt in tiles) // out_px
            W = max(tt.core[3] for tt in tiles) // out_px
            out = y.new_empty(*y.shape[:-2], H, W)
        c0, c1, c2, c3 = (v // out_px for v in t.core)
        e0, _, e2, _ = (v // out_px for v in t.ext)
        out[..., c0:c1, c2:c3] = y[..., c0 - e0:c1 - e0, c2 - e2:c3 - e2]
    return out
