"""World-model training step time on the CPU, with glibc's default malloc and with common.keep_freed_memory.

    python benchmarks/train_step_speed.py            # shipped Breakout architecture, batch 32, 2 threads
    python benchmarks/train_step_speed.py 20 64      # steps timed, batch size

Each setting runs in a fresh process (mallopt changes a process for good): the shipped world model's
decoder-only training step (forward, motion-weighted loss over the shift classes, backward, AdamW), as
train_latent_action.py --init_from ... --freeze_encoder runs it, on frames of a random-key game of the real
emulator. Prints seconds per step, the share of CPU time the process spent in the kernel, and its peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(steps: int, batch: int, keep: bool) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    import atari_env
    import common
    from models.world_model import load_world_model

    took = common.keep_freed_memory() if keep else False
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, palette, _ = load_world_model(ROOT / "checkpoints/breakout/world_model.safetensors", "breakout")
    model.freeze_encoder()
    model.train()
    env, rng = atari_env.make_world_model_env("breakout"), np.random.default_rng(0)
    frames = [env.reset(seed=0)[0]]
    while len(frames) < batch + 2:
        obs, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        frames.append(env.reset()[0] if term or trunc else obs)
    idx = torch.from_numpy(palette.to_index(np.stack(frames)))
    history = torch.stack([idx[i:i + 2] for i in range(batch)])   # (B, 2, 210, 160)
    nxt = idx[2:batch + 2]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        events = model.transition_events(palette, history[:, -1], nxt)
        cells, _, commit, _ = model(history, nxt, None, events)
        loss = model.cell_loss(cells, history[:, -1], nxt, 10.0) + commit.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):   # warm-up
        step()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    kernel = (cpu1.ru_stime - cpu0.ru_stime) / max(1e-9, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime))
    print(f"{'keep_freed_memory' if took else 'glibc default':>17}: {wall / steps:.3f} s/step, "
          f"{kernel:.0%} of CPU time in the kernel, peak RSS {cpu1.ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="?", type=int, default=20, help="steps timed per setting")
    parser.add_argument("batch", nargs="?", type=int, default=32, help="batch size")
    args = parser.parse_args()
    steps, batch = args.steps, args.batch
    print(f"world-model training step, batch {batch}, {steps} steps timed, 2 threads")
    for keep in (False, True, False, True):   # alternating: this VM's speed drifts
        subprocess.run([sys.executable, __file__, "--child", str(steps), str(batch), "1" if keep else "0"], check=True)
