"""Layer 3: module-aware routing of a model's parameters to Muon or AdamW, and its report.

Rules (first match wins, per parameter):

1. user overrides by name pattern (``adamw=[...]``, ``muon=[...]``; glob patterns such as
   ``"blocks.*.attn.wq.weight"``); a pattern that matches no parameter is an error;
2. ``nn.Embedding``/``nn.EmbeddingBag`` weights -> AdamW (a lookup table, not a linear map);
3. the output head -> AdamW: an ``nn.Linear`` whose weight is tied to an embedding, one named by
   ``head=`` (default: last name segment ``lm_head``, ``head``, ``output``, ``classifier``), or,
   when neither exists, the last ``nn.Linear`` registered in the model;
4. parameters of normalization layers, biases and every 0-D/1-D tensor -> AdamW;
5. ``nn.Linear`` weights -> Muon (``matrix``); ``nn.ConvNd`` kernels -> Muon (``flatten``);
   ``nn.MultiheadAttention.in_proj_weight`` -> Muon (``split:E,E,E``, q/k/v separately);
   other 2-D+ parameters -> Muon with the view their shape implies (3-D = expert stack).

Frozen parameters (``requires_grad=False``) are left out and listed in the report. Every trainable
parameter is assigned exactly once, tied parameters included.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ._tables import format_table
from .views import auto_view, check_view, matrix_shapes, parse_view

DEFAULT_HEAD_NAMES = ("lm_head", "head", "output", "classifier")

_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass
class RouteRow:
    """One line of the routing report."""

    name: str
    shape: tuple[int, ...]
    algorithm: str  # "muon", "adamw", "rms" or "frozen"
    view: str
    matrices: str  # e.g. "1x(64, 256)" or "4x(16, 64)"
    lr: Optional[float]
    reason: str


class RoutingReport:
    """Which parameter goes where, and why. ``str(report)`` is a table; ``report.rows`` the data."""

    def __init__(self, rows: list[RouteRow]):
        self.rows = rows

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def counts(self) -> dict[str, tuple[int, int]]:
        """algorithm -> (number of tensors, number of elements)."""
        out: dict[str, tuple[int, int]] = {}
        for r in self.rows:
            n, e = out.get(r.algorithm, (0, 0))
            numel = 1
            for s in r.shape:
                numel *= s
            out[r.algorithm] = (n + 1, e + numel)
        return out

    def __str__(self) -> str:
        rows = [
            [r.name, "x".join(map(str, r.shape)) or "scalar", r.algorithm, r.view, r.matrices,
             "-" if r.lr is None else f"{r.lr:g}", r.reason]
            for r in self.rows
        ]
        table = format_table(["parameter", "shape", "algorithm", "view", "matrices", "lr", "why"], rows)
        summary = ", ".join(f"{alg}: {n} tensors / {e:,} elements" for alg, (n, e) in self.counts().items())
        return f"{table}\n{summary}"

    def __repr__(self) -> str:
        return f"RoutingReport({len(self.rows)} parameters)"


def describe_matrices(shape: Sequence[int], view: str) -> str:
    """``"kx(fan_out, fan_in)"`` per block, e.g. ``"4x(16, 64)"``; an expert stack cut by heads or
    split counts its equal blocks together (``"experts:split:48,48"`` on (4, 96, 32): ``"8x(48, 32)"``)."""
    merge = parse_view(view).stacked
    parts: list[list[int]] = []
    for k, a, b in matrix_shapes(tuple(shape), view):
        if merge and parts and parts[-1][1:] == [a, b]:
            parts[-1][0] += k
        else:
            parts.append([k, a, b])
    return " + ".join(f"{k}x({a}, {b})" for k, a, b in parts)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern


def _check_patterns(patterns: Iterable[str], names: Sequence[str], what: str) -> None:
    for pat in patterns:
        if not any(_matches(n, pat) for n in names):
            raise ValueError(f"{what} pattern {pat!r} matches no trainable parameter of the model")


def muon_param_groups(
    model: nn.Module,
    *,
    adamw: Sequence[str] = (),
    muon: Sequence[str] = (),
    head: Union[str, Sequence[str], None] = "auto",
    views: Optional[Mapping[str, str]] = None,
    lr: Optional[float] = None,
    adamw_lr: Optional[float] = None,
    nonmatrix: str = "adamw",
) -> "ParamGroups":
    """Split ``model``'s trainable parameters into a Muon group and an AdamW group.

    Args:
        model: the module whose parameters to route.
        adamw / muon: glob patterns of parameter names forced to that algorithm.
        head: ``"auto"`` (tied to an embedding, a conventional head name, or the last Linear),
            a name pattern or list of them naming the head module(s)/weights, or ``None`` (no head).
        views: ``{pattern: view}`` logical views for Muon parameters, e.g.
            ``{"blocks.*.attn.wq.weight": "heads:8"}`` (Muon Split).
        lr / adamw_lr: learning rates set on the groups (else the optimizer's defaults apply).
        nonmatrix: algorithm for 0-D/1-D tensors: ``"adamw"`` (default) or ``"rms"`` (seed 002).

    Returns:
        A list of param-group dicts (``params``, ``param_names``, ``algorithm``, ``views`` and a
        ``routing`` list of reasons) for :class:`muonlab.Muon`.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10))
        >>> [ (g["algorithm"], g["param_names"]) for g in muon_param_groups(model) ]
        [('muon', ['1.weight']), ('adamw', ['0.weight', '1.bias', '2.weight', '2.bias', '3.weight', '3.bias'])]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"muon_param_groups expects an nn.Module, got {type(model).__name__}")
    if nonmatrix not in ("adamw", "rms"):
        raise ValueError(f"nonmatrix must be 'adamw' or 'rms', got {nonmatrix!r}")
    views = dict(views or {})

    # every (module, local name, param) with its qualified name; a tied parameter keeps its first name
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{local}" if mod_name else local
            owners.setdefault(id(p), (full, module, local))
    all_owner_modules: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{local}" if mod_name else local
            all_owner_modules.setdefault(id(p), []).append((module, local, full))

    named = [(owners[id(p)][0], p) for p in _unique_params(model)]
    trainable_names = [n for n, p in named if p.requires_grad]
    _check_patterns(adamw, trainable_names, "adamw")
    _check_patterns(muon, trainable_names, "muon")
    _check_patterns(views.keys(), trainable_names, "views")
    both = [n for n in trainable_names if any(_matches(n, p) for p in adamw) and any(_matches(n, p) for p in muon)]
    if both:
        raise ValueError(f"parameters matched by both adamw and muon patterns: {both}")

    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    head_ids, head_reason = _find_heads(model, head, embed_ids)

    groups: dict[str, dict[str, Any]] = {}
    frozen: list[str] = []

    def add(alg: str, name: str, p: torch.Tensor, view: str, reason: str) -> None:
        g = groups.setdefault(alg, {"params": [], "param_names": [], "algorithm": alg, "views": [], "routing": []})
        g["params"].append(p)
        g["param_names"].append(name)
        g["views"].append(view)
        g["routing"].append(reason)

    for name, p in named:
        if not p.requires_grad:
            frozen.append(name)
            continue
        owner_list = all_owner_modules[id(p)]
        view = next((v for pat, v in views.items() if _matches(name, pat)), None)
        if any(_matches(name, pat) for pat in adamw):
            add("adamw", name, p, "-", "user override (adamw pattern)")
            continue
        if any(_matches(name, pat) for pat in muon):
            if p.ndim < 2:
                raise ValueError(f"muon pattern matched {name} with shape {tuple(p.shape)}; Muon needs 2-D+ tensors")
            v = view or _module_view(owner_list, p)
            check_view(v, p.shape, name)
            add("muon", name, p, v, "user override (muon pattern)")
            continue
        if id(p) in embed_ids:
            tied = " (tied to the output head)" if id(p) in head_ids else ""
            add("adamw", name, p, "-", "embedding" + tied)
            continue
        if id(p) in head_ids:
            add("adamw", name, p, "-", head_reason[id(p)])
            continue
        if p.ndim < 2:
            if any(isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower() for m, _, _ in owner_list):
                reason = "normalization weight"
            else:
                reason = "bias" if name.endswith("bias") else f"{p.ndim}-D tensor"
            add(nonmatrix, name, p, "-", reason)
            continue
        v = view or _module_view(owner_list, p)
        check_view(v, p.shape, name)
        add("muon", name, p, v, _muon_reason(owner_list, p, view is not None))

    if views:
        for pat in views:
            hits = [n for n in groups.get("muon", {}).get("param_names", []) if _matches(n, pat)]
            if not hits:
                raise ValueError(f"views pattern {pat!r} matches no parameter routed to Muon")

    out = ParamGroups()
    out.frozen = [(n, tuple(p.shape)) for n, p in named if n in set(frozen)]
    for alg in ("muon", "adamw", "rms"):
        if alg in groups:
            g = groups[alg]
            if alg == "muon" and lr is not None:
                g["lr"] = lr
            if alg == "adamw" and adamw_lr is not None:
                g["lr"] = adamw_lr
            out.append(g)
    return out


class ParamGroups(list):
    """The groups returned by :func:`muon_param_groups`; ``.frozen`` lists (name, shape) left out."""

    frozen: list[tuple[str, tuple[int, ...]]] = []


def _unique_params(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in model.parameters(recurse=True):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _module_view(owner_list: list[tuple[nn.Module, str, str]], p: torch.Tensor) -> str:
    for module, local, _ in owner_list:
        if isinstance(module, nn.MultiheadAttention) and local == "in_proj_weight":
            e = module.embed_dim
            return f"split:{e},{e},{e}"
        if isinstance(module, (nn.modules.conv._ConvNd,)) and local == "weight":
            return "flatten"
    return auto_view(p.shape)


def _muon_reason(owner_list: list[tuple[nn.Module, str, str]], p: torch.Tensor, user_view: bool) -> str:
    suffix = " (user view)" if user_view else ""
    for module, local, _ in owner_list:
        if isinstance(module, nn.MultiheadAttention) and local == "in_proj_weight":
            return "fused q/k/v projection (split)" + suffix
        if isinstance(module, nn.Linear):
            return "hidden Linear weight" + suffix
        if isinstance(module, nn.modules.conv._ConvNd):
            return "conv kernel (flattened)" + suffix
    if p.ndim == 3:
        return "3-D tensor (expert stack)" + suffix
    return f"{p.ndim}-D tensor" + suffix


def _find_heads(model: nn.Module, head: Union[str, Sequence[str], None], embed_ids: set[int]) -> tuple[set[int], dict[int, str]]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ids: set[int] = set()
    reasons: dict[int, str] = {}

    def mark(m: nn.Linear, reason: str) -> None:
        ids.add(id(m.weight))
        reasons[id(m.weight)] = reason
        if m.bias is not None:
            ids.add(id(m.bias))
            reasons[id(m.bias)] = reason + " bias"

    if head is None:
        return ids, reasons
    if head != "auto":
        patterns = [head] if isinstance(head, str) else list(head)
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules()]
        for pat in patterns:
            hit = False
            for n, m in linears:
                if _matches(n, pat) or _matches(f"{n}.weight", pat):
                    mark(m, "output head (named by user)")
                    hit = True
            for n, p in model.named_parameters():
                if _matches(n, pat) and id(p) not in ids:
                    ids.add(id(p))
                    reasons[id(p)] = "output head (named by user)"
                    hit = True
            if not hit:
                raise ValueError(f"head pattern {pat!r} matches no module or parameter (names: {names[:8]}...)")
        return ids, reasons
    for n, m in linears:
        if id(m.weight) in embed_ids:
            mark(m, "output head (tied to an embedding)")
    for n, m in linears:
        if n.split(".")[-1] in DEFAULT_HEAD_NAMES and id(m.weight) not in ids:
            mark(m, f"output head (named '{n.split('.')[-1]}')")
    if not ids and linears:
        n, m = linears[-1]
        mark(m, "output head (last Linear layer)")
    return ids, reasons
