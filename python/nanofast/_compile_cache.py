"""torch.compile's on-disk caches (the FX graph and AOTAutograd caches) key a graph by its code, where
a custom op is a name only: neither its fake implementation nor its autograd formula enter the key
(pytorch/pytorch#144344, #160472). A graph cached while another version of nanofast was installed
would then be loaded with that version's output shapes and gradients, silently: a compiled step
whose op's backward had changed returned the old gradients. So importing nanofast adds a digest of
its Python sources (the ops, their fakes and formulas, the Triton kernels) to
torch.compiler.config.cache_key_tag, torch's own setting for telling caches apart: graphs compiled
against other sources are compiled again. A tag already set (TORCH_COMPILE_CACHE_KEY_TAG) is kept,
with nanofast's appended.
"""
import hashlib
import importlib.util
import os

import torch

_PREFIX = "nanofast:"


def sources_digest(roots):
    """A digest of the .py files under each folder in roots: their paths relative to it and contents."""
    digest = hashlib.sha256()
    for root in roots:
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()[:16]


def _source_roots():
    """nanofast's package folder, and nanofast.kernels' where it lies elsewhere (an editable install
    maps it to the checkout's kernels/), found without importing it."""
    roots = [os.path.dirname(os.path.abspath(__file__))]
    spec = importlib.util.find_spec("nanofast.kernels")
    for location in (spec.submodule_search_locations or []) if spec else []:
        location = os.path.abspath(location)
        if not location.startswith(roots[0] + os.sep):
            roots.append(location)
    return roots


def tag_compile_caches():
    """Puts "nanofast:<digest of the sources>" into torch.compiler.config.cache_key_tag (once), and
    returns the tag."""
    tag = _PREFIX + sources_digest(_source_roots())
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split("|"):
        torch.compiler.config.cache_key_tag = f"{current}|{tag}" if current else tag
    return tag
