"""The world model's play step, recomputed only where the frames changed.

One decoder step (LatentActionModel.predict_next, batch 1) runs every layer over the whole 27x20 grid, yet
from one step to the next Breakout changes the ball's cells, the paddle's when it moves, and now and then a
brick and the score. Every decoder layer is per cell (the embedding, the projection, the head) or a 3x3
convolution, so a cell's logits can only change within `2 * depth` cells of a cell whose context frames
changed. CachedDecoder keeps every layer's activations from the last step that used the same latent (FiLM
conditions each block on the latent, so there is one cache per (codes, event)), compares the context with
the one that cache was made from, and recomputes layer l only on the cells within l cells of a change (the
changed cells' mask dilated once per convolution). It computes the same function: its frames equal
predict_next's (tests/test_cached_decoder.py; the sums can differ in float rounding, which an argmax sees
only at an exact tie). Used on the CPU, where the step is compute-bound (benchmarks/play_speed.py measures
both).

How, and why this way: each layer's activations are one (29 * 22, width) matrix, a row per cell of the grid
with a zero border (what the convolutions pad with); a 3x3 convolution of the cells to recompute is one
index_select of their 9 neighbours' rows (im2col) and one matmul with the kernel as a (9 * width, width)
matrix. At these sizes (~100 cells a layer) a conv2d call per box around each change spent as long in
per-call overhead as in arithmetic, and boxes computed the corners a dilated mask leaves out (session 23:
benchmarks/play_speed.py, README stage 3). torch's index_select is ~4x faster than advanced indexing here.
What each decoding reads of a cell's logits is a function of those logits alone (decode_colours: which of
its pixels are uncertain; decode_pixels: its change classes; decode_gated: those and its gate's choice), so
it is kept per cell too and only the recomputed cells' is redone; decode_colours' sum over the classes of
the uncertain pixels is done in numpy (FewPixelColours), where torch's per-call overhead dominated. A batch of more than one, or a model in
training mode, goes through predict_next unchanged. Changed weights (a training step, load_state_dict) are
noticed from the parameters' version counters and drop every cache. CPU only (a model elsewhere is
refused): on a GPU the whole-grid step is not compute-bound.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from models.world_model import CELL, H, PAD_H, W, LatentActionModel, grid_cells

GH, GW = (H + PAD_H) // CELL, W // CELL   # the 27x20 grid
ROW = GW + 2                              # a row of the zero-bordered grid


def bordered_rows() -> np.ndarray:
    """(540,) the row of each grid cell (row-major) in the zero-bordered (29 * 22) activation matrix."""
    y, x = np.divmod(np.arange(GH * GW), GW)
    return (y + 1) * ROW + x + 1


def neighbour_rows() -> np.ndarray:
    """(540, 9) the bordered rows of each cell's 3x3 neighbourhood, in the kernel's (ky, kx) order."""
    return bordered_rows()[:, None] + np.array([dy * ROW + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def changed_cells(cells: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Two (540, k*64) uint8 contexts in grid_cells' layout -> (540,) bool: the cells where any pixel of
    any frame differs (compared 8 pixels at a time, as int64)."""
    return (cells.view(torch.int64) != before.view(torch.int64)).any(1)


def grid_distances() -> np.ndarray:
    """(540, 540) uint8: how many cells apart two grid cells are (the larger of the row and column gaps),
    i.e. after how many 3x3 convolutions a change in one reaches the other."""
    yx = np.stack(np.divmod(np.arange(GH * GW), GW), 1)
    return np.abs(yx[:, None] - yx[None]).max(2).astype(np.uint8)


def dilated_cells(changed: torch.Tensor, layers: int, distances: np.ndarray) -> list:
    """(540,) bool -> [the cells (numpy indices) within l cells of a changed one, for l = 0 .. layers]:
    what layer l must recompute, since a 3x3 convolution carries a change one cell further. `distances`:
    grid_distances() (read from a table: ~2.5x faster than dilating the mask with max-pools)."""
    near = distances[np.flatnonzero(changed.numpy())].min(0)
    return [np.flatnonzero(near <= l) for l in range(layers + 1)]


class FewPixelColours:
    """decode_colours for batch 1 on the CPU, in numpy, summing up only the uncertain pixels (a median of a
    few dozen a step): it takes the same decisions as LatentActionModel.decode_colours (each class's
    probability goes to the colour it gives the pixel, the last colour's multiplied by exp(keep_bias), the
    likeliest wins; a pixel whose keep class is sure keeps its colour), but that function's ~50 torch calls on
    a handful of cells cost ~1.1 ms a step in per-call overhead, this ~0.2 ms (session 23, README stage 3)."""

    def __init__(self, model: LatentActionModel):
        offsets = np.array(model.shift_offsets)
        self.reach = reach = int(np.abs(offsets).max())
        self.model, self.num_colors = model, model.num_colors   # keep_bias is read at each step: callers may set it
        self.frame = np.full((GH * CELL + 2 * reach, W + 2 * reach), 255, np.uint8)   # 255: outside the frame
        y = (np.arange(GH * GW) // GW)[:, None] * CELL + np.arange(CELL * CELL) // CELL    # (540, 64) pixel rows
        x = (np.arange(GH * GW) % GW)[:, None] * CELL + np.arange(CELL * CELL) % CELL
        self.inside = torch.from_numpy(y < H)                          # the padding rows below are never shown
        self.in_frame = (y + reach) * self.frame.shape[1] + x + reach  # where each pixel is in self.frame
        self.in_image = y * W + x
        self.shift_steps = -offsets[:, 0] * self.frame.shape[1] - offsets[:, 1]   # p - d, as a flat step

    def __call__(self, pixels: torch.Tensor, shifts: torch.Tensor, last_idx: torch.Tensor,
                 uncertain: torch.Tensor, continued: torch.Tensor | None = None) -> torch.Tensor:
        """(1, 540, 1 + num_colors, 64), (1, 540, S (+ 1)) logits, (1, 210, 160) last frame, (1, 540, 64) uncertain
        pixels, with the continue class (1, 210, 160) its frame -> (1, 210, 160) uint8."""
        out = last_idx.clone()
        cell, pix = np.divmod(np.flatnonzero((uncertain[0] & self.inside).numpy()), CELL * CELL)   # (2-d nonzero: ~15x slower)
        if not len(cell):
            return out
        r, nc = self.reach, self.num_colors
        self.frame[r:r + H, r:r + W] = last_idx[0].numpy()
        frame, at = self.frame.ravel(), self.in_frame[cell, pix]
        last = frame[at]                                                # (P,)
        src = frame[at[:, None] + self.shift_steps]                     # (P, S): the last frame at p - d
        src = np.where(src == 255, last[:, None], src)                  # outside the frame: the pixel's own
        if continued is not None:                                       # the continue class: its frame at p
            src = np.concatenate([src, continued[0].numpy().ravel()[self.in_image[cell, pix]][:, None]], 1)
        logits = np.concatenate([pixels[0].numpy()[cell, :, pix], shifts[0].numpy()[cell]], 1)
        odds = np.exp(logits - logits.max(1, keepdims=True))            # (P, classes), softmax's numerators
        # the colour each class gives the pixel: keep -> last, 1 + c -> c, shift d -> the last frame at p - d,
        # continue -> the continued frame at p
        colour_of = np.concatenate([last[:, None], np.broadcast_to(np.arange(nc), (len(cell), nc)), src], 1)
        row = np.arange(len(cell))
        mass = np.bincount((colour_of + row[:, None] * nc).ravel(), odds.ravel(), len(cell) * nc).reshape(-1, nc)
        mass[row, last] *= math.exp(self.model.keep_bias)
        out[0].numpy().ravel()[self.in_image[cell, pix]] = mass.argmax(1)
        return out


class _Cache:
    """One latent's state: its FiLM (scale + 1, shift) per block, every layer's activations (but the last's,
    which only the head reads) as a bordered (29 * 22, width) matrix, the head's logits and the decoding's decisions per cell, and the context (in
    grid_cells' layout) they were computed from."""

    def __init__(self, film: list, acts: list):
        self.film, self.acts = film, acts
        self.logits: torch.Tensor | None = None
        self.decisions: dict | None = None
        self.cells: torch.Tensor | None = None


class CachedDecoder:
    """predict_next(context_idx, codes, events) with LatentActionModel.predict_next's arguments and result.
    `max_latents`: how many latents keep a cache (least recently used dropped; ~3 MB each)."""

    def __init__(self, model: LatentActionModel, max_latents: int = 32):
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"the cached decoder step is for the CPU (the world model is on {device})")
        self.model, self.max_latents = model, max_latents
        self.caches: OrderedDict = OrderedDict()
        self.convs = 2 * len(model.dec.blocks)
        self.cells_computed = 0   # grid cells the convolutions computed, summed over layers (benchmarks, tests)
        self.rows, self.neighbours, self.distances = bordered_rows(), neighbour_rows(), grid_distances()
        self.params, self._weights_version = list(model.parameters()), None
        self.few_pixel_colours = FewPixelColours(model) if model.shift_offsets and not model.shift_gate else None

    def reset(self) -> None:
        self.caches.clear()

    def _read_weights(self) -> None:
        """The convolutions as (9 * width, width) matmul weights and the projection transposed, read again
        (and every cache dropped) whenever a parameter or the keep bias (the cached decisions read it) changed
        since they were read."""
        version = [p._version for p in self.params] + [self.model.keep_bias]
        if version == self._weights_version:
            return
        dec = self.model.dec
        self.kernels = [(conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.out_channels).contiguous(), conv.bias)
                        for blk in dec.blocks for conv in (blk.conv1, blk.conv2)]
        self.proj = dec.proj.weight.flatten(1).t().contiguous()
        self.pos = dec.pos.reshape(GH * GW, -1) if dec.pos is not None else None
        self.caches.clear()
        self._weights_version = version

    @torch.no_grad()
    def predict_next(self, context_idx: torch.Tensor, codes: torch.Tensor, events: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        if len(context_idx) != 1 or m.training:
            return m.predict_next(context_idx, codes, events)
        self._read_weights()
        ctx = context_idx[:, -m.context:]
        cells = grid_cells(ctx)[0].view(GH * GW, -1)                    # (540, k*64) uint8, a fresh copy
        event = int(events.view(-1)[0]) if events is not None and m.event_embed is not None else 0
        key = (tuple(codes.view(-1).tolist()), event)
        cache = self.caches.pop(key, None)
        if cache is None:
            cache = self._new_cache(m.condition(m.codes_to_latent(codes), events))
            changed = torch.ones(GH * GW, dtype=torch.bool)
        else:
            changed = changed_cells(cells, cache.cells)
        self.caches[key] = cache
        while len(self.caches) > self.max_latents:
            self.caches.popitem(last=False)
        if changed.any():
            self._update(cache, cells, changed)
        cache.cells = cells
        pixels, shifts = m.split_head(cache.logits)
        if self.few_pixel_colours is not None:
            uncertain = cache.decisions["uncertain"]
            continued = m.continued(ctx) if m.continue_motion and uncertain.any() else None
            return self.few_pixel_colours(pixels, shifts, ctx[:, -1], uncertain, continued)
        if m.shift_gate:
            return m.decode_gated(pixels, shifts, ctx[:, -1], **cache.decisions)
        return m.decode_pixels(None, ctx[:, -1], **cache.decisions)

    def _decisions(self, logits: torch.Tensor) -> dict:
        """What the model's decoding reads of each cell's logits (see the module's docstring)."""
        m = self.model
        pixels, shifts = m.split_head(logits)
        if self.few_pixel_colours is not None:
            return {"uncertain": m.uncertain_pixels(pixels, shifts)}
        out = {"change": m.pixel_changes(pixels.float().clone())}
        if m.shift_gate:
            out["gate"] = m.gate_choices(shifts)
        return out

    def _new_cache(self, cond: torch.Tensor) -> _Cache:
        dec = self.model.dec
        film = []
        for blk in dec.blocks:
            scale, shift = blk.film(cond)[0].chunk(2)
            film.append((1 + scale, shift))
        acts = [torch.zeros((GH + 2) * ROW, dec.proj.out_channels) for _ in range(self.convs)]   # layers 0 .. convs - 1
        return _Cache(film, acts)   # its first update computes every cell, and so its logits and decisions

    def _update(self, cache: _Cache, cells: torch.Tensor, changed: torch.Tensor) -> None:
        dec, acts = self.model.dec, cache.acts
        todo = dilated_cells(changed, self.convs, self.distances)   # index arithmetic in numpy: fewer torch calls
        # layer 0: embedding + projection (+ position), per cell, on the changed cells
        at = torch.from_numpy(todo[0])
        x = dec.embed.embed(cells.index_select(0, at).long()).flatten(1)
        x = torch.addmm(dec.proj.bias, x, self.proj)
        if self.pos is not None:
            x += self.pos.index_select(0, at)
        acts[0].index_copy_(0, torch.from_numpy(self.rows[todo[0]]), x)
        for layer in range(1, self.convs + 1):
            n = len(todo[layer])
            self.cells_computed += n
            rows = torch.from_numpy(self.rows[todo[layer]])
            kernel, bias = self.kernels[layer - 1]
            patches = acts[layer - 1].index_select(0, torch.from_numpy(self.neighbours[todo[layer]].ravel()))
            out = torch.addmm(bias, patches.view(n, -1), kernel)
            if layer % 2:   # ResBlock's first half: silu(conv1), FiLM, and the silu conv2 reads
                scale, shift = cache.film[(layer - 1) // 2]
                out = F.silu(F.silu(out, inplace=True).mul_(scale).add_(shift), inplace=True)
            else:           # second half: the residual sum
                out += acts[layer - 2].index_select(0, rows)
            if layer < self.convs:   # the last layer's output only feeds the head, right below
                acts[layer].index_copy_(0, rows, out)
        # the head and the decisions, per cell, where the last layer changed
        at = torch.from_numpy(todo[-1])
        out = self.model.head(out)[None]
        decisions = self._decisions(out)
        if len(at) == GH * GW:   # every cell (a new cache's first update)
            cache.logits, cache.decisions = out, decisions
            return
        cache.logits[0].index_copy_(0, at, out[0])
        for name, value in decisions.items():
            cache.decisions[name][0].index_copy_(0, at, value[0])
