"""Stage 3: learn discrete latent actions (VQ-VAE) whose decoder is the world model.

    python train_latent_action.py --game breakout --preset quick     # 2 CPU cores, <= 30 min
    python train_latent_action.py --game breakout --preset full      # GPU: AMP (+ --compile)
    python train_latent_action.py --resume

Writes checkpoints/<game>/world_model.safetensors (weights + palette + hyperparameters), a resumable
checkpoints/<game>/train/world_model.pt, metrics.csv and validation grids.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

import atari_env
import gameplay_data as gd
import metrics as wm_metrics
from common import (MetricLogger, UserError, arg, cpu_has_bf16_units, load_checkpoint, parse_config, pick_device, restore_config,
                    run_main, save_checkpoint, save_json, strip_compile_prefix)
from models.neural_env import START_FRAMES, real_start_frames, save_start_frames
from models.world_model import (ActionToLatent, LatentActionModel, Palette, add_speckle, fit_shift_offsets, jitter_ball,
                                keep_bias_for, load_action_to_latent, load_world_model, near_cells, parse_code_merges,
                                read_weights, save_weights)

PRESETS = {
    # the shipped decoder's output classes, from scratch; on a 2-core CPU the clock ends it (README stage 3, session 30)
    "quick": dict(steps=3000, batch_size=32, val_every=1000, lr=1e-3, shift_classes=24, continue_motion=True,
                  turn_focus=0.25, keep_tiebreak=0.1, minutes=28.0, amp=cpu_has_bf16_units()),
    "full": dict(steps=60000, batch_size=128, val_every=2000, lr=5e-4, amp=True, width=128, depth=4,
                 cache_episodes=256),
}


@dataclass
class Config:
    """VQ-VAE latent action model: encoder (frames t-k+1..t+1 -> latent), decoder = world model."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    data_dir: str = arg("", "recorded episodes (default data/<game>)")
    out_dir: str = arg("", "weights and logs (default checkpoints/<game>)")
    preset: str = arg("", "set by --preset")
    context: int = arg(2, "history frames k the decoder sees (>= 2 so the ball's velocity is visible)")
    width: int = arg(96, "decoder channels on the 27x20 grid")
    depth: int = arg(3, "decoder residual blocks")
    embed_dim: int = arg(4, "per-pixel colour embedding size")
    head_hidden: int = arg(192, "hidden size of the per-cell output head")
    enc_width: int = arg(64, "encoder channels")
    enc_depth: int = arg(2, "encoder residual blocks")
    num_tokens: int = arg(1, "latent tokens per transition")
    codebook_size: int = arg(16, "codes per token (16 with --positional: README stage 3)")
    code_dim: int = arg(32, "code vector size")
    positional: bool = arg(True, "learned per-cell position embedding in encoder and decoder, and position-keeping "
                                 "pooling in the encoder (without it nothing can be drawn at a chosen empty place)")
    dead_code: float = arg(1e-4, "re-seed a code whose EMA uses per batch fall below this (at batch 32, 2 would expire every "
                                  "code rarer than 6%% of transitions; 1e-4 only codes unused for ~90 batches)")
    max_colors: int = arg(32, "palette size cap (Breakout uses < 12)")
    motion_weight: float = arg(10.0, "extra loss weight on pixels that change between t and t+1")
    ball_weight: float = arg(0.0, "Breakout: the loss weights of the grid cells within one cell of the ball at t are "
                                  "multiplied by 1 + this (where it can be at t+1; read from the input, so the "
                                  "argmax stays unbiased; README stage 3)")
    turn_focus: float = arg(0.0, "Breakout: share of the windows drawn again from transitions where the ball may bounce "
                                 "or turn (metrics.ball_may_turn: its straight course nears a wall, the paddle or the "
                                 "bricks; README stage 3)")
    fast_ball_px: int = arg(0, "with --turn_focus: also draw again from transitions where the ball's last step was at least "
                               "this many px sideways (metrics.ball_fast_sideways); 0 = off")
    self_forcing: float = arg(0.0, "fraction of each batch whose last context frame is the model's own "
                                   "prediction (no grad): it learns to repair its errors instead of compounding them")
    ball_jitter: float = arg(0.0, "Breakout: fraction of the batch's decoder contexts whose last frame's ball is moved by up "
                                  "to --jitter_px or half erased (jitter_ball; README stage 3); the encoder sees clean frames")
    jitter_px: int = arg(2, "with --ball_jitter: the largest step, in px each way, the ball is moved by")
    context_noise: float = arg(0.0, "fraction of each batch whose decoder context gets persistent stray pixels "
                                    "to erase (add_speckle); the encoder always sees clean frames")
    noise_density: float = arg(0.003, "largest share of pixels a noised context gets")
    action_prior: float = arg(0.0, "weight pulling the encoder's output toward the codes that an action->latent prior "
                                    "(trained alongside: frames + key + past keys) predicts, so the latent keeps little "
                                    "that the keys cannot tell and stage 5 can reach it (0 = off; README stage 5)")
    prior_width: int = arg(32, "channels of that prior's frame encoder")
    prior_past_actions: int = arg(2, "past keys that prior sees besides a_t")
    prior_warmup: int = arg(1000, "steps over which the pull rises from 0 to --action_prior (the codes settle first)")
    prior_from: str = arg("", "start the prior from these action_to_latent.safetensors (stage 5's model for --init_from's "
                              "world model; its shape replaces --prior_width/--prior_past_actions)")
    events: bool = arg(False, "Breakout: a second input to the decoder saying where the game serves the ball (labelled from "
                              "the frames; stage 5 predicts it from keys, frames and the frame phase); the serve's place follows "
                              "the game's frame counter, which no frame shows, and the latent action never learned "
                              "it (README stage 3)")
    event_fraction: float = arg(0.25, "with --events: share of each batch drawn from transitions with an event (serves are ~2%%)")
    event_scan: int = arg(300, "with --events: training episodes searched for events (their places and the oversampled pool)")
    shift_classes: int = arg(0, "shift classes in the decoder's output: per grid cell and offset d, 'the pixel shows the last "
                                "frame's colour at p - d', with the offsets fitted from the training data (how objects "
                                "move), so a moving object is one decision per cell (README stage 3); 0 = off")
    shift_scan: int = arg(20, "with --shift_classes: training episodes whose transitions fit the offsets")
    shift_gate: bool = arg(False, "with --shift_classes: train them as a gate per grid cell, 'one shift copies the whole "
                                  "cell' or 'the pixel classes decide', and decode by the gate's likeliest choice "
                                  "(README stage 3); off = each pixel sums its own and the shift classes")
    continue_motion: bool = arg(False, "with shift classes: one more class per grid cell, 'the pixel shows the frame in which "
                                       "every moving object took its last step again' (models.world_model.continued_frame), "
                                       "so a cell needs to know that the motion goes on, not its step (README stage 3)")
    keep_tiebreak: float = arg(0.0, "with --shift_classes (no gate): extra weight on -log p(keep) in the grid cells where "
                                    "nothing changes, where a same-colour shift is right too; without it a model trained from "
                                    "scratch is never sure to keep, and decoding loses its fast path (README stage 3)")
    gate_weight: float = arg(0.25, "with --shift_gate: weight of the gate's loss beside the pixels' (which is ~0.001-0.01 "
                                   "per pixel for a trained Breakout model, the gate's ~0.1 per cell at its start)")
    init_from: str = arg("", "start from these world_model.safetensors (architecture and palette follow them)")
    freeze_encoder: bool = arg(False, "train the decoder only: the latents, and models trained on them, stay valid")
    merge_codes: str = arg("", "with --init_from: read the encoder's code a as code b, e.g. '3:0,7:6' (codes the decoder "
                               "barely tells apart but the keys cannot predict; benchmarks/code_substitution.py; README stage 5)")
    steps: int = arg(3000, "optimiser steps")
    minutes: float = arg(0.0, "also stop after this many minutes of training, validations included (0 = no limit): the "
                              "learning rate's cosine then follows the clock or the steps, whichever is further along, so a "
                              "slower machine ends the same schedule with fewer steps; --resume continues the clock")
    batch_size: int = arg(32, "batch size")
    lr: float = arg(1e-3, "AdamW learning rate (cosine decay, 100-step warm-up)")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    val_percent: float = arg(10.0, "percent of episodes held out (split by episode)")
    val_every: int = arg(500, "steps between validations (and checkpoints)")
    val_samples: int = arg(512, "held-out transitions per validation")
    rollout_starts: int = arg(16, "held-out start points for the teacher-forced multi-step check")
    cache_episodes: int = arg(48, "decoded episodes kept in RAM (as palette indices)")
    amp: bool = arg(False, "bfloat16 autocast (GPU; a CPU with bfloat16 units, AVX512_BF16 or AMX: ~1.5x faster "
                           "steps on Zen 4, so the quick preset turns it on there)")
    compile: bool = arg(False, "torch.compile the model (checkpoints are saved without _orig_mod.)")
    device: str = arg("auto", "auto, cuda, mps or cpu")
    threads: int = arg(2, "torch CPU threads")
    seed: int = arg(0, "random seed")
    resume: bool = arg(False, "continue from <out_dir>/train/world_model.pt")
    eval_only: bool = arg(False, "only validate <out_dir>/world_model.safetensors on the held-out episodes")
    keep_bias: float = arg(-1.0, "decoding's keep-logit bias, stored with the weights (-1: log(1 + motion_weight), the "
                                 "prior correction for the motion-weighted loss; an --init_from fine-tune does not inherit a stored one); "
                                 "with --eval_only: validate with it")
    store_keep_bias: bool = arg(False, "with --eval_only and --keep_bias: then write that bias into the weights' "
                                       "hyperparameters (tensors unchanged; shipped model: README stage 3, session 29)")
    wandb: str = arg("offline", "wandb mode", choices=["offline", "online", "disabled"])


# what the saved weights' shapes depend on: a resume cannot change it
ARCHITECTURE = ("game", "context", "width", "depth", "embed_dim", "head_hidden", "enc_width", "enc_depth", "num_tokens",
                "codebook_size", "code_dim", "max_colors", "positional", "events", "shift_classes",
                "shift_gate", "continue_motion")
PRIOR_ARCHITECTURE = ("action_prior", "prior_width", "prior_past_actions")   # on or off, and its shapes


def merged_codes(cfg: Config, init_meta: dict | None, state: dict | None) -> list:
    """--merge_codes 'a:b,...' on top of the merges the --init_from weights already carry -> [[a, b], ...]."""
    if state is not None:   # resume: the merges saved in the checkpoint
        return json.loads(state.get("merged_codes", "[]"))
    merged = dict((init_meta or {}).get("hparams", {}).get("merged_codes", []))
    try:
        merged.update(parse_code_merges(cfg.merge_codes, cfg.codebook_size))
    except ValueError as e:
        raise UserError(f"--merge_codes: {e}") from None
    if set(merged) & set(merged.values()):
        raise UserError(f"--merge_codes: a code is both merged away and merged into ({merged}); name its final code")
    return sorted([a, b] for a, b in merged.items())


def find_events(windows: gd.GameplayWindows, palette: Palette, episodes: int) -> tuple[list, list]:
    """Serves (metrics.serve_places) in the first `episodes` episodes of `windows` -> (event places: each
    (row, col) seen at least twice, the dataset items of every serve). Items are kept whole (~1,300
    in 300 Breakout episodes, ~0.2 GB) so that each batch can mix some in without decoding their episodes again."""
    places, items, start = Counter(), [], 0
    for e, n in enumerate(windows.lengths):
        if e < episodes:
            frames = palette.to_rgb(windows.episode(e)["frames"])
            for t, place in wm_metrics.serve_places(frames, windows.context - 1):
                places[place] += 1
                items.append(windows[start + t])
        start += n
    return sorted(p for p, c in places.items() if c >= 2), items


def fit_palette(files, max_colors: int, per_episode: int = 64) -> Palette:
    frames = []
    for f in files[:64]:
        fr = gd.load_episode(f, keys=("frames", "actions"))["frames"]
        frames.append(fr[np.linspace(0, len(fr) - 1, min(per_episode, len(fr))).astype(int)])
    return Palette.fit(np.concatenate(frames), max_colors)


def fit_shifts(windows: gd.GameplayWindows, n: int, episodes: int) -> list:
    """The decoder's shift offsets (models.world_model.fit_shift_offsets) from every transition of the first
    `episodes` episodes of `windows` (palette indices)."""
    eps = [torch.from_numpy(windows.episode(e)["frames"]) for e in range(min(episodes, len(windows.files)))]
    return fit_shift_offsets(torch.cat([f[:-1] for f in eps]), torch.cat([f[1:] for f in eps]), n)


@torch.no_grad()
def self_forced_context(model: LatentActionModel, palette: Palette, history: torch.Tensor, fraction: float) -> torch.Tensor:
    """history (B, k+1, H, W): frames t-k..t. For a random `fraction` of the batch, frame t is replaced by
    the model's own prediction of it (teacher-forced latent and the true event, argmax, as at play time), so
    training sees the kind of errors open-loop play feeds back. (Without the event a serve would vanish from
    the replaced frame while the target still shows the ball one step on: it would teach drawing balls from
    nothing.)"""
    was_training = model.training
    model.eval()   # no codebook EMA / dead-code updates from this extra pass
    before, real_last = history[:, :-1], history[:, -1]
    _, codes, _ = model.encode(before, real_last)
    pred = model.predict_next(before, codes, model.transition_events(palette, before[:, -1], real_last))
    model.train(was_training)
    use = torch.rand(len(history), device=history.device) < fraction
    last = torch.where(use[:, None, None], pred, real_last)
    return torch.cat([history[:, 1:-1], last[:, None]], 1)


def to_batch(items: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (items["context"].to(device), items["next"].to(device), items["action"].to(device),
            items["past_actions"].to(device))


def make_prior(cfg, palette: Palette, world_meta: dict | None) -> ActionToLatent:
    """The action->latent prior trained alongside the world model when --action_prior > 0 (same network
    as stage 5's v2, smaller): it learns which code the encoder picks from what play time knows.
    With --prior_from, stage 5's trained model for the --init_from world model."""
    if cfg.prior_from:
        if world_meta is None:   # resuming: the shape from the file, the weights from the checkpoint
            return ActionToLatent(**read_weights(cfg.prior_from, "action_to_latent")[1]["hparams"])
        prior, _ = load_action_to_latent(cfg.prior_from, world_meta)
        if prior.version != "v2":
            raise UserError(f"--prior_from {cfg.prior_from} is a {prior.version} model; the prior needs v2 (frames)")
        if prior.frames_seen > cfg.context:
            raise UserError(f"--prior_from {cfg.prior_from} sees {prior.frames_seen} frames; the world model's batches "
                            f"hold {cfg.context} (train one with --context {cfg.context})")
        return prior.train()
    return ActionToLatent("v2", len(atari_env.action_names(cfg.game)), len(palette), cfg.context, cfg.num_tokens,
                          cfg.codebook_size, cfg.prior_width, 2, past_actions=cfg.prior_past_actions, positional=True)


@torch.no_grad()
def validate(model: LatentActionModel, palette: Palette, val: gd.GameplayWindows, cfg: Config, device,
             grid_path: Path, prior: ActionToLatent | None = None, val_serves: list | None = None) -> dict:
    """psnr@1 / motion_psnr@1 with the encoder's latent vs copy-last, on held-out episodes (and, with a
    prior, how often it predicts the encoder's code: what stage 5 can hope for; with `val_serves`, the
    share of those held-out serves drawn at their place; for Breakout, the share of real balls drawn in
    place and drawn whole: metrics.ball_drawn_counts)."""
    model.eval()
    prior_hits = 0
    pick = np.linspace(0, len(val) - 1, min(cfg.val_samples, len(val))).astype(int)
    acc = {k: wm_metrics.PSNRAccumulator() for k in ("psnr", "copy", "motion", "motion_copy")}
    codes_seen, action_code, balls = Counter(), Counter(), Counter()
    colors = torch.as_tensor(palette.colors, device=device)
    shown = None
    for b in range(0, len(pick), 64):
        items = [val[i] for i in pick[b:b + 64]]
        ctx = torch.stack([it["context"] for it in items]).to(device)
        nxt = torch.stack([it["next"] for it in items]).to(device)
        q, codes, _ = model.encode(ctx, nxt)
        codes_seen.update(codes.flatten().tolist())
        if prior is not None:
            past = torch.stack([it["past_actions"] for it in items]).to(device)
            act = torch.tensor([it["action"] for it in items], device=device)
            prior_hits += (prior.sample(act, ctx, past_actions=past) == codes).all(1).sum().item()
        action_code.update((it["prev_action"], it["action"], tuple(c)) for it, c in zip(items, codes.tolist()))
        pred = model.predict_next(ctx, codes, model.transition_events(palette, ctx[:, -1], nxt))
        real_rgb, pred_rgb, last_rgb = colors[nxt.long()], colors[pred.long()], colors[ctx[:, -1].long()]
        mask = wm_metrics.motion_mask(ctx[:, -1], nxt)
        acc["psnr"].add(pred_rgb, real_rgb)
        acc["copy"].add(last_rgb, real_rgb)
        acc["motion"].add(pred_rgb, real_rgb, mask)
        acc["motion_copy"].add(last_rgb, real_rgb, mask)
        if cfg.game == "breakout":
            balls.update(wm_metrics.ball_drawn_counts(pred, nxt, palette.colors))
        if shown is None:   # the grid shows the transitions with the most motion
            order = mask.sum((1, 2)).argsort(descending=True)[:4].cpu().numpy()
            shown = (last_rgb[order].cpu().numpy(), real_rgb[order].cpu().numpy(), pred_rgb[order].cpu().numpy())
            if cfg.game == "breakout":   # issue #4's bar, counted: is the ball drawn (whole, in place) in the grid
                grid_balls = wm_metrics.ball_drawn_counts(pred[order], nxt[order], palette.colors)
    wm_metrics.error_grid(*shown, grid_path)
    tf = teacher_forced_psnr(model, val, cfg, colors, device, palette)
    if val_serves:
        tf["serve_drawn_at_place"] = serves_drawn(model, palette, val_serves, device)
    model.train()
    return {**wm_metrics.latent_purity(action_code), "psnr@1": acc["psnr"].psnr, "copy_last_psnr@1": acc["copy"].psnr,
            "motion_psnr@1": acc["motion"].psnr, "copy_last_motion_psnr@1": acc["motion_copy"].psnr,
            "val_codes_used": len(codes_seen), **tf,
            **({f"{k}@1": balls[k] / balls["real_ball"] for k in ("ball_in_place", "ball_whole")} if balls["real_ball"] else {}),
            **({f"grid_{k}": v for k, v in grid_balls.items()} if cfg.game == "breakout" else {}),
            **({"prior_latent_acc": prior_hits / len(pick)} if prior is not None else {})}


@torch.no_grad()
def serves_drawn(model: LatentActionModel, palette: Palette, serves: list, device) -> float:
    """Share of the serve transitions (dataset items) where the decoder, given the encoder's latent and the
    event, draws the ball within 2 px of where the game put it."""
    hits = 0
    for b in range(0, len(serves), 64):
        batch = default_collate(serves[b:b + 64])
        ctx, nxt = batch["context"][:, -model.context:].to(device), batch["next"].to(device)
        _, codes, _ = model.encode(ctx, nxt)
        pred = palette.to_rgb(model.predict_next(ctx, codes, model.transition_events(palette, ctx[:, -1], nxt)).cpu().numpy())
        for p, r in zip(pred, palette.to_rgb(nxt.cpu().numpy())):
            drawn, real = wm_metrics.ball_position(p), wm_metrics.ball_position(r)
            hits += drawn is not None and abs(drawn[0] - real[0]) <= 2 and abs(drawn[1] - real[1]) <= 2
    return hits / len(serves)


@torch.no_grad()
def teacher_forced_psnr(model: LatentActionModel, val: gd.GameplayWindows, cfg: Config, colors, device,
                        palette: Palette, horizons=(1, 4, 16, 32)) -> dict:
    """Decoder rolled forward on its own uint8 outputs, with the encoder's latents from the real frames."""
    H, k = max(horizons), model.context
    starts = []
    for e, n in enumerate(val.lengths):
        starts += [(e, s) for s in range(k - 1, n - H, max(1, (n - H) // 2))]
    if not starts:
        return {}
    rng = np.random.default_rng(0)
    starts = [starts[i] for i in rng.choice(len(starts), min(cfg.rollout_starts, len(starts)), replace=False)]
    real = torch.stack([torch.as_tensor(val.episode(e)["frames"][s - k + 1:s + H + 1]) for e, s in starts]).to(device)
    ctx = real[:, :k].clone()
    acc = {t: (wm_metrics.PSNRAccumulator(), wm_metrics.PSNRAccumulator()) for t in horizons}
    for t in range(1, H + 1):
        _, codes, _ = model.encode(real[:, t - 1:t - 1 + k], real[:, t - 1 + k])
        events = model.transition_events(palette, real[:, t - 2 + k], real[:, t - 1 + k])
        pred = model.predict_next(ctx, codes, events)
        ctx = torch.cat([ctx[:, 1:], pred[:, None]], 1)
        if t in acc:
            truth = colors[real[:, t - 1 + k].long()]
            acc[t][0].add(colors[pred.long()], truth)
            acc[t][1].add(colors[real[:, k - 1].long()], truth)
    out = {}
    for t, (m, c) in acc.items():
        out[f"tf_psnr@{t}"], out[f"tf_copy_last_psnr@{t}"] = m.psnr, c.psnr
    return out


def validate_saved(cfg: Config, out_dir: Path, val_files, device) -> None:
    """--eval_only: the held-out validation of the saved weights, as decoded today (e.g. after a decoding fix)."""
    path = out_dir / "world_model.safetensors"
    model, palette, meta = load_world_model(path, cfg.game, device)
    if cfg.keep_bias >= 0:
        model.keep_bias = model.hparams["keep_bias"] = cfg.keep_bias
    val = gd.GameplayWindows(val_files, model.context, max(4, len(val_files)), frame_transform=palette.to_index)
    grid = out_dir / "train" / "world_model" / "val_grid_eval_only.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    serves = find_events(val, palette, len(val_files))[1] if cfg.game == "breakout" else []
    result = validate(model, palette, val, cfg, device, grid, val_serves=serves)
    result.update(step=meta.get("step"), keep_bias=model.keep_bias, device=str(device))
    save_json(out_dir / "world_model_eval_only.json", result)
    print("\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()))
    print(f"grid: {grid}")
    if cfg.store_keep_bias:   # a decoding setting, chosen after training: the validation it got goes with it
        save_weights(path, model, {**meta, "hparams": model.hparams, "validation": result})
        print(f"{path}: keep_bias {model.keep_bias} stored")


def main(argv=None) -> None:
    cfg = parse_config(Config, argv, presets=PRESETS)
    atari_env.game_spec(cfg.game)
    if cfg.context < 2:
        raise UserError("--context must be >= 2 (one frame cannot show the ball's velocity)")
    if cfg.action_prior > 0 and cfg.freeze_encoder:
        raise UserError("--action_prior shapes the encoder's latents; it cannot be used with --freeze_encoder")
    if cfg.events and cfg.game != "breakout":
        raise UserError(f"--events needs an event detector for the game; there is one for breakout, not {cfg.game}")
    if cfg.preset == "quick" and cfg.game != "breakout" and cfg.turn_focus:   # the preset's draws need Breakout's ball
        print(f"--preset quick: no ball detector for {cfg.game}, so no --turn_focus")
        explicit, cfg = cfg.__dict__.get("_explicit", set()), dataclasses.replace(cfg, turn_focus=0.0)
        cfg.__dict__["_explicit"] = explicit   # --resume still tells flags from checkpoint values
    if (cfg.ball_weight or cfg.turn_focus or cfg.ball_jitter) and cfg.game != "breakout":
        raise UserError(f"--ball_weight, --turn_focus and --ball_jitter need a ball detector; there is one for breakout, "
                        f"not {cfg.game}")
    if not 0 <= cfg.ball_jitter <= 1 or cfg.jitter_px < 1:
        raise UserError(f"--ball_jitter must be in [0, 1] and --jitter_px >= 1, got {cfg.ball_jitter} and {cfg.jitter_px}")
    if not 0 <= cfg.turn_focus < 1:
        raise UserError(f"--turn_focus must be in [0, 1), got {cfg.turn_focus}")
    if cfg.fast_ball_px and not cfg.turn_focus:
        raise UserError("--fast_ball_px adds to --turn_focus's draws; set --turn_focus too")
    if cfg.gate_weight < 0:
        raise UserError(f"--gate_weight must be >= 0, got {cfg.gate_weight}")
    if cfg.store_keep_bias and not (cfg.eval_only and cfg.keep_bias >= 0):
        raise UserError("--store_keep_bias writes the bias that --eval_only validated: set --eval_only and --keep_bias B")
    if cfg.merge_codes and not (cfg.init_from or cfg.resume):
        raise UserError("--merge_codes needs --init_from: it names codes of a trained world model")
    if cfg.prior_from and not (cfg.init_from or cfg.resume):
        raise UserError("--prior_from needs --init_from: the prior must be trained on that world model's codes")
    data_dir = Path(cfg.data_dir or f"data/{cfg.game}")
    out_dir = Path(cfg.out_dir or f"checkpoints/{cfg.game}")
    ckpt_path = out_dir / "train" / "world_model.pt"
    state = None
    if cfg.resume:   # continue as configured: what this command does not set comes from the checkpoint
        state = load_checkpoint(ckpt_path, "world_model_train")
        for key, old_default in (("positional", False), ("dead_code", 2.0), ("action_prior", 0.0)):   # from before the options
            state["config"].setdefault(key, old_default)
        state["config"].setdefault("merge_codes", "")
        state["config"].setdefault("events", False)
        state["config"].setdefault("shift_gate", False)
        state["config"].setdefault("continue_motion", False)
        state["config"].setdefault("keep_tiebreak", 0.0)
        cfg = restore_config(cfg, state["config"], fixed=ARCHITECTURE + PRIOR_ARCHITECTURE + ("merge_codes",))
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    manifest = gd.read_manifest(data_dir)
    if manifest and manifest.get("game") != cfg.game:
        raise UserError(f"{data_dir} holds {manifest.get('game')!r} episodes, not {cfg.game!r}")
    train_files = gd.split_episodes(data_dir, "train", cfg.val_percent)
    val_files = gd.split_episodes(data_dir, "val", cfg.val_percent)
    if not train_files:
        raise UserError(f"need at least 2 episodes in {data_dir} (one is held out)")

    if cfg.eval_only:
        return validate_saved(cfg, out_dir, val_files, device)
    init, init_meta = None, None
    if state is not None:
        palette = Palette(state["palette"].numpy())
    elif cfg.init_from:
        init, palette, init_meta = load_world_model(cfg.init_from, cfg.game, device)
        hp = init.hparams
        cfg = dataclasses.replace(cfg, **{k: hp[k] for k in ARCHITECTURE if k in hp})
        if hp.get("event_places"):
            cfg = dataclasses.replace(cfg, events=True)
        if hp.get("shift_offsets"):
            cfg = dataclasses.replace(cfg, shift_classes=len(hp["shift_offsets"]),   # --shift_gate may turn it on
                                      shift_gate=cfg.shift_gate or bool(hp.get("shift_gate")))
    else:
        palette = fit_palette(train_files, cfg.max_colors)
    print(f"{len(train_files)} training / {len(val_files)} held-out episodes; palette of {len(palette)} colours")
    prior = make_prior(cfg, palette, init_meta).to(device) if cfg.action_prior > 0 else None
    if prior is not None and prior.past_actions != cfg.prior_past_actions:   # --prior_from decides
        cfg = dataclasses.replace(cfg, prior_past_actions=prior.past_actions)
    to_index = palette.to_index
    # one extra history frame: self-forcing predicts the last context frame from the ones before it
    past = cfg.prior_past_actions if prior is not None else 0   # the keys are read only by the prior
    train = gd.GameplayWindows(train_files, cfg.context + 1, cfg.cache_episodes, frame_transform=to_index, past_actions=past)
    val = gd.GameplayWindows(val_files, cfg.context, max(4, len(val_files)), frame_transform=to_index, past_actions=past)
    places, event_pool, val_serves = None, [], []
    if cfg.events:
        places, event_pool = find_events(train, palette, cfg.event_scan)
        if state is not None:
            places = json.loads(state["event_places"])
        elif init_meta and init_meta["hparams"].get("event_places"):
            places = init_meta["hparams"]["event_places"]
        if not places or not event_pool:
            raise UserError(f"--events: no serve found in the first {cfg.event_scan} training episodes of {data_dir}")
        val_serves = find_events(val, palette, len(val_files))[1]
        print(f"events: {len(event_pool)} serves at {len(places)} places in the first {cfg.event_scan} training episodes")
    shifts = []
    if state is not None:
        shifts = json.loads(state.get("shift_offsets", "[]"))
    elif init is not None and init.shift_offsets:
        shifts = init.shift_offsets
    elif cfg.shift_classes:
        shifts = fit_shifts(train, cfg.shift_classes, cfg.shift_scan)
        if not shifts:
            raise UserError(f"--shift_classes: nothing moves in the first {cfg.shift_scan} training episodes of {data_dir}")
        print(f"shift classes (dy, dx): {shifts}")
    if cfg.shift_gate and not shifts:
        raise UserError("--shift_gate trains shift classes: set --shift_classes N too")
    if cfg.keep_tiebreak < 0 or (cfg.keep_tiebreak and (not shifts or cfg.shift_gate)):
        raise UserError(f"--keep_tiebreak (>= 0, got {cfg.keep_tiebreak}) breaks ties between keep and the shift classes: "
                        "set --shift_classes N, without --shift_gate")
    if cfg.continue_motion and (not shifts or cfg.shift_gate):
        raise UserError("--continue_motion takes its steps from the shift classes: set --shift_classes N, without --shift_gate")
    model = LatentActionModel(len(palette), cfg.context, cfg.width, cfg.depth, cfg.embed_dim, cfg.enc_width,
                              cfg.enc_depth, cfg.num_tokens, cfg.codebook_size, cfg.code_dim, cfg.head_hidden,
                              cfg.keep_bias if cfg.keep_bias >= 0 else keep_bias_for(cfg.motion_weight, cfg.keep_tiebreak),
                              cfg.dead_code, cfg.positional,
                              merged_codes(cfg, init_meta, state), places, shifts, cfg.shift_gate,
                              cfg.continue_motion).to(device)
    if init is not None:   # strict=False only for an event table the --init_from weights did not have
        weights = init.state_dict()
        head, n = model.head[-1], weights["head.2.bias"].shape[0]
        if head.bias.shape[0] > n:   # new shift (or continue) classes: the head's last layer gains rows, zero at
            # first (with the gate: the bias the model starts it with)
            new_bias = head.bias[n:].detach() if model.shift_gate else torch.zeros_like(head.bias[n:])
            weights["head.2.weight"] = torch.cat([weights["head.2.weight"], torch.zeros_like(head.weight[n:])])
            weights["head.2.bias"] = torch.cat([weights["head.2.bias"], new_bias])
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"event_embed.weight"}:
            raise UserError(f"{cfg.init_from}: weights do not fit the model ({(unexpected or missing)[0]} ...)")
    if cfg.freeze_encoder:
        model.freeze_encoder()
    params = list(model.named_parameters()) + (list(prior.named_parameters()) if prior is not None else [])
    decay = [p for n, p in params if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in params if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    clock = {"seconds": 0.0}   # training time so far, validations included (kept in the checkpoint for --minutes)

    def progress(s: int) -> float:   # how far along the schedule is: by steps, or by --minutes' clock
        return min(1.0, max(s / cfg.steps, clock["seconds"] / (60 * cfg.minutes) if cfg.minutes > 0 else 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: float(min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * progress(s)))))
    step, best = 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        if prior is not None:
            prior.load_state_dict(state["prior"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = state["step"], json.loads(state["last_val"])
        clock["seconds"] = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}")
    fwd = torch.compile(model) if cfg.compile else model
    def turns(ep):   # --turn_focus: the transitions where the ball may turn (or, with --fast_ball_px, moves fast)
        frames = torch.from_numpy(ep["frames"])
        hard = wm_metrics.ball_may_turn(frames, palette.colors)
        if cfg.fast_ball_px:
            hard |= wm_metrics.ball_fast_sideways(frames, palette.colors, cfg.fast_ball_px)
        return hard.numpy()

    sampler = gd.EpisodeGroupSampler(train, group=max(1, cfg.cache_episodes // 2), seed=cfg.seed,
                                     focus=turns if cfg.turn_focus else None, focus_fraction=cfg.turn_focus)
    sampler.epoch = step // max(1, len(train) // cfg.batch_size)
    loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=0)
    logger = MetricLogger(out_dir / "train" / "world_model", f"neural-atari-world-model-{cfg.game}",
                          dataclasses.asdict(cfg), mode=cfg.wandb, resume=cfg.resume)
    meta = {"kind": "world_model", "game": cfg.game, "hparams": model.hparams, "palette": palette.colors.tolist(),
            "train_episodes": len(train_files), "train_transitions": len(train), "config": dataclasses.asdict(cfg)}

    def checkpoint(last_val: dict):
        save_checkpoint(ckpt_path, {"kind": "world_model_train", "config": dataclasses.asdict(cfg),
                                    "model": strip_compile_prefix(model.state_dict()), "opt": opt.state_dict(),
                                    "sched": sched.state_dict(), "step": step, "train_seconds": clock["seconds"],
                                    "palette": torch.as_tensor(palette.colors),
                                    "last_val": json.dumps(last_val), "torch_rng": torch.get_rng_state(),
                                    "merged_codes": json.dumps(model.hparams.get("merged_codes", [])),
                                    "event_places": json.dumps(model.event_places),
                                    "shift_offsets": json.dumps(model.shift_offsets),
                                    **({"prior": prior.state_dict()} if prior is not None else {})})
        save_weights(out_dir / "world_model.safetensors", model, {**meta, "step": step, "validation": last_val})
        if not (out_dir / START_FRAMES).exists():   # real start frames the neural env resets to
            save_start_frames(out_dir / START_FRAMES, real_start_frames(cfg.game, cfg.context, 8))

    usage = deque(maxlen=50)   # codebook usage over a window of batches, not one batch (GUIDE §4)
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True)
    t0, last_val = time.time() - clock["seconds"], best
    model.train()
    rng = np.random.default_rng(cfg.seed + step)
    try:
        while progress(step) < 1:
            for items in loader:
                if event_pool and cfg.event_fraction > 0:   # the last rows of the batch: serves
                    n = int(round(cfg.event_fraction * cfg.batch_size))
                    extra = default_collate([event_pool[i] for i in rng.integers(len(event_pool), size=n)])
                    items = {key: torch.cat([items[key][:cfg.batch_size - n], extra[key]]) for key in
                             ("context", "next", "action", "past_actions")}
                history, nxt, action, past_actions = to_batch(items, device)
                events = model.transition_events(palette, history[:, -1], nxt) if model.num_events else None
                ctx = history[:, 1:]
                if cfg.self_forcing > 0:
                    ctx = self_forced_context(model, palette, history, cfg.self_forcing)
                if cfg.ball_jitter > 0:
                    ball = wm_metrics.ball_pixels(ctx[:, -1], palette.colors)
                    ctx = torch.cat([ctx[:, :-1], jitter_ball(ctx[:, -1], ball, cfg.ball_jitter, cfg.jitter_px)[:, None]], 1)
                if cfg.context_noise > 0:
                    ctx = add_speckle(ctx, cfg.context_noise, cfg.noise_density, len(palette))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    cells, codes, commit, z = fwd(history[:, 1:], nxt, ctx, events)
                scale = None
                if cfg.ball_weight:   # the cells the ball can reach from where it is at t (the real frame)
                    scale = 1 + cfg.ball_weight * near_cells(wm_metrics.ball_pixels(history[:, -1], palette.colors))
                recon = model.cell_loss(cells, ctx[:, -1], nxt, cfg.motion_weight, scale, cfg.gate_weight,
                                        model.continued(ctx), cfg.keep_tiebreak)
                loss = recon + commit.sum()
                if prior is not None:   # the prior learns the encoder's codes; the encoder is pulled toward its guess
                    prior_logits = prior(action, history[:, 1:], past_actions)
                    prior_ce = torch.nn.functional.cross_entropy(prior_logits.flatten(0, 1).float(), codes.flatten())
                    pull = model.prior_pull(z, prior_logits)
                    ramp = min(1.0, step / max(1, cfg.prior_warmup))
                    loss = loss + prior_ce + cfg.action_prior * ramp * pull
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                clock["seconds"] = time.time() - t0
                done = progress(step) >= 1
                usage.append(np.bincount(codes.flatten().cpu().numpy(), minlength=cfg.codebook_size))
                bar.update(1)
                if step % 25 == 0:
                    counts = np.sum(usage, 0)
                    p = counts / counts.sum()
                    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
                    logger.log({"loss": loss.item(), "recon": recon.item(), "commit": commit.sum().item(),
                                "codes_used": int((counts > 0).sum()), "perplexity": perplexity,
                                "lr": sched.get_last_lr()[0],
                                **({"prior_ce": prior_ce.item(), "prior_pull": pull.item(),
                                    "prior_acc": (prior_logits.argmax(-1) == codes).all(1).float().mean().item()}
                                   if prior is not None else {})}, step)
                    bar.set_postfix(loss=f"{recon.item():.4f}", codes=int((counts > 0).sum()), ppl=f"{perplexity:.1f}")
                if done and step < cfg.steps:
                    tqdm.write(f"--minutes {cfg.minutes:g} reached at step {step}")
                if step % cfg.val_every == 0 or done:
                    grid = out_dir / "train" / "world_model" / f"val_grid_{step:06d}.png"
                    last_val = validate(model, palette, val, cfg, device, grid, prior, val_serves)
                    last_val["train_minutes"] = round((time.time() - t0) / 60, 1)
                    logger.log(last_val, step)
                    logger.log_image("val_grid", grid, step)
                    tqdm.write(f"step {step}: psnr@1 {last_val['psnr@1']:.2f} (copy-last {last_val['copy_last_psnr@1']:.2f}), "
                               f"motion_psnr@1 {last_val['motion_psnr@1']:.2f} (copy-last {last_val['copy_last_motion_psnr@1']:.2f}), "
                               f"tf_psnr@16 {last_val.get('tf_psnr@16', float('nan')):.2f} "
                               f"(copy-last {last_val.get('tf_copy_last_psnr@16', float('nan')):.2f})"
                               + (f", prior latent_acc {last_val['prior_latent_acc']:.3f}" if prior is not None else "")
                               + (f", held-out serves drawn {last_val['serve_drawn_at_place']:.3f}" if val_serves else "")
                               + (f", ball in place {last_val['ball_in_place@1']:.3f} / whole {last_val['ball_whole@1']:.3f}"
                                  if "ball_whole@1" in last_val else ""))
                    clock["seconds"] = time.time() - t0
                    checkpoint(last_val)
                if done:
                    break
    except KeyboardInterrupt:
        tqdm.write("interrupted: saving a checkpoint; continue with --resume")
        checkpoint(last_val)
        raise
    finally:
        bar.close()
    save_json(out_dir / "world_model_metrics.json", {**last_val, "step": step, "device": str(device),
                                                     "config": dataclasses.asdict(cfg)})
    logger.finish()
    print(f"done: {out_dir / 'world_model.safetensors'}")


if __name__ == "__main__":
    run_main(main)
