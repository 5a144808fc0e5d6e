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
    # YOUR CODE
    # 1. load row `pid` of t and s (columns >= V: other=-inf)
    # 2. log p = t - max(t) - log(sum(exp(t - max(t)))), log q likewise
    # 3. loss = sum over valid entries of p * (log p - log q): mask before subtracting (-inf - -inf = NaN)
    # 4. grad = q - p; store both
    raise NotImplementedError("forward_kl_kernel: write the body (notebooks/exercises/README.md)")


def forward_kl(t, s):  # [N, V] x2 fp32 -> loss [N], grad [N, V]
    t, s = t.contiguous(), s.contiguous()
    N, V = t.shape
    loss = torch.empty(N, dtype=torch.float32)
    grad = torch.empty(N, V, dtype=torch.float32)
    forward_kl_kernel[(N,)](t, s, loss, grad, V, BLOCK_V=triton.next_power_of_2(V))
    return loss, grad
