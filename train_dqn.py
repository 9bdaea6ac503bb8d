"""Stage 1: a Double-DQN agent learns to play the real game.

    python train_dqn.py --game breakout --total-steps 2000000
    python train_dqn.py --resume            # continue the run in checkpoints/<game>/train/ as configured
    python train_dqn.py --resume --total-steps 5000000     # ... for longer (ε stays annealed)

Acts in ale-py's C++ vector env; the gradient update runs while the envs step (send/recv), which is
most of the speed-up over a plain single-env loop (benchmarks/dqn_throughput.py measures it).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import atari_env
from common import (MetricLogger, UserError, arg, load_checkpoint, parse_config, pick_device, restore_config,
                    run_main, save_checkpoint, save_json, was_given)
from models.dqn import (RND, FrameReplay, QNetwork, double_dqn_targets, huber_td_loss, linear_schedule,
                        select_actions)


@dataclass
class Config:
    """Double-DQN on an Atari game (Nature CNN, Huber loss, target net; optional PER, n-step, RND)."""
    game: str = arg("breakout", "game to learn", choices=list(atari_env.GAMES))
    total_steps: int = arg(2_000_000, "agent steps (each = 4 emulator frames), all envs together")
    num_envs: int = arg(8, "parallel envs in ale-py's vector env")
    buffer_size: int = arg(1_000_000, "replay capacity in transitions (~7.1 KB each)")
    batch_size: int = arg(32, "minibatch size")
    lr: float = arg(1e-4, "Adam learning rate")
    adam_eps: float = arg(1.5e-4, "Adam epsilon")
    gamma: float = arg(0.99, "discount")
    n_step: int = arg(1, "n-step returns (1 = plain one-step)")
    learning_starts: int = arg(20_000, "steps of acting before the first update")
    train_frequency: int = arg(4, "agent steps per gradient update")
    target_update: int = arg(8_000, "agent steps between target-net syncs")
    exploration: str = arg("epsilon", "exploration: epsilon-greedy, Boltzmann, or RND bonus (+ε-greedy)",
                           choices=["epsilon", "boltzmann", "rnd"])
    eps_start: float = arg(1.0, "ε at the start")
    eps_end: float = arg(0.01, "ε after the schedule")
    exploration_fraction: float = arg(0.1, "fraction of total_steps over which ε/τ anneal linearly")
    exploration_steps: int = arg(0, "agent steps over which ε/τ anneal (0: exploration_fraction × total_steps)")
    tau_start: float = arg(1.0, "Boltzmann temperature at the start")
    tau_end: float = arg(0.01, "Boltzmann temperature after the schedule")
    rnd_coef: float = arg(0.5, "weight of the normalised RND intrinsic reward")
    rnd_lr: float = arg(1e-4, "RND predictor learning rate")
    prioritized: bool = arg(False, "proportional prioritised replay")
    per_alpha: float = arg(0.6, "PER priority exponent α")
    per_beta_start: float = arg(0.4, "PER importance-weight exponent β at the start (annealed to 1)")
    eval_interval: int = arg(100_000, "agent steps between evaluations")
    eval_episodes: int = arg(10, "full games per evaluation")
    eval_epsilon: float = arg(0.01, "ε during evaluation")
    checkpoint_interval: int = arg(50_000, "agent steps between checkpoints")
    out_dir: str = arg("", "where weights, curves and the resumable checkpoint go (default checkpoints/<game>)")
    resume: bool = arg(False, "continue from <out_dir>/train/dqn.pt")
    device: str = arg("auto", "auto, cuda, mps or cpu")
    threads: int = arg(2, "torch CPU threads")
    seed: int = arg(1, "random seed")
    wandb: str = arg("offline", "wandb mode", choices=["offline", "online", "disabled"])


class Agent:
    """Networks, optimiser and the update rule; stateless about the environment."""

    def __init__(self, cfg: Config, num_actions: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.q = QNetwork(num_actions).to(device, memory_format=torch.channels_last)
        self.q_target = copy.deepcopy(self.q)
        self.opt = torch.optim.Adam(self.q.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.rnd = self.rnd_opt = None
        if cfg.exploration == "rnd":
            self.rnd = RND().to(device)
            self.rnd_opt = torch.optim.Adam(self.rnd.predictor.parameters(), lr=cfg.rnd_lr)

    def update(self, batch: dict) -> dict:
        t = {k: torch.as_tensor(v, device=self.device) for k, v in batch.items() if k != "index"}
        rewards = t["returns"]
        metrics = {}
        if self.rnd is not None:
            intrinsic, rnd_loss = self.rnd.intrinsic_reward_and_loss(t["next_obs"])
            self.rnd_opt.zero_grad(set_to_none=True)
            rnd_loss.backward()
            self.rnd_opt.step()
            rewards = rewards + self.cfg.rnd_coef * intrinsic
            metrics.update(rnd_loss=rnd_loss.item(), intrinsic_reward=intrinsic.mean().item())
        target = double_dqn_targets(self.q, self.q_target, t["next_obs"], rewards, t["dones"], t["gamma_n"])
        q_taken = self.q(t["obs"]).gather(1, t["actions"].long().unsqueeze(1)).squeeze(1)
        loss, td = huber_td_loss(q_taken, target, t["weights"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.q.parameters(), 10.0)
        self.opt.step()
        metrics.update(loss=loss.item(), q_mean=q_taken.mean().item())
        return metrics, td.abs().cpu().numpy()

    def sync_target(self) -> None:
        self.q_target.load_state_dict(self.q.state_dict())

    @torch.no_grad()
    def act(self, obs: np.ndarray, epsilon: float, temperature: float, rng) -> np.ndarray:
        mode = "boltzmann" if self.cfg.exploration == "boltzmann" else "epsilon"
        return select_actions(self.q(torch.as_tensor(obs, device=self.device)), mode, epsilon, temperature, rng)

    def state(self) -> dict:
        s = {"q": self.q.state_dict(), "q_target": self.q_target.state_dict(), "opt": self.opt.state_dict()}
        if self.rnd is not None:
            s.update(rnd=self.rnd.state_dict(), rnd_opt=self.rnd_opt.state_dict(), rnd_stats=self.rnd.extra_state())
        return s

    def load(self, s: dict) -> None:
        self.q.load_state_dict(s["q"])
        self.q_target.load_state_dict(s["q_target"])
        self.opt.load_state_dict(s["opt"])
        if self.rnd is not None:
            self.rnd.load_state_dict(s["rnd"])
            self.rnd_opt.load_state_dict(s["rnd_opt"])
            self.rnd.load_extra_state(s["rnd_stats"])


def evaluate(agent: Agent, cfg: Config, episodes: int, seed: int) -> list[float]:
    """Play `episodes` full games (unclipped score, all lives) with a near-greedy policy."""
    env = atari_env.make_agent_vector_env(cfg.game, num_envs=episodes)
    tracker = atari_env.LifeTracker(episodes, atari_env.fire_action_of(cfg.game))
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    scores: dict[int, float] = {}
    prev_ended = np.zeros(episodes, dtype=bool)
    while len(scores) < episodes:
        actions = tracker.override(agent.act(obs, cfg.eval_epsilon, 0.0, rng))
        obs, rew, term, trunc, info = env.step(actions)
        ended = term | trunc
        _, finished = tracker.update(info["lives"], rew, ended, counted=~prev_ended)
        prev_ended = ended
        for i, score, _ in finished:
            scores.setdefault(int(i), score)   # the first full game of each env
    env.close()
    return [scores[i] for i in range(episodes)]


def plot_curve(csv_rows: list[dict], path: Path, game: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    def has(r, k):
        return k in r and not np.isnan(r[k])
    train = [(r["step"], r["episode_score"]) for r in csv_rows if has(r, "episode_score")]
    evals = [(r["step"], r["eval_mean"], r.get("eval_std", 0)) for r in csv_rows if has(r, "eval_mean")]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        s, v = map(np.array, zip(*train))
        ax.plot(s, v, ".", ms=2, alpha=0.3, color="tab:blue", label="training game score")
        k = max(1, len(v) // 50)
        ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), color="tab:blue", label=f"mean of {k}")
    if evals:
        s, m, sd = map(np.array, zip(*evals))
        ax.errorbar(s, m, yerr=sd, color="tab:red", marker="o", capsize=3, label="evaluation (mean ± sd)")
    ax.set_xlabel("agent steps")
    ax.set_ylabel("game score (unclipped)")
    ax.set_title(f"Double-DQN on {game}")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_weights(agent: Agent, cfg: Config, out_dir: Path, step: int, last_eval: dict | None) -> None:
    """What the recording stage loads: plain safetensors + a JSON card (no pickle)."""
    from safetensors.torch import save_file

    from common import atomic_write
    tensors = {k: v.detach().cpu().contiguous() for k, v in agent.q.state_dict().items()}
    atomic_write(out_dir / "dqn.safetensors", lambda tmp: save_file(tensors, tmp))
    save_json(out_dir / "dqn.json", {"game": cfg.game, "num_actions": agent.q.head[-1].out_features,
                                     "agent_steps": step, "last_eval": last_eval, "config": dataclasses.asdict(cfg)})


def load_dqn_weights(path: str | Path, game: str, device="cpu") -> QNetwork:
    """Load exported DQN weights for `game`; clear errors for a missing, corrupt or foreign file."""
    from safetensors.torch import load_file
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not path.exists():
        raise UserError(f"DQN weights {path} not found (train them with train_dqn.py, or use --policy random)")
    try:
        tensors = load_file(str(path))
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
    except Exception as e:
        raise UserError(f"DQN weights {path} are corrupt or not safetensors ({type(e).__name__})") from e
    if card.get("game", game) != game:
        raise UserError(f"DQN weights {path} are for {card['game']!r}, not {game!r}")
    num_actions = tensors["head.2.weight"].shape[0] if "head.2.weight" in tensors else -1
    want = len(atari_env.action_names(game))
    if num_actions != want:
        raise UserError(f"DQN weights {path} have {num_actions} actions; {game} has {want}")
    net = QNetwork(num_actions)
    net.load_state_dict(tensors)
    return net.to(device).eval()


def main(argv=None) -> None:
    cfg = parse_config(Config, argv)
    atari_env.game_spec(cfg.game)
    out_dir = Path(cfg.out_dir or f"checkpoints/{cfg.game}")
    ckpt_path = out_dir / "train" / "dqn.pt"
    state = None
    if cfg.resume:
        state = load_checkpoint(ckpt_path, "dqn")
        saved = state["config"]
        cfg = restore_config(cfg, saved, fixed=("game", "exploration", "num_envs"))
        if cfg.total_steps != saved["total_steps"] and not (cfg.exploration_steps or was_given(cfg, "exploration_fraction")):
            # the schedule was a fraction of the old total: pin it, so a longer run does not raise ε again
            cfg.exploration_steps = round(cfg.exploration_fraction * saved["total_steps"])
    FrameReplay.check_memory(cfg.buffer_size)
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    env = atari_env.make_agent_vector_env(cfg.game, num_envs=cfg.num_envs)
    num_actions = int(env.single_action_space.n)
    agent = Agent(cfg, num_actions, device)
    step, updates, last_eval = 0, 0, None
    if state is not None:
        agent.load(state["agent"])
        step, updates, last_eval = state["step"], state["updates"], state.get("last_eval")
        rng.bit_generator.state = json.loads(state["np_rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step:,} ({updates:,} updates); refilling the replay before learning")
    replay = FrameReplay(cfg.buffer_size, cfg.num_envs, cfg.n_step, cfg.gamma, cfg.prioritized, cfg.per_alpha)
    logger = MetricLogger(out_dir / "train", f"neural-atari-dqn-{cfg.game}", dataclasses.asdict(cfg),
                          mode=cfg.wandb, resume=cfg.resume)
    tracker = atari_env.LifeTracker(cfg.num_envs, atari_env.fire_action_of(cfg.game))

    def checkpoint():
        save_checkpoint(ckpt_path, {"kind": "dqn", "config": dataclasses.asdict(cfg), "agent": agent.state(),
                                    "step": step, "updates": updates, "last_eval": last_eval,
                                    "np_rng": json.dumps(rng.bit_generator.state),
                                    "torch_rng": torch.get_rng_state()})
        export_weights(agent, cfg, out_dir, step, last_eval)
        plot_curve(logger.rows, out_dir / "dqn_learning_curve.png", cfg.game)

    obs, _ = env.reset(seed=cfg.seed + step)
    first = np.ones(cfg.num_envs, dtype=bool)       # obs is an episode's first frame
    reset_step = np.zeros(cfg.num_envs, dtype=bool)  # this step only resets (NextStep autoreset)
    refill_until = step + cfg.learning_starts        # after a resume the replay starts empty
    recent = deque(maxlen=20)
    next_eval = (step // cfg.eval_interval + 1) * cfg.eval_interval
    next_ckpt = (step // cfg.checkpoint_interval + 1) * cfg.checkpoint_interval
    next_sync = step + cfg.target_update
    update_debt = 0.0
    learn_t0 = learn_s0 = None          # throughput once learning runs (benchmarks/dqn_throughput.py)
    bar = tqdm(total=cfg.total_steps, initial=step, unit="step", dynamic_ncols=True, smoothing=0.05)
    t0, s0 = time.time(), step
    anneal_steps = cfg.exploration_steps or cfg.exploration_fraction * cfg.total_steps
    try:
        while step < cfg.total_steps:
            eps = linear_schedule(cfg.eps_start, cfg.eps_end, anneal_steps, step)
            tau = linear_schedule(cfg.tau_start, cfg.tau_end, anneal_steps, step)
            actions = tracker.override(agent.act(obs, eps, tau, rng))
            env.send(actions)   # the envs step in C++ threads while we learn below
            if step >= refill_until:
                if learn_t0 is None:
                    learn_t0, learn_s0 = time.time(), step
                update_debt += cfg.num_envs / cfg.train_frequency
                while update_debt >= 1:
                    beta = linear_schedule(cfg.per_beta_start, 1.0, cfg.total_steps, cfg.total_steps - step)
                    batch = replay.sample(cfg.batch_size, rng, beta=beta)
                    metrics, td = agent.update(batch)
                    replay.update_priorities(batch["index"], td)
                    updates += 1
                    update_debt -= 1
                    if updates % 500 == 0:
                        logger.log({**metrics, "epsilon": eps, "temperature": tau,
                                    "sps": (step - s0) / (time.time() - t0),
                                    "learning_sps": (step - learn_s0) / max(time.time() - learn_t0, 1e-9),
                                    "updates_per_s": (step - learn_s0) / cfg.train_frequency / max(time.time() - learn_t0, 1e-9)}, step)
            next_obs, rew, term, trunc, info = env.recv()
            ended = term | trunc
            life_lost, finished = tracker.update(info["lives"], rew, ended, counted=~reset_step)
            replay.add(obs[:, -1], actions, rew, term | life_lost, first, ~reset_step)
            first, reset_step = reset_step.copy(), ended
            obs = next_obs
            step += cfg.num_envs
            bar.update(cfg.num_envs)
            if step >= next_sync:
                agent.sync_target()
                next_sync += cfg.target_update
            for _, score, length in finished:
                recent.append(score)
                logger.log({"episode_score": score, "episode_length": length}, step)
            if recent:
                bar.set_postfix(score=f"{np.mean(recent):.1f}", eps=f"{eps:.2f}", sps=f"{(step - s0) / (time.time() - t0):.0f}")
            if step >= next_eval:
                scores = evaluate(agent, cfg, cfg.eval_episodes, seed=10_000 + step)
                last_eval = {"step": step, "mean": float(np.mean(scores)), "std": float(np.std(scores)), "scores": scores}
                logger.log({"eval_mean": last_eval["mean"], "eval_std": last_eval["std"]}, step)
                tqdm.write(f"step {step:,}: eval score {last_eval['mean']:.1f} ± {last_eval['std']:.1f} over {len(scores)} games")
                next_eval += cfg.eval_interval
            if step >= next_ckpt:
                checkpoint()
                next_ckpt += cfg.checkpoint_interval
    except KeyboardInterrupt:
        tqdm.write("interrupted: saving a checkpoint; continue with --resume")
        checkpoint()
        raise
    finally:
        bar.close()
    scores = evaluate(agent, cfg, cfg.eval_episodes, seed=20_000 + step)
    last_eval = {"step": step, "mean": float(np.mean(scores)), "std": float(np.std(scores)), "scores": scores}
    logger.log({"eval_mean": last_eval["mean"], "eval_std": last_eval["std"]}, step)
    checkpoint()
    logger.finish()
    env.close()
    print(f"final evaluation over {len(scores)} full games: {last_eval['mean']:.1f} ± {last_eval['std']:.1f} "
          f"(weights: {out_dir / 'dqn.safetensors'})")


if __name__ == "__main__":
    run_main(main)
