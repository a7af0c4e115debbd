"""Lightning: :class:`muonlab.Muon` from ``configure_optimizers``.

A LightningModule is an ``nn.Module``, so routing sees the real model (embeddings and head stay on
AdamW) and Lightning checkpoints carry Muon's state like any optimizer's::

    from muonlab.integrations.lightning import muon_optimizers

    class LitLM(L.LightningModule):
        def configure_optimizers(self):
            return muon_optimizers(self, lr=0.02, adamw_lr=3e-3, weight_decay=0.1,
                                   scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup))

``trainer.fit(model, ckpt_path=...)`` resumes it exactly. The groups are named ``muon``,
``adamw`` and ``adamw_no_decay``, so ``LearningRateMonitor`` logs ``lr-Muon/muon`` and
``lr-Muon/adamw``. Under DDP or FSDP strategies, Lightning calls ``configure_optimizers`` on the
module (wrapped or not: routing looks through ``_forward_module``, ``module`` and ``_orig_mod``).
This module needs no Lightning import of its own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from . import build_optimizer


def muon_optimizers(module: nn.Module, *, scheduler: Optional[Callable[[Any], Any]] = None,
                    interval: str = "step", weight_decay: float = 0.0, **muon_kwargs: Any) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: ``{"optimizer": Muon, "lr_scheduler": {...}}``.

    Args:
        module: the LightningModule (or any module) to route.
        scheduler: ``optimizer -> LRScheduler`` (it scales every group, Muon's and AdamW's, alike).
        interval: ``"step"`` or ``"epoch"``, when Lightning steps the scheduler.
        weight_decay: decoupled decay of the Muon group and of AdamW's 2-D+ tensors; none on norms
            and biases.
        muon_kwargs: :class:`muonlab.Muon` options (``lr``, ``adamw_lr``, ...) and routing options
            (``adamw``, ``muon``, ``head``, ``views``, ``nonmatrix``).
    """
    optimizer = build_optimizer(module, weight_decay=weight_decay, **muon_kwargs)
    out: dict[str, Any] = {"optimizer": optimizer}
    if scheduler is not None:
        out["lr_scheduler"] = {"scheduler": scheduler(optimizer), "interval": interval}
    return out
