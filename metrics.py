"""World-model metrics, as defined in GUIDE §2 (names used in every report).

PSNR is always computed from the MSE averaged over all samples first (peak 255, native 210x160 RGB).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr_from_mse(mse: float) -> float:
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


class PSNRAccumulator:
    """Sums squared error and pixel counts over batches; `.psnr` is PSNR of the pooled MSE."""

    def __init__(self):
        self.sq, self.n = 0.0, 0

    def add(self, pred_rgb: torch.Tensor, real_rgb: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        err = (pred_rgb.float() - real_rgb.float()).pow(2)          # (B, H, W, 3)
        if mask is not None:
            self.add_sums(float((err * mask[..., None]).sum().item()), int(mask.sum().item()) * 3)
        else:
            self.add_sums(float(err.sum().item()), err.numel())

    def add_sums(self, sq: float, n: int) -> None:
        """For a caller that has the squared error's sum over n pixel channels already (per-sample errors, say)."""
        self.sq += sq
        self.n += n

    @property
    def psnr(self) -> float:
        return psnr_from_mse(self.sq / self.n) if self.n else float("nan")


def psnr_gap_interval(se_ref, se_test, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Is a PSNR gap more than chance? se_ref, se_test: summed squared errors of two predictions over the same
    pixels, one value per group (a held-out episode: transitions of one episode are not independent draws).
    -> (gap, low, high): PSNR(ref) - PSNR(test) in dB over all groups (positive: test is behind), and the
    `level` interval of a paired bootstrap over groups (the same resampled groups for both, as
    benchmarks/compare_evaluations.py does for open-loop starts)."""
    ref, test = np.asarray(se_ref, dtype=np.float64), np.asarray(se_test, dtype=np.float64)
    gap = lambda r, t: 10 * np.log10(np.maximum(t, 1e-10) / np.maximum(r, 1e-10))
    idx = np.random.default_rng(seed).integers(0, len(ref), (resamples, len(ref)))
    low, high = np.percentile(gap(ref[idx].sum(1), test[idx].sum(1)), [50 * (1 - level), 50 * (1 + level)])
    return float(gap(ref.sum(), test.sum())), float(low), float(high)


def motion_mask(frame_t: torch.Tensor, frame_t1: torch.Tensor, dilate: int = 2) -> torch.Tensor:
    """Pixels that differ between t and t+1 (any channel), dilated by `dilate` px: (B, H, W) float."""
    diff = (frame_t != frame_t1)
    if diff.dim() == 4 and diff.shape[-1] == 3:
        diff = diff.any(-1)
    m = diff.float()[:, None]
    m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m[:, 0]


def error_grid(context_rgb: np.ndarray, real_rgb: np.ndarray, pred_rgb: np.ndarray, path, scale: int = 2,
               title: str = "") -> None:
    """PNG grid, one row per sample: last context frame | real next | predicted next | |error|."""
    import imageio.v3 as iio
    rows = []
    for c, r, p in zip(context_rgb, real_rgb, pred_rgb):
        err = np.abs(r.astype(np.int16) - p.astype(np.int16)).sum(-1).clip(0, 255).astype(np.uint8)
        err = np.stack([err, err // 2, err // 2], -1)
        sep = np.full((r.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([c, sep, r, sep, p, sep, err], 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], 0).repeat(scale, 0).repeat(scale, 1)
    iio.imwrite(path, grid)


# ----------------------------------------------------------------------------- Breakout object detector
# Documented from the real game (GUIDE §1), checked against the RAM in tests/test_neural_env.py:
# paddle, ball and top bricks share colour (200, 72, 72); the paddle lives in rows 189-192 with its left
# edge in 8..144 (RAM[72] - 47); a static red block sits at x 152-159, so columns >= 152 are ignored;
# bricks fill rows 57-92, so a red pixel in rows 93-188 is the ball (top row RAM[101] + 9, left column
# RAM[99] - 49).
BREAKOUT_RED = (200, 72, 72)
PADDLE_ROWS = slice(189, 193)
BALL_ROWS = slice(93, 189)
PLAY_COLS = slice(8, 152)
NO_PADDLE_ERR_PX = 40.0


def _red(frame: np.ndarray) -> np.ndarray:
    return (frame[..., 0] == 200) & (frame[..., 1] == 72) & (frame[..., 2] == 72)


def paddle_left(frame: np.ndarray) -> int | None:
    """Left edge (x) of the paddle: the widest run (>= 4 px) of columns red in >= 3 of its 4 rows."""
    cols = _red(frame[PADDLE_ROWS, PLAY_COLS]).sum(0) >= 3
    best, start, best_len = None, None, 0
    for x, on in enumerate(np.append(cols, False)):
        if on and start is None:
            start = x
        elif not on and start is not None:
            if x - start > best_len:
                best, best_len = start, x - start
            start = None
    return best + PLAY_COLS.start if best is not None and best_len >= 4 else None


def ball_mask(frame: np.ndarray) -> np.ndarray:
    """The ball's pixels below the bricks (BALL_ROWS x PLAY_COLS): red there is the ball or debris."""
    return _red(frame[BALL_ROWS, PLAY_COLS])


def ball_position(frame: np.ndarray) -> tuple[float, float] | None:
    """(top row, left column) of the ball when it is visible below the bricks, else None."""
    pts = np.argwhere(ball_mask(frame))
    if len(pts) == 0:
        return None
    return float(pts[:, 0].min() + BALL_ROWS.start), float(pts[:, 1].min() + PLAY_COLS.start)


def ball_pixels(frames_idx: torch.Tensor, colors: np.ndarray) -> torch.Tensor:
    """(..., 210, 160) palette indices -> (..., 210, 160) bool: the pixels ball_position reads as the ball
    (red, in the rows and columns below the bricks), without the RGB frames: cheap for every frame of a batch."""
    is_red = torch.as_tensor(_red(np.asarray(colors)), device=frames_idx.device)
    out = torch.zeros(frames_idx.shape, dtype=torch.bool, device=frames_idx.device)
    out[..., BALL_ROWS, PLAY_COLS] = is_red[frames_idx[..., BALL_ROWS, PLAY_COLS].long()]
    return out


def ball_visible(frames_idx: torch.Tensor, colors: np.ndarray) -> torch.Tensor:
    """(..., 210, 160) palette indices -> (...) bool: ball_position(frame) is not None."""
    return ball_pixels(frames_idx, colors).flatten(-2).any(-1)


def ball_corner(frames_idx: torch.Tensor, colors: np.ndarray) -> torch.Tensor:
    """(..., 210, 160) palette indices -> (..., 2) float: ball_position's (top row, left column), nan
    where no ball is seen. Vectorised over a batch of frames."""
    return _corner(ball_pixels(frames_idx, colors))


def _corner(mask: torch.Tensor) -> torch.Tensor:
    """ball_corner from the ball's pixels (..., 210, 160) bool, for a caller that has them already."""
    rows, cols = mask.any(-1), mask.any(-2)
    first = lambda m: torch.where(m.any(-1), m.float().argmax(-1).float(), torch.tensor(float("nan"), device=m.device))
    return torch.stack([first(rows), first(cols)], -1)


def ball_may_turn(frames_idx: torch.Tensor, colors: np.ndarray, margin: int = 4) -> torch.Tensor:
    """(T+1, 210, 160) palette indices of an episode -> (T,) bool over its transitions t -> t+1: the ball,
    seen at t-1 and t, would on its straight course (position at t plus its last step) end within `margin`
    px of a side wall, the paddle's rows or the bricks' lowest row, so it may bounce, turn or vanish there.
    Read from frames t-1 and t only (the input, not the outcome), for oversampling the transitions a world
    model finds hardest without biasing what it predicts given its input."""
    corner = ball_corner(frames_idx, colors)
    ahead = 2 * corner[1:-1] - corner[:-2]   # straight course: the position at t plus its last step
    row, col = ahead[:, 0], ahead[:, 1]
    near = ((col < PLAY_COLS.start + margin) | (col + 2 > PLAY_COLS.stop - margin)
            | (row + 4 > PADDLE_ROWS.start - margin) | (row < BALL_ROWS.start + margin))   # nan compares False
    return torch.cat([torch.zeros(1, dtype=torch.bool, device=near.device), near])   # t = 0: no step seen yet


def ball_fast_sideways(frames_idx: torch.Tensor, colors: np.ndarray, px: int = 6) -> torch.Tensor:
    """(T+1, 210, 160) palette indices of an episode -> (T,) bool over its transitions t -> t+1: the ball,
    seen at t-1 and t, moved at least `px` columns between them (read from the input, like ball_may_turn)."""
    corner = ball_corner(frames_idx, colors)
    fast = (corner[1:-1, 1] - corner[:-2, 1]).abs() >= px   # nan compares False
    return torch.cat([torch.zeros(1, dtype=torch.bool, device=fast.device), fast])


def ball_drawn_counts(pred_idx: torch.Tensor, real_idx: torch.Tensor, colors: np.ndarray) -> dict[str, int]:
    """Predicted vs real next frames (B, 210, 160) palette indices -> counts over the frames with a real
    ball: `real_ball`, `ball_in_place` (a ball drawn with its corner within 2 px of the real one) and
    `ball_whole` (exactly the real ball's pixels, none missing, none extra below the bricks)."""
    pred, real = ball_pixels(pred_idx, colors), ball_pixels(real_idx, colors)
    seen = real.flatten(1).any(1)
    dist = (_corner(pred) - _corner(real)).abs().amax(-1)   # nan when none drawn
    return {"real_ball": int(seen.sum()), "ball_in_place": int((seen & (dist <= 2)).sum()),
            "ball_whole": int((seen & (pred == real).flatten(1).all(1)).sum())}


SERVE_ROWS = (110, 130)


def _served(ball_t, ball_t1, rows) -> tuple[int, int] | None:
    """The one serve rule: no ball at t, a ball at t+1 in `rows` -> its (top row, left column)."""
    if ball_t is None and ball_t1 is not None and rows[0] <= ball_t1[0] < rows[1]:
        return int(ball_t1[0]), int(ball_t1[1])
    return None


def serve_place(frame_t: np.ndarray, frame_t1: np.ndarray, rows: tuple[int, int] = SERVE_ROWS) -> tuple[int, int] | None:
    """(top row, left column) where the game serves the ball between frame t and t+1, else None: no ball
    at t, a ball at t+1 in `rows`. The place (around x 18, 79 or 140, plus how many emulator frames of
    the frameskip the ball has already moved) follows the game's frame counter on the launch frame, which
    the frames do not show (atari_env.recorded_frame_phase; README stage 5, session 36)."""
    if ball_position(frame_t) is not None:   # the common case: skip looking at frame t+1
        return None
    return _served(None, ball_position(frame_t1), rows)


def serve_places(frames: np.ndarray, first: int = 0, rows: tuple[int, int] = SERVE_ROWS) -> list[tuple[int, tuple[int, int]]]:
    """[(t, place)] for every serve t -> t+1 (t >= first) in a frame sequence, each frame looked at once."""
    balls = [ball_position(f) for f in frames]
    return [(t, place) for t in range(first, len(balls) - 1) if (place := _served(balls[t], balls[t + 1], rows))]


def serve_steps(frames: np.ndarray, first: int = 0, rows: tuple[int, int] = SERVE_ROWS) -> list[int]:
    """Breakout's serve: the steps t (>= first) where frame t shows no ball and frame t+1 shows one in
    `rows`, at one of a few places picked by the game's frame counter (around x 18, 79 or 140)."""
    return [t for t, _ in serve_places(frames, first, rows)]


def object_error_counts(pred_frames: np.ndarray, real_frames: np.ndarray) -> dict[str, tuple[float, int]]:
    """-> {metric: (sum, count)} over matched frame sequences; object_errors divides. Kept as sums so
    that per-rollout counts pool into the whole run's numbers exactly (errors_from_counts)."""
    pad, agree, ball, missed, spurious = [], [], [], [], []
    for p, r in zip(pred_frames, real_frames):
        pl, rl = paddle_left(p), paddle_left(r)
        if rl is not None:
            pad.append(NO_PADDLE_ERR_PX if pl is None else abs(pl - rl))
        pb, rb = ball_position(p), ball_position(r)
        agree.append((pb is None) == (rb is None))
        missed.append(pb is None and rb is not None)
        spurious.append(pb is not None and rb is None)
        if pb is not None and rb is not None:
            ball.append(np.hypot(pb[0] - rb[0], pb[1] - rb[1]))
    return {name: (float(np.sum(x)), len(x)) for name, x in (
        ("paddle_err_px", pad), ("ball_presence_agree", agree), ("ball_err_px", ball),
        ("ball_missed", missed), ("ball_spurious", spurious))}


def errors_from_counts(*counts: dict[str, tuple[float, int]]) -> dict:
    """Pool object_error_counts of one or more rollouts into means (nan where nothing was counted)."""
    out = {}
    for name in counts[0]:
        total, n = (sum(c[name][i] for c in counts) for i in (0, 1))
        out[name] = total / n if n else float("nan")
    return out


def object_errors(pred_frames: np.ndarray, real_frames: np.ndarray) -> dict:
    """paddle_err_px, ball_presence_agree and ball_err_px over matched frame sequences, plus where the
    presence disagreements come from: ball_missed (real ball, none drawn) and ball_spurious (a red thing
    below the bricks where the real frame has no ball: an invented ball or debris), as shares of frames."""
    return errors_from_counts(object_error_counts(pred_frames, real_frames))


def off_palette_fraction(frames: np.ndarray, palette_rgb: np.ndarray, threshold: int = 60) -> float:
    """Fraction of pixels farther than `threshold` (sum of |dRGB|) from every colour of the real game."""
    cols, inv = np.unique(frames.reshape(-1, 3), axis=0, return_inverse=True)
    dist = np.abs(cols[:, None, :].astype(np.int64) - palette_rgb[None].astype(np.int64)).sum(-1).min(1)
    return float((dist[inv.ravel()] > threshold).mean())


def latent_purity(counts) -> dict:
    """counts: {(a_t-1, a_t, latent): n}. How far the real actions alone pin down the latent: the share of
    transitions on the most common latent of their key, keyed by a_t and by (a_t-1, a_t) -- the accuracy
    ceiling of an action->latent mapping that ignores the frames."""
    out = {}
    for name, key in (("action_purity", lambda p, a: a), ("action_pair_purity", lambda p, a: (p, a))):
        top = {}
        for (p, a, _), n in counts.items():
            top[key(p, a)] = max(top.get(key(p, a), 0), n)
        out[name] = sum(top.values()) / max(1, sum(counts.values()))
    return out
