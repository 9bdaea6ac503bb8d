"""Judge the whole pipeline on held-out episodes (GUIDE §2 metrics), against the real emulator.

    python evaluate_world_model.py --game breakout
    python evaluate_world_model.py --game breakout --readme README.md    # also rewrite the results table
    python evaluate_world_model.py --game breakout --latents encoder     # the decoder alone (ideal latents)

For each held-out start point, the recorded episode is replayed in the real emulator up to the start
(its seed and actions reproduce it exactly), the state is cloned, and the true actions continue from
there: those real frames are the ground truth. The model starts from the k real frames before the
start and is driven through make_neural_env with the same actions (or uniformly random ones).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import atari_env
import gameplay_data as gd
import metrics as wm_metrics
from common import UserError, arg, parse_config, run_main, save_json

HORIZONS = (1, 4, 16, 32, 64)


@dataclass
class Config:
    """Evaluate world model + action->latent model on held-out episodes."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    data_dir: str = arg("", "recorded episodes (default data/<game>)")
    checkpoint_dir: str = arg("", "weights (default checkpoints/<game>)")
    out_dir: str = arg("", "report and plots (default <checkpoint_dir>/evaluation)")
    starts: int = arg(128, "held-out start points (at 32, one rollout that loses the paddle moves paddle_err_px "
                             "by a pixel: README, whole pipeline)")
    horizon: int = arg(64, "open-loop steps per start")
    object_steps: int = arg(32, "steps over which paddle/ball errors are measured")
    random_steps: int = arg(400, "random-action steps before off_palette is measured")
    latent_samples: int = arg(2048, "held-out transitions for latent_acc")
    sps_steps: int = arg(300, "steps timed for play_sps (batch 1)")
    val_percent: float = arg(10.0, "held-out percent (the training split)")
    device: str = arg("auto", "auto, cuda, mps or cpu")
    threads: int = arg(2, "torch CPU threads")
    seed: int = arg(0, "seed for start points and random actions")
    keep_bias: float = arg(-1.0, "decoder keep-logit bias (-1: the one stored with the weights; 0: raw argmax)")
    latents: str = arg("a2l", "what drives the true-action rollouts: the action->latent model (the real chain), or "
                              "the encoder's latents from the real frames (isolates the decoder's own errors)",
                       choices=["a2l", "encoder"])
    readme: str = arg("", "rewrite the results table between the eval markers of this README")


class EmulatorReplay:
    """Rebuilds a recorded episode's emulator state from its seed and actions (recording is exact)."""

    def __init__(self, game: str, meta: dict):
        if "noop_frames" in meta:   # random play: raw view, explicit no-op start (record_videos.play_episode)
            self.env = atari_env.make_world_model_env(game)
            self.env.reset(seed=meta["seed"])
            atari_env.noop_start(self.env, meta["noop_frames"])
        else:                       # DQN play: the agent env's seeded no-op start
            self.env = atari_env.make_agent_env(game, noop_max=meta["env"]["noop_max"])
            self.env.reset(seed=meta["seed"])
        self.ale = self.env.unwrapped.ale

    def advance(self, actions) -> list[np.ndarray]:
        frames = []
        for a in actions:
            self.env.step(int(a))
            frames.append(self.ale.getScreenRGB())
        return frames


def held_out_starts(data_dir: Path, k: int, cfg: Config) -> tuple[list, list[dict], list[tuple[int, int]], np.random.Generator]:
    """The held-out episodes (files, loaded) and the evaluation's start points in them, drawn by cfg.seed;
    returns the generator too, which the evaluation goes on drawing random keys from."""
    files = gd.split_episodes(data_dir, "val", cfg.val_percent)
    eps = [gd.load_episode(f) for f in files]
    rng = np.random.default_rng(cfg.seed)
    # starts need the decoder's context of real frames (the same starts whatever stage 5 sees); a longer
    # history for stage 5 repeats the episode's first frame before its start, as in training
    return files, eps, pick_starts(files, [len(e["actions"]) for e in eps], k, cfg.horizon, cfg.starts, rng), rng


def pick_starts(files, lengths, k: int, horizon: int, n: int, rng) -> list[tuple[int, int]]:
    cands = [(e, s) for e, T in enumerate(lengths) for s in range(k - 1, T - horizon + 1, 8)]
    if not cands:
        raise UserError(f"held-out episodes are shorter than --horizon {horizon}; record longer episodes")
    return [cands[i] for i in sorted(rng.choice(len(cands), min(n, len(cands)), replace=False))]


def main(argv=None) -> None:
    cfg = parse_config(Config, argv)
    atari_env.game_spec(cfg.game)
    if cfg.readme and cfg.latents != "a2l":
        raise UserError("--readme records the real chain (--latents a2l); the encoder-latent run is a diagnostic")
    if cfg.readme:
        readme_text(Path(cfg.readme))   # a wrong path fails now, not after the evaluation's ~11 minutes
    torch.set_num_threads(cfg.threads)
    data_dir = Path(cfg.data_dir or f"data/{cfg.game}")
    ckpt = Path(cfg.checkpoint_dir or f"checkpoints/{cfg.game}")
    out_dir = Path(cfg.out_dir or ckpt / "evaluation")
    env = atari_env.make_neural_env(cfg.game, ckpt, cfg.device)
    k, n_actions = env.context_length, env.action_space.n
    if cfg.keep_bias >= 0:
        env.world_model.keep_bias = cfg.keep_bias
    files, eps, starts, rng = held_out_starts(data_dir, env.world_model.context, cfg)

    H = cfg.horizon
    sq = {m: np.zeros(H) for m in ("model", "copy", "random")}
    npx = np.zeros(H)
    object_counts, per_start, mismatched = [], [], 0
    for e, s in tqdm(starts, desc="rollouts", unit="start"):
        ep = eps[e]
        replay = EmulatorReplay(cfg.game, ep["meta"])
        replay.advance(ep["actions"][:s])
        state = replay.ale.cloneState()
        actions = ep["actions"][s:s + H]
        real = np.stack(replay.advance(actions))                      # ground truth from the emulator
        replay.ale.restoreState(state)
        mismatched += int((real != ep["frames"][s + 1:s + 1 + H]).any(axis=(1, 2, 3)).sum())
        context = gd.history(ep["frames"], s, k)
        for mode in ("model", "random"):
            env.reset(options={"frames": context, **env.recorded_keys(ep["actions"], s, ep["meta"])})
            if mode == "model" and cfg.latents == "encoder":
                frames = np.stack([env.step_latent(c, ev) for c, ev in zip(*encoder_codes(env, np.concatenate([context, real])))])
            else:
                frames = np.stack([env.step(int(actions[t] if mode == "model" else rng.integers(n_actions)))[0]
                                   for t in range(H)])
            mse = ((frames.astype(np.float64) - real) ** 2).mean(axis=(1, 2, 3))
            sq[mode] += mse
            if mode == "model":
                errors = {}
                if cfg.game == "breakout":   # counts, so the whole run's numbers pool them after the loop
                    object_counts.append(wm_metrics.object_error_counts(frames[:cfg.object_steps], real[:cfg.object_steps]))
                    errors = wm_metrics.errors_from_counts(object_counts[-1])
                # kept per start so that two runs on the same starts can be compared pairwise, with an
                # interval (benchmarks/compare_evaluations.py): a few rollouts that lose the paddle move the means
                per_start.append({"episode": files[e].name, "step": int(s),
                                  **{f"mse@{t}": float(mse[t - 1]) for t in HORIZONS if t <= H}, **errors})
        sq["copy"] += ((context[-1].astype(np.float64)[None] - real) ** 2).mean(axis=(1, 2, 3))
        npx += 1
    psnr = {m: [wm_metrics.psnr_from_mse(v) for v in sq[m] / npx] for m in sq}
    report = {f"psnr@{t}": psnr["model"][t - 1] for t in HORIZONS if t <= H}
    report.update({f"copy_last_psnr@{t}": psnr["copy"][t - 1] for t in HORIZONS if t <= H})
    report["delta_psnr@4"] = psnr["model"][3] - psnr["random"][3]
    if cfg.game == "breakout":
        report.update(wm_metrics.errors_from_counts(*object_counts))   # pooled over every start's frames

    # off_palette: 400 uniformly random actions in the model, from held-out contexts
    real_colors = np.unique(np.concatenate([e["frames"][::50].reshape(-1, 3) for e in eps]), axis=0)
    off = []
    for e, s in starts[:4]:
        env.reset(options={"frames": gd.history(eps[e]["frames"], s, k)})
        for _ in range(cfg.random_steps):
            frame = env.step(int(rng.integers(n_actions)))[0]
        off.append(wm_metrics.off_palette_fraction(frame, real_colors))
    report["off_palette"] = float(np.mean(off))

    # latent_acc: action->latent prediction vs the encoder's latent on held-out transitions
    wm = env.world_model
    tok = whole = same = n = 0
    generator = torch.Generator().manual_seed(cfg.seed)   # for a model played at a temperature (sampled, as in play)
    with torch.inference_mode():
        for _ in range(max(1, cfg.latent_samples // 128)):
            picks = [(e, int(rng.integers(0, len(eps[e]["actions"])))) for e in rng.integers(0, len(eps), 128)]
            ctx_i, true, pred, true_ev, pred_ev = encoder_and_a2l_codes(env, eps, picks, generator)
            tok += (pred == true).sum().item()
            whole += (pred == true).all(1).sum().item()
            # two codes may draw the same frame: count where the predicted latent draws the encoder's frame
            same += (wm.predict_next(ctx_i, pred, pred_ev) == wm.predict_next(ctx_i, true, true_ev)).flatten(1).all(1).sum().item()
            n += len(picks)
    report["latent_token_acc"] = tok / (n * wm.num_tokens)
    report["latent_acc"] = whole / n
    report["latent_frame_match"] = same / n

    if cfg.game == "breakout":
        report.update(serve_drawn(env, eps, generator))

    # play_sps: the full chain, batch 1 (action -> latent -> decoder -> uint8 frame)
    env.reset(options={"frames": eps[0]["frames"][:k]})
    for _ in range(10):
        env.step(0)
    t0 = time.perf_counter()
    for i in range(cfg.sps_steps):
        env.step(int(rng.integers(n_actions)))
    report["play_sps"] = cfg.sps_steps / (time.perf_counter() - t0)
    report.update(keep_bias=env.world_model.keep_bias, emulator_replay_mismatched_frames=mismatched,
                  held_out_episodes=len(files), starts=len(starts), device=str(env.device), threads=cfg.threads,
                  latents=cfg.latents, config=dataclasses.asdict(cfg), per_start=per_start)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if cfg.latents == "a2l" else "_encoder_latents"   # never overwrite the real chain's report
    save_json(out_dir / f"report{suffix}.json", report)
    plot_psnr(psnr, out_dir / f"psnr_vs_horizon{suffix}.png", cfg.game,
              "model, true actions" if cfg.latents == "a2l" else "model, encoder latents of the real frames")
    print(format_table(report))
    if cfg.readme:
        update_readme(Path(cfg.readme), report, cfg)


@torch.inference_mode()
def serve_drawn(env, eps, generator) -> dict:
    """Share of held-out serves (metrics.serve_steps) where the world model, from the real frames, draws a
    ball (serve_drawn_*), and draws it within 2 px of the real one (serve_at_place_*): with the encoder's
    latent (and the event) of the real transition, and with the action->latent model's."""
    picks = [(e, t) for e, ep in enumerate(eps) for t in wm_metrics.serve_steps(ep["frames"], env.world_model.context - 1)]
    if not picks:
        return {"serves": 0}
    drawn, placed = {"encoder": [], "a2l": []}, {"encoder": [], "a2l": []}
    for b in range(0, len(picks), 64):
        ctx_i, true, pred, true_ev, pred_ev = encoder_and_a2l_codes(env, eps, picks[b:b + 64], generator)
        real = [wm_metrics.ball_position(eps[e]["frames"][t + 1]) for e, t in picks[b:b + 64]]
        for name, codes, events in (("encoder", true, true_ev), ("a2l", pred, pred_ev)):
            frames = env.palette.to_rgb(env.world_model.predict_next(ctx_i, codes, events).cpu().numpy())
            balls = [wm_metrics.ball_position(f) for f in frames]
            drawn[name] += [ball is not None for ball in balls]
            placed[name] += [ball is not None and abs(ball[0] - r[0]) <= 2 and abs(ball[1] - r[1]) <= 2
                             for ball, r in zip(balls, real)]
    return {"serves": len(picks), **{f"serve_drawn_{n}": float(np.mean(v)) for n, v in drawn.items()},
            **{f"serve_at_place_{n}": float(np.mean(v)) for n, v in placed.items()}}


def encoder_and_a2l_codes(env, eps, picks, generator=None):
    """For held-out transitions (episode, t): the context (palette indices), the encoder's latent of the real
    t -> t+1, the action->latent model's latent from a_t (and the actions before it) and the same context,
    then the real transition's event and the action->latent model's (None for a world model without events)."""
    k, pal = env.context_length, env.palette
    ctx = np.stack([gd.history(eps[e]["frames"], t, k) for e, t in picks])
    nxt = np.stack([eps[e]["frames"][t + 1] for e, t in picks])
    act = torch.tensor([int(eps[e]["actions"][t]) for e, t in picks], device=env.device)
    n = env.a2l.keys_seen
    past = torch.from_numpy(np.stack([gd.past_actions(eps[e]["actions"], t, n) for e, t in picks])).to(env.device)
    dial = None
    if env.a2l.dial:   # each episode's dial followed once
        dials = {e: gd.paddle_dials(eps[e]["actions"], env.a2l.dial) for e in {e for e, _ in picks}}
        dial = torch.from_numpy(np.stack([gd.dial_before(dials[e], t, n) for e, t in picks])).to(env.device)
    phase = None
    if env.a2l.frame_phases:   # each episode's, where its frame counter started
        phases = {e: atari_env.recorded_frame_phase(eps[e]["meta"]) for e in {e for e, _ in picks}}
        phase = torch.tensor([phases[e] for e, _ in picks], device=env.device)
    ctx_i = torch.from_numpy(pal.to_index(ctx)).to(env.device)
    nxt_i = torch.from_numpy(pal.to_index(nxt)).to(env.device)
    _, true, _ = env.world_model.encode(ctx_i, nxt_i)
    pred, pred_ev = env.a2l.sample_step(act, ctx_i, env.temperature, generator, past, dial=dial, phase=phase)
    true_ev = env.world_model.transition_events(pal, ctx_i[:, -1], nxt_i) if env.world_model.num_events else None
    return ctx_i, true, pred, true_ev, pred_ev


@torch.inference_mode()
def encoder_codes(env, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's latent and the event of every real transition in `frames` (k context frames, then the
    horizon)."""
    k, wm = env.context_length, env.world_model
    idx = torch.from_numpy(env.palette.to_index(frames)).to(env.device)
    windows = idx.unfold(0, k + 1, 1).permute(0, 3, 1, 2)          # (H, k+1, 210, 160)
    return (torch.cat([wm.encode(w[:, :k], w[:, k])[1] for w in windows.split(64)]),
            wm.transition_events(env.palette, windows[:, k - 1], windows[:, k]).tolist())


def plot_psnr(psnr: dict, path: Path, game: str, model_label: str = "model, true actions") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = np.arange(1, len(psnr["model"]) + 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(t, psnr["model"], label=model_label, color="tab:blue")
    ax.plot(t, psnr["random"], label="model, random actions", color="tab:orange", alpha=0.8)
    ax.plot(t, psnr["copy"], label="copy last real frame", color="gray", ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("steps after the last real frame (open loop)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"Neural {game}: held-out open-loop PSNR")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BARS = {"paddle_err_px": ("≤ 4", lambda v: v <= 4), "ball_presence_agree": ("≥ 0.9", lambda v: v >= 0.9),
        "delta_psnr@4": ("≥ 1.9 dB", lambda v: v >= 1.9), "off_palette": ("< 1%", lambda v: v < 0.01),
        "play_sps": ("≥ 60", lambda v: v >= 60), "latent_acc": ("≥ 0.99", lambda v: v >= 0.99)}


def format_table(r: dict) -> str:
    rows = ["| metric | value | bar | met |", "|---|---|---|---|"]
    for t in HORIZONS:
        if f"psnr@{t}" in r:
            ok = r[f"psnr@{t}"] > r[f"copy_last_psnr@{t}"]
            rows.append(f"| psnr@{t} (copy-last) | {r[f'psnr@{t}']:.2f} ({r[f'copy_last_psnr@{t}']:.2f}) | "
                        f"{'> copy-last' if t == 16 else ''} | {('yes' if ok else 'no') if t == 16 else ''} |")
    for key in ("delta_psnr@4", "paddle_err_px", "ball_presence_agree", "ball_missed", "ball_spurious", "ball_err_px",
                "serve_drawn_encoder", "serve_drawn_a2l", "serve_at_place_encoder", "serve_at_place_a2l", "off_palette", "latent_acc", "latent_token_acc", "latent_frame_match", "play_sps"):
        if key in r:
            bar, test = BARS.get(key, ("", None))
            val = f"{r[key]:.2%}" if key == "off_palette" else f"{r[key]:.3f}" if isinstance(r[key], float) else r[key]
            rows.append(f"| {key} | {val} | {bar} | {('yes' if test(r[key]) else 'no') if test else ''} |")
    return "\n".join(rows)


README_BEGIN, README_END = "<!-- eval:begin -->", "<!-- eval:end -->"


def readme_text(path: Path) -> str:
    """--readme's text, refused (UserError) if it is missing or has no results block to rewrite."""
    if not path.is_file():
        raise UserError(f"--readme {path}: no such file")
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{path} has no {README_BEGIN} ... {README_END} block to rewrite")
    return text


def update_readme(path: Path, report: dict, cfg: Config) -> None:
    text, begin, end = readme_text(path), README_BEGIN, README_END
    block = (f"{begin}\n`python evaluate_world_model.py --game {cfg.game} --readme {path.name}` "
             f"({report['starts']} start points in {report['held_out_episodes']} held-out episodes, "
             f"{report['device']}, {report['threads']} threads):\n\n{format_table(report)}\n{end}")
    path.write_text(text[:text.index(begin)] + block + text[text.index(end) + len(end):])
    print(f"rewrote the results table in {path}")


if __name__ == "__main__":
    run_main(main)
