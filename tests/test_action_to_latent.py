import json

import numpy as np
import pytest
import torch

import atari_env
import gameplay_data as gd
import metrics
from common import UserError
from conftest import run_script
from models.world_model import ActionToLatent, load_action_to_latent, load_world_model, read_weights, save_weights


def test_v2_reports_accuracy_and_psnr_on_held_out_episodes(tiny_models):
    report = json.loads((tiny_models / "action_to_latent_v2_metrics.json").read_text())
    for key in ("token_acc", "latent_acc", "psnr@1_predicted_latent", "psnr@1_encoder_latent",
                "copy_last_psnr@1", "motion_psnr@1_predicted_latent", "motion_psnr@1_encoder_latent",
                "motion_psnr@1_gap", "motion_psnr@1_gap_low", "motion_psnr@1_gap_high"):
        assert np.isfinite(report[key])
    assert 0 <= report["latent_acc"] <= 1
    # the same code always draws the same frame, so frame agreement can only add to exact-code agreement
    assert report["latent_acc"] <= report["latent_frame_match"] <= 1
    assert (tiny_models / "train" / "action_to_latent" / "action_to_latent_confusion.png").exists()


def test_split_is_by_episode(tiny_data):
    train, val = gd.split_episodes(tiny_data, "train"), gd.split_episodes(tiny_data, "val")
    assert not {f.stem for f in train} & {f.stem for f in val}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_trains_end_to_end_and_resumes(tiny_data, tiny_models, tmp_path, version):
    args = ["--data-dir", tiny_data, "--world-model", tiny_models / "world_model.safetensors", "--out-dir", tmp_path,
            "--model", version, "--width", 8, "--depth", 1, "--batch-size", 8, "--val-samples", 32,
            "--val-every", 10, "--threads", 1, "--wandb", "disabled"]
    run_script("train_action_to_latent.py", *args, "--steps", 10)
    out = run_script("train_action_to_latent.py", *args, "--steps", 20, "--resume")
    assert "resumed at step 10" in out.stdout
    _, meta = read_weights(tmp_path / "action_to_latent.safetensors", "action_to_latent")
    assert meta["hparams"]["version"] == version and meta["step"] == 20


def test_eval_only_revalidates_the_saved_weights(tiny_data, tiny_models, tmp_path):
    """Same weights, same held-out transitions: the numbers the training reported at its last step, and nothing trained."""
    import shutil
    shutil.copy(tiny_models / "action_to_latent.safetensors", tmp_path)
    run_script("train_action_to_latent.py", "--data-dir", tiny_data, "--world-model", tiny_models / "world_model.safetensors",
               "--out-dir", tmp_path, "--eval-only", "--val-samples", 64, "--threads", 1, "--wandb", "disabled")
    again = json.loads((tmp_path / "action_to_latent_eval_only.json").read_text())
    trained = json.loads((tiny_models / "action_to_latent_v2_metrics.json").read_text())
    for key in ("latent_acc", "token_acc", "latent_frame_match", "motion_psnr@1_encoder_latent"):
        assert again[key] == pytest.approx(trained[key]), key
    assert again["step"] == trained["step"] and not (tmp_path / "train" / "action_to_latent.pt").exists()
    assert (tmp_path / "train" / "action_to_latent_eval_only" / "action_to_latent_confusion.png").exists()
    # each gap (over the motion pixels, over the whole frame) is the two PSNRs' difference, and the per-episode errors
    # it is bootstrapped from add up to it
    for metric, name in (("motion_psnr@1", "motion"), ("psnr@1", "frame")):
        gap = again[f"{metric}_encoder_latent"] - again[f"{metric}_predicted_latent"]
        assert again[f"{metric}_gap"] == pytest.approx(gap, abs=1e-6)
        assert again[f"{metric}_gap_low"] <= again[f"{metric}_gap"] <= again[f"{metric}_gap_high"]
        per_episode = np.array(list(again[f"per_episode_{name}_se"].values()))
        assert set(again[f"per_episode_{name}_se"]) == {f.stem for f in gd.split_episodes(tiny_data, "val")}
        assert again["val_episodes"] == len(per_episode)
        assert 10 * np.log10(per_episode[:, 1].sum() / per_episode[:, 0].sum()) == pytest.approx(gap, abs=1e-6)
    # the whole frame holds the motion pixels: its error is at least theirs, episode by episode
    motion, frame = (np.array(list(again[f"per_episode_{n}_se"].values())) for n in ("motion", "frame"))
    assert (frame >= motion - 1e-3).all()


def test_gap_interval_is_a_paired_bootstrap_over_episodes():
    rng = np.random.default_rng(1)
    ref = rng.uniform(1e3, 1e4, 200)
    assert metrics.psnr_gap_interval(ref, ref) == (0.0, 0.0, 0.0)
    # twice the error in every episode: 3.01 dB, whichever episodes a resample draws
    gap, low, high = metrics.psnr_gap_interval(ref, 2 * ref)
    assert gap == pytest.approx(10 * np.log10(2)) and low == pytest.approx(gap) and high == pytest.approx(gap)
    # the gap is that of the pooled errors (PSNR of the summed squared error over the same pixels)
    test = ref * rng.uniform(0.5, 1.6, 200)
    gap, low, high = metrics.psnr_gap_interval(ref, test)
    assert gap == pytest.approx(metrics.psnr_from_mse(ref.sum() / 1e6) - metrics.psnr_from_mse(test.sum() / 1e6))
    assert low < gap < high
    # episodes that go either way by chance: the interval holds 0; a small deficit in every episode: it does not
    noisy = ref * np.where(np.arange(200) % 2, 1.2, 1 / 1.2)
    assert metrics.psnr_gap_interval(ref, noisy)[1] < 0 < metrics.psnr_gap_interval(ref, noisy)[2]
    assert metrics.psnr_gap_interval(ref, ref * rng.uniform(1.01, 1.03, 200))[1] > 0


def test_validation_decodes_again_only_where_the_prediction_differs(tiny_models):
    # the validation reuses the encoder latent's frame where the predicted latent is the same: valid only if the
    # decoder draws each sample on its own, whatever else is in the batch
    from train_action_to_latent import redecode
    wm, palette, _ = load_world_model(tiny_models / "world_model.safetensors")
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, len(palette), (6, wm.context, 210, 160), generator=g, dtype=torch.uint8)
    K = wm.hparams["codebook_size"]
    a, b = torch.randint(0, K, (6, 1), generator=g), torch.randint(0, K, (6, 1), generator=g)
    events = torch.zeros(6, dtype=torch.long) if wm.num_events else None
    rows = torch.tensor([True, False, True, False, False, True])
    frames = wm.predict_next(ctx, a, events)
    again = redecode(wm, ctx, frames, rows, b, events)
    assert torch.equal(again, wm.predict_next(ctx, torch.where(rows[:, None], b, a), events))
    assert torch.equal(again[~rows], frames[~rows]) and redecode(wm, ctx, frames, ~rows & False, b, events) is frames


def test_weights_for_another_game_or_latent_shape_are_refused(tiny_models, tmp_path):
    wm, _, wm_meta = load_world_model(tiny_models / "world_model.safetensors")
    a2l, meta = load_action_to_latent(tiny_models / "action_to_latent.safetensors", wm_meta)
    save_weights(tmp_path / "pong.safetensors", a2l, {**meta, "game": "pong"})
    with pytest.raises(UserError, match="'pong'"):
        load_action_to_latent(tmp_path / "pong.safetensors", wm_meta)
    other = {**wm_meta, "hparams": {**wm_meta["hparams"], "codebook_size": 99}}
    with pytest.raises(UserError, match="x99"):
        load_action_to_latent(tiny_models / "action_to_latent.safetensors", other)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt"):
        load_action_to_latent(tmp_path / "junk.safetensors", wm_meta)


def test_sampling_argmax_and_temperature(tiny_models):
    _, _, wm_meta = load_world_model(tiny_models / "world_model.safetensors")
    a2l, _ = load_action_to_latent(tiny_models / "action_to_latent.safetensors", wm_meta)
    ctx = torch.zeros(64, 2, 210, 160, dtype=torch.uint8)
    act = torch.full((64,), 2)
    greedy = a2l.sample(act, ctx)
    assert (greedy == a2l(act, ctx).argmax(-1)).all()
    g = torch.Generator().manual_seed(0)
    hot = a2l.sample(act, ctx, temperature=100.0, generator=g)
    assert hot.unique().numel() > 1


def test_latent_purity_counts_the_previous_action():
    import metrics
    # RIGHT (2) gives latent 5 after NOOP but latent 6 after RIGHT: a_t alone cannot tell, (a_t-1, a_t) can
    counts = {(0, 2, (5,)): 30, (2, 2, (6,)): 10, (0, 0, (1,)): 60}
    p = metrics.latent_purity(counts)
    assert p["action_purity"] == pytest.approx(0.9) and p["action_pair_purity"] == 1.0


def test_v2_sees_exactly_its_past_actions_oldest_first():
    torch.manual_seed(0)
    m = ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1, past_actions=2, positional=True).eval()
    ctx = torch.randint(0, 6, (1, 2, 210, 160), dtype=torch.uint8)
    act = torch.tensor([2])
    logits = lambda past: m(act, ctx, torch.tensor([past]))
    assert torch.equal(logits([3, 1, 2]), logits([0, 1, 2]))            # a_t-3 is beyond its history
    assert not torch.allclose(logits([1, 2]), logits([2, 2]))          # a_t-2 counts
    assert not torch.allclose(logits([1, 2]), logits([1, 3]))          # a_t-1 counts
    assert torch.equal(m(act, ctx, torch.tensor([2])), logits([0, 2]))  # one action = a_t-1, NOOP before it
    assert torch.equal(m(act, ctx), logits([0, 0]))                     # none known = NOOPs


def test_weights_saved_with_the_older_prev_action_flag_still_load():
    old = ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1, prev_action=True)
    assert old.past_actions == 1 and old.hparams["past_actions"] == 1 and "prev_action" not in old.hparams
    assert ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1).past_actions == 0


def test_v2_reads_its_last_context_frames_and_repeats_the_oldest_when_given_fewer():
    """Stage 5 may see more frames than the decoder (--context): it reads the last `context` it is given."""
    torch.manual_seed(0)
    a2l = ActionToLatent("v2", 4, 6, context=3, num_tokens=1, codebook_size=4, width=8, depth=1, past_actions=0,
                         positional=True).eval()
    act = torch.tensor([1, 2])
    idx = torch.randint(0, 6, (2, 5, 210, 160), dtype=torch.uint8)
    with torch.no_grad():
        out = a2l(act, idx)
        assert torch.equal(out, a2l(act, idx[:, -3:]))              # frames older than its context are not read
        changed = idx.clone()
        changed[:, -3] = (changed[:, -3] + 1) % 6
        assert not torch.allclose(a2l(act, changed), out)           # the oldest of its three is
        short = idx[:, -2:]
        assert torch.equal(a2l(act, short), a2l(act, torch.cat([short[:, :1], short], 1)))
    assert gd.history(np.arange(5), 1, 4).tolist() == [0, 0, 0, 1]   # recorded episodes are read the same way


def test_events_only_trains_the_event_head_and_keeps_fixed_colour_codes_fixed():
    from train_action_to_latent import train_only
    a2l = ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1, past_actions=2, positional=True, num_events=3,
                         event_context=4, event_width=4)
    fixed = {n for n, p in a2l.named_parameters() if not p.requires_grad}
    assert "event_frames.embed.embed.weight" in fixed
    train_only(a2l, "event_")
    trained = {n for n, p in a2l.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("event_") for n in trained) and not trained & fixed
    assert {"event_out.0.weight", "event_ball.weight", "event_frames.proj.weight"} <= trained


def history_model(**kw) -> ActionToLatent:
    torch.manual_seed(0)
    return ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1, past_actions=2, positional=True, num_events=3,
                          event_context=5, event_width=4, **kw).eval()


def test_history_head_starts_as_the_trunk_and_reads_older_keys_and_frames():
    """Untrained (last layer zero) it changes no code logit; trained, it reads keys and frames older than the
    trunk's (2 keys, 2 frames): up to its history_keys keys and the event head's event_context frames."""
    a2l, plain = history_model(history_keys=6), history_model()
    assert a2l.keys_seen == 6 and plain.keys_seen == 2
    plain.load_state_dict({k: v for k, v in a2l.state_dict().items() if not k.startswith("history_")})
    act, past = torch.tensor([3, 2]), torch.tensor([[1, 2, 3, 1, 2, 3], [0, 0, 1, 1, 2, 2]])
    idx = torch.randint(0, 6, (2, 7, 210, 160), dtype=torch.uint8)
    with torch.no_grad():
        codes, events = a2l.forward_events(act, idx, past)
        assert all(torch.equal(x, y) for x, y in zip((codes, events), plain.forward_events(act, idx, past)))
        torch.nn.init.normal_(a2l.history_head[-1].weight)
        codes = a2l(act, idx, past)
        assert torch.equal(a2l.forward_events(act, idx, past)[1], events)   # the events are the event head's alone
        for lag, reads in ((0, True), (3, True), (5, True)):   # past[:, lag] is a_t-6+lag: all six are read
            other = past.clone()
            other[:, lag] = (other[:, lag] + 1) % 4
            assert (not torch.equal(a2l(act, idx, other), codes)) == reads, lag
            assert torch.equal(plain(act, idx, other), plain(act, idx, past)) == (lag < 4), lag
        assert torch.equal(a2l(act, idx, torch.cat([torch.full((2, 3), 2), past], 1)), codes)   # older: not read
        for t, reads in ((-4, True), (-5, True), (-6, False)):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 6
            assert (not torch.equal(a2l(act, changed, past), codes)) == reads, t
    with pytest.raises(ValueError, match="event"):
        ActionToLatent("v2", 4, 6, 2, 1, 4, width=8, depth=1, history_keys=4)


def test_history_head_reads_the_paddle_dial_after_each_of_its_keys(tmp_path):
    """With a dial, the head also reads where each of its keys (and a_t) left the paddle's dial, turned from the
    `dial` it is given (where the dial stood before the oldest key, so keys older than any window count); none
    given: the ALE's reset value, the middle."""
    a2l = history_model(history_keys=6, dial=([0, 0, 1, -1], 3.5))
    assert a2l.dial == ([0, 0, 1, -1], 3.5) and a2l.hparams["dial_span"] == 3.5
    torch.nn.init.normal_(a2l.history_head[-1].weight)
    act, past = torch.tensor([3, 0]), torch.tensor([[2, 2, 2, 2, 2, 2], [0, 3, 0, 2, 0, 0]])
    idx = torch.randint(0, 6, (2, 7, 210, 160), dtype=torch.uint8)
    with torch.no_grad():
        f = a2l.features(act, idx, past)
        summaries = a2l.summarize(*a2l.event_history(idx))
        x = a2l.history_input(f, summaries, act, past, torch.tensor([1.75, 0.0]))
        turned = x[:, -21:-14] * 3.5   # the dial after a_t-6..a_t, then "at its low end", "at its high end"
        assert torch.allclose(turned, torch.tensor([[2.75, 3.5, 3.5, 3.5, 3.5, 3.5, 2.5], [0, 0, 0, 1, 1, 1, 1.]]))
        assert x[:, -14:-7].tolist() == [[0] * 7, [1, 1, 1, 0, 0, 0, 0]]
        assert x[:, -7:].tolist() == [[0, 1, 1, 1, 1, 1, 0], [0] * 7]
        assert torch.equal(a2l(act, idx, past), a2l(act, idx, past, dial=torch.tensor([1.75, 1.75])))
        assert not torch.equal(a2l(act, idx, past), a2l(act, idx, past, dial=torch.tensor([0.0, 3.5])))
    # with dial_levels, also which reachable value the dial is at, one-hot: a whole number of presses from the low
    # end (family 0), the middle (1.75: family 1) or the high end (3.5: family 2), 4 levels each
    levels = history_model(history_keys=6, dial=([0, 0, 1, -1], 3.5), dial_levels=True)
    assert levels.hparams["dial_levels"] and levels.dial_columns == (3 + 12) * 7
    assert levels.dial_level(torch.tensor([0.0, 2.0, 0.75, 1.75, 3.5, 2.5, 0.5])).tolist() == [0, 2, 4, 5, 11, 10, 8]
    with torch.no_grad():
        x = levels.history_input(levels.features(act, idx, past), summaries, act, past, torch.tensor([1.75, 0.0]))
        ids = x[:, -12 * 7:].view(2, 7, 12).argmax(-1)
        assert ids.tolist() == [[6, 11, 11, 11, 11, 11, 10], [0, 0, 0, 1, 1, 1, 1]]
        assert torch.equal(x[:, -15 * 7:-12 * 7], a2l.history_input(f, summaries, act, past, torch.tensor([1.75, 0.0]))[:, -21:])
    path = tmp_path / "action_to_latent.safetensors"
    save_weights(path, a2l, {"kind": "action_to_latent", "game": "breakout", "hparams": a2l.hparams})
    wm_meta = {"game": "breakout", "hparams": {"num_tokens": 1, "codebook_size": 4, "event_places": [[1, 2], [3, 4]]}}
    loaded = load_action_to_latent(path, wm_meta)[0]
    assert loaded.dial == a2l.dial and torch.equal(loaded(act, idx, past), a2l(act, idx, past))
    save_weights(path, levels, {"kind": "action_to_latent", "game": "breakout", "hparams": levels.hparams})
    assert load_action_to_latent(path, wm_meta)[0].dial_levels == 4
    assert history_model(history_keys=6).dial is None


def test_starting_from_a_model_with_a_history_head_keeps_it_or_says_how(tmp_path):
    """--init_from a model with a history head into one without (say --events_only without --history_keys) would
    drop the head and silently change the codes: refused, naming the flags; with them, every tensor is kept; into
    a head that reads more (a dial; for the event MLP, the frame phase), that head starts afresh, not half loaded."""
    from train_action_to_latent import start_from
    path = tmp_path / "action_to_latent.safetensors"
    trained = history_model(history_keys=6)
    torch.nn.init.normal_(trained.history_head[-1].weight)
    save_weights(path, trained, {"kind": "action_to_latent", "game": "breakout", "hparams": trained.hparams})
    wm_meta = {"game": "breakout", "hparams": {"num_tokens": 1, "codebook_size": 4, "event_places": [[1, 2], [3, 4]]}}
    with pytest.raises(UserError, match="--history_keys 6"):
        start_from(history_model(), str(path), wm_meta)
    kept = history_model(history_keys=6)
    start_from(kept, str(path), wm_meta)
    assert all(torch.equal(v, kept.state_dict()[k]) for k, v in trained.state_dict().items())
    dialled = history_model(history_keys=6, dial=([0, 0, 1, -1], 3.5))   # a head with more inputs starts afresh
    start_from(dialled, str(path), wm_meta)
    assert dialled.history_head[-1].weight.abs().sum() == 0
    assert all(torch.equal(v, dialled.state_dict()[k]) for k, v in trained.state_dict().items() if "history_" not in k)
    phased = history_model(history_keys=6, frame_phases=4)   # so does an event MLP that reads more (the phase)
    start_from(phased, str(path), wm_meta)
    assert not any(torch.equal(v, phased.state_dict()[k]) for k, v in trained.state_dict().items() if "event_out" in k)
    assert all(torch.equal(v, phased.state_dict()[k]) for k, v in trained.state_dict().items() if "event_out" not in k)


def test_history_only_training_inputs_are_those_of_the_model(tiny_data, tiny_models):
    """The cached inputs --history_only trains on give the same code logits as the model itself, on every
    transition, the first steps of an episode (repeated frames, NOOP keys) included."""
    from train_action_to_latent import CachedBatches, PairWindows, frozen_inputs, train_only
    _, palette, _ = load_world_model(tiny_models / "world_model.safetensors")
    files = gd.split_episodes(tiny_data, "train")[:2]
    a2l = ActionToLatent("v2", 4, len(palette), 2, 1, 4, width=8, depth=1, past_actions=2, positional=True,
                         num_events=3, event_context=5, event_width=4, history_keys=6, dial=([0, 0, 1, -1], 2.5),
                         dial_levels=True)
    torch.nn.init.normal_(a2l.history_head[-1].weight)
    a2l.history_head[0].running_var.fill_(4.0)   # not the identity, so the eval-mode statistics are used
    train_only(a2l, "history_")
    assert all(n.startswith("history_") for n, p in a2l.named_parameters() if p.requires_grad)
    windows = gd.GameplayWindows(files, 5, 2, palette.to_index, a2l.keys_seen, a2l.dial)
    pairs = {f.stem: {"codes": np.zeros((len(windows.episode(e)["actions"]), 1), np.int16)} for e, f in enumerate(files)}
    rows = frozen_inputs(a2l, PairWindows(windows, pairs), "cpu")
    assert set(rows) == {"input", "base", "codes", "keys", "starts"} and a2l.training
    inputs, base, codes, keys, starts = (rows[k] for k in ("input", "base", "codes", "keys", "starts"))
    assert len(inputs) == len(base) == len(codes) == len(keys) == len(starts) == len(windows)
    # --dial_noise turns the dial again from the kept keys: without noise the same inputs, with it only the dial's
    n_dial = a2l.dial_columns
    assert n_dial == (3 + 3 * 3) * 7
    assert torch.equal(a2l.dial_features(keys, starts), inputs[:, -n_dial:])
    rows = {"input": inputs, "base": base, "codes": codes}
    calm = next(iter(CachedBatches(rows, 64, 0, (a2l, keys, starts, 0.0))))
    noisy = next(iter(CachedBatches(rows, 64, 0, (a2l, keys, starts, 1.0))))
    plain = next(iter(CachedBatches(rows, 64, 0)))
    assert torch.equal(calm["input"], plain["input"]) and torch.equal(noisy["input"][:, :-n_dial], plain["input"][:, :-n_dial])
    assert not torch.equal(noisy["input"][:, -n_dial:], plain["input"][:, -n_dial:])
    a2l.eval()
    with torch.no_grad():
        cached = base + a2l.history_head(inputs)
        for i in [0, 1, 2, 5, len(windows) - 1]:
            item = windows[i]
            direct = a2l(torch.tensor([item["action"]]), item["context"][None], item["past_actions"][None],
                         dial=item["dial"][None])
            dials = gd.paddle_dials(windows.episode(item["episode"])["actions"], a2l.dial)
            assert item["dial"] == dials[max(0, item["t"] - 6)]
            assert torch.allclose(cached[i], direct.flatten(), atol=1e-4), i


def test_event_mlp_only_training_inputs_are_those_of_the_model(tiny_data, tiny_models):
    """The cached inputs --event_mlp_only trains on give the same event odds as the model itself, which reads the
    episode's frame phase; their labels are the real events and the focus rows FIRE with no ball on screen. The
    event head reads more frames than the history head (history_context), whose inputs stay those of 5 frames."""
    from train_action_to_latent import CachedBatches, PairWindows, frozen_inputs, train_only
    wm, palette, _ = load_world_model(tiny_models / "world_model.safetensors")
    files = gd.split_episodes(tiny_data, "train")[:2]
    a2l = ActionToLatent("v2", 4, len(palette), 2, 1, 4, width=8, depth=1, past_actions=2, positional=True,
                         num_events=3, event_context=7, event_width=4, history_keys=6, frame_phases=4,
                         history_context=5)
    assert a2l.hparams["history_context"] == 5 and a2l.hparams["frame_phases"] == 4
    with_7 = ActionToLatent("v2", 4, len(palette), 2, 1, 4, width=8, depth=1, past_actions=2, positional=True,
                            num_events=3, event_context=7, event_width=4, history_keys=6)
    assert with_7.history_head[1].in_features - a2l.history_head[1].in_features == 2 * (3 * 4 + 1)
    train_only(a2l, "event_out")
    assert {n.split(".")[0] for n, p in a2l.named_parameters() if p.requires_grad} == {"event_out"}
    windows = gd.GameplayWindows(files, 7, 2, palette.to_index, a2l.keys_seen, frame_phase=True)
    pairs = {f.stem: {"codes": np.zeros((len(windows.episode(e)["actions"]), 1), np.int16)} for e, f in enumerate(files)}
    both = frozen_inputs(a2l, PairWindows(windows, pairs), "cpu", events=(wm, palette, 1))   # one pass, both heads'
    rows = frozen_inputs(a2l, PairWindows(windows, pairs), "cpu", history=False, events=(wm, palette, 1))
    assert set(rows) == {"event_input", "events", "fire"} and all(torch.equal(v, both[k]) for k, v in rows.items())
    assert torch.equal(both["input"], frozen_inputs(a2l, PairWindows(windows, pairs), "cpu")["input"])
    inputs, events, fire_rows = rows["event_input"], rows["events"], rows["fire"]
    assert len(inputs) == len(events) == len(fire_rows) == len(windows) and a2l.training
    focused = next(iter(CachedBatches({"input": inputs, "events": events, "fire": fire_rows}, 64, 0,
                                      focus=(fire_rows, 0.5))))
    assert focused["fire"].float().mean() >= 0.5 > fire_rows.float().mean()
    a2l.eval()
    with torch.no_grad():
        cached = a2l.event_out(inputs)
        for i in [0, 1, 2, 5, len(windows) - 1]:
            item = windows[i]
            act, ctx, past = torch.tensor([item["action"]]), item["context"][None], item["past_actions"][None]
            phase = item["frame_phase"][None]
            assert int(phase) == atari_env.recorded_frame_phase(gd.load_episode(files[item["episode"]], ("meta",))["meta"])
            direct = a2l.forward_events(act, ctx, past, phase=phase)[1]
            assert torch.allclose(cached[i], direct[0], atol=1e-4), i
            assert not torch.allclose(direct, a2l.forward_events(act, ctx, past, phase=(phase + 1) % 4)[1])
            assert torch.equal(a2l.forward_events(act, ctx, past, phase=phase)[0], a2l.forward_events(act, ctx, past)[0])
            nxt = item["next"][None].long()
            assert events[i] == wm.transition_events(palette, ctx[:, -1].long(), nxt)[0]
            assert fire_rows[i] == (item["action"] == 1 and not metrics.ball_visible(ctx[:, -1], palette.colors)[0])
