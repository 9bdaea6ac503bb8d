"""The shared helpers of common.py that the stage scripts' end-to-end tests do not pin down."""
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
