"""Stage 3 and 5 networks: the latent action model (encoder + vector quantiser + decoder = world model)
and the action -> latent model.

Why it looks like this (GUIDE §3-4):
* Frames are handled as indices into the game's small colour palette (Breakout uses < 12 colours).
  The decoder classifies every pixel over that palette instead of regressing RGB, so its output is
  always crisp and always on-palette: a 2-px ball cannot blur away, and what is fed back is exactly
  what is displayed (no drift into noise).
* The decoder predicts the *change*: the last frame's colours enter the output logits as a learned
  bias, so static pixels are copied for free and the network spends its capacity on what moves.
* All convolutions run on an 8x8 space-to-depth grid (27x20 cells for 216x160): nothing expensive
  happens at full resolution, which keeps one decoder step at a few ms on 2 CPU cores.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from vector_quantize_pytorch import VectorQuantize

import gameplay_data as gd

H, W = 210, 160
CELL = 8                      # space-to-depth factor
PAD_H = (-H) % CELL           # 210 -> 216 rows
CELLS = (H + PAD_H) // CELL * (W // CELL)   # 540 grid cells


# ----------------------------------------------------------------------------- palette
class Palette:
    """The game's colours, most frequent first; maps RGB frames <-> palette indices exactly."""

    UNSEEN = 255

    def __init__(self, colors: np.ndarray):
        self.colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        if len(self.colors) >= self.UNSEEN:
            raise ValueError(f"a palette holds at most {self.UNSEEN - 1} colours")
        self._lut = None   # 24-bit colour -> index table (16 MB), built on first use

    @staticmethod
    def _codes(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.uint32)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

    @classmethod
    def fit(cls, frames: np.ndarray, max_colors: int = 32) -> "Palette":
        codes, counts = np.unique(cls._codes(frames.reshape(-1, 3)), return_counts=True)
        keep = codes[np.argsort(-counts)][:max_colors]
        return cls(np.stack([(keep >> 16) & 255, (keep >> 8) & 255, keep & 255], 1))

    def __len__(self) -> int:
        return len(self.colors)

    def to_index(self, frames: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 RGB -> (...) uint8 indices; an unseen colour maps to the nearest palette colour.
        One table lookup per pixel: 3x faster than a sorted search, and it runs on every episode that
        training decodes."""
        if self._lut is None:
            self._lut = np.full(1 << 24, self.UNSEEN, dtype=np.uint8)
            self._lut[self._codes(self.colors)] = np.arange(len(self.colors))
        idx = self._lut[self._codes(frames)]
        unseen = idx == self.UNSEEN
        if unseen.any():
            odd = frames[unseen].astype(np.int64)
            idx[unseen] = np.abs(odd[:, None, :] - self.colors[None].astype(np.int64)).sum(-1).argmin(1)
        return idx

    def to_rgb(self, indices):
        if isinstance(indices, torch.Tensor):
            return torch.as_tensor(self.colors, device=indices.device)[indices.long()]
        return self.colors[indices]


def grid_cells(idx: torch.Tensor) -> torch.Tensor:
    """(B, k, 210, 160) -> (B, 27, 20, k*64): lossless space-to-depth onto the 8x8 grid, rows padded to 216;
    per cell, channel order (frame, pixel in cell) = torch's pixel_unshuffle order. One copy, moving each
    cell row's 8 uint8 pixels as one int64 (pixel_unshuffle did the same reshuffle ~3x slower on uint8 frames,
    session 22's VM; a byte-wise permute 1.4x slower at batch 1 and 3.5x at 32, session 23's)."""
    B, k = idx.shape[:2]
    if idx.element_size() != 1:   # the int64 trick needs one byte per pixel
        x = F.pad(idx, (0, 0, 0, PAD_H)).view(B, k, (H + PAD_H) // CELL, CELL, W // CELL, CELL)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H + PAD_H) // CELL, W // CELL, k * CELL * CELL)
    rows = F.pad(idx, (0, 0, 0, PAD_H)).view(torch.int64).view(B, k, (H + PAD_H) // CELL, CELL, W // CELL)
    return rows.permute(0, 2, 4, 1, 3).contiguous().view(idx.dtype).view(B, (H + PAD_H) // CELL, W // CELL, k * CELL * CELL)


def to_cells(img: torch.Tensor) -> torch.Tensor:
    """(B, 210, 160) -> (B, 540, 64): pad to 216 rows, then one row per 8x8 grid cell."""
    return grid_cells(img[:, None]).flatten(1, 2)


def from_cells(cells: torch.Tensor) -> torch.Tensor:
    """(B, 540, 64) -> (B, 210, 160); inverse of to_cells."""
    x = cells.reshape(cells.shape[0], (H + PAD_H) // CELL, W // CELL, CELL, CELL).permute(0, 1, 3, 2, 4)
    return x.reshape(cells.shape[0], H + PAD_H, W)[:, :H]


def change_target(last_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
    """Class targets: 0 where the pixel keeps its colour, 1 + colour where it changes."""
    return torch.where(next_idx == last_idx, 0, next_idx.long() + 1)


def apply_change(last_idx: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    return torch.where(change == 0, last_idx, (change.long() - 1).to(last_idx.dtype))


def cell_sources(last_idx: torch.Tensor, offsets: list, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B, 210, 160) palette indices, [(dy, dx), ...], grid cells (b[k], c[k]) -> (K, S, 64): for each offset d
    and pixel p of the cell, the colour the last frame has at p - d (what p shows if its neighbourhood moves
    by d); the pixel's own colour where p - d is outside the frame. Cells are chosen because at play time
    only the few that may change need it."""
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    d = torch.tensor(offsets, device=last_idx.device)
    pix = torch.arange(CELL * CELL, device=last_idx.device)
    y = ((c // (W // CELL))[:, None] * CELL + pix // CELL)[:, None] - d[None, :, :1] + reach     # (K, S, 64)
    x = ((c % (W // CELL))[:, None] * CELL + pix % CELL)[:, None] - d[None, :, 1:] + reach
    padded = F.pad(last_idx, (reach, reach, reach, reach + PAD_H), value=255)
    src = padded[b[:, None, None], y, x]
    own = to_cells(last_idx)[b, c][:, None]
    return torch.where(src == 255, own, src)


def shifts_explain(last_idx: torch.Tensor, next_cells: torch.Tensor, offsets: list, b: torch.Tensor,
                   c: torch.Tensor) -> torch.Tensor:
    """-> (K, S) bool: for grid cells (b[k], c[k]) and each offset d, whether every pixel of the cell's next
    content (next_cells (B, 540, 64)) shows the last frame's colour at p - d (the padding rows never count)."""
    inside = (c // (W // CELL) * CELL)[:, None] + torch.arange(CELL * CELL, device=c.device) // CELL < H
    return ((cell_sources(last_idx, offsets, b, c) == next_cells[b, c][:, None]) | ~inside[:, None]).all(2)


def fit_shift_offsets(last_idx: torch.Tensor, next_idx: torch.Tensor, n: int, reach: int = 12) -> list:
    """The n offsets (dy, dx) that best explain how objects move, from real transitions last -> next
    ((B, 210, 160) palette indices; colour 0, the commonest, is the background). Every grid cell where some
    pixel takes on a non-background colour is a vote, shared among the offsets d that explain the whole cell
    (each of its pixels shows the last frame's colour at p - d, as cell_sources reads it); the n offsets
    with the most votes are kept, most first."""
    cands = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if (dy, dx) != (0, 0)]
    last_cells, next_cells = to_cells(last_idx), to_cells(next_idx)                       # (B, 540, 64)
    b, c = ((next_cells != last_cells) & (next_cells != 0)).any(-1).nonzero(as_tuple=True)
    explains = torch.cat([shifts_explain(last_idx, next_cells, cands[i:i + 24], b, c).T
                          for i in range(0, len(cands), 24)])                                  # (candidates, K)
    votes = (explains.float() / explains.sum(0).clamp(min=1)).sum(1)
    order = [int(i) for i in votes.argsort(descending=True, stable=True) if votes[i] > 0][:n]
    return [list(cands[i]) for i in order]


def continued_frame(prev_idx: torch.Tensor, last_idx: torch.Tensor, offsets: list, reach: int = 4) -> torch.Tensor:
    """(B, 210, 160) palette indices at t-1 and t -> (B, 210, 160): frame t with every moving object moved once
    more by its last step, the frame "the motion continues" predicts (the decoder's continue class, README stage 3).
    A pixel that took on a non-background colour at t (colour 0 is the background, as in fit_shift_offsets) came
    from p - d for each offset d where frame t-1 shows its colour; its step is the offset that most such pixels
    within `reach` px of it agree on (one pixel alone often fits several offsets: a 4-row ball moving 6 rows also
    fits 4). It is then painted at p + d, and p shows what it showed at t-1. In Breakout this gives the real next
    frame's ball exactly in 2,041 of 2,056 held-out open-flight steps; pixels that no offset explains stay."""
    out = last_idx.clone()
    b, y, x = ((last_idx != prev_idx) & (last_idx != 0)).nonzero(as_tuple=True)
    if len(b) == 0:
        return out
    d = torch.tensor(offsets, device=last_idx.device)
    r = int(d.abs().max())
    came_from = F.pad(prev_idx, (r, r, r, r), value=255)[b[:, None], y[:, None] - d[:, 0] + r, x[:, None] - d[:, 1] + r]
    fits = (came_from == last_idx[b, y, x][:, None]).float()                                    # (N, S)
    near = (b[:, None] == b) & ((y[:, None] - y).abs() <= reach) & ((x[:, None] - x).abs() <= reach)
    votes = (near.float() @ fits).masked_fill(fits == 0, -1.0)                                   # only offsets it fits
    top, step = votes.max(1)
    b, y, x, step = b[top > 0], y[top > 0], x[top > 0], step[top > 0]
    colour = last_idx[b, y, x]
    out[b, y, x] = prev_idx[b, y, x]
    ty, tx = y + d[step, 0], x + d[step, 1]
    inside = (ty >= 0) & (ty < H) & (tx >= 0) & (tx < W)
    out[b[inside], ty[inside], tx[inside]] = colour[inside]
    return out


def add_speckle(context_idx: torch.Tensor, fraction: float, max_density: float, num_colors: int) -> torch.Tensor:
    """Context-noise augmentation: for a random `fraction` of the batch, up to `max_density` of the pixels
    (the same ones in every context frame, so they persist like a model's leftovers) get a random palette
    colour. Trained to predict the clean next frame from it, the decoder learns to erase stray pixels
    instead of copying them forever, which is how open-loop errors compound."""
    B = context_idx.shape[0]
    dev = context_idx.device
    density = torch.rand(B, 1, 1, device=dev) * max_density * (torch.rand(B, 1, 1, device=dev) < fraction)
    where = torch.rand(B, *context_idx.shape[2:], device=dev) < density
    colors = torch.randint(0, num_colors, where.shape, device=dev, dtype=context_idx.dtype)
    return torch.where(where[:, None], colors[:, None], context_idx)


def jitter_ball(last_idx: torch.Tensor, ball: torch.Tensor, fraction: float, max_px: int, background: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Ball-jitter augmentation of the last context frame (B, H, W) palette indices, `ball` its ball pixels
    (B, H, W) bool (metrics.ball_pixels). For a random `fraction` of the frames with a ball, half of the
    time the ball moves by a random step of up to `max_px` px each way (onto background pixels only), half
    of the time a random half of its pixels is erased: the off or broken balls that open-loop play feeds
    back, after which the decoders lost the ball (README stage 3, session 21). Trained to draw the real
    next frame from it, the decoder learns to continue such a ball instead of dropping it. `background`:
    the colour the ball leaves behind, by default colour 0 (the palette's commonest: Breakout's black)."""
    out = last_idx.clone()
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    pick = (rand(len(out)) < fraction) & ball.flatten(1).any(1).cpu()
    for b in pick.nonzero().flatten().tolist():
        mask, colour = ball[b], out[b][ball[b]][0]
        out[b][mask] = background
        if rand(1).item() < 0.5:
            while True:
                dy, dx = (torch.randint(-max_px, max_px + 1, (2,), generator=generator)).tolist()
                if dy or dx:
                    break
            moved = torch.roll(mask, (dy, dx), (0, 1))
            out[b][moved & (out[b] == background)] = colour
        else:
            keep = mask & (rand(mask.shape) < 0.5).to(mask.device)
            out[b][keep] = colour
    return out


def motion_weights(last_idx: torch.Tensor, next_idx: torch.Tensor, weight: float) -> torch.Tensor:
    """1 everywhere, 1 + weight where the pixel changes from t to t+1 (the earlier attempt: 1 + 10·[Δ])."""
    return 1.0 + weight * (last_idx != next_idx).float()


def keep_bias_for(motion_weight: float, keep_tiebreak: float = 0.0) -> float:
    """Decoding correction for the motion-weighted loss. A changing pixel's target is a 'change' class and
    weighs 1 + w, a kept pixel's target is class 0 and weighs 1: class weights, so the trained softmax
    learns p(c)·w_c and overrates every change by the factor 1 + w. Adding log(1 + w) to the keep logit
    before the argmax undoes that. Without it the raw argmax sprinkles low-confidence changes that open-
    loop play feeds back and grows into red speckle (README, evaluation: psnr@16 27.5 -> 32.0 dB).
    The keep tie-break (shift_class_loss) weighs the keep class of a still cell's pixels by a further 1 + t, so
    log(1 + t) is taken off."""
    return float(np.log1p(motion_weight) - np.log1p(keep_tiebreak))


# ----------------------------------------------------------------------------- building blocks
class FrameEmbed(nn.Module):
    """(B, k, 210, 160) palette indices -> (B, 27, 20, k*64*e) channels-last: lossless space-to-depth of
    the index map (cheap on uint8), then a per-pixel colour embedding, so the grid cells see every pixel
    exactly. Channel order (frame, pixel in cell, embedding) = torch's pixel_unshuffle order."""

    def __init__(self, num_colors: int, dim: int, circle: bool = False):
        super().__init__()
        # A fixed random code per colour: the projection after it is learned anyway, and a trainable
        # embedding's backward over millions of pixel indices cost more than the whole conv stack.
        self.embed = nn.Embedding(num_colors, dim)
        self.embed.weight.requires_grad_(False)
        if circle:   # evenly spaced on a circle instead: every colour is a corner of their hull, so one linear
            # step and a threshold single any colour out; random codes can put one inside the others' hull
            # or on top of another (the event head's red landed 0.28 from black: it never found the ball)
            angle = torch.arange(num_colors) * 2 * math.pi / num_colors
            with torch.no_grad():
                self.embed.weight.zero_()
                self.embed.weight[:, :2] = 1.5 * torch.stack([angle.cos(), angle.sin()], 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # built channels-last from the start: the convs run channels_last, and converting this, the
        # widest tensor of the model, cost ~20% of a training step (README, stage 3)
        return self.embed(grid_cells(idx).long()).flatten(3)


class ResBlock(nn.Module):
    def __init__(self, ch: int, cond_dim: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * ch) if cond_dim else None

    def forward(self, x, cond=None):
        h = F.silu(self.conv1(x))
        if self.film is not None:
            scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class GridNet(nn.Module):
    """Embed frames, project to `width` channels on the 27x20 grid, `depth` residual blocks (FiLM-
    conditioned on `cond` when cond_dim > 0). With `positional`, a learned embedding per grid cell is
    added after the projection: a conv stack is translation-equivariant, so without it the decoder cannot
    tell one empty cell from another and has no way to draw something where nothing was (the ball's
    serve, at one of a few places chosen by the game)."""

    def __init__(self, num_colors: int, frames: int, width: int, depth: int, embed_dim: int, cond_dim: int = 0,
                 positional: bool = False, circle_codes: bool = False):
        super().__init__()
        self.embed = FrameEmbed(num_colors, embed_dim, circle_codes)
        self.proj = nn.Conv2d(frames * embed_dim * CELL * CELL, width, 1)
        # channels-last (1, 27, 20, width), added where the projection is channels-last too
        self.pos = nn.Parameter(torch.zeros(1, (H + PAD_H) // CELL, W // CELL, width)) if positional else None
        self.blocks = nn.ModuleList(ResBlock(width, cond_dim) for _ in range(depth))

    def embed_project(self, idx: torch.Tensor) -> torch.Tensor:
        """The 1x1 projection as a matmul over the channels-last embedding; the result is a channels_last
        NCHW view, no copy (proj stays a Conv2d so the weights keep their layout and name)."""
        x = F.linear(self.embed(idx), self.proj.weight.flatten(1), self.proj.bias)
        if self.pos is not None:
            x = x + self.pos
        return x.permute(0, 3, 1, 2)

    def forward(self, idx, cond=None):
        x = self.embed_project(idx)
        for b in self.blocks:
            x = b(x, cond)
        return x


def last_frames(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, k, ...) -> (B, n, ...): the last n frames; with fewer, the oldest is repeated before them, as the
    recorded episodes are read before their start (gameplay_data.history)."""
    k = idx.shape[1]
    if k >= n:
        return idx[:, k - n:]
    return torch.cat([idx[:, :1].expand(-1, n - k, *idx.shape[2:]), idx], 1)


def cells_any(mask: torch.Tensor) -> torch.Tensor:
    """(..., 210, 160) bool -> (..., 27, 20) float: 1 where a grid cell holds any marked pixel. The mask is
    read as int64, one per 8 pixels of a cell's row (a batch of 256 masks ~20x faster than a max-pool over
    them as float, a single one ~1.6x; session 22)."""
    rows = F.pad((mask.contiguous().view(torch.int64) != 0).flatten(0, -3), (0, 0, 0, PAD_H))   # (N, 216, 20)
    return rows.view(-1, (H + PAD_H) // CELL, CELL, W // CELL).any(2).float().view(*mask.shape[:-2], (H + PAD_H) // CELL, W // CELL)


def near_cells(mask: torch.Tensor, reach: int = 1) -> torch.Tensor:
    """(B, 210, 160) bool -> (B, 27, 20) float: 1 on the grid cells within `reach` cells of a marked pixel."""
    return F.max_pool2d(cells_any(mask)[:, None], 2 * reach + 1, stride=1, padding=reach)[:, 0]


def spatial_soft_argmax(h: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 2C): per channel, the softmax-weighted mean (x, y) over the grid, in [-1, 1].
    Mean and max pooling forget *where* a feature fired; this keeps it (Levine et al. 2016's keypoints)."""
    B, C, gh, gw = h.shape
    p = torch.softmax(h.flatten(2).float(), -1).view(B, C, gh, gw)
    ys = torch.linspace(-1, 1, gh, device=h.device, dtype=p.dtype)
    xs = torch.linspace(-1, 1, gw, device=h.device, dtype=p.dtype)
    return torch.cat([(p.sum(3) * ys).sum(2), (p.sum(2) * xs).sum(2)], 1).to(h.dtype)


def parse_code_merges(text: str, codebook_size: int) -> dict[int, int]:
    """'a:b,c:d' -> {a: b, c: d}: the encoder's code a read as code b (LatentActionModel's merged_codes).
    ValueError, with a one-line reason, for anything that is not two different codes in range."""
    merges = {}
    for pair in filter(None, text.replace(" ", "").split(",")):
        try:
            a, b = (int(x) for x in pair.split(":"))
        except ValueError:
            raise ValueError(f"{pair!r} is not 'from:to' (two code numbers)") from None
        if not (0 <= a < codebook_size and 0 <= b < codebook_size) or a == b:
            raise ValueError(f"{pair!r} needs two different codes in 0..{codebook_size - 1}")
        merges[a] = b
    return merges


# ----------------------------------------------------------------------------- latent action model
class LatentActionModel(nn.Module):
    """Encoder (context + next frame -> discrete latent action) and decoder (context + latent -> next
    frame). The decoder alone is the world model used at play time."""

    def __init__(self, num_colors: int, context: int = 2, width: int = 96, depth: int = 3, embed_dim: int = 4,
                 enc_width: int = 64, enc_depth: int = 2, num_tokens: int = 1, codebook_size: int = 8,
                 code_dim: int = 32, head_hidden: int = 192, keep_bias: float = 0.0, dead_code: float = 2.0,
                 positional: bool = False, merged_codes: list | None = None, event_places: list | None = None,
                 shift_offsets: list | None = None, shift_gate: bool = False, continue_motion: bool = False):
        super().__init__()
        if continue_motion and (not shift_offsets or shift_gate):
            raise ValueError("the continue class needs shift offsets (its candidate steps) and no shift gate")
        merged_codes = [[int(a), int(b)] for a, b in (merged_codes or [])]
        event_places = [[int(r), int(c)] for r, c in (event_places or [])]
        shift_offsets = [[int(dy), int(dx)] for dy, dx in (shift_offsets or [])]
        self.hparams = dict(num_colors=num_colors, context=context, width=width, depth=depth, embed_dim=embed_dim,
                            enc_width=enc_width, enc_depth=enc_depth, num_tokens=num_tokens,
                            codebook_size=codebook_size, code_dim=code_dim, head_hidden=head_hidden,
                            keep_bias=keep_bias, dead_code=dead_code, positional=positional)
        if merged_codes:   # only when used, so weights without merges keep their metadata as before
            self.hparams["merged_codes"] = merged_codes
        if event_places:   # likewise: weights without events keep their metadata and tensors
            self.hparams["event_places"] = event_places
        if shift_offsets:  # likewise
            self.hparams["shift_offsets"] = shift_offsets
        if shift_offsets and shift_gate:
            self.hparams["shift_gate"] = True
        if continue_motion:
            self.hparams["continue_motion"] = True
        self.shift_offsets = shift_offsets
        self.continue_motion = bool(continue_motion)
        self.num_moves = len(shift_offsets) + self.continue_motion   # per-cell logits after the pixel classes
        self.shift_gate = bool(shift_offsets) and bool(shift_gate)
        self.keep_bias = keep_bias   # added to the keep logit when decoding (keep_bias_for); 0 = raw argmax
        self.num_colors, self.context, self.num_tokens = num_colors, context, num_tokens
        self.codebook_size, self.code_dim, self.positional = codebook_size, code_dim, positional
        # encoder: sees context frames and the next frame; pooled by mean, max (and, with `positional`,
        # where each feature fired, so a latent can say where something appeared)
        self.enc = GridNet(num_colors, context + 1, enc_width, enc_depth, embed_dim, positional=positional)
        pooled = (4 if positional else 2) * enc_width
        self.enc_out = nn.Sequential(nn.Linear(pooled, 256), nn.SiLU(), nn.Linear(256, num_tokens * code_dim))
        # dead_code: a code whose EMA count per batch falls below it is re-seeded from the batch. That
        # count is per batch, so a threshold of 2 at batch 32 expires every code rarer than 6% of the
        # transitions -- e.g. the ball's serve, which happens in ~2% of them and has 4-5 possible places.
        self.vq = VectorQuantize(dim=code_dim, codebook_size=codebook_size, decay=0.9, commitment_weight=0.25,
                                 kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=dead_code)
        # a re-seeded code starts with this EMA count (the library uses the threshold itself, which for a
        # low threshold expires the code again one unused batch later); pinned library version, see README
        self.vq._codebook.reset_cluster_size = max(dead_code, 1.0)
        # merged codes (merge_codes): the encoder's code a is read as code b. Rebuilt from hparams, not stored
        # as a tensor, so weights from before merges existed load unchanged.
        code_map = torch.arange(codebook_size)
        for a, b in merged_codes:
            code_map[a] = b
        self.register_buffer("code_map", code_map, persistent=False)
        # decoder: sees context frames, FiLM-conditioned on the quantised latent
        cond = num_tokens * code_dim
        # events (README stage 3, "the serve"): where the game serves follows its frame counter, which no
        # frame shows, so the latent action never learned it (sessions 6-14; stage 5, session 36). Event e > 0 = "the ball is served at
        # event_places[e - 1]", labelled from the recorded frames (metrics.serve_place); its vector is added
        # to the latent's. Event 0 = nothing happens: fixed at zero, so a model without events decodes alike.
        self.event_places = event_places
        self.num_events = len(event_places) + 1 if event_places else 0
        self.event_embed = nn.Embedding(self.num_events, cond, padding_idx=0) if event_places else None
        if self.event_embed is not None:
            nn.init.zeros_(self.event_embed.weight)   # a fine-tune starts from the model it was given
        self.dec = GridNet(num_colors, context, width, depth, embed_dim, cond_dim=cond, positional=positional)
        # Per pixel: class 0 = "keep the last frame's colour", class 1 + c = "becomes palette colour c".
        # Shift classes (optional, README stage 3): one more logit per grid cell and offset d, shared by the
        # cell's 64 pixels, "the pixel shows the last frame's colour at p - d": a moving object is one
        # decision per cell instead of 64 independent ones, so a 2-px ball moves whole or not at all.
        # The continue class (optional, after them): "the pixel shows continued_frame", every moving object
        # moved by its own last step; the cell need not know the step, only that the motion goes on.
        # Two ways to train and read them: marginal (each pixel's classes are its own colours plus the
        # shifts; shift_class_loss) or, with shift_gate, a gate per cell that picks "one shift for the whole
        # cell" or "the pixel classes" (shift_gate_loss; predict_next copies a cell whole where a shift wins).
        # 1x1 convs written as Linear over cells: the same maths, 2x faster on CPU at batch 1.
        self.head = nn.Sequential(nn.Linear(width, head_hidden), nn.SiLU(),
                                  nn.Linear(head_hidden, (num_colors + 1) * CELL * CELL + self.num_moves))
        with torch.no_grad():   # start as "copy the last frame" (GUIDE: copy-last is a strong baseline)
            self.head[-1].bias[:CELL * CELL] += 4.0
            if self.shift_gate:   # and the gate as "the pixel classes" everywhere (p(each shift) ~ e^-6)
                self.head[-1].bias[(num_colors + 1) * CELL * CELL:] = -6.0
        self.encoder_frozen = False
        # channels_last: the 3x3 convs run ~14% faster per training step and faster at batch 1 on CPU;
        # loading weights and .to(device) keep the layout, so training and play both get it from here
        self.to(memory_format=torch.channels_last)

    def freeze_encoder(self) -> None:
        """Fine-tune the decoder alone: the encoder and codebook stay as they are, so every latent already
        collected (and the action->latent model trained on them) stays valid."""
        self.encoder_frozen = True
        for m in (self.enc, self.enc_out, self.vq):
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:   # eval mode: no codebook EMA or dead-code expiry either
            for m in (self.enc, self.enc_out, self.vq):
                m.eval()
        return self

    # --- encoder
    def encoder_output(self, context_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """-> (B, T, D): the encoder's continuous output, before quantisation. A longer history than
        `context` frames may be passed (stage 5 can see more): the last `context` are used."""
        h = self.enc(torch.cat([context_idx[:, -self.context:], next_idx[:, None]], 1))
        pooled = [h.mean((2, 3)), h.amax((2, 3))] + ([spatial_soft_argmax(h)] if self.positional else [])
        return self.enc_out(torch.cat(pooled, 1)).view(-1, self.num_tokens, self.code_dim)

    def encode(self, context_idx: torch.Tensor, next_idx: torch.Tensor):
        """-> quantised latent (B, T, D), codes (B, T), commitment loss. Target is t -> t+1."""
        return self.quantize(self.encoder_output(context_idx, next_idx))

    def quantize(self, z: torch.Tensor):
        """The codebook's nearest code, then any merge (the gradient still flows straight through to z)."""
        quantized, codes, commit = self.vq(z)
        if self.hparams.get("merged_codes"):
            merged = self.code_map[codes]
            codebook = self.vq.codebook.detach().view(-1, self.code_dim)
            quantized = quantized + (codebook[merged] - codebook[codes]).view_as(quantized)
            codes = merged
        return quantized, codes, commit

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.get_output_from_indices(codes).view(-1, self.num_tokens, self.code_dim)

    def event_labels(self, places: list) -> torch.Tensor:
        """[(row, col) of a serve, or None] per transition -> (B,) event ids: 0 for None, else 1 + the
        nearest of event_places (a place seen once in training is still labelled by its neighbour)."""
        out = torch.zeros(len(places), dtype=torch.long)
        if self.event_places:
            table = torch.tensor(self.event_places, dtype=torch.float32)
            for i, p in enumerate(places):
                if p is not None:
                    out[i] = 1 + int((table - torch.tensor(p, dtype=torch.float32)).pow(2).sum(1).argmin())
        return out

    def transition_events(self, palette: Palette, last_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """(B,) event ids of real transitions last -> next ((B, 210, 160) palette indices); all 0 without
        events. The label is read off the frames by the game's object detector (metrics.serve_place)."""
        if not self.num_events:
            return torch.zeros(len(last_idx), dtype=torch.long, device=last_idx.device)
        import metrics
        last, nxt = palette.to_rgb(last_idx.cpu().numpy()), palette.to_rgb(next_idx.cpu().numpy())
        return self.event_labels([metrics.serve_place(a, b) for a, b in zip(last, nxt)]).to(last_idx.device)

    # --- decoder (the world model)
    def decode_cells(self, context_idx: torch.Tensor, latent: torch.Tensor, events: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, 540, 1 + num_colors, 64) logits: per grid cell, per class, per pixel of the 8x8 cell.
        Class 0 = keep the last frame's colour, class 1 + c = become palette colour c. `events`: (B,) event
        ids (None = no event); ignored by a model without events. Shift classes, if any, follow the colour
        classes, each cell's logit repeated over its pixels."""
        cond = self.condition(latent, events)
        pixels, shifts = self.decode_split(context_idx, cond)
        if shifts is None:
            return pixels
        return torch.cat([pixels, shifts[..., None].expand(-1, -1, -1, CELL * CELL)], 2)

    def condition(self, latent: torch.Tensor, events: torch.Tensor | None) -> torch.Tensor:
        cond = latent.reshape(latent.shape[0], -1)
        if events is not None and self.event_embed is not None:
            cond = cond + self.event_embed(events.to(cond.device).long())
        return cond

    def decode_split(self, context_idx: torch.Tensor, cond: torch.Tensor):
        """-> (per-pixel logits (B, 540, 1 + num_colors, 64), per-cell shift logits (B, 540, S) or None)."""
        h = self.dec(context_idx[:, -self.context:], cond)   # the last `context` of a longer history
        return self.split_head(self.head(h.flatten(2).transpose(1, 2)))

    def split_head(self, out: torch.Tensor):
        """Head output (B, n, N) -> (pixel logits (B, n, 1 + num_colors, 64), shift logits (B, n, S) or None)."""
        n = (self.num_colors + 1) * CELL * CELL
        return out[..., :n].unflatten(2, (self.num_colors + 1, CELL * CELL)), (out[..., n:] if self.num_moves else None)

    def continued(self, context_idx: torch.Tensor) -> torch.Tensor | None:
        """(B, k, 210, 160) -> continued_frame of the last two frames, with the continue class; else None."""
        if not self.continue_motion:
            return None
        return continued_frame(context_idx[:, -2], context_idx[:, -1], self.shift_offsets)

    def move_sources(self, last_idx: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     continued: torch.Tensor | None = None) -> torch.Tensor:
        """-> (K, S (+ 1), 64): the colour each pixel of grid cells (b[k], c[k]) takes under each shift class
        (cell_sources) and, with the continue class, under it (`continued`: self.continued's frame)."""
        src = cell_sources(last_idx, self.shift_offsets, b, c)
        if self.continue_motion:
            if continued is None:
                raise ValueError("a model with the continue class needs the continued frame (two context frames)")
            src = torch.cat([src, to_cells(continued)[b, c][:, None]], 1)
        return src

    def shift_sources_cells(self, last_idx: torch.Tensor, continued: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 210, 160) -> (B, 540, S (+ 1), 64): per grid cell and shift (or continue) class, the colour each
        pixel takes."""
        cells = torch.arange(len(last_idx) * CELLS, device=last_idx.device)
        src = self.move_sources(last_idx, cells // CELLS, cells % CELLS, continued)
        return src.view(len(last_idx), CELLS, *src.shape[1:])

    def cell_loss(self, cells: torch.Tensor, last_idx: torch.Tensor, next_idx: torch.Tensor,
                  motion_weight: float, cell_scale: torch.Tensor | None = None, gate_weight: float = 1.0,
                  continued: torch.Tensor | None = None, keep_tiebreak: float = 0.0) -> torch.Tensor:
        """Motion-weighted cross-entropy, computed in the cell layout (no full-image reshuffle).
        `cell_scale` (B, 27, 20), when given, multiplies the weights of each grid cell's pixels. It must be
        read from the input (e.g. near_cells around the ball at t), never from the next frame: a weight that
        depends on the outcome would bias the argmax toward it, which keep_bias only undoes for the motion weight.
        `continued`: the continue class's frame (self.continued of the decoder's context), with that class.
        `keep_tiebreak` (shift classes): see shift_class_loss."""
        target = to_cells(change_target(last_idx, next_idx))                   # (B, 540, 64)
        weight = to_cells(motion_weights(last_idx, next_idx, motion_weight))
        if cell_scale is not None:
            weight = weight * cell_scale.flatten(1)[..., None]
        weight = weight * to_cells(torch.ones_like(last_idx, dtype=torch.float32))   # 0 on the padding rows
        if self.shift_offsets and not self.shift_gate:   # several classes can be right: -log of their summed probability
            loss = self.shift_class_loss(cells, last_idx, next_idx, target, continued, keep_tiebreak)
            return (loss * weight).sum() / weight.sum()
        c1 = self.num_colors + 1
        # classes on dim 1 with the 64 pixels contiguous behind them: log-softmax vectorises well
        ce = F.cross_entropy(cells[:, :, :c1].flatten(0, 1).float(), target.flatten(0, 1), reduction="none")
        loss = (ce * weight.flatten(0, 1)).sum() / weight.sum()
        if self.shift_gate:
            loss = loss + gate_weight * self.shift_gate_loss(cells[:, :, c1:, 0], last_idx, next_idx)
        return loss

    def shift_gate_targets(self, last_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """-> (B, 540, 1 + S) bool: which of the gate's choices give the cell's next content exactly. Choice 0,
        the pixel classes, is the answer for a cell that does not change and for one no shift explains;
        shift d is right for a changing cell whose every pixel shows the last frame's colour at p - d."""
        last_cells, next_cells = to_cells(last_idx), to_cells(next_idx)
        B = len(last_idx)
        right = torch.zeros(B, CELLS, 1 + len(self.shift_offsets), dtype=torch.bool, device=last_idx.device)
        b, c = (next_cells != last_cells).any(-1).nonzero(as_tuple=True)
        if len(b):   # only the few changing cells need the sources
            right[b, c, 1:] = shifts_explain(last_idx, next_cells, self.shift_offsets, b, c)
        right[..., 0] = ~right[..., 1:].any(-1)
        return right

    def shift_gate_loss(self, shifts: torch.Tensor, last_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """-log p(a right gate choice), mean over the grid cells (unweighted, so the gate's argmax stays the
        likeliest choice). The gate's logits: 0 for the pixel classes, then the cell's S shift logits."""
        logits = torch.cat([torch.zeros_like(shifts[..., :1]), shifts], -1).float()
        right = self.shift_gate_targets(last_idx, next_idx)
        return (logits.logsumexp(-1) - logits.masked_fill(~right, float("-inf")).logsumexp(-1)).mean()

    def shift_class_loss(self, cells: torch.Tensor, last_idx: torch.Tensor, next_idx: torch.Tensor,
                         target: torch.Tensor, continued: torch.Tensor | None = None,
                         keep_tiebreak: float = 0.0) -> torch.Tensor:
        """-> (B, 540, 64) per-pixel -log p(a right class): the pixel's own class (target) or any shift whose
        source has the next colour. Computed from the per-cell shift logits, not as a softmax over the
        (B, 540, 1 + C + S, 64) classes: with 24 shift classes a training step took ~2.8 s that way, ~2.1 s this
        way, ~1.25 s without shift classes (batch 32, 2 threads, session 18's VM).
        `keep_tiebreak` t adds t * -log p(keep) at the pixels of the cells where nothing changes. Without it keep
        and a same-colour shift are equally right there, and a model trained from scratch puts its mass on the
        shifts (one per-cell logit covers a whole static cell): its frames are right, but no cell is sure to keep,
        so decoding never takes its fast path (README stage 3: 81 instead of 427 cached steps/s on the same
        dream). Not in a cell that changes: there one shift (continuing the ball's step) is right at every pixel,
        while keep would have to learn, pixel by pixel, where the ball lands (tried on every unchanged pixel: the
        ball drawn whole fell from ~0.64 to 0.33 at step 1,000, session 33)."""
        c1 = self.num_colors + 1
        pix, shift = cells[:, :, :c1].float(), cells[:, :, c1:, 0].float()          # (B, 540, C1, 64), (B, 540, S)
        top = shift.amax(2, keepdim=True)
        odds = (shift - top).exp()                                                   # (B, 540, S)
        every = torch.logaddexp(pix.logsumexp(2), odds.sum(2, keepdim=True).log() + top)
        right_shift = self.shift_sources_cells(last_idx, continued) == to_cells(next_idx)[:, :, None]   # (B, 540, S, 64)
        shift_mass = torch.einsum("bcsp,bcs->bcp", right_shift.float(), odds)
        right = torch.logaddexp(pix.gather(2, target[:, :, None]).squeeze(2), shift_mass.clamp_min(1e-30).log() + top)
        if keep_tiebreak:
            static = (target == 0).all(-1, keepdim=True)                            # (B, 540, 1)
            return every - right + keep_tiebreak * static * (every - pix[:, :, 0])
        return every - right

    @torch.no_grad()
    def predict_next(self, context_idx: torch.Tensor, codes: torch.Tensor, events: torch.Tensor | None = None) -> torch.Tensor:
        """Next frame as palette indices (B, 210, 160) uint8: exactly what is shown and fed back.
        The argmax runs in the cell layout (cheaper than on the reshuffled image)."""
        if self.shift_offsets:
            pixels, shifts = self.decode_split(context_idx, self.condition(self.codes_to_latent(codes), events))
            if self.shift_gate:
                return self.decode_gated(pixels, shifts, context_idx[:, -1])
            uncertain = self.uncertain_cells(pixels, shifts)   # the continued frame only where a cell may change
            continued = self.continued(context_idx) if uncertain.any() else None
            return self.decode_colours(pixels, shifts, context_idx[:, -1], uncertain, continued)
        return self.decode_pixels(self.decode_cells(context_idx, self.codes_to_latent(codes), events), context_idx[:, -1])

    def pixel_changes(self, cells: torch.Tensor) -> torch.Tensor:
        """The pixel classes' decision, (B, n, 1 + num_colors, 64) -> (B, n, 64) uint8 change classes: argmax with
        keep_bias added to the keep logit (in place: `cells` is the caller's scratch)."""
        if self.keep_bias:
            cells[:, :, 0] += self.keep_bias
        return cells.max(2).indices.to(torch.uint8)

    def decode_pixels(self, cells: torch.Tensor | None, last_idx: torch.Tensor, change: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_changes applied to the last frame (`change`: those, when the caller has them already).
        (B, 540, 1 + num_colors, 64) -> (B, 210, 160) uint8."""
        return apply_change(last_idx, from_cells(self.pixel_changes(cells) if change is None else change))

    def uncertain_pixels(self, pixels: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """-> (B, n, 64) bool: the pixels of (B, n, 1 + num_colors, 64) pixel and (B, n, S) shift logits whose
        keep class is not sure enough to keep their colour (decode_colours); a function of the cell's own
        logits alone, so models.cached_decoder keeps it per cell."""
        # p(keep) <= 1 / (1 + boost)  <=>  the other classes' sum of exp(logit - keep logit) >= boost. That sum
        # is at most (number of others) * exp(their largest logit - keep), so the exps are summed only in the
        # cells with a pixel where that bound reaches boost (a max is cheaper than an exp; most cells have none)
        pixels, shifts, boost = pixels.float(), shifts.float(), math.exp(self.keep_bias)
        keep = pixels[:, :, 0]
        top = torch.maximum(pixels[:, :, 1:].amax(2), shifts.amax(2, keepdim=True)) - keep          # (B, n, 64)
        maybe = top >= math.log(boost / (pixels.shape[2] - 1 + shifts.shape[2]))
        out = torch.zeros_like(maybe)
        at = maybe.any(-1).view(-1).nonzero().squeeze(1)          # b * n + c (index_select: ~4x advanced indexing)
        if len(at):
            pix = pixels.flatten(0, 1).index_select(0, at)        # (K, 1 + num_colors, 64)
            k = pix[:, :1]
            others = (pix[:, 1:] - k).exp().sum(1) + (shifts.flatten(0, 1).index_select(0, at).logsumexp(1, keepdim=True) - k[:, 0]).exp()
            out.view(-1, out.shape[-1]).index_copy_(0, at, others >= boost)
        return out

    def uncertain_cells(self, pixels: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """-> (B, n) bool: the cells with an uncertain pixel (uncertain_pixels)."""
        return self.uncertain_pixels(pixels, shifts).any(-1)

    def decode_colours(self, pixels: torch.Tensor, shifts: torch.Tensor, last_idx: torch.Tensor,
                       uncertain: torch.Tensor | None = None, continued: torch.Tensor | None = None) -> torch.Tensor:
        """With shift classes: each class's probability goes to the colour it gives the pixel (keep: the last
        colour; 1 + c: colour c; shift d: the last frame's colour at p - d) and the likeliest colour wins, the
        last colour's probability first multiplied by exp(keep_bias) = 1 + motion weight (the loss weighs
        outcomes, and the outcome is the colour). A pixel whose keep class alone has p > 1 / (1 + exp(keep_bias))
        keeps its colour whatever the rest says, so only the cells with a pixel below that are summed up
        (a median of 4 of 540 a step in play, README design notes). `uncertain`: those cells (uncertain_cells),
        when the caller has them already; `continued`: the continue class's frame (self.continued), with that class.
        -> (B, 210, 160) uint8."""
        boost = math.exp(self.keep_bias)
        if uncertain is None:
            uncertain = self.uncertain_cells(pixels, shifts)
        b, c = uncertain.nonzero(as_tuple=True)
        out = to_cells(last_idx)
        if len(b):
            k = torch.cat([pixels[b, c].float(), shifts[b, c].float()[..., None].expand(-1, -1, CELL * CELL)], 1)
            p = torch.softmax(k, 1)                                                   # (K, classes, 64)
            last = out[b, c].long()[:, None]                                          # (K, 1, 64)
            colour = p[:, 1:self.num_colors + 1].clone()
            colour.scatter_add_(1, last, p[:, :1])
            colour.scatter_add_(1, self.move_sources(last_idx, b, c, continued).long(), p[:, self.num_colors + 1:])
            colour.scatter_(1, last, colour.gather(1, last) * boost)
            out[b, c] = colour.argmax(1).to(out.dtype)
        return from_cells(out)

    @staticmethod
    def gate_choices(shifts: torch.Tensor) -> torch.Tensor:
        """(B, n, S) gate logits -> (B, n) the shift each cell copies, -1 where the pixel classes win (a shift
        must beat their fixed logit 0)."""
        top, d = shifts.float().max(-1)
        return d.masked_fill(top <= 0, -1)

    def decode_gated(self, pixels: torch.Tensor, shifts: torch.Tensor, last_idx: torch.Tensor,
                     change: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """With the shift gate: the pixel classes' argmax (keep_bias added, as without shifts), except in the
        cells whose likeliest gate choice is a shift d: those are copied whole from the last frame at p - d.
        `change`, `gate`: pixel_changes and gate_choices, when the caller has them already. -> (B, 210, 160) uint8."""
        if change is None:
            change = self.pixel_changes(pixels.float().clone())   # clone: the caller's tensor stays
        out = to_cells(self.decode_pixels(None, last_idx, change))
        d = self.gate_choices(shifts) if gate is None else gate
        b, c = (d >= 0).nonzero(as_tuple=True)
        if len(b):
            src = cell_sources(last_idx, self.shift_offsets, b, c)
            out[b, c] = src[torch.arange(len(b), device=b.device), d[b, c]].to(out.dtype)
        return from_cells(out)

    def forward(self, context_idx, next_idx, decode_context=None, events=None):
        """Training pass: -> (decoder cell logits, codes, commitment loss, the encoder's continuous output).
        The encoder always sees the real frames; the decoder sees `decode_context` when given (self-forcing),
        else the same frames, and the transitions' `events` when given."""
        z = self.encoder_output(context_idx, next_idx)
        quantized, codes, commit = self.quantize(z)
        return self.decode_cells(context_idx if decode_context is None else decode_context, quantized, events), codes, commit, z

    def prior_pull(self, z: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
        """Squared distance (mean over code dimensions, the commitment loss's scale) from the encoder's
        output to the code an action->latent prior predicts, weighted by the prior's confidence in it
        (prior fixed): its gradient pulls z toward the code the keys and frames predict where the prior is
        sure, and hardly at all where it is not (an expected distance over all codes would instead drag
        every output toward the codebook's centre while the prior is still uninformed)."""
        codebook = self.vq.codebook.detach().view(-1, self.code_dim)                 # (K, D)
        confidence, guess = torch.softmax(prior_logits.detach().float(), -1).max(-1)  # (B, T)
        return (confidence * (z - codebook[guess]).pow(2).mean(-1)).mean()


EVENT_FLOOR = 0.05   # ActionToLatent.sample_step: odds of an event below this are read as none
EVENT_LIKELY = 0.5   # ActionToLatent.sample_step at temperature 0: an event where its odds reach this


class ActionToLatent(nn.Module):
    """Real action (+ recent frames for v2) -> logits over the latent codes, one head per token.

    v1 is a lookup from action alone; v2 conditions on the frames because the same action yields
    different latents in different states (FIRE with the ball in play is a NOOP, LEFT at the wall...),
    and on the `past_actions` actions before a_t: an Atari paddle press moves the paddle over two steps
    (RIGHT then NOOP: +12 px, then +10 px), so the latent of t -> t+1 carries a_t-1 as well, and the
    frames up to t cannot show it; a FIRE that serves shows on screen only some steps later. With
    `positional`, the frame encoder knows where each grid cell is and is also pooled by where its
    features fire (as the world model's encoder is), so it can tell "paddle at the wall" or "ball about to
    reach the bricks" from anywhere else. It reads the last `context` frames it is given (fewer: the oldest
    repeated), its event head the last `event_context` (frames_seen: the longer of the two); an optional
    history head reads those frames' readings and the last `history_keys` keys (keys_seen: the longer key
    history of the two), and with `dial` (atari_env.paddle_dial) where those keys turned the paddle's dial."""

    def __init__(self, version: str, num_actions: int, num_colors: int, context: int, num_tokens: int,
                 codebook_size: int, width: int = 48, depth: int = 2, embed_dim: int = 4, prev_action: bool = False,
                 past_actions: int | None = None, positional: bool = False, num_events: int = 0,
                 event_context: int = 0, event_width: int = 16, event_depth: int = 0, history_keys: int = 0,
                 history_width: int = 256, dial: tuple[list[int], float] | None = None, frame_phases: int = 0,
                 history_context: int = 0, dial_levels: bool = False):
        super().__init__()
        # `prev_action` is how weights saved before `past_actions` existed say "one past action"
        past_actions = int(prev_action) if past_actions is None else past_actions
        self.hparams = dict(version=version, num_actions=num_actions, num_colors=num_colors, context=context,
                            num_tokens=num_tokens, codebook_size=codebook_size, width=width, depth=depth,
                            embed_dim=embed_dim, past_actions=past_actions, positional=positional)
        if num_events:   # only when used, so weights from before events keep their metadata
            self.hparams["num_events"] = num_events
        self.event_context = event_context if num_events and version == "v2" else 0
        if self.event_context:
            self.hparams.update(event_context=event_context, event_width=event_width, event_depth=event_depth)
        self.version, self.num_tokens, self.codebook_size = version, num_tokens, codebook_size
        self.context = context if version == "v2" else 0
        self.num_actions, self.past_actions, self.positional = num_actions, past_actions, positional
        self.action_embed = nn.Embedding(num_actions, 64)
        # one embedding per (how many steps back, action), summed; row a is a_t-1 = a (as before)
        self.prev_action_embed = nn.Embedding(num_actions * past_actions, 64) if past_actions else None
        if version == "v2":
            self.frames = GridNet(num_colors, context, width, depth, embed_dim, cond_dim=64, positional=positional)
            in_dim = (4 if positional else 2) * width + 64
        else:
            self.frames = None
            in_dim = 64
        self.out = nn.Sequential(nn.Linear(in_dim, 128), nn.SiLU(), nn.Linear(128, num_tokens * codebook_size))
        # the world model's events (a serve and its place): whether one happens follows from the keys and
        # frames (FIRE with no ball in play), where it happens from the frame phase and frames (below); play
        # samples both from the head's odds
        self.num_events = num_events
        # Breakout serves on FIRE only once ~7 steps have passed since the ball was lost: the event head also
        # reads `event_context` frames, each through one small shared encoder pooled to "what, and
        # where" (a narrow path: feeding 8 frames to the code trunk instead overfitted, README stage 5)
        self.event_frames = (GridNet(num_colors, 1, event_width, event_depth, 2, positional=True, circle_codes=True)
                             if self.event_context else None)
        # per frame and grid cell, "the ball is here": trained on the object detector's ball pixels in
        # every frame read (train_action_to_latent --event_ball_weight), a dense signal where the serve gives
        # one a batch; a frame's "ball on screen" is its most confident cell, fed to the event MLP. (Trained
        # on the frame's answer alone, through a max over cells, it stayed at the prior: README stage 5.)
        self.event_ball = nn.Conv2d(event_width, 1, 1) if self.event_context else None
        # Where Breakout serves is picked by its frame counter's last two bits on the launch frame: the no-op start
        # (which raw frame of a step the counter starts on, atari_env.recorded_frame_phase) and, for a FIRE held
        # while the lost ball still falls out of sight, when it lands, which the event head's frames show (README
        # stage 5, session 36). With `frame_phases`, the event head reads that phase, one-hot.
        self.frame_phases = frame_phases if self.event_context else 0
        if self.frame_phases:
            self.hparams["frame_phases"] = self.frame_phases
        ev_dim = in_dim + (3 * event_width + 1) * self.event_context + self.frame_phases
        self.event_out = nn.Sequential(nn.Linear(ev_dim, 128), nn.SiLU(), nn.Linear(128, num_events)) if num_events else None
        # The history head: what the code trunk's two frames and five keys leave open is mostly the paddle,
        # whose step depends on keys and positions further back (it winds up past the right wall). It reads
        # the trunk's features, the event head's readings of its frames and the last `history_keys` keys,
        # and adds to the trunk's code logits: its last layer starts at zero, so an untrained head changes
        # nothing and it can be trained alone on a trained model (train_action_to_latent --history_only).
        if history_keys and not self.event_context:
            raise ValueError("the history head reads the event head's frames: it needs event_context > 0 and events")
        self.history_keys, self.history_head = history_keys, None
        # the history head reads the last `history_context` of the event head's frames (0: all of them), so the
        # event head can read further back without changing a trained history head's inputs
        self.history_context = min(history_context or self.event_context, self.event_context)
        # A paddle's dial winds up past a wall out of sight (atari_env.PADDLE_DIAL_SPAN), so where the paddle goes
        # next depends on keys older than any window: the callers follow the dial from the episode's start
        # (gameplay_data.paddle_dials) and the head reads it after each of its keys (README stage 5, session 35)
        self.dial_span = float(dial[1]) if dial and history_keys else 0.0
        self.register_buffer("dial_turns", torch.tensor(dial[0] if self.dial_span else [0] * num_actions,
                                                        dtype=torch.float32), persistent=False)
        # With `dial_levels` the head also reads which of its few reachable values the dial is at, one-hot: it
        # starts mid-range and turns a whole press at a time, clamped at either end, so it is always a whole number
        # of presses from the middle, the low end or the high end (27 values for Breakout). The paddle's next
        # column is a step function of it, which a fraction of the range gave the MLP only blurred (session 36).
        self.dial_levels = int(self.dial_span) + 1 if self.dial_span and dial_levels else 0
        if self.history_keys:
            self.hparams.update(history_keys=history_keys, history_width=history_width)
            if self.history_context != self.event_context:
                self.hparams["history_context"] = self.history_context
            if self.dial_span:
                self.hparams.update(dial_turns=list(dial[0]), dial_span=self.dial_span)
            if self.dial_levels:
                self.hparams["dial_levels"] = True
            hist_dim = (in_dim + (3 * event_width + 1) * self.history_context + num_actions * (history_keys + 1)
                        + self.dial_columns)
            # affine-free BatchNorm: the inputs (pooled features, soft-argmax places, one-hot keys) come on
            # very different scales; per-feature standardising learned them better than a LayerNorm did
            self.history_head = nn.Sequential(nn.BatchNorm1d(hist_dim, affine=False), nn.Linear(hist_dim, history_width),
                                              nn.SiLU(), nn.Linear(history_width, history_width), nn.SiLU(),
                                              nn.Linear(history_width, num_tokens * codebook_size))
            nn.init.zeros_(self.history_head[-1].weight)
            nn.init.zeros_(self.history_head[-1].bias)

    def forward(self, action: torch.Tensor, context_idx: torch.Tensor | None = None,
                past_actions: torch.Tensor | None = None, dial: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, num_tokens, codebook_size) code logits. `past_actions`: (B,) a_t-1, or (B, n) the n
        actions before a_t, oldest first; NOOP (0) where unknown (also when None or shorter than the
        model's history). `dial`: (B,) the paddle's dial before the oldest of the keys_seen keys
        (gameplay_data.dial_before); None: where the ALE sets it at reset."""
        if self.history_head is not None:   # it reads the event head's frames too
            return self.forward_events(action, context_idx, past_actions, dial=dial)[0]
        return self.out(self.features(action, context_idx, past_actions)).view(-1, self.num_tokens, self.codebook_size)

    def forward_events(self, action, context_idx=None, past_actions=None, ball: bool = False, summaries=None,
                       dial=None, phase=None):
        """-> (code logits, event logits (B, num_events) or None), from one pass over the frames; with
        `ball`, also the ball logits per grid cell (B, event_context, 27, 20) of the event head's frames
        (or None). `summaries`: frame_summaries of the last event_context frames, kept by a caller that
        steps through time (the neural env), instead of reading them again from `context_idx`. `phase`:
        (B,) the episode's frame phase for a model with frame_phases (None: unknown, no input)."""
        f = self.features(action, context_idx, past_actions)
        codes = self.out(f)
        events = ball_cells = None
        if self.event_frames is not None and summaries is None:
            pooled, ball_cells = self.event_history(context_idx)
            summaries = self.summarize(pooled, ball_cells)
        if self.history_head is not None:
            codes = codes + self.history_head(self.history_input(f, summaries, action, past_actions, dial))
        if self.event_out is not None:
            events = self.event_out(self.event_input(f, summaries, phase))
        codes = codes.view(-1, self.num_tokens, self.codebook_size)
        return (codes, events, ball_cells) if ball else (codes, events)

    def event_input(self, features, summaries=None, phase=None) -> torch.Tensor:
        """-> (B, the event MLP's input): the trunk's features, the event head's readings of its frames
        (B, event_context, 3 * event_width + 1) and, with frame_phases, the frame phase one-hot (zeros: unknown)."""
        parts = [features]
        if summaries is not None:
            parts += [summaries[..., :-1].flatten(1), summaries[..., -1]]
        if self.frame_phases:
            parts.append(torch.zeros(len(features), self.frame_phases, device=features.device) if phase is None else
                         F.one_hot(phase.long().view(-1).to(features.device), self.frame_phases).float())
        return torch.cat(parts, 1)

    def history_input(self, features, summaries, action, past_actions=None, dial=None) -> torch.Tensor:
        """-> (B, history head's input): the trunk's features, the event head's readings of its last
        history_context frames (of summaries (B, event_context, 3 * event_width + 1)), the keys
        a_t-history_keys..a_t, one-hot, and (with a dial) the dial after each of them, as a fraction of its
        range and whether it is at either end, and with dial_levels which of its reachable values (dial_features)."""
        all_keys = self.key_window(action, past_actions)
        keys = all_keys[:, self.keys_seen - self.history_keys:]
        parts = [features, summaries[:, summaries.shape[1] - self.history_context:].flatten(1),
                 F.one_hot(keys, self.num_actions).flatten(1).float()]
        if self.dial_span:
            parts.append(self.dial_features(all_keys, dial))
        return torch.cat(parts, 1)

    def key_window(self, action, past_actions=None) -> torch.Tensor:
        """-> (B, keys_seen + 1) long: the keys before a_t (pad_history), then a_t."""
        return torch.cat([self.pad_history(action, past_actions), action.long().view(-1, 1)], 1)

    @property
    def dial_columns(self) -> int:
        """How many of history_input's last columns are dial_features (0 without a dial)."""
        return (3 + 3 * self.dial_levels) * (self.history_keys + 1) if self.dial_span else 0

    def dial_level(self, dial: torch.Tensor) -> torch.Tensor:
        """Dial values -> (same shape) long ids of its reachable values: a whole number of presses (the level) from
        the low end, the middle or the high end (the family), family * dial_levels + level."""
        offsets = torch.tensor([0.0, self.dial_span / 2 % 1, self.dial_span % 1], device=dial.device)
        d = dial[..., None] - offsets
        family = (d - d.round()).abs().argmin(-1)
        level = (dial - offsets[family]).round().long().clamp(0, self.dial_levels - 1)
        return family * self.dial_levels + level

    def dial_features(self, all_keys: torch.Tensor, dial: torch.Tensor | None = None) -> torch.Tensor:
        """The history head's dial inputs, the last dial_columns columns of history_input: the dial
        after each of its keys, from `dial` before the oldest of key_window's (None: the reset value)."""
        start = (torch.full((len(all_keys),), self.dial_span / 2, device=all_keys.device) if dial is None
                 else dial.float().view(-1))
        turned = torch.stack(gd.turn_dial(start, self.dial_turns[all_keys], self.dial_span), 1)
        turned = turned[:, self.keys_seen - self.history_keys:]
        parts = [turned / self.dial_span, (turned <= 0).float(), (turned >= self.dial_span).float()]
        if self.dial_levels:
            parts.append(F.one_hot(self.dial_level(turned), 3 * self.dial_levels).flatten(1).float())
        return torch.cat(parts, 1)

    @property
    def frames_seen(self) -> int:
        """How many recent frames the model reads (its callers keep at least this history)."""
        return max(self.context, self.event_context)

    @property
    def dial(self) -> tuple[list[int], float] | None:
        """(turn per action, span) of the paddle dial the history head reads (atari_env.paddle_dial), or None."""
        return (self.dial_turns.tolist(), self.dial_span) if self.dial_span else None

    @property
    def keys_seen(self) -> int:
        """How many keys before a_t the model reads (its callers pass at least this many)."""
        return max(self.past_actions, self.history_keys)

    def event_history(self, context_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k, 210, 160) -> the event head's reading of the last event_context frames (encode_frames)."""
        return self.encode_frames(last_frames(context_idx, self.event_context))

    def encode_frames(self, frames_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, 210, 160) -> per frame, from one shared per-frame encoder: (B, n, 3 * event_width) where
        each feature fires most and how strongly (max and soft-argmax pooling), and (B, n, 27, 20) ball
        logits per grid cell."""
        B, n = frames_idx.shape[:2]
        h = self.event_frames(frames_idx.reshape(B * n, 1, *frames_idx.shape[2:]))
        pooled = torch.cat([h.amax((2, 3)), spatial_soft_argmax(h)], 1).view(B, n, -1)
        return pooled, self.event_ball(h).view(B, n, *h.shape[2:])

    @staticmethod
    def summarize(pooled: torch.Tensor, ball_cells: torch.Tensor) -> torch.Tensor:
        """-> (B, n, 3 * event_width + 1): what the event head keeps of each frame (its pooled features and
        its most confident ball cell)."""
        return torch.cat([pooled, ball_cells.flatten(2).amax(2)[..., None]], -1)

    def frame_summaries(self, frames_idx: torch.Tensor) -> torch.Tensor:
        """(B, n, 210, 160) -> (B, n, 3 * event_width + 1), each frame on its own: a caller stepping through
        time encodes each new frame once (play: one frame a step instead of event_context)."""
        return self.summarize(*self.encode_frames(frames_idx))

    def features(self, action, context_idx=None, past_actions=None) -> torch.Tensor:
        a = self.action_embed(action.long())
        if self.prev_action_embed is not None:
            past = self.pad_history(action, past_actions)[:, self.keys_seen - self.past_actions:]
            lag = torch.arange(self.past_actions, 0, -1, device=past.device) - 1   # 0 = a_t-1
            a = a + self.prev_action_embed(lag * self.num_actions + past).sum(1)
        if self.frames is not None:
            h = self.frames(last_frames(context_idx, self.context), a)
            pooled = [h.mean((2, 3)), h.amax((2, 3))] + ([spatial_soft_argmax(h)] if self.positional else [])
            a = torch.cat([a] + pooled, 1)
        return a

    def pad_history(self, action: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
        """-> (B, keys_seen) long, oldest first, NOOP-padded on the left."""
        n = self.keys_seen
        if past is None or n == 0:
            return torch.zeros(len(action), n, dtype=torch.long, device=action.device)
        past = past.long().view(len(action), -1)[:, -n:]
        return F.pad(past, (n - past.shape[1], 0))

    @torch.no_grad()
    def sample(self, action, context_idx=None, temperature: float = 0.0, generator=None,
               past_actions=None, dial=None) -> torch.Tensor:
        return self.sample_step(action, context_idx, temperature, generator, past_actions, dial=dial)[0]

    @torch.no_grad()
    def sample_step(self, action, context_idx=None, temperature: float = 0.0, generator=None, past_actions=None,
                    summaries=None, dial=None, phase=None):
        """-> (codes (B, num_tokens), event ids (B,) or None). Codes: argmax, or sampled at `temperature`.
        Event, likewise: at temperature 0 the likeliest outcome, an event where its odds reach one half, at its
        likeliest place (the game decides both, from its frame counter and when the lost ball lands out of
        sight: `phase` and the frames, README stage 5, session 36; sampling them left 0.02 dB of the motion gap,
        session 37). At a temperature, sampled from the model's odds, except that odds of "something happens"
        below EVENT_FLOOR count as none: a model's small errors on ordinary steps would otherwise add up to
        stray serves over a long game. Sampling runs on the CPU, where `generator` lives."""
        logits, event_logits = self.forward_events(action, context_idx, past_actions, summaries=summaries, dial=dial,
                                                   phase=phase)
        if temperature <= 0:
            codes = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float().cpu() / temperature, -1)
            codes = torch.multinomial(probs.view(-1, self.codebook_size), 1, generator=generator).view(probs.shape[:2])
            codes = codes.to(logits.device)
        if event_logits is None:
            return codes, None
        p = torch.softmax(event_logits.float().cpu(), -1)
        if temperature <= 0:
            events = torch.where(p[:, 0] < 1 - EVENT_LIKELY, p[:, 1:].argmax(-1) + 1, 0)
            return codes, events.to(logits.device)
        p[p[:, 0] > 1 - EVENT_FLOOR] = torch.eye(p.shape[1])[0]
        return codes, torch.multinomial(p, 1, generator=generator)[:, 0].to(logits.device)


# ----------------------------------------------------------------------------- shipped weights
def save_weights(path, model: nn.Module, meta: dict) -> None:
    """One safetensors file: weights + JSON metadata (hyperparameters, palette, game). No pickle."""
    import json

    from safetensors.torch import save_file

    from common import atomic_write, strip_compile_prefix
    tensors = {k: v.detach().cpu().contiguous() for k, v in strip_compile_prefix(model.state_dict()).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"neural_atari": json.dumps(meta)}))


def read_weights(path, kind: str) -> tuple[dict, dict]:
    """-> (tensors, meta); clear errors for missing, corrupt or foreign files."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    from common import UserError
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("neural_atari", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"weights {path} are corrupt or not safetensors ({type(e).__name__})") from e
    if meta.get("kind") != kind:
        raise UserError(f"{path} holds {meta.get('kind')!r} weights, expected {kind!r}")
    return tensors, meta


def load_world_model(path, game: str | None = None, device="cpu"):
    """-> (LatentActionModel in eval mode, Palette, meta) from world_model.safetensors."""
    from common import UserError
    tensors, meta = read_weights(path, "world_model")
    if game is not None and meta.get("game") != game:
        raise UserError(f"{path} is a world model for {meta.get('game')!r}, not {game!r}")
    # weights saved before keep_bias was stored: the correction follows from the loss they were trained with
    hparams = {"keep_bias": keep_bias_for(meta.get("config", {}).get("motion_weight", 0.0)), **meta["hparams"]}
    model = LatentActionModel(**hparams)
    model.load_state_dict(tensors)
    return model.to(device).eval(), Palette(np.array(meta["palette"], dtype=np.uint8)), meta


def load_action_to_latent(path, world_meta: dict, device="cpu"):
    """-> (ActionToLatent in eval mode, meta); refuses weights made for another game or latent shape."""
    from common import UserError
    tensors, meta = read_weights(path, "action_to_latent")
    hp, wm = meta["hparams"], world_meta["hparams"]
    if meta.get("game") != world_meta.get("game"):
        raise UserError(f"{path} is for {meta.get('game')!r}, the world model for {world_meta.get('game')!r}")
    # the frames seen may differ (stage 5 may see more than the decoder: callers pass the longer history)
    if (hp["num_tokens"], hp["codebook_size"]) != (wm["num_tokens"], wm["codebook_size"]):
        raise UserError(f"{path} predicts {hp['num_tokens']}x{hp['codebook_size']} latents; "
                        f"the world model uses {wm['num_tokens']}x{wm['codebook_size']}")
    if hp.get("num_events", 0) and hp["num_events"] != len(wm.get("event_places", [])) + 1:
        raise UserError(f"{path} predicts {hp['num_events']} events; the world model has "
                        f"{len(wm.get('event_places', [])) + 1 if wm.get('event_places') else 'none'}")
    hp = dict(hp)
    if "dial_span" in hp:
        hp["dial"] = (hp.pop("dial_turns"), hp.pop("dial_span"))
    model = ActionToLatent(**hp)
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta
