"""benchmarks/profile_step.py's trace summary: GPU kernel time, and the GPU's idle time by the
kernel it waited for."""

import gzip
import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _event(name: str, start: float, duration: float, pid: int = 1) -> dict:
    return {"ph": "X", "pid": pid, "tid": 7, "ts": start, "dur": duration, "name": name}


def test_kernel_summary_times_kernels_and_the_idle_gaps_before_them(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    profile_step = importlib.import_module("profile_step")
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #1"}},
        _event("gemm", 0, 10),
        _event("small", 5, 2),  # inside gemm's span (another stream's overlap): no wait
        _event("norm", 15, 5),  # the GPU waited 5 us for it (busy until 10)
        _event("gemm", 20, 10),
        _event("norm", 32, 1),  # 2 us more
        _event("host_only", 100, 50, pid=2),  # not a GPU event
    ]
    trace = tmp_path / "run" / "host.trace.json.gz"
    trace.parent.mkdir()
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = profile_step.kernel_summary(tmp_path, steps=2, top=5, ops={"norm": "jit(f)/mul"})
    assert list(summary) == ["Stream #1"]
    line = summary["Stream #1"]
    assert line["total_us_per_step"] == pytest.approx((10 + 2 + 5 + 10 + 1) / 2)
    assert line["launches_per_step"] == pytest.approx(5 / 2)
    assert line["idle_us_per_step"] == pytest.approx((5 + 2) / 2)
    assert [k["name"] for k in line["top"]] == ["gemm", "norm", "small"]
    assert line["top"][0]["launches_per_step"] == pytest.approx(1.0)
    assert line["top_waits"] == [
        {"name": "norm", "op": "jit(f)/mul", "us_per_step": 3.5, "waits_per_step": 1.0}
    ]
