import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import run_script
from models.dqn import RND, FrameReplay, SumTree, double_dqn_targets, select_actions


class FixedQ(nn.Module):
    """Q-values read straight from the observation's first pixel row: easy to reason about."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, obs):
        return self.table[obs[:, 0, 0, 0].long()]


def test_double_dqn_target_uses_online_argmax_and_target_value():
    online = FixedQ([[1.0, 5.0, 2.0]])      # online picks action 1
    target = FixedQ([[10.0, 3.0, 20.0]])    # target's own max would be 20; Double DQN must use 3
    obs = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    y = double_dqn_targets(online, target, obs, rewards=torch.tensor([1.0, 1.0]),
                           dones=torch.tensor([0.0, 1.0]), gamma_n=0.9)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 3.0, 1.0]))


def _filled_replay(n_step=1):
    """One env; episode A = rows 0..4 (ends with a game over at row 3, row 4 is its final frame),
    episode B starts at row 5. Frame r is filled with the value r + 1."""
    rb = FrameReplay(capacity=32, num_envs=1, n_step=n_step, gamma=0.5)
    for r in range(10):
        rb.add(np.full((1, 84, 84), r + 1, np.uint8), actions=[r % 4], rewards=[float(r)],
               dones=[r == 3], first=[r in (0, 5)], startable=[r != 4])
    return rb


def test_replay_stacks_never_cross_episode_boundaries():
    rb = _filled_replay()
    stack = rb._stack(np.array([6, 2, 8]), np.array([0, 0, 0]))[:, :, 0, 0]
    assert stack[0].tolist() == [0, 0, 6, 7]        # episode B's 2nd frame: zero padding before its start
    assert stack[1].tolist() == [0, 1, 2, 3]        # episode A's 3rd frame
    assert stack[2].tolist() == [6, 7, 8, 9]


def test_replay_samples_only_real_transitions_and_stores_frames_once():
    rb = _filled_replay()
    batch = rb.sample(256, np.random.default_rng(0))
    rows = batch["index"]
    assert 4 not in rows                            # the final frame of A starts no transition
    assert rb.frames.nbytes == rb.rows * 84 * 84    # one frame per transition, not a 4-frame stack
    done_rows = rows == 3
    assert np.all(batch["dones"][done_rows] == 1.0)


def test_n_step_return_stops_at_terminal():
    rb = _filled_replay(n_step=3)
    out = rb._n_step(np.array([2, 5]), np.array([0, 0]))
    ret, done, steps = out
    # row 2: r=2 (clipped to 1) + 0.5 * r3 (clipped 1), terminal at row 3
    assert ret[0] == pytest.approx(1.0 + 0.5) and done[0] and steps[0] == 2
    assert ret[1] == pytest.approx(1 + 0.5 + 0.25) and not done[1] and steps[1] == 3


def test_prioritized_sampling_frequency_follows_priority_alpha():
    rb = FrameReplay(capacity=64, num_envs=1, prioritized=True, alpha=0.5)
    for r in range(12):
        rb.add(np.zeros((1, 84, 84), np.uint8), [0], [0.0], [False], [r == 0], [True])
    idx = np.array([5, 6, 7])
    rb.tree.set(np.arange(rb.tree.size), np.zeros(rb.tree.size))
    rb.update_priorities(idx, np.array([1.0, 4.0, 9.0]) - rb.eps)     # priorities^0.5 = 1, 2, 3
    rng = np.random.default_rng(0)
    counts = np.zeros(3)
    weights = {}
    for _ in range(400):
        b = rb.sample(30, rng, beta=1.0)
        for i, w in zip(b["index"], b["weights"]):
            counts[i - 5] += 1
            weights[int(i)] = w
    freq = counts / counts.sum()
    assert np.allclose(freq, [1 / 6, 2 / 6, 3 / 6], atol=0.02)
    # importance weights (N P)^-beta, normalised by the max: inversely proportional to priority
    assert weights[5] == pytest.approx(1.0) and weights[7] == pytest.approx(1 / 3, rel=1e-3)
    rb.update_priorities(np.array([7]), np.array([0.0]))
    assert rb.tree.get(np.array([7]))[0] < 1e-2


def test_sum_tree_totals_and_find():
    t = SumTree(5)
    t.set(np.arange(5), np.array([1.0, 0.0, 2.0, 3.0, 4.0]))
    assert t.total == pytest.approx(10.0)
    assert t.find(np.array([0.5, 1.5, 2.9, 3.1, 9.9])).tolist() == [0, 2, 2, 3, 4]


def test_rnd_reward_falls_on_repeated_states():
    torch.manual_seed(0)
    rnd = RND()
    opt = torch.optim.Adam(rnd.predictor.parameters(), lr=1e-3)
    obs = torch.randint(0, 255, (16, 4, 84, 84), dtype=torch.uint8)
    first = rnd.prediction_error(obs).mean().item()
    for _ in range(60):
        _, loss = rnd.intrinsic_reward_and_loss(obs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rnd.prediction_error(obs).mean().item() < 0.2 * first
    novel = torch.randint(0, 255, (16, 4, 84, 84), dtype=torch.uint8)
    assert rnd.prediction_error(novel).mean() > rnd.prediction_error(obs).mean()


def test_exploration_policies():
    rng = np.random.default_rng(0)
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]]).repeat(2000, 1)
    assert (select_actions(q, "epsilon", 0.0, 1.0, rng) == 1).all()
    uniform = select_actions(q, "epsilon", 1.0, 1.0, rng)
    assert np.allclose(np.bincount(uniform, minlength=4) / 2000, 0.25, atol=0.04)
    cold = select_actions(q, "boltzmann", 0.0, 0.01, rng)
    assert (cold == 1).all()
    warm = np.bincount(select_actions(q, "boltzmann", 0.0, 1.0, rng), minlength=4) / 2000
    expected = np.exp([0, 1, 0, 0]) / np.exp([0, 1, 0, 0]).sum()
    assert np.allclose(warm, expected, atol=0.04)


TINY = ["--total-steps", 600, "--num-envs", 4, "--buffer-size", 2000, "--learning-starts", 200,
        "--eval-interval", 400, "--eval-episodes", 2, "--checkpoint-interval", 300, "--threads", 1,
        "--wandb", "disabled"]


@pytest.mark.parametrize("extra", [["--prioritized", "--n-step", 3], ["--exploration", "rnd"],
                                   ["--exploration", "boltzmann"]])
def test_train_dqn_end_to_end_then_resume(tmp_path, extra):
    run_script("train_dqn.py", *TINY, *extra, "--out-dir", tmp_path)
    assert (tmp_path / "dqn.safetensors").exists() and (tmp_path / "dqn_learning_curve.png").exists()
    ckpt = torch.load(tmp_path / "train" / "dqn.pt", weights_only=True)
    assert ckpt["step"] >= 600
    out = run_script("train_dqn.py", *TINY[2:], "--total-steps", 1000, *extra, "--out-dir", tmp_path, "--resume")
    assert "resumed at step" in out.stdout
    assert torch.load(tmp_path / "train" / "dqn.pt", weights_only=True)["step"] >= 1000


def test_resume_restores_the_run_config_and_keeps_epsilon_annealed(tmp_path):
    run_script("train_dqn.py", *TINY, "--n-step", 3, "--lr", "3e-4", "--out-dir", tmp_path)
    # only what changes is given: every other hyperparameter comes from the checkpoint
    out = run_script("train_dqn.py", "--out-dir", tmp_path, "--resume", "--total-steps", 1000, "--lr", "2e-4",
                     "--threads", 1, "--wandb", "disabled")
    assert "resumed at step" in out.stdout and "lr 0.0003 -> 0.0002" in out.stdout
    cfg = torch.load(tmp_path / "train" / "dqn.pt", weights_only=True)["config"]
    assert (cfg["n_step"], cfg["buffer_size"], cfg["num_envs"], cfg["eval_episodes"]) == (3, 2000, 4, 2)
    assert cfg["total_steps"] == 1000 and cfg["lr"] == 2e-4
    assert cfg["exploration_steps"] == 60          # 0.1 x the first run's 600 steps, not 0.1 x 1000
    p = run_script("train_dqn.py", "--out-dir", tmp_path, "--resume", "--exploration", "rnd", check=False)
    assert p.returncode == 2 and "exploration='epsilon'" in p.stderr and "Traceback" not in p.stderr


def test_bad_inputs_fail_clearly(tmp_path):
    p = run_script("train_dqn.py", "--game", "pacman", check=False)
    assert p.returncode != 0 and "breakout" in p.stderr
    p = run_script("train_dqn.py", "--buffer-size", 10**10, "--out-dir", tmp_path, check=False)
    assert p.returncode == 2 and "--buffer-size" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "train").mkdir(exist_ok=True)
    (tmp_path / "train" / "dqn.pt").write_bytes(b"not a checkpoint")
    p = run_script("train_dqn.py", *TINY, "--out-dir", tmp_path, "--resume", check=False)
    assert p.returncode == 2 and "corrupt" in p.stderr and "Traceback" not in p.stderr
