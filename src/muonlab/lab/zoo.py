"""The optimizer zoo: every named optimizer the lab can compare, built the same way for every run.

Each entry builds an optimizer for a model from a learning rate (``None``: the entry's default for
the model size). Every Muon-style entry routes embeddings, the output head, norms and biases to
AdamW with the AdamW baseline's learning rate, so that the comparison isolates what happens to the
hidden matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from muonlab import Muon, muon_param_groups


class ChainedOptimizer(Optimizer):
    """Several optimizers acting as one (e.g. torch.optim.Muon for matrices + AdamW for the rest).

    ``param_groups`` are the children's own group dicts, so LR schedulers and the trainer see one
    optimizer; ``state_dict`` nests the children's.
    """

    def __init__(self, optimizers: list[Optimizer]):
        self.optimizers = [o for o in optimizers if o is not None]
        self.defaults = {}
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self._optimizer_step_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_step_post_hooks = {}  # type: ignore[assignment]
        self._optimizer_state_dict_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_state_dict_post_hooks = {}  # type: ignore[assignment]
        self._optimizer_load_state_dict_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_load_state_dict_post_hooks = {}  # type: ignore[assignment]
        self._zero_grad_profile_name = "ChainedOptimizer.zero_grad"

    @property
    def state(self) -> dict:  # type: ignore[override]
        merged: dict = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # torch's base class may assign; children own the state
        pass

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"children": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        children = state_dict.get("children")
        if children is None or len(children) != len(self.optimizers):
            raise ValueError("state_dict does not match this ChainedOptimizer's children")
        for o, sd in zip(self.optimizers, children):
            o.load_state_dict(sd)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def __repr__(self) -> str:
        return "ChainedOptimizer(\n" + "\n".join(repr(o) for o in self.optimizers) + "\n)"


@dataclass
class ZooEntry:
    name: str
    family: str  # "muon" for Muon-style entries (matrices orthogonalized), else "elementwise"/...
    description: str
    build: Callable[[nn.Module, float, float, dict[str, Any]], Optimizer]
    default_lr: dict[str, float]  # by model size name; "*" for any other size
    needs_extra: Optional[str] = None  # pip extra needed (pytorch-optimizer)
    backward_create_graph: bool = False  # Sophia's Hessian estimate needs a second-order graph
    options: dict[str, Any] = field(default_factory=dict)

    def lr_for(self, size: str) -> float:
        return self.default_lr.get(size, self.default_lr["*"])


# AdamW's learning rate per size: also used for the AdamW part of every Muon-style entry.
ADAMW_LR = {"micro": 3e-3, "tiny": 2e-3, "mini": 1.5e-3, "small": 1e-3, "medium": 6e-4, "*": 6e-4}  # tiny: best of a 5e-4..3e-3 sweep (docs/lab.md); mini: between its neighbours; micro: the step down from tiny (the scaling study's sweep brackets it)
MUON_LR = {"micro": 0.02, "tiny": 0.02, "mini": 0.02, "small": 0.02, "medium": 0.02, "*": 0.02}
ADAMW_BETAS = (0.9, 0.95)  # LLM pretraining convention (GPT-3, Llama)
WEIGHT_DECAY = 0.0  # short runs: decay only adds a knob to tune; both families get the same


def _split_by_routing(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, everything else) with muonlab's routing, for third-party Muon entries."""
    muon, other = [], []
    for g in muon_param_groups(model):
        (muon if g["algorithm"] == "muon" else other).extend(g["params"])
    return muon, other


def _muon(**opts: Any) -> Callable[[nn.Module, float, float, dict[str, Any]], Optimizer]:
    def build(model: nn.Module, lr: float, adamw_lr: float, extra: dict[str, Any]) -> Optimizer:
        views = extra.pop("views", None)
        wd = extra.pop("weight_decay", WEIGHT_DECAY)  # the lab's weight decay: every parameter, both parts
        groups = muon_param_groups(model, views=views) if views else muon_param_groups(model)
        # a zoo name is a fixed recipe (cached runs are keyed by it): plain Muon unless the entry says
        # normuon=True, whatever Muon()'s default is
        return Muon(groups, lr=lr, adamw_lr=adamw_lr, adamw_betas=ADAMW_BETAS, weight_decay=wd,
                    adamw_weight_decay=wd, **{"normuon": False, **opts, **extra})

    return build


def _muon_split(model: nn.Module, lr: float, adamw_lr: float, extra: dict[str, Any]) -> Optimizer:
    """Muon Split (seed 000, GLM-5): q/k/v/o projections orthogonalized per attention head."""
    views: dict[str, str] = {}
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "n_head"):
        raise ValueError("muon-split needs a model with config.n_head (the lab GPT)")
    kv = getattr(cfg, "n_kv_head", cfg.n_head)
    for name, _ in model.named_parameters():
        if name.endswith("attn.wq.weight"):
            views[name] = f"heads:{cfg.n_head}"
        elif name.endswith(("attn.wk.weight", "attn.wv.weight")):
            views[name] = f"heads:{kv}"
        elif name.endswith("attn.wo.weight"):
            views[name] = f"heads:{cfg.n_head}:1"
    if not views:
        raise ValueError("muon-split found no attention projections named *.attn.wq/wk/wv/wo.weight")
    return _muon()(model, lr, adamw_lr, {**extra, "views": views})


def _torch_muon(model: nn.Module, lr: float, adamw_lr: float, extra: dict[str, Any]) -> Optimizer:
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError("torch.optim.Muon needs PyTorch >= 2.9")
    hidden, other = _split_by_routing(model)
    hidden2d = [p for p in hidden if p.ndim == 2]
    other += [p for p in hidden if p.ndim != 2]  # torch's Muon takes 2-D parameters only
    wd = extra.pop("weight_decay", WEIGHT_DECAY)
    return ChainedOptimizer([
        torch.optim.Muon(hidden2d, lr=lr, momentum=0.95, nesterov=True, weight_decay=wd, **extra),
        torch.optim.AdamW(other, lr=adamw_lr, betas=ADAMW_BETAS, weight_decay=wd) if other else None,
    ])


def _import_pytorch_optimizer(cls_name: str) -> Any:
    try:
        import pytorch_optimizer as mod
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"optimizer {cls_name} comes from pytorch-optimizer: pip install 'muonlab[lab]'") from exc
    return getattr(mod, cls_name)


def _po_muon_groups(model: nn.Module, lr: float, adamw_lr: float, wd: float) -> list[dict[str, Any]]:
    """pytorch-optimizer's ``use_muon`` groups with muonlab's routing (the same split as every Muon entry)."""
    hidden, other = _split_by_routing(model)
    groups = [dict(params=hidden, use_muon=True, lr=lr, weight_decay=wd)]
    if other:
        groups.append(dict(params=other, use_muon=False, lr=adamw_lr, betas=ADAMW_BETAS, weight_decay=wd))
    return groups


def _po_adamuon(model: nn.Module, lr: float, adamw_lr: float, extra: dict[str, Any]) -> Optimizer:
    """AdaMuon (Si et al. 2025, arXiv 2507.11005) as pytorch-optimizer ships it: an elementwise second
    moment on the orthogonalized momentum, rescaled to the RMS of Moonlight's 0.2*sqrt(max(A, B)) rule,
    so its learning rate is AdamW-like."""
    cls = _import_pytorch_optimizer("AdaMuon")
    wd = extra.pop("weight_decay", WEIGHT_DECAY)
    return cls(_po_muon_groups(model, lr, adamw_lr, wd), **extra)


def _po_muonclip(model: nn.Module, lr: float, adamw_lr: float, extra: dict[str, Any]) -> Optimizer:
    """pytorch-optimizer's MuonClip (Kimi K2, arXiv 2507.20534: Muon without Nesterov, Moonlight's lr
    rule, QK-Clip at threshold 100) on the lab GPT.

    Its clipping reads per-head max logits from ``step(attention_max_logits=...)`` and scales each
    labelled group's rows in head-sized blocks. The lab GPT has grouped-query attention, so each
    layer's query weight gets the (n_head,) logits and its key weight a separate label with the max
    over each key head's query group, (n_kv_head,): the block mapping is then the right one. The
    trainer hands the logits over through :meth:`set_max_logits` (it tracks them when an optimizer
    has that method)."""
    cls = _import_pytorch_optimizer("MuonClip")
    wd = extra.pop("weight_decay", WEIGHT_DECAY)
    specs = getattr(model, "qk_clip_specs", None)
    if specs is None:
        raise ValueError("muonclip needs the lab GPT (a model with qk_clip_specs()) to label its attention weights")
    labelled: dict[int, dict[str, Any]] = {}
    kv_groups: dict[str, tuple[str, int]] = {}
    for spec in specs():
        (q_rows,), (k_rows,) = spec.q, spec.k
        labelled[id(q_rows.tensor)] = dict(attention_name=spec.name, qk_clip="query")
        labelled[id(k_rows.tensor)] = dict(attention_name=spec.name + ".keys", qk_clip="key")
        kv_groups[spec.name] = (spec.name + ".keys", spec.n_heads // spec.n_kv_heads)
    groups = []
    for g in _po_muon_groups(model, lr, adamw_lr, wd):
        if not g["use_muon"]:
            groups.append(g)
            continue
        plain = [p for p in g["params"] if id(p) not in labelled]
        if plain:
            groups.append({**g, "params": plain})
        groups.extend({**g, "params": [p], **labelled[id(p)]} for p in g["params"] if id(p) in labelled)

    class LabMuonClip(cls):  # type: ignore[misc, valid-type]
        _max_logits: Optional[dict[str, torch.Tensor]] = None

        def set_max_logits(self, max_logits: dict[str, torch.Tensor]) -> None:
            """This step's per-head max logits, {layer: (n_head,)}, as GPT.track_max_logits() reports them."""
            per_group = dict(max_logits)
            for layer, value in max_logits.items():
                keys_name, group_size = kv_groups[layer]
                per_group[keys_name] = value.view(-1, group_size).amax(dim=1)  # the max over each key head's queries
            self._max_logits = per_group

        @torch.no_grad()
        def step(self, closure: Optional[Callable[[], Any]] = None, attention_max_logits: Any = None) -> Any:
            logits, self._max_logits = (attention_max_logits or self._max_logits), None
            return super().step(closure, attention_max_logits=logits)

    return LabMuonClip(groups, **extra)


def _simple(cls_path: str, **fixed: Any) -> Callable[[nn.Module, float, float, dict[str, Any]], Optimizer]:
    def build(model: nn.Module, lr: float, adamw_lr: float, extra: dict[str, Any]) -> Optimizer:
        module_name, _, cls_name = cls_path.rpartition(".")
        if module_name == "pytorch_optimizer":
            try:
                import pytorch_optimizer as mod
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    f"optimizer {cls_name} comes from pytorch-optimizer: pip install 'muonlab[lab]'"
                ) from exc
        else:
            mod = torch.optim
        cls = getattr(mod, cls_name)
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, lr=lr, **{**fixed, **extra})

    return build


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise ValueError(f"optimizer {entry.name!r} is already registered")
    ZOO[entry.name] = entry
    return entry


for _e in [
    ZooEntry("muon", "muon", "plain Muon (muonlab Muon with normuon=False; Keller quintic, 5 steps) + AdamW for "
             "embeddings/head/norms/biases",
             _muon(), MUON_LR),
    ZooEntry("muon-polar", "muon", "muonlab Muon with the Polar Express schedule", _muon(ns_coefficients="polar_express"), MUON_LR),
    ZooEntry("muon-you", "muon", "muonlab Muon with J. You's 6-step schedule", _muon(ns_coefficients="you", ns_steps=6), MUON_LR),
    ZooEntry("normuon", "muon", "NorMuon: Muon + per-neuron second-moment normalization (seed 004); muonlab Muon's "
             "default", _muon(normuon=True), MUON_LR),
    ZooEntry("muon-split", "muon", "Muon Split: attention projections orthogonalized per head (seed 000)", _muon_split, MUON_LR),
    ZooEntry("muon-moonlight", "muon", "Muon with Moonlight's AdamW-matched update RMS (adjust_lr_fn=match_rms_adamw)",
             _muon(adjust_lr_fn="match_rms_adamw"), ADAMW_LR),
    ZooEntry("muon-bf16state", "muon", "muonlab Muon with bf16 optimizer state (momentum and AdamW moments; fp32 "
             "arithmetic, stochastic rounding)", _muon(state_dtype="bf16"), MUON_LR),
    ZooEntry("torch-muon", "muon", "torch.optim.Muon (bf16 NS) on hidden 2-D matrices + torch AdamW", _torch_muon, MUON_LR),
    ZooEntry("adamw", "adaptive", "torch.optim.AdamW", _simple("torch.optim.AdamW", betas=ADAMW_BETAS, weight_decay=WEIGHT_DECAY), ADAMW_LR),
    ZooEntry("adam", "adaptive", "torch.optim.Adam", _simple("torch.optim.Adam", betas=ADAMW_BETAS), ADAMW_LR),
    ZooEntry("sgd", "sgd", "torch.optim.SGD without momentum", _simple("torch.optim.SGD"), {"*": 0.5}),
    ZooEntry("sgd-momentum", "sgd", "torch.optim.SGD, momentum 0.9", _simple("torch.optim.SGD", momentum=0.9), {"*": 0.1}),
    ZooEntry("nesterov", "sgd", "torch.optim.SGD, Nesterov momentum 0.9", _simple("torch.optim.SGD", momentum=0.9, nesterov=True), {"*": 0.1}),
    ZooEntry("adagrad", "adaptive", "torch.optim.Adagrad", _simple("torch.optim.Adagrad"), {"*": 1e-2}),
    ZooEntry("rmsprop", "adaptive", "torch.optim.RMSprop", _simple("torch.optim.RMSprop"), {"*": 1e-3}),
    ZooEntry("adafactor", "adaptive", "torch.optim.Adafactor (factored second moment)", _simple("torch.optim.Adafactor"), {"*": 1e-2}),
    ZooEntry("lion", "sign", "Lion (pytorch-optimizer)", _simple("pytorch_optimizer.Lion", betas=(0.9, 0.99)), {"*": 3e-4},
             needs_extra="lab"),
    ZooEntry("lamb", "adaptive", "LAMB (pytorch-optimizer)", _simple("pytorch_optimizer.Lamb", betas=(0.9, 0.95)), {"*": 3e-3},
             needs_extra="lab"),
    ZooEntry("lars", "sgd", "LARS (pytorch-optimizer)", _simple("pytorch_optimizer.LARS", momentum=0.9), {"*": 0.1},
             needs_extra="lab"),
    ZooEntry("sophia", "second-order", "SophiaH (pytorch-optimizer; Hutchinson Hessian, needs create_graph)",
             _simple("pytorch_optimizer.SophiaH"), {"*": 3e-3}, needs_extra="lab", backward_create_graph=True),
    ZooEntry("shampoo", "second-order", "Shampoo (pytorch-optimizer)", _simple("pytorch_optimizer.Shampoo", momentum=0.9),
             {"*": 3e-3}, needs_extra="lab"),
    ZooEntry("soap", "second-order", "SOAP (pytorch-optimizer)", _simple("pytorch_optimizer.SOAP"), {"*": 3e-3}, needs_extra="lab"),
    ZooEntry("adamuon", "muon", "AdaMuon (pytorch-optimizer): second moment on the orthogonalized momentum, "
             "Moonlight-scaled lr", _po_adamuon, ADAMW_LR, needs_extra="lab"),
    ZooEntry("muonclip", "muon", "MuonClip (pytorch-optimizer): Kimi K2's Muon + QK-Clip at tau 100, Moonlight-scaled lr",
             _po_muonclip, ADAMW_LR, needs_extra="lab"),
]:
    register(_e)


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    size: str = "*",
    lr: Optional[float] = None,
    adamw_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    **extra: Any,
) -> Optimizer:
    """Build zoo optimizer ``name`` for ``model`` with the size's default or the given lr.

    ``weight_decay`` (None: the zoo's, 0) is the optimizer's own ``weight_decay`` for every parameter
    (decoupled, times the lr, for AdamW, Lion and the Muon family, whose AdamW part gets it too).

    Example:
        >>> from torch import nn
        >>> opt = build_optimizer("adamw", nn.Linear(4, 4), lr=1e-3)
        >>> type(opt).__name__
        'AdamW'
    """
    entry = get_entry(name)
    lr = entry.lr_for(size) if lr is None else lr
    if not (lr > 0):
        raise ValueError(f"optimizer {name}: learning rate must be > 0, got {lr}")
    adamw_lr = ADAMW_LR.get(size, ADAMW_LR["*"]) if adamw_lr is None else adamw_lr
    if weight_decay is not None:
        extra["weight_decay"] = check_weight_decay(weight_decay, f"optimizer {name}: ")
    return entry.build(model, lr, adamw_lr, dict(extra))


def check_weight_decay(value: Any, where: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0; else a ValueError naming it (``where`` prefixes
    the message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{where}weight_decay must be a number >= 0, got {value!r}")
    return float(value)


def parse_optimizer_list(text: str | Iterable[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"no optimizer given; valid optimizers: {', '.join(sorted(ZOO))}")
    for n in names:
        get_entry(n)
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer listed twice: {names}")
    return names
