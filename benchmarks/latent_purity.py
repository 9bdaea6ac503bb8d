"""How far the real actions alone pin down a world model's latent, on held-out episodes.

    python benchmarks/latent_purity.py checkpoints/breakout/world_model.safetensors [more.safetensors ...]

Purity (metrics.latent_purity): the share of transitions on the most common latent of their a_t, or of
their (a_t-1, a_t). Used to choose the codebook size (README, stage 3).
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
from models.world_model import load_world_model  # noqa: E402


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="world_model .safetensors files")
    torch.set_num_threads(2)
    for path in parser.parse_args().weights:
        model, palette, meta = load_world_model(path)
        val = gd.GameplayWindows(gd.split_episodes(f"data/{meta['game']}", "val"), model.context, 32,
                                 frame_transform=palette.to_index)
        pick = np.linspace(0, len(val) - 1, min(2048, len(val))).astype(int)
        counts = Counter()   # (a_t-1, a_t, latent)
        with torch.no_grad():
            for b in range(0, len(pick), 128):
                items = [val[i] for i in pick[b:b + 128]]
                _, codes, _ = model.encode(torch.stack([it["context"] for it in items]),
                                           torch.stack([it["next"] for it in items]))
                counts.update((it["prev_action"], it["action"], tuple(c)) for it, c in zip(items, codes.tolist()))
        p = metrics.latent_purity(counts)
        print(f"{path}: {model.codebook_size} codes x {model.num_tokens} token(s); action purity "
              f"{p['action_purity']:.3f}, (previous, current) action purity {p['action_pair_purity']:.3f} "
              f"over {len(pick)} held-out transitions")
