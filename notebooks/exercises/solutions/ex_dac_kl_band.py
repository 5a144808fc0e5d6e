"""Exercise: DAC-KL's soft band mask, given the two thresholds.

Oracle: ``reference/dac_kl.py`` step 3 (``dac_kl_parts(...)["m"]``):
``m_v = sigmoid(beta (p_v - tau_lo)) * sigmoid(beta (tau_hi - p_v))``,
``beta = 1 / (gamma (tau_hi - tau_lo) + eps)``, ``p = softmax(t)``, and ``m_v = 0`` at padded (-inf) entries.
Grade: ``python notebooks/exercises/grade.py dac_kl_band``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def band_kernel(
    t_ptr,  # [N, V] fp32 teacher logits, contiguous; -inf = padded entry
    lo_ptr,  # [N] fp32 tau_lo, the lower value threshold on p
    hi_ptr,  # [N] fp32 tau_hi >= tau_lo
    m_ptr,  # [N, V] fp32 out: the band mask
    V,
    gamma,
    eps,
    BLOCK_V: tl.constexpr,
):
    """Row ``pid``: the teacher's softmax p, then the band. beta may be as large as 1 / eps = 1e8 (a band of
    width 0): the sigmoids must saturate to 0 / 1 without NaN."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_V)
    in_row = cols < V
    t = tl.load(t_ptr + row * V + cols, mask=in_row, other=float("-inf"))
    e = tl.exp(t - tl.max(t, 0))
    p = e / tl.sum(e, 0)
    tau_lo = tl.load(lo_ptr + row)
    tau_hi = tl.load(hi_ptr + row)
    beta = 1.0 / (gamma * (tau_hi - tau_lo) + eps)
    m = tl.sigmoid(beta * (p - tau_lo)) * tl.sigmoid(beta * (tau_hi - p))
    m = tl.where(t > float("-inf"), m, 0.0)
    tl.store(m_ptr + row * V + cols, m, mask=in_row)


def band(t, tau_lo, tau_hi, *, gamma=0.05, eps=1e-8):  # [N, V], [N], [N] fp32 -> m [N, V]
    t = t.contiguous()
    N, V = t.shape
    m = torch.empty(N, V, dtype=torch.float32)
    band_kernel[(N,)](
        t, tau_lo.contiguous(), tau_hi.contiguous(), m, V, gamma, eps, BLOCK_V=triton.next_power_of_2(V)
    )
    return m
