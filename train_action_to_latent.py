"""Stage 5: map a real action (+ the recent frames) to the world model's latent action.

    python train_action_to_latent.py --game breakout                 # v2: frames + action (default)
    python train_action_to_latent.py --game breakout --model v1      # action only (baseline)
    python train_action_to_latent.py --game breakout --eval_only   # re-validate the shipped weights (e.g. new decoder)

Validation is on held-out *episodes* (the world model's split): token and whole-latent accuracy,
per-action accuracy, a confusion matrix PNG, and what matters at play time: next-frame psnr@1 and
motion_psnr@1 when the decoder uses the predicted latent vs the encoder's latent vs copy-last.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import atari_env
import gameplay_data as gd
import metrics as wm_metrics
from collect_action_latent_pairs import load_pairs
from common import (MetricLogger, UserError, arg, load_checkpoint, parse_config, pick_device, restore_config,
                    run_main, save_checkpoint, save_json)
from models.world_model import ActionToLatent, cells_any, last_frames, load_action_to_latent, load_world_model, save_weights

PRESETS = {"quick": dict(steps=800, batch_size=64), "full": dict(steps=20000, batch_size=256, width=64)}


@dataclass
class Config:
    """Action (+ recent frames) -> latent action classifier, one softmax per latent token."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    model: str = arg("v2", "v1: action only; v2: action + recent frames", choices=["v1", "v2"])
    data_dir: str = arg("", "recorded episodes with latent pairs (default data/<game>)")
    world_model: str = arg("", "world model weights (default checkpoints/<game>/world_model.safetensors)")
    out_dir: str = arg("", "weights and logs (default checkpoints/<game>)")
    preset: str = arg("", "set by --preset")
    context: int = arg(0, "frames v2's code trunk sees, t-n+1..t (0: the world model's; 8 did worse on held-out episodes, README stage 5)")
    event_context: int = arg(0, "frames the event head also reads through its own encoder (0: none; world models with "
                                "events): Breakout serves on FIRE only ~7 steps after a lost ball, which two frames "
                                "cannot show; the shipped head: 8, trained alone with --events_only --event_focus 0.25 "
                                "(README stage 5, session 17)")
    event_width: int = arg(16, "channels of the event head's per-frame encoder")
    event_depth: int = arg(1, "residual blocks of the event head's per-frame encoder (0, a projection only, did not "
                              "find the ball in session 16, before its dense ball target: README stage 5)")
    event_ball_weight: float = arg(1.0, "weight of the event head's 'ball in this grid cell' loss (the object detector's ball "
                                        "pixels in each frame it reads; 0: none)")
    event_ball_pos_weight: float = arg(100.0, "weight of a ball cell against an empty one in that loss (~1 cell in 540)")
    event_focus: float = arg(0.0, "fraction of each batch drawn again from FIRE presses with no ball on screen (the "
                                  "only transitions where a serve can follow; chosen by input, so the odds stay calibrated)")
    init_from: str = arg("", "start from these action_to_latent.safetensors (same world model and code trunk)")
    events_only: bool = arg(False, "train only the event head (codes stay those of --init_from)")
    history_keys: int = arg(0, "keys before a_t read by a history head that also reads the event head's frames and "
                               "adds to the code logits (0: none); the shipped model: 8, trained with --history_only "
                               "(README stage 5, session 34)")
    history_width: int = arg(256, "hidden width of the history head")
    paddle_dial: bool = arg(True, "the history head also reads where its keys turned the paddle's dial, followed from "
                                  "the episode's start (paddle games: atari_env.paddle_dial): it winds up past a wall "
                                  "out of sight (README stage 5, session 35)")
    dial_levels: bool = arg(True, "with --paddle_dial, the history head also reads which of its few reachable values "
                                  "the dial is at, one-hot (a whole number of presses from the middle or either end): "
                                  "the paddle's next column is a step function of it (README stage 5, session 36)")
    dial_noise: float = arg(0.0, "fraction of training transitions whose dial starts from a random place (before the "
                                 "head's oldest key): a dream's paddle can drift from where the keys put the dial, "
                                 "which recordings never show, so the head learns to weigh the frames too")
    history_only: bool = arg(False, "train only the history head of an --init_from model, on the frozen parts' "
                                    "features computed once per transition (minutes); events stay those of --init_from, "
                                    "unless --event_mlp_only trains the event MLP in the same run")
    frame_phase: bool = arg(True, "the event head also reads the episode's frame phase (where the emulator's frame "
                                  "counter started, atari_env.recorded_frame_phase): Breakout picks the serve's place "
                                  "by that counter (README stage 5, session 36)")
    history_context: int = arg(0, "of the event head's frames, the last this many are read by the history head (0: "
                                  "all): a longer --event_context then keeps a trained history head's inputs")
    event_mlp_only: bool = arg(False, "train only the event head's MLP of an --init_from model, on the frozen frame "
                                      "readings computed once per transition (minutes; the history head reads the "
                                      "same readings, so they stay); codes stay those of --init_from, unless with "
                                      "--history_only: both heads from one pass over the frames, as two runs would")
    past_actions: int = arg(4, "v2 also sees this many actions before a_t (a press moves the paddle over two steps, "
                                 "and it leaves the right wall only after 2-3 LEFT presses: README stage 5)")
    # on: the paddle's step under a key depends on its absolute column, which a translation-equivariant
    # encoder with mean/max pooling cannot see (README stage 5, session 11: 0.977 -> 0.982 held-out)
    positional: bool = arg(True, "v2 frame encoder knows where each grid cell is and pools by where features fire")
    width: int = arg(48, "v2 frame-encoder channels")
    depth: int = arg(2, "v2 frame-encoder residual blocks")
    steps: int = arg(800, "optimiser steps")
    batch_size: int = arg(64, "batch size")
    lr: float = arg(1e-3, "AdamW learning rate (cosine decay)")
    temperature: float = arg(0.0, "default sampling temperature stored with the weights (0 = argmax)")
    val_percent: float = arg(10.0, "percent of episodes held out (must match the world model's)")
    val_every: int = arg(500, "steps between validations (and checkpoints)")
    val_samples: int = arg(2048, "held-out transitions per validation")
    cache_episodes: int = arg(48, "decoded episodes kept in RAM")
    device: str = arg("auto", "auto, cuda, mps or cpu")
    threads: int = arg(2, "torch CPU threads")
    seed: int = arg(0, "random seed")
    resume: bool = arg(False, "continue from <out_dir>/train/action_to_latent.pt")
    eval_only: bool = arg(False, "only validate <out_dir>/action_to_latent.safetensors on the held-out episodes, with "
                                 "--world_model's decoder (e.g. a decoder fine-tuned since; the pairs stay valid)")
    wandb: str = arg("offline", "wandb mode", choices=["offline", "online", "disabled"])


class PairWindows(Dataset):
    """(context frames as palette indices, real action, encoder codes) for each recorded transition."""

    def __init__(self, windows: gd.GameplayWindows, pairs: dict[str, dict]):
        self.w, self.pairs = windows, pairs

    def __len__(self):
        return len(self.w)

    def __getitem__(self, i):
        item = self.w[i]
        r = self.pairs[self.w.files[item["episode"]].stem]
        item["codes"] = torch.as_tensor(r["codes"][item["t"]]).long()
        return item


def dial_of(items: list[dict], device) -> torch.Tensor | None:
    """The windows' paddle dials (B,), or None for a model without one."""
    return torch.stack([it["dial"] for it in items]).to(device) if "dial" in items[0] else None


def phase_of(items: list[dict], device, a2l: ActionToLatent) -> torch.Tensor | None:
    """The windows' frame phases (B,), or None for a model without them."""
    if not a2l.frame_phases:
        return None
    if "frame_phase" not in items[0]:   # its event odds would be those of an unknown phase
        raise ValueError("the model reads the frame phase: make the windows with frame_phase=True")
    return torch.stack([it["frame_phase"] for it in items]).to(device)


@torch.no_grad()
def validate(a2l: ActionToLatent, wm, palette, val: PairWindows, cfg: Config, device, names, out_dir: Path,
             per_episode: dict | None = None) -> dict:
    """Held-out metrics on cfg.val_samples transitions spread over val; `per_episode` (a dict), when given, gets
    each episode's squared error with the encoder's and the predicted latents, over the motion pixels and over the
    whole frame ({"motion": {episode file name: [enc, pred]}, "frame": likewise})."""
    a2l.eval()
    pick = np.linspace(0, len(val) - 1, min(cfg.val_samples, len(val))).astype(int)
    K, A = a2l.codebook_size, len(names)
    conf = np.zeros((K, K), dtype=np.int64)   # true code x predicted code (all tokens)
    tok_ok = whole_ok = frame_ok = n = 0
    per_action = np.zeros((A, 2))
    colors = torch.as_tensor(palette.colors, device=device)
    acc = {k: wm_metrics.PSNRAccumulator() for k in ("pred", "enc", "copy", "m_pred", "m_enc", "m_copy", "m_true_event")}
    events_seen = np.zeros(4, dtype=np.int64)   # real events, of them fired, of them at the right place; false alarms
    ball_ok = ball_n = 0   # the event head's per-frame "ball on screen" vs the object detector
    # per held-out episode: squared error over the motion pixels, encoder's / predicted, then over the whole frame
    episode_se = defaultdict(lambda: np.zeros(4))
    bar = tqdm(total=len(pick), desc="held-out validation", unit="transition", leave=False)
    for b in range(0, len(pick), 128):
        items = [val[i] for i in pick[b:b + 128]]
        bar.update(len(items))
        ctx = torch.stack([it["context"] for it in items]).to(device)
        nxt = torch.stack([it["next"] for it in items]).to(device)
        act = torch.tensor([it["action"] for it in items], device=device)
        past = torch.stack([it["past_actions"] for it in items]).to(device)
        true = torch.stack([it["codes"] for it in items]).to(device)
        summaries = None
        if a2l.event_context:   # the event head reads its frames once: for the events and the ball's accuracy
            pooled, ball_cells = a2l.event_history(ctx)
            summaries = a2l.summarize(pooled, ball_cells)
            seen = wm_metrics.ball_visible(last_frames(ctx, a2l.event_context), palette.colors)
            # a frame's ball: its most confident cell; pos_weight w scales a ball cell's odds by w, so its
            # logit - log w is the plain one
            ball_ok += ((summaries[..., -1] > np.log(cfg.event_ball_pos_weight)) == seen).sum().item()
            ball_n += seen.numel()
        pred, pred_events = a2l.sample_step(act, ctx if cfg.model == "v2" else None, past_actions=past,   # the likeliest
                                            summaries=summaries, dial=dial_of(items, device), phase=phase_of(items, device, a2l))
        true_events = wm.transition_events(palette, ctx[:, -1], nxt) if wm.num_events else None
        if pred_events is not None:
            happened, fired = true_events > 0, pred_events > 0
            events_seen += [happened.sum().item(), (happened & fired).sum().item(),
                            (happened & (pred_events == true_events)).sum().item(), (~happened & fired).sum().item()]
        np.add.at(conf, (true.flatten().cpu().numpy(), pred.flatten().cpu().numpy()), 1)
        ok_tok = (pred == true)
        ok = ok_tok.all(1)
        tok_ok += ok_tok.sum().item()
        whole_ok += ok.sum().item()
        n += len(items)
        np.add.at(per_action, act.cpu().numpy(), np.stack([ok.cpu().numpy(), np.ones(len(items))], 1))
        real = colors[nxt.long()]
        mask = wm_metrics.motion_mask(ctx[:, -1], nxt)
        frames = {"enc": wm.predict_next(ctx, true, true_events)}
        # the decoder draws the same frame from the same inputs: it runs again only where the prediction differs
        # (0.2 % of the codes; the default --eval_only took 1.7 times as long decoding all three: README stage 5)
        same_codes = (pred == true).all(1)
        same_events = torch.ones_like(same_codes) if pred_events is None else pred_events == true_events
        frames["pred"] = redecode(wm, ctx, frames["enc"], ~(same_codes & same_events), pred, pred_events)
        motion_n = int(mask.sum().item()) * 3
        for col, key in enumerate(("enc", "pred")):
            err = (colors[frames[key].long()].float() - real.float()).pow(2)
            # each sample's error once: for the PSNRs and for its episode (the gaps' bootstrap)
            se = (err * mask[..., None]).flatten(1).sum(1).cpu().numpy()
            se_frame = err.flatten(1).sum(1).cpu().numpy()
            acc["m_" + key].add_sums(float(se.sum()), motion_n)
            acc[key].add_sums(float(se_frame.sum()), err[0].numel() * len(items))
            for it, e, ef in zip(items, se, se_frame):
                episode_se[it["episode"]][[col, col + 2]] += (e, ef)
        # codes can be redundant (two codes, one frame): what counts is the frame the decoder draws
        frame_ok += (frames["pred"] == frames["enc"]).flatten(1).all(1).sum().item()
        if pred_events is not None:   # the predicted codes with the real event: the codes' share of the gap
            # (the encoder's frame where the codes agree, the predicted one where the events do)
            base = torch.where(same_codes[:, None, None], frames["enc"], frames["pred"])
            true_event_frames = redecode(wm, ctx, base, ~same_codes & ~same_events, pred, true_events)
            acc["m_true_event"].add(colors[true_event_frames.long()], real, mask)
        acc["copy"].add(colors[ctx[:, -1].long()], real)
        acc["m_copy"].add(colors[ctx[:, -1].long()], real, mask)
    bar.close()
    plot_confusion(conf, out_dir / "action_to_latent_confusion.png", cfg.model)
    a2l.train()
    res = {"token_acc": tok_ok / (n * a2l.num_tokens), "latent_acc": whole_ok / n, "latent_frame_match": frame_ok / n,
           "psnr@1_predicted_latent": acc["pred"].psnr, "psnr@1_encoder_latent": acc["enc"].psnr,
           "copy_last_psnr@1": acc["copy"].psnr, "motion_psnr@1_predicted_latent": acc["m_pred"].psnr,
           "motion_psnr@1_encoder_latent": acc["m_enc"].psnr, "copy_last_motion_psnr@1": acc["m_copy"].psnr}
    # "no gap" can only be judged against chance: the gap with a paired bootstrap interval over held-out episodes.
    # Over the whole frame too: motion_psnr@1 counts only the pixels the real transition changes, so a change drawn
    # where none happens (digits that do not change) costs it nothing; a decision rule can trade that for a smaller
    # motion gap (README stage 5, session 42), which the whole-frame gap shows
    se = np.array(list(episode_se.values()))
    for metric, cols in (("motion_psnr@1", (0, 1)), ("psnr@1", (2, 3))):
        res[f"{metric}_gap"], res[f"{metric}_gap_low"], res[f"{metric}_gap_high"] = \
            wm_metrics.psnr_gap_interval(se[:, cols[0]], se[:, cols[1]])
    res["val_episodes"] = len(se)
    if per_episode is not None:
        stems = [val.w.files[e].stem for e in episode_se]
        per_episode.update(motion={n: v[:2].tolist() for n, v in zip(stems, episode_se.values())},
                           frame={n: v[2:].tolist() for n, v in zip(stems, episode_se.values())})
    if a2l.num_events:   # the codes' share of the gap, apart from the event's (its place: README stage 5)
        res["motion_psnr@1_predicted_latent_true_event"] = acc["m_true_event"].psnr
    if a2l.num_events and events_seen[0]:
        res.update(event_recall=events_seen[1] / events_seen[0], event_place_acc=events_seen[2] / events_seen[0],
                   event_false_alarm=events_seen[3] / max(1, n - events_seen[0]), val_events=int(events_seen[0]))
    if ball_n:
        res["event_ball_acc"] = ball_ok / ball_n
    for a, name in enumerate(names):
        if per_action[a, 1]:
            res[f"latent_acc_{name}"] = per_action[a, 0] / per_action[a, 1]
    return res


def redecode(wm, ctx, frames, rows, codes, events) -> torch.Tensor:
    """`frames` with the decoder's next frame from (codes, events) in place of the masked `rows`."""
    if not rows.any():
        return frames
    out = frames.clone()
    out[rows] = wm.predict_next(ctx[rows], codes[rows], None if events is None else events[rows])
    return out


class CachedBatches:
    """--history_only's and --event_mlp_only's batches: shuffled rows of the frozen inputs' tensors (a dict of
    equally long tensors), one pass per iteration. With `dial` (the model, its key windows, its dial starts,
    --dial_noise), that fraction of each batch's rows gets its dial inputs (the last columns of the history head's
    "input") turned again from a random start; with `focus` (a row mask, --event_focus), that fraction of each batch
    is drawn again from the masked rows, as the frame-reading training's sampler does."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int, dial: tuple | None = None,
                 focus: tuple[torch.Tensor, float] | None = None):
        self.rows, self.batch_size, self.dial = rows, batch_size, dial
        self.focus = (focus[0].nonzero()[:, 0], focus[1]) if focus is not None and focus[0].any() and focus[1] else None
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(next(iter(self.rows.values()))), generator=self.generator)
        for b in range(0, len(order) - self.batch_size + 1, self.batch_size):
            i = order[b:b + self.batch_size]
            if self.focus is not None:
                rows, fraction = self.focus
                n = round(fraction * self.batch_size)
                i = torch.cat([i[n:], rows[torch.randint(len(rows), (n,), generator=self.generator)]])
            batch = {k: v[i] for k, v in self.rows.items()}
            if self.dial is not None:
                a2l, keys, starts, noise = self.dial
                start = noisy_dial(starts[i], noise, a2l.dial_span, self.generator)
                batch["input"] = torch.cat([batch["input"][:, :-a2l.dial_columns],
                                            a2l.dial_features(keys[i], start)], 1)
            yield batch


def noisy_dial(dial: torch.Tensor, fraction: float, span: float, generator=None) -> torch.Tensor:
    """--dial_noise: `fraction` of the dials (B,) replaced by a uniform draw over the dial's range."""
    moved = torch.rand(dial.shape, generator=generator) < fraction
    return torch.where(moved, torch.rand(dial.shape, generator=generator) * span, dial.cpu()).to(dial.device)


def start_from(a2l: ActionToLatent, path: str, wm_meta: dict) -> None:
    """Load --init_from's weights into `a2l`: every tensor of the code trunk must fit; event-head tensors
    that do not (a new event head) start fresh."""
    start = load_action_to_latent(path, wm_meta)[0]   # the same game and latent shape, or a clear error
    if start.history_head is not None and a2l.history_head is None:   # its codes would silently lose it
        raise UserError(f"--init_from {path} has a history head: give --history_keys {start.history_keys} "
                        f"--history_width {start.hparams['history_width']} to keep it")
    tensors, own = start.state_dict(), a2l.state_dict()
    fits = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    for head in ("history_", "event_out."):   # a head with other inputs starts new as a whole, not half loaded
        if any(k.startswith(head) and k not in fits for k in own):
            fits = {k: v for k, v in fits.items() if not k.startswith(head)}
    missing = [k for k in own if k not in fits and not k.startswith(("event_", "history_"))]
    if missing:
        raise UserError(f"--init_from {path} does not fit this model's code trunk ({missing[0]}, ...): "
                        "give the same --width, --depth, --past_actions, --context")
    a2l.load_state_dict(fits, strict=False)
    print(f"started from {path}: {len(fits)} tensors, {len(own) - len(fits)} new (event or history head)")


def train_only(a2l: ActionToLatent, prefix: str | tuple[str, ...]) -> None:
    """--events_only / --history_only / --event_mlp_only: freeze all but that head (part). The event head's fixed colour codes
    (FrameEmbed) stay fixed: their backward over 8 frames a window cost 1.5 s a step (session 16's head-only
    runs paid it)."""
    for name, p in a2l.named_parameters():
        p.requires_grad_(p.requires_grad and name.startswith(prefix))


def frozen_steps(a2l: ActionToLatent, windows: PairWindows, device, batch: int = 256):
    """Every transition of `windows`, a batch of one episode's steps at a time, read by the frozen model as
    forward_events does (gd.history's frames, gd.past_actions' keys): yields (episode index, episode, steps t,
    actions, keys before them, the trunk's features, the event head's readings of its frames)."""
    w = windows.w
    for e in tqdm(range(len(w.files)), desc="frozen features", unit="episode", dynamic_ncols=True):
        ep = w.episode(e)
        frames, T = torch.from_numpy(ep["frames"]).to(device), len(ep["actions"])
        summaries = torch.cat([a2l.frame_summaries(frames[None, s:s + batch]) for s in range(0, T, batch)], 1)[0]
        for s in range(0, T, batch):
            t = np.arange(s, min(T, s + batch))
            act = torch.from_numpy(ep["actions"][t].astype(np.int64)).to(device)
            past = torch.from_numpy(gd.past_actions(ep["actions"], t, a2l.keys_seen)).to(device)
            f = a2l.features(act, gd.history(frames, t, a2l.context), past)
            yield e, ep, t, act, past, f, gd.history(summaries, t, a2l.event_context)


class FrozenRows:
    """Tensors with one row per transition, filled a batch at a time: each is allocated whole at its first
    batch (its length known up front), so caching never holds a second copy (a list, then its torch.cat: twice
    the memory, 14.6 GB for the history head's rows of 4,866 episodes in session 39)."""

    def __init__(self, n: int):
        self.n, self.rows, self.at = n, {}, {}

    def put(self, name: str, values: torch.Tensor) -> None:
        if name not in self.rows:
            self.rows[name], self.at[name] = torch.empty((self.n, *values.shape[1:]), dtype=values.dtype), 0
        a = self.at[name]
        self.rows[name][a:a + len(values)] = values.cpu()
        self.at[name] = a + len(values)


@torch.no_grad()
def frozen_inputs(a2l: ActionToLatent, windows: PairWindows, device, history: bool = True, events: tuple | None = None
                  ) -> dict[str, torch.Tensor]:
    """--history_only and/or --event_mlp_only: for every transition of `windows`, what the frozen parts give the
    head(s) being trained, computed once, in one pass over the frames for both: everything but the head is frozen,
    so a step of its training is then a small MLP's instead of two frame encoders'. With `history`: "input" (the
    history head's input), "base" (the frozen trunk's code logits), "codes" (the encoder's), and for a model with a
    dial its "keys" windows and dial "starts" (--dial_noise turns them again). With `events` = (world model,
    palette, FIRE's index): "event_input" (the event MLP's), "events" (the real ones) and "fire" (FIRE with no ball
    on screen: --event_focus's rows). (test_history_only_training_inputs_..., test_event_mlp_only_training_inputs_...)"""
    a2l.eval()
    rows = FrozenRows(len(windows))
    for e, ep, t, act, past, f, window in frozen_steps(a2l, windows, device):
        if history:
            dials = torch.from_numpy(gd.dial_before(ep["dials"], t, a2l.keys_seen)).to(device) if a2l.dial_span else None
            rows.put("input", a2l.history_input(f, window, act, past, dials))
            rows.put("base", a2l.out(f))
            rows.put("codes", torch.as_tensor(windows.pairs[windows.w.files[e].stem]["codes"][t]).long())
            if dials is not None:
                rows.put("keys", a2l.key_window(act, past))
                rows.put("starts", dials)
        if events is not None:
            wm, palette, fire = events
            phase = torch.full((len(t),), ep["frame_phase"], device=device) if a2l.frame_phases else None
            rows.put("event_input", a2l.event_input(f, window, phase))
            frames = torch.from_numpy(ep["frames"])
            rows.put("events", wm.transition_events(palette, frames[t].to(device), frames[t + 1].to(device)))
            rows.put("fire", (act.cpu() == fire) & ~wm_metrics.ball_visible(frames[t], palette.colors))
    a2l.train()
    return rows.rows


class JointBatches:
    """--history_only with --event_mlp_only: each head's batches from its own CachedBatches, side by side. The heads
    share no weights and each loader keeps its own generator, so one run trains both exactly as two runs would."""

    def __init__(self, *loaders: CachedBatches):
        self.loaders = loaders

    def __iter__(self):
        for batches in zip(*self.loaders):
            yield {k: v for b in batches for k, v in b.items()}


def plot_confusion(conf: np.ndarray, path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("predicted code")
    ax.set_ylabel("encoder's code")
    ax.set_title(f"action→latent {model}: held-out confusion")
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            if conf[i, j]:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if norm[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate_saved(cfg: Config, out_dir: Path, wm, palette, wm_meta: dict, pairs: dict, val_files, device, names) -> None:
    """--eval_only: the held-out validation of the saved weights with today's world model; writes
    <out_dir>/action_to_latent_eval_only.json and leaves the training's metrics and weights alone."""
    a2l, meta = load_action_to_latent(out_dir / "action_to_latent.safetensors", wm_meta, device)
    cfg = dataclasses.replace(cfg, model=a2l.version)
    val = PairWindows(gd.GameplayWindows(val_files, max(a2l.frames_seen, wm.context), max(4, len(val_files)),
                                         palette.to_index, a2l.keys_seen, a2l.dial, a2l.frame_phases > 0), pairs)
    per_episode = {}
    result = validate(a2l, wm, palette, val, cfg, device, names, out_dir / "train" / "action_to_latent_eval_only",
                      per_episode)
    result.update(step=meta.get("step"), world_model_step=wm_meta.get("step"), device=str(device))
    save_json(out_dir / "action_to_latent_eval_only.json", {**result, "per_episode_motion_se": per_episode["motion"],
                                                             "per_episode_frame_se": per_episode["frame"]})
    print("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()))
    print(f"confusion matrix: {out_dir / 'train' / 'action_to_latent_eval_only' / 'action_to_latent_confusion.png'}")


def main(argv=None) -> None:
    cfg = parse_config(Config, argv, presets=PRESETS)
    atari_env.game_spec(cfg.game)
    data_dir = Path(cfg.data_dir or f"data/{cfg.game}")
    out_dir = Path(cfg.out_dir or f"checkpoints/{cfg.game}")
    wm_path = Path(cfg.world_model or f"checkpoints/{cfg.game}/world_model.safetensors")
    ckpt_path = out_dir / "train" / "action_to_latent.pt"
    state = None
    if cfg.resume:   # continue as configured: what this command does not set comes from the checkpoint
        state = load_checkpoint(ckpt_path, "action_to_latent_train")
        for name in ("context", "event_context", "event_depth", "event_focus", "history_keys"):   # runs from before these options
            state["config"].setdefault(name, 0)
        state["config"].setdefault("paddle_dial", False)
        state["config"].setdefault("dial_noise", 0.0)
        state["config"].setdefault("frame_phase", False)
        state["config"].setdefault("dial_levels", False)
        state["config"].setdefault("history_context", 0)
        state["config"].setdefault("event_mlp_only", False)
        state["config"].setdefault("history_width", 256)
        state["config"].setdefault("event_ball_weight", 0.0)
        state["config"].setdefault("event_ball_pos_weight", 100.0)
        cfg = restore_config(cfg, state["config"], fixed=("game", "model", "context", "event_context", "event_width", "event_depth",
                                                                 "width", "depth", "past_actions", "positional",
                                                                 "history_keys", "history_width", "paddle_dial",
                                                                 "frame_phase", "history_context", "dial_levels"))
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    wm, palette, wm_meta = load_world_model(wm_path, cfg.game, device)
    for p in wm.parameters():
        p.requires_grad_(False)
    names = atari_env.action_names(cfg.game)
    train_files = gd.split_episodes(data_dir, "train", cfg.val_percent)
    val_files = gd.split_episodes(data_dir, "val", cfg.val_percent)
    if cfg.eval_only:
        return validate_saved(cfg, out_dir, wm, palette, wm_meta, load_pairs(data_dir, val_files, wm_path), val_files,
                              device, names)
    pairs = load_pairs(data_dir, train_files + val_files, wm_path)
    a2l_context = (cfg.context or wm.context) if cfg.model == "v2" else wm.context
    if a2l_context < 1 or cfg.event_context < 0:
        raise UserError(f"--context must be >= 1 (or 0 for the world model's) and --event_context >= 0, "
                        f"got {cfg.context} and {cfg.event_context}")
    if not 0 <= cfg.dial_noise <= 1:
        raise UserError(f"--dial_noise is a fraction in [0, 1], got {cfg.dial_noise}")
    if not 0 <= cfg.event_focus < 1 or cfg.event_ball_weight < 0 or cfg.event_ball_pos_weight <= 0:
        raise UserError(f"--event_focus must be in [0, 1), --event_ball_weight >= 0 and --event_ball_pos_weight > 0, "
                        f"got {cfg.event_focus}, {cfg.event_ball_weight} and {cfg.event_ball_pos_weight}")
    past_actions = cfg.past_actions if cfg.model == "v2" else 0
    if cfg.history_keys < 0 or (cfg.history_keys and not (cfg.model == "v2" and cfg.event_context and wm.num_events)):
        raise UserError(f"--history_keys {cfg.history_keys}: the history head reads the event head's frames, so it needs "
                        "--model v2, --event_context > 0 and a world model with events")
    if cfg.history_only and (cfg.events_only or not (cfg.init_from and cfg.history_keys)):
        raise UserError("--history_only trains the history head (--history_keys > 0) of an --init_from model, "
                        "without --events_only")
    if cfg.event_mlp_only and (cfg.events_only or not (cfg.init_from and cfg.event_context)):
        raise UserError("--event_mlp_only trains the event MLP (--event_context > 0) of an --init_from model, "
                        "without --events_only (with --history_only: both heads, from one pass over the frames)")
    if cfg.history_context < 0:
        raise UserError(f"--history_context must be >= 0, got {cfg.history_context}")
    a2l = ActionToLatent(cfg.model, len(names), len(palette), a2l_context, wm.num_tokens, wm.codebook_size, cfg.width,
                         cfg.depth, past_actions=past_actions, positional=cfg.positional and cfg.model == "v2",
                         num_events=wm.num_events, event_context=cfg.event_context, event_width=cfg.event_width,
                         event_depth=cfg.event_depth, history_keys=cfg.history_keys,
                         history_width=cfg.history_width,
                         dial=atari_env.paddle_dial(cfg.game) if cfg.paddle_dial else None,
                         frame_phases=atari_env.FRAMESKIP if cfg.frame_phase else 0,
                         history_context=cfg.history_context, dial_levels=cfg.dial_levels).to(device)
    if cfg.init_from and state is None:
        start_from(a2l, cfg.init_from, wm_meta)
    if cfg.events_only:
        if not (cfg.init_from and a2l.num_events):
            raise UserError("--events_only trains the event head of an --init_from model, for a world model with events")
        train_only(a2l, "event_")
    if cfg.history_only or cfg.event_mlp_only:
        train_only(a2l, ("history_",) * cfg.history_only + ("event_out",) * cfg.event_mlp_only)
    k = max(a2l.frames_seen, wm.context)   # the windows' history: each model reads its last frames of it
    n_keys = a2l.keys_seen
    phases = a2l.frame_phases > 0
    train = PairWindows(gd.GameplayWindows(train_files, k, cfg.cache_episodes, palette.to_index, n_keys, a2l.dial,
                                           phases), pairs)
    val = PairWindows(gd.GameplayWindows(val_files, k, max(4, len(val_files)), palette.to_index, n_keys, a2l.dial,
                                         phases), pairs)
    opt = torch.optim.AdamW([p for p in a2l.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps)))))
    step, last_val = 0, {}
    if state is not None:
        if state["world_model"] != wm_meta.get("step") or state["num_tokens"] != wm.num_tokens:
            raise UserError(f"{ckpt_path} was trained for another world model; start without --resume")
        a2l.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, last_val = state["step"], json.loads(state["last_val"])
        print(f"resumed at step {step}")
    fire = names.index("FIRE") if "FIRE" in names else -1

    def fire_without_ball(ep: dict) -> np.ndarray:   # transitions t where FIRE may serve: FIRE, no ball at t
        frames = torch.from_numpy(ep["frames"][:-1])
        return (ep["actions"] == fire) & ~wm_metrics.ball_visible(frames, palette.colors).numpy()

    focus = fire_without_ball if cfg.event_focus and a2l.num_events else None
    if cfg.history_only or cfg.event_mlp_only:   # after --resume has loaded the frozen parts
        rows = frozen_inputs(a2l, train, device, history=cfg.history_only,
                             events=(wm, palette, fire) if cfg.event_mlp_only else None)
        loaders = []
        if cfg.history_only:
            dial = (a2l, rows["keys"], rows["starts"], cfg.dial_noise) if "keys" in rows and cfg.dial_noise else None
            loaders.append(CachedBatches({k: rows[k] for k in ("input", "base", "codes")}, cfg.batch_size, cfg.seed, dial))
        if cfg.event_mlp_only:
            loaders.append(CachedBatches({k: rows[k] for k in ("event_input", "events")}, cfg.batch_size, cfg.seed,
                                         focus=(rows["fire"], cfg.event_focus)))
        loader = JointBatches(*loaders) if len(loaders) > 1 else loaders[0]
    else:
        sampler = gd.EpisodeGroupSampler(train.w, group=max(1, cfg.cache_episodes // 2), seed=cfg.seed, focus=focus,
                                         focus_fraction=cfg.event_focus)
        loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=0)
    logger = MetricLogger(out_dir / "train" / "action_to_latent", f"neural-atari-action-to-latent-{cfg.game}",
                          dataclasses.asdict(cfg), mode=cfg.wandb, resume=cfg.resume)
    meta = {"kind": "action_to_latent", "game": cfg.game, "hparams": a2l.hparams, "temperature": cfg.temperature,
            "action_names": names, "config": dataclasses.asdict(cfg)}

    def checkpoint():
        save_checkpoint(ckpt_path, {"kind": "action_to_latent_train", "config": dataclasses.asdict(cfg),
                                    "model": a2l.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                    "step": step, "last_val": json.dumps(last_val), "world_model": wm_meta.get("step"),
                                    "num_tokens": wm.num_tokens})
        save_weights(out_dir / "action_to_latent.safetensors", a2l, {**meta, "step": step, "validation": last_val})

    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True)
    t0 = time.time()
    try:
        while step < cfg.steps:
            for items in loader:
                loss = 0
                logits = event_logits = ball_cells = None
                if cfg.history_only or cfg.event_mlp_only:
                    if cfg.history_only:   # the frozen trunk's logits + the history head's
                        codes = items["codes"].to(device)
                        logits = (items["base"].to(device) + a2l.history_head(items["input"].to(device))).view(
                            len(codes), wm.num_tokens, wm.codebook_size)
                    if cfg.event_mlp_only:   # the frozen model's inputs -> the event MLP's odds
                        event_logits = a2l.event_out(items["event_input"].to(device))
                        events = items["events"].to(device)
                else:
                    codes = items["codes"].to(device)
                    ctx, act = items["context"].to(device), items["action"].to(device)
                    dial = items["dial"].to(device) if "dial" in items else None
                    if dial is not None and cfg.dial_noise:
                        dial = noisy_dial(dial, cfg.dial_noise, a2l.dial_span)
                    phase = items["frame_phase"].to(device) if "frame_phase" in items else None
                    logits, event_logits, ball_cells = a2l.forward_events(act, ctx if cfg.model == "v2" else None,
                                                                          items["past_actions"].to(device), ball=True,
                                                                          dial=dial, phase=phase)
                    if event_logits is not None:   # the world model's events, read off the real frames
                        events = wm.transition_events(palette, ctx[:, -1], items["next"].to(device))
                if logits is not None and not cfg.events_only:
                    loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
                if event_logits is not None:
                    loss = loss + F.cross_entropy(event_logits, events)
                if ball_cells is not None and cfg.event_ball_weight:   # where the ball is in each frame the event head reads
                    seen = cells_any(wm_metrics.ball_pixels(last_frames(ctx, a2l.event_context), palette.colors))
                    loss = loss + cfg.event_ball_weight * F.binary_cross_entropy_with_logits(
                        ball_cells, seen, pos_weight=torch.tensor(cfg.event_ball_pos_weight, device=device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step % 25 == 0:
                    acc = ((logits.argmax(-1) == codes).all(1) if logits is not None
                           else event_logits.argmax(-1) == events).float().mean().item()
                    logger.log({"loss": loss.item(), "train_latent_acc" if logits is not None else "train_event_acc": acc}, step)
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
                if step % cfg.val_every == 0 or step == cfg.steps:
                    last_val = validate(a2l, wm, palette, val, cfg, device, names, out_dir / "train" / "action_to_latent")
                    last_val["train_minutes"] = round((time.time() - t0) / 60, 1)
                    logger.log(last_val, step)
                    tqdm.write(f"step {step}: latent_acc {last_val['latent_acc']:.3f}, token_acc {last_val['token_acc']:.3f}, "
                               f"same frame as the encoder's latent {last_val['latent_frame_match']:.3f}, "
                               f"motion_psnr@1 predicted {last_val['motion_psnr@1_predicted_latent']:.2f} / encoder "
                               f"{last_val['motion_psnr@1_encoder_latent']:.2f} / copy-last {last_val['copy_last_motion_psnr@1']:.2f}"
                               + (f" / predicted codes, real event {last_val['motion_psnr@1_predicted_latent_true_event']:.2f}"
                                  if a2l.num_events else "")
                               + f"; gap {last_val['motion_psnr@1_gap']:+.3f} dB, 95% [{last_val['motion_psnr@1_gap_low']:+.3f}, "
                               f"{last_val['motion_psnr@1_gap_high']:+.3f}] over {last_val['val_episodes']} episodes"
                               + (f"; serves: {last_val['event_recall']:.3f} foreseen, {last_val['event_place_acc']:.3f} at "
                                  f"the right place, false alarms {last_val['event_false_alarm']:.4f}" if "event_recall" in last_val else ""))
                    checkpoint()
                if step >= cfg.steps:
                    break
    except KeyboardInterrupt:
        tqdm.write("interrupted: saving a checkpoint; continue with --resume")
        checkpoint()
        raise
    finally:
        bar.close()
    save_json(out_dir / f"action_to_latent_{cfg.model}_metrics.json", {**last_val, "step": step, "config": dataclasses.asdict(cfg)})
    logger.finish()
    print(f"done: {out_dir / 'action_to_latent.safetensors'}")


if __name__ == "__main__":
    run_main(main)
