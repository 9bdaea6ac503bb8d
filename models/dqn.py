"""Stage 1 networks and memory: Nature-CNN Q-network, Double-DQN targets, a frame-deduplicated replay
(uniform or proportional prioritised), and RND intrinsic rewards."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

FRAME = 84
STACK = 4


class QNetwork(nn.Module):
    """Mnih et al. 2015 Nature CNN. Takes uint8 stacks; divides by 255 here and only here."""

    def __init__(self, num_actions: int, in_channels: int = STACK):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, num_actions))

    def forward(self, obs_u8: torch.Tensor) -> torch.Tensor:
        x = obs_u8.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x))


@torch.no_grad()
def double_dqn_targets(online: nn.Module, target: nn.Module, next_obs, rewards, dones, gamma_n: torch.Tensor | float):
    """r + γⁿ·(1-done)·Q_target(s', argmax_a Q_online(s', a)): online net picks, target net evaluates."""
    best = online(next_obs).argmax(dim=1, keepdim=True)
    q_next = target(next_obs).gather(1, best).squeeze(1)
    return rewards + gamma_n * (1.0 - dones) * q_next


# ----------------------------------------------------------------------------- replay
class SumTree:
    """Binary sum tree over `size` leaves for proportional sampling; batch ops are vectorised."""

    def __init__(self, size: int):
        self.size = size
        self.leaves = 1 << max(1, int(np.ceil(np.log2(size))))
        self.tree = np.zeros(2 * self.leaves, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        node = np.asarray(idx, dtype=np.int64) + self.leaves
        self.tree[node] = values
        node = np.unique(node // 2)
        while node[0] >= 1:
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]
            if node[0] == 1:
                break
            node = np.unique(node // 2)

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.tree[np.asarray(idx) + self.leaves]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf index whose cumulative-sum interval contains each mass value."""
        node = np.ones(len(mass), dtype=np.int64)
        mass = mass.astype(np.float64).copy()
        while node[0] < self.leaves:
            left = 2 * node
            go_right = mass >= self.tree[left]
            mass = np.where(go_right, mass - self.tree[left], mass)
            node = np.where(go_right, left + 1, left)
        return np.minimum(node - self.leaves, self.size - 1)


class FrameReplay:
    """Replay that stores each 84x84 frame once (not 4x in stacks) and rebuilds stacks when sampling.

    Layout: one column per parallel env, rows in time. Row r of column e holds the newest frame of the
    observation at that step, the action taken, the reward and the learning terminal. Stacks look back
    up to 3 rows and zero-pad before an episode's first row (as the env does), so frames never mix
    across episodes. 1M transitions take 84*84 + a few bytes each: ~7.1 GB.
    """

    BYTES_PER_TRANSITION = FRAME * FRAME + 1 + 4 + 1 + 1 + 1 + 8  # frame, action, reward, flags, priority

    def __init__(self, capacity: int, num_envs: int, n_step: int = 1, gamma: float = 0.99,
                 prioritized: bool = False, alpha: float = 0.6, eps: float = 1e-6):
        self.rows = max(capacity // num_envs, STACK + n_step + 2)
        self.num_envs, self.n_step, self.gamma = num_envs, n_step, gamma
        E, R = num_envs, self.rows
        self.frames = np.zeros((R, E, FRAME, FRAME), dtype=np.uint8)
        self.actions = np.zeros((R, E), dtype=np.int64)
        self.rewards = np.zeros((R, E), dtype=np.float32)
        self.dones = np.zeros((R, E), dtype=bool)       # learning terminal (game over or life lost)
        self.first = np.zeros((R, E), dtype=bool)       # row holds an episode's first frame
        self.startable = np.zeros((R, E), dtype=bool)   # a real transition starts here
        self.ptr, self.filled = 0, 0
        self.prioritized, self.alpha, self.eps = prioritized, alpha, eps
        self.tree = SumTree(R * E) if prioritized else None
        self.max_priority = 1.0

    @staticmethod
    def check_memory(capacity: int) -> None:
        """Refuse a buffer that would not fit in free memory, before allocating it."""
        need = capacity * FrameReplay.BYTES_PER_TRANSITION
        try:
            avail = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
        except (OSError, StopIteration):
            return  # not Linux: nothing to check against
        if need > 0.9 * avail:
            raise UserError(f"--buffer-size {capacity:,} needs {need / 2**30:.1f} GiB but only "
                            f"{avail / 2**30:.1f} GiB is free; pass a smaller --buffer-size")

    def __len__(self) -> int:
        return int(self.startable.sum())

    def add(self, newest_frames: np.ndarray, actions, rewards, dones, first, startable) -> None:
        """Append one vector step: the newest frame of each env's current observation and what followed."""
        r = self.ptr
        self.frames[r], self.actions[r], self.rewards[r] = newest_frames, actions, rewards
        self.dones[r], self.first[r], self.startable[r] = dones, first, startable
        self.ptr = (r + 1) % self.rows
        self.filled = min(self.filled + 1, self.rows)
        if self.tree is not None:
            # A row becomes sampleable once its n-step successor rows exist; rows about to be
            # overwritten (their look-back or look-ahead breaks) become unsampleable.
            ready = (r - self.n_step) % self.rows
            flat = ready * self.num_envs + np.arange(self.num_envs)
            ok = self._sampleable_rows(np.full(self.num_envs, ready))
            self.tree.set(flat, np.where(ok, self.max_priority ** self.alpha, 0.0))
            stale = np.array([(self.ptr + k) % self.rows for k in range(STACK)])
            flat = (stale[:, None] * self.num_envs + np.arange(self.num_envs)).ravel()
            self.tree.set(flat, np.zeros(len(flat)))

    def _sampleable_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows whose n-step future is written and whose look-back frames are not overwritten."""
        age = (self.ptr - 1 - rows) % self.rows          # 0 = newest row
        oldest_ok = self.filled if self.filled < self.rows else self.rows - STACK   # after wrap-around
        return (age >= self.n_step) & (age < oldest_ok)

    def _stack(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        idx = (rows[:, None] + np.arange(-STACK + 1, 1)[None, :]) % self.rows   # (B, 4) oldest..newest
        keep = np.ones(idx.shape, dtype=bool)
        for j in range(STACK - 2, -1, -1):   # walk back; stop at the episode's first frame
            keep[:, j] = keep[:, j + 1] & ~self.first[idx[:, j + 1], cols]
        out = self.frames[idx, cols[:, None]]
        out[~keep] = 0
        return out

    def _n_step(self, rows, cols):
        """n-step return, terminal flag and step count; stops early at a learning terminal, and at a
        time-limit cut (no terminal: bootstraps from the episode's last frame)."""
        ret = np.zeros(len(rows), dtype=np.float32)
        done = np.zeros(len(rows), dtype=bool)
        stopped = np.zeros(len(rows), dtype=bool)
        steps = np.zeros(len(rows), dtype=np.int64)
        for k in range(self.n_step):
            rk = (rows + k) % self.rows
            alive = ~stopped
            ret += alive * (self.gamma ** k) * np.clip(self.rewards[rk, cols], -1, 1)  # clipped for learning only
            steps += alive
            term = alive & self.dones[rk, cols]
            done |= term
            stopped |= term | (alive & ~self.startable[(rk + 1) % self.rows, cols])
        return ret, done, steps

    def sample(self, batch_size: int, rng: np.random.Generator, beta: float = 0.4):
        if self.tree is not None:
            total = self.tree.total
            if total <= 0:
                raise RuntimeError("replay has nothing to sample yet")
            mass = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)   # stratified
            flat = self.tree.find(mass)
            probs = self.tree.get(flat) / total
            n = int((self.tree.tree[self.tree.leaves:self.tree.leaves + self.tree.size] > 0).sum())
            weights = (n * probs) ** (-beta)
            weights = (weights / weights.max()).astype(np.float32)
        else:
            flat = np.empty(0, dtype=np.int64)
            while len(flat) < batch_size:   # rejection sampling over valid rows
                cand = rng.integers(0, self.filled * self.num_envs, size=2 * batch_size)
                r, c = cand // self.num_envs, cand % self.num_envs
                ok = self.startable[r, c] & self._sampleable_rows(r)
                flat = np.concatenate([flat, cand[ok]])
            flat = flat[:batch_size]
            weights = np.ones(batch_size, dtype=np.float32)
        rows, cols = flat // self.num_envs, flat % self.num_envs
        ret, done, steps = self._n_step(rows, cols)
        obs = self._stack(rows, cols)
        next_obs = self._stack((rows + steps) % self.rows, cols)
        return dict(obs=obs, actions=self.actions[rows, cols], returns=ret, dones=done.astype(np.float32),
                    gamma_n=(self.gamma ** steps).astype(np.float32), next_obs=next_obs, weights=weights,
                    index=flat)

    def update_priorities(self, index: np.ndarray, td_error: np.ndarray) -> None:
        if self.tree is None:
            return
        p = np.abs(td_error) + self.eps
        self.max_priority = max(self.max_priority, float(p.max()))
        rows, cols = index // self.num_envs, index % self.num_envs
        still = self.startable[rows, cols] & self._sampleable_rows(rows)
        self.tree.set(index, np.where(still, p ** self.alpha, 0.0))


# ----------------------------------------------------------------------------- RND
class RunningMeanStd:
    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta, tot = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / tot
        self.var = (self.var * self.count + b_var * b_count + delta ** 2 * self.count * b_count / tot) / tot
        self.count = tot


class RND(nn.Module):
    """Random Network Distillation (Burda et al. 2018): intrinsic reward = error of a trained predictor
    against a fixed random target on the newest frame, with observation and reward normalisation."""

    def __init__(self, out_dim: int = 256):
        super().__init__()

        def net(extra: bool):
            layers = [nn.Conv2d(1, 32, 8, 4), nn.LeakyReLU(), nn.Conv2d(32, 64, 4, 2), nn.LeakyReLU(),
                      nn.Conv2d(64, 64, 3, 1), nn.LeakyReLU(), nn.Flatten(), nn.Linear(3136, out_dim)]
            if extra:
                layers += [nn.ReLU(), nn.Linear(out_dim, out_dim)]
            return nn.Sequential(*layers)

        self.target, self.predictor = net(False), net(True)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.obs_rms = RunningMeanStd((1, FRAME, FRAME))
        self.rew_rms = RunningMeanStd(())

    def _norm(self, frames_u8: torch.Tensor) -> torch.Tensor:
        x = frames_u8[:, -1:].float()
        mean = torch.as_tensor(self.obs_rms.mean, dtype=torch.float32, device=x.device)
        std = torch.as_tensor(np.sqrt(self.obs_rms.var), dtype=torch.float32, device=x.device)
        return ((x - mean) / (std + 1e-8)).clamp(-5, 5)

    def prediction_error(self, obs_u8: torch.Tensor) -> torch.Tensor:
        x = self._norm(obs_u8)
        return (self.predictor(x) - self.target(x)).pow(2).mean(dim=1)

    def intrinsic_reward_and_loss(self, obs_u8: torch.Tensor):
        """Normalised intrinsic reward (no grad) and the predictor's loss on the same states."""
        self.obs_rms.update(obs_u8[:, -1:].float().cpu().numpy())
        err = self.prediction_error(obs_u8)
        raw = err.detach().cpu().numpy()
        self.rew_rms.update(raw)
        reward = torch.as_tensor(raw / np.sqrt(self.rew_rms.var + 1e-8), dtype=torch.float32, device=obs_u8.device)
        return reward, err.mean()

    def extra_state(self) -> dict:
        return {"obs_mean": torch.as_tensor(self.obs_rms.mean), "obs_var": torch.as_tensor(self.obs_rms.var),
                "obs_count": float(self.obs_rms.count), "rew_mean": float(self.rew_rms.mean),
                "rew_var": float(self.rew_rms.var), "rew_count": float(self.rew_rms.count)}

    def load_extra_state(self, s: dict) -> None:
        self.obs_rms.mean, self.obs_rms.var = s["obs_mean"].numpy(), s["obs_var"].numpy()
        self.obs_rms.count = s["obs_count"]
        self.rew_rms.mean, self.rew_rms.var, self.rew_rms.count = s["rew_mean"], s["rew_var"], s["rew_count"]


def select_actions(q_values: torch.Tensor, mode: str, epsilon: float, temperature: float,
                   rng: np.random.Generator) -> np.ndarray:
    """ε-greedy (also used for rnd, whose exploration comes from the bonus) or Boltzmann over Q/τ."""
    q = q_values.detach().cpu()
    if mode == "boltzmann":
        probs = torch.softmax(q / max(temperature, 1e-6), dim=1).numpy().astype(np.float64)
        probs /= probs.sum(1, keepdims=True)
        u = rng.random((len(probs), 1))
        return np.minimum((probs.cumsum(1) < u).sum(1), q.shape[1] - 1)
    greedy = q.argmax(1).numpy()
    explore = rng.random(len(greedy)) < epsilon
    return np.where(explore, rng.integers(0, q.shape[1], len(greedy)), greedy)


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    return end + (start - end) * max(0.0, 1.0 - t / max(1, duration))


def huber_td_loss(q_taken: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
    td = target - q_taken
    loss = (weights * F.smooth_l1_loss(q_taken, target, reduction="none")).mean()
    return loss, td.detach()
