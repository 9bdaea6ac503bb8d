"""Why the dream never serves: what a Breakout world model's latent and decoder know about the serve.

    python benchmarks/serve_probe.py checkpoints/breakout/world_model.safetensors [more.safetensors ...]

At a serve (metrics.serve_steps) the game puts the ball at one of three places (x ~18, ~79 or ~140) picked
by its frame counter, which no frame shows, so only the latent can tell the decoder where. For each world model this prints:
* decoder: on the held-out serves, with the encoder's latent of the real transition, the softmax
  probability the decoder gives the new ball's pixels (their true class), median and mean; the share of
  serves where the decoded frame shows a ball; how many distinct latents the serves get. The same for
  ordinary ball moves (every 7th held-out step with a ball in both frames), for comparison.
* encoder: a ridge-regression probe from the encoder's continuous output (before quantisation) to the
  serve's place, trained on 2/3 of the serves of the first 150 training episodes, accuracy on the rest
  next to always guessing the commonest place; and the same share for the quantised code (purity).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gameplay_data as gd  # noqa: E402
import metrics  # noqa: E402
from models.world_model import change_target, load_world_model, to_cells  # noqa: E402


def transitions(model, palette, episode, steps):
    k = model.context
    ctx = torch.from_numpy(palette.to_index(np.stack([episode["frames"][t - k + 1:t + 1] for t in steps])))
    nxt = torch.from_numpy(palette.to_index(np.stack([episode["frames"][t + 1] for t in steps])))
    return ctx, nxt


@torch.no_grad()
def decoder_side(model, palette, files) -> dict:
    """Held-out serves vs ordinary ball moves: p(true class) on the new ball's pixels, ball drawn, latents."""
    k, out = model.context, {"serve": [], "move": []}
    for f in files:
        ep = gd.load_episode(f)
        fr = ep["frames"]
        serves = metrics.serve_steps(fr, k - 1)
        moves = [t for t in range(k - 1, len(fr) - 1, 7)
                 if metrics.ball_position(fr[t]) is not None and metrics.ball_position(fr[t + 1]) is not None]
        for kind, steps in (("serve", serves), ("move", moves)):
            if not steps:
                continue
            ctx, nxt = transitions(model, palette, ep, steps)
            q, codes, _ = model.encode(ctx, nxt)
            p_true = model.decode_cells(ctx, q).softmax(2).gather(2, to_cells(change_target(ctx[:, -1], nxt))[:, :, None].long())
            drawn = palette.to_rgb(model.predict_next(ctx, codes).numpy())
            for i, t in enumerate(steps):
                r, c = (int(v) for v in metrics.ball_position(fr[t + 1]))
                near = torch.zeros(210, 160, dtype=torch.bool)
                near[max(0, r - 4):r + 5, max(0, c - 4):c + 5] = True
                new_ball = to_cells(((ctx[i, -1] != nxt[i]) & near)[None].to(torch.uint8))[0].bool()   # pixels that become the ball
                if new_ball.any():
                    out[kind].append((float(p_true[i, :, 0][new_ball].mean()), tuple(codes[i].tolist()),
                                      metrics.ball_position(drawn[i]) is not None))
    return out


@torch.no_grad()
def encoder_side(model, palette, files) -> tuple[float, float, float, int]:
    """-> (probe accuracy, majority share, code purity, serves) for the serve's place from the encoder."""
    z, place, codes = [], [], []
    for f in files:
        ep = gd.load_episode(f)
        steps = metrics.serve_steps(ep["frames"], model.context - 1)
        if steps:
            ctx, nxt = transitions(model, palette, ep, steps)
            out = model.encoder_output(ctx, nxt)
            z.append(out.flatten(1).numpy())
            codes += [tuple(c) for c in model.vq(out)[1].tolist()]
            place += [int(np.digitize(metrics.ball_position(ep["frames"][t + 1])[1], [50, 110])) for t in steps]
    z, place = np.concatenate(z), np.array(place)
    order = np.random.default_rng(0).permutation(len(place))
    train, test = order[:2 * len(order) // 3], order[2 * len(order) // 3:]
    x = np.c_[(z - z[train].mean(0)) / (z[train].std(0) + 1e-6), np.ones(len(z))]
    w = np.linalg.solve(x[train].T @ x[train] + np.eye(x.shape[1]), x[train].T @ np.eye(3)[place[train]])
    accuracy = float(((x[test] @ w).argmax(1) == place[test]).mean())
    majority = float(np.bincount(place[test], minlength=3).max() / len(test))
    by_code = defaultdict(Counter)
    for c, p in zip(codes, place):
        by_code[c][p] += 1
    purity = sum(max(v.values()) for v in by_code.values()) / len(place)
    return accuracy, majority, purity, len(place)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="Breakout world_model .safetensors files")
    torch.set_num_threads(2)
    for path in parser.parse_args().weights:
        model, palette, meta = load_world_model(path)
        if meta["game"] != "breakout":
            sys.exit(f"{path}: the serve probe is for Breakout, not {meta['game']}")
        data = f"data/{meta['game']}"
        print(f"{path} (step {meta.get('step')}):")
        for kind, rows in decoder_side(model, palette, gd.split_episodes(data, "val")).items():
            p = np.array([r[0] for r in rows])
            print(f"  held-out {kind}s: {len(rows)}; p(new ball pixels) median {np.median(p):.3f}, mean {p.mean():.3f}, "
                  f"max {p.max():.3f}; "
                  f"ball drawn {np.mean([r[2] for r in rows]):.3f}; distinct latents {len(set(r[1] for r in rows))}")
        acc, majority, purity, n = encoder_side(model, palette, gd.split_episodes(data, "train")[:150])
        print(f"  serve place (3 columns) from the encoder output: probe {acc:.3f}, commonest place {majority:.3f}; "
              f"from the code: {purity:.3f} ({n} training serves)")
