"""The weights committed in checkpoints/breakout must load through make_neural_env and keep the paddle
under control: driven by the same keys from the same real frames, the dream's paddle follows the real
emulator's (LEFT moves it left, RIGHT right) within a few pixels, away from the walls."""
import numpy as np
import pytest

import atari_env
import metrics

NOOP, FIRE, RIGHT, LEFT = 0, 1, 2, 3


@pytest.mark.parametrize("keys", [[LEFT, LEFT, RIGHT, RIGHT, RIGHT], [RIGHT, LEFT, LEFT, LEFT, RIGHT]])
def test_shipped_breakout_model_moves_the_paddle_as_told(keys):
    env = atari_env.make_neural_env("breakout", device="cpu")
    assert env.unwrapped.action_names[RIGHT] == "RIGHT" and env.unwrapped.action_names[LEFT] == "LEFT"
    real = atari_env.RealTwin("breakout", env.unwrapped.context_length)
    env.reset(options={"frames": real.reset(seed=0)})
    prev_model = prev_real = metrics.paddle_left(real.frame)
    for key in keys:
        model_x = metrics.paddle_left(env.step(key)[0])
        real_x = metrics.paddle_left(real.step(key))
        assert model_x is not None, "the paddle vanished from the dream"
        assert abs(model_x - real_x) <= 6, f"dream paddle at {model_x}, real at {real_x}"
        if abs(real_x - prev_real) >= 4:   # the real paddle clearly moved: the dream's moved the same way
            assert np.sign(model_x - prev_model) == np.sign(real_x - prev_real)
        prev_model, prev_real = model_x, real_x


def test_shipped_model_stays_on_the_palette():
    env = atari_env.make_neural_env("breakout", device="cpu")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        frame, *_ = env.step(int(rng.integers(4)))
    assert metrics.off_palette_fraction(frame, env.unwrapped.palette.colors) == 0.0


@pytest.mark.parametrize("taps", [[LEFT] * 8, [LEFT, NOOP] * 6, [LEFT, LEFT, FIRE, LEFT, NOOP, LEFT, LEFT, NOOP, LEFT]])
def test_shipped_breakout_paddle_leaves_the_right_wall(taps):
    """At the right wall the real paddle leaves only after two or three LEFT presses (the emulated paddle
    winds up past the wall), so an action->latent model that sees too few past keys keeps predicting 'stay':
    the dream's paddle stuck there for good when LEFT is tapped (README stage 5, session 13)."""
    env = atari_env.make_neural_env("breakout", device="cpu")
    real = atari_env.RealTwin("breakout", env.unwrapped.context_length)
    env.reset(options={"frames": real.reset(seed=0)})
    for key in [RIGHT] * 20 + taps:
        model_x = metrics.paddle_left(env.step(key)[0])
        real_x = metrics.paddle_left(real.step(key))
    assert real_x is not None and real_x < 130, "the real paddle should have left the right wall"
    assert model_x is not None and model_x < 130, f"the dream's paddle is stuck at the right wall ({model_x})"
    assert abs(model_x - real_x) <= 24, f"dream paddle at {model_x}, real at {real_x}"


def test_shipped_model_dreams_the_same_with_and_without_the_cached_decoder():
    """The CPU default recomputes only where the frames changed (models/cached_decoder.py): over a dream of
    random keys with the shipped weights (shift classes, events), every frame is the whole-grid decoder's."""
    envs = [atari_env.make_neural_env("breakout", device="cpu", cached_decoder=c) for c in (False, True)]
    keys = np.random.default_rng(0).integers(4, size=60)
    dreams = []
    for env in envs:
        env.reset(seed=1)
        dreams.append([env.step(int(k))[0] for k in keys])
    assert all(np.array_equal(a, b) for a, b in zip(*dreams))
    assert envs[1].unwrapped.cached_decoder.cells_computed < 0.5 * 6 * 540 * len(keys)   # it did compute less
