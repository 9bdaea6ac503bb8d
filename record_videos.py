"""Stage 2: record gameplay episodes (raw RGB frames + actions) for the world model.

    python record_videos.py --game breakout --total_videos 200 --percent_random 30
    python record_videos.py --policy random --total_videos 20 --output_dir data/test

Rerunning the same command continues to N episodes: finished episodes are files written atomically,
so a killed run loses at most the episodes in flight and never leaves a half file.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import atari_env
import gameplay_data as gd
from common import UserError, arg, parse_config, run_main, save_json


@dataclass
class Config:
    """Record episodes in the world-model view; the DQN acts on its own preprocessed view."""
    game: str = arg("breakout", "game to record", choices=list(atari_env.GAMES))
    checkpoint: str = arg("", "DQN weights (default checkpoints/<game>/dqn.safetensors)")
    policy: str = arg("mixed", "mixed: DQN + random episodes; random: no checkpoint needed",
                      choices=["mixed", "random"])
    total_videos: int = arg(100, "episodes wanted in output_dir (existing ones count)")
    percent_random: float = arg(30.0, "percent of episodes played by a uniformly random policy")
    random_action_prob: float = arg(0.2, "per-step chance the DQN's action is replaced by a random one")
    noop_max: int = arg(30, "random no-op steps at reset (start-state diversity)")
    output_dir: str = arg("", "where episodes go (default data/<game>)")
    workers: int = arg(2, "parallel recording processes")
    mp4: bool = arg(False, "also write a watchable MP4 preview per episode (never used for training)")
    seed: int = arg(0, "base seed; episode i uses seed+i, so reruns are reproducible")


def episode_policy(i: int, percent_random: float) -> str:
    """Exactly percent_random % of any prefix of episodes are random, spread evenly."""
    return "random" if int((i + 1) * percent_random / 100) > int(i * percent_random / 100) else "dqn"


_random_play_envs: dict = {}


def _reusable_world_model_env(game: str):
    """One env per process for random play: making one (and seeding it) loads the ROM, ~0.13 s each, more
    than a short random game takes to play. Without sticky actions the ALE is deterministic, so the game
    depends only on the episode's own rng (no-op start and actions), not on what the env played before."""
    if game not in _random_play_envs:
        _random_play_envs[game] = atari_env.make_world_model_env(game)
    return _random_play_envs[game]


def play_episode(cfg: Config, seed: int, rng, q_net) -> tuple:
    """One whole game. Random play runs straight in the world-model view (no agent preprocessing to pay
    for: ~2.5x cheaper); the DQN acts on its own 84x84 stacks while the raw RGB frame of the same step is
    recorded (both views: frameskip 4, no sticky actions, so the frames are the same)."""
    if q_net is None:
        env = _reusable_world_model_env(cfg.game)
        obs, info = env.reset()
        extra = {"noop_frames": int(rng.integers(cfg.noop_max + 1))}
        atari_env.noop_start(env, extra["noop_frames"])
    else:
        env = atari_env.make_agent_env(cfg.game, noop_max=cfg.noop_max)
        obs, info = env.reset(seed=seed)
        tracker = atari_env.LifeTracker(1, atari_env.fire_action_of(cfg.game))
        tracker.fire_pending[:] = True   # the DQN was trained with FIRE after reset
        extra = {}   # its no-op start comes from the env's own seeded rng
    ale, n_actions = env.unwrapped.ale, env.action_space.n
    extra["start_frame"] = ale.getEpisodeFrameNumber()   # where the frame counter starts: atari_env.recorded_frame_phase
    frames, actions, rewards, lives = [ale.getScreenRGB()], [], [], [ale.lives()]
    terminated = truncated = False
    while not (terminated or truncated):
        if q_net is None or rng.random() < cfg.random_action_prob:
            a = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                a = int(q_net(torch.from_numpy(np.asarray(obs))[None]).argmax(1))
            a = int(tracker.override(np.array([a]))[0])
        obs, r, terminated, truncated, info = env.step(a)
        if q_net is not None:
            tracker.update(np.array([info["lives"]]), np.array([r]), np.array([terminated or truncated]))
        frames.append(obs if q_net is None else ale.getScreenRGB())
        actions.append(a)
        rewards.append(r)
        lives.append(info["lives"])
    if q_net is not None:
        env.close()
    return frames, actions, rewards, lives, terminated, extra


def record_episode(cfg: Config, i: int, q_net) -> dict:
    """Play one whole game (all lives, up to the ALE's frame limit) and write it."""
    policy = "random" if q_net is None else episode_policy(i, cfg.percent_random)
    seed = cfg.seed + i
    rng = np.random.default_rng(seed)
    frames, actions, rewards, lives, terminated, extra = play_episode(cfg, seed, rng, None if policy == "random" else q_net)
    meta = {"game": cfg.game, "seed": seed, "policy": policy, "index": i, "steps": len(actions),
            "score": float(np.sum(rewards)), "terminated": bool(terminated),
            "random_action_prob": cfg.random_action_prob if policy == "dqn" else 1.0,
            "env": {"id": atari_env.game_spec(cfg.game).env_id, "frameskip": atari_env.FRAMESKIP,
                    "repeat_action_probability": 0.0, "noop_max": cfg.noop_max}, **extra}
    out = Path(cfg.output_dir)
    gd.save_episode(gd.episode_path(out, i), np.stack(frames), actions, rewards, lives, terminated, meta)
    if cfg.mp4:
        import imageio.v3 as iio
        preview = out / "previews" / f"episode_{i:06d}.mp4"
        preview.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(preview, np.stack(frames), fps=15, codec="libx264", macro_block_size=1)
    return meta


_worker_net = None


def _worker_init(cfg: Config) -> None:
    global _worker_net
    torch.set_num_threads(1)
    if cfg.policy == "mixed" and cfg.percent_random < 100:
        from train_dqn import load_dqn_weights
        _worker_net = load_dqn_weights(cfg.checkpoint, cfg.game)


def _worker_record(args):
    cfg, i = args
    return record_episode(cfg, i, _worker_net)


def summarise(cfg: Config) -> dict:
    """Counts over every episode on disk (reads only the small arrays, not the frames)."""
    files = gd.list_episodes(cfg.output_dir)
    names = atari_env.action_names(cfg.game)
    counts, scores, policies, steps = Counter(), [], Counter(), 0
    for f in files:
        ep = gd.load_episode(f, keys=("actions", "rewards", "meta"))
        counts.update(ep["actions"].tolist())
        scores.append(float(ep["rewards"].sum()))
        policies[ep["meta"]["policy"]] += 1
        steps += len(ep["actions"])
    s = np.array(scores)
    return {"game": cfg.game, "episodes": len(files), "transitions": steps, "frames": steps + len(files),
            "policy_episodes": dict(policies),
            "action_counts": {names[a]: int(counts.get(a, 0)) for a in range(len(names))},
            "score": {"mean": float(s.mean()), "min": float(s.min()), "median": float(np.median(s)),
                      "max": float(s.max()), "histogram": np.histogram(s, bins=10)[0].tolist(),
                      "bin_edges": np.histogram(s, bins=10)[1].round(1).tolist()},
            "disk_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1)}


def main(argv=None) -> None:
    cfg = parse_config(Config, argv)
    atari_env.game_spec(cfg.game)
    cfg.output_dir = cfg.output_dir or f"data/{cfg.game}"
    cfg.checkpoint = cfg.checkpoint or f"checkpoints/{cfg.game}/dqn.safetensors"
    if cfg.total_videos < 1 or cfg.workers < 1 or not 0 <= cfg.percent_random <= 100:
        raise UserError("--total_videos and --workers must be >= 1 and --percent_random within 0..100")
    if cfg.policy == "random":
        cfg.percent_random = 100.0
    elif cfg.percent_random < 100:
        from train_dqn import load_dqn_weights
        load_dqn_weights(cfg.checkpoint, cfg.game)   # fail now, with a clear message, not in a worker
    out = Path(cfg.output_dir)
    manifest = gd.read_manifest(out)
    if manifest and manifest.get("game") != cfg.game:
        raise UserError(f"{out} holds {manifest.get('game')!r} episodes, not {cfg.game!r}; pick another --output_dir")
    todo = [i for i in range(cfg.total_videos) if not gd.episode_path(out, i).exists()]
    print(f"{cfg.total_videos - len(todo)} of {cfg.total_videos} episodes already in {out}; recording {len(todo)}")
    t0, frames = time.time(), 0
    if todo:
        with tqdm(total=len(todo), unit="episode") as bar:
            if cfg.workers == 1:
                _worker_init(cfg)
                results = (_worker_record((cfg, i)) for i in todo)
                pool = None
            else:
                pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_worker_init, initargs=(cfg,))
                results = pool.imap_unordered(_worker_record, [(cfg, i) for i in todo])
            try:
                for meta in results:
                    frames += meta["steps"] + 1
                    bar.update(1)
                    bar.set_postfix(score=meta["score"], fps=f"{frames / (time.time() - t0):.0f}")
            finally:
                if pool is not None:
                    pool.terminate()
    summary = summarise(cfg)
    summary.update(recording={k: v for k, v in dataclasses.asdict(cfg).items()},
                   last_run={"frames": frames, "seconds": round(time.time() - t0, 1)})
    save_json(out / "manifest.json", summary)
    print(f"{summary['episodes']} episodes, {summary['frames']:,} frames, {summary['disk_mb']} MB on disk")
    print("actions:", ", ".join(f"{k} {v:,}" for k, v in summary["action_counts"].items()))
    sc = summary["score"]
    print(f"score: mean {sc['mean']:.1f}, median {sc['median']:.1f}, min {sc['min']:.0f}, max {sc['max']:.0f}")


if __name__ == "__main__":
    run_main(main)
