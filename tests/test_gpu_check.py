"""`make gpu-check` can only really run on a GPU; this checks its plumbing on CPU: it refuses to run
without CUDA, and (with the test-only override) runs pytest + the benchmark runner and writes a report
whose summary reflects what pytest said."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(tmp_path), **extra)
    return subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


# on a GPU machine these would only re-run the real check from inside itself
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="plumbing checks for CPU machines")


def test_refuses_without_cuda(tmp_path):
    p = _run(tmp_path)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr


def test_plumbing_writes_a_report(tmp_path):
    p = _run(
        tmp_path,
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_PYTEST_ARGS="tests/test_tolerances.py",
        GPU_CHECK_BENCH_ARGS="--only attention",
    )
    report = (tmp_path / "gpu_report.md").read_text()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "## Tests (compiled kernels), rc=0" in report
    assert " passed" in report and "failed" not in report.split("## Benchmarks")[0]
    assert "## attention" in report and "FAILED" not in report
    assert (tmp_path / "pytest.log").exists() and (tmp_path / "junit.xml").exists()
    assert "TRITON_INTERPRET for the tests: 1" in report  # plumbing mode on CPU: interpreted, and it says so


def test_report_lists_failures_and_skips(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "import pytest\n\n\ndef test_planted_failure():\n    assert 1 == 2\n\n\n"
        "@pytest.mark.skip(reason='planted skip')\ndef test_planted_skip():\n    pass\n"
    )
    p = _run(
        tmp_path,
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_PYTEST_ARGS=str(planted),
        GPU_CHECK_BENCH_ARGS="--only attention",
    )
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    tests_part = (tmp_path / "gpu_report.md").read_text().split("## Benchmarks")[0]
    assert "## Tests (compiled kernels), rc=1" in tests_part
    assert "FAILED" in tests_part and "test_planted_failure" in tests_part
    assert "SKIPPED" in tests_part and "planted skip" in tests_part
