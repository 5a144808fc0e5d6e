"""A version ladder of the attention forward, as llm.c's ``dev/cuda`` does it: the same op written six times,
each step one idea more than the last, each a small standalone Triton kernel with its launcher
``attention_vN(q, k, v, causal=True, window=None) -> (out, lse)``:

=====  ======================  =================================================================
step   kernel                  the idea
=====  ======================  =================================================================
v1     ``v1_naive``            one program per query row, the whole row of scores at once
v2     ``v2_blocked``          tiles of queries x keys (``tl.dot``), softmax in two passes
v3     ``v3_online``           online softmax: running max / sum / accumulator, one pass
v4     ``v4_skip``             loop bounds skip the key blocks the causal / window mask removes
v5     ``v5_split``            edge / interior split: the mask only on blocks where it can be false
v6     ``v6_log2``             log2 units: ``exp2(fma(s, scale * log2 e, -m))``, one FFMA per score
=====  ======================  =================================================================

v6 is the loop of ``fast.attention`` (which adds GQA, arbitrary strides, autotuned tiles, the backward).
Every step is checked against ``reference/attention.py`` (``tests/test_ladder.py``), and
``python -m fast.devtools.kernel_stats --ladder`` prints what each step costs per loop iteration on sm_90a
(``docs/ladder.md``). Teaching code: only tests, notebooks and ``fast.devtools`` import it.

A second, shorter ladder, ``SELECT_STEPS``, does the same for MATCH's retrieval (the top-k of the
out-of-window candidates, ``reference/match.py`` ``retrieve``), each launcher
``select_vN(q, k, *, window, top_k, block_size=1, scale=None) -> idx [B, H, T, top_k]`` int64:

=====  =========================  ==============================================================
step   kernel                     the idea
=====  =========================  ==============================================================
v1     ``select_v1_naive``        one program per query row, all its scores, top-k by k passes of max
v2     ``select_v2_tiled``        query x candidate tiles (``tl.dot``), a running top-k in registers
v3     ``select_v3_running``      loop bound from the window, merge only while a score beats the list
=====  =========================  ==============================================================

v3 is the loop of ``fast.match_triton.match_select_kernel`` (which adds GQA, strides, a query offset).
"""

from fast.ladder.select_v1_naive import select_v1
from fast.ladder.select_v2_tiled import select_v2
from fast.ladder.select_v3_running import select_v3
from fast.ladder.v1_naive import attention_v1
from fast.ladder.v2_blocked import attention_v2
from fast.ladder.v3_online import attention_v3
from fast.ladder.v4_skip import attention_v4
from fast.ladder.v5_split import attention_v5
from fast.ladder.v6_log2 import attention_v6

STEPS = {
    "v1": attention_v1,
    "v2": attention_v2,
    "v3": attention_v3,
    "v4": attention_v4,
    "v5": attention_v5,
    "v6": attention_v6,
}

SELECT_STEPS = {
    "v1": select_v1,
    "v2": select_v2,
    "v3": select_v3,
}

__all__ = [
    "SELECT_STEPS",
    "STEPS",
    *(f"attention_{v}" for v in STEPS),
    *(f"select_{v}" for v in SELECT_STEPS),
]
