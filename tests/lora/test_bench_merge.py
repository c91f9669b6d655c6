"""A smoke run of the merge benchmark on a tiny base: it runs, and reports both paths."""

from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.mark.slow
def test_bench_merge_smoke(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_merge.py")
    spec = importlib.util.spec_from_file_location("bench_merge", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = {"hidden": 64, "intermediate": 128, "layers": 2, "vocab": 256, "rank": 4}
    rows = bench.run(str(tmp_path), dims=tiny)
    assert [r["mode"] for r in rows] == ["savepoint", "peft"]
    assert all(r["wall_s"] > 0 and r["peak_rss_mb"] >= 0 for r in rows)
    assert os.path.exists(tmp_path / "out-savepoint-0" / "config.json")
