"""Reference implementations that tests and benchmarks hold muonlab to (not used by the library).

``torch_ns_fp32`` is torch.optim.Muon's Newton-Schulz (``torch/optim/_muon.py``,
``_zeropower_via_newtonschulz``) with its bf16 cast replaced by a copying fp32 cast, so that parity
and speed can be compared at equal (fp32) precision. The cast must copy: ``.float()`` of an fp32
tensor would not, and the in-place ``div_`` would then corrupt the momentum buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def torch_ns_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> torch.Tensor:
    a, b, c = ns_coefficients
    x = grad.to(torch.float32, copy=True)
    if grad.size(0) > grad.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x


@contextlib.contextmanager
def patched_torch_muon_fp32() -> Iterator[None]:
    """Within the block, torch.optim.Muon iterates in fp32 instead of bf16."""
    import torch.optim._muon as torch_muon

    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = torch_ns_fp32
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original
