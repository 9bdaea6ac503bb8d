"""The whole pipeline in one command: agent -> recordings -> world model -> latent pairs ->
action->latent -> evaluation, with consistent paths under data/<game> and checkpoints/<game>.

    python run_pipeline.py --game breakout --preset quick     # 2 CPU cores
    python run_pipeline.py --game breakout --preset full      # a GPU

Each stage is the stage script run as a subprocess, exactly as a user would run it. A stage whose
outputs are complete is skipped; an interrupted stage resumes from its checkpoint. Stage times go
to checkpoints/<game>/pipeline_times.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import atari_env
from common import UserError, arg, parse_config, run_main, save_json

PRESETS = {
    "quick": dict(dqn_steps=60_000, episodes=120, wm_preset="quick", a2l_preset="quick", eval_starts=32),
    "full": dict(dqn_steps=10_000_000, episodes=2000, wm_preset="full", a2l_preset="full", eval_starts=128),
}


@dataclass
class Config:
    """Run stages 1-6 in order, skipping finished ones and resuming interrupted ones."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    preset: str = arg("quick", "set by --preset")
    dqn_steps: int = arg(60_000, "agent steps for train_dqn.py")
    episodes: int = arg(120, "episodes for record_videos.py")
    percent_random: float = arg(30.0, "percent of random-policy episodes")
    wm_preset: str = arg("quick", "train_latent_action.py preset")
    a2l_preset: str = arg("quick", "train_action_to_latent.py preset")
    eval_starts: int = arg(32, "evaluate_world_model.py start points (its default, 128, costs ~5 more minutes on 2 cores "
                               "than the quick pipeline's 45-minute budget has)")
    wandb: str = arg("offline", "wandb mode for the training stages", choices=["offline", "online", "disabled"])


def run(script: str, *args) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / script), *map(str, args)]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"{script} failed; fix the cause and rerun: finished stages are skipped")
    return time.time() - t0


def report(path: Path) -> dict:
    """A stage's final report ({} while it has none): written only when the stage finishes."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def done(path: Path, key: str, at_least: int) -> bool:
    """A stage is complete when its final report says it reached its step count."""
    return report(path).get(key, -1) >= at_least


def main(argv=None) -> None:
    cfg = parse_config(Config, argv, presets=PRESETS)
    atari_env.game_spec(cfg.game)
    ckpt = Path("checkpoints") / cfg.game
    times: dict[str, float] = {}
    w = ["--wandb", cfg.wandb]

    if done(ckpt / "dqn.json", "agent_steps", cfg.dqn_steps):
        print(f"stage 1 (DQN) complete: {ckpt / 'dqn.safetensors'}")
    else:
        resume = ["--resume"] if (ckpt / "train" / "dqn.pt").exists() else []
        times["1 train_dqn"] = run("train_dqn.py", "--game", cfg.game, "--total-steps", cfg.dqn_steps,
                                   "--eval-interval", max(cfg.dqn_steps // 4, 1), *resume, *w)
    times["2 record_videos"] = run("record_videos.py", "--game", cfg.game, "--total_videos", cfg.episodes,
                                   "--percent_random", cfg.percent_random)
    from train_latent_action import PRESETS as WM_PRESETS
    wm_steps = WM_PRESETS[cfg.wm_preset]["steps"]
    wm_report = report(ckpt / "world_model_metrics.json")
    # a decoder trained further from finished weights (--init_from) is finished too
    if wm_report.get("step", -1) >= wm_steps or wm_report.get("config", {}).get("init_from"):
        print(f"stage 3 (world model) complete: {ckpt / 'world_model.safetensors'}")
    else:
        resume = ["--resume"] if (ckpt / "train" / "world_model.pt").exists() else []
        times["3 train_latent_action"] = run("train_latent_action.py", "--game", cfg.game, "--preset", cfg.wm_preset,
                                             *resume, *w)
    times["4 collect_action_latent_pairs"] = run("collect_action_latent_pairs.py", "--game", cfg.game)
    from train_action_to_latent import PRESETS as A2L_PRESETS
    a2l_steps = A2L_PRESETS[cfg.a2l_preset]["steps"]
    if done(ckpt / "action_to_latent_v2_metrics.json", "step", a2l_steps) and \
            (ckpt / "action_to_latent.safetensors").stat().st_mtime > (ckpt / "world_model.safetensors").stat().st_mtime:
        print(f"stage 5 (action->latent) complete: {ckpt / 'action_to_latent.safetensors'}")
    else:
        a2l_ckpt = ckpt / "train" / "action_to_latent.pt"   # resumable only if made for this world model
        fresh = a2l_ckpt.exists() and a2l_ckpt.stat().st_mtime > (ckpt / "world_model.safetensors").stat().st_mtime
        resume = ["--resume"] if fresh else []
        times["5 train_action_to_latent"] = run("train_action_to_latent.py", "--game", cfg.game,
                                                "--preset", cfg.a2l_preset, *resume, *w)
    times["6 evaluate_world_model"] = run("evaluate_world_model.py", "--game", cfg.game, "--starts", cfg.eval_starts)
    save_json(ckpt / "pipeline_times.json", {"preset": cfg.preset, "seconds": {k: round(v) for k, v in times.items()},
                                             "total_minutes": round(sum(times.values()) / 60, 1)})
    print("\nstage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    print(f"play it: python play_neural_breakout.py --checkpoint-dir {ckpt}" if cfg.game == "breakout" else "")


if __name__ == "__main__":
    run_main(main)
