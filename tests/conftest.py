"""Shared fixtures: a tiny real dataset and tiny trained models, made once per test session by running
the stage scripts end to end in subprocesses (as a user would), with wandb disabled and no display."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
sys.path.insert(0, str(ROOT))

TINY_WM = ["--width", "16", "--depth", "1", "--enc-width", "16", "--enc-depth", "1", "--head-hidden", "32",
           "--code-dim", "8", "--codebook-size", "4", "--batch-size", "8", "--val-samples", "64",
           "--rollout-starts", "2", "--threads", "1", "--wandb", "disabled",
           # a few dozen steps are too few for k-means + EMA alone to spread 4 codes; the old expiry
           # threshold re-seeds idle codes quickly (the shipped default keeps rare codes in long runs)
           "--dead-code", "2"]


def run_script(script: str, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage script like a user would; on failure show its output."""
    env = {**os.environ, "WANDB_MODE": "disabled", "SDL_VIDEODRIVER": "dummy", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 random-policy Breakout episodes recorded by record_videos.py (no checkpoint needed)."""
    out = tmp_path_factory.mktemp("data") / "breakout"
    run_script("record_videos.py", "--policy", "random", "--total_videos", 8, "--output_dir", out, "--workers", 1)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_data, tmp_path_factory) -> Path:
    """World model + pairs + v2 action->latent trained for a few steps on tiny_data."""
    ckpt = tmp_path_factory.mktemp("checkpoints") / "breakout"
    run_script("train_latent_action.py", "--data-dir", tiny_data, "--out-dir", ckpt, "--steps", 30,
               "--val-every", 30, *TINY_WM)
    run_script("collect_action_latent_pairs.py", "--data-dir", tiny_data,
               "--world-model", ckpt / "world_model.safetensors", "--threads", 1)
    run_script("train_action_to_latent.py", "--data-dir", tiny_data, "--world-model", ckpt / "world_model.safetensors",
               "--out-dir", ckpt, "--steps", 20, "--val-every", 20, "--width", 8, "--depth", 1,
               "--batch-size", 8, "--val-samples", 64, "--threads", 1, "--wandb", "disabled")
    return ckpt
