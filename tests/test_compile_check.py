"""Every Triton kernel of fast/ compiles for sm_90 (Hopper) on this GPU-less machine, and the check
itself catches a kernel that only the compiler rejects (the interpreter runs it happily)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, tmp_path, script=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MGSR_POISON_OUTPUTS")}
    env["TRITON_INTERPRET"] = "0"  # compile, do not interpret (importing fast sets 1 without CUDA)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, no cache hits
    env["PYTHONPATH"] = str(ROOT)
    if script:  # triton.jit reads the kernel's source, so it must live in a file
        (tmp_path / "broken.py").write_text(script)
        cmd = [sys.executable, str(tmp_path / "broken.py")]
    else:
        cmd = [sys.executable, "-m", "fast.devtools.compile_check", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run")
@pytest.mark.compile
def test_every_kernel_compiles_for_sm90(tmp_path):
    p = _run(["--quick"], tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    lines = p.stdout.splitlines()
    assert " 0 failed" in lines[-1]  # a kernel of fast/ that the workload never launches is a failure
    (found,) = [ln for ln in lines if " kernels in fast/: " in ln]
    kernels = found.split(": ", 1)[1].split(", ")
    assert len(kernels) >= 19 and "match_fwd_blocks_kernel" in kernels  # discovery finds the kernels
    for name in kernels:
        assert any(ln.split()[1:2] == [name] for ln in lines if ln.startswith("compiled")), name


@pytest.mark.compile
def test_the_check_catches_a_compile_only_bug(tmp_path):
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from fast.devtools.compile_check import CompileLog, compile_instead_of_launch

        @triton.jit
        def broken_kernel(x, y, n, B: tl.constexpr):
            o = tl.arange(0, B)
            v = tl.load(x + o, mask=o < n, other=0.0)
            acc = 0  # int32 here, float after the loop: the compiler refuses, the interpreter does not
            for i in range(0, 3):
                acc += v
            tl.store(y + o, acc, mask=o < n)

        log = CompileLog()
        with compile_instead_of_launch(log):
            broken_kernel[(1,)](torch.zeros(8), torch.zeros(8), 8, B=8)
        print("FAILURES", len(log.failures), log.failures[0][1] if log.failures else "")
    """)
    p = _run([], tmp_path, script=script)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FAILURES 1" in p.stdout and "Loop-carried variable" in p.stdout, p.stdout


def test_refuses_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "fast.devtools.compile_check", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "without TRITON_INTERPRET" in p.stderr


@pytest.mark.parametrize("all_configs", [True, False])
def test_every_autotune_config_is_compiled_only_in_the_full_check(all_configs):
    # the full check compiles each autotuned kernel once per config, --quick only its first config
    import triton
    from triton.runtime import autotuner as at

    from fast.devtools.compile_check import CompileLog, compile_instead_of_launch

    seen = []

    class Fn:
        def run(self, *args, grid, warmup, **kwargs):
            seen.append(kwargs["BLOCK_M"])

    class Tuner:
        configs = [triton.Config({"BLOCK_M": m}, num_warps=4) for m in (16, 32, 64)]
        fn = Fn()

    with compile_instead_of_launch(CompileLog(), all_configs=all_configs):
        at.Autotuner.run(Tuner(), 1, 2, grid=(1,), warmup=False)
    assert seen == ([16, 32, 64] if all_configs else [16])


def test_kernel_arguments_are_typed_as_triton_types_them():
    # the signature compile_check compiles: a bool is i1 (not an int), ints by range, floats fp32, tensors
    # by dtype
    from fast.devtools import compile_check as cc

    assert [cc._arg_type(v) for v in (True, False, 3, -(2**31), 2**31, 0.5, None)] == [
        "i1",
        "i1",
        "i32",
        "i32",
        "i64",
        "fp32",
        "constexpr",
    ]
    assert cc._arg_type(torch.zeros(1, dtype=torch.bfloat16)) == "*bf16"
    with pytest.raises(TypeError):
        cc._arg_type("a string")
