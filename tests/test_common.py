"""The shared helpers of common.py that the stage scripts' end-to-end tests do not pin down."""
import subprocess
import sys
from pathlib import Path

import pytest

from common import MetricLogger


def test_metric_log_reads_the_same_after_a_resume(tmp_path):
    """A resumed run rewrites metrics.csv: the rows from before the resume must read exactly as they did
    (steps as integers, metrics a step did not log left blank, not 25.0 and nan)."""
    log = MetricLogger(tmp_path, "test", {}, mode="disabled")
    log.log({"loss": 0.5}, 25)
    log.log({"loss": 0.25, "psnr": 30.0}, 50)
    before = (tmp_path / "metrics.csv").read_text()
    resumed = MetricLogger(tmp_path, "test", {}, mode="disabled", resume=True)
    resumed.log({"loss": 0.125}, 75)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "\n".join(lines[:3]) == before.strip()
    assert lines[3].startswith("75,") and lines[1] == "25,0.5,"


HEAP_PROBE = """
import sys
sys.path.insert(0, {root!r})
import common
def heap_size():
    heap = [l for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
    return sum(int(b, 16) - int(a, 16) for a, b in (l.split()[0].split("-") for l in heap))
took = {keep} and common.keep_freed_memory()
before = heap_size()
block = bytearray(64 << 20)   # over glibc's largest mmap threshold (32 MB): its own mmap by default
print(took, (heap_size() - before) >> 20)
"""


def probe_heap(keep: bool) -> tuple[str, int]:
    """-> (whether keep_freed_memory took, how many MB the heap grew by for a 64 MB block), in a fresh process."""
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE.format(root=root, keep=keep)], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """After keep_freed_memory a 64 MB block comes from malloc's heap, not a mmap of its own that is unmapped
    and page-faulted again every training step (common.keep_freed_memory); without it, a mmap."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    took, heap_growth_mb = probe_heap(True)
    if took != "True":
        pytest.skip("not glibc")
    assert heap_growth_mb >= 64
    assert probe_heap(False)[1] < 64
