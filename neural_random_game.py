"""Render play inside the world model to a GIF (or MP4), no display needed.

    python neural_random_game.py                              # 300 random steps -> neural_random_game.gif
    python neural_random_game.py --compare --out docs/compare.gif   # real emulator | dream, same actions
    python neural_random_game.py --policy dqn                 # the trained agent plays the dream
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import atari_env
from common import arg, parse_config, run_main


@dataclass
class Config:
    """Random (or DQN) actions in the dream, written to an animation."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    checkpoint_dir: str = arg("", "folder with the weights (default checkpoints/<game>)")
    steps: int = arg(300, "steps to play")
    policy: str = arg("random", "who presses the buttons", choices=["random", "dqn"])
    sticky: float = arg(0.75, "chance a random action repeats the previous one (human-like, less jitter)")
    out: str = arg("neural_random_game.gif", "output .gif or .mp4")
    compare: bool = arg(False, "render the real emulator beside the dream under the same actions")
    scale: int = arg(2, "output pixels per game pixel")
    fps: float = arg(15.0, "animation frames per second")
    device: str = arg("auto", "auto, cuda, mps or cpu")
    seed: int = arg(0, "seed for start frames and actions")


def main(argv=None) -> None:
    cfg = parse_config(Config, argv)
    env = atari_env.make_neural_env(cfg.game, cfg.checkpoint_dir or None, cfg.device)
    rng = np.random.default_rng(cfg.seed)
    twin = atari_env.RealTwin(cfg.game, env.context_length)
    # Both start from the same real frames, so the comparison is fair.
    frame, _ = env.reset(seed=cfg.seed, options={"frames": twin.reset(cfg.seed)})
    q_net = None
    if cfg.policy == "dqn":
        from train_dqn import load_dqn_weights
        ckpt = Path(cfg.checkpoint_dir or f"checkpoints/{cfg.game}")
        q_net = load_dqn_weights(ckpt / "dqn.safetensors", cfg.game)
    history, frames_out, action = [frame], [], 0
    gap = np.full((210, 4, 3), 255, np.uint8)
    for _ in tqdm(range(cfg.steps), unit="step"):
        if q_net is not None:
            with torch.no_grad():
                obs = torch.from_numpy(atari_env.agent_view_of(history))[None]
                action = int(q_net(obs).argmax(1)) if rng.random() > 0.05 else int(rng.integers(env.action_space.n))
        elif rng.random() > cfg.sticky:
            action = int(rng.integers(env.action_space.n))
        frame, *_ = env.step(action)
        history = (history + [frame])[-4:]
        shown = np.concatenate([twin.step(action), gap, frame], 1) if cfg.compare else frame
        frames_out.append(shown.repeat(cfg.scale, 0).repeat(cfg.scale, 1))
    import imageio.v3 as iio
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    if cfg.out.endswith(".mp4"):
        iio.imwrite(cfg.out, np.stack(frames_out), fps=cfg.fps, codec="libx264", macro_block_size=1)
    else:
        iio.imwrite(cfg.out, np.stack(frames_out), duration=1000 / cfg.fps, loop=0)
    print(f"wrote {len(frames_out)} frames to {cfg.out}" + (" (left: real emulator, right: dream)" if cfg.compare else ""))
    if cfg.compare and twin.ended_at is not None:
        print(f"the real game was over at step {twin.ended_at} (all lives lost); from there its last frame is held")


if __name__ == "__main__":
    run_main(main)
