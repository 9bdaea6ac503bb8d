import numpy as np
import pytest

import atari_env
from common import UserError

EXPECTED_ACTIONS = {
    "breakout": ["NOOP", "FIRE", "RIGHT", "LEFT"],
    "pong": ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"],
    "enduro": ["NOOP", "FIRE", "RIGHT", "LEFT", "DOWN", "DOWNRIGHT", "DOWNLEFT", "RIGHTFIRE", "LEFTFIRE"],
    "mspacman": ["NOOP", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT"],
}


@pytest.mark.parametrize("game", list(atari_env.GAMES))
def test_every_game_has_documented_views(game):
    env = atari_env.make_world_model_env(game)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (210, 160, 3) and obs.dtype == np.uint8
    assert env.unwrapped._frameskip == 4 and env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    assert atari_env.action_names(game) == EXPECTED_ACTIONS[game]
    agent = atari_env.make_agent_env(game)
    stack, _ = agent.reset(seed=0)
    assert stack.shape == (4, 84, 84) and stack.dtype == np.uint8
    vec = atari_env.make_agent_vector_env(game, num_envs=2)
    vobs, info = vec.reset(seed=0)
    assert vobs.shape == (2, 4, 84, 84) and "lives" in info
    assert vec.single_action_space.n == len(EXPECTED_ACTIONS[game])
    vec.close()


def test_unknown_game_lists_valid_names():
    with pytest.raises(UserError, match="breakout, pong, enduro, mspacman"):
        atari_env.make_world_model_env("pacman")


def test_agent_frame_is_the_world_model_frame():
    """The recorder's agent env (frameskip 1 x 4) shows exactly the world-model view's frames."""
    agent = atari_env.make_agent_env("breakout", noop_max=0)
    world = atari_env.make_world_model_env("breakout")
    agent.reset(seed=3)
    obs, _ = world.reset(seed=3)
    assert np.array_equal(agent.unwrapped.ale.getScreenRGB(), obs)
    for a in [1, 2, 2, 3, 0, 1, 3, 3] * 5:
        agent.step(a)
        obs, *_ = world.step(a)
        assert np.array_equal(agent.unwrapped.ale.getScreenRGB(), obs)


def test_life_tracker_fires_after_a_lost_life_and_reports_true_score():
    tr = atari_env.LifeTracker(2, fire_action=1)
    tr.update(np.array([5, 5]), np.array([0.0, 0.0]), np.array([False, False]))
    lost, done = tr.update(np.array([4, 5]), np.array([4.0, 1.0]), np.array([False, False]))
    assert lost.tolist() == [True, False] and done == []
    assert tr.override(np.array([3, 3])).tolist() == [1, 3]
    lost, done = tr.update(np.array([4, 0]), np.array([0.0, 7.0]), np.array([False, True]))
    assert done == [(1, 8.0, 3)] and not lost.any()


def test_breakout_serves_on_fire_only_some_steps_after_the_ball_is_lost():
    """The game fact behind stage 5's 8 frames (README stage 5, session 16): after a lost ball FIRE is
    ignored for a few steps, then serves at once; two frames cannot tell the two apart."""
    import metrics
    env = atari_env.make_world_model_env("breakout")
    env.reset(seed=0)
    env.step(1)
    seen = False
    for _ in range(400):                          # NOOP: the ball is served, falls past the paddle and is lost
        in_play = metrics.ball_position(env.step(0)[0]) is not None
        if in_play:
            seen = True
        elif seen:
            break
    assert seen and not in_play
    ale = env.unwrapped.ale
    lost = ale.cloneState()
    served = []
    for wait in range(14):                        # NOOPs after the first frame without the ball, then one FIRE
        ale.restoreState(lost)
        for _ in range(wait):
            env.step(0)
        served.append(metrics.ball_position(env.step(1)[0]) is not None)
    assert not any(served[:4]) and all(served[10:])
    assert served == sorted(served)               # once FIRE serves, it always does


def test_breakout_paddle_follows_a_dial_that_winds_up_past_the_wall():
    """The fact behind stage 5's paddle dial (README stage 5, session 35): the keys turn a dial the paddle shows
    clamped at the walls. Keys that leave the dial at the same place (gameplay_data.paddle_dials) give the same
    paddle from then on; after 4 and after 5 RIGHT presses the paddle is at the right wall in both, but the dial
    is not at the same place, and the paddle comes back another way."""
    import gameplay_data as gd
    import metrics
    env = atari_env.make_world_model_env("breakout")
    dial = atari_env.paddle_dial("breakout")
    NOOP, RIGHT, LEFT = 0, 2, 3
    assert dial[0] == [0, 0, 1, -1] and atari_env.paddle_dial("mspacman") is None

    def play(keys):
        env.reset(seed=0)
        for key in keys:
            frame = env.step(key)[0]
        back = [metrics.paddle_left(env.step(LEFT)[0]) for _ in range(6)]
        return metrics.paddle_left(frame), back, float(gd.paddle_dials(np.array(keys), dial)[-1])

    wound = play([RIGHT] * 5)
    assert wound[2] == pytest.approx(dial[1])                    # as far as it turns
    for keys in ([RIGHT] * 9, [LEFT, LEFT] + [RIGHT] * 9, [RIGHT, NOOP, RIGHT, RIGHT, NOOP, RIGHT, RIGHT]):
        assert play(keys) == wound, keys
    short = play([RIGHT] * 4)
    assert short[0] == wound[0] and short[2] < wound[2] and short[1] != wound[1]


def test_breakout_serve_place_follows_hidden_emulator_state_not_chance():
    """Where the game serves is not a random pick (README stage 5, session 35): it follows emulator state that
    the frames do not show. One no-op start serves the same places in the same order whatever the waits before
    FIRE; starting 1-3 raw frames later (the recordings' random no-op start) moves every one, 4 frames later
    does not."""
    import metrics
    env = atari_env.make_world_model_env("breakout")

    def places(noop_frames, waits):
        env.reset(seed=0)
        atari_env.noop_start(env, noop_frames)
        out = []
        for wait in waits:
            for _ in range(wait):
                env.step(0)
            for _ in range(30):                   # FIRE until the ball is served
                ball = metrics.ball_position(env.step(1)[0])
                if ball is not None:
                    break
            out.append(ball)
            for _ in range(400):                  # NOOP until it is lost
                if metrics.ball_position(env.step(0)[0]) is None:
                    break
        return out

    first = places(0, (0, 0, 0))
    assert None not in first and len(set(first)) == 3
    assert places(0, (5, 1, 2)) == first
    assert places(4, (0, 0, 0)) == first
    for noop_frames in (1, 2, 3):
        assert all(a != b for a, b in zip(places(noop_frames, (0, 0, 0)), first)), noop_frames


def test_breakout_serves_where_its_frame_counter_says_and_recordings_know_where_it_started():
    """The rule behind the test above (README stage 5, session 36): RAM byte 90 counts frames from reset, and the
    place of a serve is picked by its last two bits on the frame the ball is launched, one of four. A FIRE held
    once the lost ball is out of sight launches on a step's first frame, so the no-op start (that counter's
    phase, atari_env.recorded_frame_phase) alone picks it; recorded_frame_phase finds that phase for every kind
    of recording: a stored start frame, random play's no-op count, the DQN's seeded no-op start replayed."""
    import metrics
    env = atari_env.make_world_model_env("breakout")
    ale = env.unwrapped.ale
    launches = {}
    for noop_frames in range(8):
        env.reset(seed=0)
        atari_env.noop_start(env, noop_frames)
        for wait in (0, 12, 3):
            for _ in range(wait):
                env.step(0)
            for _ in range(30):                   # FIRE, a raw frame at a time, until the ball is launched
                before = ale.getRAM().copy()
                for _ in range(atari_env.FRAMESKIP):
                    ale.act(1)
                    if before[101] == 0 and ale.getRAM()[101] != 0:
                        break
                    before = ale.getRAM().copy()
                else:
                    continue
                break
            counter, frame = int(ale.getRAM()[90]), ale.getEpisodeFrameNumber()
            assert counter == frame % 256
            launches.setdefault(counter % 4, set()).add(int(ale.getRAM()[99]))   # the ball's column once launched
            for _ in range(400):                  # NOOP until it is lost
                if metrics.ball_position(env.step(0)[0]) is None:
                    break
    assert len(launches) == 4 and all(len(cols) == 1 for cols in launches.values())
    assert len(set.union(*launches.values())) == 4
    assert atari_env.recorded_frame_phase({"start_frame": 9, "noop_frames": 2}) == 1
    assert atari_env.recorded_frame_phase({"noop_frames": 7}) == 3
    agent = atari_env.make_agent_env("breakout", noop_max=30)
    phases = set()
    for seed in range(6):
        agent.reset(seed=seed)
        start = agent.unwrapped.ale.getEpisodeFrameNumber()
        meta = {"game": "breakout", "seed": seed, "policy": "dqn", "env": {"noop_max": 30}}
        assert atari_env.recorded_frame_phase(meta) == start % atari_env.FRAMESKIP
        phases.add(start % atari_env.FRAMESKIP)
    assert len(phases) > 1


def test_real_twin_says_when_the_real_game_is_over():
    """neural_random_game --compare holds the real side's last frame once its game is over, and says from when."""
    twin = atari_env.RealTwin("breakout", 2)
    twin.reset(0)
    assert twin.ended_at is None
    while twin.ended_at is None and twin.steps < 3000:
        twin.step(1)                               # FIRE only: every ball is served and lost
    ended = twin.ended_at
    assert ended is not None and ended == twin.steps
    twin.step(2)
    assert twin.ended_at == ended
