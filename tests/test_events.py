"""World-model events (README stage 3, "the serve"): the game's random serve place, labelled from the
frames, read by the decoder, predicted (whether and where) by the action->latent model."""
import json

import numpy as np
import pytest
import torch

import gameplay_data as gd
import metrics
from common import UserError
from conftest import TINY_WM, run_script
from models.world_model import ActionToLatent, LatentActionModel, load_action_to_latent, load_world_model, save_weights

RED = (200, 72, 72)


def frame_with_ball(row=None, col=None) -> np.ndarray:
    f = np.zeros((210, 160, 3), np.uint8)
    if row is not None:
        f[row:row + 4, col:col + 2] = RED
    return f


def test_serve_place_is_a_ball_appearing_in_the_serve_rows():
    assert metrics.serve_place(frame_with_ball(), frame_with_ball(124, 76)) == (124, 76)
    assert metrics.serve_place(frame_with_ball(150, 40), frame_with_ball(124, 76)) is None   # ball already in play
    assert metrics.serve_place(frame_with_ball(), frame_with_ball(160, 76)) is None          # not where serves appear
    assert metrics.serve_place(frame_with_ball(), frame_with_ball()) is None
    frames = np.stack([frame_with_ball(), frame_with_ball(), frame_with_ball(125, 19), frame_with_ball(128, 21)])
    assert metrics.serve_steps(frames) == [1]


def tiny(**kw):
    return LatentActionModel(num_colors=6, context=2, width=16, depth=1, enc_width=16, enc_depth=1, codebook_size=4,
                             code_dim=8, head_hidden=32, positional=True, **kw)


def test_event_zero_decodes_as_no_event_and_a_trained_event_changes_the_frame(tmp_path):
    torch.manual_seed(0)
    plain, m = tiny().eval(), tiny(event_places=[[124, 76], [125, 19]]).eval()
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["event_embed.weight"] and not unexpected           # only the event table is new
    assert m.num_events == 3 and "event_places" not in plain.hparams
    ctx = torch.randint(0, 6, (3, 2, 210, 160), dtype=torch.uint8)
    codes = torch.tensor([[0], [1], [2]])
    none = torch.zeros(3, dtype=torch.long)
    # a fresh table is zero: events change nothing until trained, and event 0 stays zero for good
    assert torch.equal(m.decode_cells(ctx, m.codes_to_latent(codes), none), plain.decode_cells(ctx, plain.codes_to_latent(codes)))
    with torch.no_grad():
        m.event_embed.weight[1:] = 5 * torch.randn(2, m.code_dim)
    assert torch.equal(m.predict_next(ctx, codes, none), m.predict_next(ctx, codes))
    assert not torch.equal(m.decode_cells(ctx, m.codes_to_latent(codes), torch.ones(3, dtype=torch.long)),
                           m.decode_cells(ctx, m.codes_to_latent(codes)))
    assert m.event_labels([None, (124, 76), (122, 18), (123, 77)]).tolist() == [0, 1, 2, 1]   # nearest place
    save_weights(tmp_path / "wm.safetensors", m, {"kind": "world_model", "game": "breakout", "hparams": m.hparams,
                                                  "palette": [[0, 0, 0]] * 6})
    loaded, _, meta = load_world_model(tmp_path / "wm.safetensors")
    assert loaded.event_places == [[124, 76], [125, 19]] and torch.equal(loaded.event_embed.weight, m.event_embed.weight)


def test_events_are_the_likeliest_by_default_and_sampled_at_a_temperature():
    torch.manual_seed(0)
    a2l = ActionToLatent("v1", 4, 6, 2, 1, 4, num_events=4).eval()
    act = torch.zeros(400, dtype=torch.long)
    g = torch.Generator().manual_seed(0)

    def events_with(bias, temperature=1.0):
        with torch.no_grad():
            a2l.event_out[-1].weight.zero_()
            a2l.event_out[-1].bias.copy_(torch.tensor(bias))
        return a2l.sample_step(act, temperature=temperature, generator=g)[1]

    # at a temperature: drawn from the odds, "some event" below EVENT_FLOOR read as none
    assert (events_with([4.0, 0.0, 0.0, -20.0]) == 0).all()          # p(some event) ~ 0.035 < EVENT_FLOOR: none
    events = events_with([-20.0, 1.0, 1.0, -20.0])                    # surely a serve, at place 1 or 2 alike
    assert set(events.tolist()) == {1, 2} and 150 < (events == 1).sum() < 250
    events = events_with([0.0, 0.0, -20.0, -20.0])                    # a serve half of the time, always at 1
    assert set(events.tolist()) == {0, 1} and 150 < (events == 1).sum() < 250
    # at temperature 0 (the default): an event where its odds reach one half, at its likeliest place, even
    # when no single place beats "none"
    assert (events_with([0.5, 0.0, -20.0, -20.0], 0.0) == 0).all()      # p(none) 0.62
    assert (events_with([0.6, 0.1, 0.0, 0.2], 0.0) == 3).all()          # p(none) 0.35, place 3 the likeliest
    codes, _ = a2l.sample_step(act, generator=g)
    assert torch.equal(codes, a2l.sample(act))


def test_event_head_reads_a_longer_history_than_the_code_head():
    """The serve waits ~7 steps after a lost ball (tests/test_envs.py): the event head reads `event_context`
    frames, the code head its own `context`; older frames reach neither."""
    torch.manual_seed(0)
    a2l = ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1, past_actions=0, positional=True, num_events=3,
                         event_context=5, event_width=4).eval()
    assert a2l.frames_seen == 5
    act = torch.tensor([1, 1])
    idx = torch.randint(0, 6, (2, 7, 210, 160), dtype=torch.uint8)
    with torch.no_grad():
        codes, events = a2l.forward_events(act, idx)
        for t, code_reads, event_reads in ((-1, True, True), (-3, False, True), (-5, False, True), (-6, False, False)):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 6
            c, e = a2l.forward_events(act, changed)
            assert (not torch.equal(c, codes)) == code_reads and (not torch.equal(e, events)) == event_reads, t
        # ball logits per grid cell of each frame the event head reads, oldest first: frame -3 moves only its own
        _, _, balls = a2l.forward_events(act, idx, ball=True)
        changed = idx.clone()
        changed[:, -3] = (changed[:, -3] + 1) % 6
        moved = (a2l.forward_events(act, changed, ball=True)[2] != balls).flatten(2).any(2).any(0)
        assert balls.shape == (2, 5, 27, 20) and moved.tolist() == [False, False, True, False, False]
        # a caller keeping each frame's reading (the neural env) gets the same events as one reading them all
        kept = torch.cat([a2l.frame_summaries(idx[:, t:t + 1]) for t in range(2, 7)], 1)
        assert torch.allclose(a2l.forward_events(act, idx, summaries=kept)[1], events, atol=1e-5)


def test_events_train_end_to_end_and_play(tiny_data, tiny_models, tmp_path):
    """Fine-tune a tiny world model with --events, collect, train stage 5 with them, step the neural env."""
    import shutil
    tiny_data = shutil.copytree(tiny_data, tmp_path / "breakout")   # its latent pairs are rewritten below
    wm_dir = tmp_path / "wm"
    common = ["--data-dir", tiny_data, "--out-dir", wm_dir, "--val-every", 4, *TINY_WM[:-6], "--rollout-starts", 2,
              "--threads", 1, "--wandb", "disabled"]
    if not any(metrics.serve_steps(np.load(f)["frames"], 1) for f in sorted((tiny_data / "episodes").glob("*.npz"))):
        pytest.skip("the random-policy episodes hold no serve")
    run_script("train_latent_action.py", *common, "--steps", 4, "--events", "--freeze-encoder",
               "--init-from", tiny_models / "world_model.safetensors", "--event-fraction", 0.5)
    out = run_script("train_latent_action.py", *common, "--steps", 8, "--resume")
    assert "resumed at step 4" in out.stdout and "held-out serves drawn" in out.stdout
    wm, _, meta = load_world_model(wm_dir / "world_model.safetensors")
    assert wm.num_events >= 2 and meta["config"]["events"]
    report = json.loads((wm_dir / "world_model_metrics.json").read_text())
    assert 0 <= report.get("serve_drawn_at_place", 0) <= 1
    bad = run_script("train_latent_action.py", *common[:-2], "--wandb", "disabled", "--steps", 4, "--events",
                     "--game", "pong", check=False)
    assert bad.returncode == 2 and "event detector" in bad.stderr.strip().splitlines()[-1]

    run_script("collect_action_latent_pairs.py", "--data-dir", tiny_data, "--world-model", wm_dir / "world_model.safetensors",
               "--threads", 1)
    run_script("train_action_to_latent.py", "--data-dir", tiny_data, "--world-model", wm_dir / "world_model.safetensors",
               "--out-dir", wm_dir, "--steps", 6, "--val-every", 6, "--width", 8, "--depth", 1, "--batch-size", 8,
               "--val-samples", 64, "--threads", 1, "--wandb", "disabled", "--event-context", 8, "--event-width", 4,
               "--event-focus", 0.5)
    report = json.loads((wm_dir / "action_to_latent_v2_metrics.json").read_text())
    assert 0 <= report["event_ball_acc"] <= 1 and report["config"]["event_ball_weight"] > 0
    assert np.isfinite(report["motion_psnr@1_predicted_latent_true_event"])
    a2l, a2l_meta = load_action_to_latent(wm_dir / "action_to_latent.safetensors", meta)
    assert a2l.num_events == wm.num_events and (a2l.context, a2l.event_context) == (2, 8)
    with pytest.raises(UserError, match="events"):   # an event head for another world model is refused
        load_action_to_latent(wm_dir / "action_to_latent.safetensors",
                              {**meta, "hparams": {**meta["hparams"], "event_places": [[124, 76]]}})
    # a new event head on that model's code trunk, trained alone: the codes do not move
    run_script("train_action_to_latent.py", "--data-dir", tiny_data, "--world-model", wm_dir / "world_model.safetensors",
               "--out-dir", tmp_path / "head", "--steps", 2, "--val-every", 2, "--width", 8, "--depth", 1,
               "--batch-size", 8, "--val-samples", 16, "--threads", 1, "--wandb", "disabled", "--event-context", 4,
               "--init-from", wm_dir / "action_to_latent.safetensors", "--events-only")
    head, _ = load_action_to_latent(tmp_path / "head" / "action_to_latent.safetensors", meta)
    trunk = {k: v for k, v in a2l.state_dict().items() if not k.startswith("event_")}
    assert head.event_context == 4 and all(torch.equal(v, head.state_dict()[k]) for k, v in trunk.items())
    bad = run_script("train_action_to_latent.py", "--data-dir", tiny_data, "--world-model", wm_dir / "world_model.safetensors",
                     "--out-dir", tmp_path / "head", "--steps", 2, "--width", 16, "--wandb", "disabled",
                     "--init-from", wm_dir / "action_to_latent.safetensors", "--events-only", check=False)
    assert bad.returncode == 2 and "does not fit" in bad.stderr.strip().splitlines()[-1]
    # a history head trained alone on it (--history_only, resumed): the trunk and the event head do not move
    hist = ["--data-dir", tiny_data, "--world-model", wm_dir / "world_model.safetensors", "--out-dir", tmp_path / "hist",
            "--val-every", 2, "--width", 8, "--depth", 1, "--batch-size", 8, "--val-samples", 16, "--threads", 1,
            "--wandb", "disabled", "--event-context", 8, "--event-width", 4, "--history-keys", 6, "--history-width", 16]
    run_script("train_action_to_latent.py", *hist, "--steps", 2, "--init-from", wm_dir / "action_to_latent.safetensors",
               "--history-only")
    out = run_script("train_action_to_latent.py", *hist, "--steps", 4, "--resume")
    assert "resumed at step 2" in out.stdout and "frozen features" in out.stderr
    with_history, hist_meta = load_action_to_latent(tmp_path / "hist" / "action_to_latent.safetensors", meta)
    assert with_history.keys_seen == 6 and hist_meta["step"] == 4
    assert all(torch.equal(v, with_history.state_dict()[k]) for k, v in a2l.state_dict().items())
    assert with_history.history_head[-1].weight.abs().sum() > 0   # it left its zero start
    bad = run_script("train_action_to_latent.py", *hist[:6], "--history-keys", 4, "--steps", 2, "--wandb", "disabled",
                     check=False)   # no --event_context
    assert bad.returncode == 2 and "history head" in bad.stderr.strip().splitlines()[-1]
    # its event MLP trained alone (--event_mlp_only), reading 10 frames and the frame phase, while the history head
    # keeps reading the last 8: everything else stays bit for bit
    mlp = [*hist[:4], "--out-dir", tmp_path / "mlp", *hist[6:-8], "--event-context", 10, "--history-context", 8,
           *hist[-6:], "--event-focus", 0.5]
    out = run_script("train_action_to_latent.py", *mlp, "--steps", 2, "--event-mlp-only",
                     "--init-from", tmp_path / "hist" / "action_to_latent.safetensors")
    assert "latent_acc" in out.stdout and "frozen features" in out.stderr
    phased, _ = load_action_to_latent(tmp_path / "mlp" / "action_to_latent.safetensors", meta)
    assert (phased.event_context, phased.history_context, phased.frame_phases) == (10, 8, 4)
    moved = {k for k, v in with_history.state_dict().items()
             if v.shape != phased.state_dict()[k].shape or not torch.equal(v, phased.state_dict()[k])}
    assert moved == {k for k in with_history.state_dict() if k.startswith("event_out")}
    assert phased.event_out[0].in_features == with_history.event_out[0].in_features + 2 * (3 * 4 + 1)
    assert with_history.frame_phases == 4   # on by default
    # both heads from one pass over the frames (--history_only --event_mlp_only): the same weights as two runs
    for name, only in (("h", ["--history-only"]), ("e", ["--event-mlp-only"]), ("he", ["--history-only", "--event-mlp-only"])):
        run_script("train_action_to_latent.py", *mlp[:4], "--out-dir", tmp_path / name, *mlp[6:], "--steps", 3, *only,
                   "--init-from", tmp_path / "mlp" / "action_to_latent.safetensors")
    h, e, he = (load_action_to_latent(tmp_path / name / "action_to_latent.safetensors", meta)[0].state_dict()
                for name in ("h", "e", "he"))
    for k, v in he.items():
        assert torch.equal(v, (h if k.startswith("history_") else e)[k]), k
    assert not torch.equal(he["history_head.5.weight"], phased.state_dict()["history_head.5.weight"])
    assert not torch.equal(he["event_out.2.weight"], phased.state_dict()["event_out.2.weight"])
    out = run_script("train_action_to_latent.py", *mlp, "--eval-only")   # validates with each episode's phase
    assert "event_ball_acc" in out.stdout
    bad = run_script("train_action_to_latent.py", *mlp, "--steps", 2, "--event-mlp-only", check=False)   # no --init_from
    assert bad.returncode == 2 and "--event_mlp_only" in bad.stderr.strip().splitlines()[-1]
    import atari_env
    for name in ("world_model.safetensors", "start_frames.safetensors"):
        shutil.copy(wm_dir / name, tmp_path / "mlp")
    env = atari_env.make_neural_env("breakout", tmp_path / "mlp", "cpu")
    assert env.unwrapped.context_length == 10
    env.reset(seed=0)   # the shipped start frames' phase (no no-op start), or the recording's
    assert env.unwrapped._phase.tolist() == [0]
    recorded = np.array([2, 3, 3, 3, 0, 1] * 3)
    opts = env.unwrapped.recorded_keys(recorded, 10, {"noop_frames": 7})
    assert opts["frame_phase"] == 3 and "frame_phase" not in env.unwrapped.recorded_keys(recorded, 10)
    env.reset(seed=0, options={"frames": np.stack([env.render()] * 2), **opts})
    assert env.unwrapped._phase.tolist() == [3]
    assert 0 <= env.step(1)[4]["event"] < wm.num_events
    for name in ("world_model.safetensors", "start_frames.safetensors"):
        shutil.copy(wm_dir / name, tmp_path / "hist")
    import atari_env
    env = atari_env.make_neural_env("breakout", tmp_path / "hist", "cpu")
    env.reset(seed=0, options={"past_actions": [2, 3]})
    assert env.unwrapped._past.tolist() == [[0, 0, 0, 0, 2, 3]]   # the history head's six keys are kept
    for key in (3, 3, 0, 1):
        assert 0 <= env.step(key)[4]["latent"][0] < wm.codebook_size
    assert env.unwrapped._past.tolist() == [[2, 3, 3, 3, 0, 1]]
    # and the paddle's dial (on by default for Breakout), followed as gameplay_data does through a recording
    assert with_history.dial == (atari_env.paddle_dial("breakout")[0], pytest.approx(atari_env.PADDLE_DIAL_SPAN))
    keys = [2, 3, 3, 3, 0, 1] + [2] * 7 + [3, 0, 3]
    for key in keys[6:]:
        env.step(key)
    expected = gd.dial_before(gd.paddle_dials(np.array(keys), with_history.dial), len(keys), 6)
    assert env.unwrapped._dial.item() == pytest.approx(float(expected)) and expected < with_history.dial[1]
    env.reset(seed=0, options={"frames": np.stack([env.render()] * 2), **env.unwrapped.recorded_keys(np.array(keys), 10)})
    assert env.unwrapped._dial.item() == pytest.approx(float(gd.paddle_dials(np.array(keys), with_history.dial)[4]))

    env = atari_env.make_neural_env("breakout", wm_dir, "cpu")
    assert env.unwrapped.context_length == 8                  # the event head's history is kept
    env.reset(seed=0)
    for key in (1, 1, 2, 1):
        _, _, _, _, info = env.step(key)
        assert 0 <= info["event"] < wm.num_events
    inner = env.unwrapped   # each frame read once by the event head, kept while it is among the last 8
    assert torch.allclose(inner._summaries, a2l.frame_summaries(inner._ctx), atol=1e-5)


def test_self_forcing_redraws_a_serve_with_its_event():
    """The self-forced frame t is the model's own drawing of t-1 -> t with the true event: at a serve it
    is drawn with the served ball (the event moves it), not as if nothing had been served."""
    from models.world_model import Palette
    from train_latent_action import self_forced_context
    torch.manual_seed(0)
    m = tiny(event_places=[[124, 76], [125, 19]]).eval()
    with torch.no_grad():
        m.event_embed.weight[1:] = 5 * torch.randn(2, m.code_dim)
    palette = Palette(np.array([(0, 0, 0), RED, (1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4)]))
    frames = [palette.to_index(frame_with_ball()), palette.to_index(frame_with_ball()),
              palette.to_index(frame_with_ball(124, 76))]                 # frames t-2, t-1, t: a serve at t
    history = torch.as_tensor(np.stack(frames))[None]
    seen, predict = [], m.predict_next
    m.predict_next = lambda ctx, codes, events=None: seen.append(events) or predict(ctx, codes, events)
    forced = self_forced_context(m, palette, history, fraction=1.0)
    assert [e.tolist() for e in seen] == [[1]]                            # the serve's event, at (124, 76)
    before = history[:, :-1]
    _, codes, _ = m.encode(before, history[:, -1])
    assert torch.equal(forced[:, 0], history[:, 1])                       # the older frame stays real
    assert torch.equal(forced[:, -1], predict(before, codes, torch.tensor([1])))
    kept = self_forced_context(m, palette, history, fraction=0.0)
    assert torch.equal(kept, history[:, 1:])
