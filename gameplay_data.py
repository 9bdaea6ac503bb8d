"""Recorded gameplay on disk: the episode file format, its writer, and the torch Dataset of windows.

One compressed .npz per episode (lossless; Breakout is ~1 KB per frame on disk):
    frames      (T+1, 210, 160, 3) uint8  raw RGB, frames[0] after reset, frames[t+1] after actions[t]
    actions     (T,) uint8                action index in the game's minimal action set
    rewards     (T,) float32              unclipped
    lives       (T+1,) uint8              lives shown in frames[t]
    terminated  ()  bool                  game over (False: cut by the time limit)
    meta        ()  str                   JSON: game, seed, policy, ...
"""
from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common import UserError, atomic_write

EPISODE_KEYS = ("frames", "actions", "rewards", "lives", "terminated", "meta")


def episode_path(root: str | Path, index: int) -> Path:
    return Path(root) / "episodes" / f"episode_{index:06d}.npz"


def save_episode(path: str | Path, frames, actions, rewards, lives, terminated: bool, meta: dict) -> None:
    """Atomic: a killed run never leaves a half-written episode behind."""
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[0] != len(actions) + 1:
        raise ValueError(f"need T+1 frames for T actions, got {frames.shape} and {len(actions)}")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, frames=frames, actions=np.asarray(actions, np.uint8),
                                rewards=np.asarray(rewards, np.float32), lives=np.asarray(lives, np.uint8),
                                terminated=np.bool_(terminated), meta=np.array(json.dumps(meta)))
    atomic_write(path, write)


def load_episode(path: str | Path, keys=EPISODE_KEYS) -> dict:
    """Load (some keys of) an episode; a damaged or foreign file is a clear error naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in EPISODE_KEYS if k not in z.files]
            if missing:
                raise UserError(f"{path} is not a Neural Atari episode (missing {', '.join(missing)})")
            ep = {k: z[k] for k in keys}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is damaged or not an episode file ({type(e).__name__}: {e})") from e
    if "meta" in ep:
        ep["meta"] = json.loads(str(ep["meta"]))
    if "frames" in ep and "actions" in ep:
        f, a = ep["frames"], ep["actions"]
        if f.ndim != 4 or f.shape[-1] != 3 or f.shape[0] != len(a) + 1:
            raise UserError(f"{path} is damaged: {f.shape[0]} frames for {len(a)} actions")
    return ep


def list_episodes(root: str | Path) -> list[Path]:
    files = sorted((Path(root) / "episodes").glob("episode_*.npz"))
    if not files:
        raise UserError(f"no recorded episodes under {Path(root) / 'episodes'}; run record_videos.py first")
    return files


def is_validation(path: str | Path, val_percent: float) -> bool:
    """Deterministic split by episode: a hash of the file name, stable as more episodes are added."""
    return (zlib.crc32(Path(path).stem.encode()) % 1000) < val_percent * 10


def split_episodes(root: str | Path, split: str, val_percent: float = 10.0) -> list[Path]:
    files = list_episodes(root)
    if split == "all":
        return files
    val = [f for f in files if is_validation(f, val_percent)]
    if not val and len(files) > 1:   # tiny datasets: always hold out at least one episode
        val = files[-1:]
    return val if split == "val" else [f for f in files if f not in val]


def history(frames, t, n: int):
    """Frames t-n+1..t, oldest first; before the episode's start its first frame is repeated. For an array of
    steps `t`, one such row of frames per step."""
    return frames[np.clip(np.asarray(t)[..., None] + np.arange(1 - n, 1), 0, None)]


def past_actions(actions: np.ndarray, t, n: int) -> np.ndarray:
    """(n,) int64: the n actions before step t, oldest first, NOOP (0) before the episode's start (for an
    array of steps, (len(t), n))."""
    lags = np.asarray(t)[..., None] + np.arange(-n, 0)
    return np.where(lags >= 0, actions[np.clip(lags, 0, None)], 0).astype(np.int64)


def turn_dial(dial, steps, span: float) -> list:
    """A paddle's dial (atari_env.paddle_dial) after each of n key presses: `dial` (B,) before the first,
    `steps` (B, n) each key's turn (+1, -1 or 0), clamped to [0, span]. Numpy arrays or torch tensors; one
    (B,) per press, oldest first."""
    out = []
    for j in range(steps.shape[1]):
        dial = (dial + steps[:, j]).clip(0, span)
        out.append(dial)
    return out


def paddle_dials(actions: np.ndarray, dial: tuple[list[int], float]) -> np.ndarray:
    """(T + 1,) float32: the dial before each step of an episode (index t: before actions[t]; T: after the last),
    from the middle, where the ALE sets it at reset. `dial`: atari_env.paddle_dial's (turn per action, span)."""
    turns, span = dial
    start = np.full(1, span / 2, np.float32)
    steps = np.asarray(turns, np.float32)[np.asarray(actions, np.int64)][None]
    return np.concatenate([start, *turn_dial(start, steps, span)]).astype(np.float32)


def dial_before(dials: np.ndarray, t, n: int) -> np.ndarray:
    """The dial before the oldest of the n keys gd.past_actions gives for step t (before the episode's start,
    where those keys are NOOP: the reset value); float32, one per step of an array `t`."""
    return dials[np.clip(np.asarray(t) - n, 0, None)].astype(np.float32)


def key_history(actions: np.ndarray, t, n: int, dial: tuple[list[int], float] | None = None):
    """What an action->latent model reads of the keys before step(s) t: (past_actions(actions, t, n), the
    paddle's dial before the oldest of them, float32, or None for a model without a dial: ActionToLatent.dial)."""
    return past_actions(actions, t, n), None if dial is None else dial_before(paddle_dials(actions, dial), t, n)


class GameplayWindows(Dataset):
    """Windows over recorded episodes: (k history frames, action, next frame).

    Item i -> dict(context=(k, 210, 160, 3) uint8 frames t-k+1..t, action=a_t, prev_action=a_{t-1} (NOOP = 0
    at the start), past_actions=(n,) a_{t-n}..a_{t-1} (NOOP before the start), next=(210, 160, 3) frame t+1,
    episode, t). Before an episode's start the first frame is repeated. Episodes are decoded lazily
    into a small LRU cache, so RAM holds `cache_episodes` episodes, not the dataset; pair it with
    EpisodeGroupSampler to decode each episode once per pass.
    """

    def __init__(self, files: list[Path], context: int = 2, cache_episodes: int = 16, frame_transform=None,
                 past_actions: int = 1, dial: tuple[list[int], float] | None = None, frame_phase: bool = False):
        """`frame_transform` maps an episode's (T+1, 210, 160, 3) frames once, when it is decoded
        (the world model stores palette indices: 3x less RAM, no per-batch conversion). With `dial`, items
        also hold the paddle's dial before their oldest key; with `frame_phase`, the episode's
        atari_env.recorded_frame_phase."""
        self.files, self.context, self.cache_episodes = list(files), context, cache_episodes
        self.frame_transform = frame_transform
        self.past_actions, self.dial, self.frame_phase = past_actions, dial, frame_phase
        self.index: list[tuple[int, int]] = []
        self.lengths = []
        for e, f in enumerate(self.files):
            n = len(load_episode(f, keys=("actions",))["actions"])
            self.lengths.append(n)
            self.index.extend((e, t) for t in range(n))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def episode(self, e: int) -> dict:
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        ep = load_episode(self.files[e], keys=("frames", "actions") + (("meta",) if self.frame_phase else ()))
        if self.frame_phase:
            import atari_env
            ep["frame_phase"] = atari_env.recorded_frame_phase(ep["meta"])
        if self.dial is not None:
            ep["dials"] = paddle_dials(ep["actions"], self.dial)
        if self.frame_transform is not None:
            ep["frames"] = self.frame_transform(ep["frames"])
        self._cache[e] = ep
        while len(self._cache) > self.cache_episodes:
            self._cache.popitem(last=False)
        return ep

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        ep = self.episode(e)
        ctx = history(ep["frames"], t, self.context)
        past = torch.from_numpy(past_actions(ep["actions"], t, self.past_actions))
        item = {"context": torch.from_numpy(np.ascontiguousarray(ctx)), "action": int(ep["actions"][t]),
                "prev_action": int(ep["actions"][t - 1]) if t > 0 else 0, "past_actions": past,
                "next": torch.from_numpy(np.ascontiguousarray(ep["frames"][t + 1])), "episode": e, "t": t}
        if self.dial is not None:
            item["dial"] = torch.tensor(float(dial_before(ep["dials"], t, self.past_actions)))
        if self.frame_phase:
            item["frame_phase"] = torch.tensor(ep["frame_phase"])
        return item


class EpisodeGroupSampler(Sampler):
    """Shuffles episodes, takes them `group` at a time, and shuffles the windows inside each group:
    near-uniform mixing while each episode is decoded once per pass (group <= the dataset's cache)."""

    def __init__(self, dataset: GameplayWindows, group: int = 8, seed: int = 0, focus=None, focus_fraction: float = 0.0):
        """With `focus` (decoded episode -> (T,) bool over its transitions) and `focus_fraction` f, about a
        fraction f of the windows are drawn again (with replacement) from the focused transitions of the
        same group: a rare case seen more often. The focus is chosen by the input (the frames and keys),
        not by the label, so what a model learns to predict given the input stays calibrated."""
        if not 0 <= focus_fraction < 1:
            raise ValueError(f"focus_fraction must be in [0, 1), got {focus_fraction}")
        self.ds, self.group, self.seed, self.epoch = dataset, group, seed, 0
        self.focus, self.focus_fraction = focus, focus_fraction if focus is not None else 0.0

    def __len__(self) -> int:   # about: the focused draws are rounded per group
        return round(len(self.ds) / (1 - self.focus_fraction))

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        starts = np.cumsum([0] + self.ds.lengths)
        order = rng.permutation(len(self.ds.files))
        for g in range(0, len(order), self.group):
            group = order[g:g + self.group]
            idx = np.concatenate([np.arange(starts[e], starts[e + 1]) for e in group])
            if self.focus_fraction:   # decodes the group now (into the dataset's cache, read from there next)
                hits = np.concatenate([starts[e] + np.flatnonzero(self.focus(self.ds.episode(e))) for e in group])
                if len(hits):
                    extra = round(len(idx) * self.focus_fraction / (1 - self.focus_fraction))
                    idx = np.concatenate([idx, rng.choice(hits, extra)])
            yield from rng.permutation(idx).tolist()


def read_manifest(root: str | Path) -> dict:
    p = Path(root) / "manifest.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is damaged ({e})") from e
