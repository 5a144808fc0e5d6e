"""`make gpu-check`: on a CUDA machine, run the kernel tests compiled + the `gpu` tests + the benchmarks.

Installs nothing (it expects torch/triton/numpy/pytest/hypothesis to be there, and works on a machine
without a package registry) and uses whatever ``python3`` runs it. Writes ``gpu_report.md`` (plus the raw
pytest log and the benchmark report) to ``$OUT`` when set, else to ``benchmarks/results/``. Each stage has
its own time limit so the whole check ends in under 8 minutes:

    tests       <= TEST_LIMIT_S   (pytest, notebooks deselected, xdist if present)
    benchmarks  <= BENCH_LIMIT_S  (benchmarks/run_all.py --full)
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = pathlib.Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
TEST_LIMIT_S = int(os.environ.get("GPU_CHECK_TEST_LIMIT_S", "240"))
BENCH_LIMIT_S = int(os.environ.get("GPU_CHECK_BENCH_LIMIT_S", "200"))


def sh(cmd: list[str], limit: int, log: pathlib.Path, env=None) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc, text = 124, out + err + f"\n[gpu-check] TIMED OUT after {limit}s\n"
    log.write_text(text)
    return rc, time.perf_counter() - t0, text


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    import torch

    # GPU_CHECK_ALLOW_CPU=1 is for tests/test_gpu_check.py only: it checks this script's plumbing on CPU
    plumbing_only = os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"
    env = dict(os.environ)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("CI", "1")  # derandomised hypothesis: a rerun checks the same examples
    env["MGSR_OPTIONAL_DATA"] = "1"  # no registry there: data-only tests skip if their package is absent
    if not torch.cuda.is_available() and not plumbing_only:
        print("make gpu-check needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    import triton

    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        smi = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = "no nvidia-smi"
    header = [
        "# GPU check report",
        "",
        f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}",
        f"- GPU: {smi or (torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}",
        f"- capability: {torch.cuda.get_device_capability() if torch.cuda.is_available() else 'none'}; "
        f"TRITON_INTERPRET for the tests: {env.get('TRITON_INTERPRET', 'unset (compiled kernels)')}",
        "",
    ]

    pytest_cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "not notebook",
        "-p",
        "no:cacheprovider",
        "-rfEs",
        "--durations=15",
        "--junitxml",
        str(OUT / "junit.xml"),
    ]
    pytest_cmd += os.environ.get("GPU_CHECK_PYTEST_ARGS", "").split()
    try:
        import xdist  # noqa: F401

        pytest_cmd += ["-n", "8"]
    except ImportError:
        pass
    rc_t, dt_t, text_t = sh(pytest_cmd, TEST_LIMIT_S, OUT / "pytest.log", env)
    summary = [ln for ln in text_t.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b", ln)]
    failures = [ln for ln in text_t.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    skips = [ln for ln in text_t.splitlines() if ln.startswith("SKIPPED")]  # a gpu test must not be here

    bench_cmd = [sys.executable, "benchmarks/run_all.py", "--out", str(OUT / "bench.md")]
    bench_cmd += os.environ.get("GPU_CHECK_BENCH_ARGS", "--full").split()
    # pytest finds the project through its `pythonpath` setting; the benchmark scripts need it on PYTHONPATH
    # here, since this machine need not have the editable install of `make venv`
    bench_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    rc_b, dt_b, text_b = sh(bench_cmd, BENCH_LIMIT_S, OUT / "bench.log", bench_env)
    bench_md = (OUT / "bench.md").read_text() if (OUT / "bench.md").exists() else text_b[-4000:]

    report = header + [
        f"## Tests (compiled kernels), rc={rc_t}, {dt_t:.0f}s",
        "",
        "```",
        *(summary[-3:] or text_t.splitlines()[-20:]),
        *failures[:60],
        *skips[:30],
        "```",
        "",
        f"## Benchmarks, rc={rc_b}, {dt_b:.0f}s",
        "",
        bench_md,
    ]
    (OUT / "gpu_report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0 if (rc_t == 0 and rc_b == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
