"""Layer 3: module-aware routing of a model's parameters to Muon or AdamW, and its report.

A parameter goes to Muon when a known matmul module multiplies it, in the orientation that module
uses; everything else goes to AdamW. Rules (first match wins, per parameter):

1. user overrides by name pattern (``adamw=[...]``, ``muon=[...]``; glob patterns such as
   ``"blocks.*.attn.wq.weight"``, matched with or without wrapper prefixes such as ``_orig_mod.``
   (torch.compile), ``module.`` (DDP) and FSDP's); a pattern that matches no parameter is an error
   that lists the closest names;
2. ``nn.Embedding``/``nn.EmbeddingBag`` weights -> AdamW (a lookup table, not a linear map);
3. the output head -> AdamW: an ``nn.Linear`` whose weight is tied to an embedding, one named by
   ``head=`` (default: last name segment ``lm_head``, ``head``, ``output``, ``classifier``), or,
   when neither exists, the last ``nn.Linear`` outside the model's repeated blocks;
4. parameters of normalization layers, biases and every 0-D/1-D tensor -> AdamW;
5. weights of known matmul modules -> Muon, as (fan_out, fan_in) matrices:
   ``nn.Linear`` (``matrix``), ``nn.ConvNd`` (``flatten``; transposed convs ``T:flatten``),
   ``nn.MultiheadAttention.in_proj_weight`` (``split:E,E,E``), RNN/LSTM/GRU weights (``matrix``),
   ``transformers``' GPT-2 ``Conv1D`` (stored (in, out): ``T``; a fused ``c_attn`` ``T:split``),
   expert stacks of MoE layers (``experts``; ``experts:T`` where the module says it stores
   (E, in, out); a fused gate_up stack ``experts:split:I,I``). Except, to AdamW:
   depthwise convolutions (one filter per channel, no matmul), the input layer (a patch embedding:
   the model's first convolution when it cuts non-overlapping patches, or a module named
   ``*patch_embed*``), MoE routers and gates (a judgment call: see :data:`ROUTER_WHY`), and
   matrices shaped 1 x n or n x 1 (vectors: msign would only normalize them);
6. everything else with 2+ dimensions (class and position tokens, bias tables, SSM parameters
   such as Mamba's ``A_log``, a raw ``nn.Parameter`` multiplied by custom code) -> AdamW, with the
   pattern that would route it to Muon in the report.

Frozen parameters (``requires_grad=False``) are left out and listed in the report. Every trainable
parameter is assigned exactly once, tied parameters included.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Optional, Union

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


def _matches(name: Union[str, tuple[str, ...]], pattern: str) -> bool:
    """Glob match of one name, or of any of a parameter's spellings (full name, name without wrappers)."""
    names = (name,) if isinstance(name, str) else name
    return any(fnmatch.fnmatchcase(n, pattern) or n == pattern for n in names)


def _closest(pattern: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(pattern, list(dict.fromkeys(names)), n=5, cutoff=0.4)
    if not close:  # a glob's '*' reads as noise to difflib; compare its literal parts too
        close = difflib.get_close_matches(pattern.replace("*", ""), list(dict.fromkeys(names)), n=5, cutoff=0.4)
    return f"; closest names: {', '.join(close)}" if close else ""


def _check_patterns(patterns: Iterable[str], names: Sequence[tuple[str, ...]], what: str) -> None:
    for pat in patterns:
        if not any(_matches(n, pat) for n in names):
            flat = [spelling for n in names for spelling in n[::-1]]
            raise ValueError(f"{what} pattern {pat!r} matches no trainable parameter of the model{_closest(pat, flat)}")


# ---------------------------------------------------------------------- wrappers
# Attribute names under which wrappers hold the real module: torch.compile's OptimizedModule
# (_orig_mod), FSDP1 (_fsdp_wrapped_module), activation checkpointing (_checkpoint_wrapped_module),
# Lightning Fabric (_forward_module). DDP, DataParallel and DeepSpeed use "module", a name real
# models use too, so it counts only where its parent is a pure wrapper (that one child, no parameters).
WRAPPER_ATTRS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module")


def _wrapper_segments(model: nn.Module) -> set[str]:
    """Qualified module names that are the inner module of a wrapper (their last segment is dropped)."""
    out: set[str] = set()
    for name, module in model.named_modules():
        children = list(module.named_children())
        for child_name, _ in children:
            if child_name in WRAPPER_ATTRS or (
                child_name == "module" and len(children) == 1 and not list(module.parameters(recurse=False))
            ):
                out.add(f"{name}.{child_name}" if name else child_name)
    return out


def strip_wrappers(name: str, wrapped: set[str]) -> str:
    """``name`` without the segments wrappers add (``_orig_mod.``, DDP's ``module.``, FSDP's ...)."""
    parts = name.split(".")
    keep = []
    for i, seg in enumerate(parts):
        if ".".join(parts[: i + 1]) in wrapped:
            continue
        keep.append(seg)
    return ".".join(keep)


def _generic_pattern(name: str) -> str:
    """``model.layers.3.mlp.gate.weight`` -> ``model.layers.*.mlp.gate.weight`` (the rule for every layer)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


# ---------------------------------------------------------------------- rules by module
ROUTER_WHY = "MoE router: AdamW (judgment call: its E x H logits score experts, like a small output head)"


class _Role(NamedTuple):
    algorithm: str  # "muon" or "adamw"
    view: str  # the Muon view this tensor has when routed to Muon ("-" if none)
    reason: str


def _is_transformers_conv1d(module: nn.Module, p: torch.Tensor) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ W + b with W stored (nx, nf) = (in, out)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and p.ndim == 2 and p.shape[1] == module.nf


def _is_expert_module(module: nn.Module, local: str) -> bool:
    return (
        hasattr(module, "is_transposed")  # transformers' @use_experts_implementation stacks
        or "expert" in type(module).__name__.lower()
        or "expert" in local.lower()
    )


_ROUTER_CLASS = re.compile(r"router|moegate|top\d*k?gate|topk.*gate|gating", re.IGNORECASE)
_ROUTER_NAMES = ("gate", "router", "gating", "wg", "gate_network")


class _Context:
    """What the rules need to know about the whole model: module names, parents, the input layer."""

    def __init__(self, model: nn.Module, wrapped: set[str]):
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}
        self.wrapped = wrapped
        self.input_layers: set[int] = set()
        first_conv = next((m for m in self.modules.values() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if first_conv is not None and _is_patchify(first_conv):
            self.input_layers.add(id(first_conv))
        for name, m in self.modules.items():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and "patch_embed" in strip_wrappers(name, wrapped).lower():
                self.input_layers.add(id(m))

    def name(self, module: nn.Module) -> str:
        return self.names.get(id(module), "")

    def is_router(self, module: nn.Module) -> bool:
        if _ROUTER_CLASS.search(type(module).__name__):
            return True
        name = self.name(module)
        parent_name, _, last = name.rpartition(".")
        if last not in _ROUTER_NAMES:
            return False
        parent = self.modules.get(parent_name) if name else None
        return parent is not None and any("expert" in child.lower() for child, _ in parent.named_children() if child != last)


def _is_patchify(conv: nn.modules.conv._ConvNd) -> bool:
    """A convolution that cuts non-overlapping patches (stride == kernel > 1): a patch embedding."""
    return not conv.transposed and tuple(conv.stride) == tuple(conv.kernel_size) and max(conv.kernel_size) > 1


def _vector(shape: Sequence[int]) -> bool:
    return 1 in tuple(shape)


VECTOR_WHY = "1 x n: a vector, not a matrix (msign would only normalize it)"


def _role(owner_list: list[tuple[nn.Module, str, str]], p: torch.Tensor, name: str, ctx: _Context) -> _Role:
    """What the module that owns ``p`` does with it: the algorithm, the Muon view and why."""
    generic = _generic_pattern(strip_wrappers(name, ctx.wrapped))
    to_muon = f"muon=[{generic!r}] routes it to Muon"
    for module, local, _ in owner_list:
        if isinstance(module, nn.MultiheadAttention):
            if local == "in_proj_weight":
                e = module.embed_dim
                return _Role("muon", f"split:{e},{e},{e}", "fused q/k/v projection (split)")
            if local in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                return _Role("muon", "matrix", "attention projection")
        if isinstance(module, nn.Linear) and local == "weight":
            if ctx.is_router(module):
                return _Role("adamw", "matrix", f"{ROUTER_WHY}; {to_muon}")
            if _vector(p.shape):
                what = "gate" if "gate" in ctx.name(module).rsplit(".", 1)[-1] else "Linear"
                return _Role("adamw", "matrix", f"{what} weight shaped {p.shape[0]} x {p.shape[1]}: {VECTOR_WHY[7:]}")
            if id(module) in ctx.input_layers:
                return _Role("adamw", "matrix", f"input layer (patch embedding): AdamW like the embedding; {to_muon}")
            if ctx.name(module).rsplit(".", 1)[-1] == "dt_proj":
                # Mamba's Δ projection (dt_rank -> channels) sets each channel's discretization step
                # together with its bias; like A_log and D it is an SSM parameter, not a feature map
                return _Role("adamw", "matrix", f"SSM Δ (dt) projection: AdamW (judgment call, like A_log and D); {to_muon}")
            return _Role("muon", "matrix", "hidden Linear weight")
        if _is_transformers_conv1d(module, p) and local == "weight":
            nx, nf = p.shape
            if _vector(p.shape):
                return _Role("adamw", "T", f"Conv1D weight shaped {nx} x {nf}: {VECTOR_WHY[7:]}")
            parent = ctx.modules.get(ctx.name(module).rpartition(".")[0])
            e = getattr(parent, "embed_dim", 0) if parent is not None else 0
            if ctx.name(module).endswith("c_attn") and e and nf % e == 0 and nf // e in (2, 3):
                return _Role("muon", "T:split:" + ",".join([str(e)] * (nf // e)),
                             "Conv1D fused q/k/v, stored (in, out): transposed, split")
            return _Role("muon", "T", "Conv1D weight, stored (in, out): transposed")
        if isinstance(module, nn.modules.conv._ConvNd) and local == "weight":
            view = "T:flatten" if module.transposed else "flatten"
            logical = matrix_shapes(tuple(p.shape), view)[0][1:]
            if module.groups > 1 and module.groups == module.in_channels:
                return _Role("adamw", view, f"depthwise conv kernel (one filter per channel, no matmul); {to_muon}")
            if id(module) in ctx.input_layers:
                return _Role("adamw", view, f"input layer (patch embedding conv): AdamW like the embedding; {to_muon}")
            if _vector(logical):
                return _Role("adamw", view, f"conv kernel shaped {logical[0]} x {logical[1]}: {VECTOR_WHY[7:]}")
            if module.transposed:
                return _Role("muon", view, "transposed conv kernel, stored (in, out, k...): flattened, transposed")
            if module.groups > 1:
                return _Role("muon", view, f"grouped conv kernel ({module.groups} groups, flattened together)")
            return _Role("muon", view, "conv kernel (flattened)")
        if isinstance(module, nn.RNNBase) and local.startswith("weight") and p.ndim == 2:
            return _Role("muon", "matrix", "recurrent layer weight")
        if _is_expert_module(module, local) and p.ndim == 3:
            transposed = bool(getattr(module, "is_transposed", False))
            view, how = ("experts:T", ", stored (E, in, out): transposed") if transposed else ("experts", "")
            fan_out = p.shape[2] if transposed else p.shape[1]
            # transformers' fused [gate; up] stacks (is_concatenated) split in two, like separate gate_proj
            # and up_proj Linears; interleaved ones (gpt-oss) cannot be cut into regions and stay whole
            if ("gate_up" in local and getattr(module, "has_gate", False)
                    and getattr(module, "is_concatenated", False) and fan_out % 2 == 0):
                half = fan_out // 2
                view, how = f"{view}:split:{half},{half}", how + ", fused gate/up: split"
            return _Role("muon", view, f"expert stack ({p.shape[0]} batched matmuls){how}")
        if _is_expert_module(module, local) and p.ndim == 2 and "bias" in local:
            return _Role("adamw", "-", "expert bias stack (E, out)")
        if ctx.is_router(module) and p.ndim == 2:
            return _Role("adamw", "matrix", f"{ROUTER_WHY}; {to_muon}")
    # a raw parameter that no known matmul module multiplies
    view = auto_view(p.shape)
    low = name.rsplit(".", 1)[-1].lower()
    mod_types = " ".join(type(m).__name__.lower() for m, _, _ in owner_list)
    if any(k in low for k in ("cls_token", "class_token", "dist_token", "mask_token", "register")):
        what = "class/register token"
    elif "bias_table" in low or "rel_pos" in low or "relative" in low:
        what = "relative-position bias table"
    elif "pos" in low:
        what = "position embedding"
    elif any(k in mod_types for k in ("mamba", "mixer", "ssm")) and (low in ("a_log", "a", "d") or low.startswith("dt")):
        what = "SSM parameter"
    else:
        what = f"{p.ndim}-D tensor"
    return _Role("adamw", view, f"{what}, not multiplied by a known matmul module; {to_muon}")


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
        model: the module whose parameters to route (wrapped or not: torch.compile, DDP, FSDP).
        adamw / muon: glob patterns of parameter names forced to that algorithm.
        head: ``"auto"`` (tied to an embedding, a conventional head name, or the last Linear),
            a name pattern or list of them naming the head module(s)/weights, or ``None`` (no head).
        views: ``{pattern: view}`` logical views for Muon parameters, e.g.
            ``{"blocks.*.attn.wq.weight": "heads:8"}`` (Muon Split) or ``{"*.w_in": "experts:T"}``.
        lr / adamw_lr: learning rates set on the groups (else the optimizer's defaults apply).
        nonmatrix: algorithm for 0-D/1-D tensors: ``"adamw"`` (default) or ``"rms"`` (seed 002).

    Patterns match a parameter's full name or its name without wrapper prefixes (``_orig_mod.``,
    DDP's ``module.``, FSDP's ``_fsdp_wrapped_module.``); the groups keep the full names.

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
    wrapped = _wrapper_segments(model)
    ctx = _Context(model, wrapped)

    # every (module, local name, param) with its qualified name; a tied parameter keeps its first name
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    all_owner_modules: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{local}" if mod_name else local
            owners.setdefault(id(p), (full, module, local))
            all_owner_modules.setdefault(id(p), []).append((module, local, full))

    named = [(owners[id(p)][0], p) for p in _unique_params(model)]
    spell = {n: (n, strip_wrappers(n, wrapped)) for n, _ in named}  # full name, name without wrappers
    trainable = [spell[n] for n, p in named if p.requires_grad]
    _check_patterns(adamw, trainable, "adamw")
    _check_patterns(muon, trainable, "muon")
    _check_patterns(views.keys(), trainable, "views")
    both = [n[0] for n in trainable if any(_matches(n, p) for p in adamw) and any(_matches(n, p) for p in muon)]
    if both:
        raise ValueError(f"parameters matched by both adamw and muon patterns: {both}")

    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    head_ids, head_reason = _find_heads(model, head, embed_ids, wrapped)

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
        names = spell[name]
        owner_list = all_owner_modules[id(p)]
        view = next((v for pat, v in views.items() if _matches(names, pat)), None)
        if any(_matches(names, pat) for pat in adamw):
            add("adamw", name, p, "-", "user override (adamw pattern)")
            continue
        if any(_matches(names, pat) for pat in muon):
            if p.ndim < 2:
                raise ValueError(f"muon pattern matched {name} with shape {tuple(p.shape)}; Muon needs 2-D+ tensors")
            natural = _role(owner_list, p, name, ctx).view
            v = view or (natural if natural != "-" else auto_view(p.shape))
            check_view(v, p.shape, name)
            add("muon", name, p, v, "user override (muon pattern)" + (" (user view)" if view else ""))
            continue
        if id(p) in embed_ids:
            tied = " (tied to the output head)" if id(p) in head_ids else ""
            low = names[1].lower()
            kind = ("relative-position bias table (embedding)" if "relative" in low or "rel_pos" in low
                    else "position embedding" if re.search(r"(^|[._])(wpe|pos|position)", low) else "embedding")
            add("adamw", name, p, "-", kind + tied)
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
        role = _role(owner_list, p, name, ctx)
        if role.algorithm == "adamw":
            add("adamw", name, p, "-", role.reason)
            continue
        v = view or role.view
        check_view(v, p.shape, name)
        add("muon", name, p, v, role.reason + (" (user view)" if view else ""))

    if views:
        muon_names = [spell[n] for n in groups.get("muon", {}).get("param_names", [])]
        for pat in views:
            if not any(_matches(n, pat) for n in muon_names):
                raise ValueError(
                    f"views pattern {pat!r} matches no parameter routed to Muon (add a muon=[...] pattern "
                    "to route a parameter there first)"
                )

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


def _in_repeated_block(name: str, modules: dict[str, nn.Module]) -> bool:
    """True when a module path passes through an ``nn.ModuleList`` (the model's repeated layers)."""
    parts = name.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), nn.ModuleList) for i in range(1, len(parts)))


def _find_heads(model: nn.Module, head: Union[str, Sequence[str], None], embed_ids: set[int],
                wrapped: set[str] = frozenset()) -> tuple[set[int], dict[int, str]]:  # type: ignore[assignment]
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
        spelled = lambda n: (n, strip_wrappers(n, wrapped))  # noqa: E731
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
        for pat in patterns:
            hit = False
            for n, m in linears:
                if _matches(spelled(n), pat) or _matches(spelled(f"{n}.weight"), pat):
                    mark(m, "output head (named by user)")
                    hit = True
            for n, p in model.named_parameters():
                if _matches(spelled(n), pat) and id(p) not in ids:
                    ids.add(id(p))
                    reasons[id(p)] = "output head (named by user)"
                    hit = True
            if not hit:
                flat = names + [strip_wrappers(n, wrapped) for n in names]
                raise ValueError(f"head pattern {pat!r} matches no module or parameter{_closest(pat, flat)}")
        return ids, reasons
    for n, m in linears:
        if id(m.weight) in embed_ids:
            mark(m, "output head (tied to an embedding)")
    for n, m in linears:
        if n.split(".")[-1] in DEFAULT_HEAD_NAMES and id(m.weight) not in ids:
            mark(m, f"output head (named '{n.split('.')[-1]}')")
    if not ids and linears:
        modules = dict(model.named_modules())
        outside = [(n, m) for n, m in linears if not _in_repeated_block(n, modules)]
        if outside:
            n, m = outside[-1]
            mark(m, "output head (last Linear layer)")
    return ids, reasons
