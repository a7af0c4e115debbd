"""Layer 2: update rules as pure functions on plain tensors.

No optimizer plumbing here: these functions take tensors (and the state tensors they update in
place) and return update directions. ``muonlab.optimizer.Muon`` calls them, batched or not.
"""

from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, torch.Tensor]  # a learning rate: a float or a 0-d tensor (read on device, never synced)

ADJUST_LR_MODES = ("original", "match_rms_adamw", "spectral", "none")
MOMENTUM_FORMS = ("ema", "sum")


def adjust_lr_scale(a: int, b: int, mode: str | None) -> float:
    """Multiplier applied to ``lr`` for a logical (a = fan_out, b = fan_in) matrix.

    * ``"original"`` (default, K. Jordan): sqrt(max(1, a/b)). ``lr`` is the spectral-norm step of
      square and wide matrices; tall ones get a bigger step so their update RMS matches.
    * ``"match_rms_adamw"`` (Moonlight, Liu et al. 2025, arXiv:2502.16982): 0.2·sqrt(max(a, b)).
      The update RMS becomes ~0.2, like AdamW's, so ``lr``/weight decay tuned for AdamW carry over.
    * ``"spectral"`` (Bernstein & Newhouse, modular norm): sqrt(a/b), the update has spectral norm
      sqrt(fan_out/fan_in)·lr.
    * ``"none"``: 1; ``lr`` is the spectral norm of the step for every matrix.
    """
    if mode is None or mode == "original":
        return math.sqrt(max(1.0, a / b))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    if mode == "spectral":
        return math.sqrt(a / b)
    if mode == "none":
        return 1.0
    raise ValueError(f"unknown adjust_lr_fn {mode!r}; valid: {list(ADJUST_LR_MODES)}")


def momentum_direction(
    grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, form: str, clip: float | None = None
) -> torch.Tensor:
    """Update the momentum buffer in place and return the direction to orthogonalize.

    * ``form="ema"`` (torch.optim.Muon): B <- μB + (1-μ)g; Nesterov direction g + μ(B - g)
      = lerp(g, B, μ), else B.
    * ``form="sum"`` (the seeds, Keller's first version): B <- μB + g; Nesterov direction
      g + μB, else B.
    Orthogonalization is scale invariant, so the two forms differ only through Nesterov's mix
    and the clipping threshold; both are offered for faithfulness to each source.
    ``clip`` rescales the buffer to at most that Frobenius norm right after its update (seed 002).
    """
    if form == "ema":
        buf.lerp_(grad, 1 - momentum)
    elif form == "sum":
        buf.mul_(momentum).add_(grad)
    else:
        raise ValueError(f"unknown momentum_form {form!r}; valid: {list(MOMENTUM_FORMS)}")
    if clip is not None:
        clip_by_norm_(buf, clip)
    if not nesterov:
        return buf
    return grad.lerp(buf, momentum) if form == "ema" else grad.add(buf, alpha=momentum)


def clip_by_norm_(t: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale ``t`` in place so that its Frobenius norm is at most ``max_norm`` (seed 002)."""
    norm = torch.linalg.vector_norm(t)
    t.mul_(torch.clamp(max_norm / (norm + 1e-12), max=1.0))
    return t


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float = 1e-8) -> torch.Tensor:
    """NorMuon (seed 004; Li et al. 2025, arXiv:2510.05491): per-neuron adaptive scaling.

    O: (k, a, b) orthogonalized updates; v: (k, a) running second moment of each row (neuron),
    updated in place: v <- β2 v + (1-β2) mean_j O_ij². Each row is divided by sqrt(v) + eps, then
    every matrix is rescaled to O's Frobenius norm, so the step size stays Muon's.
    """
    v.lerp_(O.square().mean(dim=-1), 1 - beta2)
    out = O / (v.sqrt().unsqueeze(-1) + eps)
    scale = torch.linalg.matrix_norm(O, keepdim=True) / (torch.linalg.matrix_norm(out, keepdim=True) + 1e-30)
    return out * scale


def normuon_row_scale(O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float = 1e-8) -> torch.Tensor:
    """:func:`normuon_normalize` as one factor per row: ``normuon_normalize(O, v, β2) == O * f[..., None]``
    (up to rounding) with ``f`` of shape (k, a) in fp32 (fp64 for fp64 O), and ``v`` updated in place the same way.

    Everything follows from the row sums of squares r_i = Σ_j O_ij²: v <- β2 v + (1-β2) r/b,
    d = sqrt(v) + eps, ‖O‖² = Σ r_i, ‖O / d‖² = Σ r_i / d_i², so f_i = (‖O‖ / ‖O / d‖) / d_i. One
    read of O instead of the reference's several full-size temporaries; the caller applies f in the
    same pass that applies the update.
    """
    r = torch.linalg.vector_norm(O, dim=-1, dtype=torch.promote_types(O.dtype, torch.float32)).square()
    v.lerp_((r / O.shape[-1]).to(v.dtype), 1 - beta2)
    d = v.to(r.dtype).sqrt() + eps
    scale = r.sum(-1, keepdim=True).sqrt() / ((r / d.square()).sum(-1, keepdim=True).sqrt() + 1e-30)
    return scale / d


def apply_weight_decay_(param: torch.Tensor, update: torch.Tensor, lr: Number, weight_decay: float, cautious: bool) -> None:
    """Decoupled weight decay θ <- θ − lr·λ·θ (Loshchilov & Hutter).

    ``cautious=True`` decays only coordinates where the update and the parameter share a sign,
    i.e. where decay and the step pull the same way (Chen et al. 2025, "Cautious weight decay").
    """
    if weight_decay == 0.0:
        return
    if not cautious:
        param.mul_(1 - lr * weight_decay)
    elif isinstance(lr, torch.Tensor):
        param.mul_(1 - (update * param > 0).to(param.dtype) * (lr * weight_decay))
    else:
        mask = (update * param > 0).to(param.dtype)
        param.addcmul_(param, mask, value=-lr * weight_decay)


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, operation for operation as torch.optim.AdamW's single-tensor path."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def fused_adamw_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_adamw_`` has a kernel for tensors of ``dtype`` on ``device``
    (fp32/fp64 on CPU, CUDA and XPU, fp32 on MPS; lower precisions are widened by the caller)."""
    if not hasattr(torch, "_fused_adamw_"):
        return False
    if device.type in ("cpu", "cuda", "xpu"):
        return dtype in (torch.float32, torch.float64)
    return device.type == "mps" and dtype == torch.float32


def adamw_multi_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: Number,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool,
) -> None:
    """One AdamW step on lists of same-device, same-dtype tensors, as torch.optim.AdamW.

    ``steps`` are 0-d float tensors already counting this step. ``fused=True`` calls
    ``torch._fused_adamw_`` (one kernel for every tensor); else ``torch._foreach`` kernels with the
    bias corrections computed from the step tensors on the device. Neither reads a value back to
    the host, so the step needs no synchronisation per tensor.
    """
    if not params:
        return
    if isinstance(lr, torch.Tensor) and lr.device != params[0].device:
        lr = lr.to(params[0].device)  # a copy to the device, not a read back to the host
    # under torch.compile the foreach form below is traced and fused by the compiler; the fused kernel
    # mutates state created inside the graph, which functionalization refuses (torch 2.13)
    if fused and not torch.compiler.is_compiling():
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                            grad_scale=None, found_inf=None)
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # per tensor (0-d): step size a = lr / (1 - β1^t) and b = sqrt(1 - β2^t); then
    # θ <- θ - a·m / (sqrt(v)/b + eps) = θ - m / ((sqrt(v)/b + eps) / a)
    bc1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(bc1)
    torch._foreach_add_(bc1, 1)
    b = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(b)
    torch._foreach_add_(b, 1)
    torch._foreach_sqrt_(b)
    a = torch._foreach_reciprocal(bc1)
    torch._foreach_mul_(a, lr)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, b)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, a)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-1)


def rms_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor,
    *,
    lr: Number,
    momentum: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Seed 002's fallback for non-matrix tensors: EMA momentum divided by its own RMS.

    m <- μ m + (1-μ) g;  θ <- θ(1 − lr·λ) − lr · m / sqrt(mean(m²) + eps).
    """
    buf.lerp_(grad, 1 - momentum)
    param.mul_(1 - lr * weight_decay)
    rms = torch.sqrt(buf.square().mean() + eps)
    if isinstance(lr, torch.Tensor):
        param.sub_(buf * (lr / rms))
    else:
        param.sub_(buf / rms, alpha=lr)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round ``src`` (fp32; fp64 is rounded to fp32 first) into the bf16 tensor ``dst`` stochastically.

    bf16 is the upper 16 bits of fp32. Adding a uniform random integer in [0, 2**16) to the fp32 bit
    pattern and then clearing the lower 16 bits rounds the magnitude up with probability equal to the
    dropped fraction, so E[dst] = src: an EMA whose per-step change is below half of bf16's spacing
    still moves on average, where round-to-nearest would freeze it. The bit pattern is sign and
    magnitude, so negative values round the same way; inf and NaN stay what they are, and values
    beyond bf16's largest finite number may become inf (as with round-to-nearest). The random bits come
    from ``generator``: the same generator state gives the same result (exact resume).
    """
    if dst.dtype != torch.bfloat16:
        raise ValueError(f"stochastic_round_ writes bf16, got a destination of dtype {dst.dtype}")
    if dst.shape != src.shape:
        raise ValueError(f"stochastic_round_: destination shape {tuple(dst.shape)} != source shape {tuple(src.shape)}")
    x = src if src.dtype == torch.float32 else src.float()
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits.add_(x.view(torch.int32)).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    # exact: the dropped bits are zero. A NaN whose payload fills the mantissa could carry into the
    # sign bit (and read as ±0); where() keeps every NaN a NaN.
    dst.copy_(torch.where(torch.isnan(x), x, bits.view(torch.float32)))
    return dst
