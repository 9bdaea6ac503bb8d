"""How the world model draws the ball in straight open flight, by the ball's velocity (Breakout).

    python benchmarks/ball_flight.py checkpoints/breakout [other folders or world-model files ...] [--episodes 20]

On held-out episodes (training's split): every transition t -> t+1 where the ball is visible at t-1, t and
t+1 and is, at t, in open space (rows 110-175, columns 20-135: away from the walls, the bricks and the
paddle), grouped by the ball's last step t-1 -> t (rows, columns in px). Per group: how often the game's next
step repeats the last one, and, for each folder's world model one step ahead from the real frames with the
encoder's latent and the true event (as validation's ball_in_place@1 / ball_whole@1), how often it draws
the ball within 2 px and whole. README stage 3.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gameplay_data as gd  # noqa: E402
import metrics  # noqa: E402
from common import run_main  # noqa: E402
from models.world_model import load_world_model  # noqa: E402

OPEN_ROWS, OPEN_COLS = (110, 175), (20, 135)


def open_flights(episodes: list) -> dict:
    """{(dy, dx) of the last step: [(episode, t, repeated), ...]} over the transitions described above."""
    groups = defaultdict(list)
    for e, ep in enumerate(episodes):
        pos = [metrics.ball_position(f) for f in ep["frames"]]
        for t in range(1, len(pos) - 1):
            a, b, c = pos[t - 1:t + 2]
            if a is None or b is None or c is None:
                continue
            if not (OPEN_ROWS[0] <= b[0] <= OPEN_ROWS[1] and OPEN_COLS[0] <= b[1] <= OPEN_COLS[1]):
                continue
            last, nxt = (b[0] - a[0], b[1] - a[1]), (c[0] - b[0], c[1] - b[1])
            groups[last].append((e, t, last == nxt))
    return groups


@torch.no_grad()
def drawn(model, palette, episodes: list, picks: list, batch: int = 64) -> tuple[int, int]:
    """(balls drawn within 2 px, balls drawn whole) one step ahead at the transitions `picks`."""
    k, place, whole = model.context, 0, 0
    for i in range(0, len(picks), batch):
        chunk = picks[i:i + batch]
        idx = [torch.from_numpy(palette.to_index(episodes[e]["frames"][t - k + 1:t + 2])) for e, t, _ in chunk]
        ctx, nxt = torch.stack([x[:k] for x in idx]), torch.stack([x[k] for x in idx])
        _, codes, _ = model.encode(ctx, nxt)
        pred = model.predict_next(ctx, codes, model.transition_events(palette, ctx[:, -1], nxt))
        counts = metrics.ball_drawn_counts(pred, nxt, palette.colors)
        place, whole = place + counts["ball_in_place"], whole + counts["ball_whole"]
    return place, whole


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", type=Path, help="world-model weights, or checkpoint folders holding world_model.safetensors")
    p.add_argument("--episodes", type=int, default=20, help="held-out episodes to read (of the split's)")
    p.add_argument("--data_dir", default="data/breakout", help="recorded episodes")
    p.add_argument("--val_percent", type=float, default=10.0, help="the held-out split (training's)")
    args = p.parse_args()
    torch.set_num_threads(2)
    files = gd.split_episodes(Path(args.data_dir), "val", args.val_percent)[:args.episodes]
    episodes = [gd.load_episode(f) for f in files]
    groups = sorted(open_flights(episodes).items(), key=lambda kv: -len(kv[1]))
    models = [load_world_model(f if f.suffix == ".safetensors" else f / "world_model.safetensors", "breakout", "cpu")[:2]
              for f in args.folders]
    for model, _ in models:
        model.eval()
    total = sum(len(g) for _, g in groups)
    print(f"{total} open-flight transitions in {len(files)} held-out episodes")
    print("| last step (rows, cols) | transitions | share | next step repeats it |"
          + "".join(f" {f}: in place / whole |" for f in args.folders))
    print("|---|---|---|---|" + "---|" * len(args.folders))
    for last, picks in groups:
        if len(picks) < 10:
            continue
        row = f"| {last[0]:+.0f}, {last[1]:+.0f} | {len(picks)} | {len(picks) / total:.1%} | {sum(r for *_, r in picks) / len(picks):.3f} |"
        for model, palette in models:
            place, whole = drawn(model, palette, episodes, picks)
            row += f" {place / len(picks):.3f} / {whole / len(picks):.3f} |"
        print(row)


if __name__ == "__main__":
    run_main(main)
