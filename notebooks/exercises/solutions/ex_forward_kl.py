"""Exercise: forward KL, loss and gradient, one Triton program per row.

Oracle: ``reference/divergences.py`` (``forward_kl``, ``forward_kl_grad``), temperature 1.
Grade: ``python notebooks/exercises/grade.py forward_kl``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def forward_kl_kernel(
    t_ptr,  # [N, V] fp32 teacher logits, contiguous; -inf marks a padded vocabulary entry
    s_ptr,  # [N, V] fp32 student logits, -inf exactly where the teacher's are
    loss_ptr,  # [N] fp32 out: KL(p || q) = sum_v p_v (log p_v - log q_v)
    grad_ptr,  # [N, V] fp32 out: d loss / d s = q - p (0 at padded entries)
    V,
    BLOCK_V: tl.constexpr,  # next_pow2(V): the whole row in one tile
):
    """Row ``pid``: p = softmax(t), q = softmax(s), both from log-softmax (max-subtracted: stable for logits
    of +-1e4). Columns >= V and padded (-inf) entries must contribute exactly 0, never NaN."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_V)
    in_row = cols < V
    t = tl.load(t_ptr + row * V + cols, mask=in_row, other=float("-inf"))
    s = tl.load(s_ptr + row * V + cols, mask=in_row, other=float("-inf"))
    valid = t > float("-inf")  # padded entries and the tail of the tile
    lp = t - tl.max(t, 0)
    lp = lp - tl.log(tl.sum(tl.exp(lp), 0))  # log p
    lq = s - tl.max(s, 0)
    lq = lq - tl.log(tl.sum(tl.exp(lq), 0))  # log q
    p = tl.exp(lp)  # 0 where padded
    q = tl.exp(lq)
    # padded entries: p = q = 0 and log p = log q = -inf; 0 * (-inf - -inf) would be NaN, so zero the logs
    terms = p * (tl.where(valid, lp, 0.0) - tl.where(valid, lq, 0.0))
    tl.store(loss_ptr + row, tl.sum(terms, 0))
    tl.store(grad_ptr + row * V + cols, q - p, mask=in_row)


def forward_kl(t, s):  # [N, V] x2 fp32 -> loss [N], grad [N, V]
    t, s = t.contiguous(), s.contiguous()
    N, V = t.shape
    loss = torch.empty(N, dtype=torch.float32)
    grad = torch.empty(N, V, dtype=torch.float32)
    forward_kl_kernel[(N,)](t, s, loss, grad, V, BLOCK_V=triton.next_power_of_2(V))
    return loss, grad
