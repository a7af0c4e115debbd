"""The lab's corpus: a fixed train/validation split of text, tokenized by bytes (vocabulary 256, the
default) or by a byte-level BPE, memory-mapped cache files, and a batch sampler whose order is a pure
function of (seed, step).

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

Tokenizers (``load_corpus(..., tokenizer=SPEC)``)
    ``"bytes"``  (default) token id = byte value, vocabulary 256; the arrays are the corpus cache's own.
    ``"bpe:N"``  a byte-level BPE of vocabulary N (257 <= N <= 65536) trained with the Hugging Face
                 ``tokenizers`` library (ByteLevel pre-tokenizer, GPT-2 split pattern, all 256 bytes in
                 the initial alphabet, no special tokens) on the TRAINING split only. Its cache entry is
                 ``<corpus entry>/tokenizers/bpe<N>-<key>/{tokenizer.json, train.bin, val.bin, meta.json}``
                 with ``<key>`` hashing the corpus content hash, the split point, N, the ``tokenizers``
                 version and the format version; the token arrays are uint16. It is written and checked
                 like the corpus entry (atomic writes, ``meta.json`` last, sha256 of the tokenizer file
                 and of the token arrays checked on every load, a damaged entry rebuilt with a warning),
                 and built under a file lock so that the ranks of a parallel run build it once.

The text is handed to the BPE as UTF-8; a byte that is not valid UTF-8 becomes the single-byte token of
that byte, so encoding is lossless for any bytes and every token stands for an exact byte string
(``Corpus.tokenizer.token_bytes``). That is what bits per byte (:func:`bits_per_byte`) divides by.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

VOCAB_SIZE = 256  # byte-level: token id = byte value
DEFAULT_MAX_BYTES = 8 * 2**20  # cap for the default (stdlib) corpus: 8 MiB is plenty for the lab
DEFAULT_VAL_FRACTION = 0.05
CACHE_ENV = "MUONLAB_CACHE"
FORMAT_VERSION = 1
TOKENS_FORMAT_VERSION = 1  # the layout of a tokenizer cache entry (bump to rebuild every BPE)
DEFAULT_TOKENIZER = "bytes"
MIN_BPE_VOCAB = 257  # the 256 single bytes plus at least one merge
MAX_BPE_VOCAB = 65536  # token ids fit in uint16

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


def _cached_meta(directory: Path, version: int = FORMAT_VERSION) -> tuple[Optional[dict[str, Any]], str]:
    """(the meta of a complete cache entry, "") or (None, why not). ``why`` is empty when there is
    simply no entry (nothing built yet, or a build that stopped before its ``meta.json``). The split
    sizes are counted in tokens of ``meta["dtype"]`` (uint8, one per byte, when it names none)."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None, ""
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("version") != version:
            return None, f"{meta_path} is not a version-{version} cache description"
        itemsize = np.dtype(meta.get("dtype", "uint8")).itemsize
        for split in _SPLITS:
            size = (directory / f"{split}.bin").stat().st_size
            if size != meta[f"{split}_size"] * itemsize:
                return None, (f"{directory / f'{split}.bin'} holds {size} bytes, "
                              f"{meta[f'{split}_size'] * itemsize} expected")
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
# Tokenizers
# ---------------------------------------------------------------------------------------------


def parse_tokenizer(spec: Any) -> tuple[str, int]:
    """``"bytes"`` -> ("bytes", 256); ``"bpe:N"`` -> ("bpe", N). Raises ValueError naming the value."""
    if isinstance(spec, str):
        kind, sep, size_text = spec.strip().partition(":")
        if kind == "bytes" and not sep:
            return "bytes", VOCAB_SIZE
        if kind == "bpe" and sep:
            try:
                size = int(size_text)
            except ValueError:
                raise ValueError(f"tokenizer {spec!r}: the BPE vocabulary size must be an integer, "
                                 f"e.g. bpe:4096") from None
            if not MIN_BPE_VOCAB <= size <= MAX_BPE_VOCAB:
                raise ValueError(f"tokenizer {spec!r}: the BPE vocabulary size must be from {MIN_BPE_VOCAB} (the 256 "
                                 f"bytes and at least one merge) to {MAX_BPE_VOCAB} (token ids in uint16), got {size}")
            return "bpe", size
    raise ValueError(f"unknown tokenizer {spec!r}; valid: 'bytes' or 'bpe:N' with N from {MIN_BPE_VOCAB} to "
                     f"{MAX_BPE_VOCAB}, e.g. bpe:4096")


def canonical_tokenizer(spec: Any) -> str:
    """The one spelling of a tokenizer spec: ``" bpe:0300"`` -> ``"bpe:300"``."""
    kind, size = parse_tokenizer(spec)
    return kind if kind == "bytes" else f"{kind}:{size}"


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per byte of a text: ``loss`` (mean nats per token over ``n_tokens`` tokens) * n_tokens
    / (n_bytes * ln 2), where ``n_bytes`` is the byte length of the same tokens. It does not depend on
    the tokenizer, so byte-level and BPE runs compare on it; for bytes it is loss / ln 2."""
    if n_tokens < 1 or n_bytes < 1:
        raise ValueError(f"bits per byte needs at least one token and one byte, got n_tokens={n_tokens}, "
                         f"n_bytes={n_bytes}")
    return float(loss) * n_tokens / (n_bytes * math.log(2))


def _as_ids(tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


class Tokenizer:
    """Text <-> token ids, where every id stands for an exact byte string ``token_bytes[id]``
    (``byte_lengths[id]`` bytes), so the bytes of any token sequence can be counted exactly."""

    kind: str
    spec: str
    vocab_size: int
    dtype: Any  # of the cached token arrays
    token_bytes: list[bytes]
    byte_lengths: np.ndarray  # (vocab_size,) int64

    def encode_bytes(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def encode(self, text: str) -> torch.Tensor:
        """The token ids of ``text`` (its UTF-8 bytes), an int64 tensor."""
        return torch.from_numpy(self.encode_bytes(text.encode("utf-8")).astype(np.int64))

    def _checked(self, tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> np.ndarray:
        ids = _as_ids(tokens)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the {self.spec} vocabulary [0, {self.vocab_size})")
        return ids

    def decode_bytes(self, tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> bytes:
        return b"".join(self.token_bytes[i] for i in self._checked(tokens).tolist())

    def decode(self, tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def count_bytes(self, tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> int:
        """The byte length of the text these tokens spell."""
        return int(self.byte_lengths[self._checked(tokens)].sum())

    def describe(self) -> dict[str, Any]:
        """What a run records of its tokenizer (config.json)."""
        return {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """Token id = byte value: vocabulary 256, one byte per token."""

    kind = spec = "bytes"
    vocab_size = VOCAB_SIZE
    dtype = np.uint8

    def __init__(self) -> None:
        self.token_bytes = [bytes([b]) for b in range(VOCAB_SIZE)]
        self.byte_lengths = np.ones(VOCAB_SIZE, dtype=np.int64)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).copy()


BYTES = ByteTokenizer()


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet the ``tokenizers`` ByteLevel
    pre-tokenizer writes bytes in (a vocabulary entry is a string of these characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# A byte that is not part of valid UTF-8 decodes (surrogateescape) to U+DC80..U+DCFF.
_RAW_BYTE = re.compile("[\udc80-\udcff]")
_CHUNK_CHARS = 1 << 16  # text goes to the BPE in pieces of about this size, cut after a newline


def _text_pieces(data: bytes) -> Iterator[Union[str, int]]:
    """``data`` as the BPE sees it: runs of valid UTF-8 text (pieces of about ``_CHUNK_CHARS``
    characters ending at a newline, so that encoding runs in parallel) and, between them, the bytes
    that are not valid UTF-8, as ints. Training and encoding cut the text the same way."""
    text = data.decode("utf-8", errors="surrogateescape")

    def chunks(start: int, stop: int) -> Iterator[str]:
        while start < stop:
            cut = text.find("\n", min(start + _CHUNK_CHARS, stop), stop)
            end = stop if cut < 0 else cut + 1
            yield text[start:end]
            start = end

    pos = 0
    for m in _RAW_BYTE.finditer(text):
        yield from chunks(pos, m.start())
        yield ord(m.group()) - 0xDC00
        pos = m.end()
    yield from chunks(pos, len(text))


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("--tokenizer bpe:N needs the Hugging Face tokenizers package: "
                          "pip install 'muonlab[lab]' (or pip install tokenizers)") from exc
    return tokenizers


class BPETokenizer(Tokenizer):
    """A byte-level BPE of the Hugging Face ``tokenizers`` library (``self.hf``), used through the
    exact byte strings of its tokens. ``requested`` is the N of ``bpe:N``; ``vocab_size`` is what the
    trainer learned (less than N only when the training text runs out of pairs to merge)."""

    kind = "bpe"
    dtype = np.uint16

    def __init__(self, hf: Any, requested: int, info: Optional[dict[str, Any]] = None):
        self.hf = hf
        self.spec = f"bpe:{requested}"
        self.vocab_size = hf.get_vocab_size()
        self.info = dict(info or {})
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        self.token_bytes = []
        for i in range(self.vocab_size):
            token = hf.id_to_token(i)
            if token is None or any(c not in to_byte for c in token):
                raise ValueError(f"{self.spec}: token {i} ({token!r}) is not a byte-level token")
            self.token_bytes.append(bytes(to_byte[c] for c in token))
        self.byte_lengths = np.array([len(t) for t in self.token_bytes], dtype=np.int64)
        ids = {t: i for i, t in enumerate(self.token_bytes)}
        missing = [b for b in range(256) if bytes([b]) not in ids]
        if missing:
            raise ValueError(f"{self.spec}: the vocabulary lacks the single byte {missing[0]:#04x}")
        self._byte_ids = [ids[bytes([b])] for b in range(256)]  # for bytes that are not valid UTF-8

    @classmethod
    def train(cls, data: bytes, vocab_size: int) -> "BPETokenizer":
        """Train a byte-level BPE of ``vocab_size`` tokens on ``data`` (the training split)."""
        tk = _import_tokenizers()
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        if set(alphabet) != set(byte_to_unicode().values()):  # the library changed its byte alphabet
            raise RuntimeError(f"tokenizers {tk.__version__}: its ByteLevel alphabet is not GPT-2's byte table")
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=[],
                                         show_progress=False)
        hf.train_from_iterator((p for p in _text_pieces(data) if isinstance(p, str)), trainer=trainer)
        tok = cls(hf, vocab_size)
        if tok.vocab_size < vocab_size:
            warnings.warn(f"bpe:{vocab_size}: the training split ({len(data)} bytes) only has pairs for "
                          f"{tok.vocab_size - 256} merges; the tokenizer has {tok.vocab_size} tokens", stacklevel=3)
        return tok

    @classmethod
    def from_json(cls, text: str, requested: int, info: Optional[dict[str, Any]] = None) -> "BPETokenizer":
        return cls(_import_tokenizers().Tokenizer.from_str(text), requested, info)

    def to_json(self) -> str:
        return self.hf.to_str()

    def encode_bytes(self, data: bytes) -> np.ndarray:
        pieces = list(_text_pieces(data))
        texts = [p for p in pieces if isinstance(p, str)]
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast: no character offsets
        encoded = iter(encode(texts, add_special_tokens=False))
        parts = [np.asarray(next(encoded).ids, dtype=np.int64) if isinstance(p, str)
                 else np.array([self._byte_ids[p]], dtype=np.int64) for p in pieces]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return ids.astype(self.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.info}


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def _check_nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {name}={value!r}")


class _ByTokenizer:
    """``Corpus.encode``/``Corpus.decode``: byte-level when called on the class (as they always were),
    the corpus's own tokenizer when called on an instance."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj: Optional["Corpus"], owner: type) -> Any:
        return getattr(BYTES if obj is None else obj.tokenizer, self.name)


class Corpus:
    """Tokens of one source, split into ``train`` and ``val`` (read-only ``np.memmap``: uint8 bytes,
    or uint16 ids of a BPE).

    ``meta`` describes the text whatever the tokenizer: ``size`` (bytes), ``hash`` (sha256 of all its
    bytes, train then val), ``n_files``, ``source`` (a description) and the split sizes in bytes.
    ``tokenizer`` turns text into the tokens of ``train``/``val`` and back; ``tokenizer_meta`` is what
    a run records of it. ``from_cache`` is True when this object was made from existing cache entries
    without reading the source files (or training a tokenizer).
    """

    encode = _ByTokenizer("encode")
    decode = _ByTokenizer("decode")

    def __init__(self, directory: Path, meta: dict[str, Any], from_cache: bool, *,
                 tokenizer: Optional[Tokenizer] = None, token_dir: Optional[Path] = None):
        self.directory = Path(directory)  # the text's cache entry
        self.meta = meta
        self.from_cache = from_cache
        self.tokenizer = tokenizer if tokenizer is not None else BYTES
        self.token_dir = Path(token_dir) if token_dir is not None else self.directory  # where train/val.bin are
        dtype = self.tokenizer.dtype
        self.train = np.memmap(self.token_dir / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(self.token_dir / "val.bin", dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def tokenizer_meta(self) -> dict[str, Any]:
        return self.tokenizer.describe()

    def count_bytes(self, tokens: Union[torch.Tensor, np.ndarray, list[int]]) -> int:
        """The byte length of the text these tokens spell (for bits per byte)."""
        return self.tokenizer.count_bytes(tokens)

    def __repr__(self) -> str:
        return (f"Corpus({self.meta['source']!r}, size={self.meta['size']}, tokenizer={self.tokenizer.spec}, "
                f"train={len(self.train)}, val={len(self.val)}, n_files={self.meta['n_files']}, "
                f"from_cache={self.from_cache})")

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



def load_corpus(path: Optional[PathLike] = None, *, max_bytes: Optional[int] = None,
                val_fraction: float = DEFAULT_VAL_FRACTION, cache_dir: Optional[PathLike] = None,
                pattern: Optional[str] = None, rebuild: bool = False, tokenizer: str = DEFAULT_TOKENIZER) -> Corpus:
    """Build (or reuse from cache) the corpus of ``path`` (None: the Python standard library).

    ``max_bytes`` caps the corpus; None means ``DEFAULT_MAX_BYTES`` for the stdlib and no cap for a
    user path. ``tokenizer`` is ``"bytes"`` or ``"bpe:N"`` (see the module docstring). ``rebuild=True``
    ignores existing cache entries (the text's and the tokenizer's). Raises FileNotFoundError for a
    missing path and ValueError for an empty or binary source or a bad tokenizer spec.
    """
    kind, vocab_size = parse_tokenizer(tokenizer)
    if kind == "bpe":
        _import_tokenizers()  # a missing package is said before any work
    text = _load_text(path, max_bytes=max_bytes, val_fraction=val_fraction, cache_dir=cache_dir, pattern=pattern,
                      rebuild=rebuild)
    if kind == "bytes":
        return text
    return _load_bpe(text, vocab_size, rebuild=rebuild)


def _load_text(path: Optional[PathLike], *, max_bytes: Optional[int], val_fraction: float,
               cache_dir: Optional[PathLike], pattern: Optional[str], rebuild: bool) -> Corpus:
    """The byte-level corpus: the text's cache entry, built from the source when needed."""
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


# ---------------------------------------------------------------------------------------------
# The BPE's cache entry: <corpus entry>/tokenizers/bpe<N>-<key>/
# ---------------------------------------------------------------------------------------------


def bpe_cache_key(text_meta: dict[str, Any], vocab_size: int, library_version: str) -> str:
    """What a BPE and its token arrays depend on: the text (content hash and split point), N, the
    library that trains it and the layout of the entry."""
    blob = json.dumps({"version": TOKENS_FORMAT_VERSION, "corpus_hash": text_meta["hash"],
                       "train_size": text_meta["train_size"], "val_size": text_meta["val_size"],
                       "vocab_size": vocab_size, "library": f"tokenizers {library_version}"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (the ranks of a parallel run load the corpus at
    the same time: one trains the BPE, the others wait and then read its entry)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only cache: a complete entry is still read; a build then fails on its own
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiter)


def _open_bpe_entry(text: Corpus, directory: Path, vocab_size: int) -> tuple[Optional[Corpus], str]:
    """(the corpus of a complete, verified BPE entry, "") or (None, why not; "" when there is none)."""
    meta, why = _cached_meta(directory, TOKENS_FORMAT_VERSION)
    if meta is None:
        return None, why
    path = directory / "tokenizer.json"
    try:
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["tokenizer_hash"]:
            return None, f"{path} does not match the sha256 its meta.json records"
        tok = BPETokenizer.from_json(blob.decode("utf-8"), vocab_size, _bpe_info(meta))
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, a KeyError in meta, the library's own errors
        return None, f"cannot load {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    if tok.vocab_size != meta["vocab_size"]:
        return None, f"{path} has {tok.vocab_size} tokens, {meta['vocab_size']} expected"
    corpus = Corpus(text.directory, text.meta, text.from_cache, tokenizer=tok, token_dir=directory)
    found = _content_hash(corpus)  # of what is mapped, as for the text
    if found != meta["hash"]:
        return None, f"its token hash is {found[:12]}..., {meta['hash'][:12]}... expected"
    return corpus, ""


def _bpe_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its BPE (besides kind, spec and vocab_size)."""
    return {"hash": meta["tokenizer_hash"], "tokens_hash": meta["hash"], "cache_key": meta["cache_key"],
            "library": meta["library"], "train_tokens": meta["train_size"], "val_tokens": meta["val_size"],
            "train_bytes": meta["train_bytes"], "val_bytes": meta["val_bytes"]}


def _load_bpe(text: Corpus, vocab_size: int, *, rebuild: bool) -> Corpus:
    """The corpus of ``text`` in the tokens of a byte-level BPE of ``vocab_size`` trained on its
    training split: from the cache when it holds a verified entry, else trained, encoded and cached."""
    tk = _import_tokenizers()
    library = f"tokenizers {tk.__version__}"
    key = bpe_cache_key(text.meta, vocab_size, tk.__version__)
    directory = text.directory / "tokenizers" / f"bpe{vocab_size}-{key}"
    with _build_lock(directory.parent / f"{directory.name}.lock"):
        if not rebuild:
            cached, why = _open_bpe_entry(text, directory, vocab_size)
            if cached is not None:
                return cached
            if why:
                warnings.warn(f"tokenizer cache {directory} is damaged ({why}); training the bpe:{vocab_size} "
                              f"tokenizer again", stacklevel=3)
        train_text, val_text = bytes(text.train), bytes(text.val)
        tok = BPETokenizer.train(train_text, vocab_size)  # the training split only
        ids = {"train": tok.encode_bytes(train_text), "val": tok.encode_bytes(val_text)}
        for split, data in (("train", train_text), ("val", val_text)):
            # bits per byte counts the bytes of tokens: they must spell the split exactly
            if tok.decode_bytes(ids[split]) != data:
                raise RuntimeError(f"bpe:{vocab_size} ({library}) does not encode the {split} split of "
                                   f"{text.meta['source']} losslessly")
        blob = tok.to_json().encode("utf-8")
        h = hashlib.sha256()
        for split in _SPLITS:
            h.update(ids[split].tobytes())
        meta = {
            "version": TOKENS_FORMAT_VERSION,
            "kind": "bpe",
            "spec": f"bpe:{vocab_size}",
            "requested_vocab_size": vocab_size,
            "vocab_size": tok.vocab_size,
            "library": library,
            "cache_key": key,
            "corpus_hash": text.meta["hash"],
            "source": text.meta["source"],
            "dtype": np.dtype(tok.dtype).name,
            "train_size": int(ids["train"].size),
            "val_size": int(ids["val"].size),
            "train_bytes": len(train_text),
            "val_bytes": len(val_text),
            "hash": h.hexdigest(),
            "tokenizer_hash": hashlib.sha256(blob).hexdigest(),
        }
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / "tokenizer.json", blob)
        for split in _SPLITS:
            _write_atomic(directory / f"{split}.bin", ids[split].tobytes())
        _write_atomic(directory / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())  # last: marks complete
        tok.info = _bpe_info(meta)
        return Corpus(text.directory, text.meta, False, tokenizer=tok, token_dir=directory)
