import json

import numpy as np
import pytest
import torch

import gameplay_data as gd
from common import UserError
from collect_action_latent_pairs import ENCODER_PARTS
from conftest import TINY_WM, run_script
import metrics
from models.world_model import (GridNet, LatentActionModel, Palette, add_speckle, apply_change, change_target,
                                continued_frame, fit_shift_offsets, from_cells, keep_bias_for, load_world_model, motion_weights,
                                near_cells, read_weights, save_weights, spatial_soft_argmax, to_cells)


def tiny_model(**kw):
    return LatentActionModel(num_colors=6, context=2, width=16, depth=1, enc_width=16, enc_depth=1,
                             codebook_size=4, code_dim=8, head_hidden=32, **kw)


def test_shapes_value_ranges_and_copy_start():
    torch.manual_seed(0)
    m = tiny_model().eval()
    ctx = torch.randint(0, 6, (3, 2, 210, 160), dtype=torch.uint8)
    nxt = torch.randint(0, 6, (3, 210, 160), dtype=torch.uint8)
    cells, codes, commit, _ = m(ctx, nxt)
    assert cells.shape == (3, 540, 7, 64) and codes.shape == (3, 1) and commit.numel() == 1
    assert codes.min() >= 0 and codes.max() < 4
    pred = m.predict_next(ctx, codes)
    assert pred.shape == (3, 210, 160) and pred.dtype == torch.uint8 and pred.max() < 6
    # an untrained decoder starts as "copy the last frame" (the strong baseline)
    assert (pred == ctx[:, -1]).float().mean() > 0.99


def test_cell_layout_round_trip_and_change_classes():
    img = torch.randint(0, 250, (2, 210, 160), dtype=torch.uint8)
    assert torch.equal(from_cells(to_cells(img)), img)
    last = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    nxt = torch.tensor([[1, 5, 0]], dtype=torch.uint8)
    target = change_target(last, nxt)
    assert target.tolist() == [[0, 6, 1]]
    assert torch.equal(apply_change(last, target), nxt)


def test_channels_last_frame_embedding_matches_pixel_unshuffle_and_a_1x1_conv():
    """The grid input is built channels-last and projected by a matmul (fast); it must be the same numbers
    as the layout the shipped weights were trained with: pixel_unshuffle, embedding, then the 1x1 conv."""
    torch.manual_seed(0)
    net = tiny_model().dec
    idx = torch.randint(0, 6, (2, 2, 210, 160), dtype=torch.uint8)
    cells = torch.nn.functional.pixel_unshuffle(torch.nn.functional.pad(idx, (0, 0, 0, 6)), 8)
    reference = net.proj(net.embed.embed(cells.long()).permute(0, 1, 4, 2, 3).flatten(1, 2))
    ours = net.embed_project(idx)
    assert ours.shape == reference.shape == (2, 16, 27, 20)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_motion_weight_is_larger_exactly_where_frames_change():
    last = torch.zeros(1, 210, 160, dtype=torch.uint8)
    nxt = last.clone()
    nxt[0, 100:104, 50:52] = 3     # the ball appears
    w = motion_weights(last, nxt, 10.0)
    assert torch.all(w[0, 100:104, 50:52] == 11.0)
    assert (w == 11.0).sum() == 8 and torch.all(w[w != 11.0] == 1.0)


def test_keep_bias_undoes_the_motion_weighting():
    """Fit free per-class logits with the training loss to pixels that change 20 % of the time: the weighted
    loss makes the raw argmax say 'change' (0.2 * 11 > 0.8); with keep_bias_for(10) added it says 'keep'."""
    torch.manual_seed(0)
    last = torch.zeros(4, 210, 160, dtype=torch.uint8)
    nxt = torch.where(torch.rand(4, 210, 160) < 0.2, 2, 0).to(torch.uint8)
    m = tiny_model()
    logits = torch.zeros(7, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        cells = logits[None, None, :, None].expand(4, 540, 7, 64)
        loss = m.cell_loss(cells, last, nxt, motion_weight=10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    change_vs_keep = (logits[3] - logits[0]).item()       # class 1 + colour 2
    frac = (nxt != 0).float().mean().item()
    assert change_vs_keep == pytest.approx(np.log(frac * 11 / (1 - frac)), abs=0.05)
    assert change_vs_keep > 0 and change_vs_keep - keep_bias_for(10.0) < 0
    assert keep_bias_for(10.0) == pytest.approx(np.log(11))


def test_cell_scale_weighs_the_cells_near_the_ball_and_nothing_else():
    """near_cells marks the 3x3 grid cells around a marked pixel; cell_loss's cell_scale multiplies exactly
    those cells' pixel weights (a uniform scale leaves the normalised loss as it was)."""
    mask = torch.zeros(1, 210, 160, dtype=torch.bool)
    mask[0, 100, 50] = True                                      # grid cell (12, 6)
    near = near_cells(mask)
    assert near.shape == (1, 27, 20) and near.sum() == 9 and near[0, 11:14, 5:8].all()
    torch.manual_seed(0)
    m = tiny_model()
    last = torch.randint(0, 6, (1, 210, 160), dtype=torch.uint8)
    nxt = torch.where(torch.rand(1, 210, 160) < 0.1, torch.randint(0, 6, (1, 210, 160), dtype=torch.uint8), last)
    cells = torch.randn(1, 540, 7, 64)
    plain = m.cell_loss(cells, last, nxt, 10.0)
    assert m.cell_loss(cells, last, nxt, 10.0, torch.full((1, 27, 20), 3.0)) == pytest.approx(plain.item(), rel=1e-5)
    scale = 1 + 4 * near
    ce = torch.nn.functional.cross_entropy(cells.flatten(0, 1), to_cells(change_target(last, nxt)).flatten(0, 1),
                                           reduction="none").view(1, 540, 64)
    w = to_cells(motion_weights(last, nxt, 10.0)) * to_cells(torch.ones(1, 210, 160)) * scale.flatten(1)[..., None]
    assert m.cell_loss(cells, last, nxt, 10.0, scale) == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)


def test_ball_drawn_counts_tell_a_whole_ball_from_a_near_one_and_a_missing_one():
    colors = np.array([[0, 0, 0], [200, 72, 72], [142, 142, 142]], np.uint8)
    real = torch.zeros(4, 210, 160, dtype=torch.uint8)
    real[:3, 120:124, 60:62] = 1                                  # a ball in three frames, none in the last
    pred = torch.zeros_like(real)
    pred[0, 120:124, 60:62] = 1                                   # whole
    pred[1, 121:125, 61:63] = 1                                   # one px off: in place, not whole
    pred[2, 120:124, 70:72] = 1                                   # 10 px off
    pred[3, 150:154, 30:32] = 1                                   # a ball where there is none: not counted here
    assert metrics.ball_drawn_counts(pred, real, colors) == {"real_ball": 3, "ball_in_place": 2, "ball_whole": 1}
    assert torch.equal(metrics.ball_corner(real, colors)[0], torch.tensor([120.0, 60.0]))
    assert torch.isnan(metrics.ball_corner(real, colors)[3]).all()


def moving_objects(steps: int = 6) -> torch.Tensor:
    """(steps, 210, 160) palette indices on background 0: a 4x2 'ball' (colour 1) moving (4, 6) a step and a
    4x16 'paddle' (colour 2) moving (0, 8) a step."""
    frames = torch.zeros(steps, 210, 160, dtype=torch.uint8)
    for t in range(steps):
        frames[t, 60 + 4 * t:64 + 4 * t, 30 + 6 * t:32 + 6 * t] = 1
        frames[t, 189:193, 20 + 8 * t:36 + 8 * t] = 2
    return frames


def test_shift_offsets_are_fitted_to_how_objects_move_and_shift_sources_move_them():
    f = moving_objects()
    offsets = fit_shift_offsets(f[:-1], f[1:], 2)
    assert sorted(offsets) == [[0, 8], [4, 6]]   # the blurred neighbours (e.g. (4, 5)) explain no whole cell
    cells = tiny_model(shift_offsets=[[4, 6], [0, 8], [-3, 0]]).shift_sources_cells(f[:-1])   # (5, 540, 3, 64)
    src = torch.stack([from_cells(cells[:, :, i]) for i in range(3)], 1)
    assert src.shape == (5, 3, 210, 160)
    ball, paddle = (f[1:] == 1), (f[1:] == 2)
    assert torch.equal(src[:, 0][ball], f[1:][ball]) and torch.equal(src[:, 1][paddle], f[1:][paddle])
    assert torch.equal(src[:, 2, :, :][:, -3:], f[:-1, -3:])   # a source outside the frame: the pixel's own colour


def test_continued_frame_moves_each_object_by_its_own_last_step():
    f = moving_objects(3)
    cont = continued_frame(f[:2], f[1:2].expand(2, -1, -1).clone(), [[4, 4], [4, 6], [0, 8]])
    ball = (f[2] == 1)
    assert torch.equal(cont[0] == 1, ball)             # the ball's (4, 6) step taken again, its old place cleared
    assert torch.equal(cont[1], f[1])                  # nothing changed between the two frames: nothing moves
    # a 4-row ball stepping (6, 4) also fits (4, 4) at half its pixels: the neighbours' votes decide
    prev, last = torch.zeros(2, 1, 210, 160, dtype=torch.uint8).unbind(0)
    prev[0, 100:104, 50:52], last[0, 106:110, 54:56] = 1, 1
    want = torch.zeros_like(last)
    want[0, 112:116, 58:60] = 1
    assert torch.equal(continued_frame(prev, last, [[4, 4], [6, 4]]), want)
    # a pixel no offset explains stays where it is
    last[0, 10, 10] = 2
    assert continued_frame(prev, last, [[4, 4], [6, 4]])[0, 10, 10] == 2


def test_the_continue_class_draws_the_continued_frame_and_counts_as_right_where_it_is():
    torch.manual_seed(0)
    m = tiny_model(keep_bias=keep_bias_for(10.0), shift_offsets=[[4, 4], [4, 6]], continue_motion=True).eval()
    assert m.head[-1].out_features == 7 * 64 + 3 and m.hparams["continue_motion"]
    f = moving_objects(3)
    ctx, nxt = f[None, :2], f[2:3]
    cont = m.continued(ctx)
    cells = torch.full((1, 540, 7 + 3, 64), -20.0)
    cells[:, :, 0] = 5.0
    moved = to_cells((ctx[:, -1] != cont).float()).amax(-1) > 0           # where the continued frame differs
    cells[0, moved[0], 0], cells[0, moved[0], 9] = 0.0, 6.0               # the continue class wins there
    assert torch.equal(m.decode_colours(cells[:, :, :7], cells[:, :, 7:, 0], ctx[:, -1], continued=cont), cont)
    with pytest.raises(ValueError, match="continued frame"):
        m.decode_colours(cells[:, :, :7], cells[:, :, 7:, 0], ctx[:, -1])
    loss = m.cell_loss(cells, ctx[:, -1], nxt, 10.0, continued=cont)
    p = torch.softmax(cells, 2)
    right = torch.nn.functional.one_hot(to_cells(change_target(ctx[:, -1], nxt)), 7).transpose(2, 3).bool()
    right = torch.cat([right, m.shift_sources_cells(ctx[:, -1], cont) == to_cells(nxt)[:, :, None]], 2)
    ball_cells = to_cells(((ctx[:, -1] == 1) | (nxt == 1)).float()).amax(-1) > 0
    assert right[:, :, 9].all(-1)[ball_cells].all()                  # the ball's cells: continuing is right
    w = to_cells(motion_weights(ctx[:, -1], nxt, 10.0)) * to_cells(torch.ones(1, 210, 160))
    assert loss.item() == pytest.approx(((-(p * right).sum(2).log() * w).sum() / w.sum()).item(), rel=1e-4)
    with pytest.raises(ValueError, match="needs shift offsets"):
        tiny_model(continue_motion=True)


def test_shift_classes_decode_a_moving_object_whole_and_keep_the_calibrated_decision():
    torch.manual_seed(0)
    m = tiny_model(keep_bias=keep_bias_for(10.0), shift_offsets=[[4, 6], [0, 8]]).eval()
    f = moving_objects(2)
    last, nxt = f[:1], f[1:]
    cells = torch.full((1, 540, 7 + 2, 64), -20.0)
    cells[:, :, 0] = 5.0                                                  # keep everything ...
    moved = to_cells((last != nxt).float()).amax(-1) > 0                  # ... but where the objects move
    cells[0, moved[0], 0] = 0.0
    cells[0, moved[0], 7] = 3.0          # shift (4, 6): every pixel of these cells at once (the paddle too: a
    cells[0, moved[0], 8] = 3.0          # cell takes whichever offset explains it, both are equally likely)
    ball_cells = to_cells(((last == 1) | (nxt == 1)).float()).amax(-1)[0] > 0
    cells[0, ball_cells, 7] = 6.0
    paddle_cells = to_cells(((last == 2) | (nxt == 2)).float()).amax(-1)[0] > 0
    cells[0, paddle_cells, 8] = 6.0
    assert torch.equal(m.decode_colours(cells[:, :, :7], cells[:, :, 7:, 0], last), nxt)
    # the loss counts every right class: -log of their summed probability
    loss = m.cell_loss(cells, last, nxt, 10.0)
    p = torch.softmax(cells, 2)
    target = to_cells(change_target(last, nxt))
    right = torch.nn.functional.one_hot(target, 7).transpose(2, 3).bool()
    right = torch.cat([right, m.shift_sources_cells(last) == to_cells(nxt)[:, :, None]], 2)
    w = to_cells(motion_weights(last, nxt, 10.0)) * to_cells(torch.ones(1, 210, 160))
    manual = (-(p * right).sum(2).log() * w).sum() / w.sum()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-4)
    # with no probability on the shift classes, the decision is the plain path's (keep logit + keep_bias)
    rand = torch.randn(2, 540, 9, 64) * 3
    rand[:, :, 7:] = -1e9
    ctx = torch.randint(0, 6, (2, 2, 210, 160), dtype=torch.uint8)
    rand.scatter_(2, 1 + to_cells(ctx[:, -1]).long()[:, :, None], -1e9)   # "become the colour it has" is no class
    plain = rand[:, :, :7].clone()
    plain[:, :, 0] += m.keep_bias
    assert torch.equal(m.decode_colours(rand[:, :, :7], rand[:, :, 7:, 0], ctx[:, -1]),
                       apply_change(ctx[:, -1], from_cells(plain.max(2).indices.to(torch.uint8))))
    # with mass on them, only the cells with an unsure keep are summed up: the same as summing every cell
    rand = torch.randn(2, 540, 9, 64) * 3
    rand[:, :, 7:] = torch.randn(2, 540, 2, 1) * 3
    rand[:, :200, 0] += 8                                                 # most cells sure to keep, as in play
    p = torch.softmax(rand, 2)
    last = to_cells(ctx[:, -1]).long()[:, :, None]
    colour = p[:, :, 1:7].clone()
    colour.scatter_add_(2, last, p[:, :, :1])
    colour.scatter_add_(2, m.shift_sources_cells(ctx[:, -1]).long(), p[:, :, 7:])
    colour.scatter_(2, last, colour.gather(2, last) * np.exp(m.keep_bias))
    assert torch.equal(m.decode_colours(rand[:, :, :7], rand[:, :, 7:, 0], ctx[:, -1]),
                       from_cells(colour.argmax(2).to(torch.uint8)))
    # the uncertain pixels (their max-based pre-filter skips the exps where no class comes near): p(keep) at
    # most 1 / (1 + exp(keep_bias)), as the whole softmax says, on logits of every scale
    for scale in (0.3, 3.0, 30.0):
        rand = torch.randn(2, 540, 9, 64) * scale
        rand[:, :, 7:] = torch.randn(2, 540, 2, 1) * scale
        rand[:, :300, 0] += 2 * scale
        p_keep = torch.softmax(torch.cat([rand[:, :, :7], rand[:, :, 7:, :1].expand(-1, -1, -1, 64)], 2), 2)[:, :, 0]
        got = m.uncertain_pixels(rand[:, :, :7], rand[:, :, 7:, 0])
        assert torch.equal(got, p_keep <= 1 / (1 + np.exp(m.keep_bias))) and 0 < got.float().mean() < 1


def test_keep_tiebreak_moves_a_static_cell_from_a_same_colour_shift_to_keep():
    """Keep and a shift whose source has the same colour are both right where nothing changes, so the plain
    loss has no gradient between them; the tie-break adds t * -log p(keep) in the cells where nothing changes,
    and only there (in a changing cell one shift stays as good as keep at its unchanged pixels)."""
    torch.manual_seed(0)
    m = tiny_model(keep_bias=keep_bias_for(10.0, 0.1), shift_offsets=[[4, 6], [0, 8]])
    assert m.keep_bias == pytest.approx(np.log(10.0))                  # log(1 + 10) - log(1 + 0.1)
    f = moving_objects(2)
    last, nxt = f[:1], f[1:]
    logits = torch.full((1, 540, 7 + 2, 64), -5.0)
    logits[:, :, 7] = 4.0                                               # a from-scratch model: mass on shift (4, 6)
    target = to_cells(change_target(last, nxt))
    w = to_cells(motion_weights(last, nxt, 10.0)) * to_cells(torch.ones(1, 210, 160))
    p_keep = torch.softmax(logits, 2)[:, :, 0]
    plain, tied = (m.cell_loss(logits, last, nxt, 10.0, keep_tiebreak=t) for t in (0.0, 0.1))
    extra = (0.1 * (target == 0).all(-1, keepdim=True) * -p_keep.log() * w).sum() / w.sum()
    assert tied.item() == pytest.approx((plain + extra).item(), rel=1e-4)
    both_right = (target == 0) & (m.shift_sources_cells(last) == to_cells(nxt)[:, :, None]).all(2)
    static = (both_right & (w > 0)).all(-1)[0]                          # whole cells where keep and both shifts are right
    assert 400 < static.sum() < 540
    moving = (target != 0).any(-1)[0]
    grads = []
    for t in (0.0, 0.1):
        x = logits.clone().requires_grad_()
        m.cell_loss(x, last, nxt, 10.0, keep_tiebreak=t).backward()
        grads.append(x.grad[0])
    assert grads[0][static, 0].abs().max() < 1e-9 < (-grads[1][static, 0]).min()   # only the tie-break raises keep there
    assert moving.sum() >= 4 and torch.equal(grads[0][moving], grads[1][moving])


def test_shift_gate_targets_loss_and_decoding_copy_a_moving_object_whole():
    torch.manual_seed(0)
    m = tiny_model(keep_bias=keep_bias_for(10.0), shift_offsets=[[4, 6], [0, 8], [-3, 0]], shift_gate=True).eval()
    assert m.hparams["shift_gate"] and "shift_gate" not in tiny_model(shift_offsets=[[4, 6]]).hparams
    f = moving_objects(2)
    last, nxt = f[:1], f[1:]
    right = m.shift_gate_targets(last, nxt)                               # (1, 540, 1 + 3)
    changed = (to_cells(last) != to_cells(nxt)).any(-1)[0]
    ball_cells = to_cells(((last == 1) | (nxt == 1)).float()).amax(-1)[0] > 0
    paddle_cells = to_cells(((last == 2) | (nxt == 2)).float()).amax(-1)[0] > 0
    assert changed.any() and torch.equal(right[0, ~changed], torch.tensor([[True, False, False, False]]).expand(int((~changed).sum()), 4))
    assert right[0, ball_cells & changed, 1].all() and right[0, paddle_cells & changed, 2].all()
    assert not right[0, ball_cells, 3].any() and right.any(-1).all()    # (-3, 0) does not move the ball; every cell has an answer
    # a cell whose change no shift explains is the pixel classes' (a pixel that appears from nowhere)
    odd = nxt.clone()
    odd[0, 60, 60] = 4
    assert right.shape == m.shift_gate_targets(last, odd).shape and m.shift_gate_targets(last, odd)[0, 7 * 20 + 7].tolist() == [True, False, False, False]
    # loss: -log of the gate's summed probability of the right choices, mean over cells; logit 0 = the pixel classes
    shifts = torch.randn(1, 540, 3)
    logits = torch.cat([torch.zeros(1, 540, 1), shifts], -1)
    manual = -(torch.softmax(logits, -1) * right).sum(-1).log().mean()
    assert m.shift_gate_loss(shifts, last, nxt).item() == pytest.approx(manual.item(), rel=1e-5)
    # decoding: the pixel classes say "keep" everywhere (they cannot move the objects), the gate picks the shift
    pixels = torch.full((1, 540, 7, 64), -20.0)
    pixels[:, :, 0] = 5.0
    gate = torch.full((1, 540, 3), -5.0)
    gate[0, ball_cells & changed, 0] = 2.0
    gate[0, paddle_cells & changed, 1] = 2.0
    assert torch.equal(m.decode_gated(pixels, gate, last), nxt)
    # where no shift beats the pixel classes' logit 0, the decision is the plain path's (keep logit + keep_bias)
    rand = torch.randn(2, 540, 7, 64) * 3
    ctx = torch.randint(0, 6, (2, 2, 210, 160), dtype=torch.uint8)
    plain = rand.clone()
    plain[:, :, 0] += m.keep_bias
    assert torch.equal(m.decode_gated(rand, torch.full((2, 540, 3), -0.1), ctx[:, -1]),
                       apply_change(ctx[:, -1], from_cells(plain.max(2).indices.to(torch.uint8))))
    # the model's own loss is the pixels' cross-entropy plus gate_weight times the gate's
    cells = torch.cat([pixels, gate[..., None].expand(-1, -1, -1, 64)], 2)
    base = m.cell_loss(cells, last, nxt, 10.0, gate_weight=0.0)
    assert m.cell_loss(cells, last, nxt, 10.0, gate_weight=0.5).item() == pytest.approx(
        base.item() + 0.5 * m.shift_gate_loss(gate, last, nxt).item(), rel=1e-5)


def test_keep_bias_is_applied_when_decoding_and_derived_for_older_weights(tmp_path):
    torch.manual_seed(0)
    ctx = torch.randint(0, 6, (2, 2, 210, 160), dtype=torch.uint8)
    codes = torch.zeros(2, 1, dtype=torch.long)
    m = tiny_model(keep_bias=0.0).eval()
    with torch.no_grad():
        m.head[-1].bias.view(7, 64)[0] -= 6.0       # now the raw argmax changes pixels everywhere
    assert (m.predict_next(ctx, codes) == ctx[:, -1]).float().mean() < 0.5
    m.keep_bias = 100.0
    assert torch.equal(m.predict_next(ctx, codes), ctx[:, -1])
    # weights saved before keep_bias was stored get the correction for the loss they were trained with
    hp = {k: v for k, v in tiny_model().hparams.items() if k != "keep_bias"}
    meta = {"kind": "world_model", "game": "breakout", "hparams": hp, "config": {"motion_weight": 4.0},
            "palette": np.zeros((6, 3), np.uint8).tolist()}
    save_weights(tmp_path / "old.safetensors", tiny_model(), meta)
    assert load_world_model(tmp_path / "old.safetensors")[0].keep_bias == pytest.approx(np.log(5.0))


def test_positional_grid_tells_empty_cells_apart_and_soft_argmax_finds_a_feature():
    torch.manual_seed(0)
    blank = torch.zeros(1, 2, 210, 160, dtype=torch.uint8)
    plain = GridNet(6, 2, 8, 1, 4)(blank)[0]
    # translation-equivariant: two interior cells of an empty screen look the same...
    assert torch.allclose(plain[:, 10, 5], plain[:, 15, 12], atol=1e-6)
    net = GridNet(6, 2, 8, 1, 4, positional=True)
    with torch.no_grad():
        net.pos.normal_()
    pos = net(blank)[0]
    # ...unless each cell carries its own learned embedding
    assert not torch.allclose(pos[:, 10, 5], pos[:, 15, 12], atol=1e-3)
    h = torch.zeros(1, 2, 27, 20)
    h[0, 0, 26, 0] = h[0, 1, 0, 19] = 50.0              # channel 0 fires bottom-left, channel 1 top-right
    yx = spatial_soft_argmax(h)[0]                       # (y0, y1, x0, x1)
    assert torch.allclose(yx, torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)


def test_a_rare_kind_of_transition_keeps_its_own_code_only_with_a_low_dead_code_threshold():
    """The dead-code threshold counts uses per batch: at batch 32 a threshold of 2 re-seeds every code used by
    fewer than 6% of the transitions, so a 2%-rare event (the ball's serve) never keeps a code of its own."""
    def own_code(dead_code, seed):
        torch.manual_seed(seed)
        vq = tiny_model(dead_code=dead_code).train().vq
        centers = torch.randn(4, 8) * 3                      # 3 common kinds (32% each) and a rare one (2%)
        for _ in range(300):
            kind = torch.multinomial(torch.tensor([0.33, 0.33, 0.32, 0.02]), 32, replacement=True)
            vq(centers[kind][:, None] + 0.1 * torch.randn(32, 1, 8))
        codes = vq.eval()(centers[:, None])[1].flatten()
        return codes[3] not in codes[:3]
    assert sum(own_code(1e-4, s) for s in range(6)) >= 4   # the training default
    assert sum(own_code(2.0, s) for s in range(6)) <= 1


def test_speckle_noise_persists_across_context_frames_and_stays_on_palette():
    torch.manual_seed(0)
    ctx = torch.zeros(64, 2, 210, 160, dtype=torch.uint8)
    assert torch.equal(add_speckle(ctx, 0.0, 0.01, 6), ctx)
    noisy = add_speckle(ctx, 1.0, 0.01, 6)
    assert torch.equal(noisy[:, 0], noisy[:, 1]) and noisy.max() < 6
    share = (noisy[:, -1] != 0).float().mean((1, 2))
    assert share.max() < 0.01 and share.mean() > 0.002     # up to the density, ~5/6 of the picks visible
    half = (add_speckle(ctx, 0.5, 0.01, 6)[:, -1] != 0).flatten(1).any(1).float().mean()
    assert 0.25 < half < 0.75


def test_palette_maps_rgb_exactly_and_unseen_colours_to_nearest():
    frames = np.zeros((2, 210, 160, 3), np.uint8)
    frames[:, :10] = (200, 72, 72)
    frames[1, 50:60] = (142, 142, 142)
    pal = Palette.fit(frames)
    assert len(pal) == 3 and tuple(pal.colors[0]) == (0, 0, 0)   # most frequent first
    idx = pal.to_index(frames)
    assert np.array_equal(pal.to_rgb(idx), frames)
    odd = np.array([[[198, 70, 75]]], np.uint8)
    assert tuple(pal.to_rgb(pal.to_index(odd))[0, 0]) == (200, 72, 72)


def test_compiled_model_checkpoint_loads(tmp_path):
    m = tiny_model()
    compiled = torch.compile(m)             # wraps without compiling until first call
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    meta = {"kind": "world_model", "game": "breakout", "hparams": m.hparams,
            "palette": np.zeros((6, 3), np.uint8).tolist()}
    save_weights(tmp_path / "wm.safetensors", compiled, meta)
    loaded, palette, _ = load_world_model(tmp_path / "wm.safetensors", "breakout")
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(UserError, match="not 'pong'"):
        load_world_model(tmp_path / "wm.safetensors", "pong")


def test_trained_codebook_uses_several_codes_and_metrics_are_reported(tiny_models):
    import json
    report = json.loads((tiny_models / "world_model_metrics.json").read_text())
    for key in ("psnr@1", "copy_last_psnr@1", "motion_psnr@1", "copy_last_motion_psnr@1", "tf_psnr@16"):
        assert np.isfinite(report[key])
    assert report["val_codes_used"] > 1
    assert list((tiny_models / "train" / "world_model").glob("val_grid_*.png"))


def test_eval_only_validates_the_saved_weights(tiny_data, tiny_models, tmp_path):
    import json
    import shutil
    shutil.copy(tiny_models / "world_model.safetensors", tmp_path)
    run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--eval-only",
               "--val-samples", 64, "--rollout-starts", 2, "--threads", 1, "--wandb", "disabled")
    report = json.loads((tmp_path / "world_model_eval_only.json").read_text())
    assert report["keep_bias"] == pytest.approx(np.log(11)) and np.isfinite(report["motion_psnr@1"])
    assert not (tmp_path / "train" / "world_model.pt").exists()     # nothing trained
    # another decoding bias: validated with it, and stored only when asked, with the same tensors
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--store-keep-bias",
                     check=False)
    assert bad.returncode != 0 and "--store_keep_bias writes the bias" in bad.stderr
    run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--eval-only", "--keep-bias", 0.5,
               "--store-keep-bias", "--val-samples", 64, "--rollout-starts", 2, "--threads", 1, "--wandb", "disabled")
    assert json.loads((tmp_path / "world_model_eval_only.json").read_text())["keep_bias"] == 0.5
    before, _ = read_weights(tiny_models / "world_model.safetensors", "world_model")
    after, meta = read_weights(tmp_path / "world_model.safetensors", "world_model")
    assert meta["hparams"]["keep_bias"] == 0.5 and meta["validation"]["keep_bias"] == 0.5
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert load_world_model(tmp_path / "world_model.safetensors")[0].keep_bias == 0.5


def test_latent_target_is_t_to_t_plus_1(tiny_data, tiny_models):
    """Pairs store, for action t, the latent of the transition frame t -> frame t+1."""
    from collect_action_latent_pairs import encode_episode, load_pairs
    model, palette, _ = load_world_model(tiny_models / "world_model.safetensors")
    f = gd.list_episodes(tiny_data)[0]
    pairs = load_pairs(tiny_data, [f], tiny_models / "world_model.safetensors")[f.stem]
    ep = gd.load_episode(f)
    assert np.array_equal(pairs["actions"], ep["actions"])
    idx = torch.from_numpy(palette.to_index(ep["frames"]))
    for t in (0, 1, 7, len(ep["actions"]) - 1):
        ctx = idx[[max(t - 1, 0), t]][None]
        _, right, _ = model.encode(ctx, idx[t + 1][None])
        assert pairs["codes"][t].tolist() == right[0].tolist()
    again = encode_episode(model, palette, f, 16, "cpu")
    assert np.array_equal(again["codes"], pairs["codes"])


def test_decoder_fine_tuning_keeps_the_encoder_and_codebook(tiny_data, tiny_models, tmp_path):
    run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--steps", 6, "--val-every", 6,
               "--init-from", tiny_models / "world_model.safetensors", "--freeze-encoder", "--context-noise", 0.5,
               "--ball-weight", 4, "--turn-focus", 0.3, "--fast-ball-px", 6, "--ball-jitter", 0.5, "--self-forcing", 0.5,
               "--lr", "1e-2", *TINY_WM[:-6], "--rollout-starts", 2, "--threads", 1, "--wandb", "disabled")
    before, _, _ = load_world_model(tiny_models / "world_model.safetensors")
    after, _, meta = load_world_model(tmp_path / "world_model.safetensors")
    b, a = before.state_dict(), after.state_dict()
    for k in b:
        if k.startswith(ENCODER_PARTS):
            assert torch.equal(a[k], b[k]), k
    assert not all(torch.equal(a[k], b[k]) for k in b if k.startswith(("dec.", "head.")))
    # so the stage-4 pairs stay valid: they are tied to the encoder's hash, which the fine-tune keeps
    from collect_action_latent_pairs import encoder_hash, load_pairs
    assert encoder_hash(tmp_path / "world_model.safetensors") == encoder_hash(tiny_models / "world_model.safetensors")
    f = gd.list_episodes(tiny_data)[0]
    assert np.array_equal(load_pairs(tiny_data, [f], tmp_path / "world_model.safetensors")[f.stem]["codes"],
                          load_pairs(tiny_data, [f], tiny_models / "world_model.safetensors")[f.stem]["codes"])
    with torch.no_grad():   # an encoder that changed does not pass
        after.enc_out[0].bias.add_(1.0)
    save_weights(tmp_path / "moved.safetensors", after, meta)
    assert encoder_hash(tmp_path / "moved.safetensors") != encoder_hash(tiny_models / "world_model.safetensors")
    with pytest.raises(UserError, match="another world model's encoder"):
        load_pairs(tiny_data, [f], tmp_path / "moved.safetensors")
    assert meta["config"]["freeze_encoder"] and meta["hparams"]["width"] == before.hparams["width"]
    assert meta["config"]["ball_weight"] == 4 and meta["config"]["turn_focus"] == 0.3 and meta["config"]["fast_ball_px"] == 6
    assert meta["config"]["ball_jitter"] == 0.5 and meta["config"]["self_forcing"] == 0.5
    report = json.loads((tmp_path / "world_model_metrics.json").read_text())
    assert 0 <= report["ball_whole@1"] <= report["ball_in_place@1"] <= 1   # the random episodes show a ball
    # the grid's four rows, counted the same way (issue #4's bar: the ball drawn in place in the grid)
    assert 0 <= report["grid_ball_whole"] <= report["grid_ball_in_place"] <= report["grid_real_ball"] <= 4
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--turn-focus", 1,
                     check=False)
    assert bad.returncode != 0 and "--turn_focus must be in [0, 1)" in bad.stderr
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--fast-ball-px", 6,
                     check=False)
    assert bad.returncode != 0 and "set --turn_focus too" in bad.stderr
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--ball-jitter", 2,
                     check=False)
    assert bad.returncode != 0 and "--ball_jitter must be in [0, 1]" in bad.stderr
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--shift-gate", check=False)
    assert bad.returncode != 0 and "set --shift_classes N too" in bad.stderr
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--continue-motion",
                     check=False)
    assert bad.returncode == 2 and "--continue_motion takes its steps from the shift classes" in bad.stderr
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--keep-tiebreak", 0.1,
                     check=False)
    assert bad.returncode == 2 and "--keep_tiebreak (>= 0, got 0.1) breaks ties" in bad.stderr


@pytest.mark.parametrize("extra", ["", "--shift-gate", "--continue-motion"])
def test_shift_classes_fine_tune_resumes_and_the_neural_env_plays_them(tiny_data, tiny_models, tmp_path, extra):
    import shutil

    import atari_env
    gate, cont = extra == "--shift-gate", extra == "--continue-motion"
    args = ["--data-dir", tiny_data, "--out-dir", tmp_path, "--init-from", tiny_models / "world_model.safetensors",
            "--freeze-encoder", "--shift-classes", 4, "--shift-scan", 2, "--val-every", 3, *TINY_WM[:-6],
            "--rollout-starts", 2, "--threads", 1, "--wandb", "disabled", *(["--keep-tiebreak", 0.1] if cont else []),
            *([extra] if extra else [])]
    run_script("train_latent_action.py", *args, "--steps", 3)
    first, _, meta = load_world_model(tmp_path / "world_model.safetensors")
    offsets = meta["hparams"]["shift_offsets"]
    assert 1 <= len(offsets) <= 4 and first.head[-1].out_features == (first.num_colors + 1) * 64 + len(offsets) + cont
    assert first.shift_gate == gate and bool(meta["hparams"].get("shift_gate")) == gate
    assert first.continue_motion == cont and bool(meta["hparams"].get("continue_motion")) == cont
    tiebreak = 0.1 if cont else 0.0                  # and its decoding bias follows (keep_bias_for)
    assert meta["config"]["keep_tiebreak"] == tiebreak
    assert first.keep_bias == pytest.approx(keep_bias_for(meta["config"]["motion_weight"], tiebreak))
    run_script("train_latent_action.py", *args[:-1] if extra else args, "--steps", 6, "--resume")   # the flag stays on
    after, _, meta = load_world_model(tmp_path / "world_model.safetensors")
    assert meta["step"] == 6 and meta["hparams"]["shift_offsets"] == offsets and after.shift_gate == gate
    assert after.continue_motion == cont
    before, _, _ = load_world_model(tiny_models / "world_model.safetensors")
    n = before.head[-1].out_features   # the old classes start where the --init_from weights left them
    assert not torch.equal(after.head[-1].weight[:n], before.head[-1].weight)
    for name in ("action_to_latent.safetensors", "start_frames.safetensors"):
        shutil.copy(tiny_models / name, tmp_path / name)
    env = atari_env.make_neural_env("breakout", tmp_path, device="cpu")
    obs, _ = env.reset(seed=0)
    for a in (1, 2, 3):
        obs = env.step(a)[0]
    assert obs.shape == (210, 160, 3) and obs.dtype == np.uint8


def test_world_model_training_resumes(tiny_data, tmp_path):
    """Also with the action prior on: its weights are in the checkpoint and it is validated."""
    run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--steps", 10,
               "--val-every", 10, *TINY_WM, "--action-prior", 1, "--prior-width", 8)
    first = torch.load(tmp_path / "train" / "world_model.pt", weights_only=True)["prior"]
    out = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--steps", 20,
                     "--val-every", 10, "--resume", *TINY_WM)
    assert "resumed at step 10" in out.stdout and "prior latent_acc" in out.stdout
    state = torch.load(tmp_path / "train" / "world_model.pt", weights_only=True)
    assert state["step"] == 20 and state["config"]["action_prior"] == 1
    assert any(not torch.equal(state["prior"][k], first[k]) for k in first)      # the prior kept training
    report = json.loads((tmp_path / "world_model_metrics.json").read_text())
    assert 0 <= report["prior_latent_acc"] <= 1
    bad = run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--steps", 30,
                     "--resume", *TINY_WM, "--codebook-size", "16", check=False)   # the last flag wins
    assert bad.returncode == 2 and "codebook_size" in bad.stderr


def test_minutes_stops_training_by_the_clock_validates_and_resume_continues_the_clock(tiny_data, tmp_path):
    args = ("--data-dir", tiny_data, "--out-dir", tmp_path, "--steps", 100000, "--val-every", 100000, *TINY_WM)
    out = run_script("train_latent_action.py", *args, "--minutes", 0.02)
    state = torch.load(tmp_path / "train" / "world_model.pt", weights_only=True)
    assert f"--minutes 0.02 reached at step {state['step']}" in out.stdout
    assert 1 <= state["step"] < 100000 and state["train_seconds"] >= 1.2
    report = json.loads((tmp_path / "world_model_metrics.json").read_text())
    assert report["step"] == state["step"] and "psnr@1" in report              # the last step was validated
    out = run_script("train_latent_action.py", *args, "--resume")              # its clock has run out: nothing to do
    assert torch.load(tmp_path / "train" / "world_model.pt", weights_only=True)["step"] == state["step"]
    # 1.2 s more than the first run used (on a loaded CPU its last step can run well past its 1.2 s: a fixed
    # --minutes 0.04 then left the resume nothing to do)
    more = (state["train_seconds"] + 1.2) / 60
    out = run_script("train_latent_action.py", *args, "--resume", "--minutes", more)
    again = torch.load(tmp_path / "train" / "world_model.pt", weights_only=True)
    assert again["step"] > state["step"] and again["train_seconds"] >= state["train_seconds"] + 1.2


def test_action_prior_pulls_the_encoder_output_toward_the_predicted_code():
    torch.manual_seed(0)
    m = tiny_model()
    m(torch.randint(0, 6, (8, 2, 210, 160), dtype=torch.uint8), torch.randint(0, 6, (8, 210, 160), dtype=torch.uint8))
    codebook = m.vq.codebook.detach().view(-1, m.code_dim)          # k-means initialised by that first batch
    assert codebook.norm(dim=1).min() > 0
    z = torch.randn(1, 1, m.code_dim, requires_grad=True)
    logits = torch.full((1, 1, 4), -30.0)
    logits[0, 0, 2] = 30.0                                          # the prior is sure: code 2
    m.prior_pull(z, logits).backward()
    with torch.no_grad():
        moved = z - 0.1 * z.grad
    assert (moved[0, 0] - codebook[2]).norm() < (z[0, 0] - codebook[2]).norm()
    assert torch.allclose(m.prior_pull(codebook[2].view(1, 1, -1), logits), torch.zeros(()), atol=1e-6)
    unsure = m.prior_pull(z, torch.tensor([[[0.0, 1e-3, 0.0, 0.0]]]))  # near-uniform prior: a quarter of the pull
    assert torch.allclose(unsure, 0.25 * (z[0, 0] - codebook[1]).pow(2).mean(), rtol=1e-3)


def test_action_prior_from_stage_5_model_and_clear_errors(tiny_data, tiny_models, tmp_path):
    common = ["--data-dir", tiny_data, "--out-dir", tmp_path, "--steps", 4, "--val-every", 4, "--action-prior", 1,
              "--prior-from", tiny_models / "action_to_latent.safetensors", "--rollout-starts", 2, "--val-samples", 32,
              "--threads", 1, "--wandb", "disabled"]
    bad = run_script("train_latent_action.py", *common, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --prior_from needs --init_from")
    bad = run_script("train_latent_action.py", *common, "--init-from", tiny_models / "world_model.safetensors",
                     "--freeze-encoder", check=False)
    assert bad.returncode == 2 and "cannot be used with --freeze_encoder" in bad.stderr
    run_script("train_latent_action.py", *common, "--init-from", tiny_models / "world_model.safetensors")
    prior = torch.load(tmp_path / "train" / "world_model.pt", weights_only=True)["prior"]
    stage5, _ = read_weights(tiny_models / "action_to_latent.safetensors", "action_to_latent")
    assert prior.keys() == stage5.keys() and all(prior[k].shape == stage5[k].shape for k in prior)


def test_merged_code_is_read_as_its_target_with_the_gradient_passing_straight_through(tmp_path):
    torch.manual_seed(0)
    m = tiny_model(merged_codes=[[1, 0]])
    m(torch.randint(0, 6, (8, 2, 210, 160), dtype=torch.uint8), torch.randint(0, 6, (8, 210, 160), dtype=torch.uint8))
    codebook = m.vq.codebook.detach().view(-1, m.code_dim)
    m.eval()
    z = codebook[[1, 2]].clone().view(2, 1, -1).requires_grad_(True)   # exactly codes 1 and 2
    quantized, codes, _ = m.quantize(z)
    assert codes[:, 0].tolist() == [0, 2]                               # 1 is read as 0, 2 untouched
    assert torch.allclose(quantized[0, 0], codebook[0]) and torch.allclose(quantized[1, 0], codebook[2])
    m.train()                                                           # training: straight-through, as without merges
    quantized, codes, _ = m.quantize(z)
    quantized.sum().backward()
    assert codes[0, 0] == 0 and torch.allclose(z.grad, torch.ones_like(z))
    m.eval()
    save_weights(tmp_path / "wm.safetensors", m, {"kind": "world_model", "game": "breakout", "hparams": m.hparams,
                                                  "palette": [[0, 0, 0]] * 6})
    loaded, _, _ = load_world_model(tmp_path / "wm.safetensors")
    assert loaded.code_map.tolist() == [0, 0, 2, 3] and "merged_codes" not in tiny_model().hparams


def test_merge_codes_fine_tune_resumes_and_refuses_bad_merges(tiny_data, tiny_models, tmp_path):
    common = ["--data-dir", tiny_data, "--out-dir", tmp_path, "--val-every", 4, "--rollout-starts", 2,
              "--val-samples", 32, "--threads", 1, "--wandb", "disabled", "--freeze-encoder"]
    init = ["--init-from", tiny_models / "world_model.safetensors"]
    bad = run_script("train_latent_action.py", *common, "--steps", 4, "--merge-codes", "1:0", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --merge_codes needs --init_from")
    for wrong, says in (("1:1", "two different codes"), ("1:9", "two different codes"), ("1-0", "not 'from:to'"),
                        ("1:0,0:2", "both merged away and merged into")):
        bad = run_script("train_latent_action.py", *common, *init, "--steps", 4, "--merge-codes", wrong, check=False)
        assert bad.returncode == 2 and says in bad.stderr.strip().splitlines()[-1], (wrong, bad.stderr[-300:])
    run_script("train_latent_action.py", *common, *init, "--steps", 4, "--merge-codes", "1:0,3:2")
    out = run_script("train_latent_action.py", *common, "--steps", 8, "--resume")
    assert "resumed at step 4" in out.stdout
    model, _, meta = load_world_model(tmp_path / "world_model.safetensors")
    assert meta["hparams"]["merged_codes"] == [[1, 0], [3, 2]] and model.code_map.tolist() == [0, 0, 2, 2]
    assert json.loads((tmp_path / "world_model_metrics.json").read_text())["step"] == 8


def test_circle_colour_codes_let_one_linear_step_single_out_any_colour():
    """The event head's fixed colour codes: each colour scores highest along its own code, so a projection
    and a threshold can find one colour (the ball's red) among all others; no two codes coincide."""
    from models.world_model import FrameEmbed
    for n in (2, 9, 32):
        codes = FrameEmbed(n, 2, circle=True).embed.weight
        assert not codes.requires_grad
        assert ((codes @ codes.T).argmax(1) == torch.arange(n)).all()
        assert torch.cdist(codes, codes).add(torch.eye(n) * 9).min() > 0.2


def test_jitter_ball_moves_or_breaks_only_the_ball():
    from models.world_model import jitter_ball
    frames = torch.zeros(64, 210, 160, dtype=torch.uint8)
    frames[:, 190:194, 60:76] = 3                                 # the paddle: never touched
    frames[:32, 150:154, 40:42] = 3                               # a ball (same red index) in half of them
    ball = torch.zeros_like(frames, dtype=torch.bool)
    ball[:32, 150:154, 40:42] = True
    g = torch.Generator().manual_seed(0)
    assert torch.equal(jitter_ball(frames, ball, 0.0, 2, 0, g), frames)
    out = jitter_ball(frames, ball, 1.0, 2, 0, g)
    assert torch.equal(out[32:], frames[32:])                     # no ball: nothing to jitter
    assert torch.equal(out[:, 190:194], frames[:, 190:194])
    moved = broken = 0
    for o, f in zip(out[:32], frames[:32]):
        on = (o == 3) & ~((f == 3) & ~ball[0])                    # the ball's pixels after
        assert not torch.equal(o, f)
        rows, cols = on.nonzero().T
        if on.sum() == 8:                                         # moved whole, by at most 2 px each way
            moved += 1
            assert (rows.min() - 150).abs() <= 2 and (cols.min() - 40).abs() <= 2
        else:                                                     # broken: a subset of its pixels left
            broken += 1
            assert on.sum() < 8 and (on & ~ball[0]).sum() == 0
    assert moved > 5 and broken > 5
