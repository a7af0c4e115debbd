"""Layer 2: logical-matrix views of parameters.

Muon orthogonalizes *matrices*. A physical parameter becomes one or more logical matrices:

==================  =====================================  =======================================
view                parameter shape                        logical matrices
==================  =====================================  =======================================
``matrix``          (m, n)                                 one (m, n)
``flatten``         (out, in, k1, k2, ...) conv kernels     one (out, in·k1·k2·...)
``experts``         (E, m, n) expert stacks                 E independent (m, n)
``heads:H``         (H·d, n)  (Muon Split, seed 000)        H blocks (d, n), one per head
``heads:H:1``       (m, H·d)  heads along the input dim     H blocks (m, d)
``split:a,b,c``     (a+b+c, n) fused QKV                    (a, n), (b, n), (c, n)
==================  =====================================  =======================================

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


@dataclass(frozen=True)
class View:
    kind: str
    heads: int = 0
    dim: int = 0
    sizes: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "heads":
            return f"heads:{self.heads}" + (":1" if self.dim == 1 else "")
        if self.kind == "split":
            return "split:" + ",".join(str(s) for s in self.sizes)
        return self.kind


@lru_cache(maxsize=256)
def parse_view(spec: str) -> View:
    """Parse a view string such as ``"heads:8"`` or ``"split:512,128,128"``."""
    if not isinstance(spec, str):
        raise TypeError(f"a view must be a string like 'matrix' or 'heads:8', got {spec!r}")
    parts = spec.strip().lower().split(":")
    kind = parts[0]
    try:
        if kind in ("matrix", "flatten", "experts") and len(parts) == 1:
            return View(kind)
        if kind == "heads" and len(parts) in (2, 3):
            heads = int(parts[1])
            dim = int(parts[2]) if len(parts) == 3 else 0
            if heads < 1 or dim not in (0, 1):
                raise ValueError
            return View("heads", heads=heads, dim=dim)
        if kind == "split" and len(parts) == 2:
            sizes = tuple(int(s) for s in parts[1].split(","))
            if len(sizes) < 1 or min(sizes) < 1:
                raise ValueError
            return View("split", sizes=sizes)
    except ValueError:
        pass
    raise ValueError(
        f"invalid view {spec!r}; valid forms: 'matrix', 'flatten', 'experts', 'heads:H', "
        "'heads:H:1', 'split:a,b,...'"
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


def check_view(spec: str, shape: torch.Size | tuple[int, ...], name: str = "parameter") -> View:
    """Validate that a view fits a parameter shape; raise ValueError naming both otherwise."""
    view = parse_view(spec)
    shape = tuple(shape)
    where = f"{name} with shape {shape}"
    if len(shape) < 2:
        raise ValueError(f"{where}: Muon needs a matrix, but the tensor is {len(shape)}-D")
    if view.kind == "matrix" and len(shape) != 2:
        raise ValueError(f"{where}: view 'matrix' needs a 2-D tensor; use 'flatten' or 'experts'")
    if view.kind == "experts" and len(shape) != 3:
        raise ValueError(f"{where}: view 'experts' needs a 3-D (E, m, n) tensor")
    if view.kind == "heads":
        if len(shape) != 2:
            raise ValueError(f"{where}: view '{view}' needs a 2-D tensor")
        size = shape[view.dim]
        if size % view.heads != 0:
            raise ValueError(f"{where}: view '{view}' does not divide dim {view.dim} of size {size} into {view.heads} heads")
    if view.kind == "split":
        if len(shape) != 2:
            raise ValueError(f"{where}: view '{view}' needs a 2-D tensor")
        if sum(view.sizes) != shape[0]:
            raise ValueError(f"{where}: view '{view}' sizes sum to {sum(view.sizes)}, not dim 0 = {shape[0]}")
    return view


def blocks(t: torch.Tensor, spec: str) -> list[torch.Tensor]:
    """Views of ``t`` as stacks of logical matrices, each of shape (k, a, b).

    Writing into the returned tensors writes into ``t``.
    """
    view = parse_view(spec)
    if view.kind == "matrix":
        return [t.unsqueeze(0)]
    if view.kind == "flatten":
        return [t.reshape(1, t.shape[0], math.prod(t.shape[1:]))]
    if view.kind == "experts":
        return [t]
    if view.kind == "heads":
        m, n = t.shape
        if view.dim == 0:
            return [t.view(view.heads, m // view.heads, n)]
        return [t.view(m, view.heads, n // view.heads).transpose(0, 1)]
    if view.kind == "split":
        return [part.unsqueeze(0) for part in torch.split(t, list(view.sizes), dim=0)]
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
    if view.kind == "matrix":
        return [Box(zero, shape, (shape[0], shape[1]))]
    if view.kind == "flatten":
        return [Box(zero, shape, (shape[0], math.prod(shape[1:])))]
    if view.kind == "experts":
        return [Box((e, 0, 0), (1, shape[1], shape[2]), (shape[1], shape[2])) for e in range(shape[0])]
    if view.kind == "heads":
        m, n = shape
        if view.dim == 0:
            d = m // view.heads
            return [Box((h * d, 0), (d, n), (d, n)) for h in range(view.heads)]
        d = n // view.heads
        return [Box((0, h * d), (m, d), (m, d)) for h in range(view.heads)]
    if view.kind == "split":
        out, start = [], 0
        for s in view.sizes:
            out.append(Box((start, 0), (s, shape[1]), (s, shape[1])))
            start += s
        return out
    raise AssertionError(view)
