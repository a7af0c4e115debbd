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

from ..routing import ParamGroups

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


def group_lrs(optimizer) -> dict:
    """``{"muon": lr, "adamw": lr, ...}``: the first group's lr of each algorithm (a scheduler scales
    every group by the same factor, so one value per algorithm says it all)."""
    out: dict = {}
    for g in getattr(optimizer, "param_groups", []):
        alg = g.get("algorithm")
        if alg is not None and alg not in out:
            lr = g["lr"]
            out[alg] = float(lr.item()) if hasattr(lr, "item") else float(lr)
    return out
