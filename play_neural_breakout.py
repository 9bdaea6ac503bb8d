"""Stage 6: play Breakout inside the neural network.

    python play_neural_breakout.py                      # shipped weights, pygame window
    python play_neural_breakout.py --side-by-side       # the real emulator beside the dream, same keys
    python play_neural_breakout.py --record play.mp4

Keys: LEFT/RIGHT move, SPACE fire, '.' noop (no key = noop), R reset to real start frames, P pause,
ESC or Q quit. `--headless --script "FRRRLL.."` runs the same loop without a display (tests, CI),
feeding the script's keys through pygame's event queue: L left, R right, F fire, '.' noop.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import atari_env
from common import UserError, arg, parse_config, run_main


@dataclass
class Config:
    """Play the world model with the keyboard."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    checkpoint_dir: str = arg("", "folder with world_model/action_to_latent weights (default checkpoints/<game>)")
    device: str = arg("auto", "auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    scale: int = arg(3, "window pixels per game pixel")
    fps: float = arg(15.0, "game steps per second (the real game runs at 15; 0 = as fast as possible)")
    side_by_side: bool = arg(False, "show the real emulator next to the dream, driven by the same keys")
    record: str = arg("", "write what the window shows to this MP4 (or GIF) file")
    temperature: float = arg(-1.0, "latent and event sampling temperature (-1: the value stored with the weights, 0 = the likeliest)")
    seed: int = arg(0, "seed for the start frames")
    headless: bool = arg(False, "no display (SDL dummy driver); keys come from --script")
    script: str = arg("", "headless key script, one step per character: L, R, F, '.'")
    steps: int = arg(0, "stop after this many steps (0 = until quit; headless: length of the script)")


SCRIPT_KEYS = {"L": "K_LEFT", "R": "K_RIGHT", "F": "K_SPACE", ".": "K_PERIOD"}


def action_for_keys(pressed, names: list[str], pygame) -> int:
    """Held keys -> the game's action index (FIRE wins, then LEFT/RIGHT; nothing held = NOOP)."""
    def idx(name):
        return names.index(name) if name in names else 0
    if pressed[pygame.K_SPACE]:
        return idx("FIRE")
    if pressed[pygame.K_LEFT] and not pressed[pygame.K_RIGHT]:
        return idx("LEFT")
    if pressed[pygame.K_RIGHT] and not pressed[pygame.K_LEFT]:
        return idx("RIGHT")
    return idx("NOOP")


def main(argv=None) -> None:
    cfg = parse_config(Config, argv)
    if cfg.headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        if not cfg.script:
            raise UserError("--headless needs --script (e.g. 'FRRRLL..')")
        bad = set(cfg.script) - set(SCRIPT_KEYS)
        if bad:
            raise UserError(f"--script may only contain L, R, F and '.', not {''.join(sorted(bad))!r}")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    env = atari_env.make_neural_env(cfg.game, cfg.checkpoint_dir or None, cfg.device,
                                    temperature=None if cfg.temperature < 0 else cfg.temperature, compile=True)
    names, k = env.action_names, env.context_length
    twin = atari_env.RealTwin(cfg.game, k) if cfg.side_by_side else None

    def reset(seed):
        if twin is not None:
            return env.reset(seed=seed, options={"frames": twin.reset(seed)})[0]
        return env.reset(seed=seed)[0]

    pygame.init()
    panes = 2 if twin else 1
    hud_h = 28
    size = (160 * cfg.scale * panes + 8 * (panes - 1), 210 * cfg.scale + hud_h)
    screen = pygame.display.set_mode(size)
    pygame.display.set_caption(f"Neural {cfg.game.title()} ({env.device.type})")
    font = pygame.font.Font(None, 22)
    writer = None
    if cfg.record:
        import imageio.v2 as imageio
        Path(cfg.record).parent.mkdir(parents=True, exist_ok=True)
        writer = imageio.get_writer(cfg.record, fps=cfg.fps or 15, macro_block_size=1) if cfg.record.endswith(".mp4") \
            else imageio.get_writer(cfg.record, duration=1 / (cfg.fps or 15), loop=0)

    def blit(frame: np.ndarray, x: int) -> None:
        surf = pygame.surfarray.make_surface(frame.swapaxes(0, 1))
        screen.blit(pygame.transform.scale(surf, (160 * cfg.scale, 210 * cfg.scale)), (x, hud_h))

    seed = cfg.seed
    frame = reset(seed)
    script = list(cfg.script)
    max_steps = cfg.steps or (len(script) if cfg.headless else 0)
    clock, step, paused, running = pygame.time.Clock(), 0, False, True
    action, sps = 0, 0.0
    held_script_key = None
    try:
        while running:
            if cfg.headless:   # scripted keys go through the real event queue
                if held_script_key is not None:
                    pygame.event.post(pygame.event.Event(pygame.KEYUP, key=held_script_key))
                    held_script_key = None
                if script:
                    held_script_key = getattr(pygame, SCRIPT_KEYS[script.pop(0)])
                    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=held_script_key))
            pressed = {pygame.K_SPACE: False, pygame.K_LEFT: False, pygame.K_RIGHT: False}
            if not cfg.headless:
                keys = pygame.key.get_pressed()
                pressed = {kk: keys[kk] for kk in pressed}
            for ev in pygame.event.get():
                if ev.type == pygame.QUIT:
                    running = False
                elif ev.type == pygame.KEYDOWN:
                    if ev.key in (pygame.K_ESCAPE, pygame.K_q):
                        running = False
                    elif ev.key == pygame.K_p:
                        paused = not paused
                    elif ev.key == pygame.K_r:
                        seed += 1
                        frame, step = reset(seed), 0
                    elif ev.key in pressed:
                        pressed[ev.key] = True
            if not running:
                break
            if not paused:
                action = action_for_keys(pressed, names, pygame)
                t0 = time.perf_counter()
                frame, *_ = env.step(action)
                dt = time.perf_counter() - t0
                sps = 0.9 * sps + 0.1 / max(dt, 1e-6) if sps else 1 / max(dt, 1e-6)
                if twin is not None:
                    twin.step(action)
                step += 1
            screen.fill((20, 20, 20))
            if twin is not None:
                blit(twin.frame, 0)
                blit(frame, 160 * cfg.scale + 8)
            else:
                blit(frame, 0)
            hud = f"{names[action]:<5}  step {step}  model {sps:5.0f} steps/s  display {clock.get_fps():4.1f} fps"
            hud += "  [paused]" if paused else ""
            hud += "   real | dream" if twin is not None else ""
            screen.blit(font.render(hud, True, (230, 230, 230)), (6, 6))
            pygame.display.flip()
            if writer is not None:
                writer.append_data(pygame.surfarray.array3d(screen).swapaxes(0, 1))
            if max_steps and step >= max_steps:
                running = False
            clock.tick(cfg.fps if cfg.fps > 0 else 0)
    finally:
        if writer is not None:
            writer.close()
            print(f"recorded {step} steps to {cfg.record}")
        pygame.quit()
    print(f"played {step} steps; model chain {sps:.0f} steps/s on {env.device.type}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
