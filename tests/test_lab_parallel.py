"""The lab's parallel training (``muonlab train --parallel MODE --mesh AxB``): real gloo processes.

Held to the single-process trainer on the same global batches (tensor-parallel, HSDP and FSDP+TP
runs end at the same loss), to the same run after a resume on another mesh (sharded DCP
checkpoints written by every rank), and to a clear error naming a stalled or killed rank within
the collective timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _ranks import free_port  # tests/_ranks.py

from muonlab.lab.parallel import MODES, parse_mesh
from muonlab.lab.train import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

_SCRIPT = """
import json, os, sys
import torch
from muonlab.lab.train import TrainConfig, train
torch.set_num_threads(1)
mode, mesh, out, stop, clip, qk = sys.argv[1:7]
cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, max_corpus_bytes=200000, eval_batches=2, eval_every=3,
                  checkpoint_every=2, grad_clip=float(clip) if clip != "none" else None,
                  qk_clip=float(qk) if qk != "none" else None)
res = train(cfg, out, progress=False, parallel=mode, mesh=None if mesh == "-" else mesh,
            stop_after=int(stop) if stop != "none" else None)
if os.environ.get("RANK", "0") == "0":
    print("RESULT", json.dumps(res))
"""


def _config(clip=None, qk=None) -> TrainConfig:
    return TrainConfig(steps=6, batch_size=4, seq_len=32, max_corpus_bytes=200000, eval_batches=2, eval_every=3,
                       checkpoint_every=2, grad_clip=clip, qk_clip=qk)


def _run(tmp: Path, nproc: int, mode: str, mesh: str, out: Path, stop="none", clip="none", qk="none") -> dict:
    script = tmp / "run.py"
    script.write_text(_SCRIPT)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    proc = subprocess.run(launcher + [str(script), mode, mesh, str(out), stop, clip, qk], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0][7:])


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in _rows(run)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The single-process run every parallel run is held to (with and without gradient clipping)."""
    tmp = tmp_path_factory.mktemp("ref")
    torch.set_num_threads(1)
    out = {}
    for clip in (None, 0.5):
        res = train(_config(clip), tmp / str(clip), progress=False)
        out[clip] = (res, _losses(tmp / str(clip)))
    return out


# ---------------------------------------------------------------------- meshes and options
def test_parse_mesh():
    assert parse_mesh(None, "fsdp", 4) == (4,) and parse_mesh("4", "tp", 4) == (4,)
    assert parse_mesh("2x2", "hsdp", 4) == (2, 2) and parse_mesh("1x4", "fsdp+tp", 4) == (1, 4)
    assert parse_mesh(None, "hsdp", 4) == (2, 2) and parse_mesh(None, "fsdp+tp", 1) == (1, 1)
    assert parse_mesh(None, "none", 1) == ()
    with pytest.raises(ValueError, match=r"--mesh 2x3 has 6 ranks but the job has 4"):
        parse_mesh("2x3", "hsdp", 4)
    with pytest.raises(ValueError, match=r"--parallel fsdp takes a 1-D mesh \(W\), got --mesh 2x2"):
        parse_mesh("2x2", "fsdp", 4)
    with pytest.raises(ValueError, match=r"--mesh must look like 4 or 2x2, got '2by2'"):
        parse_mesh("2by2", "hsdp", 4)
    with pytest.raises(ValueError, match=r"--parallel hsdp at 3 ranks needs --mesh AxB"):
        parse_mesh(None, "hsdp", 3)
    with pytest.raises(ValueError, match=r"--mesh 2x2 needs a parallel mode"):
        parse_mesh("2x2", "none", 1)


def test_cli_modes_are_the_library_modes():
    from muonlab.lab.cli import PARALLEL_MODES

    assert tuple(PARALLEL_MODES) == MODES


@pytest.mark.parametrize("args, message", [
    (["--parallel", "hsdp", "--mesh", "3x3"], "--mesh 3x3 has 9 ranks but the job has 1 (WORLD_SIZE)"),
    (["--parallel", "tp", "--dist-timeout", "0"], "argument --dist-timeout: must be > 0 seconds, got 0"),
    (["--mesh", "2x2"], "--mesh 2x2 needs a parallel mode"),
])
def test_cli_rejects_bad_layout_in_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "muonlab", "train", "--steps", "2", "--batch-size", "2",
                           "--seq-len", "16", "--max-corpus-bytes", "100000", "--quiet", "--out",
                           str(tmp_path / "r"), *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing left behind


def test_tensor_parallel_refuses_what_it_cannot_split(tmp_path):
    with pytest.raises(ValueError, match=r"--parallel tp does not split mixture-of-experts blocks \(moe_experts=2\)"):
        train(TrainConfig(steps=2, batch_size=2, seq_len=16, max_corpus_bytes=100000,
                          model_overrides={"moe_experts": 2}), tmp_path / "moe", progress=False, parallel="tp")


# ---------------------------------------------------------------------- same answers
def test_one_rank_modes_match_one_process(tmp_path, reference):
    """Every mode at world size 1 (a one-rank group and mesh, built without torchrun) is the
    plain trainer: same losses, and a sharded checkpoint folder instead of checkpoint.pt."""
    res, losses = reference[None]
    for mode in ("hsdp", "fsdp+tp", "tp"):
        got = train(_config(), tmp_path / mode, progress=False, parallel=mode)
        assert got["config_key"] == res["config_key"]
        assert _losses(tmp_path / mode) == pytest.approx(losses, abs=1e-5), mode
        assert (tmp_path / mode / "checkpoint.dcp" / "muonlab_meta.pt").is_file()
        assert not (tmp_path / mode / "checkpoint.pt").exists()
        cfg = json.loads((tmp_path / mode / "config.json").read_text())
        assert cfg["parallel"]["mode"] == mode and cfg["parallel"]["world"] == 1


def test_fsdp_tp_four_ranks_match_one_process(tmp_path, reference):
    """torchrun 4 ranks, FSDP over 2 data groups on top of tensor parallelism over 2 ranks, with
    gradient clipping (a global norm over DTensors of two meshes) and QK-Clip measuring the logits
    of heads split over the TP ranks (tau = inf: never clips): the loss curve of one process."""
    res, losses = reference[0.5]
    got = _run(tmp_path, 4, "fsdp+tp", "2x2", tmp_path / "ft", clip="0.5", qk="inf")
    assert all(r["max_attn_logit"] > 0 for r in _rows(tmp_path / "ft"))
    assert got["finished"] and abs(got["final_val_loss"] - res["final_val_loss"]) < 1e-4
    assert _losses(tmp_path / "ft") == pytest.approx(losses, abs=1e-4)
    shards = sorted(p.name for p in (tmp_path / "ft" / "checkpoint.dcp").glob("*.distcp"))
    assert len(shards) == 4  # every rank wrote its own shards
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == [
        "checkpoint.dcp", "checkpoint.dcp.prev", "config.json", "metrics.jsonl", "result.json"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mode, mesh", [(4, "hsdp", "2x2"), (2, "tp", "-"), (2, "hsdp", "1x2"),
                                               (4, "fsdp+tp", "4x1")])
def test_parallel_modes_match_one_process(tmp_path, reference, nproc, mode, mesh):
    res, losses = reference[None]
    got = _run(tmp_path, nproc, mode, mesh, tmp_path / "r")
    assert abs(got["final_val_loss"] - res["final_val_loss"]) < 1e-4
    assert _losses(tmp_path / "r") == pytest.approx(losses, abs=1e-4)


@pytest.mark.slow
def test_tensor_parallel_qk_clip_matches_one_process(tmp_path):
    """QK-Clip with heads split over 2 TP ranks (each rank clips the rows of its own heads) clips
    the same heads by the same factors as one process."""
    tau = 0.05
    ref = train(_config(qk=tau), tmp_path / "one", progress=False)
    got = _run(tmp_path, 2, "tp", "-", tmp_path / "tp", qk=str(tau))
    assert abs(got["final_val_loss"] - ref["final_val_loss"]) < 1e-4
    for a, b in zip(_rows(tmp_path / "tp"), _rows(tmp_path / "one")):
        assert a["qk_clipped_heads"] == b["qk_clipped_heads"] > 0
        assert a["max_attn_logit"] == pytest.approx(b["max_attn_logit"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


@pytest.mark.slow
def test_resume_across_meshes_and_into_one_process(tmp_path, reference):
    """HSDP 2x2 stops after 2 steps, FSDP+TP 2x2 continues to 4, one plain process finishes: the
    run ends like the uninterrupted one."""
    res, losses = reference[None]
    run = tmp_path / "r"
    assert _run(tmp_path, 4, "hsdp", "2x2", run, stop="2") == {"finished": False, "step": 2}
    assert _run(tmp_path, 4, "fsdp+tp", "2x2", run, stop="2") == {"finished": False, "step": 4}
    done = _run(tmp_path, 0, "none", "-", run)
    assert done["finished"] and abs(done["final_val_loss"] - res["final_val_loss"]) < 1e-4
    assert _losses(run) == pytest.approx(losses, abs=1e-4)


def test_damaged_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    res, _ = reference[None]
    run = tmp_path / "r"
    assert train(_config(), run, progress=False, parallel="fsdp", stop_after=4) == {"finished": False, "step": 4}
    for shard in (run / "checkpoint.dcp").glob("*.distcp"):
        shard.write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match=r"checkpoint.dcp is unreadable .*resuming from the older checkpoint "
                                         r".*checkpoint.dcp.prev \(step 2\)"):
        done = train(_config(), run, progress=False, parallel="fsdp")
    assert done["finished"] and abs(done["final_val_loss"] - res["final_val_loss"]) < 1e-5


# ---------------------------------------------------------------------- faults
def _start_ranks(tmp_path: Path, world: int, timeout_s: int) -> tuple[list[subprocess.Popen], Path]:
    run, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    procs = []
    for r in range(world):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "TMPDIR": str(scratch)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "muonlab", "train", "--parallel", "fsdp", "--steps", "100000",
             "--batch-size", "6", "--seq-len", "32", "--max-corpus-bytes", "200000", "--eval-batches", "1",
             "--eval-every", "100000", "--checkpoint-every", "100000", "--quiet", "--dist-timeout", str(timeout_s),
             "--out", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not (run / "config.json").exists():  # rank 0 writes it just before the first step
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.2)
    time.sleep(2.0)  # a few steps in
    return procs, scratch


@pytest.mark.parametrize("how", ["stop", pytest.param("kill", marks=pytest.mark.slow)])
def test_stalled_or_dead_rank_is_named_within_the_timeout(tmp_path, how):
    """Rank 1 of 3 is frozen (SIGSTOP) or killed mid-run: ranks 0 and 2 exit with status 1 within
    the 5 s collective timeout (plus start-up slack) and one line naming rank 1 and the timeout;
    the killed rank leaves no files of ours behind."""
    procs, scratch = _start_ranks(tmp_path, 3, timeout_s=5)
    try:
        t0 = time.monotonic()
        os.kill(procs[1].pid, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        for r in (0, 2):
            _, err = procs[r].communicate(timeout=60)
            assert procs[r].returncode == 1, err[-2000:]
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("muonlab train: error: rank 1 stopped responding"), err
            assert f"a collective failed on rank {r} of 3 (collective timeout 5 s, --dist-timeout)" in lines[0]
        assert time.monotonic() - t0 < 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    left = [p for p in scratch.rglob("*") if "muonlab" in p.name]
    assert left == []
    assert not (tmp_path / "run" / "checkpoint.dcp.tmp").exists() and not (tmp_path / "run" / "muonlab.lock").exists()
