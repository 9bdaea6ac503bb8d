"""Where the action->latent model misses the encoder's latent, on held-out Breakout episodes.

    python benchmarks/latent_errors.py [checkpoints/breakout]   # world_model + action_to_latent .safetensors

Every held-out transition gets the encoder's code (from the real next frame) and the action->latent
model's code (from the frames and keys only). The misses are broken down by what happens in the
transition (read off the frames with metrics.ball_position / paddle_left) and by the encoder's code, so
one can tell misses the frames could have predicted (a brick hit, the paddle's step) from ones they
cannot (the serve's place). README, stage 5.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gameplay_data as gd  # noqa: E402
import metrics  # noqa: E402
from models.world_model import load_action_to_latent, load_world_model  # noqa: E402


def kind(balls: list, t: int, serves: set) -> str:
    """What the ball does from frame t to t+1."""
    b0, b1 = balls[t], balls[t + 1]
    if t in serves:
        return "serve (ball appears after FIRE)"
    if b0 is None and b1 is None:
        return "no ball in play"
    if b1 is None:
        return "ball leaves the field"
    if b0 is None:
        return "ball appears (not a serve)"
    if min(b0[0], b1[0]) < 100:
        return "ball at the bricks (row < 100)"
    if max(b0[0], b1[0]) > 180:
        return "ball at the paddle (row > 180)"
    return "ball in mid-field"


@torch.no_grad()
def main(ckpt: Path) -> None:
    torch.set_num_threads(2)
    wm, palette, meta = load_world_model(ckpt / "world_model.safetensors")
    a2l, _ = load_action_to_latent(ckpt / "action_to_latent.safetensors", meta)
    k, n_past = max(wm.context, a2l.frames_seen), a2l.keys_seen   # each model reads its last frames of the k
    by_kind, codes_n, codes_miss, confusions, wall = Counter(), Counter(), Counter(), Counter(), Counter()
    for f in gd.split_episodes(f"data/{meta['game']}", "val"):
        ep = gd.load_episode(f, keys=("frames", "actions"))
        idx = torch.from_numpy(palette.to_index(ep["frames"]))
        actions = torch.from_numpy(ep["actions"].astype(np.int64))
        T = len(actions)
        t = torch.arange(T)
        ctx = idx[(t[:, None] + torch.arange(-k + 1, 1)).clamp(min=0)]                       # (T, k, H, W)
        past, dial = gd.key_history(ep["actions"], np.arange(T), n_past, a2l.dial)
        past, dial = torch.from_numpy(past), None if dial is None else torch.from_numpy(dial)
        true = torch.cat([wm.encode(c, n)[1] for c, n in zip(ctx.split(256), idx[1:].split(256))])[:, 0]
        pred = torch.cat([a2l.sample(a, c, past_actions=p, dial=None if dial is None else dial[s:s + 256])
                          for s, a, c, p in zip(range(0, T, 256), actions.split(256), ctx.split(256),
                                                past.split(256))])[:, 0]
        balls = [metrics.ball_position(fr) for fr in ep["frames"]]
        paddles = [metrics.paddle_left(fr) for fr in ep["frames"]]
        serves = set(metrics.serve_steps(ep["frames"]))
        for s in range(T):
            miss = int(true[s] != pred[s])
            by_kind[kind(balls, s, serves), miss] += 1
            at_wall = paddles[s] is not None and not 12 <= paddles[s] <= 130
            wall[at_wall, miss] += 1
            codes_n[int(true[s])] += 1
            codes_miss[int(true[s])] += miss
            if miss:
                confusions[int(true[s]), int(pred[s])] += 1
    total = sum(codes_n.values())
    misses = sum(codes_miss.values())
    print(f"{ckpt}: {total} held-out transitions, latent_acc {1 - misses / total:.3f} ({misses} misses)")
    print(f"{'transition':34s} {'n':>6s} {'misses':>7s} {'miss rate':>9s} {'share of misses':>15s}")
    for name in sorted({n for n, _ in by_kind}, key=lambda n: -by_kind[n, 1]):
        n, m = by_kind[name, 0] + by_kind[name, 1], by_kind[name, 1]
        print(f"{name:34s} {n:6d} {m:7d} {m / n:9.3f} {m / max(misses, 1):15.3f}")
    for w, name in ((True, "paddle at a wall (x < 12 or > 130)"), (False, "paddle away from the walls")):
        n, m = wall[w, 0] + wall[w, 1], wall[w, 1]
        print(f"{name:34s} {n:6d} {m:7d} {m / max(n, 1):9.3f} {m / max(misses, 1):15.3f}")
    print("encoder code: transitions, miss rate (worst first)")
    print("  " + ", ".join(f"{c}: {codes_n[c]}, {codes_miss[c] / codes_n[c]:.2f}"
                           for c in sorted(codes_n, key=lambda c: codes_miss[c] / codes_n[c], reverse=True)))
    print("commonest misses (encoder code -> predicted code: count): "
          + ", ".join(f"{a}->{b}: {n}" for (a, b), n in confusions.most_common(8)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="checkpoints/breakout", type=Path,
                        help="folder with world_model and action_to_latent .safetensors")
    main(parser.parse_args().folder)
