"""DQN training throughput on this machine: the project's loop vs a plain single-env loop, same run.

    python benchmarks/dqn_throughput.py            # ~3 minutes on 2 cores (+ ~1 min for the replay RSS)

Both loops do the same algorithm: Double DQN, batch 32, one update per 4 agent steps, Nature CNN.
* project: train_dqn.py itself (ale-py C++ vector env with 8 envs, batched action selection, the update
  running while the envs step via send/recv, channels_last).
* plain: one gymnasium env with AtariPreprocessing + FrameStack, one forward per step, update inline.
Then: peak RSS of a 1M-transition FrameReplay, every page touched.
"""
from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atari_env  # noqa: E402
from models.dqn import FrameReplay  # noqa: E402
from train_dqn import Agent, Config  # noqa: E402

WARMUP, MEASURE = 2_000, 12_000


def project_loop() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, str(ROOT / "train_dqn.py"), "--total-steps", str(WARMUP + MEASURE),
                        "--learning-starts", str(WARMUP), "--eval-interval", "10000000", "--eval-episodes", "1",
                        "--checkpoint-interval", "10000000", "--buffer-size", "100000", "--wandb", "disabled",
                        "--out-dir", d], check=True, capture_output=True, cwd=ROOT)
        rows = list(csv.DictReader(open(Path(d) / "train" / "metrics.csv")))
        last = [r for r in rows if r.get("learning_sps")][-1]
        return float(last["learning_sps"]), float(last["updates_per_s"])


def plain_loop(seconds: float = 60.0) -> tuple[float, float]:
    torch.set_num_threads(2)
    cfg = Config(num_envs=1)
    env = atari_env.make_agent_env("breakout")
    agent = Agent(cfg, env.action_space.n, torch.device("cpu"))
    replay = FrameReplay(100_000, 1)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    first, step, updates, t0 = True, 0, 0, None
    while True:
        a = agent.act(np.asarray(obs)[None], 0.1, 1.0, rng)
        nxt, r, term, trunc, _ = env.step(int(a[0]))
        replay.add(np.asarray(obs)[None, -1], a, [r], [term], [first], [True])
        first = False
        obs = nxt
        if term or trunc:
            replay.add(np.asarray(obs)[None, -1], [0], [0.0], [False], [False], [False])
            obs, _ = env.reset()
            first = True
        step += 1
        if step == WARMUP:
            t0, s0 = time.time(), step
        if step > WARMUP and step % 4 == 0:
            agent.update(replay.sample(32, rng))
            updates += 1
        if t0 and time.time() - t0 > seconds:
            return (step - s0) / (time.time() - t0), updates / (time.time() - t0)


def replay_peak_rss_gb() -> float:
    code = ("import sys, resource; sys.path.insert(0, '.'); import numpy as np\n"
            "from models.dqn import FrameReplay\n"
            "rb = FrameReplay(1_000_000, 8)\n"
            "for a in (rb.frames, rb.actions, rb.rewards, rb.dones, rb.first, rb.startable): a.fill(1)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 2**20


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()   # no options; --help shows what it does
    proj_sps, proj_ups = project_loop()
    plain_sps, plain_ups = plain_loop()
    print(f"project loop (8-env vector env, overlapped update): {proj_sps:7.1f} env steps/s, {proj_ups:6.1f} updates/s")
    print(f"plain single-env loop:                               {plain_sps:7.1f} env steps/s, {plain_ups:6.1f} updates/s")
    print(f"speed-up: {proj_sps / plain_sps:.2f}x")
    print(f"peak RSS of a 1M-transition replay (filled): {replay_peak_rss_gb():.2f} GiB")
    print(f"(this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
