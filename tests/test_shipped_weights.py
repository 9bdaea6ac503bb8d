"""The weights committed in checkpoints/breakout must load and keep the paddle under control."""
import numpy as np

import atari_env
import metrics


def paddle_after(env, seed, action, steps=6):
    env.reset(seed=seed)
    for _ in range(steps):
        frame, *_ = env.step(action)
    return metrics.paddle_left(frame)


def test_shipped_breakout_model_moves_the_paddle_as_told():
    env = atari_env.make_neural_env("breakout", device="cpu")
    names = env.unwrapped.action_names
    left, right, noop = names.index("LEFT"), names.index("RIGHT"), names.index("NOOP")
    moved = 0
    for seed in range(4):
        start = paddle_after(env, seed, noop, steps=1)
        l, r = paddle_after(env, seed, left), paddle_after(env, seed, right)
        assert start is not None and l is not None and r is not None, "the paddle vanished"
        assert l <= start and r >= start, f"seed {seed}: start {start}, after LEFT {l}, after RIGHT {r}"
        moved += (l < start) + (r > start)
    assert moved >= 6, "LEFT/RIGHT barely move the paddle"


def test_shipped_model_stays_on_the_palette():
    env = atari_env.make_neural_env("breakout", device="cpu")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        frame, *_ = env.step(int(rng.integers(4)))
    assert metrics.off_palette_fraction(frame, env.unwrapped.palette.colors) == 0.0
