"""Is one evaluation really better than another? A paired comparison of two evaluate_world_model.py reports.

    python evaluate_world_model.py --game breakout --starts 128 --out_dir /tmp/eval_a                 # weights A
    python evaluate_world_model.py --game breakout --starts 128 --checkpoint_dir B --out_dir /tmp/eval_b
    python benchmarks/compare_evaluations.py /tmp/eval_a/report.json /tmp/eval_b/report.json

Both runs must use the same held-out start points (same data, --seed, --starts, --horizon). Open-loop
numbers are means over few rollouts, and one rollout that loses the paddle moves paddle_err_px by a pixel
at 32 starts, so a difference is only worth acting on when its interval excludes 0. The interval is a
paired bootstrap over start points (the same resampled starts for A and B): 2.5th to 97.5th percentile of
B - A. psnr@t is recomputed from the resampled mean MSE, as the report computes it; object metrics are means
of per-start means (the report pools frames instead: the same for ball_presence_agree, and for paddle_err_px
when every real frame shows the paddle; ball_err_px, counted only where both frames show a ball, differs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import metrics  # noqa: E402

HIGHER_IS_BETTER = {"paddle_err_px": False, "ball_presence_agree": True, "ball_missed": False,
                    "ball_spurious": False, "ball_err_px": False}


def load_per_start(path: str) -> list[dict]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}")
    if "per_start" not in report:
        raise SystemExit(f"error: {path} has no per-start values; re-run evaluate_world_model.py to write them")
    return report["per_start"]


def statistic(name: str, rows: np.ndarray) -> np.ndarray:
    """rows: (resamples, starts) values of one metric -> (resamples,) the report's number for each resample."""
    if name.startswith("mse@"):
        return np.array([metrics.psnr_from_mse(m) for m in rows.mean(1)])
    return np.nanmean(rows, axis=1)


def compare(a: list[dict], b: list[dict], resamples: int = 2000, seed: int = 0) -> list[tuple]:
    if [(r["episode"], r["step"]) for r in a] != [(r["episode"], r["step"]) for r in b]:
        raise SystemExit("error: the two reports do not share their start points (same data, --seed, --starts and "
                         "--horizon needed)")
    names = [k for k in a[0] if k not in ("episode", "step") and k in b[0]]
    idx = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    out = []
    for name in names:
        va = np.array([r[name] for r in a], dtype=float)
        vb = np.array([r[name] for r in b], dtype=float)
        mean_a, mean_b = statistic(name, va[None]), statistic(name, vb[None])
        diff = statistic(name, vb[idx]) - statistic(name, va[idx])
        lo, hi = np.nanpercentile(diff, [2.5, 97.5])
        label = name.replace("mse@", "psnr@")
        better_up = HIGHER_IS_BETTER.get(name, True)
        verdict = "same" if lo <= 0 <= hi else ("B better" if (lo > 0) == better_up else "A better")
        out.append((label, float(mean_a[0]), float(mean_b[0]), float(mean_b[0] - mean_a[0]), float(lo), float(hi),
                    verdict))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report_a", help="report.json of run A (e.g. the shipped weights)")
    p.add_argument("report_b", help="report.json of run B (the candidate)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    if args.resamples < 1:
        p.error("--resamples must be at least 1")
    a, b = load_per_start(args.report_a), load_per_start(args.report_b)
    print(f"A = {args.report_a}\nB = {args.report_b}\n{len(a)} paired start points, "
          f"{args.resamples} bootstrap resamples\n")
    print("| metric | A | B | B - A | 95% interval | verdict |\n|---|---|---|---|---|---|")
    for label, ma, mb, d, lo, hi, verdict in compare(a, b, args.resamples, args.seed):
        print(f"| {label} | {ma:.3f} | {mb:.3f} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {verdict} |")


if __name__ == "__main__":
    sys.exit(main())
