"""Stage 4: encode every recorded transition into (episode, step, real action, latent codes).

    python collect_action_latent_pairs.py --game breakout
    python collect_action_latent_pairs.py --game breakout --live 10   # + 10 fresh random episodes

Stores integers only and refers to the recorded frames by (episode file, step): no frame is copied.
Per-episode results are written atomically under <data_dir>/latent_pairs/, so a rerun skips finished
episodes; they are tied to what decides the codes (a hash of the encoder, codebook, merges and palette) and redone
if that changes. A decoder fine-tune (`train_latent_action.py --freeze_encoder`) keeps them.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import atari_env
import gameplay_data as gd
from common import UserError, arg, atomic_write, parse_config, pick_device, run_main, save_json
from models.world_model import load_world_model, read_weights


@dataclass
class Config:
    """Encode recorded transitions with the trained latent action model."""
    game: str = arg("breakout", "game", choices=list(atari_env.GAMES))
    data_dir: str = arg("", "recorded episodes (default data/<game>)")
    world_model: str = arg("", "world model weights (default checkpoints/<game>/world_model.safetensors)")
    batch_size: int = arg(128, "transitions encoded per forward pass")
    live: int = arg(0, "first record this many fresh random-policy episodes into <data_dir>/live and encode them too")
    device: str = arg("auto", "auto, cuda, mps or cpu")
    threads: int = arg(2, "torch CPU threads")


# the world model's parts that decide a transition's codes; the decoder's ("dec", "head", ...) do not
ENCODER_PARTS = ("enc.", "enc_out.", "vq.")


def encoder_hash(path: str | Path) -> str:
    """A hash of everything that decides the codes: the encoder and codebook tensors, the code merges, the
    palette and the frames the encoder reads. Equal for a decoder fine-tuned with a frozen encoder."""
    tensors, meta = read_weights(path, "world_model")
    hp = meta["hparams"]
    h = hashlib.sha256(json.dumps([meta["palette"], hp.get("merged_codes"), hp.get("context"), hp.get("positional")]).encode())
    for name in sorted(k for k in tensors if k.startswith(ENCODER_PARTS)):
        t = tensors[name].contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def pairs_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "latent_pairs"


@torch.no_grad()
def encode_episode(model, palette, path: Path, batch_size: int, device) -> dict:
    """Latent codes of every transition t -> t+1 of one episode (context frames t-k+1..t, next t+1)."""
    ep = gd.load_episode(path, keys=("frames", "actions"))
    idx = torch.from_numpy(palette.to_index(ep["frames"]))
    T, k = len(ep["actions"]), model.context
    codes = []
    for s in range(0, T, batch_size):
        t = torch.arange(s, min(T, s + batch_size))
        hist = (t[:, None] + torch.arange(-k + 1, 1)[None]).clamp(min=0)   # repeat frame 0 before the start
        _, c, _ = model.encode(idx[hist].to(device), idx[t + 1].to(device))
        codes.append(c.cpu())
    return {"actions": ep["actions"], "codes": torch.cat(codes).numpy().astype(np.int16)}


def load_pairs(data_dir: str | Path, files: list[Path], world_model_path: str | Path) -> dict[str, dict]:
    """{episode file stem: {"actions", "codes"}} for the given episodes, checked against the model."""
    want = encoder_hash(world_model_path)
    out = {}
    for f in files:
        p = pairs_dir(data_dir) / f"{f.stem}.npz"
        if not p.exists():
            raise UserError(f"no latent pairs for {f.name}; run collect_action_latent_pairs.py first")
        with np.load(p, allow_pickle=False) as z:
            if "encoder" not in z.files or str(z["encoder"]) != want:
                raise UserError(f"{p} was encoded by another world model's encoder; rerun collect_action_latent_pairs.py")
            out[f.stem] = {"actions": z["actions"], "codes": z["codes"]}
    return out


def main(argv=None) -> None:
    cfg = parse_config(Config, argv)
    atari_env.game_spec(cfg.game)
    data_dir = Path(cfg.data_dir or f"data/{cfg.game}")
    wm_path = Path(cfg.world_model or f"checkpoints/{cfg.game}/world_model.safetensors")
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, palette, meta = load_world_model(wm_path, cfg.game, device)
    if cfg.live > 0:
        from record_videos import main as record_main
        live_dir = data_dir / "live"
        record_main(["--game", cfg.game, "--policy", "random", "--total_videos", str(cfg.live),
                     "--output_dir", str(live_dir), "--seed", "900000"])
    files = gd.list_episodes(data_dir)
    if cfg.live > 0:
        files += gd.list_episodes(data_dir / "live")
    tag = encoder_hash(wm_path)
    out = pairs_dir(data_dir)
    todo = []
    for f in files:
        p = out / f"{f.stem}.npz"
        if p.exists():
            with np.load(p, allow_pickle=False) as z:
                if "encoder" in z.files and str(z["encoder"]) == tag:
                    continue
        todo.append(f)
    print(f"{len(files) - len(todo)} of {len(files)} episodes already encoded with this world model")
    for f in tqdm(todo, unit="episode"):
        r = encode_episode(model, palette, f, cfg.batch_size, device)

        def write(tmp, r=r):
            with open(tmp, "wb") as fh:
                np.savez(fh, actions=r["actions"], codes=r["codes"], encoder=np.array(tag))
        atomic_write(out / f"{f.stem}.npz", write)

    pairs = load_pairs(data_dir, files, wm_path)
    names = atari_env.action_names(cfg.game)
    per_action: dict[int, Counter] = defaultdict(Counter)
    for r in pairs.values():
        for a, c in zip(r["actions"], r["codes"]):
            per_action[int(a)][tuple(int(x) for x in c)] += 1
    report = {"encoder": tag, "episodes": len(pairs), "transitions": int(sum(len(r["actions"]) for r in pairs.values())),
              "per_action": {}}
    print(f"{report['transitions']:,} transitions encoded; latents per action (top 5):")
    for a in range(len(names)):
        cnt = per_action.get(a, Counter())
        total = sum(cnt.values())
        top = cnt.most_common(5)
        report["per_action"][names[a]] = {"transitions": total, "distinct_latents": len(cnt),
                                         "top": [[list(k), v] for k, v in top]}
        shown = ", ".join(f"{'-'.join(map(str, k))}: {v / max(total, 1):.0%}" for k, v in top)
        print(f"  {names[a]:>6}: {total:>7,} transitions, {len(cnt)} distinct latents ({shown})")
    save_json(out / "report.json", report)
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    run_main(main)
