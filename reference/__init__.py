"""The oracles: every algorithm in plain NumPy, float64, log-space, readable top to bottom.

Rules: imports NumPy only (never torch, triton or anything from ``fast``); a shape comment on
every ``def``; gradients derived by hand and checked by central finite differences in tests.
Shared building blocks live once in ``reference/nn.py`` (log-softmax, softmax, sigmoid, GELU) and
``reference/attention.py`` (the mask); the rounding-error bookkeeping the fast tests need lives with
them, in ``tests/_error_bounds.py``.
"""
