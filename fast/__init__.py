"""Fast paths: Triton kernels with autograd wrappers, vectorised PyTorch backends, training loops.

Every public op here has a NumPy oracle of the same stem in ``reference/`` and a test in ``tests/``
that compares the two (forward, every gradient, returned state).
"""
