"""Layer 3: ``muonlab.Muon``, one torch.optim.Optimizer for a whole model.

Each param group has an ``algorithm``: ``"muon"`` (orthogonalized momentum for matrices),
``"adamw"`` (the auxiliary AdamW for embeddings, head, norms and biases) or ``"rms"`` (seed 002's
RMS-normalized momentum for non-matrix tensors). Muon matrices of the same logical shape and
orthogonalization settings are stacked and orthogonalized as one batch.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed as _dist
from .coefficients import resolve_schedule
from .orthogonalize import (METHODS, POLYNOMIAL_METHODS, method_flops, min_max, orthogonalize_raw, prescale_stack,
                            resolve_dtype)
from .routing import ParamGroups, RouteRow, RoutingReport, describe_matrices, muon_param_groups
from .updates import (
    ADJUST_LR_MODES,
    MOMENTUM_FORMS,
    adamw_multi_,
    adamw_step_,
    adjust_lr_scale,
    apply_weight_decay_,
    fused_adamw_available,
    momentum_direction,
    normuon_row_scale,
    rms_step_,
    stochastic_round_,
)
from .views import auto_view, blocks, check_view, matrix_boxes, matrix_shapes

ALGORITHMS = ("muon", "adamw", "rms")
NONFINITE_POLICIES = ("raise", "skip", "propagate")
_BY_SHAPE = "by shape (no module given)"

_DTYPE_TO_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


class NonFiniteGradientError(RuntimeError):
    """Raised (by default) when a gradient holds NaN or inf; no state was modified."""


class Muon(Optimizer):
    r"""Muon for hidden matrices plus AdamW for everything else, in one optimizer.

    For a Muon parameter with gradient :math:`G_t` and logical matrices of shape (a, b):

    .. math::
        B_t &= \mu B_{t-1} + (1-\mu) G_t                 && \text{(EMA momentum; ``momentum_form="sum"``: } \mu B_{t-1} + G_t) \\
        U_t &= \mathrm{lerp}(G_t, B_t, \mu) \text{ if nesterov else } B_t \\
        O_t &= \mathrm{msign}(U_t) \approx U V^\top     && \text{(``ns_method``, ``ns_coefficients``, ``ns_steps``)} \\
        O_t &\leftarrow \mathrm{NorMuon}(O_t)             && \text{(optional, per-row second moment, Frobenius norm kept)} \\
        \theta_t &= \theta_{t-1}(1 - \eta\lambda) - \eta \cdot s(a, b) \cdot O_t

    where :math:`s(a, b)` is ``adjust_lr_fn``: ``"original"`` :math:`\sqrt{\max(1, a/b)}`,
    ``"match_rms_adamw"`` :math:`0.2\sqrt{\max(a, b)}`, ``"spectral"`` :math:`\sqrt{a/b}`,
    ``"none"`` 1. Under ``"original"``/``"none"``, ``lr`` is (up to the Newton-Schulz band, e.g.
    0.7-1.2 for Keller's quintic; exactly with ``ns_method="svd"``) the spectral norm of the step of
    a square matrix, an update RMS of about lr/sqrt(n); under ``"match_rms_adamw"`` it is an
    AdamW-like learning rate (update RMS ≈ 0.2·lr).

    AdamW groups follow ``torch.optim.AdamW`` exactly (bias correction, decoupled decay).

    fp16/bf16 parameters keep fp32 state; every update is computed in fp32 (fp64 for fp64
    parameters) and rounded into the parameter once.

    Args:
        params: an ``nn.Module`` (routed by :func:`muonlab.muon_param_groups`), named parameters
            ``(name, tensor)``, plain tensors, or param-group dicts with an ``algorithm`` key.
            Without a module, 2-D+ tensors go to Muon and the rest to AdamW (with a warning:
            embeddings and the head cannot be recognized from a tensor alone).
        lr: Muon learning rate (default 0.02, Keller Jordan's setting).
        momentum: μ in [0, 1) (default 0.95). nesterov: Nesterov momentum (default True).
        weight_decay: decoupled weight decay λ for Muon groups (default 0).
        ns_method, ns_coefficients, ns_steps, ns_dtype, eps: passed to
            :func:`muonlab.orthogonalize` as method, coefficients, steps, dtype, eps.
        adjust_lr_fn: ``"original"`` (default), ``"match_rms_adamw"``, ``"spectral"``, ``"none"``.
        momentum_form: ``"ema"`` (torch.optim.Muon) or ``"sum"`` (the seeds).
        cautious_weight_decay: decay only where update and weight agree in sign.
        clip_momentum_norm: if set, the momentum buffer is rescaled to at most this norm (seed 002).
        normuon, normuon_beta2: NorMuon's per-neuron normalization (seed 004; Li et al. 2025,
            arXiv:2510.05491) and its β2. On by default: in the lab's league (BPE-2048, 2 seeds, lr
            swept) it beat plain Muon at two model sizes on every seed and learning rate, at almost
            no extra step time (docs/lab.md). ``normuon=False`` is plain Muon (K. Jordan;
            torch.optim.Muon's update).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults for AdamW groups.
        nonfinite: policy for NaN/inf gradients: ``"raise"`` (default; raises
            :class:`NonFiniteGradientError` before any state is touched), ``"skip"`` (the whole
            step is skipped and counted in ``skipped_steps``) or ``"propagate"`` (no check).
            A finite gradient whose square would overflow the state (an element above
            sqrt(max of the state dtype)/2, about 9.2e18 for fp32/bf16 state) counts as non-finite.
        state_dtype: dtype of the Muon momentum, the AdamW moments and the RMS momentum: ``None``
            (default: the parameter's dtype widened to at least fp32), ``"fp32"``, ``"bf16"`` (half
            the bytes; the arithmetic stays fp32 and each new value is rounded stochastically into
            the state, from a generator seeded by the parameter's position and its rounding count,
            so resuming from a checkpoint is exact) or ``"fp64"``; torch dtypes are accepted too.
            Overridable per param group. fp16 is refused: its range is too small for Adam's moments.
        batched: stack same-shape matrices into one orthogonalization (default True); False is the
            per-matrix reference loop.
        batch_max_elements: most elements per stacked call (default: on CPU about 2**20 per intra-op
            thread, in a multiple of the thread count of matrices; 2**28 on CUDA).
        foreach: use ``torch._foreach`` kernels for the momentum update and the AdamW groups
            (default: True); False runs the per-parameter reference loops.
        fused: the AdamW groups through ``torch._fused_adamw_`` (one kernel per device and dtype):
            None (default) where it exists for the device and dtype, else foreach kernels; False
            always foreach; True requires it. No path reads a value back to the host per parameter.
        compile: orthogonalize through ``torch.compile`` (see :func:`muonlab.orthogonalize`):
            fused normalization and elementwise work, fewer kernel launches on GPUs. The first
            step pays the compilation (tens of seconds); numbers equal the eager path to rounding.
        track_stats: record per-parameter statistics in ``last_stats`` after each step.
        process_group: the ``torch.distributed`` group to spread orthogonalization over (see
            :mod:`muonlab.distributed`). Default: the world group when ``torch.distributed`` is
            initialized, else single-process. ``False`` forces single-process behaviour. Each
            logical matrix is orthogonalized by one owner rank (FLOP-balanced) and the results
            are all-gathered; DDP, replicated parameters and FSDP2 (DTensor) parameters work.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from muonlab import Muon
        >>> model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 100))
        >>> opt = Muon(model, lr=0.02, adamw_lr=3e-3)
        >>> [row.algorithm for row in opt.routing_report().rows]
        ['muon', 'adamw', 'adamw', 'adamw', 'adamw']
        >>> loss = model(torch.randint(0, 100, (4, 8))).logsumexp(-1).mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        *,
        ns_method: str = "auto",
        ns_coefficients: Any = "keller",
        ns_steps: int = 5,
        ns_dtype: Union[str, torch.dtype, None] = None,
        eps: float = 1e-7,
        adjust_lr_fn: Optional[str] = "original",
        momentum_form: str = "ema",
        cautious_weight_decay: bool = False,
        clip_momentum_norm: Optional[float] = None,
        normuon: bool = True,
        normuon_beta2: float = 0.95,
        adamw_lr: Union[float, Tensor] = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        nonfinite: str = "raise",
        state_dtype: Union[str, torch.dtype, None] = None,
        batched: bool = True,
        batch_max_elements: Optional[int] = None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        compile: bool = False,
        track_stats: bool = False,
        process_group: Any = None,
        dist_bucket_bytes: Optional[int] = None,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        self._adamw_defaults = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
        }
        _validate_adamw(self._adamw_defaults, "adamw defaults")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_method=ns_method,
            ns_coefficients=_freeze(ns_coefficients),
            ns_steps=ns_steps,
            ns_dtype=_dtype_name(ns_dtype),
            eps=eps,
            adjust_lr_fn=adjust_lr_fn if adjust_lr_fn is not None else "original",
            momentum_form=momentum_form,
            cautious_weight_decay=cautious_weight_decay,
            clip_momentum_norm=clip_momentum_norm,
            normuon=normuon,
            normuon_beta2=normuon_beta2,
            state_dtype=_state_dtype_name(state_dtype, "Muon"),
            algorithm="muon",
        )
        _validate_muon(defaults, "Muon defaults")
        self.nonfinite = nonfinite
        self.batched = batched
        if batch_max_elements is not None and (isinstance(batch_max_elements, bool) or batch_max_elements < 1):
            raise ValueError(f"batch_max_elements must be a positive int or None, got {batch_max_elements!r}")
        self.batch_max_elements = batch_max_elements
        self._threads = torch.get_num_threads()  # intra-op threads, for the CPU stack limit (_batch_limit)
        self._workspaces: dict[tuple, Tensor] = {}  # scratch memory reused from step to step (_workspace)
        self.foreach = True if foreach is None else foreach
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.compile = compile
        self.track_stats = track_stats
        if dist_bucket_bytes is not None and (isinstance(dist_bucket_bytes, bool) or not isinstance(dist_bucket_bytes, int)
                                              or dist_bucket_bytes < 1):
            raise ValueError(f"dist_bucket_bytes must be a positive int or None, got {dist_bucket_bytes!r}")
        self.process_group = process_group
        self.dist_bucket_bytes = dist_bucket_bytes
        self.last_dist_times: dict[str, float] = {}  # distributed: this rank's last step
        self.last_shard_plan: Optional[_dist.ShardPlan] = None  # distributed: the plan of the last step
        self._plan_cache: Optional[tuple[Any, _dist.ShardPlan]] = None
        self.last_stats: dict[str, dict[str, float]] = {}
        self.skipped_steps = 0
        self._reasons: dict[str, str] = {}
        self._frozen: list[tuple[str, tuple[int, ...]]] = []
        self._warned_plain = False
        groups = self._normalize_params(params)
        super().__init__(groups, defaults)

    # ------------------------------------------------------------------ construction helpers
    def _normalize_params(self, params: Any) -> list[dict[str, Any]]:
        if isinstance(params, nn.Module):
            params = muon_param_groups(params)
        if isinstance(params, ParamGroups):
            self._frozen = list(params.frozen)
        if isinstance(params, Tensor):
            raise TypeError(
                "params should be an nn.Module or an iterable of Tensors, (name, Tensor) pairs or dicts, "
                f"but got a single Tensor of shape {tuple(params.shape)}"
            )
        items = list(params)
        if not items:
            raise ValueError("Muon got an empty parameter list")
        if all(isinstance(x, dict) for x in items):
            groups = []
            for g in items:
                groups.extend(self._split_unlabeled_group(dict(g)))
            return groups
        if any(isinstance(x, dict) for x in items):
            raise TypeError("params mixes param-group dicts with tensors; pass one kind")
        return self._split_unlabeled_group({"params": items})

    def _split_unlabeled_group(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        if "algorithm" in group:
            return [group]
        tensors = group["params"]
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        tensors = list(tensors)
        matrices = [t for t in tensors if (t[1] if isinstance(t, tuple) else t).ndim >= 2]
        others = [t for t in tensors if (t[1] if isinstance(t, tuple) else t).ndim < 2]
        if matrices and not self._warned_plain:
            warnings.warn(
                "Muon received parameters without a module or an 'algorithm': every 2-D+ tensor goes to "
                "Muon and the rest to AdamW. Embeddings and the output head cannot be recognized this way; "
                "pass the model (Muon(model)) or muon_param_groups(model) to keep them on AdamW.",
                UserWarning,
                stacklevel=4,
            )
            self._warned_plain = True
        out = []
        extra = {k: v for k, v in group.items() if k != "params"}
        if matrices:
            out.append({**extra, "params": matrices, "algorithm": "muon", "routing": [_BY_SHAPE] * len(matrices)})
        if others:
            adam_extra = {k: v for k, v in extra.items() if k not in ("lr", "weight_decay", "eps")}
            out.append({**adam_extra, "params": others, "algorithm": "adamw", "routing": [_BY_SHAPE] * len(others)})
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        alg = group.get("algorithm", "muon")
        if alg not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {alg!r} in param group; valid: {list(ALGORITHMS)}")
        group["algorithm"] = alg
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        names = group.pop("param_names", None)
        tensors = []
        explicit_names = []
        for i, p in enumerate(params):
            if isinstance(p, tuple):
                explicit_names.append(p[0])
                p = p[1]
            tensors.append(p)
        if explicit_names:
            names = explicit_names
        if names is None:
            base = len(self.param_groups)
            names = [f"group{base}.param{i}" for i in range(len(tensors))]
        if len(names) != len(tensors):
            raise ValueError(f"param_names has {len(names)} entries for {len(tensors)} parameters")
        reasons = group.pop("routing", None) or [""] * len(tensors)
        if alg in ("adamw", "rms"):
            for k, v in self._adamw_defaults.items():
                if alg == "rms" and k == "betas":
                    continue
                group.setdefault(k, v)
        for name, p in zip(names, tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"parameter {name} is a {type(p).__name__}, not a Tensor")
            if p.is_complex():
                raise TypeError(f"parameter {name} with shape {tuple(p.shape)} is complex ({p.dtype}); Muon supports real tensors only")
            if not p.is_floating_point():
                raise TypeError(f"parameter {name} with shape {tuple(p.shape)} has non-floating dtype {p.dtype}")
        if alg == "muon":
            views = list(group.get("views") or [])
            if not views:
                view_default = group.get("view")
                views = [view_default or _default_view(name, p) for name, p in zip(names, tensors)]
            if len(views) != len(tensors):
                raise ValueError(f"'views' has {len(views)} entries for {len(tensors)} parameters")
            for name, p, v in zip(names, tensors, views):
                if p.ndim < 2:
                    raise ValueError(
                        f"parameter {name} with shape {tuple(p.shape)} is {p.ndim}-D but is in a Muon group; "
                        "Muon orthogonalizes matrices. Put it in an 'adamw' or 'rms' group."
                    )
                check_view(v, p.shape, name)
            group["views"] = views
        else:
            group["views"] = ["-"] * len(tensors)
        group.pop("view", None)
        group["params"] = list(zip(names, tensors))
        for name, r in zip(names, reasons):
            self._reasons[name] = r or ("group algorithm" if "algorithm" in param_group else _BY_SHAPE)
        super().add_param_group(group)
        g = self.param_groups[-1]
        try:
            g["state_dtype"] = _state_dtype_name(g.get("state_dtype"), f"param group {len(self.param_groups) - 1}")
            if alg == "muon":
                _validate_muon(g, f"param group {len(self.param_groups) - 1}")
                g["ns_coefficients"] = _freeze(g["ns_coefficients"])
                g["ns_dtype"] = _dtype_name(g["ns_dtype"])
                g["adjust_lr_fn"] = g["adjust_lr_fn"] if g["adjust_lr_fn"] is not None else "original"
            elif alg == "adamw":
                _validate_adamw(g, f"param group {len(self.param_groups) - 1}")
            else:
                _validate_rms(g, f"param group {len(self.param_groups) - 1}")
        except (ValueError, TypeError):
            # an invalid group must not stay behind in the optimizer (its parameters stay free)
            self.param_groups.pop()
            for name in names:
                self._reasons.pop(name, None)
            raise

    # Optimizer.__getstate__ keeps only defaults/state/param_groups; deepcopy and pickle would drop
    # these attributes and step() would fail with AttributeError.
    _EXTRA_STATE = {
        "nonfinite": "raise", "batched": True, "batch_max_elements": None, "foreach": True, "fused": None, "compile": False, "track_stats": False, "last_stats": {},
        "skipped_steps": 0, "_reasons": {}, "_frozen": [], "_warned_plain": False,
        "process_group": None, "last_dist_times": {}, "dist_bucket_bytes": None, "last_shard_plan": None,
        "_plan_cache": None, "_ordinals": None, "_workspaces": {},
    }

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in (*self._EXTRA_STATE, "_adamw_defaults"):
            if key in ("_plan_cache", "last_shard_plan", "_ordinals", "_workspaces"):
                continue  # rebuilt on the next step (holds process-group ranks, not state)
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in self._EXTRA_STATE.items():
            if key not in self.__dict__:
                self.__dict__[key] = value.copy() if isinstance(value, (dict, list)) else value
        # older state_dicts: fill options added later with their defaults (with the value they had then,
        # where the default has changed since: a checkpoint without "normuon" was plain Muon)
        for i, group in enumerate(self.param_groups):
            alg = group.setdefault("algorithm", "muon")
            group.setdefault("state_dtype", None)
            for key, value in self.defaults.items():
                if alg == "muon" or key not in ("momentum", "ns_method", "ns_coefficients", "ns_steps"):
                    group.setdefault(key, _LEGACY_DEFAULTS.get(key, value))
            if "views" not in group:
                group["views"] = [auto_view(p.shape) if alg == "muon" else "-" for p in group["params"]]
            if alg in ("adamw", "rms"):
                for k, v in getattr(self, "_adamw_defaults", {}).items():
                    group.setdefault(k, v)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; a group whose algorithm, size or state shapes differ, and state holding NaN/inf,
        raise ValueError naming the parameter (and the state key); the optimizer is unchanged then.

        State tensors take this optimizer's ``state_dtype`` (by default fp32 for fp16/bf16
        parameters), converted from the saved tensors: a bf16 checkpoint widens exactly into fp32
        state, an fp32 one is rounded to nearest into bf16 state. The groups keep their own
        ``state_dtype``; every other option comes from the checkpoint, as in torch.optim."""
        if not isinstance(state_dict, Mapping):
            raise TypeError("load_state_dict expects the dict that Muon.state_dict() returns (with 'state' and "
                            f"'param_groups'), got a {type(state_dict).__name__}")
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            keys = sorted(map(str, state_dict))
            shown = f"{keys[:8]}{' ...' if len(keys) > 8 else ''}"
            if len(missing) == 2 and state_dict and all(isinstance(v, Tensor) for v in state_dict.values()):
                raise ValueError(f"this is not an optimizer state_dict: it has neither 'state' nor 'param_groups' but "
                                 f"tensors named {shown}; it looks like a model's state_dict (use model.load_state_dict)")
            raise ValueError(f"optimizer state_dict has no {missing[0]!r} entry (keys: {shown}); "
                             "pass what Muon.state_dict() returned")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        saved_state = state_dict["state"]
        pairs = []  # (group, name, parameter, saved state or None)
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} has {len(group['params'])} parameters but the saved group has {len(saved['params'])}"
                )
            saved_alg = saved.get("algorithm", "muon")
            if saved_alg != group["algorithm"]:
                raise ValueError(
                    f"param group {gi} ({', '.join(names[:3])}{'...' if len(names) > 3 else ''}) uses algorithm "
                    f"{group['algorithm']!r} but the saved state was made with {saved_alg!r}"
                )
            saved_views = saved.get("views") or group["views"]
            for name, p, pid, view, saved_view in zip(names, group["params"], saved["params"], group["views"], saved_views):
                if group["algorithm"] == "muon" and view != saved_view:
                    raise ValueError(f"parameter {name} with shape {tuple(p.shape)} uses view {view!r} but was saved with {saved_view!r}")
                st = saved_state.get(pid)
                pairs.append((group, name, p, st))
                if not st:
                    continue
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    if key in st and tuple(st[key].shape) != tuple(p.shape):
                        raise ValueError(
                            f"parameter {name}: saved {key} has shape {tuple(st[key].shape)}, parameter has {tuple(p.shape)}"
                        )
                expected_keys = {"muon": "momentum_buffer", "adamw": "exp_avg", "rms": "momentum_buffer"}[group["algorithm"]]
                if expected_keys not in st:
                    raise ValueError(f"parameter {name}: saved state {sorted(st)} lacks {expected_keys!r} for algorithm {group['algorithm']!r}")
                if "normuon_v" in st:
                    rows = sum(k * a for k, a, _ in matrix_shapes(tuple(p.shape), view))
                    if st["normuon_v"].numel() != rows:
                        raise ValueError(f"parameter {name}: saved normuon_v has {st['normuon_v'].numel()} entries, expected {rows}")
                _check_saved_values(name, p, st)
        configured = [g["state_dtype"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        # the state dtype is how this optimizer stores state (like its device), not a hyperparameter
        # of the run: this optimizer's setting wins over the checkpoint's, and the tensors convert
        for g, sd in zip(self.param_groups, configured):
            g["state_dtype"] = sd
        # torch.optim casts floating state to the parameter's dtype (fp16 for an fp16 parameter):
        # take each tensor again from the saved one, in this optimizer's state dtype
        for group, name, p, st in pairs:
            if not st:
                continue
            state = self.state[p]
            for key, value in st.items():
                if not isinstance(value, Tensor) or key == "step" or not value.is_floating_point():
                    continue
                dtype = torch.float32 if key == "normuon_v" else _state_dtype(group, p)
                state[key] = value.to(dtype=dtype, device=p.device)

    # ------------------------------------------------------------------ reporting
    def routing_report(self) -> RoutingReport:
        """A table (``str``) and data (``.rows``) of every parameter's algorithm, view and lr."""
        rows = []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            lr_f = float(lr) if not isinstance(lr, Tensor) else float(lr.item())
            for name, p, view in zip(group["param_names"], group["params"], group["views"]):
                matrices = describe_matrices(tuple(p.shape), view) if group["algorithm"] == "muon" else "-"
                rows.append(RouteRow(name, tuple(p.shape), group["algorithm"], view, matrices, lr_f, self._reasons.get(name, "")))
        for name, shape in self._frozen:
            rows.append(RouteRow(name, shape, "frozen", "-", "-", None, "requires_grad=False (left out)"))
        return RoutingReport(rows)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            n = len(g["params"])
            numel = sum(p.numel() for p in g["params"])
            if g["algorithm"] == "muon":
                opts = (f"lr={_fmt_lr(g['lr'])}, momentum={g['momentum']}, nesterov={g['nesterov']}, "
                        f"weight_decay={g['weight_decay']}, ns={g['ns_method']}:{g['ns_coefficients']}x{g['ns_steps']}, "
                        f"adjust_lr_fn={g['adjust_lr_fn']}" + (", normuon" if g["normuon"] else ""))
            elif g["algorithm"] == "adamw":
                opts = f"lr={_fmt_lr(g['lr'])}, betas={g['betas']}, eps={g['eps']}, weight_decay={g['weight_decay']}"
            else:
                opts = f"lr={_fmt_lr(g['lr'])}, momentum={g['momentum']}, weight_decay={g['weight_decay']}"
            lines.append(f"  group {i} [{g['algorithm']}]: {n} tensors, {numel:,} elements; {opts}")
        lines.append(")")
        return "\n".join(lines)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (momentum, Adam moments, NorMuon vectors, steps)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
        return total

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        pg = _dist.resolve_group(self.process_group)
        ok, allowed = self._grads_ok(pg)
        self._ordinals = None  # rebuilt on demand: parameter positions seed the stochastic rounding
        if not ok:
            return loss
        stats: dict[str, dict[str, float]] = {}
        pending: list[tuple[dict[str, Any], str, Tensor, Tensor, str]] = []  # (group, name, p, direction, view)
        for group in self.param_groups:
            alg = group["algorithm"]
            if alg == "muon":
                pending.extend(self._muon_directions(group, allowed, lazy=pg is None))
            elif alg == "adamw":
                self._adamw_group(group, stats)
            else:
                self._rms_group(group, stats)
        if pending:
            self._muon_apply(pending, stats, pg)
        if self.track_stats:
            self.last_stats = stats
        return loss

    def _grads_ok(self, pg: Any = None) -> tuple[bool, Optional[set[int]]]:
        """Validate gradients before any state is touched; apply the non-finite policy.

        Returns (take the step?, ids of the Muon parameters allowed to step or None for all).
        Under a process group (``pg``), finiteness and which Muon parameters have a gradient are
        agreed across ranks with one all_reduce, so every rank takes the same path.

        A gradient counts as non-finite when it holds NaN/inf *or* when an element is so large
        that the state it feeds would overflow: beyond ``sqrt(max of the state dtype) / 2``
        (about 9.2e18 for fp32 and bf16 state) its square overflows AdamW's second moment (and
        RMS's), and in a Muon momentum buffer it would set the direction for thousands of steps.
        """
        allowed: Optional[set[int]] = None
        grads, names, limits = [], [], []
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None:
                    continue
                _check_grad(name, p)
                g = _dist.local(p.grad)
                if g.numel() == 0:
                    continue  # an empty shard (FSDP): nothing to check on this rank
                grads.append(g)
                names.append(name)
                limits.append(_grad_limit(_state_dtype(group, p)))
        bad: list[str] = []
        if self.nonfinite != "propagate" and grads:
            # max |g| as max(max, -min) from one pass per gradient (orthogonalize.min_max; an inf-norm
            # is 10x slower on CPU); NaN propagates and compares False. Then
            # one comparison per (dtype, limit) and one host sync for all of them.
            kinds: dict[tuple, list[int]] = defaultdict(list)
            for i, (g, lim) in enumerate(zip(grads, limits)):
                kinds[(g.dtype, g.device, lim)].append(i)
            checked = []  # (gradient indices, their max |g| in fp32 or fp64, limit)
            for (_, _, lim), idx in kinds.items():
                pairs = [min_max(grads[i]) for i in idx]
                hi = torch.stack([mm[1] for mm in pairs])
                lo = torch.stack([mm[0] for mm in pairs])
                # compared in fp32 (fp64 where the limit is beyond fp32): an inf in fp16 must not pass
                checked.append((idx, torch.maximum(hi, -lo).to(torch.float64 if lim > _FP32_MAX else torch.float32), lim))
            flags = [(a <= lim).to(grads[0].device) for _, a, lim in checked]
            if not bool((torch.cat(flags) if len(flags) > 1 else flags[0]).all()):  # name each offending one
                found = sorted((i, a[j], lim) for idx, a, lim in checked for j, i in enumerate(idx) if not bool(a[j] <= lim))
                bad = [_describe_bad(names[i], grads[i], v, lim) for i, v, lim in found]
        if pg is not None:  # distributed: agree on finiteness and Muon participation
            muon_params = [p for g in self.param_groups if g["algorithm"] == "muon" for p in g["params"]]
            agreed = _dist.agree([not bad] + [p.grad is not None for p in muon_params], pg)
            allowed = {id(p) for p, ok in zip(muon_params, agreed[1:]) if ok}
            if agreed[0]:
                return True, allowed
            bad = bad or ["(a gradient on another rank)"]
        elif not bad:
            return True, allowed
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            warnings.warn(f"Muon skipped a step: non-finite gradients in {', '.join(bad[:5])}", RuntimeWarning, stacklevel=3)
            return False, allowed
        raise NonFiniteGradientError(
            f"non-finite (NaN/inf, or overflowing the state) gradient in {len(bad)} parameter(s): {'; '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; no parameter or state was changed. "
            "Use Muon(..., nonfinite='skip') to skip such steps or 'propagate' to apply them."
        )

    def _muon_directions(self, group: dict[str, Any], allowed: Optional[set[int]] = None, lazy: bool = False
                         ) -> list[tuple[dict[str, Any], str, Tensor, Tensor, str]]:
        """Momentum update and direction of each Muon parameter with a gradient (and, distributed,
        in ``allowed``: every rank has its gradient).

        ``lazy`` (the single-process step): a Nesterov direction on the foreach path is returned
        unformed (:class:`_Nesterov`) and made one stacked chunk at a time where it is orthogonalized,
        instead of all at once here: a model-sized fresh allocation every step (GPT-2 small: 340 MB)
        costs its page faults again each step on a CPU (measured: 15% of a GPT-2-shapes step).

        The arithmetic runs in the compute dtype (fp32, or fp64 for fp64 parameters): a low-precision
        gradient or momentum buffer is widened first and the new momentum is rounded once into the
        buffer; the direction stays in the compute dtype."""
        mu, nesterov, form = group["momentum"], group["nesterov"], group["momentum_form"]
        items = []
        for name, p, view in zip(group["param_names"], group["params"], group["views"]):
            if p.grad is None or (allowed is not None and id(p) not in allowed):
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=_state_dtype(group, p),
                                                            memory_format=torch.contiguous_format)
                state["step"] = torch.tensor(0.0)
            items.append((name, p, state["momentum_buffer"], view))
        if not items:
            return []
        torch._foreach_add_([self.state[p]["step"] for _, p, _, _ in items], 1)
        clip = group["clip_momentum_norm"]
        widen = any(not (p.dtype == buf.dtype == _compute_dtype(p, buf)) for _, p, buf, _ in items)
        dirs: list[Tensor] = []
        # widened copies are made a chunk at a time, so that bf16 state stays small at the peak too
        for chunk in _chunk_by_numel(items, _WIDEN_CHUNK if widen else None, lambda it: it[1].numel()):
            cdts = [_compute_dtype(p, buf) for _, p, buf, _ in chunk]
            grads = [_as(p.grad, c) for (_, p, _, _), c in zip(chunk, cdts)]
            work = [_as(buf, c) for (_, _, buf, _), c in zip(chunk, cdts)]  # the buffer itself in the compute dtype
            same = len({(g.device, g.dtype) for g in grads}) == 1
            if self.foreach and form == "ema" and clip is None and same:
                # DTensor (FSDP2): the elementwise update runs on the local shards; the other path below
                # keeps DTensors, so that the clipping norm is the global one
                grads_l, work_l = [_dist.local(g) for g in grads], [_dist.local(w) for w in work]
                torch._foreach_lerp_(work_l, grads_l, 1 - mu)
                if nesterov and lazy and not widen:
                    dirs.extend(_Nesterov(g, w, mu) for g, w in zip(grads_l, work_l))
                else:
                    dirs.extend(torch._foreach_lerp(grads_l, work_l, mu) if nesterov else work_l)
            else:
                dirs.extend(momentum_direction(g, w, mu, nesterov, form, clip) for g, w in zip(grads, work))
            for (_, p, buf, _), w in zip(chunk, work):
                if w is not buf:
                    _store(buf, w, self._rounding_generator(p, buf))  # one rounding into the narrower buffer
        return [(group, name, p, d, view) for (name, p, _, view), d in zip(items, dirs)]

    def _muon_apply(self, pending: list[tuple[dict[str, Any], str, Tensor, Tensor, str]],
                    stats: dict[str, dict[str, float]], pg: Any = None) -> None:
        if pg is not None:
            return self._muon_apply_sharded(pending, stats, pg)
        for _, name, p, _, _ in pending:
            if _dist.is_dtensor(p):
                raise ValueError(f"parameter {name} with shape {tuple(p.shape)} is a DTensor but Muon runs without a "
                                 "process group (process_group=False); sharded parameters need the distributed step")
        # 1. bucket every logical matrix by (shape, orthogonalization settings, device, dtype).
        # An fp32/fp64 parameter (without track_stats or cautious decay) is decayed now and takes its
        # update straight from the orthogonalized stack: θ <- θ - lr·scale·O in one pass, NorMuon's row
        # factors folded into the scale. Any other gets an update buffer in the direction's (compute)
        # dtype, finished per parameter in step 3 (a low-precision parameter is rounded once, at the end).
        updates: list[Optional[Tensor]] = []
        buckets: dict[tuple, list[tuple[Tensor, Any]]] = defaultdict(list)
        for group, name, p, d, view in pending:
            direct = (p.dtype in (torch.float32, torch.float64) and not self.track_stats
                      and not group["cautious_weight_decay"])
            if isinstance(d, _Nesterov) and not direct:
                d = d.value()  # the buffered path (and cautious decay) needs the direction itself
            if direct:
                apply_weight_decay_(p, d, group["lr"], group["weight_decay"], False)
                dsts = [_AddInto(b, _step_factor(group["lr"], adjust_lr_scale(b.shape[-2], b.shape[-1], group["adjust_lr_fn"])))
                        for b in blocks(p, view)]
                if group["normuon"]:  # each block's rows of normuon_v, in the order of blocks()
                    for dst, v in zip(dsts, self._normuon_rows(p, [dst.target for dst in dsts])):
                        dst.normuon = (v, group["normuon_beta2"])
                updates.append(None)
            else:
                upd = torch.empty(d.shape, dtype=d.dtype, device=d.device)
                dsts = blocks(upd, view)
                updates.append(upd)
            key_settings = _settings(group)
            for src, dst in zip(d.blocks(view) if isinstance(d, _Nesterov) else blocks(d, view), dsts):
                # tall blocks keep their own layout: orthogonalize iterates them natively (a transposed
                # view would cost a transposing copy when stacked)
                buckets[(tuple(src.shape[-2:]), key_settings, src.device, src.dtype)].append((src, dst))
        # 2. orthogonalize each bucket in stacked chunks (or one matrix at a time: the reference loop)
        for key, pairs in buckets.items():
            self._run_bucket(key, pairs)
        # 3. the other parameters: NorMuon, shape scale, weight decay, the step
        for (group, name, p, _, view), upd in zip(pending, updates):
            if upd is None:
                continue
            lr = group["lr"]  # a tensor lr stays a tensor: no host sync
            blks = blocks(upd, view)
            if group["normuon"]:
                for b, v in zip(blks, self._normuon_rows(p, blks)):
                    b.mul_(normuon_row_scale(b, v, group["normuon_beta2"]).unsqueeze(-1))
            if self.track_stats:
                stats[name] = _ortho_stats(blks)
            for b in blks:
                b.mul_(adjust_lr_scale(b.shape[-2], b.shape[-1], group["adjust_lr_fn"]))
            _apply_update(p, upd, lr, group["weight_decay"], group["cautious_weight_decay"])
            if self.track_stats:
                stats[name]["update_rms"] = float(upd.float().square().mean().sqrt()) * _scalar(lr)

    def _normuon_rows(self, p: Tensor, blks: list[Tensor]) -> list[Tensor]:
        """The (k, a) views of ``p``'s NorMuon second moments (``normuon_v``, one per row of each
        logical matrix, blocks in order), created at zero on first use."""
        state = self.state[p]
        if "normuon_v" not in state:
            rows = sum(b.shape[0] * b.shape[1] for b in blks)
            state["normuon_v"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
        v_all, offset, out = state["normuon_v"], 0, []
        for b in blks:
            k, a = b.shape[0], b.shape[1]
            out.append(v_all[offset:offset + k * a].view(k, a))
            offset += k * a
        return out

    def _muon_apply_sharded(self, pending: list[tuple[dict[str, Any], str, Tensor, Tensor, str]],
                            stats: dict[str, dict[str, float]], pg: Any) -> None:
        """The distributed step (see :mod:`muonlab.distributed`): each logical matrix is
        orthogonalized by its owner from the pieces its holders send, and every rank gets back the
        update of exactly the shard it holds."""
        plan = self._shard_plan(pending, pg)
        me = dist.get_rank(pg)
        dirs, upds, dtypes = [], [], []
        for group, name, p, d, view in pending:
            d_loc, p_loc = _dist.local(d), _dist.local(p)
            buf = _dist.local(self.state[p]["momentum_buffer"])
            d_wire, u_wire = _wire_dtypes(p.dtype, d.dtype)
            if d_loc.dtype != d_wire:
                d_loc = d_loc.to(d_wire)  # a fresh tensor
            # a fresh direction (Nesterov's, or a bf16 copy) takes its own update in place (one buffer,
            # not two); the momentum buffer itself never does
            reuse = d_loc.dtype == u_wire and d_loc.data_ptr() != buf.data_ptr() and d_loc.is_contiguous()
            dirs.append(d_loc)
            upds.append(d_loc if reuse else torch.empty_like(p_loc, dtype=u_wire, memory_format=torch.contiguous_format))
            dtypes.append((d_wire, u_wire))
        rows_of = {}  # NorMuon: (entry, matrix) -> first row of that matrix in the parameter's normuon_v
        for ei, (group, _, p, _, view) in enumerate(pending):
            if group["normuon"]:
                off = 0
                for mi, box in enumerate(matrix_boxes(tuple(p.shape), view)):
                    rows_of[(ei, mi)] = off
                    off += box.logical_shape[0]
                self.state[p].setdefault("normuon_v", torch.zeros(off, dtype=torch.float32, device=_dist.local(p).device))

        def compute(jobs: list[tuple[_dist.MatrixPlan, Tensor, Tensor]]) -> None:
            buckets: dict[tuple, list[tuple[Tensor, Tensor]]] = defaultdict(list)
            for m, src, dst in jobs:
                group = pending[m.entry][0]
                if src.shape[-2] > src.shape[-1]:
                    src, dst = src.mT, dst.mT  # msign(Gᵀ) = msign(G)ᵀ
                buckets[(tuple(src.shape), _settings(group), src.device, src.dtype)].append((src[None], dst[None]))
            for key, pairs in buckets.items():
                self._run_bucket(key, pairs)
            for m, _, dst in jobs:
                group, name, p = pending[m.entry][:3]
                a, b = dst.shape
                if group["normuon"]:
                    v = self.state[p]["normuon_v"]
                    r0 = rows_of[(m.entry, m.index)]
                    dst.mul_(normuon_row_scale(dst, v[r0:r0 + a].view(1, a), group["normuon_beta2"]).view(a, 1))
                if self.track_stats:
                    st = _ortho_stats([dst[None]])
                    acc = owned_stats[m.entry]
                    acc[0] = max(acc[0], st["ortho_residual"])
                    acc[1] = max(acc[1], st["sv_max"])
                    acc[2] = max(acc[2], -st["sv_min"])
                dst.mul_(adjust_lr_scale(a, b, group["adjust_lr_fn"]))
                if self.track_stats:
                    owned_stats[m.entry][3] += float(dst.float().square().sum())

        owned_stats = [[-math.inf, -math.inf, -math.inf, 0.0] for _ in pending]  # residual, sv_max, -sv_min, sum sq
        self.last_dist_times = {}
        _dist.redistribute(plan, dirs, upds, compute, pg, dtypes, self.last_dist_times)
        if rows_of:  # NorMuon state stays replicated: each owner's updated rows reach every rank
            self._sync_normuon(pending, plan, rows_of, me, pg)
        if self.track_stats:  # the same statistics on every rank: each matrix counted once, by its owner
            t = torch.tensor(owned_stats, dtype=torch.float64)
            hi, total = t[:, :3].contiguous(), t[:, 3].contiguous()
            dev = _dist.comm_device(pg)
            hi, total = hi.to(dev), total.to(dev)
            _dist.collective("the statistics all_reduce", lambda: dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=pg), pg)
            _dist.collective("the statistics all_reduce", lambda: dist.all_reduce(total, group=pg), pg)
            for (group, name, p, _, _), h, sq in zip(pending, hi.tolist(), total.tolist()):
                stats[name] = {"ortho_residual": h[0], "sv_min": -h[2], "sv_max": h[1],
                               "update_rms": math.sqrt(sq / max(1, p.numel())) * _scalar(group["lr"])}
        for (group, name, p, _, _), upd in zip(pending, upds):
            lr = group["lr"]
            _apply_update(_dist.local(p), upd, lr, group["weight_decay"], group["cautious_weight_decay"])

    def _shard_plan(self, pending: list[tuple[dict[str, Any], str, Tensor, Tensor, str]], pg: Any) -> _dist.ShardPlan:
        """The plan for this step's participating Muon parameters (cached while they and their
        settings stay the same; every rank decides identically, so no collective is needed)."""
        world = dist.get_world_size(pg)
        budget = self.dist_bucket_bytes or _default_bucket_bytes(pending[0][2].device if pending else torch.device("cpu"))
        key = (id(pg), world, budget, tuple((id(p), view, _settings(g), p.dtype, d.dtype, tuple(_dist.local(p).shape))
                                             for g, _, p, d, view in pending))
        if self._plan_cache is not None and self._plan_cache[0] == key:
            self.last_shard_plan = self._plan_cache[1]
            return self._plan_cache[1]
        entries, elem, submesh = [], [], []
        for group, name, p, d, view in pending:
            layout = _dist.layout_of(p, pg, name)
            d_wire, u_wire = _wire_dtypes(p.dtype, d.dtype)
            entries.append((layout, view, (_settings(group), _dist.local(p).device, d_wire)))
            elem.append((d_wire.itemsize, u_wire.itemsize))
            if _dist.is_submesh(p, pg):
                submesh.append((name, p, layout))
        _dist.check_replicas(submesh, pg)

        def cost(shape: tuple[int, int], k: tuple) -> float:
            settings, device, dtype = k
            return _ortho_flops(((min(shape), max(shape)), settings, device, dtype))

        plan = _dist.build_plan(entries, world, cost, elem, budget, names=[n for _, n, _, _, _ in pending])
        self._plan_cache = (key, plan)
        self.last_shard_plan = plan
        return plan

    def _sync_normuon(self, pending: list, plan: _dist.ShardPlan, rows_of: dict, me: int, pg: Any) -> None:
        """Every rank keeps the whole NorMuon ``normuon_v`` of every parameter; the owner of a matrix
        updated its rows, so one all_reduce(SUM) of (rows owned by this rank, zeros elsewhere) gives
        every rank the exact new values."""
        vs = {ei: self.state[p]["normuon_v"] for ei, (group, _, p, _, _) in enumerate(pending) if group["normuon"]}
        offsets, base = {}, 0
        for ei, v in vs.items():
            offsets[ei], base = base, base + v.numel()
        owned = torch.zeros(base, dtype=torch.bool, device=next(iter(vs.values())).device)
        for m in plan.matrices:
            if m.owner == me and m.entry in vs:
                r0 = offsets[m.entry] + rows_of[(m.entry, m.index)]
                owned[r0:r0 + m.box.logical_shape[0]] = True
        # where(), not a product with the mask: a stale row must not leak (NaN * 0 is NaN)
        flat = torch.where(owned, torch.cat(list(vs.values())), 0.0)
        _dist.collective("the NorMuon state all_reduce", lambda: dist.all_reduce(flat, group=pg), pg)
        for ei, v in vs.items():
            v.copy_(flat[offsets[ei]:offsets[ei] + v.numel()])

    def _run_bucket(self, key: tuple, pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Orthogonalize same-key (source, destination) block stacks in stacked chunks (or one matrix
        at a time: the reference loop), writing into the destinations."""
        _, (method, coeffs, steps, dtype, eps), device, src_dtype = key
        polynomial = method in POLYNOMIAL_METHODS
        schedule = resolve_schedule(coeffs, steps) if polynomial else []
        work_dtype = resolve_dtype(dtype, device, src_dtype)

        def ortho(X: Tensor) -> Tensor:  # the result in the iteration dtype; _emit casts as it writes
            if X.numel() == 0:
                return X.clone()
            return orthogonalize_raw(X, method, schedule, steps, work_dtype, eps, self.compile)

        # eagerly, a stack for the polynomial methods is written prescaled, in the iteration dtype,
        # straight from its sources (no fp32 concatenation first)
        stack_prescaled = (polynomial and work_dtype != torch.float16
                           and not self.compile and not torch.compiler.is_compiling())
        eager = not self.compile and not torch.compiler.is_compiling()
        chunks = _chunk_by_numel(pairs, self._batch_limit(device, math.prod(key[0]))) if self.batched else [[pair] for pair in pairs]
        for chunk in chunks:
            # unformed Nesterov directions are formed here, into a workspace reused from step to step
            srcs = self._form([s for s, _ in chunk]) if eager else [_value(s) for s, _ in chunk]
            if len(chunk) > 1 and self.batched and stack_prescaled and chunk[0][0].numel():
                stack = self._workspace("stack", sum(x.numel() for x in srcs), work_dtype, device)
                O = orthogonalize_raw(prescale_stack(srcs, work_dtype, out=stack), method, schedule,
                                      steps, work_dtype, eps, prescaled=True)
            else:
                X = torch.cat(srcs) if len(chunk) > 1 else srcs[0]
                O = ortho(X) if self.batched else torch.stack([ortho(x) for x in X.unbind(0)])
            offset = 0
            for src, dst in chunk:
                k = src.shape[0]
                _emit(dst, O[offset:offset + k])
                offset += k

    def _workspace(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat tensor of ``numel`` elements kept by the optimizer from step to step (not state: it
        is neither saved nor copied). A fresh CPU allocation of several MB is returned to the system
        when freed and faults its pages in again on the next use: measured, forming GPT-2-small's
        Nesterov directions into fresh memory took 3x as long as the same pass over memory in use.
        On other devices a fresh tensor: CUDA's caching allocator already reuses freed blocks, and
        memory held between steps would be taken from the forward and backward passes."""
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        key = (name, dtype, device)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < numel:
            self._workspaces[key] = buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def _form(self, sources: list) -> list[Tensor]:
        """The chunk's sources as tensors: each unformed Nesterov direction is formed into a slice of
        the "directions" workspace, in its gradient's layout (a transposed block stays transposed)."""
        lazy = [s for s in sources if isinstance(s, _Nesterov)]
        if not lazy:
            return sources
        flat = self._workspace("directions", sum(s.numel() for s in lazy), lazy[0].dtype, lazy[0].device)
        out, offset = [], 0
        for s in sources:
            if isinstance(s, _Nesterov):
                g, n = s.grad, s.numel()
                piece = flat[offset:offset + n]
                dst = piece.view(g.mT.shape).mT if g.dim() >= 2 and not g.is_contiguous() and g.mT.is_contiguous() \
                    else piece.view(g.shape)
                torch.lerp(g, s.buf, s.mu, out=dst)
                offset += n
                s = dst
            out.append(s)
        return out

    def _batch_limit(self, device: torch.device, matrix_numel: int = 1) -> int:
        """Most elements stacked into one orthogonalize() call.

        On CUDA large stacks amortize kernel launches; on CPU a stack beyond a few MB only adds
        allocation and cache traffic (measured: 48 stacked 768x768 matrices were 1.5x slower than a
        loop on a 2-core CPU, 546k page faults vs 58k), so CPU chunks stay small.
        """
        if self.batch_max_elements is not None:
            return self.batch_max_elements
        if device.type == "cuda":
            return 2**28
        # read in eager steps only: under torch.compile the last eager value is a constant of the traced
        # step (torch.get_num_threads() returns an int, which would break the graph)
        if not torch.compiler.is_compiling() or not hasattr(self, "_threads"):
            self._threads = torch.get_num_threads()
        threads = max(1, self._threads)
        # a bf16 matmul of side <= ~1k runs on one thread, a stacked batch on all of them: stack about
        # 2**20 elements per intra-op thread, and at least one matrix per thread. Larger matrices
        # (GPT-2's 768x3072) used to go one at a time, leaving the Gram form's 768x768 products on one
        # thread (2-core AMX CPU, GPT-2-small shapes, interleaved A/B: 1384 -> 1193 ms a step).
        # The matrix count is a multiple of the threads: a CPU bmm shares its batch out among them,
        # and 3 stacked 768x768 fp32 products on 2 threads ran at 138 GFLOP/s against 183 for 2 or 4
        # (2-core AVX2 Zen3; benchmarks/bench_peers.py and docs/performance.md)
        per = max(1, (2**20 * threads) // max(1, matrix_numel))
        return max(threads, per - per % threads) * matrix_numel

    def _rounding_generator(self, p: Tensor, buf: Tensor) -> Optional[torch.Generator]:
        """The random bits for stochastically rounding ``p``'s new state into bf16 (None for other
        state dtypes). Seeded from the parameter's position in the optimizer and how many times its
        state was rounded (``state["rounding_step"]``, saved in checkpoints): deterministic, the same
        on every rank holding the parameter, and exact on resume."""
        if buf.dtype != torch.bfloat16:
            return None
        if self._ordinals is None:
            self._ordinals = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        state = self.state[p]
        k = state.get("rounding_step", 0) + 1
        state["rounding_step"] = k
        gen = torch.Generator(device=_dist.local(buf).device)
        gen.manual_seed(_rounding_seed(self._ordinals[id(p)], k))
        return gen

    def _adamw_group(self, group: dict[str, Any], stats: dict[str, dict[str, float]]) -> None:
        """AdamW on every parameter of the group with a gradient: one fused kernel (or foreach
        kernels) per (device, dtype) bucket, no host synchronisation; ``foreach=False`` runs the
        per-parameter reference loop. Low-precision parameters or state are widened to the compute
        dtype, stepped, and rounded once (stochastically into bf16 state)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        items = []
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            device = _dist.local(p).device
            if "exp_avg" not in state:
                sd = _state_dtype(group, p)
                # the step lives on the parameter's device: fused kernels read it there
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
            elif state["step"].device != device:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)  # an older checkpoint's CPU step
            items.append((name, p, state))
        if not items:
            return
        befores = [(name, p, _dist.local(p).detach().clone()) for name, p, _ in items] if self.track_stats else []
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if not self.foreach:
            for name, p, state in items:  # the reference loop
                state["step"] += 1
                real = [_dist.local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                work = [_as(t, _compute_dtype(p, state["exp_avg"])) for t in real]
                adamw_step_(*work, int(state["step"].item()), **{**hyper, "lr": _scalar(lr)})
                self._store_adamw(p, state, real, work)
        else:
            buckets: dict[tuple, list] = defaultdict(list)
            for name, p, state in items:
                local = _dist.local(p)
                buckets[(local.device, local.dtype, state["exp_avg"].dtype)].append((p, state))
            for (device, p_dtype, s_dtype), members in buckets.items():
                cdt = torch.float64 if torch.float64 in (p_dtype, s_dtype) else torch.float32
                fused = self.fused is not False and fused_adamw_available(device, cdt)
                if self.fused is True and not fused:
                    raise RuntimeError(f"fused=True but torch._fused_adamw_ has no kernel for {cdt} on {device}")
                for chunk in _chunk_by_numel(members, None if p_dtype == s_dtype == cdt else _WIDEN_CHUNK):
                    torch._foreach_add_([st["step"] for _, st in chunk], 1)
                    reals = [[_dist.local(t) for t in (p, p.grad, st["exp_avg"], st["exp_avg_sq"])] for p, st in chunk]
                    works = [[_as(t, cdt) for t in real] for real in reals]
                    adamw_multi_(*[[w[i] for w in works] for i in range(4)], [st["step"] for _, st in chunk],
                                 fused=fused, **hyper)
                    for (p, st), real, work in zip(chunk, reals, works):
                        self._store_adamw(p, st, real, work)
        for name, p, before in befores:
            stats[name] = {"update_rms": float((_dist.local(p) - before).float().square().mean().sqrt())}

    def _store_adamw(self, p: Tensor, state: dict[str, Any], real: list[Tensor], work: list[Tensor]) -> None:
        """Round widened results back: the parameter to nearest, the moments (bf16) stochastically."""
        gen = self._rounding_generator(p, state["exp_avg"]) if work[2] is not real[2] else None
        for i in (0, 2, 3):
            if work[i] is not real[i]:
                _store(real[i], work[i], gen if i else None)

    def _rms_group(self, group: dict[str, Any], stats: dict[str, dict[str, float]]) -> None:
        lr = group["lr"]
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(p, dtype=_state_dtype(group, p))
            state["step"] += 1
            before = p.detach().clone() if self.track_stats else None
            real = [p, p.grad, state["momentum_buffer"]]
            cdt = _compute_dtype(p, state["momentum_buffer"])
            work = [_as(t, cdt) for t in real]
            rms_step_(*work, lr=lr, momentum=group["momentum"], eps=group["eps"], weight_decay=group["weight_decay"])
            gen = self._rounding_generator(p, state["momentum_buffer"])
            for i in (0, 2):
                if work[i] is not real[i]:
                    _store(real[i], work[i], gen if i else None)
            if before is not None:
                stats[name] = {"update_rms": float((p - before).float().square().mean().sqrt())}


# ---------------------------------------------------------------------- helpers
_STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
_STATE_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                        "fp64": "fp64", "float64": "fp64"}


def _state_dtype_name(value: Any, where: str) -> Optional[str]:
    """Validate a ``state_dtype`` and return its canonical name (None, "fp32", "bf16" or "fp64")."""
    if value is None:
        return None
    fp16 = value == torch.float16 if isinstance(value, torch.dtype) else (
        isinstance(value, str) and value.lower() in ("fp16", "float16", "half"))
    if fp16:
        raise ValueError(f"{where}: state_dtype {value!r} (fp16) is not supported: its range (largest 65504, "
                         "smallest normal 6.1e-5) is too small for Adam's second moment; use 'bf16' to halve the state")
    if isinstance(value, torch.dtype):
        for name, dt in _STATE_DTYPES.items():
            if dt == value:
                return name
    elif isinstance(value, str) and value.lower() in _STATE_DTYPE_ALIASES:
        return _STATE_DTYPE_ALIASES[value.lower()]
    raise ValueError(f"{where}: unknown state_dtype {value!r}; valid: None, 'fp32', 'bf16', 'fp64' "
                     "(or torch.float32, torch.bfloat16, torch.float64)")


def _state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The dtype of ``p``'s optimizer state in ``group``: the group's ``state_dtype``, or (None) the
    parameter's dtype widened to at least fp32, so that fp16/bf16 parameters keep fp32 state."""
    name = group.get("state_dtype")
    if name is None:
        return torch.float64 if p.dtype == torch.float64 else torch.float32
    return _STATE_DTYPES[name]


def _compute_dtype(p: Tensor, state: Tensor) -> torch.dtype:
    """The dtype the update arithmetic runs in: fp32, or fp64 when the parameter or its state is fp64."""
    return torch.float64 if torch.float64 in (p.dtype, state.dtype) else torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` itself when it already has ``dtype`` (updated in place), else a widened copy."""
    return t if t.dtype == dtype else t.to(dtype)


def _store(dst: Tensor, src: Tensor, generator: Optional[torch.Generator] = None) -> None:
    """Round a compute-dtype result into a narrower state or parameter tensor, once: stochastically
    into bf16 state when a ``generator`` is given, else to nearest (parameters)."""
    d, s_ = _dist.local(dst), _dist.local(src)
    if generator is not None and d.dtype == torch.bfloat16:
        stochastic_round_(d, s_, generator)
    else:
        d.copy_(s_)


_WIDEN_CHUNK = 2**24  # elements widened to fp32 at a time (bounds the temporary copies)


def _chunk_by_numel(members: list, limit: Optional[int], numel: Callable[[Any], int] = lambda m: m[0].numel()) -> list[list]:
    """Consecutive chunks of ``members`` (by default (parameter, state) pairs) of at most ``limit``
    elements each (a larger member forms its own chunk; None: one chunk)."""
    if limit is None:
        return [members]
    chunks, current, size = [], [], 0
    for pair in members:
        n = numel(pair)
        if current and size + n > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(pair)
        size += n
    if current:
        chunks.append(current)
    return chunks


def _rounding_seed(index: int, count: int) -> int:
    """A 63-bit seed from (parameter position, rounding count): splitmix64's finalizer, so that
    neighbouring parameters and steps get unrelated random streams."""
    x = (index * 0x9E3779B97F4A7C15 + count * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


class _Nesterov:
    """A Nesterov direction g + mu·(buf − g) not formed yet (``value()`` forms it), or a block view
    of one: the single-process step forms each stacked chunk's directions just before orthogonalizing
    them, so no model-sized direction is ever allocated."""

    __slots__ = ("grad", "buf", "mu")

    def __init__(self, grad: Tensor, buf: Tensor, mu: float) -> None:
        self.grad, self.buf, self.mu = grad, buf, mu

    shape = property(lambda self: self.grad.shape)
    dtype = property(lambda self: self.grad.dtype)
    device = property(lambda self: self.grad.device)

    def numel(self) -> int:
        return self.grad.numel()

    def value(self) -> Tensor:
        return torch.lerp(self.grad, self.buf, self.mu)  # what torch._foreach_lerp computes per tensor

    def blocks(self, view: str) -> list["_Nesterov"]:
        return [_Nesterov(g, b, self.mu) for g, b in zip(blocks(self.grad, view), blocks(self.buf, view))]


def _value(src: Union[Tensor, _Nesterov]) -> Tensor:
    return src.value() if isinstance(src, _Nesterov) else src


class _AddInto:
    """A destination for an orthogonalized block: ``target <- target + factor·O`` (a parameter's own
    block view), instead of a copy into an update buffer that is scaled and added later."""

    __slots__ = ("target", "factor", "normuon")

    def __init__(self, target: Tensor, factor: Union[float, Tensor]) -> None:
        self.target, self.factor = target, factor
        self.normuon: Optional[tuple[Tensor, float]] = None  # NorMuon: (the rows' v, beta2)


def _step_factor(lr: Union[float, Tensor], scale: float) -> Union[float, Tensor]:
    """-lr·scale: a float for a float lr; for a tensor lr a tensor (no host sync)."""
    return lr * -scale


def _emit(dst: Union[Tensor, _AddInto], O: Tensor) -> None:
    """Write an orthogonalized stack where it goes, casting on the way (one pass)."""
    if isinstance(dst, _AddInto):
        if dst.normuon is not None:  # the row factors join the step's factor: still one pass over θ
            v, beta2 = dst.normuon
            dst.target.addcmul_(O, (normuon_row_scale(O, v, beta2) * dst.factor).unsqueeze(-1))
        elif isinstance(dst.factor, Tensor):
            dst.target.addcmul_(O, dst.factor)
        else:
            dst.target.add_(O, alpha=dst.factor)
    else:
        dst.copy_(O)


def _apply_update(p: Tensor, upd: Tensor, lr: Union[float, Tensor], weight_decay: float, cautious: bool) -> None:
    """θ <- θ(1 − lr·λ) − lr·update in at least fp32; a low-precision θ is rounded once, at the end."""
    target = p if p.dtype in (torch.float32, torch.float64) else p.float()
    apply_weight_decay_(target, upd, lr, weight_decay, cautious)
    target.sub_(upd * lr) if isinstance(lr, Tensor) else target.add_(upd, alpha=-lr)
    if target is not p:
        p.copy_(target)


def _wire_dtypes(p_dtype: torch.dtype, d_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(direction, update) dtypes the sharded step sends. A bf16 parameter's pieces travel in bf16
    as before (half the bytes; the iteration runs in bf16 on GPUs anyway); an fp16 parameter's
    direction travels in the compute dtype (a sum-form momentum can exceed fp16's range) and its
    orthogonalized update (entries of order 1) in fp16. The parameter itself is updated in fp32."""
    if p_dtype == torch.bfloat16:
        return torch.bfloat16, torch.bfloat16
    if p_dtype == torch.float16:
        return d_dtype, torch.float16
    return d_dtype, d_dtype


_FP32_MAX = torch.finfo(torch.float32).max
# options whose default changed: the value a state_dict saved before the option existed had
_LEGACY_DEFAULTS = {"normuon": False}


def _grad_limit(state_dtype: torch.dtype) -> float:
    """Largest gradient magnitude accepted: sqrt(max)/2 of the state dtype, so that g² (AdamW's
    second moment, RMS) stays a quarter of the range below overflow."""
    return math.sqrt(torch.finfo(state_dtype).max) / 2


def _check_grad(name: str, p: Tensor) -> None:
    """Raise, naming the parameter, for a gradient the step cannot take (before any state changes)."""
    g, shape = p.grad, tuple(p.shape)
    if g.is_sparse:
        raise RuntimeError(f"parameter {name} with shape {shape} has a sparse gradient; Muon needs dense gradients")
    if p.is_meta or g.is_meta:
        raise RuntimeError(
            f"parameter {name} with shape {shape} is on the meta device (it holds no data, only a shape): "
            "materialize the model before stepping, e.g. model.to_empty(device='cpu') and initialize or load its weights"
        )
    if g.shape != p.shape:
        raise RuntimeError(f"parameter {name}: gradient shape {tuple(g.shape)} != parameter shape {shape}")
    if g.dtype != p.dtype:
        raise RuntimeError(
            f"parameter {name} with shape {shape}: gradient dtype {g.dtype} != parameter dtype {p.dtype}; "
            "cast one of them (e.g. p.grad = p.grad.to(p.dtype))"
        )
    if g.device != p.device:
        raise RuntimeError(f"parameter {name} with shape {shape}: gradient on {g.device} but parameter on {p.device}")


def _check_saved_values(name: str, p: Tensor, st: Mapping[str, Any]) -> None:
    """Saved state must be finite (and its step a count >= 0): a NaN in a moment would turn the
    parameter NaN on the next step. Checks this rank's values (no collective)."""
    for key, value in st.items():
        if isinstance(value, Tensor):
            v = _dist.local(value)
            if not v.is_floating_point() or v.numel() == 0:
                continue
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                kind = "nan" if bool(torch.isnan(v).any()) else "inf"
                count = int((~finite).sum())
                raise ValueError(f"parameter {name} with shape {tuple(p.shape)}: saved {key} holds {kind} "
                                 f"({count} of {v.numel()} values non-finite); the checkpoint's optimizer state is "
                                 "damaged, nothing was loaded")
            if key == "step" and v.numel() == 1 and float(v) < 0:
                raise ValueError(f"parameter {name} with shape {tuple(p.shape)}: saved step {float(v):g} is negative")
        elif key == "rounding_step" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"parameter {name} with shape {tuple(p.shape)}: saved rounding_step {value!r} is not an int >= 0")
        elif key == "step" and isinstance(value, (int, float)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"parameter {name} with shape {tuple(p.shape)}: saved step {value} is not a count >= 0")


def _describe_bad(name: str, g: Tensor, amax: Tensor, limit: float) -> str:
    v = float(amax)
    if not math.isfinite(v):
        return f"{name} {tuple(g.shape)}"
    return f"{name} {tuple(g.shape)}: |gradient| up to {v:.3g} > {limit:.3g} (its square would overflow the optimizer state)"


def _settings(group: dict[str, Any]) -> tuple:
    """The orthogonalization settings of a Muon group (part of every bucket key)."""
    return (group["ns_method"], group["ns_coefficients"], group["ns_steps"], group["ns_dtype"], group["eps"])


def _default_bucket_bytes(device: torch.device) -> int:
    """Bytes a rank owns, sends or receives in one round of the sharded step (``dist_bucket_bytes``)."""
    return 2**26 if device.type == "cuda" else 2**24


def _ortho_flops(key: tuple) -> float:
    """Estimated FLOPs of one matrix of a bucket ``key`` (shape, settings, device, dtype), with the
    method ``"auto"`` resolves to (the Gram form costs less on wide matrices)."""
    (m, n), (method, _, steps, dtype, _), device, in_dtype = key
    return method_flops(method, m, n, steps, resolve_dtype(dtype, device, in_dtype))


def _default_view(name: str, p: Tensor) -> str:
    try:
        return auto_view(p.shape)
    except ValueError:
        raise ValueError(
            f"parameter {name} with shape {tuple(p.shape)} is {p.ndim}-D but is in a Muon group; "
            "Muon orthogonalizes matrices. Put it in an 'adamw' or 'rms' group."
        ) from None


def _scalar(v: Union[float, Tensor]) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _fmt_lr(v: Union[float, Tensor]) -> str:
    return f"{_scalar(v):g}" + (" (tensor)" if isinstance(v, Tensor) else "")


def _freeze(coeffs: Any) -> Any:
    """Coefficients as a hashable, serializable value (name, triple or tuple of triples)."""
    if isinstance(coeffs, str):
        return coeffs
    seq = list(coeffs)
    if seq and all(isinstance(v, (int, float)) for v in seq):
        return tuple(float(v) for v in seq)
    return tuple(tuple(float(v) for v in t) for t in seq)


def _dtype_name(dtype: Union[str, torch.dtype, None]) -> Optional[str]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_TO_NAME:
            raise ValueError(f"unsupported ns_dtype {dtype}; use bf16, fp16, fp32 or fp64")
        return _DTYPE_TO_NAME[dtype]
    resolve_dtype(dtype, torch.device("cpu"), torch.float32)  # validates the name
    return str(dtype)


def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = lr.item()
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: invalid learning rate {lr!r} (must be a finite number >= 0)")


def _validate_muon(g: dict[str, Any], where: str) -> None:
    _check_lr(g["lr"], where)
    if not (0.0 <= g["momentum"] < 1.0):
        raise ValueError(f"{where}: momentum must be in [0, 1), got {g['momentum']}")
    if not (g["weight_decay"] >= 0.0):
        raise ValueError(f"{where}: invalid weight_decay {g['weight_decay']} (must be >= 0)")
    if g["ns_method"] not in METHODS:
        raise ValueError(f"{where}: unknown ns_method {g['ns_method']!r}; valid: {list(METHODS)}")
    steps = g["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: ns_steps must be an int >= 1, got {steps!r}")
    resolve_schedule(g["ns_coefficients"], steps)  # raises on unknown preset / bad numbers
    if g["adjust_lr_fn"] not in ADJUST_LR_MODES and g["adjust_lr_fn"] is not None:
        raise ValueError(f"{where}: unknown adjust_lr_fn {g['adjust_lr_fn']!r}; valid: {list(ADJUST_LR_MODES)}")
    if g["momentum_form"] not in MOMENTUM_FORMS:
        raise ValueError(f"{where}: unknown momentum_form {g['momentum_form']!r}; valid: {list(MOMENTUM_FORMS)}")
    if not (g["eps"] >= 0.0):
        raise ValueError(f"{where}: eps must be >= 0, got {g['eps']}")
    clip = g["clip_momentum_norm"]
    if clip is not None and not (clip > 0):
        raise ValueError(f"{where}: clip_momentum_norm must be > 0 or None, got {clip}")
    if not (0.0 <= g["normuon_beta2"] < 1.0):
        raise ValueError(f"{where}: normuon_beta2 must be in [0, 1), got {g['normuon_beta2']}")
    if g.get("ns_dtype") is not None:
        _dtype_name(g["ns_dtype"])


def _validate_adamw(g: dict[str, Any], where: str) -> None:
    _check_lr(g["lr"], where)
    betas = g["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas}")
    if not (g["eps"] >= 0.0):
        raise ValueError(f"{where}: eps must be >= 0, got {g['eps']}")
    if not (g["weight_decay"] >= 0.0):
        raise ValueError(f"{where}: invalid weight_decay {g['weight_decay']} (must be >= 0)")


def _validate_rms(g: dict[str, Any], where: str) -> None:
    _check_lr(g["lr"], where)
    if not (0.0 <= g["momentum"] < 1.0):
        raise ValueError(f"{where}: momentum must be in [0, 1), got {g['momentum']}")
    if not (g["weight_decay"] >= 0.0):
        raise ValueError(f"{where}: invalid weight_decay {g['weight_decay']} (must be >= 0)")


@torch.no_grad()
def _ortho_stats(blks: list[Tensor]) -> dict[str, float]:
    """Orthogonality residual ‖OOᵀ − I‖_F/sqrt(min(a,b)) and singular-value range over the blocks."""
    residual, smin, smax = 0.0, math.inf, 0.0
    for b in blks:
        O = b.float()
        if O.shape[-2] > O.shape[-1]:
            O = O.mT
        k = O.shape[-2]
        eye = torch.eye(k, device=O.device)
        r = torch.linalg.matrix_norm(O @ O.mT - eye) / math.sqrt(k)
        residual = max(residual, float(r.max()))
        s = torch.linalg.svdvals(O)
        smin, smax = min(smin, float(s.min())), max(smax, float(s.max()))
    return {"ortho_residual": residual, "sv_min": smin, "sv_max": smax}
