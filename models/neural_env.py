"""The world model as a gymnasium.Env: the one code path behind play, the random game and evaluation.

    env = atari_env.make_neural_env("breakout")                 # shipped weights in checkpoints/breakout
    obs, info = env.reset(seed=0)                                # real start frames shipped beside them
    obs, info = env.reset(options={"frames": frames_k_210_160_3})
    obs, info = env.reset(options={"frames": ..., **env.recorded_keys(actions, t, meta)})   # mid-recording: keys, dial, phase
    obs, reward, terminated, truncated, info = env.step(2)       # RIGHT

Each step: real action (+ the k context frames) -> action->latent model -> latent code (and, for a world
model with events, whether and where the ball is served) -> decoder ->
next frame as palette indices -> uint8 RGB. The indices are what is fed back, so what you see is
exactly what the model continues from. Rewards are not modelled (always 0); episodes never end on
their own (use max_episode_steps or gymnasium's TimeLimit).
"""
from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import gameplay_data as gd
from common import UserError, pick_device
from models.cached_decoder import CachedDecoder
from models.world_model import H, W, last_frames, load_action_to_latent, load_world_model

START_FRAMES = "start_frames.safetensors"


class NeuralAtariEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, game: str = "breakout", checkpoint_dir: str | Path | None = None, device: str = "auto",
                 temperature: float | None = None, max_episode_steps: int | None = None,
                 render_mode: str | None = "rgb_array", compile: bool = False, threads: int | None = None,
                 cached_decoder: bool | None = None):
        self.game = game
        ckpt = Path(checkpoint_dir or Path(__file__).resolve().parent.parent / "checkpoints" / game)
        self.device = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.world_model, self.palette, self.wm_meta = load_world_model(ckpt / "world_model.safetensors", game, self.device)
        self.a2l, self.a2l_meta = load_action_to_latent(ckpt / "action_to_latent.safetensors", self.wm_meta, self.device)
        self.temperature = self.a2l_meta.get("temperature", 0.0) if temperature is None else temperature
        self.action_names = self.a2l_meta["action_names"]
        # frames kept: the decoder reads the last world_model.context, stage 5 may read more
        self.context_length = max(self.world_model.context, self.a2l.frames_seen)
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (H, W, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(self.action_names))
        self._colors = torch.as_tensor(self.palette.colors, device=self.device)
        self._start_frames = self._load_start_frames(ckpt / START_FRAMES)
        self._ctx: torch.Tensor | None = None
        self._summaries: torch.Tensor | None = None
        self._steps = 0
        self._generator = torch.Generator(device="cpu")
        if compile and self.device.type == "cuda":
            self.world_model.decode_cells = torch.compile(self.world_model.decode_cells)
        # the decoder step recomputed only where the frames changed (models/cached_decoder.py): the same
        # frames, fewer FLOPs; the default on the CPU, where the step is compute-bound (None = that default)
        use_cache = self.device.type == "cpu" if cached_decoder is None else cached_decoder
        self.cached_decoder = CachedDecoder(self.world_model) if use_cache else None

    def _load_start_frames(self, path: Path) -> np.ndarray | None:
        if not path.exists():
            return None
        from safetensors.numpy import load_file
        return load_file(path)["frames"]          # (n_starts, k, 210, 160, 3) uint8

    # --------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._generator.manual_seed(seed)
        frames = (options or {}).get("frames")
        if frames is None:
            if self._start_frames is None:
                raise UserError(f"no {START_FRAMES} beside the weights: pass options={{'frames': ...}}")
            frames = self._start_frames[self.np_random.integers(len(self._start_frames))]
        frames = np.asarray(frames)
        k, n = self.world_model.context, self.context_length
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (H, W, 3) or len(frames) < k:
            raise UserError(f"reset frames must be uint8 of shape (n, {H}, {W}, 3), n >= {k} (most recent last; "
                            f"up to {n} are used), got {frames.dtype} {frames.shape}")
        frames = gd.history(frames, len(frames) - 1, n)   # a shorter history starts as recorded episodes do
        self._ctx = torch.from_numpy(self.palette.to_index(frames))[None].to(self.device)
        self._summaries = None   # the event head's reading of each frame, kept so a step encodes only the new one
        if self.a2l.event_context:
            with torch.inference_mode():
                self._summaries = self.a2l.frame_summaries(last_frames(self._ctx, self.a2l.event_context))
        # the actions that led to the last frame, oldest first (a press moves the paddle over two steps):
        # options "past_actions" (a list) or "prev_action" (one int); NOOP before them
        opts = options or {}
        past = opts.get("past_actions", [opts.get("prev_action", 0)])
        self._past = self.a2l.pad_history(torch.zeros(1, dtype=torch.long),
                                          torch.tensor([[int(a) for a in past]]).view(1, -1)).to(self.device)
        # a paddle's dial before the oldest of those keys (gameplay_data.dial_before), followed from then on:
        # options "paddle_dial"; the ALE's reset value (the middle) by default, right for a game's start
        self._dial = None
        if self.a2l.dial_span:
            dial = opts.get("paddle_dial")
            self._dial = torch.tensor([self.a2l.dial_span / 2 if dial is None else float(dial)], device=self.device)
        # where the emulator's frame counter started (atari_env.recorded_frame_phase), which picks where Breakout
        # serves: options "frame_phase"; by default 0, that of the shipped start frames (RealTwin: no no-op start)
        self._phase = None
        if self.a2l.frame_phases:
            self._phase = torch.tensor([int(opts.get("frame_phase", 0)) % self.a2l.frame_phases], device=self.device)
        self._steps = 0
        return self._obs(), {"step": 0}

    def recorded_keys(self, actions: np.ndarray, t: int, meta: dict | None = None) -> dict:
        """reset() options for starting at step t of a recording with these actions (and `meta`): the keys before
        t that the action->latent model reads and, for a model that reads them, the paddle's dial before them
        and the recording's frame phase."""
        past, dial = gd.key_history(actions, t, self.a2l.keys_seen, self.a2l.dial)
        opts = {"past_actions": past.tolist(), "paddle_dial": None if dial is None else float(dial)}
        if self.a2l.frame_phases and meta is not None:
            import atari_env
            opts["frame_phase"] = atari_env.recorded_frame_phase(meta)
        return opts

    def step(self, action):
        if self._ctx is None:
            raise UserError("call reset() before step()")
        if not self.action_space.contains(action):
            try:
                action = int(action)
            except (TypeError, ValueError):
                action = -1
            if not self.action_space.contains(action):
                raise UserError(f"action must be an int in 0..{self.action_space.n - 1} "
                                f"({', '.join(self.action_names)}), got {action!r}")
        with torch.inference_mode():
            act = torch.tensor([int(action)], device=self.device)
            codes, event = self.a2l.sample_step(act, self._ctx, self.temperature, self._generator, self._past,
                                                summaries=self._summaries, dial=self._dial, phase=self._phase)
            if self._dial is not None:   # the oldest key leaves the window: the dial before the next oldest
                self._dial = gd.turn_dial(self._dial, self.a2l.dial_turns[self._past[:, :1]], self.a2l.dial_span)[0]
            self._past = torch.cat([self._past[:, 1:], act[:, None]], 1)
            self._push(self._predict(codes, event))
        self._steps += 1
        truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        return self._obs(), 0.0, False, truncated, {"step": self._steps, "latent": codes[0].tolist(),
                                                     "event": int(event[0]) if event is not None else 0}

    def step_latent(self, codes, event: int = 0) -> np.ndarray:
        """Advance with explicit latent codes and event (evaluation: random latents, teacher forcing)."""
        with torch.inference_mode():
            c = torch.as_tensor(codes, device=self.device).view(1, -1)
            self._push(self._predict(c, torch.tensor([int(event)], device=self.device)))
        self._steps += 1
        return self._obs()

    def _predict(self, codes: torch.Tensor, event: torch.Tensor | None) -> torch.Tensor:
        decoder = self.cached_decoder or self.world_model
        return decoder.predict_next(self._ctx, codes, event)

    def _push(self, nxt: torch.Tensor) -> None:
        """The new frame (1, 210, 160) becomes the last of the history (and of the event head's readings)."""
        self._ctx = torch.cat([self._ctx[:, 1:], nxt[:, None]], 1)
        if self._summaries is not None:
            self._summaries = torch.cat([self._summaries[:, 1:], self.a2l.frame_summaries(nxt[:, None])], 1)

    def render(self):
        return self._obs()

    def _obs(self) -> np.ndarray:
        return self._colors[self._ctx[0, -1].long()].cpu().numpy()


def save_start_frames(path: str | Path, frames: np.ndarray) -> None:
    """(n_starts, k, 210, 160, 3) uint8 real frames the env can start from without arguments."""
    from common import atomic_write

    from safetensors.numpy import save_file
    atomic_write(path, lambda tmp: save_file({"frames": np.ascontiguousarray(frames, np.uint8)}, str(tmp)))


def real_start_frames(game: str, k: int, n: int, seed: int = 0) -> np.ndarray:
    """n contexts of k real frames from game starts (see atari_env.RealTwin)."""
    import atari_env
    twin = atari_env.RealTwin(game, k)
    frames = np.stack([twin.reset(seed + i) for i in range(n)])
    twin.env.close()
    return frames
