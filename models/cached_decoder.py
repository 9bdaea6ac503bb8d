"""The world model's play step, recomputed only where the frames changed.

One decoder step (LatentActionModel.predict_next, batch 1) runs every layer over the whole 27x20 grid, yet
from one step to the next Breakout changes the ball's cells, the paddle's when it moves, and now and then a
brick and the score. Every decoder layer is per cell (the embedding, the projection, the head) or a 3x3
convolution, so a cell's logits can only change within `2 * depth` cells of a cell whose context frames
changed. CachedDecoder keeps every layer's activations from the last step that used the same latent (FiLM
conditions each block on the latent, so there is one cache per (codes, event)), compares the context with
the one that cache was made from, and recomputes each layer on boxes around the changed cells only, growing
the boxes by one cell per convolution. It computes the same function: its frames equal predict_next's
(tests/test_cached_decoder.py; the sums can differ in float rounding, which an argmax sees only at an exact
tie). Used on the CPU, where the step is compute-bound (benchmarks/play_speed.py measures both).
What each decoding reads of a cell's logits is a function of those logits alone (decode_colours: whether
the cell is uncertain; decode_pixels: its change classes; decode_gated: those and its gate's choice), so it
is kept per cell too and only the recomputed cells' is redone. A batch of more than one, or a model in
training mode, goes through predict_next unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from models.world_model import CELL, H, PAD_H, W, LatentActionModel, cells_any, grid_cells

GH, GW = (H + PAD_H) // CELL, W // CELL   # the 27x20 grid
MANY_CHANGES = 48   # change_boxes: more changed cells than this get one box (dream steps: median 14, at most 32)


def grow(box: tuple, n: int) -> tuple:
    """(y0, y1, x0, x1) grid box, end exclusive -> the same box n cells wider on every side, inside the grid."""
    y0, y1, x0, x1 = box
    return max(0, y0 - n), min(GH, y1 + n), max(0, x0 - n), min(GW, x1 + n)


def changed_cells(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two (1, k, 210, 160) uint8 contexts -> (27, 20) bool: the grid cells where any of their frames differ."""
    return cells_any((a != b).any(1))[0] > 0


def change_boxes(changed: torch.Tensor, reach: int) -> list:
    """(27, 20) bool of changed cells -> boxes covering them, one per cluster: cells whose boxes grown by
    `reach` (the cells their change can reach) overlap share one box, so no output cell is computed twice
    for the same change, and far-apart changes (the ball, the paddle) do not pay for the space between them.
    Beyond MANY_CHANGES cells (a new start, a cut) one box around them all: the greedy merge is cubic in the
    number of boxes, and a change that large costs about the whole grid anyway."""
    boxes = [(y, y + 1, x, x + 1) for y, x in changed.nonzero().tolist()]
    if len(boxes) > MANY_CHANGES:
        ys, xs = [b[0] for b in boxes], [b[2] for b in boxes]
        return [(min(ys), max(ys) + 1, min(xs), max(xs) + 1)]
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = grow(boxes[i], reach), grow(boxes[j], reach)
                if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                    p, q = boxes[i], boxes.pop(j)
                    boxes[i] = (min(p[0], q[0]), max(p[1], q[1]), min(p[2], q[2]), max(p[3], q[3]))
                    merged = True
                    break
            if merged:
                break
    return boxes


class _Cache:
    """One latent's state: its FiLM (scale, shift) per block, every layer's activations on the grid with a
    zero border (what the convolutions pad with), the head's logits and the decoding's decisions per cell,
    and the context frames they were computed from."""

    def __init__(self, film: list, acts: list, logits: torch.Tensor, decisions: dict):
        self.film, self.acts, self.logits, self.decisions = film, acts, logits, decisions
        self.context: torch.Tensor | None = None


class CachedDecoder:
    """predict_next(context_idx, codes, events) with LatentActionModel.predict_next's arguments and result.
    `max_latents`: how many latents keep a cache (least recently used dropped; ~3 MB each)."""

    def __init__(self, model: LatentActionModel, max_latents: int = 32):
        self.model, self.max_latents = model, max_latents
        self.caches: OrderedDict = OrderedDict()
        self.convs = 2 * len(model.dec.blocks)
        self.cells_computed = 0   # grid cells the convolutions computed, summed over layers (benchmarks, tests)

    def reset(self) -> None:
        self.caches.clear()

    @torch.no_grad()
    def predict_next(self, context_idx: torch.Tensor, codes: torch.Tensor, events: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        if len(context_idx) != 1 or m.training:
            return m.predict_next(context_idx, codes, events)
        ctx = context_idx[:, -m.context:]
        event = int(events.view(-1)[0]) if events is not None and m.event_embed is not None else 0
        key = (tuple(codes.view(-1).tolist()), event)
        cache = self.caches.pop(key, None)
        if cache is None:
            cache = self._new_cache(m.condition(m.codes_to_latent(codes), events), ctx.device)
            boxes = [(0, GH, 0, GW)]
        else:
            changed = changed_cells(ctx, cache.context)
            boxes = change_boxes(changed, self.convs) if changed.any() else []
        self.caches[key] = cache
        while len(self.caches) > self.max_latents:
            self.caches.popitem(last=False)
        if boxes:
            self._update(cache, ctx, boxes)
        cache.context = ctx.clone()
        pixels, shifts = self._split(cache.logits)
        if m.shift_offsets and not m.shift_gate:
            return m.decode_colours(pixels, shifts, ctx[:, -1], uncertain=cache.decisions["uncertain"])
        if m.shift_gate:
            return m.decode_gated(pixels, shifts, ctx[:, -1], **cache.decisions)
        return m.decode_pixels(None, ctx[:, -1], **cache.decisions)

    def _split(self, logits: torch.Tensor):
        """Head output (1, n, N) -> (pixel logits (1, n, 1 + num_colors, 64), shift logits (1, n, S))."""
        n = (self.model.num_colors + 1) * CELL * CELL
        return logits[..., :n].unflatten(2, (self.model.num_colors + 1, CELL * CELL)), logits[..., n:]

    def _decisions(self, logits: torch.Tensor) -> dict:
        """What the model's decoding reads of each cell's logits (see the module's docstring)."""
        m, (pixels, shifts) = self.model, self._split(logits)
        if m.shift_offsets and not m.shift_gate:
            return {"uncertain": m.uncertain_cells(pixels, shifts)}
        out = {"change": m.pixel_changes(pixels.float().clone())}
        if m.shift_gate:
            out["gate"] = m.gate_choices(shifts)
        return out

    def _new_cache(self, cond: torch.Tensor, device) -> _Cache:
        dec, m = self.model.dec, self.model
        film = [blk.film(cond)[:, :, None, None].chunk(2, dim=1) for blk in dec.blocks]
        width = dec.proj.out_channels
        acts = [torch.zeros(1, width, GH + 2, GW + 2, device=device).to(memory_format=torch.channels_last)
                for _ in range(self.convs + 1)]
        logits = torch.zeros(1, GH * GW, m.head[-1].out_features, device=device)
        return _Cache(film, acts, logits, self._decisions(logits))   # placeholders: the first update fills all

    def _update(self, cache: _Cache, ctx: torch.Tensor, boxes: list) -> None:
        m, dec, acts = self.model, self.model.dec, cache.acts
        cells = grid_cells(ctx)                                        # (1, 27, 20, k*64) uint8
        for y0, y1, x0, x1 in boxes:   # layer 0: embedding + projection (+ position), per cell
            x = F.linear(dec.embed.embed(cells[:, y0:y1, x0:x1].long()).flatten(3), dec.proj.weight.flatten(1), dec.proj.bias)
            if dec.pos is not None:
                x = x + dec.pos[:, y0:y1, x0:x1]
            acts[0][:, :, y0 + 1:y1 + 1, x0 + 1:x1 + 1] = x.permute(0, 3, 1, 2)
        for layer in range(1, self.convs + 1):
            blk = dec.blocks[(layer - 1) // 2]
            for box in boxes:
                y0, y1, x0, x1 = grow(box, layer)
                self.cells_computed += (y1 - y0) * (x1 - x0)
                # the box and its 1-cell halo (padded coords), convolved without padding: the halo is it
                inp = acts[layer - 1][:, :, y0:y1 + 2, x0:x1 + 2]
                if layer % 2:   # ResBlock's first half: silu(conv1), FiLM, and the silu conv2 reads
                    scale, shift = cache.film[(layer - 1) // 2]
                    out = F.silu(F.silu(F.conv2d(inp, blk.conv1.weight, blk.conv1.bias)) * (1 + scale) + shift)
                else:           # second half: the residual sum
                    out = acts[layer - 2][:, :, y0 + 1:y1 + 1, x0 + 1:x1 + 1] + F.conv2d(inp, blk.conv2.weight, blk.conv2.bias)
                acts[layer][:, :, y0 + 1:y1 + 1, x0 + 1:x1 + 1] = out
        for box in boxes:   # the head and the decisions, per cell, where the last layer changed
            y0, y1, x0, x1 = grow(box, self.convs)
            h = acts[-1][0, :, y0 + 1:y1 + 1, x0 + 1:x1 + 1].permute(1, 2, 0).reshape(-1, acts[-1].shape[1])
            out = m.head(h)[None]
            idx = (torch.arange(y0, y1)[:, None] * GW + torch.arange(x0, x1)).flatten().to(out.device)
            cache.logits[:, idx] = out
            for name, value in self._decisions(out).items():
                cache.decisions[name][:, idx] = value
