"""The lab's corpus: byte-level tokens (vocabulary 256), a fixed train/validation split, memory-mapped
cache files, and a batch sampler whose order is a pure function of (seed, step).

Sources
    ``load_corpus()``             the ``*.py`` files of the running interpreter's standard library
                                  (``sysconfig.get_paths()["stdlib"]``), without site-packages and
                                  test directories; capped at ``DEFAULT_MAX_BYTES``.
    ``load_corpus("notes.txt")``  one text file.
    ``load_corpus("texts/")``     every text file under a folder, recursively (hidden files and
                                  folders skipped; binary files skipped and counted).

Files are read in sorted relative-path order and concatenated as bytes, each preceded by a one-line
header ``# ==== relative/path ====`` and followed by a blank line (a single-file source is used as
is). The last ``val_fraction`` of the bytes (by position) is the validation split.

Cache
    ``<root>/<key>/{train.bin, val.bin, meta.json}`` with ``<root>`` = ``cache_dir`` if given, else
    ``$MUONLAB_CACHE/corpus``, else ``~/.cache/muonlab/corpus``. ``<key>`` hashes the source path,
    its file list with sizes and mtimes, ``max_bytes``, ``val_fraction`` and the format version, so an
    edited source builds a new entry. Files are written to a temporary name and moved into place with
    ``os.replace``; ``meta.json`` goes last and marks the entry complete. A second ``load_corpus``
    with the same arguments lists the source (stat calls), maps the cached files and checks them
    against the sha256 in ``meta.json`` (about 10 ms for 8 MiB); an entry that fails the check (a
    damaged file of the right size, say) is rebuilt from the source with a warning, so a run never
    trains on bytes other than the ones its recorded hash names.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

VOCAB_SIZE = 256  # byte-level: token id = byte value
DEFAULT_MAX_BYTES = 8 * 2**20  # cap for the default (stdlib) corpus: 8 MiB is plenty for the lab
DEFAULT_VAL_FRACTION = 0.05
CACHE_ENV = "MUONLAB_CACHE"
FORMAT_VERSION = 1

# Directory names never entered when collecting the standard library: installed packages, byte code
# and test suites (test/, */tests/, idlelib/idle_test/, lib2to3/tests/, unittest/test/, ...).
# "encodings" holds generated character-map tables (about 17% of the first 8 MiB otherwise), not code.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                                  "encodings"})

# A file is binary if it holds a NUL byte or more than this fraction of its bytes are not valid UTF-8.
MAX_INVALID_UTF8_FRACTION = 0.05

_SPLITS = ("train", "val")
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------
# Listing and reading the source
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceListing:
    kind: str  # "stdlib", "file" or "folder"
    root: Path  # the folder (or the file) the source was given as, resolved
    files: tuple[Path, ...]  # absolute paths: sorted by relative path (stdlib: by its hash)
    description: str

    def relpath(self, f: Path) -> str:
        return f.name if self.kind == "file" else f.relative_to(self.root).as_posix()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _walk(root: Path, pattern: str, excluded: frozenset[str]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and fnmatch.fnmatch(name, pattern):
                p = Path(dirpath) / name
                if p.is_file():
                    found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def list_source(path: Optional[PathLike] = None, pattern: Optional[str] = None) -> SourceListing:
    """List the files of a corpus source without reading them. ``path=None`` is the standard library.
    ``pattern`` filters file names in folders (default ``*.py`` for the stdlib, ``*`` otherwise)."""
    if path is None:
        root = stdlib_dir()
        pattern = pattern or "*.py"
        # A fixed pseudo-random file order (by a hash of the relative path): the size cap then samples
        # the whole library instead of its alphabetical start, and the validation split (the last
        # fraction by position) is a random set of files rather than one corner of it.
        files = sorted(_walk(root, pattern, STDLIB_EXCLUDED_DIRS),
                       key=lambda f: hashlib.sha256(f.relative_to(root).as_posix().encode()).hexdigest())
        if not files:
            raise ValueError(f"no {pattern} files found in the standard library folder {root}")
        desc = f"python stdlib {root} ({pattern}, excluding {', '.join(sorted(STDLIB_EXCLUDED_DIRS))})"
        return SourceListing("stdlib", root, tuple(files), desc)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus path does not exist: {p}")
    p = p.resolve()
    if p.is_file():
        return SourceListing("file", p, (p,), f"file {p}")
    if not p.is_dir():
        raise ValueError(f"corpus path is neither a file nor a folder: {p}")
    pattern = pattern or "*"
    files = _walk(p, pattern, frozenset({"__pycache__"}))
    if not files:
        raise ValueError(f"corpus folder {p} contains no files matching {pattern!r} (hidden files are skipped)")
    return SourceListing("folder", p, tuple(files), f"folder {p} ({pattern}, recursive)")


def binary_reason(data: bytes) -> Optional[str]:
    """Why ``data`` does not look like text, or None if it does."""
    if b"\x00" in data:
        return "contains NUL bytes"
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError:
        pass
    # Count undecodable bytes: each invalid sequence becomes one U+FFFD that was not there before.
    invalid = data.decode("utf-8", errors="replace").count("\ufffd") - data.count("\ufffd".encode())
    if invalid > MAX_INVALID_UTF8_FRACTION * len(data):
        return f"{invalid} of {len(data)} bytes are not valid UTF-8"
    return None


@dataclass
class _RawCorpus:
    data: bytes
    n_files: int  # files that contributed bytes (the last one possibly truncated)
    n_binary: int  # files skipped as binary
    n_empty: int  # files skipped as empty
    truncated: bool  # max_bytes cut the corpus short


def _read_corpus_bytes(listing: SourceListing, max_bytes: Optional[int]) -> _RawCorpus:
    """Read and concatenate the listed files (the only function here that reads source files)."""
    if listing.kind == "file":
        f = listing.files[0]
        data = f.read_bytes()
        if not data.strip():
            raise ValueError(f"corpus file is empty (no text): {f}")
        reason = binary_reason(data)
        if reason:
            raise ValueError(f"corpus file looks binary ({reason}): {f}")
        truncated = max_bytes is not None and len(data) > max_bytes
        return _RawCorpus(data[:max_bytes] if truncated else data, 1, 0, 0, truncated)

    chunks: list[bytes] = []
    total = n_files = n_binary = n_empty = 0
    truncated = False
    for f in listing.files:
        content = f.read_bytes()
        if not content.strip():
            n_empty += 1
            continue
        if binary_reason(content):
            n_binary += 1
            continue
        if max_bytes is not None and total >= max_bytes:
            truncated = True  # the cap is reached and text files remain
            break
        doc = f"# ==== {listing.relpath(f)} ====\n".encode() + content
        doc += b"\n" if content.endswith(b"\n") else b"\n\n"
        if max_bytes is not None and total + len(doc) > max_bytes:
            doc, truncated = doc[: max_bytes - total], True
        chunks.append(doc)
        total += len(doc)
        n_files += 1
        if truncated:
            break
    if total == 0:
        raise ValueError(f"no text found in corpus folder {listing.root}: {len(listing.files)} file(s), "
                         f"{n_binary} binary, {n_empty} empty")
    if n_binary:
        warnings.warn(f"corpus folder {listing.root}: skipped {n_binary} binary file(s)", stacklevel=3)
    return _RawCorpus(b"".join(chunks), n_files, n_binary, n_empty, truncated)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "muonlab"
    return base / "corpus"


def cache_key(listing: SourceListing, max_bytes: Optional[int], val_fraction: float) -> str:
    entries = []
    for f in listing.files:
        st = f.stat()
        entries.append([listing.relpath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": FORMAT_VERSION, "kind": listing.kind, "root": str(listing.root),
                       "description": listing.description, "files": entries, "max_bytes": max_bytes,
                       "val_fraction": val_fraction}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cached_meta(directory: Path) -> tuple[Optional[dict[str, Any]], str]:
    """(the meta of a complete cache entry, "") or (None, why not). ``why`` is empty when there is
    simply no entry (nothing built yet, or a build that stopped before its ``meta.json``)."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None, ""
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            return None, f"{meta_path} is not a version-{FORMAT_VERSION} cache description"
        for split in _SPLITS:
            size = (directory / f"{split}.bin").stat().st_size
            if size != meta[f"{split}_size"]:
                return None, f"{directory / f'{split}.bin'} holds {size} bytes, {meta[f'{split}_size']} expected"
        if not isinstance(meta.get("hash"), str):
            return None, f"{meta_path} records no hash"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cannot read {meta_path}: {type(exc).__name__}: {exc}"
    return meta, ""


def _content_hash(corpus: "Corpus") -> str:
    """sha256 of the mapped token bytes, train then val: what ``meta["hash"]`` records at build time."""
    h = hashlib.sha256()
    for data in (corpus.train, corpus.val):
        h.update(memoryview(np.ascontiguousarray(data)))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def _check_nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {name}={value!r}")


class Corpus:
    """Byte tokens of one source, split into ``train`` and ``val`` (read-only ``np.memmap`` of uint8).

    ``meta`` holds ``size`` (bytes), ``hash`` (sha256 of all token bytes, train then val), ``n_files``,
    ``source`` (a description) and the split sizes. ``from_cache`` is True when this object was made
    from an existing cache entry without reading the source files.
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, directory: Path, meta: dict[str, Any], from_cache: bool):
        self.directory = Path(directory)
        self.meta = meta
        self.from_cache = from_cache
        self.train = np.memmap(self.directory / "train.bin", dtype=np.uint8, mode="r")
        self.val = np.memmap(self.directory / "val.bin", dtype=np.uint8, mode="r")

    def __repr__(self) -> str:
        return (f"Corpus({self.meta['source']!r}, size={self.meta['size']}, train={len(self.train)}, "
                f"val={len(self.val)}, n_files={self.meta['n_files']}, from_cache={self.from_cache})")

    def split(self, name: str) -> np.ndarray:
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        raise ValueError(f"split must be one of {_SPLITS}, got {name!r}")

    def _check_window(self, split: str, batch_size: int, seq_len: int) -> np.ndarray:
        data = self.split(split)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("seq_len", seq_len)
        if seq_len + 1 > len(data):
            raise ValueError(f"seq_len + 1 = {seq_len + 1} exceeds the {split} split's length {len(data)} "
                             f"(a window needs seq_len + 1 tokens)")
        return data

    @staticmethod
    def _windows(data: np.ndarray, offsets: np.ndarray, seq_len: int,
                 device: Optional[Union[str, torch.device]]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = offsets[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        buf = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))  # (B, T+1)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T), (B, T): y[t] = x[t+1]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def get_batch(self, split: str, batch_size: int, seq_len: int, *, seed: int = 0, step: int = 0,
                  device: Optional[Union[str, torch.device]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``split``: x (B, T) int64 tokens and y = x shifted by one.
        The offsets depend only on (seed, step, split), so a run resumed at step s sees the batches it
        would have seen, whatever came before."""
        data = self._check_window(split, batch_size, seq_len)
        _check_nonnegative_int("seed", seed)
        _check_nonnegative_int("step", step)
        rng = np.random.default_rng([int(seed), int(step), _SPLITS.index(split)])
        offsets = rng.integers(0, len(data) - seq_len, size=batch_size)  # window [o, o + T] is in range
        return self._windows(data, offsets, seq_len, device)

    def val_batches(self, batch_size: int, seq_len: int, n_batches: int = 8, *, split: str = "val",
                    device: Optional[Union[str, torch.device]] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed evaluation set: ``n_batches`` batches of windows at evenly spaced offsets over the
        split (non-overlapping when the split is long enough). The same on every call."""
        data = self._check_window(split, batch_size, seq_len)
        _check_positive_int("n_batches", n_batches)
        total = batch_size * n_batches
        last_start = len(data) - seq_len - 1
        offsets = np.linspace(0, last_start, num=total).round().astype(np.int64)  # (n_batches * B,)
        return [self._windows(data, offsets[i * batch_size:(i + 1) * batch_size], seq_len, device)
                for i in range(n_batches)]

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    @staticmethod
    def decode(tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> str:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def load_corpus(path: Optional[PathLike] = None, *, max_bytes: Optional[int] = None,
                val_fraction: float = DEFAULT_VAL_FRACTION, cache_dir: Optional[PathLike] = None,
                pattern: Optional[str] = None, rebuild: bool = False) -> Corpus:
    """Build (or reuse from cache) the corpus of ``path`` (None: the Python standard library).

    ``max_bytes`` caps the corpus; None means ``DEFAULT_MAX_BYTES`` for the stdlib and no cap for a
    user path. ``rebuild=True`` ignores an existing cache entry. Raises FileNotFoundError for a missing
    path and ValueError for an empty or binary source.
    """
    if max_bytes is None and path is None:
        max_bytes = DEFAULT_MAX_BYTES
    if max_bytes is not None:
        _check_positive_int("max_bytes", max_bytes)
        if max_bytes < 2:
            raise ValueError(f"max_bytes must be >= 2 (one train and one val byte), got max_bytes={max_bytes}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction!r}")

    listing = list_source(path, pattern)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    directory = root / cache_key(listing, max_bytes, val_fraction)
    if not rebuild:
        meta, why = _cached_meta(directory)
        if meta is not None:
            cached = Corpus(directory, meta, from_cache=True)
            # hash what is mapped (not a second read of the files), so the checked bytes are the used ones
            found = _content_hash(cached)
            if found == meta["hash"]:
                return cached
            del cached
            why = f"its content hash is {found[:12]}..., {meta['hash'][:12]}... expected"
        if why:
            warnings.warn(f"corpus cache {directory} is damaged ({why}); rebuilding it from {listing.description}",
                          stacklevel=2)

    raw = _read_corpus_bytes(listing, max_bytes)
    n = len(raw.data)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"corpus of {n} byte(s) from {listing.description} is too small to split into "
                         f"train and val")
    meta = {
        "version": FORMAT_VERSION,
        "source": listing.description,
        "kind": listing.kind,
        "size": n,
        "hash": hashlib.sha256(raw.data).hexdigest(),
        "n_files": raw.n_files,
        "n_files_listed": len(listing.files),
        "n_binary_skipped": raw.n_binary,
        "n_empty_skipped": raw.n_empty,
        "truncated": raw.truncated,
        "max_bytes": max_bytes,
        "val_fraction": val_fraction,
        "train_size": n - n_val,
        "val_size": n_val,
        "vocab_size": VOCAB_SIZE,
    }
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / "train.bin", raw.data[: n - n_val])
    _write_atomic(directory / "val.bin", raw.data[n - n_val:])
    _write_atomic(directory / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())  # last: marks complete
    return Corpus(directory, meta, from_cache=False)
