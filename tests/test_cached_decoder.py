"""models/cached_decoder.py: the play step recomputed only where the frames changed must draw exactly what
LatentActionModel.predict_next draws, for each decoding (pixel classes, shift classes, shift gate, continue class), while computing less."""
import pytest
import torch

import numpy as np

from models.cached_decoder import GH, GW, CachedDecoder, changed_cells, dilated_cells, grid_distances
from models.world_model import LatentActionModel, cells_any, grid_cells

VARIANTS = {"shift classes": dict(shift_offsets=[[0, 3], [3, 0], [0, -3]]),
            "shift gate": dict(shift_offsets=[[0, 3], [3, 0]], shift_gate=True),
            "continue class": dict(shift_offsets=[[5, 4], [0, 8], [0, 3]], continue_motion=True),
            "pixel classes": {}}


def untrained_but_decisive(**kw) -> LatentActionModel:
    """A tiny decoder with two blocks (four convolutions, so a change reaches four cells) whose head is
    scaled up: an untrained model copies the last frame everywhere, which would hide a wrong cache."""
    torch.manual_seed(0)
    m = LatentActionModel(num_colors=5, context=2, width=16, depth=2, enc_width=8, enc_depth=1, codebook_size=4,
                          code_dim=8, head_hidden=32, positional=True, keep_bias=1.0,
                          event_places=[[124, 76], [125, 19]], **kw).eval()
    with torch.no_grad():
        m.head[-1].weight.mul_(30)
        m.event_embed.weight[1:] = torch.randn(2, m.code_dim)
        if m.dec.pos is not None:
            m.dec.pos.normal_()
    return m


def moving_frames(steps: int) -> torch.Tensor:
    """(steps, 210, 160) palette indices: a fixed random backdrop, a 4x2 ball crossing it diagonally, a
    paddle that moves now and then, a brick that vanishes once."""
    g = torch.Generator().manual_seed(1)
    back = torch.randint(0, 2, (210, 160), generator=g, dtype=torch.uint8)
    frames = []
    for t in range(steps):
        f = back.clone()
        f[20 + 5 * t:24 + 5 * t, 10 + 4 * t:12 + 4 * t] = 3
        f[190:194, 60 + 8 * (t // 3):76 + 8 * (t // 3)] = 4
        if t < steps // 2:
            f[60:66, 100:116] = 2
        frames.append(f)
    return torch.stack(frames)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoder_draws_what_predict_next_draws_and_computes_less(variant):
    m = untrained_but_decisive(**VARIANTS[variant])
    cache = CachedDecoder(m)
    frames = moving_frames(24)
    convs_full = 2 * len(m.dec.blocks) * GH * GW
    n = (m.num_colors + 1) * 64
    with torch.no_grad():
        for t in range(2, len(frames)):
            ctx = frames[None, t - 2:t]
            codes = torch.tensor([[t % 3]])                      # three latents take turns (three caches)
            events = torch.tensor([1 if t == 9 else 0])          # and one step with an event
            want = m.predict_next(ctx, codes, events)
            got = cache.predict_next(ctx, codes, events)
            assert torch.equal(got, want), f"step {t}: {(got != want).sum()} pixels differ"
            pixels, shifts = m.decode_split(ctx, m.condition(m.codes_to_latent(codes), events))
            kept = cache.caches[((t % 3,), int(events[0]))].logits
            assert torch.allclose(kept[..., :n].unflatten(2, pixels.shape[2:]), pixels, atol=1e-4)
            if shifts is not None:
                assert torch.allclose(kept[..., n:], shifts, atol=1e-4)
        assert (want != ctx[:, -1]).any()                                # the decoder does change the frame
    # each latent's first step computes the whole grid; after that only the cells a change reaches
    assert cache.cells_computed < 0.75 * convs_full * (len(frames) - 2)


def test_dilated_cells_are_the_cells_a_change_reaches_after_each_convolution():
    changed = torch.zeros(GH * GW, dtype=torch.bool)
    changed[3 * GW + 4] = changed[25 * GW + 15] = True      # the ball and, far from it, the paddle
    todo = dilated_cells(changed, 3, grid_distances())
    mask = changed.view(1, 1, GH, GW).float()
    assert np.array_equal(todo[0], changed.nonzero().squeeze(1).numpy())
    for layer in (1, 2, 3):   # what a 3x3 max-pool (the reach of a 3x3 convolution) grows the mask to
        mask = torch.nn.functional.max_pool2d(mask, 3, 1, 1)
        assert np.array_equal(todo[layer], mask.view(-1).nonzero().squeeze(1).numpy())
    assert len(todo[3]) == 7 * 7 + 7 * 5                    # a full square and one cut by the bottom edge
    assert [len(t) for t in dilated_cells(torch.ones(GH * GW, dtype=torch.bool), 2, grid_distances())] == [GH * GW] * 3


def test_a_batch_goes_through_predict_next():
    m = untrained_but_decisive(**VARIANTS["shift classes"])
    frames = moving_frames(4)
    ctx = torch.stack([frames[0:2], frames[1:3]])
    codes = torch.tensor([[0], [1]])
    assert torch.equal(CachedDecoder(m).predict_next(ctx, codes), m.predict_next(ctx, codes))


def test_changed_cells_reads_the_cells_whose_pixels_differ_in_any_frame():
    a = torch.randint(0, 5, (1, 2, 210, 160), dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 17, 9] += 1            # cell (2, 1) of the older frame
    b[0, 1, 209, 159] += 1         # the last cell row holds the frame's two last rows
    want = (cells_any((a != b).any(1))[0] > 0).flatten()
    got = changed_cells(grid_cells(a)[0].view(GH * GW, -1), grid_cells(b)[0].view(GH * GW, -1))
    assert want.sum() == 2 and torch.equal(got, want)


def test_the_cached_decoder_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="for the CPU"):
        CachedDecoder(untrained_but_decisive().to("meta"))   # the meta device stands in for a GPU in CI


def test_changed_weights_drop_the_caches():
    m = untrained_but_decisive(**VARIANTS["shift classes"])
    cache, frames = CachedDecoder(m), moving_frames(4)
    codes = torch.tensor([[1]])
    with torch.no_grad():
        cache.predict_next(frames[None, 0:2], codes)
        m.head[-1].bias.add_(torch.randn_like(m.head[-1].bias) * 30)   # as an optimizer step would
        assert torch.equal(cache.predict_next(frames[None, 1:3], codes), m.predict_next(frames[None, 1:3], codes))


def test_a_changed_keep_bias_is_used_at_once():
    """evaluate_world_model.py --keep_bias sets it on a built env: the cached step must decode with it too."""
    m = untrained_but_decisive(**VARIANTS["continue class"])
    cache, frames = CachedDecoder(m), moving_frames(6)
    codes = torch.tensor([[1]])
    with torch.no_grad():
        first = cache.predict_next(frames[None, 0:2], codes)
        drawn = []
        for bias in (0.0, 6.0):
            m.keep_bias = bias
            got = cache.predict_next(frames[None, 1:3], codes)
            assert torch.equal(got, m.predict_next(frames[None, 1:3], codes)), bias
            drawn.append(got)
    assert not torch.equal(drawn[0], drawn[1]) and first.shape == drawn[0].shape   # the bias does change the frame
