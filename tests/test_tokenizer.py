"""Tokenizers (bytes, byte-level BPE) and bits per byte: the cache, round trips, the formula, a CLI run."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from muonlab.cli import main
from muonlab.lab import data as data_mod
from muonlab.lab.data import (
    BYTES,
    BPETokenizer,
    Corpus,
    bits_per_byte,
    canonical_tokenizer,
    load_corpus,
    parse_tokenizer,
)
from muonlab.lab.train import TrainConfig, read_metrics, train

MICRO = dict(d_model=32, n_layer=1, n_head=2, n_kv_head=1, seq_len=32)
N = 300


def write_text(path):
    text = "".join(f"def f{i}(x, café={i % 5}):\n    return x * {i} + {i % 7}  # ü\n\n" for i in range(1500))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "code.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bpe(src, cache):
    pytest.importorskip("tokenizers")
    return load_corpus(src, cache_dir=cache, tokenizer=f"bpe:{N}")


@pytest.fixture(scope="module")
def text(src, cache):
    return load_corpus(src, cache_dir=cache)


def entry_files(corpus):
    return {name: corpus.token_dir / name for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json")}


# ------------------------------------------------------------------------------------------------
# The spec and the config key
# ------------------------------------------------------------------------------------------------


def test_default_tokenizer_keeps_config_keys():
    # computed with the code before the tokenizer field existed (when "muon" was the default
    # optimizer): cached runs stay valid
    assert TrainConfig(optimizer="muon").key() == "b547a8dba9ec"
    assert TrainConfig(model="tiny", optimizer="adamw", steps=20, batch_size=4, seq_len=32, data="/x/y.txt",
                       eval_every=5).key() == "9c3598e78613"
    assert TrainConfig(optimizer="muon", tokenizer="bytes").key() == "b547a8dba9ec"
    assert TrainConfig().optimizer == "normuon" and TrainConfig().key() != "b547a8dba9ec"
    assert TrainConfig(tokenizer="bpe:300").key() != TrainConfig(tokenizer="bpe:301").key() != "b547a8dba9ec"


def test_parse_tokenizer():
    assert parse_tokenizer("bytes") == ("bytes", 256)
    assert parse_tokenizer("bpe:300") == ("bpe", 300)
    assert parse_tokenizer("bpe:65536") == ("bpe", 65536)
    assert canonical_tokenizer(" bpe:0300 ") == "bpe:300"


@pytest.mark.parametrize("spec", ["bpe:256", "bpe:0", "bpe:-5", "bpe:65537", "bpe:abc", "bpe:", "bpe", "bytes:8",
                                  "wordpiece:300", "", "BPE:300"])
def test_bad_tokenizer_specs_name_the_value(spec):
    with pytest.raises(ValueError) as exc:
        parse_tokenizer(spec)
    assert repr(spec) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError):
        TrainConfig(tokenizer=spec).validate()


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:70000", "bpe:many", "sentencepiece"])
def test_cli_bad_tokenizer_is_one_line(tmp_path, capsys, spec):
    code = main(["train", "--tokenizer", spec, "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("muonlab train: error: --tokenizer") and spec in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# The BPE and its cache
# ------------------------------------------------------------------------------------------------


def test_bpe_entry_is_cached_and_reused(bpe, src, cache, monkeypatch):
    assert bpe.vocab_size == N and bpe.tokenizer.spec == f"bpe:{N}"
    assert bpe.train.dtype == np.uint16 and bpe.val.dtype == np.uint16
    assert bpe.token_dir.parent == bpe.directory / "tokenizers"  # next to the corpus entry it was made from
    assert int(max(bpe.train.max(), bpe.val.max())) < N
    assert len(bpe.train) < bpe.meta["train_size"]  # merges make fewer tokens than bytes
    stamps = {name: p.stat().st_mtime_ns for name, p in entry_files(bpe).items()}

    def no_training(*args, **kwargs):
        raise AssertionError("the cached BPE was trained again")

    monkeypatch.setattr(BPETokenizer, "train", classmethod(no_training))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_corpus(src, cache_dir=cache, tokenizer=f"bpe:{N}")
    assert again.from_cache
    assert {name: p.stat().st_mtime_ns for name, p in entry_files(again).items()} == stamps
    assert np.array_equal(again.train, bpe.train) and np.array_equal(again.val, bpe.val)
    assert again.tokenizer_meta == bpe.tokenizer_meta


def test_bpe_is_trained_on_the_training_split_only(bpe, text):
    fresh = BPETokenizer.train(bytes(text.train), N)
    assert fresh.to_json() == bpe.tokenizer.to_json()
    assert bpe.tokenizer_meta["train_bytes"] == len(text.train) and bpe.tokenizer_meta["val_bytes"] == len(text.val)


def test_new_vocab_size_is_a_new_entry(bpe, src, cache):
    other = load_corpus(src, cache_dir=cache, tokenizer="bpe:280")
    assert other.token_dir != bpe.token_dir and other.vocab_size == 280
    assert not other.from_cache


@pytest.mark.parametrize("damage", ["flip_val", "truncate_train", "edit_tokenizer", "bad_meta"])
def test_damaged_bpe_cache_is_rebuilt(tmp_path, damage):
    pytest.importorskip("tokenizers")
    src = write_text(tmp_path / "code.py")
    good = load_corpus(src, cache_dir=tmp_path / "cache", tokenizer=f"bpe:{N}")
    val, train_ids, blob = np.array(good.val), np.array(good.train), good.tokenizer.to_json()
    files = entry_files(good)
    del good
    if damage == "flip_val":
        raw = bytearray(files["val.bin"].read_bytes())
        raw[10] ^= 0xFF  # same size, different content: only the hash check sees it
        files["val.bin"].write_bytes(bytes(raw))
    elif damage == "truncate_train":
        files["train.bin"].write_bytes(files["train.bin"].read_bytes()[:-2])
    elif damage == "edit_tokenizer":
        files["tokenizer.json"].write_text(files["tokenizer.json"].read_text().replace('"model"', '"modle"'))
    else:
        files["meta.json"].write_text("{not json")
    with pytest.warns(UserWarning, match="tokenizer cache .* is damaged"):
        rebuilt = load_corpus(src, cache_dir=tmp_path / "cache", tokenizer=f"bpe:{N}")
    assert not rebuilt.from_cache
    assert np.array_equal(rebuilt.val, val) and np.array_equal(rebuilt.train, train_ids)
    assert rebuilt.tokenizer.to_json() == blob
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(src, cache_dir=tmp_path / "cache", tokenizer=f"bpe:{N}").from_cache  # passes the check


def test_encode_decode_round_trips_the_validation_text(bpe, text):
    val_bytes = bytes(text.val)
    assert bpe.tokenizer.decode_bytes(bpe.val) == val_bytes
    assert bpe.decode(bpe.val) == val_bytes.decode("utf-8", errors="replace")
    assert np.array_equal(bpe.tokenizer.encode_bytes(val_bytes), np.asarray(bpe.val))
    sample = "def g(café):\n    return 'ü' * 3  # 你好\n"
    ids = bpe.encode(sample)
    assert ids.dtype == torch.long and len(ids) < len(sample.encode())
    assert bpe.decode(ids) == sample
    # bytes that are not UTF-8 become their single-byte tokens: still lossless
    raw = b"x = 1\n\xff\xfe\x80 return \xc3(\n"
    assert bpe.tokenizer.decode_bytes(bpe.tokenizer.encode_bytes(raw)) == raw
    # the class-level helpers stay byte-level, as before
    assert Corpus.encode("ab").tolist() == [97, 98] and Corpus.decode([97, 98]) == "ab"
    assert text.encode("ab").tolist() == [97, 98]


# ------------------------------------------------------------------------------------------------
# Bits per byte
# ------------------------------------------------------------------------------------------------


def test_bits_per_byte_formula():
    assert bits_per_byte(2.0, 10, 25) == pytest.approx(2.0 * 10 / (25 * math.log(2)))
    assert bits_per_byte(math.log(256), 7, 7) == pytest.approx(8.0)  # a uniform guess over bytes: 8 bits
    with pytest.raises(ValueError, match="n_bytes=0"):
        bits_per_byte(1.0, 3, 0)


def test_token_byte_counts(bpe):
    tok = bpe.tokenizer
    ids = np.asarray(bpe.val[:200])
    assert bpe.count_bytes(ids) == len(tok.decode_bytes(ids)) == sum(len(tok.token_bytes[i]) for i in ids)
    assert BYTES.count_bytes(torch.tensor([[1, 2], [3, 4]])) == 4
    with pytest.raises(ValueError, match="token id 300"):
        bpe.count_bytes([1, 300])


def _micro(**kw) -> TrainConfig:
    base = TrainConfig(model="tiny", model_overrides=MICRO, steps=3, batch_size=2, seq_len=16, eval_every=3,
                       eval_batches=2, checkpoint_every=3, warmup=1, device="cpu")
    return replace(base, **kw)


def test_byte_run_bpb_is_loss_over_ln2(tmp_path, text):
    res = train(_micro(), tmp_path / "run", progress=False, corpus=text)
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert evals and all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2)) for r in evals)
    assert res["final_val_bpb"] == pytest.approx(res["final_val_loss"] / math.log(2))
    assert res["tokenizer"] == "bytes"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["tokenizer"] == {"kind": "bytes", "spec": "bytes", "vocab_size": 256}
    assert "tokenizer" not in cfg["config_key"] and cfg["config_key"] == _micro().key()
    # a cached result from before bits per byte were reported still gets them (bytes: loss / ln 2)
    path = tmp_path / "run" / "result.json"
    old = json.loads(path.read_text())
    del old["final_val_bpb"]
    path.write_text(json.dumps(old))
    again = train(_micro(), tmp_path / "run", progress=False, corpus=text)
    assert again["final_val_bpb"] == pytest.approx(res["final_val_bpb"])


def test_a_corpus_of_another_tokenizer_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match="tokenized by bytes"):
        train(_micro(tokenizer=f"bpe:{N}"), tmp_path / "run", progress=False, corpus=text)
    assert not (tmp_path / "run").exists()


def test_cli_bpe_run_end_to_end(tmp_path, src, bpe, capsys, monkeypatch):
    monkeypatch.setenv(data_mod.CACHE_ENV, str(tmp_path / "muonlab-cache"))
    out = tmp_path / "run"
    code = main(["train", "--tokenizer", f"bpe:{N}", "--data", str(src), "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--eval-batches", "2", "--eval-every", "3", "--out", str(out), "--quiet",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["tokenizer"] == f"bpe:{N}"
    tok = cfg["tokenizer"]
    assert tok["kind"] == "bpe" and tok["vocab_size"] == N and tok["spec"] == f"bpe:{N}"
    assert tok["hash"] == bpe.tokenizer_meta["hash"] and tok["cache_key"] == bpe.tokenizer_meta["cache_key"]
    assert tok["library"].startswith("tokenizers ")
    assert cfg["model_config"]["vocab_size"] == N  # the model's vocabulary follows the tokenizer
    assert (tmp_path / "muonlab-cache" / "corpus").is_dir()  # the default cache root, from the environment
    res = json.loads((out / "result.json").read_text())
    assert res["tokenizer"] == f"bpe:{N}"
    # bits per byte by hand: the evaluated windows' target tokens and the bytes they spell
    batches = bpe.val_batches(2, 16, 2)
    n_tokens = sum(y.numel() for _, y in batches)
    n_bytes = sum(len(bpe.tokenizer.decode_bytes(y)) for _, y in batches)
    assert n_bytes > n_tokens
    assert res["final_val_bpb"] == pytest.approx(res["final_val_loss"] * n_tokens / (n_bytes * math.log(2)), rel=1e-12)
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and all("val_bpb" in r for r in evals)
    assert os.path.exists(out / "metrics.jsonl")


def test_compare_reports_bits_per_byte(tmp_path, src, bpe, monkeypatch):
    pytest.importorskip("matplotlib")
    from muonlab.lab.compare import compare, format_summary

    monkeypatch.setenv(data_mod.CACHE_ENV, str(tmp_path / "muonlab-cache"))
    base = _micro(data=str(src), tokenizer=f"bpe:{N}", steps=4, eval_every=2)
    out = tmp_path / "cmp"
    summary = compare(["muon", "adamw"], base=base, out=out, progress=False, log=lambda s: None)
    assert summary["tokenizer"]["spec"] == f"bpe:{N}" and summary["config"]["tokenizer"] == f"bpe:{N}"
    for name in ("muon", "adamw"):
        s = summary["optimizers"][name]
        res = json.loads((out / s["runs"][0] / "result.json").read_text())
        assert s["final_val_bpb"] == pytest.approx(res["final_val_bpb"])
        assert s["final_val_bpb"] != pytest.approx(s["final_val_loss"] / math.log(2))  # BPE: not loss / ln 2
    assert summary["target_val_bpb"] == summary["optimizers"]["adamw"]["final_val_bpb"]
    table = format_summary(summary)
    assert "val bpb" in table.splitlines()[1] and "bits per byte" in table.splitlines()[0]
    assert "final_val_bpb" in (out / "summary.csv").read_text().splitlines()[0]
    html = (out / "report.html").read_text()
    assert "val bits per byte" in html and f"bpe:{N}" in html
