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


def _compile_cache_for_these_sources():
    """torch.compile's on-disk caches (FX graph and AOTAutograd, in TORCHINDUCTOR_CACHE_DIR) key a
    graph on its code, not on what a custom op's fake or registered autograd formula says
    (pytorch/pytorch#144344, #160472): a graph cached by another version of nanofast's ops, from
    another checkout or before an edit, would be loaded with that version's output shapes and
    gradients. The tests and benchmarks therefore compile into a cache of this checkout's own,
    emptied whenever the sources of nanofast and its kernels change. An explicit
    TORCHINDUCTOR_CACHE_DIR is kept."""
    import hashlib
    import shutil
    import tempfile

    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    digest = hashlib.sha256()
    for top in ("python/nanofast", "kernels"):
        for folder, dirs, files in sorted(os.walk(os.path.join(_ROOT, top))):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, _ROOT).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    checkout = hashlib.sha256(_ROOT.encode()).hexdigest()[:12]
    cache = os.path.join(tempfile.gettempdir(), f"nanofast_compile_cache_{os.getuid()}_{checkout}")
    stamp = os.path.join(cache, "sources.sha256")
    try:
        with open(stamp) as f:
            current = f.read() == digest.hexdigest()
    except OSError:
        current = False
    if not current:
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(digest.hexdigest())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache


_compile_cache_for_these_sources()


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
