"""Repository-level pytest configuration: `pytest --benchmark` runs the benchmark suite in bench/.

Plain `pytest` runs the tests in tests/ only (pyproject's testpaths) and never the long benchmarks.
"""
import os

_ROOT = os.path.dirname(os.path.abspath(__file__))
_BENCH_DIR = os.path.join(_ROOT, "bench")


def _import_installed_kernels_package():
    """transformers (a test and benchmark dependency) imports a package named `kernels`, Hugging Face's
    kernel hub, where it is installed; from the repository root this checkout's kernels/ directory (the
    sources of nanofast.kernels) would shadow it. Importing the installed one first, with the root off
    the path, puts it in sys.modules."""
    import importlib.util
    import sys

    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    try:
        if "kernels" not in sys.modules and importlib.util.find_spec("kernels") is not None:
            import kernels  # noqa: F401
    except Exception:  # a broken optional package: transformers reports it itself
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels_package()


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suite in bench/ (kernels, training step) and print its report")


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        return
    # Only the default paths are swapped for bench/: explicit paths on the command line are kept.
    if list(config.args) == [os.path.join(str(config.rootpath), "tests")] or list(config.args) == ["tests"]:
        config.args[:] = [_BENCH_DIR]
    if hasattr(config.option, "benchmark_autosave"):
        config.option.benchmark_autosave = True  # pytest-benchmark's own JSON, under .benchmarks/


def pytest_ignore_collect(collection_path, config):
    # bench/ is collected only with --benchmark, so `pytest bench` alone does not start hour-long runs.
    if not config.getoption("--benchmark") and _BENCH_DIR in str(collection_path) and \
            os.path.basename(str(collection_path)).startswith("bench_"):
        return True
    return None
