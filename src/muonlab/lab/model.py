"""A small decoder-only GPT in the Llama / minimind style, meant to be read top to bottom.

    tokens (B, T)
      -> tok_emb                                   (B, T, C)
      -> n_layer x Block:
             x = x + attn(attn_norm(x))            RMSNorm -> grouped-query causal attention with RoPE
             x = x + mlp(mlp_norm(x))              RMSNorm -> SwiGLU MLP, or a top-k mixture of experts
      -> norm -> lm_head                           (B, T, V)   (lm_head may share tok_emb's weight)

Letters in shape comments: B batch, T sequence length, C d_model, H query heads, K key/value heads
(H % K == 0), D head dim (C // H), F MLP hidden size, V vocabulary, E experts, N = B*T tokens.

Names are chosen for optimizer routing (module type plus name): ``tok_emb`` (nn.Embedding),
``blocks.N.attn.wq/wk/wv/wo`` and ``blocks.N.mlp.w1/w2/w3`` (nn.Linear, the hidden matrices),
``*norm*`` (RMSNorm gains, 1-D), ``lm_head`` (nn.Linear; ``lm_head.weight is tok_emb.weight`` when
tied). With mixture of experts, ``blocks.N.mlp.router`` is an nn.Linear (E, C) and the expert
weights are the 3-D parameters ``blocks.N.mlp.experts.w1/w3`` (E, F, C) and ``...experts.w2``
(E, C, F): E independent matrices in the (out, in) layout of nn.Linear.

QK-Clip (Kimi K2's MuonClip, muonlab.qkclip): ``with model.track_max_logits() as max_logits:`` makes
every attention layer also record its per-head max pre-softmax logit (one extra q.k matmul, off by
default), and ``model.qk_clip_specs()`` maps each layer's heads to the rows of wq and wk.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..qkclip import QKSpec, grouped_max_logits

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Named sizes. Everything not listed takes the GPTConfig default; d_ff follows the multiple_of rule.
# Parameter counts (tied embeddings, dense MLP) are checked by tests/test_model.py.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    # ~0.1M parameters (0.05M outside the embeddings): the smallest size of the scaling study.
    "micro": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=48, seq_len=128),
    # ~0.23M parameters; a training step at batch 16 takes ~60 ms on a 2-core CPU.
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=96, seq_len=128),
    # ~0.6M parameters (a step between tiny and small for the scaling study).
    "mini": dict(n_layer=3, n_head=4, n_kv_head=2, d_model=128, seq_len=128),
    # ~1.6M parameters.
    "small": dict(n_layer=4, n_head=6, n_kv_head=2, d_model=192, seq_len=256),
    # ~9.5M parameters.
    "medium": dict(n_layer=6, n_head=6, n_kv_head=2, d_model=384, seq_len=512),
    # GPT-2 small shapes (~124M parameters tied) with a SwiGLU MLP; for optimizer benchmarks only.
    # Vocabulary 50304 = 50257 rounded up to a multiple of 64, as in nanoGPT.
    "gpt2-small": dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, d_model=768, seq_len=1024),
}


def default_d_ff(d_model: int, multiple_of: int) -> int:
    """SwiGLU hidden size: 2/3 of the classic 4*d_model (same parameter count as a GELU MLP with
    three matrices instead of two, Llama), rounded up to a multiple of ``multiple_of``."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens by default
    n_layer: int = 2
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads (grouped-query attention); must divide n_head
    d_model: int = 96
    # MLP hidden size (per expert with MoE). None -> default_d_ff(d_model, multiple_of), filled in at
    # construction: dataclasses.replace(cfg, d_model=...) keeps the old d_ff, so use from_name instead.
    d_ff: Optional[int] = None
    multiple_of: int = 32
    seq_len: int = 128  # maximum context; RoPE tables are built for this many positions
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    moe_experts: int = 0  # 0 -> dense SwiGLU MLP; E > 0 -> mixture of E SwiGLU experts
    moe_top_k: int = 2
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer)
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._check_positive_int("d_model", "multiple_of")
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.multiple_of)
        self.validate()

    def _check_positive_int(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={v!r}")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent value."""
        self._check_positive_int("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                                 "multiple_of", "seq_len")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model/n_head={self.d_model // self.n_head} must be even for RoPE "
                             f"(d_model={self.d_model}, n_head={self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got rope_theta={self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got norm_eps={self.norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got init_std={self.init_std!r}")
        e, k = self.moe_experts, self.moe_top_k
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"moe_experts must be an integer >= 0 (0 = dense MLP), got moe_experts={e!r}")
        if e > 0 and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e):
            raise ValueError(f"moe_top_k must be an integer in [1, moe_experts={e}], got moe_top_k={k!r}")
        if not self.moe_aux_coef >= 0:
            raise ValueError(f"moe_aux_coef must be >= 0, got moe_aux_coef={self.moe_aux_coef!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPTConfig":
        """``GPTConfig.from_name("tiny", moe_experts=4)``; raises ValueError for an unknown name or field."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name!r}; valid names: {', '.join(MODEL_SIZES)}")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid fields: {', '.join(sorted(valid))}")
        return cls(**{**MODEL_SIZES[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * gain, computed in float32 (Zhang & Sennrich 2019; no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_rope(head_dim: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim // 2): angle[t, i] = t * theta^(-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    positions = torch.arange(seq_len, dtype=torch.float64)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of every head by the angle of its position (Su et al. 2021,
    "rotate half" layout). x: (B, T, heads, D); cos, sin: (T, D/2). A pure rotation: norms are kept,
    and <rope(q, m), rope(k, n)> depends only on m - n."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, h, D/2) each
    cos = cos[None, :, None, :]  # (1, T, 1, D/2)
    sin = sin[None, :, None, :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T, h, D)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share K key/value heads (H/K queries each)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # QK-Clip: when record_max_logit is on (GPT.track_max_logits), max_logit is the running
        # per-head max (H,) of the pre-softmax logits q.k/sqrt(D) over every forward since it was reset.
        self.record_max_logit = False
        self.max_logit: Optional[torch.Tensor] = None
        # Tensor parallelism computes n_head of the model's config.n_head query heads on each rank; whoever
        # splits the heads sets head_offset (this rank's first global query head) so that the max
        # logits can be reported per global head.
        self.head_offset: Optional[int] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, K, T, D) x2
        if self.record_max_logit:
            # the fused kernel below never materialises the scores: one extra q.k^T, no autograd, float32,
            # scale 1/sqrt(D) as in SDPA's default, causal positions only
            new = grouped_max_logits(q, k, 1.0 / math.sqrt(self.head_dim))  # (H,)
            self.max_logit = new if self.max_logit is None else torch.maximum(self.max_logit, new)
        # enable_gqa lets query head h read key/value head h // (H/K) without materialising copies.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C); C / tp columns under tensor parallelism
        return self.resid_dropout(self.wo(y))  # (B, T, C)


class SwiGLU(nn.Module):
    """w2( silu(w1 x) * w3 x ) (Shazeer 2020): w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T, C)
        h = F.silu(self.w1(x)) * self.w3(x)  # (B, T, F)
        return self.dropout(self.w2(h)), x.new_zeros(())  # (B, T, C), no auxiliary loss


class Experts(nn.Module):
    """E SwiGLU MLPs whose weights are stacked into 3-D parameters (E, out, in): expert e's matrices
    are w1[e], w3[e] (F, C) and w2[e] (C, F), the same layout as nn.Linear.weight, so an optimizer can
    treat each parameter as a batch of E independent matrices."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        E, C, Fh = cfg.moe_experts, cfg.d_model, cfg.d_ff
        self.w1 = nn.Parameter(torch.empty(E, Fh, C))
        self.w3 = nn.Parameter(torch.empty(E, Fh, C))
        self.w2 = nn.Parameter(torch.empty(E, C, Fh))

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:  # (n, C): the tokens routed to expert e
        h = F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)  # (n, F)
        return h @ self.w2[e].T  # (n, C)


class MoE(nn.Module):
    """Top-k mixture of experts (no capacity limit, no token dropping).

    The router's softmax gives p (N, E); each token goes to its k most likely experts and their
    outputs are mixed with those k probabilities renormalised to sum to 1 (Mixtral). The load-balancing
    loss is Switch Transformer's (Fedus et al. 2021, eq. 4), extended to k slots per token:
        aux = E * sum_e f_e * P_e,
    f_e = fraction of the N*k routing slots sent to expert e, P_e = mean router probability of e.
    It is 1 for a perfectly uniform router and grows as routing concentrates.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = Experts(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape  # (B, T, C)
        flat = x.reshape(B * T, C)  # (N, C)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)  # (N, k), rows sum to 1

        out = torch.zeros_like(flat)  # (N, C)
        for e in range(self.n_experts):  # a plain loop: clear, and fine for a CPU lab
            token, slot = (top_i == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            if token.numel() == 0:
                continue
            y = self.experts(flat[token], e)  # (n_e, C)
            out.index_add_(0, token, y * top_p[token, slot].unsqueeze(1).to(y.dtype))

        slot_fraction = torch.bincount(top_i.flatten(), minlength=self.n_experts).float() / top_i.numel()  # (E,) f_e
        mean_prob = probs.mean(dim=0)  # (E,) P_e
        aux = self.n_experts * (slot_fraction * mean_prob).sum()  # scalar
        return self.dropout(out.view(B, T, C)), aux


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.moe_experts > 0 else SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin)  # (B, T, C)
        h, aux = self.mlp(self.mlp_norm(x))  # (B, T, C), scalar
        return x + h, aux


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix, used twice
        cos, sin = precompute_rope(config.head_dim, config.seq_len, config.rope_theta)
        # Not persistent: derived from the config, so they stay out of state_dict.
        self.register_buffer("rope_cos", cos, persistent=False)  # (T_max, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (T_max, D/2)
        # Training-time aux loss of the last forward (0 when dense), for logging.
        self.last_aux_loss: torch.Tensor = torch.zeros(())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix, ones for norm gains. The projections that write into the
        residual stream (attn.wo, mlp.w2, experts.w2) get init_std / sqrt(2 * n_layer) (GPT-2), so the
        residual's variance does not grow with depth. Deterministic under torch.manual_seed."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # shared (tied) weights are listed once
            if p.ndim == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def attention_layers(self) -> list[tuple[str, Attention]]:
        """(module path, Attention) of every block: the layer names of max logits and QK-Clip specs."""
        return [(f"blocks.{i}.attn", block.attn) for i, block in enumerate(self.blocks)]

    @contextlib.contextmanager
    def track_max_logits(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record each attention layer's per-head max pre-softmax logit over the forward passes run
        inside the block (all micro-batches of a step: their elementwise max)::

            with model.track_max_logits() as max_logits:
                _, loss = model(x, y); loss.backward()
            opt.step()
            clip.apply(max_logits)      # {"blocks.0.attn": (n_head,) tensor, ...}

        The dict is filled when the block exits (layers that ran no forward are left out). Outside
        the block the forward is unchanged (the same fused attention kernel, no extra work). Under
        tensor parallelism each rank reports the heads it computes and -inf for the others;
        ``QKClip.apply`` takes the max over the ranks."""
        layers = self.attention_layers()
        if any(attn.record_max_logit for _, attn in layers):
            raise RuntimeError("track_max_logits() is already active on this model; blocks cannot nest")
        for _, attn in layers:
            attn.record_max_logit, attn.max_logit = True, None
        result: dict[str, torch.Tensor] = {}
        try:
            yield result
        finally:
            for name, attn in layers:
                if attn.max_logit is not None:
                    result[name] = self._per_global_head(name, attn, attn.max_logit)
                attn.record_max_logit, attn.max_logit = False, None

    def _per_global_head(self, name: str, attn: Attention, values: torch.Tensor) -> torch.Tensor:
        """(config.n_head,) from the (attn.n_head,) values of the heads this rank computes."""
        n = self.config.n_head
        if attn.n_head == n:
            return values
        if attn.head_offset is None:
            raise RuntimeError(f"{name} computes {attn.n_head} of {n} query heads (tensor parallel?) but its "
                               "head_offset is not set; whoever splits the heads must set attn.head_offset")
        full = values.new_full((n,), -math.inf)
        full[attn.head_offset:attn.head_offset + attn.n_head] = values
        return full

    def qk_clip_specs(self) -> list[QKSpec]:
        """The :class:`muonlab.qkclip.QKSpec` of every attention layer (separate wq/wk, GQA with
        config.n_kv_head key heads), named like :meth:`track_max_logits`. Build them after wrapping
        the model (FSDP2 replaces the parameters by DTensors; their rows are scaled shard by shard)."""
        cfg = self.config
        return [QKSpec.separate(name, attn.wq.weight, attn.wk.weight, cfg.n_head, cfg.n_kv_head)
                for name, attn in self.attention_layers()]

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once). ``non_embedding=True`` leaves out tok_emb and
        an untied lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.lm_head.weight is not self.tok_emb.weight:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, T) token ids -> logits (B, T, V) and, when targets (B, T) are given, the mean
        next-token cross-entropy (+ moe_aux_coef * mean aux loss over layers, in training mode only, so
        validation losses of dense and MoE models stay comparable)."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds config.seq_len={self.config.seq_len}")
        x = self.emb_dropout(self.tok_emb(idx))  # (B, T, C)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, aux = block(x, cos, sin)  # (B, T, C)
            aux_total = aux_total + aux
        x = self.norm(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)

        if self.config.moe_experts > 0:
            self.last_aux_loss = (aux_total / self.config.n_layer).detach()
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            # cross_entropy wants the class dimension second: (B, V, T) logits against (B, T) targets
            # (seed 000). Same value as the flattened (B*T, V) form, without a reshape.
            loss = F.cross_entropy(logits.transpose(1, 2).float(), targets)
            if self.config.moe_experts > 0 and self.training and self.config.moe_aux_coef > 0:
                loss = loss + self.config.moe_aux_coef * aux_total / self.config.n_layer
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample max_new_tokens tokens after idx (B, T); returns (B, T + max_new_tokens).
        temperature 0 means greedy. No KV cache: each step reruns the last seq_len tokens."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.seq_len:]  # (B, <=T_max)
                logits, _ = self(context)
                logits = logits[:, -1, :].float()  # (B, V)
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = logits.softmax(dim=-1)  # (B, V)
                    nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
                idx = torch.cat([idx, nxt], dim=1)
        finally:
            self.train(was_training)
        return idx
