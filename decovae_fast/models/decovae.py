"""DeCoVAE: keyframe + motion + residual video VAE with a shared causal decoder.

Per GOP (see config.py for the temporal layout): the keyframe x0 is encoded by a 2-D encoder; the
motion estimator M gives m_t = [u, v, s] for every inner frame; the residual r_t = x_t - W(x0, m_t)
(ops.warp_residual on ops.gaussian_volume(x0)); motion and residual are encoded by causal 3-D
encoders (4x in time). The decoder trunk decodes the keyframe, then motion and residual of the inner
frames, and recouples them: x_t = warp_add(gaussian_volume(decoded x0), motion, residual).
Streaming keeps one StreamCache per encoder (and per tile) for the GOP in progress, so memory is
bounded by one GOP whatever the video length, and any chunking gives the whole-video result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from decovae_fast import ops
from decovae_fast._memory import release_freed_memory
from decovae_fast.models.base import FrameGroups, VAEOutput, VideoVAEBase, check_chunk, check_video, split_gops
from decovae_fast.models.config import DeCoVAEConfig
from decovae_fast.models.decoder import DecoderTrunk
from decovae_fast.models.encoders import keyframe_encoder, motion_encoder, residual_encoder
from decovae_fast.models.latent import DeCoLatent, DiagonalGaussian
from decovae_fast.models.layers import StreamCache, replicate_pad
from decovae_fast.models.motion import ClassicalMotion, MotionEstimator
from decovae_fast.models.patch_linear import PatchLinear


@dataclass
class _Gop:
    """Encoder state of the GOP in progress."""
    start: int
    keyframe: torch.Tensor          # (B, 3, 1, H, W) padded
    volume: torch.Tensor            # (B, 3, L+1, H, W)
    kf_moments: torch.Tensor | None
    tiles: list | None = None       # the frame's tiles (enable_tiling), or None
    n: int = 1                      # frames so far, keyframe included
    caches: dict = field(default_factory=dict)   # {(encoder name, tile index): StreamCache}
    groups: FrameGroups = field(default_factory=FrameGroups)  # (motion, residual) not yet encoded
    motion_moments: list = field(default_factory=list)
    residual_moments: list = field(default_factory=list)
    targets: list = field(default_factory=list)  # [(motion, residual)] of every inner frame, if kept


class DeCoVAE(VideoVAEBase):
    config_class = DeCoVAEConfig

    def __init__(self, config: DeCoVAEConfig | None = None):
        config = DeCoVAEConfig.tiny() if config is None else config
        super().__init__(config)
        c = config
        self.motion_estimator = (MotionEstimator(c.motion_estimator_channels, c.volume_levels)
                                 if c.motion_source == "learned" else ClassicalMotion(c.motion_source))
        self.keyframe_encoder = keyframe_encoder(c)
        self.motion_encoder = motion_encoder(c)
        self.residual_encoder = residual_encoder(c)
        self.decoder = DecoderTrunk(c.keyframe_channels, c.motion_channels + c.residual_channels,
                                    c.keyframe_channels, 6, c.decoder_channels, c.decoder_blocks)
        lin = c.linear_paths
        self.keyframe_linear = PatchLinear(c.keyframe_channels) if lin else None
        self.motion_linear = PatchLinear(c.motion_channels, channels=2, patch=16, frames=4) if lin else None
        self.residual_linear = PatchLinear(c.residual_channels, frames=4) if lin else None
        if lin:
            self._zero_learned_outputs()

    @torch.no_grad()
    def _zero_learned_outputs(self) -> None:
        """With the linear paths, the learned paths start at zero: the latent means and the decoded
        keyframe, (u, v) and residual are the linear codes'; s starts at the sharpest level
        (s = L * sigmoid(-6) ~ 0), which is where DIS motion puts it."""
        for enc in (self.keyframe_encoder, self.motion_encoder, self.residual_encoder):
            half = enc.head.weight.shape[0] // 2
            enc.head.weight[:half].zero_()
            enc.head.bias[:half].zero_()
        for conv in (self.decoder.first_head, self.decoder.rest_head):
            conv.weight.zero_()
            conv.bias.zero_()
        # rest_head's channels are (u, v, s, r, g, b) x 4 sub-pixels (depth_to_space order)
        self.decoder.rest_head.bias[8:12] = -6.0

    @staticmethod
    def _plus_mean(moments, linear):
        mean, logvar = moments.chunk(2, dim=1)
        return torch.cat([mean + linear, logvar], 1)

    def _keyframe_moments(self, kf):
        moments = self.keyframe_encoder(kf)
        return moments if self.keyframe_linear is None else self._plus_mean(moments, self.keyframe_linear.encode(kf))

    def _keyframe_image(self, z, cache):
        img = self.decoder.forward_first(z, cache)
        return img if self.keyframe_linear is None else img + self.keyframe_linear.decode(z)

    # --- encode side -----------------------------------------------------------------------------
    def _estimate_motion(self, frames, keyframe, tiles):
        return self._tiled(lambda f, k, i: self.motion_estimator(f, k[:, :, 0]),
                           [(frames, 1), (keyframe, 1)], 1, tiles)

    def _start_gop(self, frame, start, tiles, encode=True) -> _Gop:
        kf = frame.unsqueeze(2)
        volume = ops.gaussian_volume(frame, self.config.volume_levels, self.config.volume_sigma0)
        moments = self._tiled(lambda x, i: self._keyframe_moments(x), [(kf, 1)], 8, tiles) if encode else None
        return _Gop(start, kf, volume, moments, tiles=tiles)

    def _encode_inner(self, gop: _Gop, motion, residual, tiles):
        c = self.config
        norm = motion.new_tensor([1 / c.motion_scale, 1 / c.motion_scale, 1 / max(c.volume_levels, 1)])
        m_in = (motion * norm.view(1, 3, 1, 1, 1)).to(residual.dtype)

        def enc(name, encoder):
            return lambda x, i: encoder(x, gop.caches.setdefault((name, i), StreamCache()))

        mm = self._tiled(enc("motion", self.motion_encoder), [(m_in, 1)], 16, tiles)
        rm = self._tiled(enc("residual", self.residual_encoder), [(residual, 1)], 8, tiles)
        if self.motion_linear is not None:  # patch-local, so applied to the whole frame outside the tiles
            mm = self._plus_mean(mm, self.motion_linear.encode(m_in[:, :2]))
            rm = self._plus_mean(rm, self.residual_linear.encode(residual))
        gop.motion_moments.append(mm)
        gop.residual_moments.append(rm)

    def _push(self, gop: _Gop, motion, residual, tiles, encode: bool, keep: bool):
        gop.n += motion.shape[2]
        if keep:
            gop.targets.append((motion, residual))
        if not encode or motion.shape[2] == 0:
            return
        ready = gop.groups.push(motion, residual)
        if ready:
            self._encode_inner(gop, *ready, tiles)

    def _finish(self, gop: _Gop, H, W, encode: bool):
        rest = gop.groups.flush()  # the last inner frames, padded to a whole group
        if encode and rest:
            self._encode_inner(gop, *rest, gop.tiles)
        if not encode:
            return None
        B, _, _, h, w = gop.kf_moments.shape
        empty_m = gop.kf_moments.new_zeros(B, 2 * self.config.motion_channels, 0, h // 2, w // 2)
        empty_r = gop.kf_moments.new_zeros(B, 2 * self.config.residual_channels, 0, h, w)
        mm = torch.cat([empty_m] + gop.motion_moments, 2)
        rm = torch.cat([empty_r] + gop.residual_moments, 2)
        return DeCoLatent(DiagonalGaussian.from_moments(gop.kf_moments), DiagonalGaussian.from_moments(mm),
                          DiagonalGaussian.from_moments(rm), [0], gop.n, H, W,
                          info={"config_hash": self.config_hash()})

    def _first_cut(self, residual, H, W, gop_frames: int, start: int, shared: bool = False):
        """Index of the first frame of residual (frames start, start+1, ...) whose warp fails, where
        a new GOP may start, or None. The GOP so far has gop_frames frames; it must reach
        config.min_gop() first. Decided per clip, so a clip's latent does not depend on what it is
        batched with; a batch shares one GOP structure, so clips that cut at different frames are
        an error rather than one clip's cut silently re-cutting the others. shared (training's
        forward): the first frame where any clip cuts cuts them all."""
        thr = self.config.scene_cut_threshold
        if thr is None or residual.shape[2] == 0:
            return None
        with torch.no_grad():
            # fp64 sums: the rounding of any reduction order (threads, batch size) is ~1e-16 of the
            # energy, so the order cannot flip a decision
            energy = residual[..., :H, :W].double().pow(2).mean(dim=(1, 3, 4))  # (B, t)
            energy[:, :max(0, self.config.min_gop() - gop_frames)] = 0  # too early for a keyframe
            over = energy > thr  # argmax gives the first True; -1 where none (one device sync)
            first = torch.where(over.any(1), over.int().argmax(1), -1).tolist()
        cuts = [None if f < 0 else f for f in first]
        if shared and any(c is not None for c in cuts):
            return min(c for c in cuts if c is not None)
        if len(set(cuts)) > 1:
            where = ", ".join(f"clip {b}: {'none' if c is None else start + c}" for b, c in enumerate(cuts))
            raise ValueError(f"the clips of this batch change scene at different frames ({where}); a batch "
                             f"shares one GOP structure: encode them one at a time, or with fixed_gops=True")
        return cuts[0]

    def _gops(self, chunks, encode: bool = True, keep: bool = False, fixed_gops: bool = False,
              shared_cuts: bool = False):
        """Yield (piece or None, gop) for every GOP of the chunk stream; fixed_gops: a GOP every
        keyframe_interval frames, no adaptive cut; shared_cuts: see _first_cut."""
        gop, seen, size = None, 0, None
        for chunk in chunks:
            size = check_chunk(chunk, size)
            B, H, W = size
            x = replicate_pad(chunk.to(self.dtype), 16)
            tiles = self._tiles(x.shape[3], x.shape[4])
            i, t = 0, x.shape[2]
            while i < t:
                if gop is None:
                    gop = self._start_gop(x[:, :, i], seen + i, tiles, encode)
                    i += 1
                    continue
                room = self.config.keyframe_interval - gop.n
                if room == 0:
                    yield self._finish(gop, H, W, encode), gop
                    gop = None
                    continue
                seg = x[:, :, i:i + room]
                motion = self._estimate_motion(seg, gop.keyframe, tiles)
                residual = ops.warp_residual(gop.volume, motion, seg)
                cut = None if fixed_gops else self._first_cut(residual, H, W, gop.n, seen + i, shared_cuts)
                if cut is not None:
                    motion, residual = motion[:, :, :cut], residual[:, :, :cut]
                self._push(gop, motion, residual, tiles, encode, keep)
                i += motion.shape[2]
                if cut is not None:
                    yield self._finish(gop, H, W, encode), gop
                    gop = None
            seen += t
        if gop is None:
            raise ValueError("no frames to encode")
        yield self._finish(gop, H, W, encode), gop

    def encode_stream(self, chunks, on_gop=None, fixed_gops: bool = False):
        """Yield one DeCoLatent piece per finished GOP from an iterable of (B, 3, t, H, W) chunks.
        fixed_gops: a GOP every keyframe_interval frames (no adaptive cut), as pack() needs.

        on_gop, if given, is called with each GOP's decomposition as the encoder computed it, before
        its piece is yielded: {"start", "keyframe" (B,3,1,H,W), "motion" (B,3,n-1,H,W), "residual"}
        (the inner frames; one GOP is held at a time)."""
        for piece, gop in self._gops(chunks, keep=on_gop is not None, fixed_gops=fixed_gops):
            if on_gop is not None:
                on_gop(self._gop_parts(gop, piece.height, piece.width))
            release_freed_memory()
            yield piece

    @staticmethod
    def _gop_parts(gop: _Gop, H: int, W: int) -> dict:
        kf = gop.keyframe[..., :H, :W]
        motion = [kf.new_zeros(kf.shape[0], 3, 0, H, W, dtype=torch.float32)] + [m[..., :H, :W] for m, _ in gop.targets]
        residual = [kf[:, :, :0]] + [r[..., :H, :W] for _, r in gop.targets]
        return {"start": gop.start, "keyframe": kf, "motion": torch.cat(motion, 2), "residual": torch.cat(residual, 2)}

    # --- decode side -----------------------------------------------------------------------------
    def _check_latent(self, latent: DeCoLatent) -> None:
        c = self.config
        for name, ch in (("keyframe", c.keyframe_channels), ("motion", c.motion_channels),
                         ("residual", c.residual_channels)):
            g = getattr(latent, name)
            if g is None:
                raise ValueError(f"DeCoVAE latent needs a {name} part")
            if g.mean.dim() != 5 or g.mean.shape[1] != ch:
                raise ValueError(f"latent {name} must have shape (B, {ch}, T, h, w), got {tuple(g.mean.shape)}")
        if latent.keyframe.mean.shape[2] != len(latent.gop_starts):
            raise ValueError(f"latent has {latent.keyframe.mean.shape[2]} keyframes but {len(latent.gop_starts)} GOPs")
        if latent.motion.mean.shape[2] != sum(latent.inner_steps()):
            raise ValueError(f"latent motion has {latent.motion.mean.shape[2]} frames, GOPs need {sum(latent.inner_steps())}")
        h, w = -(-latent.height // 16) * 2, -(-latent.width // 16) * 2
        if latent.keyframe.mean.shape[3:] != (h, w):
            raise ValueError(f"latent keyframe size {tuple(latent.keyframe.mean.shape[3:])} does not match "
                             f"{latent.height}x{latent.width} frames (expected {(h, w)})")

    def _decode_gop(self, n, kf_z, m_z, r_z, steps, height, width):
        """Yield dicts (frames, motion, residual, keyframe?) for the n frames of one GOP."""
        c = self.config
        dt = self.dtype
        kf_z, m_z, r_z = kf_z.to(dt), m_z.to(dt), r_z.to(dt)
        tiles = self._tiles(kf_z.shape[3] * 8, kf_z.shape[4] * 8)
        caches = {}

        def first(z, i):
            return self._keyframe_image(z, caches.setdefault(i, StreamCache()))

        def rest(m, r, ctx, i):
            m = F.interpolate(m, scale_factor=(1, 2, 2), mode="nearest")
            return self.decoder.forward_rest(torch.cat([m, r], 1), ctx, caches.setdefault(i, StreamCache()))

        kf_img = self._tiled(first, [(kf_z, 8)], 1, tiles)
        zeros = torch.zeros_like(kf_img)
        yield {"frames": kf_img, "keyframe": kf_img, "motion": zeros.float(), "residual": zeros}
        if n == 1:
            return
        volume = ops.gaussian_volume(kf_img[:, :, 0], c.volume_levels, c.volume_sigma0)
        k = m_z.shape[2]
        steps = steps or max(k, 1)
        left = n - 1
        for s in range(0, k, steps):
            m_s, r_s = m_z[:, :, s:s + steps], r_z[:, :, s:s + steps]
            out = self._tiled(rest, [(m_s, 16), (r_s, 8), (kf_z, 8)], 1, tiles)
            if self.motion_linear is not None:
                uv, rgb = self.motion_linear.decode(m_s), self.residual_linear.decode(r_s)
                out = out + torch.cat([uv, torch.zeros_like(uv[:, :1]), rgb], 1).to(out.dtype)
            out = out[:, :, :left]
            out32 = out[:, :3].float()
            motion = torch.cat([out32[:, :2] * c.motion_scale, c.volume_levels * torch.sigmoid(out32[:, 2:3])], 1)
            residual = out[:, 3:]
            frames = ops.warp_add(volume, motion, residual)
            left -= out.shape[2]
            yield {"frames": frames, "motion": motion, "residual": residual}

    # --- training and inspection -----------------------------------------------------------------
    def forward(self, video: torch.Tensor, sample_posterior: bool = False, generator=None) -> VAEOutput:
        """Encode + decode with gradients. parts: decoded keyframe (B,3,G,H,W), motion and residual
        (B,3,T,H,W; zero at keyframes), and their targets target_keyframe, target_motion, target_residual."""
        check_video(video)
        B, _, T, H, W = video.shape
        pieces, targets, keyframes = [], [], []
        # a training batch shares one GOP structure: any clip's scene cut cuts them all
        for piece, gop in self._gops([video], keep=True, shared_cuts=True):
            pieces.append(piece)
            keyframes.append(gop.keyframe)
            zero = torch.zeros_like(gop.keyframe)
            targets.append((zero.float(), zero))
            targets.extend(gop.targets)
        latent = DeCoLatent.concat(pieces)
        pick = (lambda g: g.sample(generator)) if sample_posterior else (lambda g: g.mode())
        outs = []
        for n, kf, mo, re in split_gops(latent):
            outs.extend(self._decode_gop(n, pick(kf), pick(mo), pick(re), None, H, W))

        def cat(items):
            return torch.cat(items, 2)[..., :H, :W]

        parts = {"keyframe": cat([o["keyframe"] for o in outs if "keyframe" in o]),
                 "motion": cat([o["motion"] for o in outs]),
                 "residual": cat([o["residual"] for o in outs]),
                 "target_keyframe": cat(keyframes),
                 "target_motion": cat([t[0] for t in targets]),
                 "target_residual": cat([t[1] for t in targets])}
        return VAEOutput(cat([o["frames"] for o in outs]), latent, parts)

    @torch.no_grad()
    def decode_parts(self, latent: DeCoLatent) -> dict:
        """Decodes a latent (posterior means) and keeps its parts: frames (B,3,T,H,W), keyframes
        (B,3,G,H,W, the decoded keyframe images), motion (B,3,T,H,W, fp32, zero at keyframes) and
        residual (zero at keyframes), cropped to the latent's frame size."""
        self._check_latent(latent)
        outs = []
        for n, kf, mo, re in split_gops(latent):
            outs.extend(self._decode_gop(n, kf.mean, mo.mean, re.mean, None, latent.height, latent.width))

        def cat(key):
            return torch.cat([o[key] for o in outs if key in o], 2)[..., :latent.height, :latent.width]

        return {"frames": cat("frames"), "keyframes": cat("keyframe"), "motion": cat("motion"),
                "residual": cat("residual")}

    @torch.no_grad()
    def decompose(self, video: torch.Tensor, chunk_frames: int | None = None) -> dict:
        """keyframes (B,3,G,H,W), keyframe_index (list), motion (B,3,T,H,W), prediction, residual."""
        check_video(video)
        H, W = video.shape[3:]
        chunks = [video] if chunk_frames is None else video.split(chunk_frames, dim=2)
        keyframes, index, motion, residual = [], [], [], []
        for _, gop in self._gops(chunks, encode=False, keep=True):
            index.append(gop.start)
            keyframes.append(gop.keyframe)
            motion.append(torch.zeros_like(gop.keyframe, dtype=torch.float32))
            residual.append(torch.zeros_like(gop.keyframe))
            motion.extend(m for m, _ in gop.targets)
            residual.extend(r for _, r in gop.targets)
        res = torch.cat(residual, 2)[..., :H, :W]
        pred = video.to(res.dtype) - res  # the warp prediction (the warp already ran in _gops)
        for g, s in enumerate(index):  # keyframe positions: exactly the keyframe
            pred[:, :, s] = keyframes[g][:, :, 0, :H, :W]
        return {"keyframes": torch.cat(keyframes, 2)[..., :H, :W], "keyframe_index": index,
                "motion": torch.cat(motion, 2)[..., :H, :W], "prediction": pred, "residual": res}
