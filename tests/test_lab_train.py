"""The trainer: determinism, bit-identical resume, schedules, accumulation and clear errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from muonlab.lab.data import load_corpus
from muonlab.lab.train import TrainConfig, lr_factor, read_metrics, train

MICRO = dict(d_model=32, n_layer=1, n_head=2, n_kv_head=1, seq_len=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000))
    (root / "code.py").write_text(text)
    return load_corpus(root / "code.py", cache_dir=root / "cache")


def micro_config(**kw) -> TrainConfig:
    base = TrainConfig(model="tiny", model_overrides=MICRO, steps=12, batch_size=4, eval_every=4, eval_batches=2,
                       checkpoint_every=4, warmup=2, device="cpu")
    return replace(base, **kw)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def evals(run_dir):
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if r["kind"] == "eval"]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_is_bit_identical(tmp_path, corpus, optimizer):
    cfg = micro_config(optimizer=optimizer)
    full = train(cfg, tmp_path / "full", progress=False, corpus=corpus)
    part = train(cfg, tmp_path / "part", progress=False, corpus=corpus, stop_after=5)
    assert part == {"finished": False, "step": 5}
    assert (tmp_path / "part" / "checkpoint.pt").exists() and not (tmp_path / "part" / "result.json").exists()
    resumed = train(cfg, tmp_path / "part", progress=False, corpus=corpus)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")  # exact float equality
    assert evals(tmp_path / "full") == evals(tmp_path / "part")
    assert resumed["final_val_loss"] == full["final_val_loss"]
    steps = [r["step"] for r in read_metrics(tmp_path / "part") if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # no duplicated or missing rows after resume


def test_same_seed_same_run_different_seed_differs(tmp_path, corpus):
    cfg = micro_config(steps=4, eval_every=2)
    train(cfg, tmp_path / "a", progress=False, corpus=corpus)
    train(cfg, tmp_path / "b", progress=False, corpus=corpus)
    train(replace(cfg, seed=1), tmp_path / "c", progress=False, corpus=corpus)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_finished_run_is_cached_and_config_change_is_refused(tmp_path, corpus):
    cfg = micro_config(steps=4, eval_every=2)
    first = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    again = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    assert again == first
    train(cfg, tmp_path / "s", progress=False, corpus=corpus, stop_after=2)
    with pytest.raises(ValueError, match="different configuration"):
        train(replace(cfg, steps=6), tmp_path / "s", progress=False, corpus=corpus)


def test_training_reduces_loss_and_writes_files(tmp_path, corpus):
    cfg = micro_config(steps=30, eval_every=10, checkpoint_every=10)
    res = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    ev = evals(tmp_path / "r")
    assert ev[0][0] == 0 and ev[-1][0] == 30
    assert ev[-1][1] < ev[0][1] - 0.5  # from ln(256) = 5.5 nats/byte
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["corpus"]["hash"] == corpus.meta["hash"] and meta["corpus"]["size"] > 0
    assert res["tokens"] == 30 * 4 * 32
    assert res["optimizer_state_bytes"] > 0
    rows = [r for r in read_metrics(tmp_path / "r") if "muon_update_rms" in r]
    assert rows and all(r["muon_update_rms"] > 0 for r in rows)


def test_grad_accumulation_matches_bigger_batch_in_token_count(tmp_path, corpus):
    cfg = micro_config(steps=4, eval_every=2, grad_accum=2)
    res = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    assert res["tokens"] == 4 * 2 * 4 * 32


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_and_fully_decay(schedule):
    cfg = micro_config(steps=100, warmup=10, schedule=schedule, decay_fraction=0.2)
    f = [lr_factor(s, cfg) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert max(f) == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert f[100] == pytest.approx(0.0, abs=1e-12)  # fully decayed when the budget ends
        assert 0 < f[99] < 0.06  # the last update still moves, with a tiny lr
        assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warmup
    if schedule == "wsd":
        assert f[50] == 1.0 and f[79] == 1.0 and f[85] < 1.0


def test_scheduler_scales_every_group(tmp_path, corpus):
    cfg = micro_config(steps=8, eval_every=4, warmup=0)
    train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    rows = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "train"]
    first, last = rows[0]["lrs"], rows[-1]["lrs"]
    assert len(first) >= 2  # muon and adamw groups
    ratios = [b / a for a, b in zip(first, last)]
    assert all(r == pytest.approx(ratios[0]) for r in ratios) and ratios[0] < 0.2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(optimizer="adamz"), "valid optimizers"),
        (dict(model="huge"), "tiny"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(schedule="linear"), "schedule"),
        (dict(lr=-1.0), "lr"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, corpus, kw, match):
    with pytest.raises(ValueError, match=match):
        train(micro_config(**kw), tmp_path / "r", progress=False, corpus=corpus)


def test_batch_larger_than_data_is_an_error(tmp_path):
    (tmp_path / "small.txt").write_text("tiny corpus " * 20)
    corpus = load_corpus(tmp_path / "small.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="longer than the data|larger than the training data"):
        train(micro_config(batch_size=64), tmp_path / "r", progress=False, corpus=corpus)


def test_divergence_is_reported_not_silent(tmp_path, corpus):
    cfg = micro_config(optimizer="sgd", lr=1e6, steps=6, eval_every=3)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(cfg, tmp_path / "r", progress=False, corpus=corpus)


@pytest.mark.parametrize("optimizer", ["torch-muon", "normuon", "muon-split", "lion"])
def test_zoo_entries_train_through_the_trainer(tmp_path, corpus, optimizer):
    """Chained (torch.optim.Muon + AdamW), variant and third-party entries all run under the
    scheduler, checkpoint and resume machinery."""
    cfg = micro_config(optimizer=optimizer, steps=6, eval_every=3, checkpoint_every=3)
    train(cfg, tmp_path / "part", progress=False, corpus=corpus, stop_after=3)
    res = train(cfg, tmp_path / "part", progress=False, corpus=corpus)
    full = train(cfg, tmp_path / "full", progress=False, corpus=corpus)
    assert res["final_val_loss"] == full["final_val_loss"] < evals(tmp_path / "full")[0][1]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


# --- reliability (issue 13): checkpoints, damaged files, full disks --------------------------------


def _all_finite(ckpt) -> bool:
    tensors = list(ckpt["model"].values())
    for st in ckpt["optimizer"]["state"].values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_a_nonfinite_state_is_never_checkpointed(tmp_path, corpus):
    # AdamW at lr 1e6 turns the weights to NaN in step 2 while that step's loss was still finite; the
    # old trainer checked only the loss, so checkpoint.pt (every step) held the NaN weights
    cfg = micro_config(optimizer="adamw", lr=1e6, steps=40, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite by step 2.*checkpoint of step 1 is kept"):
        train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and _all_finite(ckpt)
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_the_previous_checkpoint_is_kept_beside_the_latest(tmp_path, corpus):
    train(micro_config(), tmp_path / "r", progress=False, corpus=corpus, stop_after=8)  # checkpoints at 4 and 8
    latest = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    prev = torch.load(tmp_path / "r" / "checkpoint.prev.pt", weights_only=True)
    assert (latest["step"], prev["step"]) == (8, 4)


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "random bytes": lambda data: bytes(range(256)) * 40,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus, damage):
    cfg = micro_config()
    full = train(cfg, tmp_path / "full", progress=False, corpus=corpus)
    run = tmp_path / "part"
    train(cfg, run, progress=False, corpus=corpus, stop_after=8)
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(DAMAGE[damage](ckpt.read_bytes()))
    with pytest.warns(UserWarning, match=rf"{ckpt}.*resuming from the previous checkpoint .*checkpoint.prev.pt \(step 4\)"):
        resumed = train(cfg, run, progress=False, corpus=corpus)
    # resumed at step 4 instead of 8, the run still ends bit-identical to the uninterrupted one
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert losses(run) == losses(tmp_path / "full")


def test_a_damaged_checkpoint_without_a_previous_one_is_a_clear_error(tmp_path, corpus):
    from muonlab.lab.train import CheckpointError

    run = tmp_path / "r"
    train(micro_config(), run, progress=False, corpus=corpus, stop_after=4)  # one checkpoint, no previous one
    assert not (run / "checkpoint.prev.pt").exists()
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{run / 'checkpoint.pt'} is unreadable \(the file is empty\)"):
        train(micro_config(), run, progress=False, corpus=corpus)


def test_a_damaged_result_json_is_named_and_the_result_recomputed(tmp_path, corpus):
    cfg = micro_config(steps=4, eval_every=2)
    first = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    path = tmp_path / "r" / "result.json"
    path.write_text('{"finished": tr')
    with pytest.warns(UserWarning, match=rf"result file {path} is damaged"):
        again = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    assert again["final_val_loss"] == first["final_val_loss"]
    assert json.loads(path.read_text())["final_val_loss"] == first["final_val_loss"]


def test_a_run_that_stopped_after_its_last_checkpoint_finishes(tmp_path, corpus):
    # killed between the final checkpoint and result.json: resuming used to crash on a missing loss
    cfg = micro_config(steps=4, eval_every=2)
    first = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    (tmp_path / "r" / "result.json").unlink()
    again = train(cfg, tmp_path / "r", progress=False, corpus=corpus)
    assert again["final_val_loss"] == first["final_val_loss"]


def test_a_full_disk_keeps_the_good_checkpoint_and_no_temporary_file(tmp_path, corpus, monkeypatch):
    import errno

    from muonlab.lab.train import LabError

    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial bytes")  # the disk fills up part-way through the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "r"
    with pytest.raises(LabError, match=rf"cannot write the checkpoint {run / 'checkpoint.pt'}: No space left"):
        train(micro_config(), run, progress=False, corpus=corpus)
    assert calls == [4, 8]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4


def test_seq_len_longer_than_the_context_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="seq_len 64 exceeds the tiny model's context length 32"):
        micro_config(seq_len=64).validate()


def test_a_damaged_line_inside_metrics_is_reported_not_silently_dropped(tmp_path):
    rows = [{"kind": "train", "step": i, "loss": 1.0} for i in range(1, 5)]
    lines = [json.dumps(r) for r in rows]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{torn"] + lines[2:]) + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl is damaged at line 3; reading the 2 rows before it"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + ['{"kind": "tr']))  # a torn last line: quiet
    assert len(read_metrics(tmp_path)) == 4


# ---------------------------------------------------------------------- QK-Clip in the trainer
def test_qk_clip_in_the_trainer(tmp_path):
    """--qk-clip inf logs max_attn_logit and trains bit-identically to no clipping; a small tau
    clips heads every step; a run without QK-Clip keeps the config key it had before the option."""
    import json

    from muonlab.lab.train import TrainConfig, train

    base = dict(steps=4, batch_size=4, seq_len=32, max_corpus_bytes=100000, eval_batches=1, eval_every=4,
                checkpoint_every=4)
    plain = TrainConfig(**base)
    assert plain.key() == TrainConfig(**base, qk_clip=None).key() != TrainConfig(**base, qk_clip=5.0).key()
    runs = {}
    for name, tau in (("off", None), ("inf", float("inf")), ("tight", 0.05)):
        res = train(TrainConfig(**base, qk_clip=tau), tmp_path / name, progress=False)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (res, [r for r in rows if r["kind"] == "train"])
    assert [r["loss"] for r in runs["inf"][1]] == [r["loss"] for r in runs["off"][1]]
    assert runs["inf"][0]["final_val_loss"] == runs["off"][0]["final_val_loss"]
    assert "max_attn_logit" not in runs["off"][1][0]
    assert all(r["max_attn_logit"] > 0 and r["qk_clipped_heads"] == 0 for r in runs["inf"][1])
    assert all(r["qk_clipped_heads"] > 0 and r["qk_min_gamma"] < 1 for r in runs["tight"][1])
    with pytest.raises(ValueError, match=r"qk_clip must be a positive number .* got -1.0"):
        TrainConfig(**base, qk_clip=-1.0).validate()
