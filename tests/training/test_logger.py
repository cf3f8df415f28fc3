"""metrics.jsonl: the metric logger on resume."""
from __future__ import annotations

from holiclip.training.logger import MetricLogger
from holiclip.training.trainer import read_metrics


def test_resume_drops_unreadable_metric_rows_instead_of_failing(tmp_path):
    rows = [b'{"step": 1, "loss": 2.0}', b'{"step": 2, "loss": caf\xe9}', b'{"step": 3, "loss": 1.0}', b'{"loss": 0.5}']
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    logger = MetricLogger(tmp_path, tensorboard=False, start_step=3)
    assert logger.last_row == {"step": 3, "loss": 1.0}
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 3]
