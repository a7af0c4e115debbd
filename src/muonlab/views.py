"""Layer 2: logical-matrix views of parameters.

Muon orthogonalizes *matrices*. A physical parameter becomes one or more logical matrices, always
oriented (fan_out, fan_in) (rows = outputs, the layout of ``nn.Linear.weight``), because the shape
scale (``adjust_lr_fn``), NorMuon's per-row statistics and the ``heads``/``split`` cuts all read
that orientation:

==================  =====================================  =======================================
view                parameter shape                        logical matrices (fan_out, fan_in)
==================  =====================================  =======================================
``matrix``          (out, in)                              one (out, in)
``flatten``         (out, in, k1, k2, ...) conv kernels     one (out, in·k1·k2·...)
``experts``         (E, out, in) expert stacks              E independent (out, in)
``heads:H``         (H·d, in)  (Muon Split, seed 000)       H blocks (d, in), one per head
``heads:H:1``       (out, H·d)  heads along the input dim   H blocks (out, d)
``split:a,b,c``     (a+b+c, in) fused QKV                   (a, in), (b, in), (c, in)
``T``               (in, out) transposed storage            one (out, in)   (GPT-2's ``Conv1D``)
``T:flatten``       (in, out, k1, ...) transposed convs     one (out·k1·..., in)
``experts:T``       (E, in, out)                            E independent (out, in)
``experts:split:a,b``  (E, a+b, in) fused gate_up stack     E (a, in), then E (b, in)
``experts:T:heads:H``  (E, in, H·d)                         H·E blocks (d, in)
==================  =====================================  =======================================

Modifiers come first and compose: ``experts:`` (a leading stack dimension: each index is its own
matrix), then ``T`` (the last two dimensions are stored (in, out)), then ``heads:``/``split:``,
which cut the *logical* (out, in) matrix (so ``T:split:a,b`` splits the stored columns).

Views are strings so they live in param groups and survive ``state_dict`` round trips. Each view
gives *views* (no copies) into a tensor of the parameter's shape, so the same function reads the
momentum and writes the update back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

VIEW_KINDS = ("matrix", "flatten", "experts", "heads", "split")
VIEW_MODIFIERS = ("experts", "T")


@dataclass(frozen=True)
class View:
    kind: str
    heads: int = 0
    dim: int = 0
    sizes: tuple[int, ...] = ()
    experts: bool = False  # heads/split inside an expert stack (kind "experts" is the plain stack)
    transposed: bool = False  # the last two dimensions are stored (in, out)

    @property
    def stacked(self) -> bool:
        """True when the first dimension indexes independent matrices (expert stacks)."""
        return self.kind == "experts" or self.experts

    def __str__(self) -> str:
        mods = (["experts"] if self.stacked else []) + (["T"] if self.transposed else [])
        if self.kind == "heads":
            base = f"heads:{self.heads}" + (":1" if self.dim == 1 else "")
        elif self.kind == "split":
            base = "split:" + ",".join(str(s) for s in self.sizes)
        elif self.kind == "flatten":
            base = "flatten"
        elif self.kind == "matrix" and not mods:
            base = "matrix"
        else:  # plain stack, or a transposed matrix
            base = ""
        return ":".join(mods + ([base] if base else []))


@lru_cache(maxsize=256)
def parse_view(spec: str) -> View:
    """Parse a view string such as ``"heads:8"``, ``"split:512,128,128"``, ``"T"`` or
    ``"experts:T:split:64,64"``."""
    if not isinstance(spec, str):
        raise TypeError(f"a view must be a string like 'matrix' or 'heads:8', got {spec!r}")
    parts = spec.strip().lower().split(":")
    experts = transposed = False
    if parts[0] == "experts":
        experts, parts = True, parts[1:]
    if parts and parts[0] == "t":
        transposed, parts = True, parts[1:]
    kind = parts[0] if parts else ""
    try:
        if not parts or (kind == "matrix" and len(parts) == 1):
            if experts:
                return View("experts", transposed=transposed)
            if transposed or parts:
                return View("matrix", transposed=transposed)
        if kind == "flatten" and len(parts) == 1 and not experts:
            return View("flatten", transposed=transposed)
        if kind == "heads" and len(parts) in (2, 3):
            heads = int(parts[1])
            dim = int(parts[2]) if len(parts) == 3 else 0
            if heads < 1 or dim not in (0, 1):
                raise ValueError
            return View("heads", heads=heads, dim=dim, experts=experts, transposed=transposed)
        if kind == "split" and len(parts) == 2:
            sizes = tuple(int(s) for s in parts[1].split(","))
            if len(sizes) < 1 or min(sizes) < 1:
                raise ValueError
            return View("split", sizes=sizes, experts=experts, transposed=transposed)
    except ValueError:
        pass
    raise ValueError(
        f"invalid view {spec!r}; valid forms: 'matrix', 'flatten', 'experts', 'heads:H', "
        "'heads:H:1', 'split:a,b,...', optionally after the modifiers 'experts:' (a stack of "
        "matrices) and 'T:' (stored (in, out)), e.g. 'T', 'experts:T', 'experts:split:a,b'"
    )


def auto_view(shape: torch.Size | tuple[int, ...]) -> str:
    """Default view by shape alone: 2-D matrix, 3-D expert stack, 4-D+ flattened conv kernel."""
    if len(shape) == 2:
        return "matrix"
    if len(shape) == 3:
        return "experts"
    if len(shape) >= 4:
        return "flatten"
    raise ValueError(f"a {len(shape)}-D tensor of shape {tuple(shape)} has no matrix view")


def _logical(view: View, shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_out, fan_in) of each matrix before heads/split cut it."""
    if view.kind == "flatten":
        a, b = shape[0], math.prod(shape[1:])
    else:
        a, b = shape[-2], shape[-1]
    return (b, a) if view.transposed else (a, b)


def check_view(spec: str, shape: torch.Size | tuple[int, ...], name: str = "parameter") -> View:
    """Validate that a view fits a parameter shape; raise ValueError naming both otherwise."""
    view = parse_view(spec)
    shape = tuple(shape)
    where = f"{name} with shape {shape}"
    if len(shape) < 2:
        raise ValueError(f"{where}: Muon needs a matrix, but the tensor is {len(shape)}-D")
    if view.kind == "matrix" and len(shape) != 2:
        raise ValueError(f"{where}: view '{view}' needs a 2-D tensor; use 'flatten' or 'experts'")
    if view.stacked and len(shape) != 3:
        raise ValueError(f"{where}: view '{view}' needs a 3-D (E, m, n) tensor")
    if view.kind in ("heads", "split") and not view.stacked and len(shape) != 2:
        raise ValueError(f"{where}: view '{view}' needs a 2-D tensor")
    m, n = _logical(view, shape)
    of = "" if not (view.stacked or view.transposed) else f" of the logical (fan_out, fan_in) matrix {m}x{n}"
    if view.kind == "heads":
        size = (m, n)[view.dim]
        if size % view.heads != 0:
            raise ValueError(f"{where}: view '{view}' does not divide dim {view.dim}{of} of size {size} into {view.heads} heads")
    if view.kind == "split" and sum(view.sizes) != m:
        raise ValueError(f"{where}: view '{view}' sizes sum to {sum(view.sizes)}, not dim 0{of} = {m}")
    return view


def blocks(t: torch.Tensor, spec: str) -> list[torch.Tensor]:
    """Views of ``t`` as stacks of logical matrices, each of shape (k, fan_out, fan_in).

    Writing into the returned tensors writes into ``t``.
    """
    view = parse_view(spec)
    if view.kind == "flatten":
        flat = t.reshape(1, t.shape[0], math.prod(t.shape[1:]))
        return [flat.mT if view.transposed else flat]
    stack = t if view.stacked else t.unsqueeze(0)  # (k, stored rows, stored cols)
    mats = stack.mT if view.transposed else stack  # (k, fan_out, fan_in)
    if view.kind in ("matrix", "experts"):
        return [mats]
    if view.kind == "heads":
        k, m, n = mats.shape
        h = view.heads
        if not view.stacked:  # one block of H heads (splitting one dimension is always a view)
            if view.dim == 0:
                return [mats[0].view(h, m // h, n)]
            return [mats[0].view(m, h, n // h).transpose(0, 1)]
        # expert stacks: one block per head, each a stack over the experts (E and H cannot always
        # merge into one strided dimension, e.g. under T)
        if view.dim == 0:
            d = m // h
            return [mats[:, i * d:(i + 1) * d, :] for i in range(h)]
        d = n // h
        return [mats[:, :, i * d:(i + 1) * d] for i in range(h)]
    if view.kind == "split":
        return list(torch.split(mats, list(view.sizes), dim=1))
    raise AssertionError(view)


def matrix_shapes(shape: tuple[int, ...], spec: str) -> list[tuple[int, int, int]]:
    """(k, a, b) for each block of a parameter of ``shape`` under view ``spec``."""
    return [tuple(b.shape) for b in blocks(torch.empty(shape, device="meta"), spec)]  # type: ignore[misc]


@dataclass(frozen=True)
class Box:
    """Where one logical matrix lives in its parameter: the region ``[start, start + size)`` of every
    physical dimension, read as a contiguous tensor of shape ``size``, reshaped to ``shape2d`` and,
    if ``transposed``, transposed. Used by the sharded engine to cut a matrix out of shards."""

    start: tuple[int, ...]
    size: tuple[int, ...]
    shape2d: tuple[int, int]
    transposed: bool = False

    @property
    def logical_shape(self) -> tuple[int, int]:
        a, b = self.shape2d
        return (b, a) if self.transposed else (a, b)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))


def matrix_boxes(shape: torch.Size | tuple[int, ...], spec: str) -> list[Box]:
    """The :class:`Box` of every logical matrix of a parameter of ``shape`` under view ``spec``,
    in the order of ``torch.cat(blocks(t, spec))`` (block by block, matrix by matrix).

    ``t[box.slices()].reshape(box.shape2d)`` (then ``.mT`` if ``box.transposed``) equals that
    logical matrix; tests hold this to :func:`blocks` for every view.
    """
    view = parse_view(spec)
    shape = tuple(int(s) for s in shape)
    zero = (0,) * len(shape)
    tr = view.transposed
    if view.kind == "flatten":
        return [Box(zero, shape, (shape[0], math.prod(shape[1:])), tr)]
    if view.kind == "matrix":
        return [Box(zero, shape, (shape[0], shape[1]), tr)]
    m, n = _logical(view, shape)
    # each logical matrix as (expert index or None, first row, rows, first column, columns) of
    # the logical (fan_out, fan_in) matrix, in blocks() order
    experts = list(range(shape[0])) if view.stacked else [None]
    regions: list[tuple[int | None, int, int, int, int]] = []
    if view.kind == "experts":
        regions = [(e, 0, m, 0, n) for e in experts]
    elif view.kind == "heads":
        if view.dim == 0:
            d = m // view.heads
            cuts = [(i * d, d, 0, n) for i in range(view.heads)]
        else:
            d = n // view.heads
            cuts = [(0, m, i * d, d) for i in range(view.heads)]
        # a plain tensor: one block of H heads; a stack: one block per head, over the experts
        regions = [(e, *c) for c in cuts for e in experts]
    elif view.kind == "split":
        cuts, start = [], 0
        for size in view.sizes:
            cuts.append((start, size, 0, n))
            start += size
        regions = [(e, *c) for c in cuts for e in experts]
    else:  # pragma: no cover
        raise AssertionError(view)
    out = []
    for e, r0, a, c0, b in regions:
        start, size, shape2d = ((c0, r0), (b, a), (b, a)) if tr else ((r0, c0), (a, b), (a, b))
        if e is not None:
            start, size = (e, *start), (1, *size)
        out.append(Box(start, size, shape2d, tr))
    return out
