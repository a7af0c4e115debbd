"""QK-Clip (the "Clip" of MuonClip): keep attention logits bounded by rescaling query and key weights.

Kimi K2 (Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534, sec. 2.1, Algorithm 1)
trains with Muon and, after every optimizer step, looks at each attention head's largest
pre-softmax logit on the batch,

    S_h = max over the batch and the attended positions (i, j) of  q_i^h . k_j^h * scale,

and for every head with S_h > tau scales that head's query and key weights by sqrt(gamma_h) each,
gamma_h = tau / S_h, so that the head's logits (bilinear in q and k) scale by exactly gamma_h and the
largest lands on tau. Heads under tau are not touched: the clip is per head, not global.

This module is model-agnostic. A model reports its per-head max logits (a tensor of n_heads values
per attention layer); a :class:`QKSpec` per layer says, explicitly, which rows of which tensors
belong to each head; :class:`QKClip` turns the logits into factors and scales the rows in place.

Shared keys (grouped-query attention), the one rule this module adds to the paper
-------------------------------------------------------------------------------
Under GQA one key head g serves the G = n_heads / n_kv_heads query heads ``g*G .. g*G+G-1`` (the
grouping of ``F.scaled_dot_product_attention(enable_gqa=True)``, Hugging Face's ``repeat_kv`` and the
lab model). With gamma_h = min(1, tau / S_h) for each query head, key head g is scaled by

    s_k = max(sqrt(min_{h in g} gamma_h), max_{h in g} gamma_h)

and each query head h of the group by s_q(h) = gamma_h / s_k. So:

* every head's logits scale by exactly s_q(h) * s_k = gamma_h: a clipped head ends at tau, as in the
  paper, and a head under tau keeps its logits (its weights are not touched at all: if any head of a
  group is under tau, max gamma = 1, so the key is left alone and only the clipped queries shrink);
* no weight ever grows (s_k <= 1 and s_q(h) <= 1, since gamma_h <= max gamma <= s_k);
* with one query head per key head (multi-head attention) s_k = s_q = sqrt(gamma): the paper's rule.
  When all heads of a group are clipped the key takes the worst head's square-root share, or less
  if that would force another query head of the group to grow.

MLA (DeepSeek-V2/V3 multi-head latent attention; K2 itself): the logit of head h is
q_nope^h . k_nope^h + q_rope^h . k_rope, where k_rope is one head shared by all. Following the paper,
q_nope^h (rows of ``q_proj``/``q_b_proj``) and k_nope^h (rows of ``kv_b_proj``) take sqrt(gamma_h) each,
the head-specific q_rope^h takes the whole gamma_h, and the shared k_rope is left untouched
(:meth:`QKSpec.mla`, the ``q_shared_key`` rows).

Biases: a bias of q (or k) is part of the head's q (or k), so its entries take the same factor
(:meth:`QKSpec.separate` / :meth:`QKSpec.fused` accept them).

Distributed: every replica must apply the same factors, so :meth:`QKClip.apply` takes the max of the
reported logits over the process group (one ``all_reduce(MAX)``) when ``torch.distributed`` is
initialized: under DDP/FSDP each rank sees a different part of the batch. Weights that are
``DTensor`` s (FSDP2, tensor parallel) are scaled on the local shard only, on the rows of each head
that the shard holds; nothing is gathered. A ``Partial`` placement is refused.

Timing: as in the paper, the logits come from the forward pass of the step and the clip runs after
the optimizer update, so the guarantee "max logit <= tau" holds for the weights the logits were
measured on; the update of the same step can move them again (by a small amount at sane learning
rates). Measure after the step (one more forward pass) for the exact bound.

Hugging Face: :func:`hf_qk_specs` builds the specs of a ``transformers`` model (Llama, Mistral,
Qwen2 and the other Llama-family attentions with ``q_proj``/``k_proj``; DeepSeek-V2/V3 MLA), and
:func:`hf_track_max_logits` collects the per-head max logits of Llama-family attention with hooks.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed.common import comm_device, is_dtensor, resolve_group
from .distributed.layout import shard_indices

__all__ = [
    "HeadRows", "QKSpec", "QKClip", "QKClipStats", "qk_clip_factors", "grouped_max_logits",
    "hf_qk_specs", "hf_track_max_logits",
]

FUSED_LAYOUTS = ("stacked", "grouped")


# ---------------------------------------------------------------------- the rule
def qk_clip_factors(max_logits: Sequence[float], tau: float, n_kv_heads: int
                    ) -> tuple[list[float], list[float], list[float]]:
    """The factors of one attention layer: ``(gamma, q_scale, k_scale)``.

    ``gamma[h] = min(1, tau / S_h)`` is what head h's logits are multiplied by; ``q_scale[h]`` (one
    per query head) and ``k_scale[g]`` (one per key head) are the factors of their weight rows, with
    ``q_scale[h] * k_scale[h // G] == gamma[h]`` (G = n_heads / n_kv_heads). The key-head rule is the
    module docstring's: ``k_scale[g] = max(sqrt(min gamma of group g), max gamma of group g)``.
    Plain floats (the rule is tiny; the caller validated the inputs).

    >>> qk_clip_factors([8.0, 8.0], tau=2.0, n_kv_heads=2)  # two heads, own keys: sqrt(1/4) each
    ([0.25, 0.25], [0.5, 0.5], [0.5, 0.5])
    >>> qk_clip_factors([8.0, 1.0], tau=2.0, n_kv_heads=1)  # one key for both: head 1 keeps its logits
    ([0.25, 1.0], [0.25, 1.0], [1.0])
    """
    n = len(max_logits)
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1 or n % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads!r} must be a positive integer dividing the {n} query heads")
    group = n // n_kv_heads
    gamma = [tau / s if s > tau else 1.0 for s in max_logits]  # Kimi K2, Algorithm 1
    q_scale, k_scale = [1.0] * n, [1.0] * n_kv_heads
    for g in range(n_kv_heads):
        heads = range(g * group, (g + 1) * group)
        gmin, gmax = min(gamma[h] for h in heads), max(gamma[h] for h in heads)
        if gmin == 1.0:
            continue  # no head of the group over tau: touch nothing (bit-identical)
        k_scale[g] = max(math.sqrt(gmin), gmax)
        for h in heads:
            q_scale[h] = math.sqrt(gamma[h]) if gamma[h] == gmin and k_scale[g] == math.sqrt(gmin) \
                else gamma[h] / k_scale[g]  # the first form: the paper's sqrt split, rounded once
    return gamma, q_scale, k_scale


# ---------------------------------------------------------------------- head -> rows
@dataclass(frozen=True, eq=False)
class HeadRows:
    """The slices of one tensor that belong to each head: head i owns the indices
    ``[starts[i], starts[i] + width)`` of dimension ``dim`` of ``tensor``.

    ``dim=0`` are the rows of an ``nn.Linear.weight`` (out, in) or the entries of a bias; ``dim=1``
    the columns of a weight stored (in, out) (GPT-2's ``Conv1D``). ``tensor`` may be a ``DTensor``.
    """

    tensor: Tensor
    starts: tuple[int, ...]
    width: int
    dim: int = 0
    name: str = "tensor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(int(s) for s in self.starts))
        if not isinstance(self.tensor, Tensor):
            raise TypeError(f"{self.name}: HeadRows needs a tensor, got {type(self.tensor).__name__}")
        shape = tuple(self.tensor.shape)
        if not 0 <= self.dim < len(shape):
            raise ValueError(f"{self.name} with shape {shape}: dim={self.dim} is not one of its dimensions")
        if self.width < 1 or not self.starts:
            raise ValueError(f"{self.name}: HeadRows needs width >= 1 and at least one head, got width="
                             f"{self.width}, {len(self.starts)} heads")
        size = shape[self.dim]
        spans = sorted((s, s + self.width) for s in self.starts)
        for s, e in spans:
            if s < 0 or e > size:
                raise ValueError(f"{self.name} with shape {shape}: head rows [{s}, {e}) of dim {self.dim} fall "
                                 f"outside its {size} entries")
        for (_, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"{self.name} with shape {shape}: two heads share rows near {s1} of dim {self.dim}")

    @classmethod
    def contiguous(cls, tensor: Tensor, n_heads: int, width: int, offset: int = 0, dim: int = 0,
                   name: str = "tensor") -> "HeadRows":
        """Heads side by side: head i owns ``[offset + i*width, offset + (i+1)*width)``."""
        return cls(tensor, tuple(offset + i * width for i in range(n_heads)), width, dim, name)

    def spans(self) -> list[tuple[int, int]]:
        return [(s, s + self.width) for s in self.starts]


@dataclass(frozen=True, eq=False)
class QKSpec:
    """Which rows of which tensors make up the queries and keys of one attention layer.

    ``q``: per *query* head (``n_heads`` starts each), the rows scaled by the query factor;
    ``k``: per *key* head (``n_kv_heads`` starts each), scaled by the key factor; query head h reads
    key head ``h // (n_heads // n_kv_heads)``. ``q_shared_key``: per query head, rows whose key
    partner is shared by all heads and never scaled (MLA's q_rope), scaled by the whole gamma_h.
    ``name`` keys the max logits passed to :meth:`QKClip.apply` and names the layer in errors.
    Use the constructors :meth:`separate`, :meth:`fused` and :meth:`mla` for the common layouts.
    """

    name: str
    n_heads: int
    n_kv_heads: int
    q: tuple[HeadRows, ...]
    k: tuple[HeadRows, ...]
    q_shared_key: tuple[HeadRows, ...] = ()

    def __post_init__(self) -> None:
        for f in ("q", "k", "q_shared_key"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("n_heads", "n_kv_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"QK-Clip layer {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"QK-Clip layer {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if not self.q or not self.k:
            raise ValueError(f"QK-Clip layer {self.name!r}: needs query rows and key rows")
        for f, n in (("q", self.n_heads), ("k", self.n_kv_heads), ("q_shared_key", self.n_heads)):
            for r in getattr(self, f):
                if not isinstance(r, HeadRows):
                    raise TypeError(f"QK-Clip layer {self.name!r}: {f} entries must be HeadRows, got {type(r).__name__}")
                if len(r.starts) != n:
                    raise ValueError(f"QK-Clip layer {self.name!r}: {f} rows of {r.name} list {len(r.starts)} heads, "
                                     f"expected {n}")
        # rows of one tensor must not be claimed twice (a fused weight's q, k and v blocks)
        rows = self.q + self.k + self.q_shared_key
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                if a.tensor is b.tensor and a.dim == b.dim:
                    for s0, e0 in a.spans():
                        for s1, e1 in b.spans():
                            if s0 < e1 and s1 < e0:
                                raise ValueError(f"QK-Clip layer {self.name!r}: rows [{s0}, {e0}) of {a.name} and "
                                                 f"[{s1}, {e1}) of {b.name} overlap")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def separate(cls, name: str, q_weight: Tensor, k_weight: Tensor, n_heads: int, n_kv_heads: Optional[int] = None,
                 *, q_bias: Optional[Tensor] = None, k_bias: Optional[Tensor] = None,
                 transposed: bool = False) -> "QKSpec":
        """Separate projections ``wq`` (n_heads*D, in) and ``wk`` (n_kv_heads*D, in), heads side by
        side (Llama, the lab model); ``transposed=True`` for weights stored (in, out)."""
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        dim = 1 if transposed else 0
        for label, w, n in (("q", q_weight, n_heads), ("k", k_weight, n_kv)):
            if w.ndim != 2 or w.shape[dim] % max(n, 1):
                raise ValueError(f"QK-Clip layer {name!r}: {label} weight of shape {tuple(w.shape)} does not split "
                                 f"into {n} heads along dim {dim}")
        d = q_weight.shape[dim] // n_heads
        if k_weight.shape[dim] != n_kv * d:
            raise ValueError(f"QK-Clip layer {name!r}: k weight of shape {tuple(k_weight.shape)} should have "
                             f"n_kv_heads*head_dim = {n_kv}*{d} = {n_kv * d} entries along dim {dim}")
        q = [HeadRows.contiguous(q_weight, n_heads, d, dim=dim, name=f"{name} q weight")]
        k = [HeadRows.contiguous(k_weight, n_kv, d, dim=dim, name=f"{name} k weight")]
        if q_bias is not None:
            q.append(HeadRows.contiguous(q_bias, n_heads, d, name=f"{name} q bias"))
        if k_bias is not None:
            k.append(HeadRows.contiguous(k_bias, n_kv, d, name=f"{name} k bias"))
        return cls(name, n_heads, n_kv, tuple(q), tuple(k))

    @classmethod
    def fused(cls, name: str, qkv_weight: Tensor, n_heads: int, n_kv_heads: Optional[int] = None,
              head_dim: Optional[int] = None, *, bias: Optional[Tensor] = None, layout: str = "stacked",
              transposed: bool = False) -> "QKSpec":
        """One weight holding q, k and v.

        ``layout="stacked"``: all query heads, then all key heads, then the values (Phi-3's
        ``qkv_proj``, GPT-2's ``c_attn``). ``layout="grouped"``: per key head g, its G query heads,
        then its key, then its value (Megatron-LM's GQA layout; GPT-NeoX's per-head [q, k, v] when
        G = 1). ``head_dim`` defaults to rows / (n_heads + 2*n_kv_heads) (values as wide as keys).
        """
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        if layout not in FUSED_LAYOUTS:
            raise ValueError(f"QK-Clip layer {name!r}: unknown fused layout {layout!r}; valid: {list(FUSED_LAYOUTS)}")
        if n_heads % max(n_kv, 1):
            raise ValueError(f"QK-Clip layer {name!r}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
        dim = 1 if transposed else 0
        rows = qkv_weight.shape[dim]
        if head_dim is None:
            if rows % (n_heads + 2 * n_kv):
                raise ValueError(f"QK-Clip layer {name!r}: fused weight of shape {tuple(qkv_weight.shape)} has {rows} "
                                 f"entries along dim {dim}, not a multiple of n_heads + 2*n_kv_heads = "
                                 f"{n_heads + 2 * n_kv}; give head_dim")
            head_dim = rows // (n_heads + 2 * n_kv)
        d, group = head_dim, n_heads // n_kv
        if (n_heads + n_kv) * d > rows:
            raise ValueError(f"QK-Clip layer {name!r}: fused weight of shape {tuple(qkv_weight.shape)} is too small "
                             f"for {n_heads} query and {n_kv} key heads of {d} along dim {dim}")
        if layout == "stacked":
            q_starts = [h * d for h in range(n_heads)]
            k_starts = [n_heads * d + g * d for g in range(n_kv)]
        else:
            if rows % n_kv:
                raise ValueError(f"QK-Clip layer {name!r}: a grouped fused weight with {rows} entries along dim {dim} "
                                 f"does not split into {n_kv} groups")
            block = rows // n_kv  # (G + 1) * d + the value width
            q_starts = [(h // group) * block + (h % group) * d for h in range(n_heads)]
            k_starts = [g * block + group * d for g in range(n_kv)]
        q = [HeadRows(qkv_weight, q_starts, d, dim, f"{name} qkv weight")]
        k = [HeadRows(qkv_weight, k_starts, d, dim, f"{name} qkv weight")]
        if bias is not None:
            q.append(HeadRows(bias, q_starts, d, 0, f"{name} qkv bias"))
            k.append(HeadRows(bias, k_starts, d, 0, f"{name} qkv bias"))
        return cls(name, n_heads, n_kv, tuple(q), tuple(k))

    @classmethod
    def mla(cls, name: str, q_weight: Tensor, kv_weight: Tensor, n_heads: int, qk_nope_head_dim: int,
            qk_rope_head_dim: int, v_head_dim: int, *, transposed: bool = False) -> "QKSpec":
        """Multi-head latent attention (DeepSeek-V2/V3), the layout of Hugging Face's
        ``DeepseekV3Attention``: ``q_weight`` is ``q_proj`` or ``q_b_proj`` (n_heads*(nope+rope), in),
        per head [q_nope, q_rope]; ``kv_weight`` is ``kv_b_proj`` (n_heads*(nope+v), kv_lora_rank),
        per head [k_nope, v]. The shared rotary key (the last ``qk_rope_head_dim`` rows of
        ``kv_a_proj_with_mqa``) is not listed: it is never scaled. Kimi K2 sec. 2.1: q_nope and k_nope
        take sqrt(gamma_h), q_rope takes gamma_h.
        """
        dim = 1 if transposed else 0
        dn, dr, dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        if q_weight.shape[dim] != n_heads * (dn + dr):
            raise ValueError(f"QK-Clip layer {name!r}: MLA q weight of shape {tuple(q_weight.shape)} should have "
                             f"n_heads*(nope+rope) = {n_heads}*({dn}+{dr}) entries along dim {dim}")
        if kv_weight.shape[dim] != n_heads * (dn + dv):
            raise ValueError(f"QK-Clip layer {name!r}: MLA kv_b weight of shape {tuple(kv_weight.shape)} should have "
                             f"n_heads*(nope+v) = {n_heads}*({dn}+{dv}) entries along dim {dim}")
        step_q, step_kv = dn + dr, dn + dv
        q = HeadRows(q_weight, [h * step_q for h in range(n_heads)], dn, dim, f"{name} q weight (nope)")
        k = HeadRows(kv_weight, [h * step_kv for h in range(n_heads)], dn, dim, f"{name} kv_b weight (k nope)")
        qr = HeadRows(q_weight, [h * step_q + dn for h in range(n_heads)], dr, dim, f"{name} q weight (rope)")
        return cls(name, n_heads, n_heads, (q,), (k,), (qr,))


# ---------------------------------------------------------------------- the clipper
@dataclass(frozen=True)
class QKClipStats:
    """What one :meth:`QKClip.apply` saw and did. ``max_logit``: the largest logit over all heads of
    all layers (before clipping); ``clipped_heads`` of ``total_heads`` query heads were over tau;
    ``min_gamma``: the strongest factor applied to a head's logits (1.0 when none);
    ``layer_max_logit``: the largest logit of each layer."""

    max_logit: float
    clipped_heads: int
    total_heads: int
    min_gamma: float
    layer_max_logit: dict[str, float]

    def as_metrics(self) -> dict[str, float]:
        """The fields a training log records: ``max_attn_logit``, ``qk_clipped_heads``, ``qk_min_gamma``."""
        return {"max_attn_logit": self.max_logit, "qk_clipped_heads": self.clipped_heads,
                "qk_min_gamma": self.min_gamma}


MaxLogits = Union[Mapping[str, Tensor], Sequence[Tensor], Tensor]


class QKClip:
    """QK-Clip over a list of attention layers (Kimi K2, arXiv 2507.20534, Algorithm 1)::

        clip = QKClip(specs, tau=100.0)
        ...  # forward (the model records its per-head max logits), backward
        opt.step()
        stats = clip.apply(max_logits)   # {layer name: (n_heads,) tensor} or a list in spec order

    ``tau=math.inf`` measures and reports but never clips. ``process_group``: the group the max
    logits are reduced over (``None``: the world when ``torch.distributed`` is initialized; ``False``:
    never), so that every replica applies the same factors. Build the specs after the model is
    wrapped or sharded (FSDP2 replaces the parameters by DTensors).
    """

    def __init__(self, specs: Sequence[QKSpec], tau: float, *, process_group: Any = None):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
            raise ValueError(f"QK-Clip threshold tau must be a positive number (math.inf: never clip), got tau={tau!r}")
        specs = list(specs)
        if not specs:
            raise ValueError("QK-Clip needs at least one attention layer spec, got none")
        names = [s.name for s in specs]
        for s in specs:
            if not isinstance(s, QKSpec):
                raise TypeError(f"QK-Clip specs must be QKSpec, got {type(s).__name__}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"QK-Clip layer names must be unique, repeated: {dup}")
        self.specs, self.tau, self.process_group = specs, float(tau), process_group

    def __repr__(self) -> str:
        return f"QKClip(tau={self.tau:g}, layers={len(self.specs)})"

    def _gather(self, max_logits: MaxLogits) -> list[list[float]]:
        """Validated per-layer logits as floats, reduced (MAX) over the process group."""
        if isinstance(max_logits, Mapping):
            missing = [s.name for s in self.specs if s.name not in max_logits]
            if missing:
                raise ValueError(f"QK-Clip: no max logits reported for layer(s) {missing}; got layers "
                                 f"{sorted(max_logits)} (did a forward pass run with logit tracking on?)")
            values = [max_logits[s.name] for s in self.specs]
        else:
            values = list(max_logits)
            if len(values) != len(self.specs):
                raise ValueError(f"QK-Clip: got max logits for {len(values)} layers, the specs list {len(self.specs)}")
        flat = []
        for s, v in zip(self.specs, values):
            t = torch.as_tensor(v).detach()
            if t.numel() != s.n_heads:
                raise ValueError(f"QK-Clip layer {s.name!r}: got {t.numel()} max logits (shape {tuple(t.shape)}), "
                                 f"expected one per query head, n_heads={s.n_heads}")
            flat.append(t.reshape(-1))
        device = flat[0].device
        # float64 on the CPU (exact for any float32 logit); float32 on an accelerator
        cat = torch.cat([f.to(device, torch.float64 if device.type == "cpu" else torch.float32) for f in flat])
        group = resolve_group(self.process_group)
        if group is not None and dist.get_world_size(group) > 1:
            # a NaN may not survive a MAX reduction: send it as +inf, so that all ranks see it and raise
            # together (one rank raising alone would leave the others waiting). -inf stays: it marks a
            # head this rank does not compute (tensor parallelism), and max() takes its owner's value.
            buf = torch.where(torch.isnan(cat), math.inf, cat).to(comm_device(group))
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
            cat = buf
        host = cat.double().cpu().tolist()  # one transfer for every layer
        out, i = [], 0
        for s in self.specs:
            layer = host[i:i + s.n_heads]
            i += s.n_heads
            for h, x in enumerate(layer):
                if not math.isfinite(x):
                    raise ValueError(f"QK-Clip layer {s.name!r}: max logit of head {h} is {x}; the attention logits "
                                     "are not finite (the model diverged, or a fully masked batch was reported)")
            out.append(layer)
        return out

    @torch.no_grad()
    def apply(self, max_logits: MaxLogits) -> QKClipStats:
        """Scale, in place, the q/k rows of every head whose max logit exceeded tau; return what was
        seen and done. ``max_logits``: ``{spec.name: tensor of n_heads}``, or one tensor per spec in
        order (a (layers, n_heads) tensor too). Raises ValueError for a wrong number of heads, a
        missing layer or a non-finite logit, before anything is scaled."""
        logits = self._gather(max_logits)
        clipped, total, min_gamma, layer_max = 0, 0, 1.0, {}
        local_idx: dict[tuple[int, int], Any] = {}
        for spec, layer in zip(self.specs, logits):
            layer_max[spec.name] = max(layer)
            total += spec.n_heads
            gamma, q_scale, k_scale = qk_clip_factors(layer, self.tau, spec.n_kv_heads)
            for h, gm in enumerate(gamma):
                if gm < 1.0:
                    clipped += 1
                    min_gamma = min(min_gamma, gm)
                    for rows in spec.q:
                        _scale(rows, h, q_scale[h], local_idx)
                    for rows in spec.q_shared_key:
                        _scale(rows, h, gm, local_idx)
            for g, sk in enumerate(k_scale):
                if sk < 1.0:
                    for rows in spec.k:
                        _scale(rows, g, sk, local_idx)
        return QKClipStats(max(layer_max.values()), clipped, total, min_gamma, layer_max)


def _scale(rows: HeadRows, head: int, factor: float, cache: dict[tuple[int, int], Any]) -> None:
    """Multiply head ``head``'s slice of ``rows.tensor`` by ``factor`` in place (a DTensor: only the
    entries its local shard holds)."""
    if factor == 1.0:
        return
    t, lo, hi = rows.tensor, rows.starts[head], rows.starts[head] + rows.width
    if not is_dtensor(t):
        t.narrow(rows.dim, lo, rows.width).mul_(factor)
        return
    key = (id(t), rows.dim)
    if key not in cache:
        cache[key] = _local_index(t, rows.dim, rows.name)
    idx = cache[key]
    if idx is None:
        return  # this rank holds nothing of the tensor
    loc = t.to_local()  # aliases the DTensor's storage
    if isinstance(idx, range):  # contiguous global indices [idx.start, idx.stop)
        a, b = max(lo, idx.start), min(hi, idx.stop)
        if a < b:
            loc.narrow(rows.dim, a - idx.start, b - a).mul_(factor)
        return
    pos = [p for p, g in enumerate(idx) if lo <= g < hi]
    if pos:
        sel = torch.tensor(pos, device=loc.device)
        loc.index_copy_(rows.dim, sel, loc.index_select(rows.dim, sel) * factor)


def _local_index(t: Any, dim: int, name: str) -> Any:
    """The global indices along ``dim`` that this rank's shard of DTensor ``t`` holds (a range when
    contiguous), or None when this rank is not on its mesh."""
    if any(pl.is_partial() for pl in t.placements):
        raise ValueError(f"QK-Clip: {name} is a DTensor with a Partial placement {t.placements}; its rows "
                         "cannot be scaled locally (reduce it to Shard or Replicate first)")
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return None
    idx = shard_indices(tuple(t.shape), tuple(t.device_mesh.mesh.shape), coord, t.placements)
    local_shape = tuple(t.to_local().shape)
    if tuple(len(i) for i in idx) != local_shape:
        raise RuntimeError(f"QK-Clip: {name} with shape {tuple(t.shape)} and placements {t.placements} should hold "
                           f"a shard of shape {tuple(len(i) for i in idx)} here, but its local tensor is {local_shape}; "
                           "this layout is not supported")
    return idx[dim]


# ---------------------------------------------------------------------- Hugging Face
def _hf_attention_modules(model: Any) -> list[tuple[str, Any]]:
    found = []
    for name, mod in model.named_modules():
        if hasattr(mod, "kv_b_proj") or (hasattr(mod, "q_proj") and hasattr(mod, "k_proj") and hasattr(mod, "config")):
            found.append((name, mod))
    if not found:
        raise ValueError(f"no Llama-family attention (q_proj/k_proj) or MLA attention (kv_b_proj) found in "
                         f"{type(model).__name__}")
    return found


def _check_no_qk_norm(name: str, mod: Any) -> None:
    for norm in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        if getattr(mod, norm, None) is not None:
            raise ValueError(
                f"QK-Clip does not apply to {name} ({type(mod).__name__}): it normalizes q and k ({norm}), which "
                "undoes any scaling of the q/k projection rows; its logits are bounded by the norm gains instead")


def hf_qk_specs(model: Any) -> list[QKSpec]:
    """The :class:`QKSpec` of every attention layer of a Hugging Face ``transformers`` model, named
    by module path (``model.layers.0.self_attn``). Llama-family attention (``q_proj``/``k_proj``,
    biases if present, GQA from ``num_key_value_heads``) and DeepSeek-V2/V3 MLA (``q_proj`` or
    ``q_b_proj`` with ``kv_b_proj``). Refuses attention with q/k normalization (Qwen3, OLMo-2...),
    where scaling the projections changes nothing."""
    specs = []
    for name, mod in _hf_attention_modules(model):
        _check_no_qk_norm(name, mod)
        cfg = mod.config
        if hasattr(mod, "kv_b_proj"):  # MLA
            qw = mod.q_proj if getattr(mod, "q_proj", None) is not None else mod.q_b_proj
            if getattr(qw, "bias", None) is not None or getattr(mod.kv_b_proj, "bias", None) is not None:
                raise ValueError(f"QK-Clip: {name}: MLA projections with a bias are not supported")
            specs.append(QKSpec.mla(name, qw.weight, mod.kv_b_proj.weight, cfg.num_attention_heads,
                                    cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim))
            continue
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        specs.append(QKSpec.separate(name, mod.q_proj.weight, mod.k_proj.weight, n_heads, n_kv,
                                     q_bias=mod.q_proj.bias, k_bias=mod.k_proj.bias))
    return specs


# Bound on the elements of one (b, K, G, T, S) score block when max logits are computed on the side.
SCORE_BLOCK_ELEMENTS = 1 << 22


def grouped_max_logits(q: Tensor, k: Tensor, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """Per-query-head max of ``q . k * scale (+ mask)`` over the batch and the attended positions.

    q (B, H, T, D) and k (B, K, S, D), query head h reading key head h // (H/K). ``mask``: None for
    causal attention (T == S), else a boolean (True = attend) or additive float mask broadcastable
    to (B, H, T, S) (Hugging Face's 4-D masks). Computed in float32 with autocast off, in batch
    blocks of at most :data:`SCORE_BLOCK_ELEMENTS` scores, without autograd. Returns (H,).
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        qg = q.float().reshape(B, K, G, T, D)
        kf = k.float()
        if mask is None:
            if T != S:
                raise ValueError(f"causal max logits need as many keys as queries, got T={T}, S={S}")
            keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S)
        elif mask.ndim != 4:
            raise ValueError(f"expected a 4-D attention mask (B, 1 or H, T, S), got shape {tuple(mask.shape)}")
        block = max(1, SCORE_BLOCK_ELEMENTS // max(1, H * T * S))
        out = torch.full((H,), -math.inf, device=q.device)
        for b0 in range(0, B, block):
            s = torch.einsum("bkgtd,bksd->bkgts", qg[b0:b0 + block], kf[b0:b0 + block]) * scale  # (b, K, G, T, S)
            if mask is None:
                s = s.masked_fill(~keep, -math.inf)
            else:
                m = mask[b0:b0 + block] if mask.shape[0] > 1 else mask
                m = m.reshape(m.shape[0], K, G, T, S) if m.shape[1] == H else m.unsqueeze(2)  # (b, K|1, G|1, T, S)
                s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.float()
            out = torch.maximum(out, s.amax(dim=(0, 3, 4)).reshape(H))
    return out


@contextlib.contextmanager
def hf_track_max_logits(model: Any) -> Iterator[dict[str, Tensor]]:
    """Collect each Llama-family attention layer's per-head max pre-softmax logit during the
    forward passes inside the block (their elementwise max)::

        with hf_track_max_logits(model) as max_logits:
            loss = model(input_ids, labels=labels).loss
        loss.backward(); opt.step()
        clip.apply(max_logits)          # {"model.layers.0.self_attn": (n_heads,), ...}

    Hooks read the outputs of ``q_proj``/``k_proj`` (no extra projection), apply the model's own
    rotary function (``apply_rotary_pos_emb`` of the attention class's module) to the
    ``position_embeddings`` the layer receives, and compute q.k * ``module.scaling`` with the layer's
    ``attention_mask`` (None: causal); the model's attention kernel (sdpa, flash, eager) is
    unchanged. Training-style forwards only: a key/value cache prefix is refused. The dict is filled
    when the block exits; the hooks are removed then.
    """
    handles: list[Any] = []
    running: dict[str, Tensor] = {}
    result: dict[str, Tensor] = {}
    try:
        for name, mod in _hf_attention_modules(model):
            if hasattr(mod, "kv_b_proj"):
                raise ValueError(f"hf_track_max_logits: {name} is MLA attention; its logits cannot be read from "
                                 "q_proj/k_proj hooks (record them in an attention function instead)")
            _check_no_qk_norm(name, mod)
            rope = getattr(sys.modules[type(mod).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise ValueError(f"hf_track_max_logits: {name} ({type(mod).__name__}): its module has no "
                                 "apply_rotary_pos_emb; only rotary Llama-family attention is supported")
            handles.extend(_hook_attention(name, mod, rope, running))
        yield result
    finally:
        for h in handles:
            h.remove()
        result.update(running)


def _hook_attention(name: str, mod: Any, rope: Any, running: dict[str, Tensor]) -> list[Any]:
    captured: dict[str, Tensor] = {}
    n_heads = mod.config.num_attention_heads
    n_kv = getattr(mod.config, "num_key_value_heads", None) or n_heads

    def save(key: str) -> Any:
        def hook(_m: Any, _inp: Any, out: Tensor) -> None:
            captured[key] = out.detach()
        return hook

    def after(m: Any, args: Any, kwargs: dict[str, Any], _out: Any) -> None:
        q, k = captured.pop("q", None), captured.pop("k", None)
        if q is None or k is None:
            raise RuntimeError(f"hf_track_max_logits: {name} ran without calling q_proj and k_proj")
        pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if pe is None:
            raise ValueError(f"hf_track_max_logits: {name} was called without position_embeddings")
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        B, T = q.shape[:2]
        d = m.head_dim
        qh = q.view(B, T, n_heads, d).transpose(1, 2)  # (B, H, T, D)
        kh = k.view(B, T, n_kv, d).transpose(1, 2)  # (B, K, T, D)
        cos, sin = pe
        qh, kh = rope(qh, kh, cos, sin)
        if mask is not None and mask.ndim == 2:  # a (B, S) padding mask (flash attention): padding + causal
            mask = mask.bool()[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None and mask.shape[-1] != T:
            raise ValueError(f"hf_track_max_logits: {name} attends to {mask.shape[-1]} keys for {T} queries (a "
                             "key/value cache prefix); track training forwards without a cache")
        new = grouped_max_logits(qh, kh, float(m.scaling), mask)
        running[name] = new if name not in running else torch.maximum(running[name], new)

    return [mod.q_proj.register_forward_hook(save("q")), mod.k_proj.register_forward_hook(save("k")),
            mod.register_forward_hook(after, with_kwargs=True)]
