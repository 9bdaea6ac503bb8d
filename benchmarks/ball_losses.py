"""Where the dream loses a ball that the real game keeps (Breakout), for one or more checkpoint folders.

    python benchmarks/ball_losses.py checkpoints/breakout [other folders ...] [--starts 128] [--steps 32]

The same held-out starts as evaluate_world_model.py (its seed, horizon and split): from each, the real
emulator and every folder's dream (world model + action->latent model, the real keys) run for --steps
steps. A loss is the first step where the real frame shows a ball and the dream none. For each loss the
dream's ball one step earlier is classed: drawn exactly as the real one ("exact"), drawn but off or
broken ("off or partial": another pixel set), no real ball then (a serve the dream did not draw), or the
loss is at the first step; and where the real ball is (at the
paddle: row > 180; at the bricks: row < 100; else mid-field). evaluate_world_model.py's ball_missed
counts the frames that follow a loss as well; this tells how the losses start. README stage 3.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import atari_env  # noqa: E402
import gameplay_data as gd  # noqa: E402
import metrics  # noqa: E402
from evaluate_world_model import Config as EvalConfig, EmulatorReplay, held_out_starts  # noqa: E402


def first_loss(dream: np.ndarray, real: np.ndarray) -> dict | None:
    """The first step where the real frame has a ball and the dream none, with what came before it."""
    for t, (d, r) in enumerate(zip(dream, real)):
        rb = metrics.ball_position(r)
        if rb is None or metrics.ball_position(d) is not None:
            continue
        if t == 0:
            before = "first step (real context)"
        elif metrics.ball_position(real[t - 1]) is None:
            before = "no ball before (a serve not drawn)"
        elif np.array_equal(metrics.ball_mask(dream[t - 1]), metrics.ball_mask(real[t - 1])):
            before = "exact"
        else:
            before = "off or partial"
        where = "at the paddle" if rb[0] > 180 else "at the bricks" if rb[0] < 100 else "mid-field"
        return {"step": t, "before": before, "where": where}
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="checkpoint folders (world model, action->latent, start frames)")
    p.add_argument("--starts", type=int, default=EvalConfig.starts, help="held-out start points (evaluate_world_model's)")
    p.add_argument("--steps", type=int, default=EvalConfig.object_steps, help="steps per start (its object_steps)")
    p.add_argument("--data_dir", default="data/breakout", help="recorded episodes")
    args = p.parse_args()
    torch.set_num_threads(2)
    envs = [atari_env.make_neural_env("breakout", f, "cpu") for f in args.folders]
    _, eps, starts, _ = held_out_starts(Path(args.data_dir), envs[0].world_model.context, EvalConfig(starts=args.starts))
    losses = [[] for _ in envs]
    for e, s in tqdm(starts, desc="starts", unit="start"):
        ep = eps[e]
        replay = EmulatorReplay("breakout", ep["meta"])
        replay.advance(ep["actions"][:s])
        actions = ep["actions"][s:s + args.steps]
        real = np.stack(replay.advance(actions))
        for env, out in zip(envs, losses):
            env.reset(options={"frames": gd.history(ep["frames"], s, env.context_length),
                               **env.recorded_keys(ep["actions"], s, ep["meta"])})
            dream = np.stack([env.step(int(a))[0] for a in actions])
            out.append(first_loss(dream, real))
    print(f"{len(starts)} held-out starts, {args.steps} steps each; a loss = first real ball the dream does not draw")
    for folder, out in zip(args.folders, losses):
        found = [x for x in out if x]
        print(f"\n{folder}: {len(found)} starts with a loss, median step {np.median([x['step'] for x in found]) if found else '-'}")
        for key in ("before", "where"):
            print(f"  {key}: " + ", ".join(f"{v} {n}" for v, n in Counter(x[key] for x in found).most_common()))
    if len(losses) > 1:
        only = [sum(1 for a, b in zip(losses[0], out) if b and not a) for out in losses[1:]]
        print("\nstarts where a folder loses the ball and the first keeps it: "
              + ", ".join(f"{f}: {n}" for f, n in zip(args.folders[1:], only)))


if __name__ == "__main__":
    main()
