"""Recording throughput with the random policy (frames written per second, compression included).

    python benchmarks/record_speed.py        # 40 episodes, 2 workers, into a temp folder
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workers", nargs="?", default="2", help="recording processes")
    workers = parser.parse_args().workers
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, str(ROOT / "record_videos.py"), "--policy", "random", "--total_videos", "40",
                        "--output_dir", d, "--workers", workers], check=True, capture_output=True, cwd=ROOT)
        m = json.loads((Path(d) / "manifest.json").read_text())
    run = m["last_run"]
    print(f"{workers} workers: {run['frames']:,} frames in {run['seconds']} s = {run['frames'] / run['seconds']:.0f} frames/s "
          f"(process start-up included); {m['disk_mb'] / m['frames'] * 1e5:.0f} MB per 100k frames on disk")
