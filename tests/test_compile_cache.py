"""nanofast tags torch.compile's on-disk caches with a digest of its sources (_compile_cache.py):
torch keys a cached graph by the custom ops' names only, so a graph compiled against another version
of an op's fake or autograd formula would otherwise be loaded after an upgrade."""
import importlib.util
import os

import torch

import nanofast
from nanofast import _compile_cache


def test_digest_follows_the_python_sources(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "op.py").write_text("def backward(g):\n    return 2 * g\n")
    (tmp_path / "pkg" / "_C.so").write_bytes(b"\0")
    first = _compile_cache.sources_digest([tmp_path / "pkg"])
    assert _compile_cache.sources_digest([tmp_path / "pkg"]) == first
    (tmp_path / "pkg" / "_C.so").write_bytes(b"\1")  # not a source of any cached graph
    assert _compile_cache.sources_digest([tmp_path / "pkg"]) == first
    (tmp_path / "pkg" / "op.py").write_text("def backward(g):\n    return 3 * g\n")  # a formula changed
    assert _compile_cache.sources_digest([tmp_path / "pkg"]) != first
    (tmp_path / "pkg" / "op.py").write_text("def backward(g):\n    return 2 * g\n")
    (tmp_path / "pkg" / "sub").mkdir()
    (tmp_path / "pkg" / "sub" / "new.py").write_text("")  # a new module
    assert _compile_cache.sources_digest([tmp_path / "pkg"]) != first


def test_import_tags_the_caches_with_the_installed_sources():
    roots = _compile_cache._source_roots()
    assert roots[0] == os.path.dirname(os.path.abspath(nanofast.__file__))
    # nanofast.kernels' sources are covered, wherever the install put them
    for location in importlib.util.find_spec("nanofast.kernels").submodule_search_locations:
        assert any(os.path.abspath(location).startswith(r) for r in roots)
    tag = "nanofast:" + _compile_cache.sources_digest(roots)
    assert tag in torch.compiler.config.cache_key_tag.split("|")  # import nanofast set it
    # once only, and a tag the user set is kept (config.patch restores the setting: monkeypatch would
    # delete the attribute on undo, which hides it from torch.compile for the rest of the process)
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert _compile_cache.tag_compile_caches() == tag
        _compile_cache.tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == f"mine|{tag}"
    assert tag in torch.compiler.config.cache_key_tag.split("|")
