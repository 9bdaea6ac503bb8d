"""Every environment the project uses, built in one place.

* World-model view (GUIDE §1): raw RGB (210, 160, 3) uint8 of ALE/<Game>-v5, frameskip 4, no sticky
  actions, minimal action set. This is what gets recorded and what the neural env imitates.
* Agent view: standard DQN preprocessing (noop starts, max-pool of the last two raw frames, 84x84 grey,
  stack 4, FIRE after reset). For training: ale-py's C++ vector env (`make_agent_vector_env`); for
  recording: gymnasium's AtariPreprocessing on a frameskip-1 env (`make_agent_env`), whose last raw
  screen is exactly the world-model frame. Life loss as a learning terminal, FIRE after a lost life and
  reward clipping are done by the caller (`LifeTracker`), so the true score and length stay visible.
* Neural view: the trained world model as a gymnasium env (`make_neural_env`, see models/neural_env.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import ale_py
import gymnasium as gym
import numpy as np

from common import UserError

gym.register_envs(ale_py)


@dataclass(frozen=True)
class GameSpec:
    name: str      # short name used on the command line and in paths
    env_id: str    # gymnasium id of the world-model view
    rom: str       # ale-py ROM name (vector env)
    paddle: bool = False   # played with a paddle controller's dial (paddle_dial), measured for Breakout only


GAMES = {
    "breakout": GameSpec("breakout", "ALE/Breakout-v5", "breakout", paddle=True),
    "pong": GameSpec("pong", "ALE/Pong-v5", "pong"),
    "enduro": GameSpec("enduro", "ALE/Enduro-v5", "enduro"),
    "mspacman": GameSpec("mspacman", "ALE/MsPacman-v5", "ms_pacman"),
}
FRAME_SHAPE = (210, 160, 3)
FRAMESKIP = 4
MAX_EPISODE_FRAMES = 108_000          # the ALE's real per-game limit (30 minutes of play)
MAX_EPISODE_STEPS = MAX_EPISODE_FRAMES // FRAMESKIP
# A paddle is a dial. The ALE turns it by PADDLE_DELTA = 23,000 a frame while LEFT or RIGHT is held, clamped
# to [27,450, 790,196], and sets it to the middle at reset; the game draws the paddle from the dial, clamped at
# the walls. So the dial winds up past a wall, out of sight, and the paddle leaves the wall only after as many
# presses the other way (Breakout: up to 3). Its range in key presses at frameskip 4: 8.29.
PADDLE_DIAL_SPAN = (790_196 - 27_450) / (23_000 * FRAMESKIP)


def game_spec(game: str) -> GameSpec:
    if game not in GAMES:
        raise UserError(f"unknown game {game!r}; valid games: {', '.join(GAMES)}")
    return GAMES[game]


def make_world_model_env(game: str = "breakout", render_mode: str | None = None) -> gym.Env:
    """The raw RGB environment the world model learns and is compared against (GUIDE §1)."""
    return gym.make(game_spec(game).env_id, frameskip=FRAMESKIP, repeat_action_probability=0.0,
                    render_mode=render_mode)


def noop_start(env: gym.Env, raw_frames: int) -> None:
    """Random no-op start in raw emulator frames on a world-model-view env (its frameskip bypassed), as
    the agent view's noop_max does; record_videos.py stores the count so the game can be replayed."""
    for _ in range(raw_frames):
        env.unwrapped.ale.act(0)


_agent_envs: dict = {}          # (game, noop_max) -> an agent env kept for replaying no-op starts
_dqn_start_frames: dict = {}    # (game, noop_max, seed) -> the frame count after that env's seeded reset


def recorded_frame_phase(meta: dict) -> int:
    """The emulator's frame count at a recording's first frame, modulo FRAMESKIP: which of a step's raw frames
    the game's frame counter starts on. Breakout serves at one of four places picked by the counter's last two
    bits (RAM byte 90 counts frames) on the frame the ball is launched, so the no-op start decides where the
    game serves (README stage 5, session 36). New recordings store the count ("start_frame"), random play's
    older ones their no-op count; the DQN's older ones are replayed: its env's no-op start follows the seed."""
    if "start_frame" in meta:
        return int(meta["start_frame"]) % FRAMESKIP
    if "noop_frames" in meta:
        return int(meta["noop_frames"]) % FRAMESKIP
    game, noop_max, seed = meta["game"], meta["env"]["noop_max"], meta["seed"]
    if (game, noop_max, seed) not in _dqn_start_frames:   # a reset is ~0.1 s: once per episode and process
        if (game, noop_max) not in _agent_envs:
            _agent_envs[game, noop_max] = make_agent_env(game, noop_max)
        env = _agent_envs[game, noop_max]
        env.reset(seed=seed)
        _dqn_start_frames[game, noop_max, seed] = env.unwrapped.ale.getEpisodeFrameNumber()
    return _dqn_start_frames[game, noop_max, seed] % FRAMESKIP


def action_names(game: str = "breakout") -> list[str]:
    env = make_world_model_env(game)
    names = env.unwrapped.get_action_meanings()
    env.close()
    return names


def paddle_dial(game: str) -> tuple[list[int], float] | None:
    """How each action turns the paddle's dial (+1 a press for RIGHT, -1 for LEFT, 0 otherwise) and the dial's
    range in presses, for games played with a paddle; None for the others. gameplay_data.paddle_dials
    follows the dial through an episode (tests/test_envs.py checks it against the emulator)."""
    if not game_spec(game).paddle:
        return None
    return [1 if "RIGHT" in n else -1 if "LEFT" in n else 0 for n in action_names(game)], PADDLE_DIAL_SPAN


def make_agent_env(game: str = "breakout", noop_max: int = 30) -> gym.Env:
    """Single agent-view env: (4, 84, 84) uint8 stacks. `env.unwrapped.ale.getScreenRGB()` after a step
    is exactly the frame the world-model view returns for the same actions (both frameskip 4, no sticky
    actions), which is how record_videos.py records raw RGB while the DQN sees its own view."""
    env = gym.make(game_spec(game).env_id, frameskip=1, repeat_action_probability=0.0)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=FRAMESKIP, screen_size=84,
                                          terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
    # Zero padding at episode start, as ale-py's vector env does, so the agent sees the same stacks.
    return gym.wrappers.FrameStackObservation(env, 4, padding_type="zero")


def make_agent_vector_env(game: str = "breakout", num_envs: int = 8, num_threads: int = 0,
                          noop_max: int = 30):
    """ale-py's C++ vector env with DQN preprocessing; true (unclipped) rewards, whole-game episodes."""
    from ale_py.vector_env import AtariVectorEnv
    return AtariVectorEnv(game_spec(game).rom, num_envs, num_threads=num_threads, noop_max=noop_max,
                          reward_clipping=False, episodic_life=False, use_fire_reset=True,
                          repeat_action_probability=0.0, max_num_frames_per_episode=MAX_EPISODE_FRAMES)


class LifeTracker:
    """Per-env bookkeeping the DQN needs beside the env: life loss (a terminal for learning only) and
    FIRE after a lost life (Breakout idles forever without it), plus true whole-game score and length."""

    def __init__(self, num_envs: int, fire_action: int | None):
        self.fire_action = fire_action
        self.lives = np.full(num_envs, -1, dtype=np.int64)
        self.fire_pending = np.zeros(num_envs, dtype=bool)
        self.score = np.zeros(num_envs, dtype=np.float64)
        self.length = np.zeros(num_envs, dtype=np.int64)

    def override(self, actions: np.ndarray) -> np.ndarray:
        """Replace the action with FIRE where a life was just lost."""
        if self.fire_action is not None and self.fire_pending.any():
            actions = actions.copy()
            actions[self.fire_pending] = self.fire_action
        return actions

    def update(self, lives: np.ndarray, rewards: np.ndarray, ended: np.ndarray, counted: np.ndarray | None = None):
        """After a step: returns (life_lost mask, list of (env, score, length) for finished games).
        `counted` is False for the vector env's reset steps (their action is ignored by the env)."""
        lives = np.asarray(lives)
        life_lost = (self.lives >= 0) & (lives < self.lives) & ~ended
        self.fire_pending = life_lost.copy()
        self.lives = np.where(ended, -1, lives)
        self.score += rewards
        self.length += 1 if counted is None else counted
        finished = [(int(i), float(self.score[i]), int(self.length[i])) for i in np.flatnonzero(ended)]
        self.score[ended] = 0
        self.length[ended] = 0
        return life_lost, finished


def fire_action_of(game: str) -> int | None:
    names = action_names(game)
    return names.index("FIRE") if "FIRE" in names else None


class RealTwin:
    """The real emulator (world-model view) kept in step with the dream: shared start states for play
    --side-by-side, the random game's --compare and tests. A start is reset, FIRE, then three NOOPs, so the
    ball is served and in play; the last k frames (at most those five) are the dream's context."""

    def __init__(self, game: str, k: int):
        self.env, self.k = make_world_model_env(game), k
        self.fire = fire_action_of(game) or 0

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=seed)
        frames = [obs]
        for t in range(4):
            obs, *_ = self.env.step(self.fire if t == 0 else 0)
            frames.append(obs)
        self.frame, self.steps, self.ended_at = obs, 0, None
        return np.stack(frames[-self.k:])

    def step(self, action: int) -> np.ndarray:
        """The next real frame; once the game is over (`ended_at`, its step) the emulator holds its last one."""
        self.frame, _, terminated, truncated, _ = self.env.step(action)
        self.steps += 1
        if (terminated or truncated) and self.ended_at is None:
            self.ended_at = self.steps
        return self.frame


def make_neural_env(game: str = "breakout", checkpoint_dir: str | None = None, device: str = "auto", **kw):
    """The trained world model as a gymnasium.Env (see models/neural_env.py)."""
    from models.neural_env import NeuralAtariEnv
    return NeuralAtariEnv(game=game, checkpoint_dir=checkpoint_dir, device=device, **kw)


def _register_neural_envs() -> None:
    for spec in GAMES.values():
        env_id = f"NeuralAtari/{spec.env_id.split('/')[1].replace('-v5', '')}-v0"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="models.neural_env:NeuralAtariEnv",
                         kwargs={"game": spec.name}, max_episode_steps=None)


_register_neural_envs()


def agent_view_of(frames_rgb: list[np.ndarray]) -> np.ndarray:
    """(4, 84, 84) uint8 stack of the last 4 RGB frames, for running the DQN on frames that do not come
    from the emulator (the dream). Missing history is zero-padded, as the vector env does."""
    import cv2
    grey = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (84, 84), interpolation=cv2.INTER_AREA)
            for f in frames_rgb[-4:]]
    while len(grey) < 4:
        grey.insert(0, np.zeros((84, 84), np.uint8))
    return np.stack(grey)
