"""Issue 13, the lab side: nothing lost, nothing silently wrong, every failure a clear message.

Each test names the fault it holds; docs/reliability.md lists them all with their status. The
command-line tests run ``muonlab.cli.main`` in this process on the ``tiny`` model with a small text
file (a few ms per step), so every failure path here costs well under a second or two.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from muonlab.cli import main
from muonlab.lab import train as train_mod
from muonlab.lab.train import LOCK_FILE, LabError, RunFolder, RunFolderBusy, atomic_write_text


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """(shared training flags for a fast CLI run, tmp_path); the corpus cache goes under tmp_path."""
    monkeypatch.setenv("MUONLAB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "code.py"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(800)))
    flags = ["--model", "tiny", "--data", str(data), "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
             "--quiet"]
    return flags, tmp_path


def one_error_line(err: str, command: str) -> str:
    """The one line a failed command prints (warnings aside): ``muonlab CMD: error: ...``."""
    lines = [ln for ln in err.splitlines() if ": warning: " not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"muonlab {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- 1. two runs on one folder ----------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getpid()).encode())
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_on_a_busy_folder_fails_at_once_naming_the_pid(lab, capsys):
    """Another process holds the folder (a stand-in that follows muonlab's lock protocol: flock on
    muonlab.lock with its pid in it, so the test needs no second torch import); compare and train
    on that folder stop at once; once the holder is killed, its stale lock is taken over."""
    flags, tmp = lab
    out = tmp / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (["compare", "--optimizers", "adamw"], ["train", "--optimizer", "adamw"]):
            assert main([*command, *flags, "--steps", "60", "--out", str(out)]) == 1
            line = one_error_line(capsys.readouterr().err, command[0])
            assert f"{out} is in use by another muonlab run (pid {holder.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written beside the holder
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock file (with its pid) is left behind, and is taken over
    with pytest.warns(UserWarning, match=rf"taking over a stale lock left by pid {holder.pid} \(no longer running"):
        with RunFolder(out):
            assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (out / LOCK_FILE).exists()


def test_train_and_compare_take_the_lock_in_one_process_too(lab, capsys):
    flags, tmp = lab
    out = tmp / "held"
    with RunFolder(out):
        assert main(["train", "--optimizer", "adamw", *flags, "--steps", "2", "--out", str(out)]) == 1
        assert f"(pid {os.getpid()}, lock file {out / LOCK_FILE})" in one_error_line(capsys.readouterr().err, "train")
        with pytest.raises(RunFolderBusy, match=str(out)):
            from muonlab.lab.compare import compare

            compare(["adamw"], out=out, log=lambda s: None)


def test_the_lock_is_released_on_success_and_on_exceptions(tmp_path):
    out = tmp_path / "r"
    with RunFolder(out):
        assert (out / LOCK_FILE).exists()
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(KeyError):
        with RunFolder(out):
            raise KeyError("boom")
    assert not (out / LOCK_FILE).exists() and out.is_dir()  # pre-existing now: kept
    with RunFolder(out):  # free again
        pass


# --- 2/4. checkpoints and divergence on the command line --------------------------------------


def test_divergence_is_one_line_exit_1_and_every_checkpoint_left_is_finite(lab, capsys):
    flags, tmp = lab
    out = tmp / "diverge"
    rc = main(["train", "--optimizer", "sgd", "--lr", "1e6", "--steps", "40", "--checkpoint-every", "1", *flags,
               "--out", str(out)])
    line = one_error_line(capsys.readouterr().err, "train")
    assert rc == 1 and line.startswith("muonlab train: error: training diverged: ")
    assert "lower the learning rate" in line and f"is kept in {out / 'checkpoint.pt'}" in line
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        if (out / name).exists():
            ckpt = torch.load(out / name, weights_only=True)
            assert all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values() if t.is_floating_point())
    assert (out / "metrics.jsonl").exists()  # a run that trained some steps keeps its folder


def _finished_run(flags, out) -> None:
    assert main(["train", "--optimizer", "adamw", *flags, "--steps", "4", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    (out / "result.json").unlink()  # as if the run had stopped after its last checkpoint


def test_a_damaged_checkpoint_on_the_command_line_falls_back_with_a_warning(lab, capsys):
    flags, tmp = lab
    out = tmp / "r"
    _finished_run(flags, out)
    capsys.readouterr()
    (out / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    assert main(["train", "--optimizer", "adamw", *flags, "--steps", "4", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"muonlab train: warning: {out / 'checkpoint.pt'} is unreadable" in err
            and f"resuming from the previous checkpoint {out / 'checkpoint.prev.pt'} (step 2)" in err), err


def test_no_readable_checkpoint_is_one_line_naming_the_files(lab, capsys):
    flags, tmp = lab
    out = tmp / "r"
    _finished_run(flags, out)
    capsys.readouterr()
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    (out / "checkpoint.prev.pt").write_bytes(b"")
    assert main(["train", "--optimizer", "adamw", *flags, "--steps", "4", "--checkpoint-every", "2",
                 "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"cannot resume the run in {out}: {ckpt} is unreadable (" in line
    assert f"{out / 'checkpoint.prev.pt'} is unreadable (the file is empty)" in line


# --- 3. zero is not "the default" ------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--steps", "--tokens", "--eval-every", "--checkpoint-every", "--batch-size",
                                  "--seq-len", "--grad-accum", "--eval-batches"])
def test_zero_is_rejected_never_replaced_by_the_default(lab, capsys, monkeypatch, flag):
    flags, tmp = lab
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, out, **kw: calls.append(cfg) or {})  # no training here
    argv = [a for a in flags if a not in ("--batch-size", "--seq-len", "--eval-batches", "2", "16", "1")]
    assert main(["train", *argv, flag, "0", "--out", str(tmp / "r")]) == 2
    assert one_error_line(capsys.readouterr().err, "train") == f"muonlab train: error: {flag} must be a positive integer, got 0"
    assert calls == [] and not (tmp / "r").exists()


def test_tokens_set_the_steps_and_the_intervals_follow_them(lab, monkeypatch):
    flags, tmp = lab
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, out, **kw: calls.append(cfg) or {})
    assert main(["train", *flags, "--tokens", "640", "--out", str(tmp / "r")]) == 0
    (cfg,) = calls
    assert (cfg.steps, cfg.eval_every, cfg.checkpoint_every) == (20, 2, 5)  # 640 / (2 x 16); steps/10; steps/4
    assert main(["train", *flags, "--tokens", "640", "--steps", "3", "--out", str(tmp / "r")]) == 2


def test_efficiency_honours_tokens_instead_of_ignoring_them(lab, monkeypatch):
    from muonlab.lab import compare as compare_mod

    flags, tmp = lab
    calls = []
    monkeypatch.setattr(compare_mod, "efficiency", lambda *a, base, **kw: calls.append(base) or {})
    assert main(["efficiency", *flags, "--tokens", "640", "--out", str(tmp / "e")]) == 0
    assert calls[0].steps == 20  # it used to run the default 600 steps, whatever --tokens said


# --- 7. failures as one line, with --debug for the traceback ----------------------------------


def test_out_under_a_file_is_a_clear_error(lab, capsys):
    flags, tmp = lab
    f = tmp / "a-file"
    f.write_text("not a folder")
    for out, expected in ((f / "run", f"cannot create the output folder {f / 'run'}: {f} is a file, not a folder"),
                          (f, f"output folder {f} is a file, not a folder; choose another --out")):
        for command in ("train", "compare"):
            assert main([command, *flags, "--steps", "2", "--out", str(out)]) == 2
            assert one_error_line(capsys.readouterr().err, command) == f"muonlab {command}: error: {expected}"
    assert f.read_text() == "not a folder"


def test_an_unwritable_out_is_a_clear_error(lab, capsys, monkeypatch):
    """As a regular user the folder is really made read-only; as root (CI containers), which chmod
    does not stop, the lock file's creation is made to fail with EACCES, which is what the
    kernel returns there for a regular user."""
    flags, tmp = lab
    out = tmp / "readonly"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:
        real_open = os.open

        def deny(path, *args, **kwargs):
            if str(path) == str(out / LOCK_FILE):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny)
    try:
        assert main(["train", *flags, "--steps", "2", "--out", str(out)]) == 1
    finally:
        out.chmod(0o755)
    line = one_error_line(capsys.readouterr().err, "train")
    assert line == f"muonlab train: error: cannot write to the output folder {out}: Permission denied"
    assert out.is_dir()  # the user's folder stays


def test_an_out_under_an_unwritable_folder_is_a_clear_error(lab, capsys, monkeypatch):
    """The folder cannot be created (a read-only parent): really so as a regular user; as root,
    Path.mkdir is made to raise the EACCES a regular user would get."""
    import pathlib

    flags, tmp = lab
    parent = tmp / "ro-parent"
    parent.mkdir()
    out = parent / "new" / "run"
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:
        real_mkdir = pathlib.Path.mkdir

        def deny(self, *args, **kwargs):
            if str(self).startswith(str(parent) + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", deny)
    try:
        assert main(["compare", *flags, "--steps", "2", "--out", str(out)]) == 1
    finally:
        parent.chmod(0o755)
    line = one_error_line(capsys.readouterr().err, "compare")
    assert line == f"muonlab compare: error: cannot create the output folder {out}: Permission denied"
    assert sorted(parent.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(lab, capsys, monkeypatch):
    """The disk fills up while the second checkpoint is written (torch.save raises ENOSPC part-way)."""
    flags, tmp = lab
    out = tmp / "full"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj["step"] == 4:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    argv = ["train", "--optimizer", "adamw", *flags, "--steps", "6", "--checkpoint-every", "2", "--out", str(out)]
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert line == (f"muonlab train: error: cannot write the checkpoint {out / 'checkpoint.pt'}: No space left on "
                    "device; the previous checkpoint is kept")
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    with pytest.raises(LabError):  # --debug: the exception itself, with its traceback
        monkeypatch.setattr(torch, "save", save)
        main([*argv, "--debug"])


def test_a_full_disk_at_fsync_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    # ENOSPC often shows only when the data is flushed: every atomic write fsyncs before renaming
    path = tmp_path / "result.json"
    path.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=rf"No space left on device: '{path}.tmp'"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and not (tmp_path / "result.json.tmp").exists()


def test_debug_shows_the_traceback_before_or_after_the_command(lab):
    flags, tmp = lab
    (tmp / "f").write_text("")
    for argv in (["--debug", "train", *flags, "--out", str(tmp / "f")],
                 ["train", *flags, "--out", str(tmp / "f"), "--debug"]):
        with pytest.raises(ValueError, match="is a file, not a folder"):
            main(argv)


def test_an_unexpected_error_is_one_line_with_a_hint(lab, capsys, monkeypatch):
    flags, tmp = lab

    def broken(cfg, out, **kw):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(train_mod, "train", broken)
    assert main(["train", *flags, "--out", str(tmp / "r")]) == 1
    assert one_error_line(capsys.readouterr().err, "train") == (
        "muonlab train: error: unexpected RuntimeError: boom second line (rerun with --debug for the traceback)")


# --- 8. messages that say what is wrong ------------------------------------------------------


@pytest.mark.parametrize("command, argv, expected", [
    ("compare", ["--seeds", "a,b"], "--seeds must be comma-separated integers >= 0, e.g. --seeds 0,1; got 'a,b'"),
    ("compare", ["--seeds", "0,0"], "--seeds lists seed 0 more than once: '0,0'"),
    ("efficiency", ["--seeds", "1.5"], "--seeds must be comma-separated integers >= 0, e.g. --seeds 0,1; got '1.5'"),
    ("efficiency", ["--fractions", "half"], "--fractions must be comma-separated numbers in (0, 1.5], e.g. 0.5,1.0; "
                                            "got 'half'"),
    ("train", ["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    ("train", ["--out", ""], "--out must name a folder, got an empty string"),
])
def test_bad_lists_and_values_say_what_is_wrong(lab, capsys, command, argv, expected):
    flags, tmp = lab
    assert main([command, *flags, *argv]) == 2
    assert one_error_line(capsys.readouterr().err, command) == f"muonlab {command}: error: {expected}"


def test_a_damaged_result_json_on_the_command_line_is_named(lab, capsys):
    flags, tmp = lab
    out = tmp / "r"
    argv = ["train", "--optimizer", "adamw", *flags, "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    (out / "result.json").write_text("{")
    capsys.readouterr()
    assert main(argv) == 0  # finished again from its checkpoint
    assert f"muonlab train: warning: result file {out / 'result.json'} is damaged" in capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["finished"] is True


# --- 12. leftovers -----------------------------------------------------------------------------


def test_a_failed_run_removes_the_folder_it_created_and_nothing_else(lab, capsys):
    flags, tmp = lab
    # the batch is larger than the data: found after the folder was made, before any step
    big = [a if a != "2" else "100000" for a in flags]
    new = tmp / "new" / "run"
    assert main(["train", *big, "--steps", "2", "--out", str(new)]) == 2
    assert "larger than the training data" in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp / "new").exists()  # the run folder and the parent it created are gone

    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["train", *big, "--steps", "2", "--out", str(mine)]) == 2
    assert "larger than the training data" in one_error_line(capsys.readouterr().err, "train")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # a user's folder and files stay

    missing = [a if a != str(tmp / "code.py") else str(tmp / "nope.txt") for a in flags]
    assert main(["compare", *missing, "--steps", "2", "--out", str(tmp / "cmp")]) == 2
    assert "corpus path does not exist" in one_error_line(capsys.readouterr().err, "compare")
    assert not (tmp / "cmp").exists()
