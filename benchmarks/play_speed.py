"""Play-chain speed at batch 1: action -> latent -> decoder -> uint8 frame, through make_neural_env.

    python benchmarks/play_speed.py                 # shipped Breakout weights, CPU, 1 and 2 threads
    python benchmarks/play_speed.py breakout <dir>  # the weights in another checkpoint folder
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import atari_env  # noqa: E402


def measure(env, fn, seconds: float = 5.0) -> float:
    for _ in range(10):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    game = sys.argv[1] if len(sys.argv) > 1 else "breakout"
    env = atari_env.make_neural_env(game, sys.argv[2] if len(sys.argv) > 2 else None, device="cpu")
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    ctx = env._ctx
    codes = torch.zeros(1, env.world_model.num_tokens, dtype=torch.long)
    wm = env.world_model
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            dec = measure(env, lambda: wm.predict_next(ctx, codes))
        chain = measure(env, lambda: env.step(int(rng.integers(env.action_space.n))))
        print(f"{threads} thread(s): decoder {dec:6.1f} steps/s, full play chain (play_sps) {chain:6.1f} steps/s")
    n_dec = sum(p.numel() for n, p in wm.named_parameters() if not n.startswith(("enc", "vq")))
    n_a2l = sum(p.numel() for p in env.a2l.parameters())
    print(f"decoder parameters {n_dec:,}; action->latent parameters {n_a2l:,}")
