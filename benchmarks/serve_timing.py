"""When the dream serves: FIRE held after a lost ball, in the dream and in the real game (Breakout).

    python benchmarks/serve_timing.py [checkpoints/breakout] [--losses 60] [--presses 20] [--random_steps 300] [--odds_episodes 30]

From held-out moments where the ball has just been lost (it left past the paddle and the next ball is a
serve), the dream starts from the real frames and keys and the real emulator from the same state
(rebuilt from the recording); both then hold FIRE. The game ignores FIRE for some steps after a loss,
then serves at once (tests/test_envs.py); the recorded presses are counted first, then the action->latent model's odds of an event on every recorded
transition of the first --odds_episodes held-out episodes (at the serves, at FIRE presses without a ball
that the game ignored, and the events expected where a ball is on screen). Reported: the presses each needed, how often the dream served
on the same press as the game (or within one), how often not within --presses. Then random keys from
the start frames shipped with the weights (4 runs of --random_steps): the events the dream fired, and
those with a ball already on screen (a second ball), per 1,000 steps. README stage 5.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import atari_env  # noqa: E402
import gameplay_data as gd  # noqa: E402
import metrics  # noqa: E402
from evaluate_world_model import EmulatorReplay  # noqa: E402
from models.world_model import EVENT_FLOOR, EVENT_LIKELY  # noqa: E402

FIRE = 1


def first_ball(frames) -> int | None:
    """1-based index of the first frame with a ball, or None."""
    return next((i + 1 for i, f in enumerate(frames) if metrics.ball_position(f) is not None), None)


def lost_balls(frames: np.ndarray) -> list[int]:
    """Steps t where the ball, last seen low (row > 175, past the bricks), is gone and the next ball on
    screen is a serve: the first frame of the game's wait before it serves again."""
    balls = [metrics.ball_position(f) for f in frames]
    serves = metrics.serve_steps(frames)
    out = []
    for t in range(1, len(frames)):
        if balls[t] is None and balls[t - 1] is not None and balls[t - 1][0] > 175:
            nxt = next((s for s in range(t, len(frames)) if balls[s] is not None), None)
            if nxt is not None and nxt - 1 in serves:
                out.append(t)
    return out


def fire_without_ball(files, longest: int = 10) -> dict[int, list[int]]:
    """Recorded FIRE presses with no ball on screen, by steps since a ball was last seen (capped at
    `longest`; game starts count as `longest`): [served at the next frame, not served]."""
    table = {j: [0, 0] for j in range(1, longest + 1)}
    for f in files:
        ep = gd.load_episode(f, keys=("frames", "actions"))
        balls = [metrics.ball_position(x) is not None for x in ep["frames"]]
        serves, last = set(metrics.serve_steps(ep["frames"])), -longest
        for t, a in enumerate(ep["actions"]):
            last = t if balls[t] else last
            if a == FIRE and not balls[t]:
                table[min(t - last, longest)][t not in serves] += 1
    return table


@torch.no_grad()
def event_odds(env, files) -> dict[str, np.ndarray]:
    """p(some event) from the action->latent model at every recorded transition, by kind: "serve" (the
    game served), "fire_no_ball" (FIRE with no ball on screen, not served), "ball" (a ball on screen)."""
    a2l, k = env.a2l, env.context_length
    odds, kinds = [], []
    for f in files:
        ep = gd.load_episode(f, keys=("frames", "actions"))
        frames, actions = ep["frames"], ep["actions"]
        idx = env.palette.to_index(frames)
        serves = set(metrics.serve_steps(frames))
        ball = metrics.ball_visible(torch.from_numpy(idx), env.palette.colors).numpy()   # all frames at once
        for b in range(0, len(actions), 256):
            ts = range(b, min(b + 256, len(actions)))
            ctx = torch.from_numpy(np.stack([gd.history(idx, t, k) for t in ts])).to(env.device)
            past = torch.from_numpy(np.stack([gd.past_actions(actions, t, a2l.keys_seen) for t in ts])).to(env.device)
            events = a2l.forward_events(torch.as_tensor(actions[b:b + len(ts)], device=env.device), ctx, past)[1]
            odds += (1 - events.float().softmax(-1)[:, 0]).cpu().tolist()
            kinds += ["serve" if t in serves else "ball" if ball[t] else "fire_no_ball" if actions[t] == FIRE
                      else "other" for t in ts]
    odds, kinds = np.array(odds), np.array(kinds)
    return {kind: odds[kinds == kind] for kind in ("serve", "fire_no_ball", "ball")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", nargs="?", default="checkpoints/breakout")
    p.add_argument("--data_dir", default="data/breakout")
    p.add_argument("--losses", type=int, default=60, help="held-out lost balls to start from")
    p.add_argument("--presses", type=int, default=20, help="FIRE presses before giving up")
    p.add_argument("--random_steps", type=int, default=300, help="steps per random-key run (4 runs)")
    p.add_argument("--odds_episodes", type=int, default=30, help="held-out episodes whose event odds are read")
    args = p.parse_args()
    torch.set_num_threads(2)
    files = gd.split_episodes(args.data_dir, "val")
    table = fire_without_ball(files)
    print(f"recorded FIRE presses with no ball on screen, {len(files)} held-out episodes; steps since a ball was seen: "
          "served / not served")
    print("  " + ", ".join(f"{j}{'+' if j == max(table) else ''}: {s} / {n}" for j, (s, n) in table.items()))
    env = atari_env.make_neural_env("breakout", args.checkpoint_dir, "cpu")
    k = env.context_length
    if env.a2l.num_events:
        odds = event_odds(env, files[: args.odds_episodes])
        print(f"event odds on every transition of {min(args.odds_episodes, len(files))} held-out episodes (p of some event;"
              f" play at temperature 0 draws one where p >= {EVENT_LIKELY}, at a temperature one with odds p where p >= {EVENT_FLOOR}):")
        for kind, p_ in odds.items():
            print(f"  {kind}: {len(p_)} transitions, p at 10/50/90 %: "
                  + " / ".join(f"{q:.3f}" for q in np.percentile(p_, [10, 50, 90]))
                  + f", events at temperature 0: {(p_ >= EVENT_LIKELY).sum()}, expected at a temperature "
                  f"{np.where(p_ >= EVENT_FLOOR, p_, 0).sum():.1f}")
    real_n, dream_n, mismatched = [], [], 0
    for f in files:
        if len(real_n) >= args.losses:
            break
        ep = gd.load_episode(f)
        frames, actions = ep["frames"], ep["actions"]
        losses = lost_balls(frames)[: args.losses - len(real_n)]
        if not losses:
            continue
        replay, done = EmulatorReplay("breakout", ep["meta"]), 0
        for t in losses:
            mismatched += int(not np.array_equal(replay.advance(actions[done:t])[-1], frames[t]))
            done = t
            state = replay.ale.cloneState()
            real_n.append(first_ball(replay.advance([FIRE] * args.presses)))
            replay.ale.restoreState(state)
            env.reset(seed=len(dream_n), options={"frames": gd.history(frames, t, k), **env.recorded_keys(actions, t, ep["meta"])})
            dream_n.append(first_ball(env.step(FIRE)[0] for _ in range(args.presses)))
    big = args.presses + 1
    r = np.array([x or big for x in real_n])
    d = np.array([x or big for x in dream_n])
    print(f"{len(r)} held-out lost balls ({mismatched} emulator replays differed from the recording), FIRE held:")
    print(f"  real game: presses until the serve median {np.median(r):.0f} (min {r.min()}, max {r.max()}), "
          f"not within {args.presses}: {(r == big).mean():.2f}")
    print(f"  dream:     presses until a ball median {np.median(d):.0f} (min {d.min()}, max {d.max()}), "
          f"not within {args.presses}: {(d == big).mean():.2f}")
    print(f"  dream serves on the game's press: {(d == r).mean():.2f}; within one press: {(abs(d - r) <= 1).mean():.2f}; "
          f"earlier: {(d < r).mean():.2f}")
    rng = np.random.default_rng(0)
    events = stray = steps = 0
    for run in range(4):
        obs, _ = env.reset(seed=100 + run)
        for _ in range(args.random_steps):
            before = metrics.ball_position(obs) is not None
            obs, *_, info = env.step(int(rng.integers(env.action_space.n)))
            events += info["event"] > 0
            stray += before and info["event"] > 0
            steps += 1
    print(f"random keys, {steps} steps from the start frames: {events} events ({1000 * events / steps:.1f} per 1,000 "
          f"steps), {stray} with a ball on screen ({1000 * stray / steps:.1f} per 1,000)")


if __name__ == "__main__":
    main()
