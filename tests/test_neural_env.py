import json

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import atari_env
import metrics
from common import UserError
from conftest import run_script
from models.world_model import Palette, cells_any


def test_neural_env_passes_gymnasium_checker_and_validates_input(tiny_models):
    env = atari_env.make_neural_env("breakout", tiny_models, "cpu")
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (210, 160, 3) and obs.dtype == np.uint8
    inner = env.unwrapped
    # the history kept is the longer of the decoder's context and what stage 5 reads
    assert inner.context_length == max(inner.world_model.context, inner.a2l.frames_seen) == 2
    inner.context_length = 8                                  # as with an event head reading 8 frames
    frames = np.zeros((2, 210, 160, 3), np.uint8)
    frames[-1, 0, 0] = (142, 142, 142)
    obs, _ = env.reset(options={"frames": frames})
    assert np.array_equal(obs, frames[-1])
    kept = inner.palette.to_rgb(inner._ctx[0].numpy())      # two frames given: the older one repeated before them
    assert len(kept) == 8 and all(np.array_equal(f, frames[0]) for f in kept[:7]) and np.array_equal(kept[7], frames[1])
    nxt, reward, term, trunc, info = env.step(2)
    assert nxt.shape == (210, 160, 3) and "latent" in info
    assert np.array_equal(inner.palette.to_rgb(inner._ctx[0, -2].numpy()), frames[1])   # the history rolls on
    with pytest.raises(UserError, match=r"\(n, 210, 160, 3\), n >= 2"):
        env.reset(options={"frames": np.zeros((210, 160, 3), np.uint8)})
    with pytest.raises(UserError, match="NOOP, FIRE, RIGHT, LEFT"):
        env.step(9)


def test_neural_env_draws_the_same_dream_with_and_without_the_cached_decoder(tiny_models):
    envs = [atari_env.make_neural_env("breakout", tiny_models, "cpu", cached_decoder=c) for c in (False, True)]
    assert envs[0].unwrapped.cached_decoder is None and envs[1].unwrapped.cached_decoder is not None
    assert atari_env.make_neural_env("breakout", tiny_models, "cpu").unwrapped.cached_decoder is not None   # CPU default
    rng = np.random.default_rng(0)
    keys = rng.integers(4, size=40)
    dreams = []
    for env in envs:
        with torch.no_grad():   # a few training steps leave a decoder that copies the last frame: make it draw
            env.unwrapped.world_model.head[-1].weight.mul_(30)
        env.reset(seed=3)
        dreams.append([env.step(int(a))[0] for a in keys] + [env.unwrapped.step_latent([1], event=0)])
    assert all(np.array_equal(a, b) for a, b in zip(*dreams))
    assert any(not np.array_equal(dreams[1][0], f) for f in dreams[1][1:])   # the dream moves


def test_neural_env_feeds_the_past_actions_to_the_action_to_latent_model(tiny_models, monkeypatch):
    env = atari_env.make_neural_env("breakout", tiny_models, "cpu")
    n = env.unwrapped.a2l.past_actions
    assert n >= 1                                            # v2 default
    seen = []
    real_sample = env.unwrapped.a2l.sample_step
    monkeypatch.setattr(env.unwrapped.a2l, "sample_step",
                        lambda act, ctx, t, g, past, **kw: seen.append(past[0].tolist()) or real_sample(act, ctx, t, g, past, **kw))
    frames = np.zeros((2, 210, 160, 3), np.uint8)
    env.reset(options={"frames": frames, "past_actions": [1, 3]})
    for a in (2, 2, 1):
        env.step(a)
    env.reset(options={"frames": frames, "prev_action": 2})
    env.step(0)
    env.reset(options={"frames": frames})
    env.step(0)
    history = [0] * 8 + [1, 3, 2, 2]                          # NOOP before what reset was given
    assert seen == [history[10 - n + i:10 + i] for i in range(3)] + [[0] * (n - 1) + [2], [0] * n]


def test_registered_with_gymnasium(tiny_models):
    import gymnasium as gym
    env = gym.make("NeuralAtari/Breakout-v0", checkpoint_dir=tiny_models, device="cpu")
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)


def test_headless_play_loop_runs_scripted_keys_and_records(tiny_models, tmp_path):
    out = tmp_path / "play.mp4"
    p = run_script("play_neural_breakout.py", "--headless", "--script", "FRRRLLL..R", "--checkpoint-dir",
                   tiny_models, "--record", out, "--fps", 0, "--side-by-side", "--device", "cpu")
    assert "recorded 10 steps" in p.stdout and out.stat().st_size > 1000
    bad = run_script("play_neural_breakout.py", "--headless", "--script", "XYZ", "--checkpoint-dir", tiny_models,
                     check=False)
    assert bad.returncode == 2 and "--script" in bad.stderr


def test_random_game_gif(tiny_models, tmp_path):
    out = tmp_path / "game.gif"
    p = run_script("neural_random_game.py", "--checkpoint-dir", tiny_models, "--steps", 12, "--compare", "--out", out)
    assert "wrote 12 frames" in p.stdout
    import imageio.v3 as iio
    frames = iio.imread(out)   # GIF writers merge identical consecutive frames, so count <= 12
    assert 1 <= frames.shape[0] <= 12 and frames.shape[1:] == (420, 2 * (160 * 2) + 8, 3)


def test_detector_matches_ram_on_real_frames():
    """Paddle left edge = RAM[72] - 47, ball top/left = RAM[101] + 9 / RAM[99] - 49 (Breakout)."""
    env = atari_env.make_world_model_env("breakout")
    obs, _ = env.reset(seed=1)
    rng = np.random.default_rng(0)
    paddles = balls = 0
    for t in range(400):
        obs, *_, term, trunc, _ = env.step(1 if t % 40 == 0 else int(rng.integers(4)))
        ram = env.unwrapped.ale.getRAM()
        pl = metrics.paddle_left(obs)
        assert pl is not None and pl == int(ram[72]) - 47
        paddles += 1
        ball = metrics.ball_position(obs)
        top, left = int(ram[101]) + 9, int(ram[99]) - 49
        if ball is not None and 93 <= top <= 185 and 8 <= left <= 150:   # not clipped by walls/bricks
            assert ball == (top, left)
            balls += 1
        if term:
            break
    assert paddles > 100 and balls > 20


def test_ball_visible_on_palette_indices_is_the_detectors_answer():
    """metrics.ball_visible (palette indices, the event head's training label) == ball_position is not None."""
    env = atari_env.make_world_model_env("breakout")
    frames = [env.reset(seed=2)[0]]
    for t in range(250):   # FIRE every 50 steps, random keys between: balls in play, lost and served again
        frames.append(env.step(1 if t % 50 == 0 else int(np.random.default_rng(t).integers(4)))[0])
    frames = np.stack(frames)
    palette = Palette.fit(frames)
    seen = metrics.ball_visible(torch.from_numpy(palette.to_index(frames)), palette.colors).numpy()
    truth = np.array([metrics.ball_position(f) is not None for f in frames])
    assert np.array_equal(seen, truth) and 20 < truth.sum() < len(truth) - 20   # both kinds of frame occur
    # the event head's dense target: the grid cells holding the ball's pixels (its top-left one among them)
    cells = cells_any(metrics.ball_pixels(torch.from_numpy(palette.to_index(frames)), palette.colors)).numpy()
    for frame, c in zip(frames, cells):
        ball = metrics.ball_position(frame)
        assert (c.sum() == 0) == (ball is None) and c.sum() <= 4
        assert ball is None or c[int(ball[0]) // 8, int(ball[1]) // 8] == 1
    # the vectorised corner (validation's ball_in_place) is ball_position's, nan where there is none
    corner = metrics.ball_corner(torch.from_numpy(palette.to_index(frames)), palette.colors).numpy()
    for frame, c in zip(frames, corner):
        ball = metrics.ball_position(frame)
        assert np.isnan(c).all() if ball is None else tuple(c) == ball


def test_ball_may_turn_marks_the_transitions_before_the_real_balls_turns():
    """metrics.ball_may_turn (the world model's --turn_focus) on emulator play that keeps the ball in play
    (the paddle follows it): it marks most transitions where the ball then bounces or turns, few of all."""
    env = atari_env.make_world_model_env("breakout")
    frames = [env.reset(seed=3)[0]]
    for t in range(400):
        ball, paddle = metrics.ball_position(frames[-1]), metrics.paddle_left(frames[-1])
        key = 1 if ball is None or paddle is None else (2 if ball[1] > paddle + 8 else 3)   # FIRE, RIGHT, LEFT
        frame, _, term, trunc, _ = env.step(key)
        frames.append(frame)
        if term or trunc:
            break
    frames = np.stack(frames)
    palette = Palette.fit(frames)
    may = metrics.ball_may_turn(torch.from_numpy(palette.to_index(frames)), palette.colors).numpy()
    balls = [metrics.ball_position(f) for f in frames]
    turns = [t for t in range(1, len(frames) - 1) if None not in balls[t - 1:t + 2]
             and np.subtract(balls[t + 1], balls[t]).tolist() != np.subtract(balls[t], balls[t - 1]).tolist()]
    assert len(may) == len(frames) - 1 and not may[0] and len(turns) >= 5
    assert np.mean(may[turns]) > 0.7 and 0.03 < may.mean() < 0.3   # most turns, few of all transitions
    # --fast_ball_px: the ball's last sideways step, as ball_position reads it
    fast = metrics.ball_fast_sideways(torch.from_numpy(palette.to_index(frames)), palette.colors, 6).numpy()
    truth = [t > 0 and None not in balls[t - 1:t + 1] and abs(balls[t][1] - balls[t - 1][1]) >= 6
             for t in range(len(frames) - 1)]
    assert np.array_equal(fast, truth) and 0 < fast.sum() < len(fast)


def test_serves_are_found_exactly_after_fire_with_no_ball_in_play():
    env = atari_env.make_world_model_env("breakout")
    frames = [env.reset(seed=1)[0]]
    for t in range(300):   # FIRE every 40 steps, NOOP between: the ball is served, missed, served again
        obs, _, term, _, _ = env.step(1 if t % 40 == 0 else 0)
        frames.append(obs)
        if term:
            break
    serves = metrics.serve_steps(np.stack(frames))
    assert len(serves) >= 3 and all(t % 40 == 0 for t in serves)
    assert all(metrics.ball_position(frames[t]) is None for t in serves)


def test_object_errors_and_off_palette():
    a = np.zeros((1, 210, 160, 3), np.uint8)
    a[0, 189:193, 40:56] = metrics.BREAKOUT_RED
    b = a.copy()
    b[0, 189:193, 40:56] = 0
    b[0, 189:193, 46:62] = metrics.BREAKOUT_RED
    r = metrics.object_errors(b, a)
    assert r["paddle_err_px"] == 6 and r["ball_presence_agree"] == 1.0
    b[0, 120:124, 80:82] = metrics.BREAKOUT_RED
    r = metrics.object_errors(b, a)
    assert r["ball_presence_agree"] == 0.0 and r["ball_spurious"] == 1.0 and r["ball_missed"] == 0.0
    r = metrics.object_errors(a, b)
    assert r["ball_missed"] == 1.0 and r["ball_spurious"] == 0.0
    noisy = a.copy()
    noisy[0, :21] = (90, 10, 250)
    assert metrics.off_palette_fraction(noisy, np.array([[0, 0, 0], [200, 72, 72]])) == pytest.approx(0.1)
    # per-rollout counts pool to what the frames of both rollouts give together (evaluate_world_model's
    # whole-run numbers); the mean of the two rollouts' own means would give presence 0.25, not 1/3
    c = np.concatenate([a, a])
    c[1, 120:124, 80:82] = metrics.BREAKOUT_RED   # a ball in one of the two frames
    first, second = (a, b), (c, np.concatenate([b, b]))
    pooled = metrics.errors_from_counts(metrics.object_error_counts(*first), metrics.object_error_counts(*second))
    together = metrics.object_errors(np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]]))
    assert pooled == pytest.approx(together, nan_ok=True)
    assert pooled["ball_presence_agree"] == pytest.approx(1 / 3) and pooled["ball_err_px"] == 0.0


def test_evaluation_end_to_end(tiny_data, tiny_models, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- eval:begin -->\nold\n<!-- eval:end -->\ny\n")
    run_script("evaluate_world_model.py", "--data-dir", tiny_data, "--checkpoint-dir", tiny_models, "--out-dir",
               tmp_path, "--starts", 3, "--horizon", 8, "--object-steps", 8, "--random-steps", 10,
               "--latent-samples", 128, "--sps-steps", 10, "--threads", 1, "--readme", readme)
    r = json.loads((tmp_path / "report.json").read_text())
    for key in ("psnr@1", "psnr@4", "copy_last_psnr@1", "delta_psnr@4", "paddle_err_px", "ball_presence_agree",
                "off_palette", "latent_acc", "play_sps"):
        assert key in r
    assert r["latent_acc"] <= r["latent_frame_match"] <= 1
    assert r["emulator_replay_mismatched_frames"] == 0      # the recording replays exactly in the emulator
    assert (tmp_path / "psnr_vs_horizon.png").exists()
    text = readme.read_text()
    assert "old" not in text and "| psnr@1" in text and text.endswith("y\n")

    # per-start values add up to the report's numbers, and a paired comparison reads them
    per_start = r["per_start"]
    assert len(per_start) == r["starts"] == 3
    for t in (1, 4):
        assert metrics.psnr_from_mse(np.mean([p[f"mse@{t}"] for p in per_start])) == pytest.approx(r[f"psnr@{t}"])
    assert np.mean([p["ball_presence_agree"] for p in per_start]) == pytest.approx(r["ball_presence_agree"])
    worse = {**r, "per_start": [{**p, "paddle_err_px": p["paddle_err_px"] + 5, "mse@4": p["mse@4"] * 4}
                                for p in per_start]}
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    out = run_script("benchmarks/compare_evaluations.py", tmp_path / "report.json", tmp_path / "worse.json").stdout
    assert "| paddle_err_px |" in out and "| +5.000 | [+5.000, +5.000] | A better |" in out
    assert "| psnr@4 |" in out and "| -6.021 | [-6.021, -6.021] | A better |" in out
    same = run_script("benchmarks/compare_evaluations.py", tmp_path / "report.json", tmp_path / "report.json").stdout
    assert "A better" not in same and "B better" not in same and "| same |" in same
    other = {**r, "per_start": per_start[::-1]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = run_script("benchmarks/compare_evaluations.py", tmp_path / "report.json", tmp_path / "other.json",
                      check=False)
    assert proc.returncode != 0 and "do not share their start points" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_encoder_latent_rollouts_use_each_real_transition(tiny_data, tiny_models, tmp_path):
    """--latents encoder drives the decoder with the encoder's latent of transition t -> t+1 at step t."""
    import torch

    import gameplay_data as gd
    from evaluate_world_model import encoder_codes
    env = atari_env.make_neural_env("breakout", tiny_models, "cpu")
    frames = gd.load_episode(gd.list_episodes(tiny_data)[0])["frames"][:12]
    k, wm = env.context_length, env.world_model
    codes, events = encoder_codes(env, frames)
    idx = torch.from_numpy(env.palette.to_index(frames))
    assert len(codes) == len(events) == len(frames) - k and set(events) == {0}   # a world model without events
    for t in (0, 5, len(frames) - k - 1):
        assert torch.equal(codes[t], wm.encode(idx[None, t:t + k], idx[None, t + k])[1][0])
    run_script("evaluate_world_model.py", "--data-dir", tiny_data, "--checkpoint-dir", tiny_models, "--out-dir",
               tmp_path, "--starts", 2, "--horizon", 8, "--object-steps", 8, "--random-steps", 5,
               "--latent-samples", 128, "--sps-steps", 5, "--threads", 1, "--latents", "encoder")
    assert json.loads((tmp_path / "report_encoder_latents.json").read_text())["latents"] == "encoder"
    assert not (tmp_path / "report.json").exists()
    import evaluate_world_model
    with pytest.raises(UserError, match="--readme"):
        evaluate_world_model.main(["--latents", "encoder", "--readme", str(tmp_path / "README.md")])


@pytest.mark.parametrize("text", [None, "a README without the results block\n"])
def test_evaluation_refuses_a_bad_readme_before_it_runs(text, tmp_path):
    """--readme is checked first: the evaluation takes ~11 minutes and found a missing file only at its end."""
    import evaluate_world_model
    readme = tmp_path / "README.md"
    if text is not None:
        readme.write_text(text)
    # a data folder that does not exist: had the README check come after loading anything, another error would win
    with pytest.raises(UserError, match="no such file" if text is None else "no <!-- eval:begin -->"):
        evaluate_world_model.main(["--data-dir", str(tmp_path / "none"), "--checkpoint-dir", str(tmp_path / "none"),
                                   "--readme", str(readme)])


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frame(row=None, col=None, width=2):
    """A black RGB frame with Breakout's 4-row ball at (row, col), or none."""
    f = np.zeros((210, 160, 3), np.uint8)
    if row is not None:
        f[row:row + 4, col:col + width] = (200, 72, 72)
    return f


def test_ball_losses_finds_the_first_lost_ball_and_what_the_dream_drew_before():
    ball_losses = load_benchmark("ball_losses")

    real = np.stack([frame(150, 40), frame(146, 46), frame(142, 52), frame(138, 58)])
    assert ball_losses.first_loss(real.copy(), real) is None                       # the dream keeps it
    dream = np.stack([frame(150, 40), frame(146, 46), frame(142, 52, width=1), frame()])
    assert ball_losses.first_loss(dream, real) == {"step": 3, "before": "off or partial", "where": "mid-field"}
    dream[2] = real[2]
    assert ball_losses.first_loss(dream, real)["before"] == "exact"
    assert ball_losses.first_loss(np.stack([frame()] * 4), real)["before"] == "first step (real context)"
    served = np.stack([frame(), frame(), frame(124, 76), frame(190, 76)])         # a serve the dream misses
    assert ball_losses.first_loss(np.stack([frame()] * 4), served)["before"] == "no ball before (a serve not drawn)"
    assert metrics.ball_position(frame(95, 20)) == (95.0, 20.0) and ball_losses.first_loss(
        np.stack([frame()]), np.stack([frame(95, 20)]))["where"] == "at the bricks"


def test_ball_flight_groups_open_flight_by_the_last_step(tiny_data, tiny_models):
    ball_flight = load_benchmark("ball_flight")

    def frames(*balls):
        return np.stack([frame(*ball) for ball in balls])

    straight = frames((150, 40), (146, 46), (142, 52), (138, 58))        # up and 6 px right, three times
    turned = frames((150, 40), (146, 46), (150, 52))                     # the second step turns down
    near_wall = frames((150, 130), (146, 136), (142, 142))               # at t the ball is by the right wall
    lost = frames((150, 40), (146, 46), ())                              # no ball at t + 1
    groups = ball_flight.open_flights([{"frames": f} for f in (straight, turned, near_wall, lost)])
    assert dict(groups) == {(-4.0, 6.0): [(0, 1, True), (0, 2, True), (1, 1, False)]}
    out = run_script("benchmarks/ball_flight.py", tiny_models, "--data_dir", tiny_data, "--episodes", 8).stdout
    rows = [line for line in out.splitlines() if line.startswith("| +") or line.startswith("| -")]
    assert "open-flight transitions in" in out and rows   # random play serves: some groups have >= 10 flights
    for row in rows:   # the repeat rate and the model's two rates are fractions
        assert all(0 <= float(x) <= 1 for x in row.replace("%", "").replace("/", "|").split("|")[4:-1])


def test_play_speed_hands_another_models_dream_to_a_decoder_in_its_own_palette(tiny_models, monkeypatch):
    play_speed = load_benchmark("play_speed")
    monkeypatch.setattr(play_speed, "EPISODES", 1)
    monkeypatch.setattr(play_speed, "STEPS", 6)
    env = atari_env.make_neural_env("breakout", tiny_models, device="cpu", cached_decoder=False)
    calls = play_speed.record_dream(env)
    assert len(calls) == 6
    colors = env.unwrapped.palette.colors
    shuffled = Palette(colors[::-1].copy())                  # the other model's palette: same colours, other indices
    wm = env.unwrapped.world_model
    moved = play_speed.translate_dream(calls, env, wm, shuffled)
    for (ctx, codes, events), (new_ctx, new_codes, new_events) in zip(calls, moved):
        assert not torch.equal(new_ctx, ctx) and np.array_equal(shuffled.colors[new_ctx.numpy()], colors[ctx.numpy()])
        assert torch.equal(new_codes, codes % wm.codebook_size) and new_events is (events if wm.num_events else None)
    assert np.isnan(play_speed.uncertain_cells(wm, calls)) == (not wm.shift_offsets)
    still = torch.zeros(1, 2, 210, 160, dtype=torch.uint8)
    served = still.clone()
    served[0, 1, 150:154, 40:42] = 1                          # a ball appears: 8 pixels change
    two_colours = np.array([[0, 0, 0], [200, 72, 72]], np.uint8)
    assert play_speed.dream_motion([(still, None, None), (served, None, None)], two_colours, "breakout") == \
        "4.0 pixels change a step, a ball on screen in 50% of the steps"
