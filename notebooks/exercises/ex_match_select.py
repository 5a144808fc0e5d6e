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

import torch  # noqa: F401  (you will need it)


def retrieve(q, k, *, window, top_k, block_size=1, scale=None):  # [..., T, D] x2 -> [..., T, top_k] int64
    """Indices (tokens, or blocks when ``block_size > 1``) of each query's ``top_k`` candidates."""
    # YOUR CODE
    # 1. keys to score: k itself, or the mean key of each block (mind the partial last block)
    # 2. scores [..., T, N]; -inf where the token / block is not a candidate (first key > i - window)
    # 3. a descending sort that keeps equal scores in index order; -1 beyond each row's candidate count
    raise NotImplementedError("retrieve: write the body (notebooks/exercises/README.md)")
