"""Play-chain speed at batch 1: action -> latent -> decoder -> uint8 frame, through make_neural_env.

    python benchmarks/play_speed.py                 # shipped Breakout weights, CPU, 1 and 2 threads
    python benchmarks/play_speed.py breakout <dir>  # the weights in another checkpoint folder
    python benchmarks/play_speed.py breakout <dir> --dream_from checkpoints/breakout   # <dir>'s decoder on that dream

The decoder is timed on the steps of a recorded dream (random keys from the shipped start frames), once
recomputing the whole grid every step (LatentActionModel.predict_next) and once with the cache that
recomputes only where the frames changed (models/cached_decoder.py, the CPU default in play), each on the
same steps in the same order, and the two decoders' frames are compared. A decoder timed on one frozen
frame would flatter the cache (nothing changes); a dream's steps are what play feeds it. The full play
chain (play_sps) is env.step with random keys, with and without the cache.

A model whose dream holds still (say, one that never serves the ball) is cheap to decode, so two models'
decoders are compared on the same steps with --dream_from: the dream is recorded with that folder's models
and its frames handed to the tested decoder in its own palette (codes modulo its codebook, no events
unless it has them); play_sps stays the tested folder's own dream.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import atari_env  # noqa: E402
import metrics  # noqa: E402
from models.cached_decoder import CachedDecoder  # noqa: E402

EPISODES, STEPS = 4, 250   # the recorded dream: 4 starts x 250 steps


def record_dream(env) -> list:
    """[(context, codes, event)] of every decoder call in EPISODES dreams of STEPS random keys."""
    calls, predict = [], env.world_model.predict_next
    env.world_model.predict_next = lambda ctx, codes, events=None: calls.append((ctx, codes, events)) or predict(ctx, codes, events)
    rng = np.random.default_rng(0)
    for ep in range(EPISODES):
        env.reset(seed=ep)
        for _ in range(STEPS):
            env.step(int(rng.integers(env.action_space.n)))
    env.world_model.predict_next = predict
    return calls


def translate_dream(calls, source_env, wm, palette) -> list:
    """Another model's recorded decoder calls as inputs for `wm`: frames re-indexed into its palette."""
    colors, out = source_env.unwrapped.palette.colors, []
    for ctx, codes, events in calls:
        rgb = colors[ctx[0].cpu().numpy()]                                       # (k, 210, 160, 3)
        ctx = torch.from_numpy(palette.to_index(rgb))[None]
        out.append((ctx, codes % wm.codebook_size, events if wm.num_events else None))
    return out


def time_decoder(predict, calls) -> tuple[float, list]:
    frames, t0 = [], time.perf_counter()
    for ctx, codes, events in calls:
        frames.append(predict(ctx, codes, events))
    return len(calls) / (time.perf_counter() - t0), frames


def uncertain_cells(wm, calls, every: int = 10) -> float:
    """Median over every `every`-th call of the grid cells whose keep class is unsure, the cells decoding sums
    colour probabilities in (LatentActionModel.uncertain_cells; most should be sure, README stage 3)."""
    if not wm.shift_offsets or wm.shift_gate:
        return float("nan")
    counts = []
    for ctx, codes, events in calls[::every]:
        pixels, shifts = wm.decode_split(ctx, wm.condition(wm.codes_to_latent(codes), events))
        counts.append(int(wm.uncertain_cells(pixels, shifts).sum()))
    return float(np.median(counts))


def dream_motion(calls, colors, game: str) -> str:
    """How much the dream moves: pixels changed per step (mean), and for Breakout the share of steps with a ball."""
    changed = np.mean([int((ctx[:, -1] != ctx[:, -2]).sum()) for ctx, _, _ in calls])
    text = f"{changed:.1f} pixels change a step"
    if game == "breakout":
        ball = np.mean([bool(metrics.ball_pixels(ctx[:, -1], colors).any()) for ctx, _, _ in calls])
        text += f", a ball on screen in {ball:.0%} of the steps"
    return text


def play_sps(env, seconds: float = 5.0) -> float:
    rng = np.random.default_rng(1)
    env.reset(seed=0)
    for _ in range(10):
        env.step(int(rng.integers(env.action_space.n)))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(int(rng.integers(env.action_space.n)))
        n += 1
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("game", nargs="?", default="breakout", choices=list(atari_env.GAMES), help="game")
    parser.add_argument("folder", nargs="?", default=None, help="checkpoint folder (default checkpoints/<game>)")
    parser.add_argument("--dream_from", default=None, help="time the decoder on the dream of this checkpoint folder's "
                        "models (default: the tested folder's own)")
    args = parser.parse_args()
    game, folder = args.game, args.folder
    envs = {cached: atari_env.make_neural_env(game, folder, device="cpu", cached_decoder=cached) for cached in (False, True)}
    wm, palette = envs[False].world_model, envs[False].unwrapped.palette
    torch.set_num_threads(2)
    if args.dream_from:
        source = atari_env.make_neural_env(game, args.dream_from, device="cpu", cached_decoder=False)
        calls = translate_dream(record_dream(source), source, wm, palette)
    else:
        calls = record_dream(envs[False])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            full, full_frames = time_decoder(wm.predict_next, calls)
            cache = CachedDecoder(wm)
            cached, cached_frames = time_decoder(cache.predict_next, calls)
        differ = sum(int((a != b).sum()) for a, b in zip(full_frames, cached_frames))
        sps = {c: play_sps(envs[c]) for c in (False, True)}
        print(f"{threads} thread(s): decoder {full:6.1f} steps/s whole grid, {cached:6.1f} cached "
              f"({cache.cells_computed / len(calls) / (2 * len(wm.dec.blocks) * 540):.0%} of the grid's conv cells a step; "
              f"{differ} of {len(calls) * 210 * 160:,} pixels differ); full play chain (play_sps) "
              f"{sps[False]:6.1f} whole grid, {sps[True]:6.1f} cached")
    with torch.inference_mode():
        unsure = uncertain_cells(wm, calls)
    n_dec = sum(p.numel() for n, p in wm.named_parameters() if not n.startswith(("enc", "vq")))
    n_a2l = sum(p.numel() for p in envs[False].a2l.parameters())
    print(f"decoder parameters {n_dec:,}; action->latent parameters {n_a2l:,}; "
          f"dream{' of ' + args.dream_from if args.dream_from else ''}: {EPISODES} starts x {STEPS} random-key steps, "
          f"{len(calls)} decoder calls ({dream_motion(calls, palette.colors, game)}); "
          f"cells with an unsure keep class (median of every 10th call): {unsure:g} of 540")
