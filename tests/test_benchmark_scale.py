"""tools/benchmark_scale.py harness: a registered step runs in a subprocess and reports its own figures."""
import numpy as np
import pytest

from part_distill.benchmarks import scale as scale_benchmark


@pytest.mark.slow
def test_ranking_step_runs_in_a_subprocess_and_fits_what_it_generated(tmp_path):
    step = scale_benchmark.STEPS["ranking"]
    case = step["cases"]["tiny"]
    row = scale_benchmark.run_case("ranking", "tiny", str(tmp_path))
    # independent count of the classes the generator produced with >= 8 candidates (MIN_CANDIDATES)
    n = case["candidates"] // case["chunk_rows"]
    cls = np.concatenate([scale_benchmark._synthetic_chunk(c, case["chunk_rows"], case["classes"], 256, 0)[1]
                          for c in range(n)])
    assert row["classes_fitted"] == int((np.bincount(cls, minlength=case["classes"]) >= 8).sum())
    assert row["chunks"] == n
    assert row["peak_rss_mb"] > 0 and row["cpu_s"] > 0 and row["wall_s"] >= row["fit_s"]
    assert list(tmp_path.iterdir()) == []  # scratch removed
