"""Tests for muonlab.lab.data: the stdlib corpus, user sources, the cache, and the batch sampler."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from muonlab.lab import data as data_mod
from muonlab.lab.data import STDLIB_EXCLUDED_DIRS, Corpus, list_source, load_corpus

SMALL = 300_000  # bytes of stdlib: enough for the tests, fast to build


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory) -> Corpus:
    return load_corpus(max_bytes=SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


def write_texts(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("the second file\n" * 50)
    (root / "a.txt").write_text("the first file, with ünïcödé\n" * 50)
    (root / "sub" / "c.md").write_text("# nested\n" + "text in a subfolder\n" * 50)
    (root / ".hidden.txt").write_text("never read\n")
    return root


# --- the default corpus ---------------------------------------------------------------------


def test_stdlib_listing_is_hash_ordered_and_excludes_tests_and_site_packages():
    listing = list_source()
    assert listing.kind == "stdlib"
    rels = [listing.relpath(f) for f in listing.files]
    assert rels and all(r.endswith(".py") for r in rels)
    assert rels == sorted(rels, key=lambda r: hashlib.sha256(r.encode()).hexdigest())  # deterministic shuffle
    assert rels != sorted(rels)
    # the first 10% of files (what a size cap keeps first) come from all over the alphabet
    head = {r[0].lower() for r in rels[: len(rels) // 10]}
    assert len(head) >= 10
    assert not any(r.startswith("encodings/") for r in rels)
    parts = [tuple(r.split("/")) for r in rels]
    for p in parts:
        assert not set(p[:-1]) & STDLIB_EXCLUDED_DIRS, p
    assert "os.py" in rels
    assert not any(r.startswith(("idlelib/idle_test/", "lib2to3/tests/", "test/")) for r in rels)


def test_stdlib_corpus_builds_and_is_consistent(stdlib_corpus):
    c = stdlib_corpus
    assert c.meta["size"] == SMALL and c.meta["truncated"]
    assert len(c.train) + len(c.val) == c.meta["size"]
    assert len(c.val) == round(0.05 * SMALL)
    assert c.meta["n_files"] >= 1 and "stdlib" in c.meta["source"]
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint8
    everything = bytes(c.train) + bytes(c.val)
    assert hashlib.sha256(everything).hexdigest() == c.meta["hash"]
    assert everything.startswith(b"# ==== ")
    on_disk = json.loads((c.directory / "meta.json").read_text())
    assert on_disk["hash"] == c.meta["hash"]
    assert not [p for p in c.directory.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing


def test_stdlib_corpus_is_deterministic(stdlib_corpus, tmp_path):
    again = load_corpus(max_bytes=SMALL, cache_dir=tmp_path)  # a fresh build elsewhere
    assert not again.from_cache
    assert again.meta["hash"] == stdlib_corpus.meta["hash"]
    assert again.directory.name == stdlib_corpus.directory.name  # same cache key


def test_cache_is_reused_without_reading_the_source(tmp_path, monkeypatch):
    first = load_corpus(max_bytes=50_000, cache_dir=tmp_path)
    assert not first.from_cache

    def no_reading(*args, **kwargs):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(data_mod, "_read_corpus_bytes", no_reading)
    second = load_corpus(max_bytes=50_000, cache_dir=tmp_path)
    assert second.from_cache
    assert second.meta == first.meta
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MUONLAB_CACHE", str(tmp_path / "env"))
    c = load_corpus(write_texts(tmp_path / "texts"))
    assert c.directory.parent == tmp_path / "env" / "corpus"


def test_cache_is_rebuilt_when_the_source_changes_or_is_damaged(tmp_path):
    src = write_texts(tmp_path / "texts")
    cache = tmp_path / "cache"
    a = load_corpus(src, cache_dir=cache)
    (src / "b.txt").write_text("changed content\n" * 80)
    b = load_corpus(src, cache_dir=cache)
    assert not b.from_cache and b.meta["hash"] != a.meta["hash"] and b.directory != a.directory

    with open(b.directory / "train.bin", "r+b") as fh:  # a damaged entry (wrong size) is rebuilt
        fh.truncate(10)
    with pytest.warns(UserWarning, match=r"corpus cache .* is damaged \(.*train.bin holds 10 bytes"):
        c = load_corpus(src, cache_dir=cache)
    assert not c.from_cache and c.meta["hash"] == b.meta["hash"]
    assert load_corpus(src, cache_dir=cache).from_cache


def test_a_damaged_cache_file_of_the_right_size_is_caught_by_its_hash(tmp_path):
    # issue 13: the cache was checked by size only, so flipped bytes were trained on while the run
    # recorded the hash of the original corpus
    src = write_texts(tmp_path / "texts")
    cache = tmp_path / "cache"
    good = load_corpus(src, cache_dir=cache)
    original = bytes(good.train)
    with open(good.directory / "train.bin", "r+b") as fh:
        fh.seek(5)
        fh.write(b"XXXX")
    with pytest.warns(UserWarning, match=rf"corpus cache {good.directory} is damaged \(its content hash"):
        again = load_corpus(src, cache_dir=cache)
    assert not again.from_cache  # rebuilt from the source
    assert bytes(again.train) == original
    assert hashlib.sha256(bytes(again.train) + bytes(again.val)).hexdigest() == again.meta["hash"] == good.meta["hash"]
    assert load_corpus(src, cache_dir=cache).from_cache  # the rebuilt entry passes the check


def test_a_damaged_cache_description_is_rebuilt_with_a_warning(tmp_path):
    src = write_texts(tmp_path / "texts")
    good = load_corpus(src, cache_dir=tmp_path / "cache")
    (good.directory / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"is damaged \(cannot read .*meta.json: JSONDecodeError"):
        again = load_corpus(src, cache_dir=tmp_path / "cache")
    assert not again.from_cache and again.meta["hash"] == good.meta["hash"]


# --- user sources ---------------------------------------------------------------------------


def test_folder_of_text_files(tmp_path):
    src = write_texts(tmp_path / "texts")
    (src / "sub" / "image.bin").write_bytes(bytes(range(256)) * 4)
    (src / "empty.txt").write_text("")
    with pytest.warns(UserWarning, match="1 binary"):
        c = load_corpus(src, cache_dir=tmp_path / "cache")
    assert c.meta["kind"] == "folder"
    assert c.meta["n_files"] == 3 and c.meta["n_binary_skipped"] == 1 and c.meta["n_empty_skipped"] == 1
    text = (bytes(c.train) + bytes(c.val)).decode("utf-8")
    order = [text.index(f"# ==== {name} ====") for name in ["a.txt", "b.txt", "sub/c.md"]]
    assert order == sorted(order)
    assert "never read" not in text and "ünïcödé" in text
    assert c.meta["size"] == len(text.encode())


def test_single_text_file_and_max_bytes(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello world\n" * 100)
    c = load_corpus(f, cache_dir=tmp_path / "cache")
    assert c.meta["kind"] == "file" and c.meta["n_files"] == 1 and c.meta["size"] == 1200
    assert bytes(c.train) + bytes(c.val) == f.read_bytes()
    capped = load_corpus(f, cache_dir=tmp_path / "cache", max_bytes=500)
    assert capped.meta["size"] == 500 and capped.meta["truncated"]


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(missing, cache_dir=tmp_path)


def test_empty_folder_and_empty_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(tmp_path / "blank", cache_dir=tmp_path / "cache")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="e.txt"):
        load_corpus(tmp_path / "e.txt", cache_dir=tmp_path / "cache")


def test_binary_files(tmp_path):
    nul = tmp_path / "data.bin"
    nul.write_bytes(b"abc\x00def" * 100)
    with pytest.raises(ValueError, match="data.bin"):
        load_corpus(nul, cache_dir=tmp_path / "cache")
    latin = tmp_path / "noise.dat"
    latin.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 1000, dtype=np.uint8)))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_corpus(latin, cache_dir=tmp_path / "cache")
    folder = tmp_path / "bins"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="1 binary"):
        load_corpus(folder, cache_dir=tmp_path / "cache")


def test_bad_arguments(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc" * 10)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(f, cache_dir=tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(f, cache_dir=tmp_path, max_bytes=0)


# --- batches --------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step(stdlib_corpus):
    c = stdlib_corpus
    x1, y1 = c.get_batch("train", 8, 64, seed=3, step=17)
    x2, y2 = c.get_batch("train", 8, 64, seed=3, step=17)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == y1.shape == (8, 64) and x1.dtype == y1.dtype == torch.int64
    assert not torch.equal(x1, c.get_batch("train", 8, 64, seed=3, step=18)[0])
    assert not torch.equal(x1, c.get_batch("train", 8, 64, seed=4, step=17)[0])
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one
    # Every row is a real window of the split, and y continues it by one byte.
    train = np.asarray(c.train)
    row = x1[0].numpy().astype(np.uint8).tobytes() + bytes([int(y1[0, -1])])
    assert row in train.tobytes()
    xv, yv = c.get_batch("val", 4, 32, seed=3, step=17)
    assert int(xv.max()) < 256 and torch.equal(xv[:, 1:], yv[:, :-1])


def test_val_batches_are_fixed(stdlib_corpus):
    c = stdlib_corpus
    a = c.val_batches(4, 32, n_batches=3)
    b = c.val_batches(4, 32, n_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 32) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert torch.equal(a[0][0][0], torch.from_numpy(np.asarray(c.val[:32], dtype=np.int64)))  # starts at 0


def test_batch_errors(stdlib_corpus):
    c = stdlib_corpus
    n_val = len(c.val)
    with pytest.raises(ValueError, match=str(n_val)):
        c.get_batch("val", 2, n_val)  # needs n_val + 1 tokens
    c.get_batch("val", 2, n_val - 1)  # exactly fits
    with pytest.raises(ValueError, match="batch_size=0"):
        c.get_batch("train", 0, 16)
    with pytest.raises(ValueError, match="seq_len=0"):
        c.get_batch("train", 2, 0)
    with pytest.raises(ValueError, match="'test'"):
        c.get_batch("test", 2, 16)
    with pytest.raises(ValueError, match="step=-1"):
        c.get_batch("train", 2, 16, step=-1)
    with pytest.raises(ValueError, match="n_batches=0"):
        c.val_batches(2, 16, n_batches=0)


def test_encode_decode_roundtrip():
    text = "def f(x):\n    return x  # é\n"
    tokens = Corpus.encode(text)
    assert tokens.dtype == torch.long and int(tokens.max()) < 256
    assert Corpus.decode(tokens) == text
