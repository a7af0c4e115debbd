"""Integrations with third-party training stacks; beside layer 3, never imported by the core.

* :mod:`muonlab.integrations.hf` - Hugging Face ``transformers``: a Trainer optimizer factory
  (:func:`~muonlab.integrations.hf.muon_optimizer`), :class:`~muonlab.integrations.hf.MuonTrainer`,
  a callback that logs both groups' learning rates, and small random models of any architecture
  for routing reports (``muonlab route --arch NAME``).
* :mod:`muonlab.integrations.lightning` - Lightning: :func:`~muonlab.integrations.lightning.muon_optimizers`
  for ``configure_optimizers``.

Each module imports its library when it is imported (``pip install 'muonlab[integrations]'``);
importing this package imports neither. Wrapped models (torch.compile, DDP, FSDP2) need no
integration: :func:`muonlab.muon_param_groups` routes through the wrappers itself.
"""

from typing import Any, Optional

from torch import nn

from ..optimizer import Muon
from ..routing import ParamGroups, muon_param_groups

INSTALL_HINT = "pip install 'muonlab[integrations]'"


def split_decay(groups: list, weight_decay: float) -> ParamGroups:
    """Split the AdamW group of :func:`muonlab.muon_param_groups` into a decayed group (2-D+ tensors:
    embeddings, head) and an undecayed one (norm weights, biases, other 0-D/1-D tensors), the
    convention of Hugging Face's Trainer and nanoGPT; the Muon group gets ``weight_decay`` too.
    Groups are named (``"muon"``, ``"adamw"``, ``"adamw_no_decay"``) for learning-rate loggers."""
    out = ParamGroups()
    out.frozen = list(getattr(groups, "frozen", []))
    for g in groups:
        if g["algorithm"] != "adamw":
            out.append({**g, "name": g["algorithm"], "weight_decay": weight_decay})
            continue
        keep = [i for i, p in enumerate(g["params"]) if p.ndim >= 2]
        rest = [i for i, p in enumerate(g["params"]) if p.ndim < 2]
        for name, idx, wd in (("adamw", keep, weight_decay), ("adamw_no_decay", rest, 0.0)):
            if idx:
                out.append({
                    **{k: v for k, v in g.items() if k not in ("params", "param_names", "views", "routing")},
                    "params": [g["params"][i] for i in idx],
                    "param_names": [g["param_names"][i] for i in idx],
                    "views": [g["views"][i] for i in idx],
                    "routing": [g["routing"][i] for i in idx],
                    "name": name,
                    "weight_decay": wd,
                })
    return out


def group_lrs(optimizer: Any, logged_lr: Optional[float] = None) -> dict:
    """``{"muon": lr, "adamw": lr, ...}``: the first group's lr of each algorithm (a scheduler scales
    every group by the same factor, so one value per algorithm says it all).

    ``logged_lr``: the lr a trainer logged for the first group. Trainers log the lr the last step
    used, read before the scheduler moved on; with it, each algorithm's lr is that step's too
    (``logged_lr * initial_lr / first group's initial_lr``)."""
    groups = list(getattr(optimizer, "param_groups", []))
    as_float = lambda v: float(v.item()) if hasattr(v, "item") else float(v)  # noqa: E731
    scale = None
    if logged_lr is not None and groups and all("initial_lr" in g for g in groups):
        first = as_float(groups[0]["initial_lr"])
        if first > 0:
            scale = logged_lr / first
    out: dict = {}
    for g in groups:
        alg = g.get("algorithm")
        if alg is not None and alg not in out:
            out[alg] = as_float(g["initial_lr"]) * scale if scale is not None else as_float(g["lr"])
    return out


ROUTING_KEYS = ("adamw", "muon", "head", "views", "nonmatrix")


def build_optimizer(model: nn.Module, *, weight_decay: float = 0.0, **kwargs: Any) -> Muon:
    """:class:`muonlab.Muon` over ``model`` as the trainer integrations build it: routed by
    :func:`muonlab.muon_param_groups` (keys ``adamw``, ``muon``, ``head``, ``views``, ``nonmatrix``
    go there), groups named and split by :func:`split_decay` with ``weight_decay``; every other
    keyword is a :class:`muonlab.Muon` option."""
    routing = {k: kwargs.pop(k) for k in ROUTING_KEYS if k in kwargs}
    groups = split_decay(muon_param_groups(model, **routing), weight_decay)
    kwargs.setdefault("adamw_weight_decay", weight_decay)
    return Muon(groups, **kwargs)
