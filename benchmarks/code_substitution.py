"""Which latent codes does the decoder barely tell apart, and how much of the latent can the keys predict at all?

    python benchmarks/code_substitution.py [--checkpoint_dir checkpoints/breakout] [--merge 3:0,7:6] [--codes 1,6,9]

Needs the latent pairs of that world model (collect_action_latent_pairs.py --world_model ...). Two parts:

1. Substitution table, held-out episodes: for the transitions the encoder gives code c, motion_psnr@1 of the
   decoder's next frame with c itself and with each other code in its place. A code whose best substitute
   costs little carries little the decoder uses. --codes limits it to a few codes (their transitions, each
   decoded with each of them): minutes instead of the hour all 16 codes take on 79 held-out episodes.
2. Lookup ceiling (Breakout): a table from (a_t-1, a_t, paddle's left edge at t) to the commonest code, fitted
   on the training episodes, scored on the held-out ones; and the same with the paddle's real step t -> t+1
   added (an oracle: it reads the next frame). Where these stay below a goal, no action->latent model that
   reads the keys and the paddle will reach it: the rest of the code is about something else.

With --merge a:b,..., both parts are also shown as if code a were read as b (the decoder unchanged), which is
what train_latent_action.py --merge_codes then fine-tunes the decoder for. README, stage 5.
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
from collect_action_latent_pairs import load_pairs  # noqa: E402
from models.world_model import load_world_model, parse_code_merges  # noqa: E402


def lookup_ceiling(rows: dict, code_map: np.ndarray, oracle: bool) -> float:
    """Accuracy on held-out rows of the commonest training code per (a_t-1, a_t, paddle x[, paddle step])."""
    width = 4 if oracle else 3
    table = defaultdict(Counter)
    for r in rows["train"]:
        table[r[:width]][code_map[r[4]]] += 1
    guesses = {key: counts.most_common(1)[0][0] for key, counts in table.items()}
    return float(np.mean([guesses.get(r[:width]) == code_map[r[4]] for r in rows["val"]]))


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint_dir", default="checkpoints/breakout")
    p.add_argument("--merge", default="", help="a:b,... codes to show as merged (decoder unchanged)")
    p.add_argument("--codes", default="", help="c,d,... only these codes in the substitution table (default: all)")
    args = p.parse_args()
    torch.set_num_threads(2)
    wm_path = Path(args.checkpoint_dir) / "world_model.safetensors"
    wm, palette, meta = load_world_model(wm_path)
    data_dir = Path(f"data/{meta['game']}")
    K = wm.codebook_size
    code_map = np.arange(K)
    try:
        merges = parse_code_merges(args.merge, K)
    except ValueError as e:
        p.error(f"--merge: {e}")
    if not args.codes:
        shown = list(range(K))
    elif all(c.strip().isdigit() and int(c) < K for c in args.codes.split(",")):
        shown = sorted({int(c) for c in args.codes.split(",")})
    else:
        p.error(f"--codes: {args.codes!r} is not a comma-separated list of codes in 0..{K - 1}")
    if args.codes and any(a in shown and b not in shown for a, b in merges.items()):
        p.error("--merge with --codes: a merged code's target must be among --codes")
    for a, b in merges.items():
        code_map[a] = b
    files = {s: gd.split_episodes(data_dir, s) for s in ("train", "val")}
    pairs = load_pairs(data_dir, files["train"] + files["val"], wm_path)

    # (a_t-1, a_t, paddle x, paddle step, code) per transition; substitution errors on held-out ones
    rows = {"train": [], "val": []}
    sq, pixels, count = np.zeros((K, K)), np.zeros(K), np.zeros(K, dtype=int)
    for split in ("train", "val"):
        for f in files[split]:
            ep = gd.load_episode(f, keys=("frames", "actions"))
            codes, a = pairs[f.stem]["codes"][:, 0].astype(np.int64), ep["actions"]
            x = [metrics.paddle_left(fr) for fr in ep["frames"]]
            rows[split] += [(int(a[t - 1]) if t else 0, int(a[t]), x[t],
                             None if x[t] is None or x[t + 1] is None else x[t + 1] - x[t], int(codes[t]))
                            for t in range(len(a))]
            if split == "train":
                continue
            keep = np.flatnonzero(np.isin(codes, shown))   # the transitions the table shows
            if len(keep) == 0:
                continue
            codes, t = codes[keep], torch.from_numpy(keep)
            idx = torch.from_numpy(palette.to_index(ep["frames"]))
            ctx = idx[(t[:, None] + torch.arange(-wm.context + 1, 1)).clamp(min=0)]
            real = torch.from_numpy(ep["frames"][keep + 1])
            mask = metrics.motion_mask(torch.from_numpy(ep["frames"][keep]), real)
            np.add.at(pixels, codes, 3 * mask.sum((1, 2)).numpy())
            np.add.at(count, codes, 1)
            for c in shown:
                for s in range(0, len(t), 256):
                    sl = slice(s, s + 256)
                    pred = torch.as_tensor(palette.to_rgb(wm.predict_next(ctx[sl], torch.full((len(ctx[sl]), 1), c))))
                    err = ((pred.float() - real[sl].float()) ** 2).sum(-1) * mask[sl]
                    np.add.at(sq[:, c], codes[sl], err.sum((1, 2)).numpy())

    def db(err, n):
        return metrics.psnr_from_mse(err / max(n, 1))

    print(f"{wm_path}: {count.sum()} held-out transitions" + (f" with codes {args.codes}" if args.codes else ""))
    print("code  transitions  motion_psnr@1 own  best substitutes (code: motion_psnr@1)")
    for c in np.flatnonzero(count):
        subs = sorted(((db(sq[c, d], pixels[c]), d) for d in shown if d != c), reverse=True)[:None if args.codes else 3]
        print(f"{c:4d} {count[c]:12d} {db(sq[c, c], pixels[c]):18.2f}  " + ", ".join(f"{d}: {v:.2f}" for v, d in subs))
    own = db(sum(sq[c, c] for c in range(K)), pixels.sum())
    print(f"held-out motion_psnr@1 with the encoder's codes{' (these codes only)' if args.codes else ''}: {own:.2f}")
    identity = np.arange(K)
    print(f"lookup ceiling (a_t-1, a_t, paddle x): {lookup_ceiling(rows, identity, False):.4f}; "
          f"oracle + paddle step: {lookup_ceiling(rows, identity, True):.4f}")
    if args.merge:
        merged = db(sum(sq[c, code_map[c]] for c in range(K)), pixels.sum())
        print(f"merged {args.merge}: held-out motion_psnr@1 {merged:.2f} (decoder unchanged); lookup ceiling "
              f"{lookup_ceiling(rows, code_map, False):.4f}, oracle {lookup_ceiling(rows, code_map, True):.4f}")


if __name__ == "__main__":
    main()
