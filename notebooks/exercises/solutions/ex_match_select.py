"""Exercise: MATCH's selection, the top-k out-of-window tokens or blocks of each query, in PyTorch.

Oracle: ``reference/match.py`` (``retrieve``). With ``s_ij = scale * q_i . k_j``:

* candidates of query ``i``: the keys the window cannot see, ``j <= i - window``;
* ``block_size == 1``: score every candidate token; ``block_size = B > 1``: cut the keys into blocks
  ``[bB, (b+1)B)`` from position 0, summarise each by its mean key (a partial last block: the mean of the keys
  it has), score ``scale * q_i . kbar_b``; block ``b`` is a candidate iff ``bB <= i - window``;
* keep the ``top_k`` best, in descending score order; **ties: the lower index wins**; slots beyond the number
  of candidates hold ``-1``.

Grade: ``python notebooks/exercises/grade.py match_select``.
"""

import torch


def retrieve(q, k, *, window, top_k, block_size=1, scale=None):  # [..., T, D] x2 -> [..., T, top_k] int64
    """Indices (tokens, or blocks when ``block_size > 1``) of each query's ``top_k`` candidates."""
    T, D = k.shape[-2:]
    scale = D**-0.5 if scale is None else scale
    if block_size == 1:
        keys = k
    else:
        n = -(-T // block_size)
        pad = n * block_size - T
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad))  # [..., n * B, D]
        sums = kp.reshape(*k.shape[:-2], n, block_size, D).sum(-2)
        counts = torch.full((n,), float(block_size), dtype=k.dtype)
        counts[-1] = block_size - pad
        keys = sums / counts[:, None]  # [..., n, D] mean keys
    s = scale * (q @ keys.transpose(-1, -2))  # [..., T, N]
    first = torch.arange(keys.shape[-2]) * block_size  # first key of each token / block
    cand = first[None, :] <= torch.arange(T)[:, None] - window  # [T, N]
    s = s.masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # stable: ties keep index order
    n_cand = cand.sum(-1, keepdim=True)  # [T, 1]
    if top_k > order.shape[-1]:
        order = torch.cat([order, order.new_full((*order.shape[:-1], top_k - order.shape[-1]), -1)], -1)
    idx = order[..., :top_k]
    return torch.where(torch.arange(top_k) < n_cand, idx, torch.full_like(idx, -1))
