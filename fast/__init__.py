"""Fast paths: Triton kernels with autograd wrappers and vectorised PyTorch backends (the ops, one module
per algorithm at this level), model-agnostic training (``fast.training``) and developer tools that
compile and inspect the kernels without a GPU (``fast.devtools``).

Every public op here has a NumPy oracle of the same stem in ``reference/`` and a test in ``tests/``
that compares the two (forward, every gradient, returned state).

The one interpreter switch: without CUDA, importing ``fast`` sets ``TRITON_INTERPRET=1`` (unless the
variable is already set) so every ``@triton.jit`` kernel below runs in Triton's interpreter on the CPU.
It runs before any kernel module is imported, which is when Triton reads the variable. Set
``TRITON_INTERPRET=0`` to compile kernels instead (``make compile-check``, ``make kernel-stats``).
"""

import os as _os

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
