"""The trainer: one optimizer, one model, one budget; seeded, resumable, metrics as JSONL.

A run directory holds:

* ``config.json``   the exact TrainConfig (and the environment) of the run;
* ``metrics.jsonl`` one JSON object per training step (``kind: "train"``) and per evaluation
  (``kind: "eval"``, with ``val_loss`` in nats per token and ``val_bpb`` in bits per byte of the same
  evaluated text, so runs with different tokenizers compare): the source of truth every plot is drawn from;
* ``checkpoint.pt`` the latest checkpoint (model, optimizer, scheduler, step), written only from a
  finite state, to a temporary name, fsynced, then moved into place;
* ``checkpoint.prev.pt`` the checkpoint before it, kept so that a damaged ``checkpoint.pt`` still
  leaves a good one to resume from (a warning says so);
* ``checkpoint.dcp/`` and ``checkpoint.dcp.prev/`` instead, in a parallel run (``--parallel``): the
  same, as sharded ``torch.distributed.checkpoint`` folders written by every rank (see
  :mod:`muonlab.lab.parallel`); a run resumes from the newest good checkpoint of either kind;
* ``result.json``   written last, when the run finished: final validation loss (nats per token) and
  bits per byte, tokens, time;
* ``muonlab.lock``  present while a run holds the folder (it holds the run's pid): a second run
  on the same folder stops at once with an error naming the pid (see :class:`RunFolder`).

A run stopped at step K and resumed from its checkpoint produces bit-identical losses to an
uninterrupted run (on CPU): the data order is a pure function of (seed, step) and every piece of
state that influences the next step is in the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

try:  # POSIX advisory locks; the kernel releases them when the holder exits, however it exits
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .data import DEFAULT_TOKENIZER, Corpus, bits_per_byte, canonical_tokenizer, load_corpus, parse_tokenizer
from ..qkclip import QKClip
from .model import GPT, GPTConfig
from .zoo import build_optimizer, check_weight_decay, get_entry

SCHEDULES = ("cosine", "wsd", "constant")
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
LOCK_FILE = "muonlab.lock"
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "train_time_s", "rng", "config_key")


class LabError(RuntimeError):
    """A failure of a lab run that is not a bug: a busy folder, a damaged checkpoint, a full disk.
    The message says what is wrong and names the file or folder; the command line prints it as one
    line ``muonlab CMD: error: ...`` and exits with status 1."""


class RunFolderBusy(LabError):
    """Another process holds the run folder's lock."""


class CheckpointError(LabError):
    """No checkpoint of the run folder can be read back."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Two runs with equal configs produce equal results."""

    model: str = "tiny"
    optimizer: str = "normuon"
    lr: Optional[float] = None  # None: the zoo's default for this model size
    adamw_lr: Optional[float] = None  # the AdamW part of Muon-style optimizers (None: zoo default)
    steps: int = 400
    batch_size: int = 16
    seq_len: Optional[int] = None  # None: the model's context length
    grad_accum: int = 1  # seed 001's accumulation_steps
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup: float = 0.05  # fraction of steps (<1) or a number of steps (>=1)
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr
    min_lr_ratio: float = 0.0  # fully decayed by default (never compare mid-schedule)
    grad_clip: Optional[float] = None
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    seed: int = 0
    data: Optional[str] = None  # None: the Python standard library of this interpreter
    max_corpus_bytes: int = 8 * 2**20
    tokenizer: str = DEFAULT_TOKENIZER  # "bytes" (vocabulary 256) or "bpe:N" (muonlab.lab.data); the model's vocab follows
    device: str = "auto"  # auto | cpu | cuda
    stats_every: int = 0  # record Muon update statistics every N steps (0: at each eval)
    tensorboard: bool = False
    qk_clip: Optional[float] = None  # QK-Clip threshold tau (Kimi K2, arXiv 2507.20534); inf: log max_attn_logit only
    weight_decay: Optional[float] = None  # every parameter's weight decay (None: the zoo's, 0; muonlab.lab.zoo.build_optimizer)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        get_entry(self.optimizer)
        parse_tokenizer(self.tokenizer)
        mcfg = GPTConfig.from_name(self.model, **self.model_overrides)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                         or self.seq_len < 1):
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len!r}")
        if self.seq_len is not None and self.seq_len > mcfg.seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the {self.model} model's context length {mcfg.seq_len}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 < self.decay_fraction <= 1):
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.qk_clip is not None and (isinstance(self.qk_clip, bool) or not isinstance(self.qk_clip, (int, float))
                                         or not self.qk_clip > 0):
            raise ValueError(f"qk_clip must be a positive number (inf: log the max logit, never clip), got {self.qk_clip!r}")
        if self.weight_decay is not None:
            check_weight_decay(self.weight_decay)

    def key(self) -> str:
        """A short hash of the config: runs are cached per configuration."""
        fields_ = asdict(self)
        if fields_["qk_clip"] is None:
            del fields_["qk_clip"]  # runs without QK-Clip keep the keys (and cached results) they had
        if fields_["weight_decay"] is None:
            del fields_["weight_decay"]  # so do runs with the zoo's weight decay
        if fields_["tokenizer"] == DEFAULT_TOKENIZER:
            del fields_["tokenizer"]  # byte-level runs keep the keys (and cached results) they had
        blob = json.dumps(fields_, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The run's GPTConfig: the named size with ``cfg.model_overrides``, its vocabulary widened to the
    tokenizer's ``vocab_size`` when it is smaller (a size or an override may name a larger, padded
    vocabulary, as gpt2-small's 50304, which is kept)."""
    mcfg = GPTConfig.from_name(cfg.model, **cfg.model_overrides)
    if mcfg.vocab_size < vocab_size:
        if "vocab_size" in cfg.model_overrides:
            raise ValueError(f"model_overrides vocab_size={mcfg.vocab_size} is smaller than the {cfg.tokenizer} "
                             f"tokenizer's {vocab_size} tokens")
        mcfg = GPTConfig.from_name(cfg.model, **{**cfg.model_overrides, "vocab_size": vocab_size})
    return mcfg


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every group's base lr at optimizer step ``step`` (0-based)."""
    total = cfg.steps
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if warm > 0 and step < warm:
        return (step + 1) / warm
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)  # reaches 0 at step == total, after the last update
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: constant, then a linear decay over the last decay_fraction of steps
    decay_steps = max(1, int(round(cfg.decay_fraction * total)))
    start = total - decay_steps
    if step < start:
        return 1.0
    progress = (step - start) / decay_steps
    return lo + (1 - lo) * (1 - min(1.0, progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temporary(path: Path, write: Callable[[Any], None]) -> Path:
    """Write ``path.tmp`` with ``write(binary file)`` and fsync it; on any failure (a full disk, an
    interrupt) the temporary file is removed before the exception goes on. Returns the temporary path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(tmp)) from exc  # say which file the disk refused
        raise
    return tmp


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: a reader sees the old file or the new one, and a
    failed write leaves the old file and no temporary file behind."""
    _replace(_write_temporary(Path(path), lambda fh: fh.write(data)), Path(path))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    _replace(_write_temporary(path, lambda fh: torch.save(obj, fh)), path)


def read_json(path: Path, what: str = "file") -> Any:
    """``json.loads`` of a file whose errors name the file (a bare JSONDecodeError names nothing)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} {path} is damaged (not valid JSON: {exc}); delete it or rewrite it") from None


# ----------------------------------------------------------------------------------------------
# The run folder: created, locked against a second run, tidied when a run fails before any result
# ----------------------------------------------------------------------------------------------


def _read_pid(fd: int) -> Optional[int]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


class RunFolder:
    """An output folder held by one run: ``with RunFolder(path, useful=...):``.

    On entry the folder (and any missing parent) is created and ``path/muonlab.lock`` is locked
    (``flock``) with this process's pid written in it. A second run on the same folder, in this
    process or another, fails at once with :class:`RunFolderBusy` naming the folder and the
    holder's pid. The kernel drops the lock when its holder exits, however it exits, so a lock file
    left behind by a killed run is taken over (with a warning naming the dead pid). On exit the lock
    is released and its file removed, on success and on exceptions alike.

    If the body raises and this call created the folder, and ``useful(path)`` says nothing worth
    keeping was written (no checkpoint, no result, no training step), the folder is removed again,
    as are the parents this call created, if they are empty. A folder that existed before is never
    removed, nor anything in it.

    ``active=False`` (the non-zero ranks of a parallel run, which write elsewhere) does nothing.
    """

    def __init__(self, path: str | Path, *, useful: Optional[Callable[[Path], bool]] = None, active: bool = True):
        self.path = Path(path)
        self.useful = useful
        self.active = active
        self.created: list[Path] = []  # the folders this call created, outermost first
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunFolder":
        if not self.active:
            return self
        self._create()
        try:
            self._lock()
        except BaseException:
            self._remove_created(everything=False)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.active:
            return
        self._unlock()
        if exc_type is not None and self.created and not (self.useful and self._safe_useful()):
            self._remove_created(everything=True)

    # -- creation
    def _create(self) -> None:
        path = self.path
        missing, p = [], path
        while not p.exists() and not p.is_symlink():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        if p.exists() and not p.is_dir():
            if p == path:
                raise ValueError(f"output folder {path} is a file, not a folder; choose another --out")
            raise ValueError(f"cannot create the output folder {path}: {p} is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.created = [d for d in reversed(missing) if d.is_dir()]
            self._remove_created(everything=False)
            raise LabError(f"cannot create the output folder {path}: {exc.strerror or exc}") from exc
        self.created = list(reversed(missing))

    def _safe_useful(self) -> bool:
        try:
            return bool(self.useful(self.path)) if self.useful else False
        except OSError:
            return True  # when in doubt, keep it

    def _remove_created(self, everything: bool) -> None:
        """Remove what this call created: the run folder with its content (only when ``everything``:
        this run made it and wrote everything in it) and then the empty parents it created."""
        if not self.created:
            return
        if everything:
            shutil.rmtree(self.path, ignore_errors=True)
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds on an empty folder
        self.created = []

    # -- the lock
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def _lock(self) -> None:
        lock = self.lock_path
        if fcntl is None:  # pragma: no cover - no flock on this platform
            warnings.warn("muonlab: run-folder locking needs fcntl (POSIX); two runs on one --out are not "
                          "detected on this platform", stacklevel=3)
            return
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise LabError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "a process that has not written its pid yet"
                raise RunFolderBusy(
                    f"{self.path} is in use by another muonlab run ({who}, lock file {lock}); wait for it to "
                    "finish, stop it, or choose another --out") from None
            except OSError:
                os.close(fd)
                raise
            # the previous holder removes the file as it lets go: make sure we locked the file on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_pid(fd)
        if old is not None and old != os.getpid():
            state = "no longer running" if not _pid_alive(old) else "running but no longer holding it"
            warnings.warn(f"{self.path}: taking over a stale lock left by pid {old} ({state}; the run was "
                          "killed or crashed)", stacklevel=3)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
            raise LabError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd

    def _unlock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    self.lock_path.unlink()  # before letting go, so a waiter re-checks the file (see _lock)
        finally:
            os.close(fd)


def _run_has_progress(run_dir: Path) -> bool:
    """Whether a failed run wrote something worth keeping: a checkpoint, a result, a training step."""
    from .parallel import PREVIOUS_SHARDED_CHECKPOINT, SHARDED_CHECKPOINT

    if any((run_dir / n).exists() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT, "result.json", SHARDED_CHECKPOINT,
                                             PREVIOUS_SHARDED_CHECKPOINT)):
        return True
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and '"kind": "train"' in metrics.read_text(errors="replace")


# ----------------------------------------------------------------------------------------------
# Checkpoints: written only from a finite state; the previous one kept until the new one is on disk
# ----------------------------------------------------------------------------------------------


def _first_nonfinite(model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None. Of a
    sharded (DTensor) state dict, only this rank's shards are looked at."""

    def bad(t: torch.Tensor) -> bool:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.is_floating_point() and not bool(torch.isfinite(t).all())

    for name, t in model_sd.items():
        if isinstance(t, torch.Tensor) and bad(t):
            return f"model tensor {name}"

    def walk(obj: Any, where: str) -> Optional[str]:
        if isinstance(obj, torch.Tensor):
            if bad(obj):
                return where
            return None
        if isinstance(obj, dict):
            items: Any = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        else:
            return None
        for k, v in items:
            found = walk(v, f"{where}[{k!r}]")
            if found:
                return found
        return None

    return walk(optim_sd.get("state", {}), "optimizer state")


def save_checkpoint(ckpt: dict[str, Any], run_dir: Path) -> None:
    """Write ``checkpoint.pt`` so that a good checkpoint is on disk at every moment: the new one is
    written to ``checkpoint.pt.tmp`` and fsynced; only then does the current one become
    ``checkpoint.prev.pt`` and the new one take its name. A failed write (disk full) removes the
    temporary file and leaves both earlier checkpoints as they were."""
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    try:
        tmp = _write_temporary(path, lambda fh: torch.save(ckpt, fh))
        if path.exists():
            os.replace(path, prev)
        _replace(tmp, path)
    except OSError as exc:
        raise LabError(f"cannot write the checkpoint {path}: {exc.strerror or exc}; the previous checkpoint "
                       "is kept") from exc


def _why_unreadable(path: Path, exc: BaseException) -> str:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return "the file is empty"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Load and check one checkpoint file; raises ValueError saying what is wrong with it."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, an empty file: each library error differs
        raise ValueError(f"{path} is unreadable ({_why_unreadable(path, exc)})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise ValueError(f"{path} is not a muonlab checkpoint (missing {', '.join(missing)})")
    bad = _first_nonfinite(ckpt["model"], ckpt["optimizer"])
    if bad:
        raise ValueError(f"{path} holds non-finite values ({bad})")
    return ckpt


def load_checkpoint(run_dir: Path, device: torch.device) -> Optional[tuple[dict[str, Any], Path]]:
    """The newest good checkpoint of ``run_dir`` and its path, or None when there is none.

    A damaged ``checkpoint.pt`` (truncated, empty, not a checkpoint, non-finite) falls back to
    ``checkpoint.prev.pt`` with a warning naming both files; when no checkpoint can be read,
    :class:`CheckpointError` says which files and why."""
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    problems = []
    for p in (path, prev):
        if not p.exists():
            continue
        try:
            ckpt = _read_checkpoint(p, device)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if p == prev:
            why = problems[0] if problems else f"{path} is missing"
            warnings.warn(f"{why}; resuming from the previous checkpoint {prev} (step {int(ckpt['step'])})",
                          stacklevel=3)
        return ckpt, p
    if problems:
        raise _cannot_resume(run_dir, problems)
    return None


def _cannot_resume(run_dir: Path, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"cannot resume the run in {run_dir}: " + "; ".join(problems)
                           + ". Delete the damaged file(s) to start the run over (muonlab train: --no-resume)")


def _why_sharded_unreadable(exc: BaseException) -> str:
    """One line for a failed DCP load: DCP's CheckpointException holds each failed rank's exception."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, err in sorted(failures.items()):
            if isinstance(err, tuple) and err:  # (exception, its traceback summary)
                err = err[0]
            first = (str(err).strip().splitlines() or [""])[0][:160]
            parts.append(f"rank {rank}: {type(err).__name__}{': ' + first if first else ''}")
        return "; ".join(parts)
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _resume(run_dir: Path, par: Any, model: Any, opt: Any, cfg: "TrainConfig") -> Optional[tuple[dict[str, Any], Path]]:
    """Load the newest good checkpoint of ``run_dir`` into ``model`` and ``opt``, whichever kind it is
    (``checkpoint.pt`` of a single-process run, ``checkpoint.dcp`` of a parallel one, so a run can
    change between them), falling back to an older one with a warning when the newest is damaged.
    Returns (the checkpoint's metadata: scheduler, step, train_time_s, rng; its path), or None."""
    from .parallel import sharded_checkpoints, stale_sharded_temporary

    if par.is_main:
        shutil.rmtree(stale_sharded_temporary(run_dir), ignore_errors=True)  # a save cut short by a killed rank
    options: list[tuple[int, Path, dict[str, Any]]] = [(int(m["step"]), p, m) for p, m in sharded_checkpoints(run_dir)]
    problems: list[str] = []
    if any((run_dir / n).exists() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
        try:
            if not options:  # only single-process checkpoints: load_checkpoint's own fallback warning
                found = load_checkpoint(run_dir, par.device)
            else:  # its warning would not be the whole story: collect it
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    found = load_checkpoint(run_dir, par.device)
                problems += [str(w.message).split("; resuming")[0] for w in caught]
            if found is not None:
                options.append((int(found[0]["step"]), found[1], found[0]))
        except CheckpointError as exc:
            problems.append(str(exc))
    options.sort(key=lambda o: -o[0])
    for step, path, ckpt in options:
        if ckpt.get("config_key") != cfg.key():
            raise ValueError(f"{path} was written by a different configuration; use a new output folder or delete it")
        try:
            if path.suffix == ".pt":
                par.load(model, opt, ckpt["model"], ckpt["optimizer"])
            else:
                par.load_sharded(model, opt, path)
                bad = par.first(_first_nonfinite(*par.state(model, opt)))
                if bad:
                    raise ValueError(f"it holds non-finite values ({bad})")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException (a BaseException), on every rank
            problems.append(f"{path} is unreadable ({_why_sharded_unreadable(exc)})")
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}; resuming from the older checkpoint {path} (step {step})",
                          stacklevel=3)
        return ckpt, path
    if problems:
        raise _cannot_resume(run_dir, problems)
    return None


def _read_result(path: Path) -> Optional[dict[str, Any]]:
    """A finished run's result.json, or None; a damaged one is ignored with a warning naming it
    (the run then finishes again from its checkpoint and rewrites it)."""
    if not path.exists():
        return None
    try:
        done = read_json(path, "result file")
    except (ValueError, OSError) as exc:
        warnings.warn(f"{exc}; ignoring it and finishing the run again from its checkpoint", stacklevel=3)
        return None
    if not isinstance(done, dict):
        warnings.warn(f"result file {path} is damaged (not a JSON object); ignoring it and finishing the run again "
                      "from its checkpoint", stacklevel=3)
        return None
    return done


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


class _Metrics:
    """Append-only JSONL writer that can be truncated back to a checkpoint on resume; with
    ``path=None`` (the non-zero ranks of a parallel run) it writes nothing."""

    def __init__(self, path: Optional[Path], resume_step: Optional[int]):
        self.path = path
        if path is None:
            self.fh: Any = open(os.devnull, "w")
            return
        if resume_step is None:
            path.write_text("")
        else:
            kept = []
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from a crash
                    if row.get("step", 0) <= resume_step:
                        kept.append(line)
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        self.fh = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, autocast: bool) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / len(batches)


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: Optional[int] = None,
    corpus: Optional[Corpus] = None,
    log: Any = None,
    parallel: str = "none",
    mesh: Optional[str] = None,
    dist_timeout: Optional[float] = None,
) -> dict[str, Any]:
    """Train one model with one optimizer; returns the result dict (also written to result.json).

    ``stop_after=K`` stops after K optimizer steps as if interrupted (a checkpoint is written),
    which a later call with ``resume=True`` continues. ``parallel`` (``"none"``, ``"ddp"``,
    ``"fsdp"``, ``"hsdp"``, ``"tp"``, ``"fsdp+tp"``) trains on several ranks under torchrun, on the
    device mesh ``mesh`` (``"2x2"`` for the 2-D modes), with every collective bounded by
    ``dist_timeout`` seconds (see :mod:`muonlab.lab.parallel`).

    The run folder is locked while the run holds it (:class:`RunFolder`); a run that fails before
    its first training step leaves no folder behind if it created the folder. A non-finite loss or
    a non-finite state at a checkpoint stops the run with ``FloatingPointError`` and keeps the last
    good checkpoint.
    """
    cfg.validate()
    run_dir = Path(run_dir)
    if resume:
        done = _read_result(run_dir / "result.json")
        if done is not None and done.get("config_key") == cfg.key():
            if "final_val_bpb" not in done and cfg.tokenizer == DEFAULT_TOKENIZER and isinstance(
                    done.get("final_val_loss"), (int, float)):
                # a result written before bits per byte were reported: for bytes, bpb = loss / ln 2
                done = {**done, "final_val_bpb": done["final_val_loss"] / math.log(2)}
            return done
    device = resolve_device(cfg.device)
    from .parallel import setup as setup_parallel

    par = setup_parallel(parallel, device, mesh, dist_timeout)  # the process group and mesh; this rank's device
    try:
        with RunFolder(run_dir, useful=_run_has_progress, active=par.is_main):  # only rank 0 writes there
            return _train(cfg, run_dir, par, resume=resume, progress=progress, stop_after=stop_after,
                          corpus=corpus, log=log)
    except Exception as exc:
        why = par.explain(exc)  # a failed collective: name the rank that stopped and the timeout
        if why:
            raise LabError(why) from exc
        raise
    finally:
        par.close()


def _train(cfg: TrainConfig, run_dir: Path, par: Any, *, resume: bool, progress: bool, stop_after: Optional[int],
           corpus: Optional[Corpus], log: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    device, main = par.device, par.is_main  # only rank 0 writes the run folder's files and prints
    progress, log = progress and main, log if main else None
    autocast = device.type == "cuda"
    entry = get_entry(cfg.optimizer)
    lr_shown = cfg.lr if cfg.lr is not None else entry.lr_for(cfg.model)

    corpus = corpus or load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes, tokenizer=cfg.tokenizer)
    if corpus.tokenizer.spec != canonical_tokenizer(cfg.tokenizer):
        raise ValueError(f"the corpus passed in is tokenized by {corpus.tokenizer.spec}, the config asks for "
                         f"tokenizer={cfg.tokenizer!r}; load it with load_corpus(..., tokenizer={cfg.tokenizer!r})")
    mcfg = model_config(cfg, corpus.vocab_size)
    seq_len = cfg.seq_len or mcfg.seq_len
    if seq_len > mcfg.seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context length {mcfg.seq_len}")
    if seq_len + 1 > len(corpus.train) or seq_len + 1 > len(corpus.val):
        raise ValueError(
            f"seq_len {seq_len} + 1 is longer than the data (train {len(corpus.train)} tokens, "
            f"validation {len(corpus.val)} tokens); use a shorter --seq-len or more data"
        )
    if cfg.batch_size * (seq_len + 1) > len(corpus.train):
        raise ValueError(
            f"batch of {cfg.batch_size} x {seq_len + 1} tokens is larger than the training data "
            f"({len(corpus.train)} tokens)"
        )

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    model, inner = par.wrap(model)  # DDP / FSDP2 / TP; the optimizer gets the inner module
    opt = build_optimizer(cfg.optimizer, inner, size=cfg.model, lr=cfg.lr, adamw_lr=cfg.adamw_lr,
                          weight_decay=cfg.weight_decay, **cfg.optimizer_options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    # QK-Clip (after wrap: the specs point at the parameters the optimizer updates, DTensors included)
    qk_clip = QKClip(inner.qk_clip_specs(), cfg.qk_clip) if cfg.qk_clip is not None else None
    val_batches = corpus.val_batches(cfg.batch_size, seq_len, cfg.eval_batches)
    # bits per byte over exactly the evaluated text: the targets' tokens and the bytes they spell
    val_tokens = sum(int(y.numel()) for _, y in val_batches)
    val_bytes = sum(corpus.count_bytes(y) for _, y in val_batches)

    def bpb(loss: float) -> float:
        return bits_per_byte(loss, val_tokens, val_bytes)

    start_step, train_time = 0, 0.0
    loaded = _resume(run_dir, par, model, opt, cfg) if resume else None  # the newest good checkpoint
    if loaded is not None:
        ckpt, _ = loaded
        sched.load_state_dict(ckpt["scheduler"])
        start_step, train_time = int(ckpt["step"]), float(ckpt["train_time_s"])
        torch.set_rng_state(ckpt["rng"])
        del ckpt
    last_good = start_step if loaded is not None else None  # the step of the newest checkpoint on disk
    metrics = _Metrics(run_dir / "metrics.jsonl" if main else None, start_step if start_step else None)
    if main:
        atomic_write_text(
            run_dir / "config.json",
            json.dumps({"config": asdict(cfg), "config_key": cfg.key(), "model_config": mcfg.to_dict(),
                        "n_params": inner.num_parameters(), "corpus": corpus.meta,
                        "tokenizer": corpus.tokenizer_meta, "environment": environment(),
                        "optimizer_description": entry.description, "parallel": par.describe()},
                       indent=2, default=str),
        )
    tb = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError as exc:
            raise ImportError("--tensorboard needs the tensorboard package: pip install 'muonlab[tensorboard]'") from exc

    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
    track = hasattr(opt, "track_stats")
    last_val = None
    # a live bar on a terminal; one plain line per evaluation otherwise (logs, CI)
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not interactive, desc=f"{cfg.optimizer}", unit="step",
               dynamic_ncols=True, leave=False)

    def kept() -> str:
        if last_good is None:
            return "no checkpoint was written yet"
        from .parallel import SHARDED_CHECKPOINT

        return f"the checkpoint of step {last_good} is kept in {run_dir / (SHARDED_CHECKPOINT if par.active else CHECKPOINT)}"

    def diverged(what: str, value: float, step: int) -> FloatingPointError:
        return FloatingPointError(f"{what} became {value} at step {step} with {cfg.optimizer} lr={lr_shown:g}; "
                                  f"lower the learning rate ({kept()})")

    def checkpoint(step: int) -> None:
        nonlocal last_good
        model_sd, optim_sd = par.state(model, opt)  # this rank's shards in a parallel run
        bad = par.first(_first_nonfinite(model_sd, optim_sd))  # every rank learns every rank's verdict
        if bad:
            raise FloatingPointError(
                f"{bad} became non-finite by step {step} with {cfg.optimizer} lr={lr_shown:g}, so no checkpoint "
                f"was written; lower the learning rate ({kept()})")
        meta = {"scheduler": sched.state_dict(), "step": step, "train_time_s": train_time,
                "rng": torch.get_rng_state(), "config_key": cfg.key()}
        if par.active:
            try:
                par.save_sharded(model, opt, meta, model_sd, optim_sd, run_dir)
            except OSError as exc:
                raise LabError(f"cannot write the checkpoint {run_dir}: {exc.strerror or exc}; the previous "
                               "checkpoint is kept") from exc
        else:
            save_checkpoint({"model": model_sd, "optimizer": optim_sd, **meta}, run_dir)
        last_good = step

    step = start_step
    try:
        if start_step == 0:
            last_val = evaluate(model, val_batches, device, autocast)
            metrics.write({"kind": "eval", "step": 0, "tokens": 0, "time_s": 0.0, "val_loss": last_val,
                           "val_bpb": bpb(last_val)})
        model.train()
        while step < cfg.steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            t0 = time.perf_counter()
            want_stats = track and (
                (cfg.stats_every and (step + 1) % cfg.stats_every == 0)
                or (not cfg.stats_every and (step + 1) % cfg.eval_every == 0)
            )
            if track:
                opt.track_stats = bool(want_stats)  # type: ignore[attr-defined]
            loss_sum = 0.0
            # the per-head max attention logits of this step's batch, measured only when QK-Clip asks
            # (or when the optimizer clips by itself: pytorch-optimizer's MuonClip, muonlab.lab.zoo)
            wants_logits = qk_clip is not None or hasattr(opt, "set_max_logits")
            with inner.track_max_logits() if wants_logits else contextlib.nullcontext({}) as max_logits:
                for micro in range(cfg.grad_accum):
                    x, y = corpus.get_batch("train", cfg.batch_size, seq_len, seed=cfg.seed,
                                            step=step * cfg.grad_accum + micro)
                    x, y = par.shard(x.to(device), y.to(device))  # this rank's rows (all of them under tp)
                    loss = forward_backward(model, x, y, entry, autocast, cfg.grad_accum)
                    loss_sum += float(loss.detach())
            train_loss = par.mean(loss_sum / cfg.grad_accum)  # the global batch's loss
            if not math.isfinite(train_loss):
                raise diverged("training loss", train_loss, step + 1)
            if cfg.grad_clip and par.active:
                par.clip_grad_norm(list(model.parameters()), cfg.grad_clip)  # DTensors of several meshes
            elif cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr_now = [g["lr"] for g in opt.param_groups]
            if hasattr(opt, "set_max_logits"):
                opt.set_max_logits(max_logits)
            opt.step()
            qk_stats = qk_clip.apply(max_logits) if qk_clip is not None else None  # every rank: one all_reduce
            opt.zero_grad(set_to_none=True)
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_time += dt
            step += 1
            par.beat(step)
            row: dict[str, Any] = {"kind": "train", "step": step, "tokens": step * tokens_per_step, "loss": train_loss,
                                   "lr": float(lr_now[0]), "lrs": [float(v) for v in lr_now], "step_ms": dt * 1e3,
                                   "time_s": train_time}
            if want_stats and getattr(opt, "last_stats", None):
                st = opt.last_stats  # type: ignore[attr-defined]
                muon_rms = [v["update_rms"] for v in st.values() if "ortho_residual" in v]
                if muon_rms:
                    row["muon_update_rms"] = sum(muon_rms) / len(muon_rms)
                    row["ortho_residual"] = max(v["ortho_residual"] for v in st.values() if "ortho_residual" in v)
            if qk_stats is not None:
                row.update(qk_stats.as_metrics())  # max_attn_logit, qk_clipped_heads, qk_min_gamma
            metrics.write(row)
            if tb is not None:
                tb.add_scalar("train/loss", train_loss, step)
                tb.add_scalar("train/lr", float(lr_now[0]), step)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_val = evaluate(model, val_batches, device, autocast)
                if not math.isfinite(last_val):
                    raise diverged("validation loss", last_val, step)
                metrics.write({"kind": "eval", "step": step, "tokens": step * tokens_per_step, "time_s": train_time,
                               "val_loss": last_val, "val_bpb": bpb(last_val)})
                if tb is not None:
                    tb.add_scalar("val/loss", last_val, step)
                    tb.add_scalar("val/bpb", bpb(last_val), step)
                if progress and not interactive:
                    eta = (cfg.steps - step) * train_time / max(1, step - start_step) if step > start_step else 0.0
                    print(f"  {cfg.optimizer} step {step}/{cfg.steps} | loss {train_loss:.3f} | val {last_val:.3f} "
                          f"({bpb(last_val):.3f} bpb) | "
                          f"{dt * 1e3:.0f} ms | {tokens_per_step / dt / 1e3:.1f}k tok/s | eta {eta:.0f}s", flush=True)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or (stop_after is not None and step - start_step >= stop_after):
                metrics.flush()
                checkpoint(step)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {train_loss:.3f}" + (f" val {last_val:.3f}" if last_val is not None else "")
                + f" {tokens_per_step / dt / 1e3:.1f}k tok/s"
            )
        if step >= cfg.steps and last_val is None:
            # resumed from the final checkpoint (the run stopped before writing result.json): the
            # evaluation is deterministic, so this gives the value the run logged at its last step
            last_val = evaluate(model, val_batches, device, autocast)
    finally:
        bar.close()
        metrics.close()
        if tb is not None:
            tb.close()

    if step < cfg.steps:
        return {"finished": False, "step": step}
    result = {
        "finished": True,
        "optimizer": cfg.optimizer,
        "model": cfg.model,
        "lr": cfg.lr if cfg.lr is not None else get_entry(cfg.optimizer).lr_for(cfg.model),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "final_val_loss": last_val,
        "final_val_bpb": bpb(last_val),
        "tokenizer": corpus.tokenizer.spec,
        "wall_time_s": train_time,
        "step_ms": 1e3 * train_time / max(1, cfg.steps - start_step) if start_step == 0 else None,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "n_params": inner.num_parameters(),
        "config_key": cfg.key(),
    }
    if result["step_ms"] is None:  # resumed: recompute from the per-step timings
        ms = [r["step_ms"] for r in read_metrics(run_dir) if r.get("kind") == "train"] if main else []
        result["step_ms"] = sum(ms) / len(ms) if ms else 1e3 * train_time / cfg.steps
    if main:
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    if log:
        log(f"{cfg.optimizer}: final val loss {last_val:.4f} ({result['final_val_bpb']:.4f} bits per byte) after "
            f"{result['tokens']:,} tokens in {train_time:.1f}s")
    return result


def forward_backward(model: Any, x: Any, y: Any, entry: Any, autocast: bool, grad_accum: int = 1) -> Any:
    """One micro-batch of a training step: forward (bf16 autocast on CUDA when ``autocast``, the
    attention kernel the optimizer needs), then backward of loss / grad_accum, with the
    second-order graph for optimizers that need it (Sophia). Returns the (unscaled) loss."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast), _attention_kernel(entry):
        _, loss = model(x, y)
        (loss / grad_accum).backward(create_graph=entry.backward_create_graph)
    return loss


def _attention_kernel(entry: Any) -> Any:
    """Second-order optimizers (Sophia's Hessian estimate) need attention with a double backward,
    which only PyTorch's plain 'math' attention kernel has on CPU."""
    import contextlib

    if not entry.backward_create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``, up to the first unreadable line. A torn last line (a
    crash mid-write) is dropped quietly; a damaged line with rows after it is dropped with a warning
    naming the file and the line, since the rows after it are lost too."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                warnings.warn(f"{path} is damaged at line {i + 1}; reading the {i} rows before it and "
                              f"dropping {len(lines) - i} lines", stacklevel=2)
            break
    return rows
