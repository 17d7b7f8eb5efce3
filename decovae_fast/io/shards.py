"""Latent shards for training a generator: safetensors files of N packed latents each, written by
`decovae encode-dataset --shard-clips N`, read by LatentDataset (map-style) and
LatentIterableDataset (streamed, split over DataLoader workers and torch.distributed ranks).

A shard `shard-r<rank>-<k>.safetensors` holds one tensor `latents` (n, C, G, h, w) and string
metadata: `sources` (JSON list of [video, first frame] per clip), `clip_frames`, `height`,
`width`, `normalized`, `config_hash`. Shards are written whole under a temporary name and renamed
(io/outputs.atomic_output), so a shard that exists is complete. `index.json` lists every shard of
the folder with its clip count (build_index; LatentDataset rebuilds it from the shard headers
when it is missing).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from decovae_fast.io.outputs import save_safetensors, write_text

SHARD_GLOB = "shard-r*-*.safetensors"
INDEX_NAME = "index.json"


def shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank:03d}-{k:06d}.safetensors"


def write_shard(path, latents: torch.Tensor, sources: list, meta: dict) -> None:
    metadata = {k: str(v) for k, v in meta.items()}
    metadata["sources"] = json.dumps(sources)
    save_safetensors(path, {"latents": latents.contiguous().cpu()}, metadata)


def read_header(path) -> dict:
    """A shard's metadata (sources parsed) and its clip count, without reading the latents."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        n = f.get_slice("latents").get_shape()[0]
    meta["sources"] = json.loads(meta.get("sources", "[]"))
    meta["clips"] = int(n)
    return meta


def build_index(folder) -> dict:
    """Writes FOLDER/index.json: every complete shard (sorted) with its clip count and sources."""
    folder = Path(folder)
    shards = []
    for p in sorted(folder.glob(SHARD_GLOB)):
        h = read_header(p)
        shards.append({"file": p.name, "clips": h["clips"], "sources": h["sources"]})
    index = {"shards": shards, "clips": sum(s["clips"] for s in shards)}
    write_text(folder / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return index


def _index(folder) -> dict:
    path = Path(folder) / INDEX_NAME
    if path.exists():
        return json.loads(path.read_text())
    return {"shards": [{"file": p.name, "clips": read_header(p)["clips"]} for p in sorted(Path(folder).glob(SHARD_GLOB))]}


class LatentDataset(torch.utils.data.Dataset):
    """Map-style: item i is the i-th clip over the folder's shards in index order, a dict
    {"latent": (C, G, h, w), "source": video, "start": first frame}. Reads one clip at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.shards = _index(self.folder)["shards"]
        self._starts = []
        total = 0
        for s in self.shards:
            self._starts.append(total)
            total += s["clips"]
        self._len = total
        self._sources = {}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        from bisect import bisect_right

        from safetensors import safe_open

        if not -self._len <= i < self._len:
            raise IndexError(i)
        i %= self._len
        k = bisect_right(self._starts, i) - 1
        path = self.folder / self.shards[k]["file"]
        with safe_open(str(path), framework="pt") as f:
            latent = f.get_slice("latents")[i - self._starts[k]]
            if k not in self._sources:
                self._sources[k] = json.loads((f.metadata() or {}).get("sources", "[]"))
        video, start = self._sources[k][i - self._starts[k]]
        return {"latent": latent, "source": video, "start": start}


class LatentIterableDataset(torch.utils.data.IterableDataset):
    """Streams whole shards: shard j goes to the (rank, worker) pair j % (ranks * workers), with
    rank and world from torch.distributed when it is initialised, so under DDP and with DataLoader
    workers every clip is read once per epoch. Items as LatentDataset's."""

    def __init__(self, folder, rank: int | None = None, world_size: int | None = None):
        self.folder = Path(folder)
        self.shards = _index(self.folder)["shards"]
        self.rank, self.world_size = rank, world_size

    def _place(self) -> tuple[int, int]:
        import torch.distributed as dist

        rank, world = self.rank, self.world_size
        if rank is None:
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def __iter__(self):
        from safetensors import safe_open

        me, of = self._place()
        for s in self.shards[me::of]:
            with safe_open(str(self.folder / s["file"]), framework="pt") as f:
                latents = f.get_tensor("latents")
                sources = json.loads((f.metadata() or {}).get("sources", "[]"))
            for latent, (video, start) in zip(latents, sources):
                yield {"latent": latent, "source": video, "start": start}
