import os
import sys

import pytest

# Triton kernels run on CPU tensors through Triton's interpreter where there is no GPU. Triton reads
# this variable when a kernel is decorated, so it must be set before nanofast.kernels is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/philox_ref.py and friends

HAS_CUDA = _HAS_CUDA


def all_isas():
    """Every instruction-set build of the C++ kernels this CPU can run."""
    from nanofast import _C

    return _C.available_isas().split(",")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run the slow tests too")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds (run with --run-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=all_isas())
def isa(request):
    """Runs a test once per instruction-set build of the C++ kernels this CPU supports, with those
    kernels (TORCH_ON_ISA's routes to torch off)."""
    from nanofast import _C
    from nanofast.ops import cpu

    routes, cpu.ROUTES_ENABLED = cpu.ROUTES_ENABLED, False  # each build's own kernels, not torch's
    _C.select_isa(request.param)
    yield request.param
    _C.select_isa("auto")
    cpu.ROUTES_ENABLED = routes
