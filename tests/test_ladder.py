"""fast/ladder: every step of the attention ladder equals reference/attention.py (out and lse) on odd shapes,
under every mask; the steps' shared mask predicate is the oracle's; fast.ladder stays a teaching room that
only tests, notebooks and the developer tools import; kernel_stats --ladder's table lists every step."""

import ast
import pathlib

import numpy as np
import pytest
import torch

from fast.devtools.kernel_stats import LADDER_WINDOW, ladder_markdown, select_ladder_markdown
from fast.ladder import SELECT_STEPS, STEPS
from fast.ladder.common import allowed
from fast.testing import assert_close
from reference.attention import attention
from reference.match import retrieve

ROOT = pathlib.Path(__file__).resolve().parents[1]

# slow: the Triton interpreter runs every step; `make test` runs them, `make test-quick` leaves them out
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

# (B, H, T, D, causal, window): T not a multiple of the 16-row interpreter block, D padded to a power of two,
# windows narrower than a block (5) and wide enough for interior blocks (35), the non-causal band, T < block
CASES = (
    (1, 2, 37, 24, True, None),
    (1, 2, 37, 24, True, 5),
    (1, 1, 53, 24, True, 35),
    (1, 2, 37, 24, False, None),
    (1, 1, 53, 20, False, 35),
    (2, 1, 5, 32, True, None),
    (1, 1, 1, 16, True, None),
)


def _inputs(B, H, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}T{}D{}-{}-w{}".format(*c))
@pytest.mark.parametrize("step", list(STEPS))
def test_step_matches_the_oracle(step, case):
    B, H, T, D, causal, window = case
    q, k, v = _inputs(B, H, T, D)
    out, lse = STEPS[step](q, k, v, causal=causal, window=window)
    ref_out, ref_lse = attention(*(x.double().numpy() for x in (q, k, v)), causal=causal, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype="float32", name=f"{step} out")
    assert_close(lse, ref_lse, dtype="float32", name=f"{step} lse")


@pytest.mark.parametrize("step", ["v1", "v6"])
def test_half_precision_inputs(step):
    q, k, v = _inputs(1, 2, 29, 24, torch.float16, seed=1)
    out, lse = STEPS[step](q, k, v, causal=True, window=9)
    ref_out, ref_lse = attention(*(x.double().numpy() for x in (q, k, v)), causal=True, window=9)
    assert out.dtype == torch.float16
    assert_close(out, ref_out, dtype="float16", name="out")
    assert_close(lse, ref_lse, dtype="float32", name="lse")


def test_large_scores_in_log2_units():
    # scores of order 1e2 (exp overflows fp32 past 88): the max must be subtracted before any exponential
    q, k, v = _inputs(1, 1, 21, 16, seed=2)
    q = q * 40.0
    ref_out, ref_lse = attention(*(x.double().numpy() for x in (q, k, v)), causal=True, window=None)
    for step, fn in STEPS.items():
        out, lse = fn(q, k, v)
        assert_close(out, ref_out, dtype="float32", name=f"{step} out")
        assert_close(lse, ref_lse, dtype="float32", name=f"{step} lse")


@pytest.mark.parametrize(
    "bad",
    [
        dict(window=0),
        dict(window=2.5),
        dict(k=torch.zeros(1, 1, 8, 16)),
        dict(q=torch.zeros(1, 1, 9, 16, dtype=torch.float64)),
        dict(q=torch.zeros(9, 16)),
    ],
    ids=["window0", "float_window", "shape", "float64", "rank"],
)
def test_the_launchers_validate(bad):
    args = dict(zip("qkv", _inputs(1, 1, 9, 16), strict=True), causal=True, window=None)
    args.update(bad)
    with pytest.raises(ValueError):
        STEPS["v3"](**args)


def _importers_of_the_ladder():
    hits = []
    for folder in ("reference", "fast", "tiny_models", "benchmarks", "scripts"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if rel.startswith(("fast/ladder/", "fast/devtools/")):
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "fast.ladder" or n.startswith("fast.ladder.") for n in names):
                    hits.append(f"{rel}:{node.lineno}")
    return hits


def test_only_tests_notebooks_and_devtools_import_the_ladder():
    assert _importers_of_the_ladder() == []


def test_kernel_stats_ladder_table():
    def record(kernel, window, loops):
        cfg = f"IS_CAUSAL=1,HAS_WINDOW={int(window)},BLOCK_D=64,num_warps=4"
        return dict(kernel=kernel, config=cfg, registers=128, spill_bytes=0, warnings=[], loops=loops)

    loop = dict(sass=289, hgmma=8, mufu=34, ldg=0, stg=0, stsm=0, ldsm=0, bar=2, innermost=True)
    outer = dict(loop, sass=900, innermost=False)
    table = ladder_markdown(
        [record("ladder_v6_log2_kernel", True, [loop, outer]), record("ladder_v1_naive_kernel", False, [])]
    )
    rows = table.splitlines()[2:]
    assert rows[0] == "| v1_naive | full causal | 64 | 128 | 0 | no loop |"  # sorted by step
    assert rows[1] == f"| v6_log2 | w={LADDER_WINDOW} | 64 | 128 | 0 | 289 (34 / 8) |"  # innermost loops only


def test_docs_table_has_every_step():
    doc = (ROOT / "docs" / "ladder.md").read_text()
    kernels = {
        n.name
        for step in STEPS.values()
        for n in ast.parse(pathlib.Path(step.__code__.co_filename).read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")
    }
    assert len(kernels) == len(STEPS)
    for name in kernels:
        step = name.removeprefix("ladder_").removesuffix("_kernel")
        assert doc.count(f"| {step} |") == 2, step  # full causal and windowed rows
    assert "triton 3.7.1" in doc and "not timings" in doc


def test_mask_predicate_is_the_oracles():
    # the steps share fast.ladder.common.allowed; check it as plain Python on integers against the oracle
    from reference.attention import allowed as ref_allowed

    fn = allowed.fn  # the Python function under the jit decorator
    i, j = np.arange(12)[:, None], np.arange(14)[None, :]
    T = 12
    for causal in (True, False):
        for window in (None, 1, 3, 12):
            W = T if window is None else window
            got = fn(i, j, T, W, causal, window is not None)
            want = ref_allowed(i, j, causal=causal, window=window) & (j < T)
            assert np.array_equal(got, want), (causal, window)


@pytest.mark.parametrize(
    "module,launcher",
    [
        ("v1_naive", "attention_v1"),
        ("v2_blocked", "attention_v2"),
        ("v3_online", "attention_v3"),
        ("v4_skip", "attention_v4"),
        ("v5_split", "attention_v5"),
        ("v6_log2", "attention_v6"),
    ],
)
def test_every_step_has_its_own_module_and_launcher(module, launcher):
    import importlib

    mod = importlib.import_module(f"fast.ladder.{module}")
    assert getattr(mod, launcher) in [fn for *_, fn in STEPS] or callable(getattr(mod, launcher))


# ---- the retrieval ladder (SELECT_STEPS) against reference.match.retrieve, exactly

# (B, H, T, D, window, top_k, block_size): T not a multiple of the block nor of the 16-row interpreter tile,
# D padded, top_k above the candidate count (tokens: 19 - 3 = 16 < 20; blocks: 21 // 4 = 5 < 8), T < block
# (no candidate block at all), T <= window (no candidate), top_k 1
SELECT_CASES = (
    (1, 2, 37, 24, 5, 3, 1),
    (1, 1, 53, 20, 8, 4, 4),
    (2, 1, 21, 16, 4, 8, 4),
    (1, 1, 19, 16, 3, 20, 1),
    (1, 1, 3, 16, 4, 2, 4),
    (1, 1, 6, 16, 7, 2, 1),
    (1, 1, 40, 32, 16, 1, 4),
)


def _select_ref(q, k, **kw):
    return torch.from_numpy(retrieve(q.double().numpy(), k.double().numpy(), **kw))


def _select_inputs(B, H, T, D, seed):
    """q, k on a grid of 1/8 (|x| < 4): every dot product, block mean (blocks of 1 or 4) and score is exact in
    fp32 as in fp64 whatever the summation order, so distinct scores stay far apart (>= scale / 256) and equal
    ones are exact ties, which the tie rule decides."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, T, D, generator=g) * 8).round().clamp(-31, 31) / 8 for _ in range(2)]


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "B{}H{}T{}D{}-w{}-k{}-bs{}".format(*c))
@pytest.mark.parametrize("step", list(SELECT_STEPS))
def test_select_step_matches_retrieve(step, case):
    B, H, T, D, window, top_k, bs = case
    q, k = _select_inputs(B, H, T, D, seed=3)
    kw = dict(window=window, top_k=top_k, block_size=bs)
    idx = SELECT_STEPS[step](q, k, **kw)
    assert idx.shape == (B, H, T, top_k) and idx.dtype == torch.int64
    assert torch.equal(idx, _select_ref(q, k, **kw))


@pytest.mark.parametrize("step", list(SELECT_STEPS))
def test_select_tie_rule(step):
    # hand-made: every key equal, so every candidate scores the same; the order is the index order
    T, window = 12, 3
    q = torch.randn(1, 1, T, 16, generator=torch.Generator().manual_seed(4))
    k = torch.ones(1, 1, T, 16)
    idx = SELECT_STEPS[step](q, k, window=window, top_k=5, block_size=1)
    assert idx[0, 0, 10].tolist() == [0, 1, 2, 3, 4]  # 8 candidates (j <= 7): the 5 lowest indices
    assert idx[0, 0, 5].tolist() == [0, 1, 2, -1, -1]  # 3 candidates, then empty slots
    assert idx[0, 0, 2].tolist() == [-1] * 5  # inside the window: no candidate
    assert torch.equal(idx, _select_ref(q, k, window=window, top_k=5, block_size=1))
    # many ties among distinct scores: small integer entries (scores exact in fp32 and fp64), tokens and
    # blocks of 4 (their means exact too); the tile merge must keep the lower index of every tie
    g = torch.Generator().manual_seed(5)
    for bs, top_k in ((1, 6), (4, 3)):
        q, k = (torch.randint(-1, 2, (1, 2, 45, 16), generator=g).float() for _ in range(2))
        kw = dict(window=6, top_k=top_k, block_size=bs, scale=1.0)
        assert torch.equal(SELECT_STEPS[step](q, k, **kw), _select_ref(q, k, **kw)), bs


@pytest.mark.parametrize(
    "bad",
    [dict(window=0), dict(top_k=-1), dict(block_size=5), dict(k=torch.zeros(1, 1, 8, 16))],
    ids=["window0", "top_k", "block_gt_window", "shape"],
)
def test_select_launchers_validate(bad):
    q, k, _ = _inputs(1, 1, 9, 16)
    args = dict(q=q, k=k, window=4, top_k=2, block_size=1)
    args.update(bad)
    with pytest.raises(ValueError):
        SELECT_STEPS["v2"](**args)


def test_kernel_stats_select_table():
    def record(kernel, top_k, loops):
        cfg = f"TOP_K={top_k},KP=8,BLOCK_M=32,BLOCK_N=32,BLOCK_D=64,num_warps=4"
        return dict(kernel=kernel, config=cfg, registers=96, spill_bytes=0, warnings=[], loops=loops)

    loop = dict(sass=120, hgmma=0, mufu=0, ldg=0, stg=0, stsm=0, ldsm=0, bar=0, innermost=True)
    attn = dict(kernel="ladder_v1_naive_kernel", config="IS_CAUSAL=1,HAS_WINDOW=0,BLOCK_D=64,num_warps=4")
    recs = [
        record("ladder_select_v3_running_kernel", 8, [loop]),
        record("ladder_select_v1_naive_kernel", 32, []),
        record("ladder_select_v1_naive_kernel", 8, []),
        dict(attn, registers=1, spill_bytes=0, warnings=[], loops=[]),
    ]
    rows = select_ladder_markdown(recs).splitlines()[2:]
    assert rows == [
        "| select_v1_naive | 8 | 64 | 96 | 0 | no loop |",
        "| select_v1_naive | 32 | 64 | 96 | 0 | no loop |",
        "| select_v3_running | 8 | 64 | 96 | 0 | 120 (0 / 0) |",
    ]
    assert all("select" not in r for r in ladder_markdown(recs).splitlines())  # the attention table


def test_docs_select_table_has_every_step():
    from fast.devtools.kernel_stats import SELECT_TOP_K

    doc = (ROOT / "docs" / "ladder.md").read_text()
    for step in SELECT_STEPS.values():
        names = [
            n.name
            for n in ast.parse(pathlib.Path(step.__code__.co_filename).read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")
        ]
        assert len(names) == 1
        row = names[0].removeprefix("ladder_").removesuffix("_kernel")
        assert doc.count(f"| {row} |") == len(SELECT_TOP_K), row


@pytest.mark.parametrize(
    "module,launcher",
    [("select_v1_naive", "select_v1"), ("select_v2_tiled", "select_v2"), ("select_v3_running", "select_v3")],
)
def test_every_selection_step_has_its_own_module_and_launcher(module, launcher):
    import importlib

    from fast.ladder import SELECT_STEPS

    fn = getattr(importlib.import_module(f"fast.ladder.{module}"), launcher)
    assert fn in SELECT_STEPS.values()


def test_select_common_refuses_bad_settings():
    from fast.ladder.select_common import prepare_select

    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError):
        prepare_select(q, q, 0, 2, 1, None)  # a window of 0 keys
