"""Plumbing every stage script shares: CLI from a dataclass, clear errors, device choice, atomic
checkpoints without pickle, wandb that never needs the network, local metric logs."""
from __future__ import annotations

import argparse
import ctypes
import csv
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


class UserError(Exception):
    """Bad input from the user: printed as one line `error: ...`, exit code 2, nothing lost."""


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel; True if it
    took. By default every block over 128 kB-32 MB (a training batch's activations and gradients) is its own
    mmap, unmapped when torch frees it and page-faulted in anew the next step: a world-model training step on
    2 cores spent 42-44 % of its CPU time in the kernel, and with mmap off and no trimming it ran 2.2-2.4x
    faster (benchmarks/train_step_speed.py, README design notes). What jemalloc or tcmalloc do, without LD_PRELOAD or a
    system package. The price: the process keeps its peak memory until it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4   # mallopt's parameter numbers (malloc.h)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):   # not glibc (musl, ...): keep its defaults
        return False


def run_main(main_fn) -> None:
    """Run a script's main(); turn UserError (and Ctrl-C) into a clean one-line exit.

    SIGTERM and SIGINT both raise KeyboardInterrupt, so `kill` checkpoints like Ctrl-C does (a
    background job started from a script has SIGINT ignored, which would otherwise lose work)."""
    import signal
    keep_freed_memory()

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        main_fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- CLI from a dataclass
def parse_config(cls, argv=None, presets: dict[str, dict] | None = None, description: str | None = None):
    """Build an argparse CLI from a dataclass whose fields carry `metadata={"help": ...}`.

    Every field is accepted as --name-with-dashes and --name_with_underscores. `--preset NAME` (when
    presets are given) replaces the defaults before explicit flags are applied, so flags always win.
    """
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name != "preset"]
    defaults = cls()
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="named bundle of defaults: " + "; ".join(
                                f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in presets.items()))
    for f in fields:
        default = getattr(defaults, f.name)
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            typ = type(default) if default is not None else f.metadata.get("type", str)
            kw["type"] = typ
        # Show the dataclass default in --help (argparse.SUPPRESS hides it otherwise).
        kw["help"] = f"{kw['help']} (default: {default})"
        parser.add_argument(*names, **kw)
    args = vars(parser.parse_args(argv))
    values = dataclasses.asdict(defaults)
    preset = args.pop("preset", None)
    if preset:
        values.update(presets[preset])
    values.update(args)
    cfg = cls(**values)
    if hasattr(cfg, "preset"):
        cfg.preset = preset or cfg.preset
    # what the user chose (flags and preset values), so --resume can restore everything else
    cfg.__dict__["_explicit"] = set(args) | set(presets[preset] if preset else ())
    return cfg


def was_given(cfg, name: str) -> bool:
    """Whether the user set `name` (a flag or the chosen preset) rather than leaving the default."""
    return name in cfg.__dict__.get("_explicit", set())


RUN_LOCAL = ("resume", "device", "threads", "wandb", "out_dir", "data_dir", "world_model", "eval_only")


def restore_config(cfg, saved: dict, fixed: tuple[str, ...] = ()):
    """--resume: continue the run as it was configured. Every hyperparameter not given on this command line
    comes from the checkpoint's config; one given explicitly overrides it (printed), except the `fixed`
    ones, which cannot change (given explicitly and different: a clear error). Where to write, device,
    threads and wandb mode always follow this command."""
    explicit = cfg.__dict__.get("_explicit", set())
    values = dataclasses.asdict(cfg)
    changed = []
    for name, old in saved.items():
        if name not in values or name in RUN_LOCAL or values[name] == old:
            continue
        if name not in explicit:
            values[name] = old
        elif name in fixed:
            raise UserError(f"the checkpoint was made with {name}={old!r}, but this run asks for {values[name]!r}")
        else:
            changed.append(f"{name} {old!r} -> {values[name]!r}")
    if changed:
        print("resume overrides the checkpoint's " + ", ".join(changed))
    new = type(cfg)(**values)
    new.__dict__["_explicit"] = explicit
    return new


def arg(default, help: str, **meta):
    """A dataclass field with a one-line help text (and optional choices)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


# ----------------------------------------------------------------------------- devices and threads
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX, read from Linux's /proc/cpuinfo).
    There torch's bfloat16 autocast makes a world-model training step ~1.5x faster (AMD Zen 4, README stage 3);
    elsewhere oneDNN would have to emulate bfloat16, which is not measured here, so the quick preset leaves it off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:   # not Linux
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    if name not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown --device {name!r}: use auto, cuda, mps or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- atomic files
def atomic_write(path: str | Path, write_fn, suffix: str = "") -> None:
    """Write through a temp file in the same folder, then rename: a killed run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save of plain containers/tensors only, so it loads with weights_only=True (no pickle code)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, kind: str) -> dict:
    """Load a checkpoint written by save_checkpoint; refuse corrupt or foreign files clearly.

    `kind` must equal the checkpoint's "kind" field; restore_config then checks the stored config.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickle with code in it...
        raise UserError(f"checkpoint {path} is corrupt or not a Neural Atari checkpoint ({type(e).__name__})") from e
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"checkpoint {path} is a {found!r} checkpoint, expected {kind!r}")
    return state


def strip_compile_prefix(state_dict: dict) -> dict:
    """torch.compile wraps modules and prefixes keys with `_orig_mod.`; store the plain names."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def save_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


# ----------------------------------------------------------------------------- logging
class MetricLogger:
    """Appends metrics to a local CSV (always) and to wandb (offline by default, never needs network)."""

    def __init__(self, out_dir: str | Path, project: str, config: dict, mode: str = "offline",
                 resume: bool = False, name: str | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        if not resume and self.csv_path.exists():
            self.csv_path.unlink()
        self.rows: list[dict] = []
        if resume and self.csv_path.exists():
            with open(self.csv_path) as f:
                # a blank cell is a metric that step did not log: it stays blank when the CSV is rewritten
                self.rows = [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        self.run = None
        if mode not in ("offline", "online", "disabled"):
            raise UserError(f"--wandb must be offline, online or disabled, not {mode!r}")
        if mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            try:
                import wandb
                if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
                    print("wandb: no login found, logging offline instead", file=sys.stderr)
                    mode = "offline"
                self.run = wandb.init(project=project, config=config, mode=mode, dir=str(self.out_dir),
                                      name=name, reinit="finish_previous")
            except Exception as e:  # wandb must never take a training run down
                print(f"wandb disabled ({type(e).__name__}: {e})", file=sys.stderr)
                self.run = None

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items() if _is_number(v)}}
        self.rows.append(row)
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, restval="")
            w.writeheader()
            w.writerows(self.rows)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1)


def _num(v: str) -> float | int:
    """A CSV cell read back on resume: integers (the step) stay integers, so the rewritten CSV reads as before."""
    for kind in (int, float):
        try:
            return kind(v)
        except (TypeError, ValueError):
            pass
    return float("nan")
