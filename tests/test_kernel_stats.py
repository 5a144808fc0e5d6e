"""fast.devtools.kernel_stats: SASS loop detection on a hand-written listing, and on real sm_90a compiles of
toy
kernels (a lean loop, the same loop bloated with extra math, a kernel that must spill registers)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from fast.devtools.kernel_stats import find_loops, kept_sections, markdown, parse_sass, report, toolchain

ROOT = pathlib.Path(__file__).resolve().parents[1]

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   NOP ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   STG.E desc[UR4][R6.64], R3 ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/               @P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_loops_from_back_edges():
    loops = find_loops(parse_sass(LISTING))
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x50), (0x10, 0x80)]
    inner, outer = loops
    assert inner.innermost and not outer.innermost
    # inner body: HGMMA, MUFU, (NOP not counted), BRA
    assert (inner.sass, inner.hgmma, inner.mufu, inner.ldg, inner.stg) == (3, 1, 1, 0, 0)
    assert (outer.sass, outer.ldg, outer.stg, outer.bar) == (7, 1, 1, 1)
    # the `BRA self` trap after EXIT is not a loop; forward branches neither
    assert find_loops(parse_sass("        /*0000*/  BRA 0x0;\n        /*0010*/  @P0 BRA 0x30 ;\n")) == []
    table = markdown(
        [
            dict(
                kernel="k",
                dtype="bf16",
                config="BLOCK=16",
                registers=32,
                spill_bytes=0,
                smem_bytes=0,
                warnings=[],
                loops=[inner.record(), outer.record()],
            )
        ]
    )
    assert "| k | bf16 | BLOCK=16 | 32 | 0 | 0 | - | 3 (1 / 1 / 0 / 0 / 0 / 0 / 0) |" in table


TOYS = textwrap.dedent("""
    import json, sys
    import torch, triton, triton.language as tl
    from fast.devtools.compile_check import CompileLog, compile_instead_of_launch
    from fast.devtools.kernel_stats import _as_the_runtime_compiles, stats_for, toolchain

    @triton.jit
    def lean_kernel(x, y, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n, BLOCK):
            acc += tl.load(x + i + o)
        tl.store(y + o, acc)

    @triton.jit
    def bloated_kernel(x, y, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n, BLOCK):
            v = tl.load(x + i + o)
            acc += tl.exp(v) * tl.sin(v) + tl.sqrt(tl.abs(v)) / (1.0 + v * v)
        tl.store(y + o, acc)

    @triton.jit
    def spill_kernel(x, y, n, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        acc = tl.zeros([R, C], tl.float32)  # R * C / 32 live fp32 values per thread (one warp)
        for i in range(0, n):
            acc = acc * tl.load(x + i * R * C + r) + tl.sqrt(acc + 1.0)
        tl.store(y + r, acc)

    log = CompileLog()
    x, y = torch.zeros(16384), torch.zeros(16384)
    with compile_instead_of_launch(log), _as_the_runtime_compiles(log):
        lean_kernel[(1,)](x, y, 4096, BLOCK=256)
        bloated_kernel[(1,)](x, y, 4096, BLOCK=256)
        spill_kernel[(1,)](x, y, 2, R=32, C=256, num_warps=1)
    assert not log.failures, log.failures
    print("JSON" + json.dumps(stats_for(log.compiled, toolchain())))
""")


def test_rewrite_keeps_hand_kept_sections():
    # --md rewrites the generated sections and carries the others (another Triton's numbers, notes) over
    old = report([], None, "python -m fast.devtools.kernel_stats") + (
        "## Under triton 3.6.0\n\n| a | b |\n\n## Loss kernels: passes\n\ntext\n"
    )
    kept = kept_sections(old)
    assert kept == "## Under triton 3.6.0\n\n| a | b |\n\n## Loss kernels: passes\n\ntext\n"
    assert "## Summary" not in kept and "## After" not in kept and "# Static" not in kept
    new = report([], None, "python -m fast.devtools.kernel_stats --quick").rstrip("\n") + "\n\n" + kept
    assert kept_sections(new) == kept  # a second rewrite keeps them once, not twice


@pytest.mark.skipif(toolchain() is None, reason="Triton's bundled ptxas/cuobjdump not found")
@pytest.mark.compile
def test_toy_kernels(tmp_path):
    (tmp_path / "toys.py").write_text(TOYS)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MGSR_POISON_OUTPUTS")}
    env["TRITON_INTERPRET"] = "0"  # compile, do not interpret (importing fast sets 1 without CUDA)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run(
        [sys.executable, str(tmp_path / "toys.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = {r["kernel"]: r for r in json.loads(p.stdout.split("JSON", 1)[1])}
    lean, bloated, spill = recs["lean_kernel"], recs["bloated_kernel"], recs["spill_kernel"]
    assert lean["config"].startswith("BLOCK=256") and lean["spill_bytes"] == 0 and lean["registers"] > 0
    # compare the biggest loop of each: the compiler may peel or pipeline a loop, and libdevice's sin
    # brings its own range-reduction loop, nested inside the bloated kernel's main loop
    ll = max(lean["loops"], key=lambda lp: lp["sass"])
    bl = max(bloated["loops"], key=lambda lp: lp["sass"])
    assert bl["sass"] > ll["sass"] and bl["mufu"] > ll["mufu"] == 0
    assert ll["ldg"] >= 1 and ll["stg"] == 0
    assert spill["spill_bytes"] > 0 and spill["registers"] >= 200


# cuobjdump -sass layout: a header, then one instruction per line with its encoding, and a second encoding
# line; only the instruction lines count
NESTED_SHARED = """
        code for sm_90a
                Function : toy_kernel
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                     /* 0x00000a0000017a02 */
                                                                              /* 0x000fe40000000f00 */
        /*0010*/                   S2R R0, SR_TID.X ;                         /* 0x0000000000007919 */
                                                                              /* 0x000e220000002100 */
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;               /* 0x0000000404027981 */
        /*0030*/                   FFMA R3, R2, R2, R3 ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0050*/                   MUFU.EX2 R3, R3 ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   LDSM.16.M88.4 R20, [R21] ;
        /*0080*/              @!P1 BRA 0x30 ;
        /*0090*/                   STG.E desc[UR4][R6.64], R3 ;
        /*00a0*/               @P2 BRA 0x20 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
        .L_x_0:
"""


def _key(lp):
    return (
        lp.start,
        lp.end,
        lp.sass,
        lp.hgmma,
        lp.mufu,
        lp.ldg,
        lp.stg,
        lp.stsm,
        lp.ldsm,
        lp.bar,
        lp.innermost,
    )


def test_parse_sass_reads_instruction_lines_only():
    instrs = parse_sass(NESTED_SHARED)
    assert [a for a, _ in instrs] == list(range(0, 0xD0, 0x10))
    assert instrs[0] == (0x0, "MOV R1, c[0x0][0x28]")
    assert instrs[6] == (0x60, "@P0 BRA 0x30")
    assert instrs[8] == (0x80, "@!P1 BRA 0x30")
    assert instrs[-1] == (0xC0, "BRA 0xc0")


def test_nested_loops_and_two_back_edges_to_one_header():
    loops = find_loops(parse_sass(NESTED_SHARED))
    # one loop per back edge, in code order; two branches to 0x30 give two loops with the same start, the
    # shorter one inside the longer (so only the shorter is innermost); HMMA is not counted as HGMMA
    assert [_key(lp) for lp in loops] == [
        (0x30, 0x60, 4, 0, 1, 0, 0, 0, 0, 0, True),
        (0x30, 0x80, 6, 0, 1, 0, 0, 0, 1, 0, False),
        (0x20, 0xA0, 9, 0, 1, 1, 1, 0, 1, 0, False),
    ]


WGMMA_LOOP = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x90 ;
        /*0020*/                   WARPGROUP.ARRIVE ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/               @P1 BRA 0x80 ;
        /*0070*/                   STSM.16.M88.4 [R2], R24 ;
        /*0080*/                   NOP ;
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00a0*/               @P2 BRA 0x20 ;
        /*00b0*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*00c0*/                   FMUL R2, R2, R2 ;
        /*00d0*/                   STG.E desc[UR4][R6.64], R2 ;
        /*00e0*/               @P3 BRA 0xb0 ;
        /*00f0*/                   EXIT ;
        /*0100*/                   BRA 0x100;
"""


def test_tensor_core_loop_and_a_loop_without_tensor_cores():
    loops = find_loops(parse_sass(WGMMA_LOOP))
    # forward branches (0x10 -> 0x90, 0x60 -> 0x80) make no loop; the NOP is not counted; the barrier count
    # takes BAR and both WARPGROUP synchronisations; two disjoint loops are both innermost
    assert [_key(lp) for lp in loops] == [
        (0x20, 0xA0, 8, 2, 0, 0, 0, 1, 0, 3, True),
        (0xB0, 0xE0, 4, 0, 0, 1, 1, 0, 0, 0, True),
    ]
    rec = loops[1].record()
    assert "start" not in rec and "end" not in rec and rec["sass"] == 4 and rec["hgmma"] == 0


def test_summary_reports_the_leanest_innermost_loop_by_value():
    # two configs of one kernel: the summary's range is over each config's *leanest* innermost loop (the
    # interior loop of a split kernel); outer loops and fatter innermost loops do not count
    def rec(config, loops, spill=0, warnings=()):
        return dict(kernel="k_kernel", config=config, loops=loops, spill_bytes=spill, warnings=list(warnings))

    loops_a = [
        dict(sass=900, innermost=False),
        dict(sass=300, innermost=True),
        dict(sass=120, innermost=True),
        dict(sass=310, innermost=True),
    ]
    loops_b = [dict(sass=150, innermost=True), dict(sass=400, innermost=True)]
    records = [
        rec("BLOCK_D=64,HAS_WINDOW=1", loops_a, spill=8),
        rec("BLOCK_D=64,HAS_WINDOW=1", loops_b, warnings=["ptxas C7515: serialized"]),
    ]
    from fast.devtools.kernel_stats import summary

    (line,) = summary(records, "after")
    assert line == "| after | k_kernel | 64 | 1 | 2 | 120-150 | 8 | 1 |"
