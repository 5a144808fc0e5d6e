"""Compile every Triton kernel of ``fast/`` for a Hopper GPU (sm_90) on a machine WITHOUT a GPU.

Why: the interpreter (``TRITON_INTERPRET=1``) runs kernels as NumPy and misses whole classes of bugs
that only the compiler sees — a loop-carried variable whose type changes (``acc = 0`` then a float
tensor), a ``tl.dot`` tile under 16, a shape/layout the backend rejects, an op the PTX assembler
refuses. ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR → TTGIR →
LLVM IR → PTX → cubin with the ``ptxas`` that ships in the Triton wheel) and needs no driver.

How: the public ops are called as usual on small CPU tensors in a process where the interpreter is
OFF. Every launch ``kernel[grid](*args, **kwargs)`` is intercepted: the arguments are turned into a
compile signature (tensor → ``*fp32``/``*bf16``/…, int → ``i32``/``i64``, float → ``fp32``), the
constexprs and launch options (``num_warps``, ``num_stages``, …) are kept, and the kernel is compiled
for sm_90 instead of launched. An autotuned kernel is compiled once per config. Outputs are left as
zeros (``fast.utils.empty`` is patched), so the host code after a launch keeps going and the backward
kernels are reached too. Numbers are not checked here: the interpreter tests do that.

Limits: it compiles with the local Triton (3.7 as pinned; for a GPU machine with 3.6, CONTRIBUTING.md says
how to run this with 3.6 in a throwaway env, done once with 237 variants, 0 failed) and without the
runtime's value specialisations (``== 1`` / divisible-by-16 hints), so it proves the kernels compile,
not that every specialisation the runtime picks does.

    python -m fast.devtools.compile_check            # every dtype, every autotune config (~5 min on 2 cores)
    python -m fast.devtools.compile_check --quick    # fp32 + bf16, first config (~4 min, one core; make test)

Run it without ``TRITON_INTERPRET``; it prints one line per compiled kernel variant.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

CAPABILITY = 90  # H100 / H200
_DT = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int32": "i32",
    "int64": "i64",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
    "int16": "i16",
}
_LAUNCH_OPTS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


class CompileLog:
    def __init__(self):
        self.done: dict[tuple, float] = {}  # (kernel, signature, constexprs, options) -> seconds
        self.failures: list[tuple[str, str]] = []
        self.compiled: list[tuple] = []  # (kernel, signature, constexprs, options, CompiledKernel)


def _arg_type(v):
    import torch

    if isinstance(v, torch.Tensor):
        return "*" + _DT[str(v.dtype).replace("torch.", "")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    if v is None:
        return "constexpr"
    raise TypeError(f"cannot type kernel argument {v!r}")


def _compile(log: CompileLog, fn, args, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in fn.params]
    bound = dict(zip(names, args, strict=False))  # the rest come as keywords
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTS}
    bound.update(kwargs)
    for p in fn.params:  # defaults of omitted parameters
        if p.name not in bound and p.has_default:
            bound[p.name] = p.default
    signature, constexprs = {}, {}
    for p in fn.params:
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        else:
            t = _arg_type(v)
            signature[p.name] = t
            if t == "constexpr":
                constexprs[p.name] = v
    key = (
        fn.__name__,
        tuple(signature.items()),
        tuple(sorted(constexprs.items())),
        tuple(sorted(opts.items())),
    )
    if key in log.done:
        return
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        ck = triton.compile(src, target=GPUTarget("cuda", CAPABILITY, 32), options=opts)
        log.compiled.append((fn.__name__, signature, constexprs, opts, ck))
    except Exception as e:  # collect every failure, report all of them at the end
        msg = str(e).strip().splitlines()
        log.failures.append((f"{fn.__name__} {constexprs} {opts}", "\n".join(msg[-12:])))
    log.done[key] = time.perf_counter() - t0


@contextlib.contextmanager
def compile_instead_of_launch(log: CompileLog, all_configs: bool = True):
    """Within this context every Triton launch compiles for sm_90 and returns without running."""
    import torch
    from triton.runtime import autotuner as at
    from triton.runtime import jit

    import fast.utils as fu

    saved = (jit.JITFunction.run, at.Autotuner.run, fu.triton_usable, fu.empty)

    def jit_run(self, *args, grid, warmup, **kwargs):
        _compile(log, self, args, dict(kwargs))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        for cfg in self.configs if all_configs else self.configs[:1]:
            self.fn.run(*args, grid=None, warmup=False, **{**kwargs, **cfg.all_kwargs()})

    def zeros(shape, *, dtype, device):
        return torch.zeros(shape, dtype=dtype, device=device)

    jit.JITFunction.run = jit_run
    at.Autotuner.run = tuner_run
    fu.triton_usable = lambda t: True
    fu.empty = zeros
    patched_modules = [
        m
        for m in list(sys.modules.values())
        if getattr(m, "__name__", "").startswith("fast.") and getattr(m, "empty", None) is saved[3]
    ]
    for m in patched_modules:
        m.empty = zeros
    try:
        yield log
    finally:
        jit.JITFunction.run, at.Autotuner.run, fu.triton_usable, fu.empty = saved
        for m in patched_modules:
            m.empty = saved[3]


def _workload(dtypes):
    """Call every public Triton op forward + backward over the dtypes and flags that select kernels."""
    import torch

    from fast import attention, dac_kl, divergences, match_triton, span
    from fast.ladder import SELECT_STEPS as SELECT_LADDER
    from fast.ladder import STEPS as LADDER

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    for dtype in dtypes:
        # divergences: every name (one kernel code each)
        for name in divergences.PARAMS:
            t, s = rnd(3, 300, dtype=dtype), rnd(3, 300, dtype=dtype).requires_grad_()
            divergences.divergence(name, t, s, backend="triton").backward()
        # attention: causal, sliding window, non-causal, odd head dim, GQA
        for causal, window, D, hq, hkv in (
            (True, None, 64, 2, 2),
            (True, 7, 64, 4, 2),
            (False, None, 32, 2, 1),
            (True, 5, 20, 2, 2),
            (True, None, 128, 1, 1),
        ):
            if dtype == torch.float32 and D == 128:
                continue
            q = rnd(1, hq, 40, D, dtype=dtype).requires_grad_()
            k = rnd(1, hkv, 40, D, dtype=dtype).requires_grad_()
            v = rnd(1, hkv, 40, D, dtype=dtype).requires_grad_()
            out, lse = attention.flash_attention_with_lse(
                q, k, v, causal=causal, window=window, backend="triton"
            )
            (out.float().sum() + lse.sum()).backward()
        # DAC-KL: the three bound semantics, the options that change the kernels
        for cfg in (
            {"bounds": "value"},
            {"bounds": "mass"},
            {"bounds": "nontarget"},
            {"bounds": "value", "normalize": False},
            {"bounds": "mass", "target": False},
        ):
            t, s = rnd(4, 300, dtype=dtype), rnd(4, 300, dtype=dtype).requires_grad_()
            up = torch.full((4,), 0.9, requires_grad=True)
            lo = torch.full((4,), 0.2, requires_grad=True)
            loss, kept, _ = dac_kl.dac_kl(t, s, up, lo, backend="triton", **cfg)
            (loss.sum() + kept.sum()).backward()
        # MATCH: token / block retrieval, joint / gated, GQA, D = 128, top_k = 0; decode (cached summaries).
        # block_size >= 16: the block-major retrieved part (one key chunk per block; 128: several chunks)
        for bs, K, mode, hq, hkv, D, w in (
            (1, 3, "joint", 2, 2, 64, 7),
            (4, 2, "gated", 4, 2, 32, 8),
            (16, 2, "joint", 2, 1, 128, 16),
            (8, 0, "joint", 1, 1, 64, 8),
            (32, 3, "gated", 4, 2, 64, 32),
            (128, 2, "joint", 2, 1, 64, 128),
        ):
            if dtype == torch.float32 and D == 128:
                continue
            q = rnd(1, hq, 300, D, dtype=dtype).requires_grad_()
            k = rnd(1, hkv, 300, D, dtype=dtype).requires_grad_()
            v = rnd(1, hkv, 300, D, dtype=dtype).requires_grad_()
            gl = torch.zeros(1, hq, 300, requires_grad=True) if mode == "gated" else None
            cfg = dict(window=w, top_k=K, block_size=bs, mode=mode, scale=D**-0.5)
            out = match_triton.match_attention_triton(q, k, v, gate_logit=gl, **cfg)
            out.float().sum().backward()
            if K == 0 or D == 128:
                continue
            summ = match_triton.block_summaries_triton(k.detach(), bs) if bs > 1 else None
            match_triton.match_decode_triton(
                q[:, :, -1:].detach(),
                k.detach(),
                v.detach(),
                summaries=summ,
                gate_logit=None if gl is None else gl[:, :, -1:].detach(),
                **cfg,
            )
        # the selection with the tensor-core band and with the exact pass (tokens, blocks; GQA)
        q, k = rnd(1, 4, 300, 64, dtype=dtype), rnd(1, 2, 300, 64, dtype=dtype)
        for tc in (True, False):
            with match_triton.select_tensor_cores(tc):
                for bs, K in ((1, 5), (16, 3), (4, 32)):
                    match_triton.retrieve_triton(q, k, window=32, top_k=K, block_size=bs, scale=0.125)
        # span loss, plain and squared
        for squared in (False, True):
            t, s = rnd(2, 9, 300, dtype=dtype), rnd(2, 9, 300, dtype=dtype).requires_grad_()
            spans = span.spans_to_tensor([[(0, 3), (4, 8)], [(2, 9)]])
            span.span_loss(t, s, spans, squared=squared, backend="triton").backward()
        # the attention ladder (fast/ladder, teaching kernels): every step, causal with a window, D padded
        q, k, v = (rnd(1, 2, 40, 24, dtype=dtype) for _ in range(3))
        for step in LADDER.values():
            step(q, k, v, causal=True, window=7)
        # the retrieval ladder: tokens and blocks of 4, top_k 3
        for bs in (1, 4):
            for step in SELECT_LADDER.values():
                step(q, k, window=8, top_k=3, block_size=bs)


def all_kernels() -> dict[str, str]:
    """Every launched ``@triton.jit`` kernel defined in a ``fast`` module: {kernel name: module}. Found by
    importing each module of the package (devtools excepted) and reading its globals, autotuned kernels
    unwrapped. convention: launched kernels are named ``*_kernel``; the other jit functions (``_name``) are
    device helpers, inlined into the kernels that call them."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    import fast

    found = {}
    for info in pkgutil.walk_packages(fast.__path__, "fast."):
        if info.name.startswith("fast.devtools"):
            continue
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            while isinstance(obj, (Autotuner, Heuristics)):
                obj = obj.fn
            if (
                isinstance(obj, JITFunction)
                and obj.__module__ == info.name
                and obj.__name__.endswith("_kernel")
            ):
                found[obj.__name__] = info.name
    return found


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(
            "run without TRITON_INTERPRET: this compiles kernels, it does not interpret them", file=sys.stderr
        )
        return 2
    import torch

    quick = "--quick" in sys.argv[1:]
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16)
    log = CompileLog()
    t0 = time.perf_counter()
    with compile_instead_of_launch(log, all_configs=not quick):
        _workload(dtypes)
    for (name, _sig, cx, opts), dt in sorted(log.done.items(), key=lambda kv: kv[0][0]):
        print(f"compiled {name:28s} {dt:6.2f}s  constexprs={dict(cx)} options={dict(opts)}")
    compiled = {name for name, *_ in log.done}
    kernels = all_kernels()
    print(f"{len(kernels)} kernels in fast/: {', '.join(sorted(kernels))}")
    for name, module in sorted(kernels.items()):
        if name not in compiled:
            log.failures.append(
                (f"{name} ({module})", "never compiled: add a call that launches it to _workload")
            )
    for what, msg in log.failures:
        print(f"FAILED {what}\n{msg}\n")
    print(
        f"{len(log.done)} kernel variants for sm_{CAPABILITY}, {len(log.failures)} failed, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return 1 if log.failures else 0


if __name__ == "__main__":
    sys.exit(main())
