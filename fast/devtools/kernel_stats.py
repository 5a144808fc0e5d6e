"""Static cost of every Triton kernel of ``fast/`` on Hopper (sm_90a), without a GPU.

Each kernel x autotune config is compiled the way ``fast.devtools.compile_check`` does it (the public ops are
called on small CPU tensors and every launch compiles instead of running), then the cubin is read with
the tools bundled in the Triton wheel (``triton/backends/nvidia/bin``: ``ptxas``, ``cuobjdump``):

* ``ptxas -v`` on the kernel's PTX (same flags as Triton's own call): registers, spill bytes (stores +
  loads), the warnings (e.g. C7515 "wgmma serialized", C7510 ...), shared memory (static + Triton's
  dynamic allocation).
* SASS (``cuobjdump -sass``): loops are found from the control flow, a branch whose target lies at
  or before it is a loop back edge, and the loop body is [target, branch]. Per loop the instruction
  count (NOPs excluded: alignment padding) and the tensor-core (HGMMA), MUFU (exp2, rcp, ...), global
  load (LDG/LDGSTS) / store (STG), STSM/LDSM and barrier (BAR, WARPGROUP sync) counts. A loop nested
  in another is reported once per level; ``innermost`` marks the hot ones (no loop inside).

It is a proxy for cost, not a timing: issue-bound loops get faster with fewer SASS per iteration, but a
change may never lower the counts by dropping work the algorithm needs.

    python -m fast.devtools.kernel_stats                        # every kernel, every shipped config (minutes)
    python -m fast.devtools.kernel_stats --quick                # attention kernels only, bf16 D=64 and D=128
    python -m fast.devtools.kernel_stats --only attention_fwd   # kernels whose name contains the filter
    python -m fast.devtools.kernel_stats --fp32_attention --heads 32,64,100,128   # the attention fp32 tile
    python -m fast.devtools.kernel_stats --match                # MATCH at its GPU tiles, both retrieved paths
    python -m fast.devtools.kernel_stats --ladder               # the attention ladder fast/ladder, v1 .. v6
    python -m fast.devtools.kernel_stats --md benchmarks/results/kernel_stats.md --json stats.json

``--ladder`` compiles the six steps of ``fast/ladder`` (naive, blocked, online softmax, block skipping,
edge/interior split, log2 units) at bf16, D = 64 (``--heads``), T = 1024, causal without and with a window
of 256, their default 64 x 64 tiles, and prints one row per step: registers, spill bytes and the SASS count of
one iteration of each innermost loop, in code order (``docs/ladder.md`` keeps a copy of that table). It also
compiles the three steps of the retrieval ladder (``fast.ladder.SELECT_STEPS``: naive, tiled, running top-k)
at token retrieval, T = 1024, window 64, top_k 8 and 32, and prints them in a second table.

Configs are those the autotuner can pick for the workload (its ``early_config_prune`` is applied), at
long sequences (T a multiple of every block size), so the numbers are those of the GPU benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ARCH = "sm_90a"
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
# ptxas warnings, and its "info" lines with a (Cxxxx) code, e.g. "(C7515) Potential Performance Loss:
# wgmma.mma_async instructions are serialized ..." (the function name is dropped)
_WARN = re.compile(
    r"^ptxas[^:]*?(?:warning\s*:|info\s*:\s*(?=\(C\d+\)))\s*(.*?)(?: in the function '.*)?$", re.I | re.M
)


def toolchain() -> dict[str, str] | None:
    """Paths of the bundled ``ptxas`` and ``cuobjdump``, or None when the wheel lacks them."""
    try:
        import triton
    except ImportError:
        return None
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = {name: os.path.join(base, name) for name in ("ptxas", "cuobjdump")}
    if not all(os.access(p, os.X_OK) for p in tools.values()):
        return None
    return tools


@dataclasses.dataclass
class Loop:
    start: int  # byte offset of the first instruction (branch target)
    end: int  # byte offset of the back-edge branch
    sass: int  # instructions in the body, NOPs excluded
    hgmma: int
    mufu: int
    ldg: int
    stg: int
    stsm: int
    ldsm: int
    bar: int
    innermost: bool = True

    def record(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("start"), d.pop("end")
        return d


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(byte offset, instruction text without predicate-free comments) for every SASS instruction."""
    out = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(instr: str) -> str:
    parts = instr.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def _count(opcodes, *prefixes):
    return sum(any(op.startswith(p) for p in prefixes) for op in opcodes)


def find_loops(instrs: list[tuple[int, str]]) -> list[Loop]:
    """Loops = back edges: a branch at address a to target t <= a. Counts over [t, a] inclusive."""
    addrs = [a for a, _ in instrs]
    loops = []
    for i, (addr, ins) in enumerate(instrs):
        op = _opcode(ins)
        if not (op.startswith("BRA") or op.startswith("JMP")):
            continue
        m = re.search(r"\b(?:BRA|JMP)\S*\s+.*?(0x[0-9a-f]+)", ins)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target > addr or target == addr:  # forward branch, or the `BRA self` trap after EXIT
            continue
        j0 = addrs.index(target) if target in addrs else next(k for k, a in enumerate(addrs) if a >= target)
        body = [_opcode(s) for _, s in instrs[j0 : i + 1]]
        body = [b for b in body if not b.startswith("NOP")]
        loops.append(
            Loop(
                start=target,
                end=addr,
                sass=len(body),
                hgmma=_count(body, "HGMMA"),
                mufu=_count(body, "MUFU"),
                ldg=_count(body, "LDG"),
                stg=_count(body, "STG"),
                stsm=_count(body, "STSM"),
                ldsm=_count(body, "LDSM"),
                bar=_count(body, "BAR", "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR"),
            )
        )
    for lp in loops:
        lp.innermost = not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)
    return loops


def ptxas_info(ptx: str, tools: dict[str, str], opts: dict) -> dict:
    """Run the bundled ptxas -v on the PTX (Triton's flags) -> registers, spills, smem, warnings."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if opts.get("enable_fp_fusion", True) else ["--fmad=false"]
        cmd = [
            tools["ptxas"],
            "-lineinfo",
            *fmad,
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={ARCH}",
            src,
            "-o",
            os.path.join(d, "k.o"),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stdout + p.stderr
    regs = _PTXAS.search(log)
    spill = _SPILL.search(log)
    smem = _SMEM.search(log)
    warnings = sorted({w.strip() for w in _WARN.findall(log)})
    return dict(
        registers=int(regs.group(1)) if regs else -1,
        spill_bytes=(int(spill.group(1)) + int(spill.group(2))) if spill else 0,
        static_smem=int(smem.group(1)) if smem else 0,
        warnings=warnings,
    )


def sass_of(cubin: bytes, tools: dict[str, str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        p = subprocess.run([tools["cuobjdump"], "-sass", path], capture_output=True, text=True, check=True)
    return p.stdout


def _config_name(constexprs: dict, opts: dict, signature: dict) -> str:
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items() if v is not None]
    parts += [f"{k}={opts[k]}" for k in ("num_warps", "num_stages") if k in opts]
    return ",".join(parts)


def _dtype_of(signature: dict) -> str:
    ptrs = [t[1:] for t in signature.values() if t.startswith("*")]
    return ptrs[0] if ptrs else "-"


def stats_for(compiled, tools) -> list[dict]:
    """Records for the (kernel, signature, constexprs, options, CompiledKernel) tuples of a CompileLog."""
    records = []
    for name, signature, constexprs, opts, ck in compiled:
        info = ptxas_info(ck.asm["ptx"], tools, opts)
        loops = find_loops(parse_sass(sass_of(ck.asm["cubin"], tools)))
        records.append(
            dict(
                kernel=name,
                config=_config_name(constexprs, opts, signature),
                dtype=_dtype_of(signature),
                registers=info["registers"],
                spill_bytes=info["spill_bytes"],
                smem_bytes=int(getattr(ck.metadata, "shared", 0)) + info["static_smem"],
                warnings=info["warnings"],
                loops=[lp.record() for lp in loops],
            )
        )
    return records


@contextlib.contextmanager
def _as_the_runtime_compiles(log, only=None):
    """Inside ``compile_instead_of_launch``: (1) autotuned kernels compile only the configs their
    ``early_config_prune`` keeps for these arguments (what the GPU can pick); (2) every launch is
    specialised as the Triton runtime does it (its own argument binder: ints equal to 1 become
    constants, pointers and ints divisible by 16 carry ``tt.divisibility``), so unit strides and aligned
    rows vectorise like on the GPU. Compiled kernels are appended to ``log.compiled``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import autotuner as at
    from triton.runtime import jit

    from fast.devtools.compile_check import CAPABILITY

    target = GPUTarget("cuda", CAPABILITY, 32)
    backend = make_backend(target)
    binders = {}
    inner_tuner, inner_jit = at.Autotuner.run, jit.JITFunction.run

    def tuner_run(self, *args, **kwargs):
        saved = self.configs
        prune = getattr(self, "early_config_prune", None)
        if prune is not None:
            nargs = dict(zip(self.arg_names, args, strict=False))
            extra = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            self.configs = prune(saved, nargs, **extra)
        try:
            return inner_tuner(self, *args, **kwargs)
        finally:
            self.configs = saved

    def jit_run(self, *args, grid, warmup, **kwargs):
        if only is not None and only not in self.__name__:
            return
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        names = [p.name for p in self.params]
        named = {names[path[0]]: v for path, v in constexprs.items()}
        key = (
            self.__name__,
            tuple(signature.items()),
            tuple(sorted(named.items())),
            tuple(sorted(str(a) for a in attrs.items())),
            str(options),
        )
        if key in log.done:
            return
        t0 = time.perf_counter()
        try:
            ck = triton.compile(
                ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__
            )
            launch = {k: getattr(options, k) for k in ("num_warps", "num_stages")}
            declared = {p.name for p in self.params if p.is_constexpr}  # not the runtime's "== 1" ones
            cx = {k: v for k, v in named.items() if k in declared}
            log.compiled.append((self.__name__, signature, cx, launch, ck))
        except Exception as e:  # reported with the others at the end
            log.failures.append((f"{self.__name__} {named}", "\n".join(str(e).strip().splitlines()[-12:])))
        log.done[key] = time.perf_counter() - t0

    at.Autotuner.run, jit.JITFunction.run = tuner_run, jit_run
    try:
        yield
    finally:
        at.Autotuner.run, jit.JITFunction.run = inner_tuner, inner_jit


def _attention_workload(dtypes, heads=(64, 128), lengths=(4096,)):
    """The GPU benchmark's attention flags: long T (a multiple of every block), causal full and
    sliding window, D = 64 and 128; ``lengths`` adds others (an odd T compiles the bounds-masked
    variants)."""
    import torch

    from fast import attention

    for dtype in dtypes:
        for D in heads:
            for T in lengths:
                for window in (None, 512):
                    q, k, v = (torch.zeros(1, 2, T, D, dtype=dtype, requires_grad=True) for _ in range(3))
                    out, lse = attention.flash_attention_with_lse(
                        q, k, v, causal=True, window=window, backend="triton"
                    )
                    (out.float().sum() + lse.sum()).backward()


def _match_workload(heads=(64, 128)):
    """MATCH at the GPU tiles: bf16 and fp32, joint and gated, the gathered retrieved path (token
    retrieval, top_k 8; blocks of 4, top_k 4) and the block-major one of the benchmark (8 blocks of 64);
    the selection also with its tensor-core band."""
    import torch

    from fast import match

    for dtype in (torch.bfloat16, torch.float32):
        for D in heads:
            for mode in ("joint", "gated"):
                for T, window, bs, top_k in ((1024, 64, 1, 8), (1024, 64, 4, 4), (4096, 512, 64, 8)):
                    q, k, v = (torch.zeros(1, 2, T, D, dtype=dtype, requires_grad=True) for _ in range(3))
                    g = torch.zeros(1, 2, T, requires_grad=True) if mode == "gated" else None
                    out = match.match_attention(
                        q,
                        k,
                        v,
                        window=window,
                        top_k=top_k,
                        block_size=bs,
                        mode=mode,
                        gate_logit=g,
                        backend="triton",
                    )
                    out.float().sum().backward()
    # the selection with the tensor-core band (fast.match_triton.SELECT_TENSOR_CORES; off in the op above)
    from fast import match_triton

    with match_triton.select_tensor_cores(True):
        for D in heads:
            for T, window, bs, top_k in ((1024, 64, 1, 8), (4096, 512, 64, 8)):
                q = torch.zeros(1, 2, T, D, dtype=torch.bfloat16)
                match_triton.retrieve_triton(q, q, window=window, top_k=top_k, block_size=bs, scale=D**-0.5)


LADDER_T = 1024
LADDER_WINDOW = 256
SELECT_WINDOW = 64
SELECT_TOP_K = (8, 32)


def _ladder_workload(heads=(64,)):
    """Every step of ``fast.ladder`` at bf16, T = 1024 (v1's whole-row tile grows with T), causal, without and
    with a window of 256 keys; the launchers' default 64 x 64 tiles."""
    import torch

    from fast.ladder import SELECT_STEPS, STEPS

    for D in heads:
        for window in (None, LADDER_WINDOW):
            q, k, v = (torch.zeros(1, 2, LADDER_T, D, dtype=torch.bfloat16) for _ in range(3))
            for step in STEPS.values():
                step(q, k, v, causal=True, window=window)
        # the retrieval ladder: token retrieval (N = T candidates per head), window 64
        for top_k in SELECT_TOP_K:
            for step in SELECT_STEPS.values():
                step(q, k, window=SELECT_WINDOW, top_k=top_k, block_size=1)


def collect(
    *,
    quick: bool,
    only: str | None,
    heads=(64, 128),
    fp32_attention: bool = False,
    match_tiles: bool = False,
    ladder: bool = False,
) -> tuple[list[dict], list]:
    import torch

    from fast.devtools.compile_check import CompileLog, _workload, compile_instead_of_launch

    tools = toolchain()
    if tools is None:
        raise RuntimeError("Triton's bundled ptxas/cuobjdump not found (triton/backends/nvidia/bin)")
    log = CompileLog()
    if ladder:
        import fast.ladder  # noqa: F401  imported before the launch patch, so its outputs are patched too
    with compile_instead_of_launch(log, all_configs=True), _as_the_runtime_compiles(log, only):
        if ladder:
            _ladder_workload(heads)
        elif fp32_attention:  # the CUDA-core tile, D padded or not, T a multiple of the blocks or not
            _attention_workload((torch.float32,), heads, lengths=(4096, 4001))
        elif match_tiles:
            _match_workload(heads)
        else:
            _attention_workload((torch.bfloat16,), heads)
        if not quick and not fp32_attention and not match_tiles and not ladder:
            _workload((torch.float32, torch.bfloat16))
    compiled = [c for c in log.compiled if only is None or only in c[0]]
    seen, unique = set(), []
    for c in compiled:
        key = (c[0], tuple(c[1].items()), tuple(sorted(c[2].items())), tuple(sorted(c[3].items())))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return stats_for(unique, tools), log.failures


def _short(warning: str) -> str:
    code = re.match(r"\((C\d+)\)", warning)
    return f"{code.group(1)} wgmma serialized" if code and "serialized" in warning else warning[:60]


def markdown(records: list[dict], title: str = "") -> str:
    lines = [title] if title else []
    lines += [
        "| kernel | dtype | config | regs | spill B | smem B | warnings | innermost loops: SASS "
        "(HGMMA / MUFU / LDG / STG / STSM / LDSM / BAR) |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in records:
        inner = [lp for lp in r["loops"] if lp["innermost"]]
        loops = (
            "; ".join(
                f"{lp['sass']} ({lp['hgmma']} / {lp['mufu']} / {lp['ldg']} / {lp['stg']} / {lp['stsm']} / "
                f"{lp['ldsm']} / {lp['bar']})"
                for lp in inner
            )
            or "-"
        )
        warns = "; ".join(sorted({_short(w) for w in r["warnings"]})) or "-"
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['smem_bytes']} | {warns} | {loops} |"
        )
    return "\n".join(lines) + "\n"


def ladder_markdown(records: list[dict]) -> str:
    """One row per ladder step and window flag: registers, spills, and each innermost loop's SASS per
    iteration (in code order; v2 has two passes, v5 and v6 an edge, an interior and an edge loop), with its
    MUFU and HGMMA counts."""
    lines = [
        "| step | window | BLOCK_D | regs | spill B | innermost loops: SASS per iteration (MUFU / HGMMA) |",
        "|---|---|---:|---:|---:|---|",
    ]

    def key(r):
        cfg = dict(kv.split("=", 1) for kv in r["config"].split(","))
        return r["kernel"], cfg.get("HAS_WINDOW", "-"), cfg.get("BLOCK_D", "-")

    for r in sorted((r for r in records if not r["kernel"].startswith("ladder_select_")), key=key):
        name, win, bd = key(r)
        step = name.removeprefix("ladder_").removesuffix("_kernel")
        inner = [lp for lp in r["loops"] if lp["innermost"]]
        loops = "; ".join(f"{lp['sass']} ({lp['mufu']} / {lp['hgmma']})" for lp in inner) or "no loop"
        window = f"w={LADDER_WINDOW}" if win == "1" else "full causal"
        lines.append(f"| {step} | {window} | {bd} | {r['registers']} | {r['spill_bytes']} | {loops} |")
    return "\n".join(lines) + "\n"


def select_ladder_markdown(records: list[dict]) -> str:
    """One row per retrieval-ladder step and top_k: registers, spills, and each innermost loop's SASS per
    iteration in code order (v1: the k extraction passes; v2: the insertion passes, then the sorted write;
    v3: the early-exit merge, then the sorted write), with its MUFU and HGMMA counts."""
    lines = [
        "| step | top_k | BLOCK_D | regs | spill B | innermost loops: SASS per iteration (MUFU / HGMMA) |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def key(r):
        cfg = dict(kv.split("=", 1) for kv in r["config"].split(","))
        return r["kernel"], int(cfg.get("TOP_K", 0)), cfg.get("BLOCK_D", "-")

    for r in sorted((r for r in records if r["kernel"].startswith("ladder_select_")), key=key):
        name, top_k, bd = key(r)
        step = name.removeprefix("ladder_").removesuffix("_kernel")
        inner = [lp for lp in r["loops"] if lp["innermost"]]
        loops = "; ".join(f"{lp['sass']} ({lp['mufu']} / {lp['hgmma']})" for lp in inner) or "no loop"
        lines.append(f"| {step} | {top_k} | {bd} | {r['registers']} | {r['spill_bytes']} | {loops} |")
    return "\n".join(lines) + "\n"


def summary(records: list[dict], label: str) -> list[str]:
    """One line per (kernel, head size, window flag): the range over configs of the leanest innermost loop
    (the interior loop of a split kernel), the largest spill, and how many configs ptxas serialised."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        cfg = dict(kv.split("=", 1) for kv in r["config"].split(","))
        key = (r["kernel"], cfg.get("BLOCK_D", "-"), cfg.get("HAS_WINDOW", "-"))
        groups.setdefault(key, []).append(r)
    lines = []
    for (kernel, bd, win), rs in sorted(groups.items()):
        lean = [min(lp["sass"] for lp in r["loops"] if lp["innermost"]) for r in rs if r["loops"]]
        c7515 = sum(any("C7515" in w for w in r["warnings"]) for r in rs)
        span = f"{min(lean)}-{max(lean)}" if lean else "-"
        lines.append(
            f"| {label} | {kernel} | {bd} | {win} | {len(rs)} | {span} | "
            f"{max(r['spill_bytes'] for r in rs)} | {c7515} |"
        )
    return lines


def report(after: list[dict], before: list[dict] | None, command: str) -> str:
    out = [
        "# Static kernel statistics (sm_90a, no GPU)",
        "",
        f"Command: `{command}` (`fast/devtools/kernel_stats.py`): registers, spills and warnings",
        "from the ptxas bundled with Triton, loops from the SASS back edges. A loop's SASS count is the",
        "instructions of one iteration (what each warp issues). Split attention kernels list their",
        "innermost loops in code order: masked edge loop, interior loop (no mask), masked edge loop.",
        "",
        "## Summary: leanest innermost loop (SASS per iteration, range over configs), spills, C7515",
        "",
        "| tree | kernel | BLOCK_D | HAS_WINDOW | configs | lean loop SASS | max spill B | C7515 configs |",
        "|---|---|---|---|---:|---|---:|---:|",
    ]
    if before:
        out += summary(before, "before")
    out += summary(after, "after")
    out += ["", "## After", "", markdown(after)]
    if before:
        out += ["## Before", "", markdown(before)]
    return "\n".join(out)


_GENERATED = ("## Summary", "## After", "## Before")


def kept_sections(old_report: str) -> str:
    """The sections of an earlier report that this script does not write (measurements under another
    Triton, notes on the loss kernels): carried over when ``--md`` rewrites the file."""
    kept, keep = [], False
    for line in old_report.splitlines(keepends=True):
        if line.startswith("## "):
            keep = not line.startswith(_GENERATED)
        elif line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    return "".join(kept)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run without TRITON_INTERPRET: this compiles kernels", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="attention kernels at bf16 only")
    ap.add_argument("--only", default=None, help="keep kernels whose name contains this")
    ap.add_argument("--heads", default="64,128", help="attention head sizes to compile (comma list)")
    focus = ap.add_mutually_exclusive_group()
    focus.add_argument(
        "--fp32_attention",
        action="store_true",
        help="only the attention kernels' fp32 tile, at T = 4096 and 4001 (with --heads)",
    )
    focus.add_argument(
        "--ladder",
        action="store_true",
        help="only the attention ladder fast/ladder (v1 .. v6) at bf16, T = 1024, D = 64 unless --heads",
    )
    focus.add_argument(
        "--match",
        action="store_true",
        help="only MATCH at its GPU tiles: gathered and block-major paths (with --heads)",
    )
    ap.add_argument("--json", default=None, help="write the records as a JSON list here")
    ap.add_argument("--md", default=None, help="write the markdown report here")
    ap.add_argument("--before", default=None, help="JSON of an earlier run: summarised beside this one")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    heads = args.heads
    if args.ladder and heads == ap.get_default("heads"):
        heads = "64"
    records, failures = collect(
        quick=args.quick,
        only=args.only,
        heads=tuple(int(x) for x in heads.split(",")),
        fp32_attention=args.fp32_attention,
        match_tiles=args.match,
        ladder=args.ladder,
    )
    if args.ladder:
        table = ladder_markdown(records) + "\n" + select_ladder_markdown(records)
    else:
        table = markdown(records)
    print(table)
    for what, msg in failures:
        print(f"FAILED {what}\n{msg}\n", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.md:
        before = None
        if args.before:
            with open(args.before) as f:
                before = json.load(f)
        cmd = "python -m fast.devtools.kernel_stats " + " ".join(a for a in (argv or sys.argv[1:]))
        kept = ""
        if os.path.exists(args.md):
            with open(args.md) as f:
                kept = kept_sections(f.read())
        text = report(records, before, cmd)
        with open(args.md, "w") as f:
            f.write(text if not kept else text.rstrip("\n") + "\n\n" + kept)
    print(f"{len(records)} kernel variants, {len(failures)} failed, {time.perf_counter() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
