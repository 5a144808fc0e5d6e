"""The spec oracle: every algorithm in plain NumPy, float64, log-space.

Rules: imports NumPy only (never torch, triton or anything from ``fast``); a shape comment on
every ``def``; gradients derived by hand and checked by central finite differences in tests.
"""
