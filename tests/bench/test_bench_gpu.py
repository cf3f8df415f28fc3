"""bench/bench_gpu.py --dry: every row of the GPU benchmark (holiclip H = 1 and Psi_CLS H = 5, eager and
compiled, open_clip_train's main on the same shards, each at two worker counts) runs on CPU, is measured
from the trainers' own logs and lands in the table."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_dry_run_measures_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # open_clip_train's pipeline runs with webdataset 0.2.86 and pandas from a folder the bench fills with
    # pip, as bench_data.py does: here under the tests' temporary cache root
    from holiclip.io import cache_root

    site = cache_root() / "bench-webdataset-0.2.86"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry", "--work-dir", str(tmp_path),
                           "--baseline-site", str(site)], capture_output=True, text=True, env=env, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| system")]
    seen = {(r[0], r[3], r[4]) for r in rows}
    assert seen == {(label, mode, w) for label in ("open_clip_train.main", "holiclip H = 1 (O2M)", "holiclip Psi_CLS H = 5")
                    for mode in ("eager", "compile") for w in ("1", "2")}
    for system, h, m, mode, workers, rate, vs, wait, *_ in rows:
        assert float(rate) > 0, rows
        assert re.fullmatch(r"\d+\.\d\dx", vs) and (vs == "1.00x" or system != "open_clip_train.main")
        assert 0.0 <= float(wait.rstrip("%")) <= 100.0
        assert (h, m) == {"open_clip_train.main": ("1", "1"), "holiclip H = 1 (O2M)": ("1", "5")}.get(system, ("5", "5"))
