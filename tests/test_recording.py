import dataclasses
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import atari_env
import gameplay_data as gd
from common import UserError
from conftest import ROOT
from record_videos import Config, episode_policy, record_episode


def test_recorded_frames_are_bit_identical_to_the_env(tmp_path):
    cfg = Config(policy="random", output_dir=str(tmp_path), noop_max=0, seed=5)
    meta = record_episode(cfg, 0, None)
    assert meta["start_frame"] == meta["noop_frames"] == 0   # where the frame counter started
    ep = gd.load_episode(gd.episode_path(tmp_path, 0))
    assert ep["frames"].shape == (meta["steps"] + 1, 210, 160, 3)
    env = atari_env.make_world_model_env("breakout")
    obs, _ = env.reset(seed=5)
    assert np.array_equal(ep["frames"][0], obs)
    for t, a in enumerate(ep["actions"]):       # frame t+1 is the observation after action t
        obs, r, term, trunc, info = env.step(int(a))
        assert np.array_equal(ep["frames"][t + 1], obs), f"frame {t + 1} differs"
        assert ep["rewards"][t] == r and ep["lives"][t + 1] == info["lives"]
    assert term and ep["terminated"]
    # channel order: the paddle/ball red (200, 72, 72) is stored as RGB, not BGR
    assert ((ep["frames"][..., 0] == 200) & (ep["frames"][..., 2] == 72)).any()


def test_random_episode_does_not_depend_on_what_the_worker_played_before(tmp_path):
    # random play reuses one env per process; the episode must still be a function of its index alone
    import record_videos
    cfg = Config(policy="random", output_dir=str(tmp_path / "a"), noop_max=30)
    record_episode(cfg, 3, None)
    record_episode(cfg, 5, None)
    record_videos._random_play_envs.clear()
    record_episode(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")), 5, None)
    a, b = (gd.load_episode(gd.episode_path(tmp_path / d, 5))["frames"] for d in "ab")
    assert len(a) > 1 and np.array_equal(a, b)


def test_episode_round_trip_and_damaged_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (4, 210, 160, 3), dtype=np.uint8)
    p = tmp_path / "episodes" / "episode_000000.npz"
    gd.save_episode(p, frames, [1, 2, 3], [0, 1, 0], [5, 5, 4, 4], True, {"game": "breakout"})
    ep = gd.load_episode(p)
    assert np.array_equal(ep["frames"], frames) and ep["actions"].tolist() == [1, 2, 3]
    assert ep["meta"] == {"game": "breakout"} and bool(ep["terminated"])
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(UserError, match="episode_000000.npz"):
        gd.load_episode(p)
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="foreign.npz"):
        gd.load_episode(tmp_path / "foreign.npz")


def test_percent_random_is_exact():
    pol = [episode_policy(i, 30) for i in range(100)]
    assert pol.count("random") == 30


def test_killed_recording_resumes_to_exactly_n_episodes(tmp_path):
    out = tmp_path / "rec"
    cmd = [sys.executable, str(ROOT / "record_videos.py"), "--policy", "random", "--total_videos", "6",
           "--output_dir", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "episodes").glob("*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list((out / "episodes").glob("episode_*.npz"))) < 6
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    files = sorted((out / "episodes").iterdir())
    assert [f.name for f in files] == [f"episode_{i:06d}.npz" for i in range(6)]   # no temp files, no gaps
    for f in files:
        gd.load_episode(f)


def test_dataset_windows_split_and_random_policy(tiny_data):
    train = gd.split_episodes(tiny_data, "train")
    val = gd.split_episodes(tiny_data, "val")
    assert val and train and not set(train) & set(val)
    assert set(train) | set(val) == set(gd.list_episodes(tiny_data))
    ds = gd.GameplayWindows(val, context=3, cache_episodes=1)
    ep = gd.load_episode(val[0])
    item = ds[5]
    assert item["t"] == 5 and np.array_equal(item["context"].numpy(), ep["frames"][3:6])
    assert np.array_equal(item["next"].numpy(), ep["frames"][6]) and item["action"] == ep["actions"][5]
    assert item["prev_action"] == ep["actions"][4] and ds[0]["prev_action"] == 0   # NOOP before the start
    hist = gd.GameplayWindows(val, context=3, cache_episodes=1, past_actions=3)
    assert hist[5]["past_actions"].tolist() == ep["actions"][2:5].tolist()            # oldest first
    assert hist[1]["past_actions"].tolist() == [0, 0, ep["actions"][0]]               # NOOP before the start
    assert np.array_equal(ds[0]["context"].numpy(), ep["frames"][[0, 0, 0]])   # history before the start
    manifest = gd.read_manifest(tiny_data)
    assert manifest["episodes"] == 8 and sum(manifest["action_counts"].values()) == manifest["transitions"]


def test_group_sampler_draws_the_focused_transitions_again_at_the_asked_fraction(tiny_data):
    ds = gd.GameplayWindows(gd.list_episodes(tiny_data), context=2, cache_episodes=4)
    focus = lambda ep: np.arange(len(ep["actions"])) % 5 == 0   # every fifth transition
    plain = list(gd.EpisodeGroupSampler(ds, group=4, seed=1))
    assert sorted(plain) == list(range(len(ds)))                  # without focus: each window once
    drawn = list(gd.EpisodeGroupSampler(ds, group=4, seed=1, focus=focus, focus_fraction=0.5))
    counts = np.bincount(drawn, minlength=len(ds))
    focused = np.array([t % 5 == 0 for _, t in ds.index])
    assert (counts[~focused] == 1).all() and (counts[focused] >= 1).all()   # the rest still once each
    extra = len(drawn) - len(ds)
    assert abs(extra / len(drawn) - 0.5) < 0.01 and counts[focused].sum() - focused.sum() == extra
    with pytest.raises(ValueError, match="focus_fraction"):
        gd.EpisodeGroupSampler(ds, focus=focus, focus_fraction=1.0)


def test_recording_needs_real_weights_for_the_dqn(tmp_path):
    from conftest import run_script
    p = run_script("record_videos.py", "--checkpoint", tmp_path / "missing.safetensors", "--output_dir",
                   tmp_path, "--total_videos", 1, check=False)
    assert p.returncode == 2 and "--policy random" in p.stderr
