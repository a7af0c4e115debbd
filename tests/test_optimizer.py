"""Tests for ``muonlab.Muon`` (layer 3): parity with torch.optim, the orthogonalization, the
torch.optim contract, input validation, non-finite gradients, statistics and options.

Everything runs on CPU with tiny tensors.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import nn

import muonlab
from muonlab import Muon, NonFiniteGradientError, adjust_lr_scale, muon_param_groups
from muonlab.reference import torch_ns_fp32

KELLER = (3.4445, -4.7750, 2.0315)



# ---------------------------------------------------------------------- helpers
_ns_fp32 = torch_ns_fp32  # torch's NS with the bf16 cast made fp32 (muonlab.reference)


def _msign(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).to(G.dtype)


def _svals(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(M.double())


def _fill_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _snapshot(opt: Muon):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def _assert_same_snapshot(opt: Muon, snap) -> None:
    params, state = snap
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now))
    assert set(state) == {id(p) for p in opt.state}
    for p, s in opt.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if isinstance(v, torch.Tensor) else v == state[id(p)][k]


class TinyLM(nn.Module):
    """Embedding -> two hidden Linear layers -> LayerNorm -> head (not tied)."""

    def __init__(self, vocab: int = 20, d: int = 12, hidden: int = 24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


def _lm_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 20, (4, 6), generator=gen)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


# exact one-shot orthogonalization: update = -lr * msign(grad), nothing else
EXACT = dict(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, ns_method="svd", adjust_lr_fn="none", normuon=False)


def _one_exact_step(opt: Muon, seed: int = 0):
    params = [p for g in opt.param_groups for p in g["params"]]
    _fill_grads(params, seed)
    grads = {id(p): p.grad.clone() for p in params}
    before = {id(p): p.detach().clone() for p in params}
    opt.step()
    updates = {id(p): before[id(p)] - p.detach() for p in params}
    return grads, updates


# ====================================================================== parity with torch.optim
# (512, 128): the default ns_method="auto" runs the Gram iteration on it (fp32, n = 4m), so the
# parity tests hold that path to torch's plain Newton-Schulz too
PARITY_SHAPES = [(32, 16), (16, 48), (24, 24), (64, 8), (512, 128)]


def _run_parity(monkeypatch, *, fp32: bool, adjust_lr_fn: str, nesterov: bool, weight_decay: float, steps: int = 5):
    torch.manual_seed(0)
    ours = [torch.randn(s, requires_grad=True) for s in PARITY_SHAPES]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = Muon([{"params": ours, "algorithm": "muon"}], lr=0.02, momentum=0.9, nesterov=nesterov, normuon=False,
               weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn, ns_coefficients="keller", ns_steps=5,
               ns_dtype=None if fp32 else "bf16")
    if fp32:
        monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _ns_fp32)
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                               ns_coefficients=KELLER, ns_steps=5, eps=1e-7, adjust_lr_fn=adjust_lr_fn)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    # error relative to the total movement of each parameter
    return max(float((a.detach() - b.detach()).norm() / (b.detach() - s).norm()) for a, b, s in zip(ours, ref, start))


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 0.1), (True, 0.1)])
def test_parity_with_torch_muon_fp32(monkeypatch, adjust_lr_fn, nesterov, weight_decay):
    err = _run_parity(monkeypatch, fp32=True, adjust_lr_fn=adjust_lr_fn, nesterov=nesterov, weight_decay=weight_decay)
    assert err < 2e-5, err


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_parity_with_torch_muon_bf16(monkeypatch, adjust_lr_fn):
    # torch.optim.Muon always iterates in bf16 (and normalises in bf16); ours normalises in fp32 first
    err = _run_parity(monkeypatch, fp32=False, adjust_lr_fn=adjust_lr_fn, nesterov=True, weight_decay=0.1)
    assert err < 5e-2, err


def test_parity_detects_a_changed_setting(monkeypatch):
    # the parity harness is sharp: a different Nesterov setting on one side is far outside tolerance
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _ns_fp32)
    torch.manual_seed(0)
    ours = [torch.randn(16, 8, requires_grad=True)]
    ref = [ours[0].detach().clone().requires_grad_()]
    opt = Muon([{"params": ours, "algorithm": "muon"}], lr=0.02, momentum=0.9, nesterov=True, normuon=False)
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.0)
    for s in range(3):
        g = torch.randn(16, 8, generator=torch.Generator().manual_seed(s))
        ours[0].grad, ref[0].grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert float((ours[0] - ref[0]).detach().norm()) > 1e-3


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_groups_match_torch_adamw(foreach, weight_decay):
    torch.manual_seed(0)
    shapes = [(10, 4), (7,), (3, 5), ()]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = Muon([{"params": ours, "algorithm": "adamw"}], adamw_lr=1e-2, adamw_betas=(0.9, 0.99),
               adamw_eps=1e-8, adamw_weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, foreach=foreach)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_mixed_model_adamw_part_matches_torch_adamw():
    # inside a full Muon(model), the AdamW-routed parameters follow torch.optim.AdamW exactly
    torch.manual_seed(0)
    model = TinyLM()
    ref_model = copy.deepcopy(model)
    opt = Muon(model, lr=0.02, adamw_lr=3e-3, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.01)
    adamw_names = [n for g in opt.param_groups if g["algorithm"] == "adamw" for n in g["param_names"]]
    ref_params = dict(ref_model.named_parameters())
    ref_opt = torch.optim.AdamW([ref_params[n] for n in adamw_names], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    for s in range(4):
        # same grads for the AdamW part on both sides (the models diverge through the Muon part)
        _fill_grads(model.parameters(), s)
        _fill_grads(ref_model.parameters(), s)
        opt.step()
        ref_opt.step()
    own = dict(model.named_parameters())
    for n in adamw_names:
        torch.testing.assert_close(own[n], ref_params[n], rtol=0, atol=1e-7)


# ====================================================================== batched vs loop, foreach
class ManySame(nn.Module):
    def __init__(self):
        super().__init__()
        self.sq = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(6))
        self.tall = nn.ModuleList(nn.Linear(8, 24, bias=False) for _ in range(3))
        self.wide = nn.Linear(24, 8, bias=False)
        self.head = nn.Linear(16, 4)


@pytest.mark.parametrize("options", [
    dict(),
    dict(nesterov=False, weight_decay=0.05),
    dict(normuon=True, adjust_lr_fn="match_rms_adamw"),
    dict(momentum_form="sum", clip_momentum_norm=2.0),
    dict(ns_coefficients="polar_express", ns_steps=6),
])
def test_batched_equals_loop_and_foreach_equals_plain(options):
    torch.manual_seed(0)
    base = ManySame()
    runs = {}
    for batched, foreach in [(True, True), (False, True), (True, False), (False, False)]:
        model = copy.deepcopy(base)
        opt = Muon(model, batched=batched, foreach=foreach, **options)
        assert sum(len(g["params"]) for g in opt.param_groups if g["algorithm"] == "muon") == 10
        for s in range(3):
            _fill_grads(model.parameters(), s)
            opt.step()
        runs[(batched, foreach)] = [p.detach().clone() for p in model.parameters()]
    ref = runs[(False, False)]
    moved = [float((a - b.detach()).abs().max()) for a, b in zip(ref, base.parameters())]
    assert min(moved) > 1e-4  # every parameter did move
    for key, params in runs.items():
        for a, b in zip(params, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{key} differs from the per-matrix loop")


# ====================================================================== the orthogonalization ran where the report says
def test_update_is_orthogonal_exactly_on_muon_parameters():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, **EXACT, adamw_lr=1e-3)
    grads, updates = _one_exact_step(opt)
    params = dict(model.named_parameters())
    rows = {r.name: r for r in opt.routing_report().rows}
    assert {n for n, r in rows.items() if r.algorithm == "muon"} == {"up.weight", "down.weight"}
    for name, row in rows.items():
        p = params[name]
        upd = updates[id(p)]
        if row.algorithm == "muon":
            s = _svals(upd)
            assert len(s) == min(p.shape)
            torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
            torch.testing.assert_close(upd, _msign(grads[id(p)]), atol=1e-5, rtol=0)
        elif p.ndim == 2:
            s = _svals(upd)
            assert float(s.max() / s.min()) > 1.5, f"{name}: an AdamW update should not be orthogonal"
    # the embedding update: Adam's first step is ~lr*sign(g) on the rows, nowhere near U Vᵀ
    s = _svals(updates[id(model.emb.weight)])
    assert not torch.allclose(s, torch.ones_like(s), atol=0.1)


class HeadsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 32, bias=False)  # (32, 16): 4 heads of (8, 16)
        self.wo = nn.Linear(32, 16, bias=False)  # (16, 32): 4 heads of (16, 8) along the input dim
        self.lm_head = nn.Linear(16, 5)


def test_heads_view_orthogonalizes_each_head_on_its_own():
    torch.manual_seed(0)
    model = HeadsModel()
    groups = muon_param_groups(model, views={"wq.weight": "heads:4", "wo.weight": "heads:4:1"})
    opt = Muon(groups, **EXACT)
    report = {r.name: r for r in opt.routing_report().rows}
    assert report["wq.weight"].view == "heads:4" and report["wq.weight"].matrices == "4x(8, 16)"
    assert report["wo.weight"].view == "heads:4:1" and report["wo.weight"].matrices == "4x(16, 8)"
    grads, updates = _one_exact_step(opt)
    uq, gq = updates[id(model.wq.weight)], grads[id(model.wq.weight)]
    for h in range(4):
        blk = uq[8 * h:8 * (h + 1)]
        torch.testing.assert_close(_svals(blk), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(blk, _msign(gq[8 * h:8 * (h + 1)]), atol=1e-5, rtol=0)
    # ... and the whole matrix's update is not U Vᵀ of the whole gradient
    assert float((uq - _msign(gq)).norm()) > 0.5
    s = _svals(uq)
    assert float(s.max() - s.min()) > 0.1
    uo, go = updates[id(model.wo.weight)], grads[id(model.wo.weight)]
    for h in range(4):
        blk = uo[:, 8 * h:8 * (h + 1)]
        torch.testing.assert_close(blk, _msign(go[:, 8 * h:8 * (h + 1)]), atol=1e-5, rtol=0)
    assert float((uo - _msign(go)).norm()) > 0.5


class MHAModel(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4)
        self.lm_head = nn.Linear(d, 7)


def test_multihead_attention_in_proj_is_split_into_q_k_v():
    torch.manual_seed(0)
    model = MHAModel()
    opt = Muon(model, **EXACT)
    report = {r.name: r for r in opt.routing_report().rows}
    assert report["attn.in_proj_weight"].algorithm == "muon"
    assert report["attn.in_proj_weight"].view == "split:16,16,16"
    assert report["attn.out_proj.weight"].algorithm == "muon"
    assert report["attn.in_proj_bias"].algorithm == "adamw"
    grads, updates = _one_exact_step(opt)
    u, g = updates[id(model.attn.in_proj_weight)], grads[id(model.attn.in_proj_weight)]
    for i in range(3):
        torch.testing.assert_close(u[16 * i:16 * (i + 1)], _msign(g[16 * i:16 * (i + 1)]), atol=1e-5, rtol=0)
    # three stacked orthogonal 16x16 blocks: UᵀU = 3I, every singular value is sqrt(3), not 1
    torch.testing.assert_close(_svals(u), torch.full((16,), math.sqrt(3), dtype=torch.float64), atol=1e-5, rtol=0)


def test_conv_kernel_is_flattened():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6, 2))
    opt = Muon(model, **EXACT)
    report = {r.name: r for r in opt.routing_report().rows}
    assert report["0.weight"].view == "flatten" and report["0.weight"].matrices == "1x(8, 27)"
    grads, updates = _one_exact_step(opt)
    for conv in (model[0], model[2]):
        w = conv.weight
        u = updates[id(w)].reshape(w.shape[0], -1)
        torch.testing.assert_close(_svals(u), torch.ones(w.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(u, _msign(grads[id(w)].reshape(w.shape[0], -1)), atol=1e-5, rtol=0)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(4, 8, 16))  # 4 experts of (8, 16)
        self.router = nn.Linear(16, 4, bias=False)
        self.lm_head = nn.Linear(16, 3)


def test_expert_stack_orthogonalizes_each_expert():
    torch.manual_seed(0)
    model = Experts()
    opt = Muon(model, **EXACT)
    row = {r.name: r for r in opt.routing_report().rows}["w_in"]
    assert (row.algorithm, row.view, row.matrices) == ("muon", "experts", "4x(8, 16)")
    grads, updates = _one_exact_step(opt)
    u, g = updates[id(model.w_in)], grads[id(model.w_in)]
    for e in range(4):
        torch.testing.assert_close(u[e], _msign(g[e]), atol=1e-5, rtol=0)
    assert float((u.reshape(32, 16) - _msign(g.reshape(32, 16))).norm()) > 0.5


# ====================================================================== torch.optim contract
def test_construction_forms_module_named_plain_and_groups():
    torch.manual_seed(0)
    model = TinyLM()
    from_module = Muon(model)
    with pytest.warns(UserWarning, match="without a module"):
        from_named = Muon(model.named_parameters())
    with pytest.warns(UserWarning, match="without a module"):
        from_plain = Muon(model.parameters())
    from_groups = Muon(muon_param_groups(model))
    algs = lambda o: sorted((g["algorithm"], len(g["params"])) for g in o.param_groups)  # noqa: E731
    assert algs(from_module) == algs(from_groups) == [("adamw", 5), ("muon", 2)]
    # by shape alone, every 2-D tensor (embedding and head included) goes to Muon
    assert algs(from_named) == algs(from_plain) == [("adamw", 3), ("muon", 4)]
    assert "emb.weight" in from_named.param_groups[0]["param_names"]
    # the warning is emitted once per optimizer, not once per group
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Muon([{"params": [model.up.weight]}, {"params": [model.down.weight]}])
    assert len([w for w in rec if "without a module" in str(w.message)]) == 1
    with pytest.raises(TypeError, match="single Tensor"):
        Muon(model.up.weight)
    with pytest.raises(ValueError, match="empty"):
        Muon([])


def test_closure_returns_loss_with_grad_enabled():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model)
    seen = {}

    def closure():
        seen["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = _lm_loss(model)
        loss.backward()
        return loss

    before = model.up.weight.detach().clone()
    loss = opt.step(closure)
    assert seen["grad_enabled"] is True
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert not torch.equal(before, model.up.weight)


def test_none_grad_is_a_noop():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model)
    params = list(model.parameters())
    _fill_grads(params, 0)
    opt.step()
    snap = _snapshot(opt)
    for p in params:
        p.grad = None
    opt.step()
    _assert_same_snapshot(opt, snap)
    # a parameter that never had a gradient gets no state at all
    model2 = TinyLM()
    opt2 = Muon(model2)
    model2.up.weight.grad = torch.randn_like(model2.up.weight)
    before = model2.down.weight.detach().clone()
    opt2.step()
    assert model2.down.weight not in opt2.state and torch.equal(before, model2.down.weight)
    assert model2.up.weight in opt2.state


@pytest.mark.parametrize("lr", [0.0, 0.02])
def test_zero_grads_leave_params_unchanged(lr):
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, lr=lr, adamw_lr=lr)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


def _stateful_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM()
    groups = [
        {"params": [("up.weight", model.up.weight)], "algorithm": "muon", "weight_decay": 0.01},
        {"params": [("down.weight", model.down.weight)], "algorithm": "muon", "normuon": True,
         "adjust_lr_fn": "match_rms_adamw", "lr": 3e-3},
        {"params": [(n, p) for n, p in model.named_parameters() if n not in ("up.weight", "down.weight")],
         "algorithm": "adamw", "lr": 1e-3, "weight_decay": 0.1},
    ]
    return model, groups


def test_state_dict_round_trip_through_a_file_continues_bitwise(tmp_path):
    model, groups = _stateful_setup()
    opt = Muon(groups, lr=torch.tensor(0.02), cautious_weight_decay=True)
    for s in range(3):
        _fill_grads(model.parameters(), s)
        opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    # a fresh optimizer on a copy of the model, restored from the file
    model2, groups2 = _stateful_setup(seed=123)
    model2.load_state_dict(model.state_dict())
    opt2 = Muon(groups2, lr=torch.tensor(0.02), cautious_weight_decay=True)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[1]["normuon"] is True
    assert "normuon_v" in opt2.state[model2.down.weight]
    for s in range(3, 7):
        _fill_grads(model.parameters(), s)
        _fill_grads(model2.parameters(), s)
        opt.step()
        opt2.step()
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p2][k])


def test_older_state_dict_without_new_options_loads_and_steps(tmp_path):
    model, groups = _stateful_setup()
    opt = Muon(groups)
    _fill_grads(model.parameters(), 0)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for key in ("normuon", "cautious_weight_decay", "clip_momentum_norm", "momentum_form"):
            g.pop(key, None)
    torch.save(sd, tmp_path / "old.pt")
    model2, groups2 = _stateful_setup()
    opt2 = Muon(groups2)
    opt2.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    for g in opt2.param_groups:
        assert g["cautious_weight_decay"] is False and g["normuon"] is False
        assert g["momentum_form"] == "ema" and g["clip_momentum_norm"] is None
    _fill_grads(model2.parameters(), 1)
    before = model2.up.weight.detach().clone()
    opt2.step()
    assert torch.isfinite(model2.up.weight).all() and not torch.equal(before, model2.up.weight)


def test_load_state_dict_with_wrong_shapes_names_the_parameter():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(8, 12, bias=False), nn.ReLU(), nn.Linear(12, 4))
    opt_a, opt_b = Muon(a), Muon(b)
    _fill_grads(a.parameters(), 0)
    opt_a.step()
    with pytest.raises(ValueError, match=r"0\.weight"):
        opt_b.load_state_dict(opt_a.state_dict())


def test_load_state_dict_with_other_algorithm_names_the_parameter():
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 6, requires_grad=True), torch.randn(6, 6, requires_grad=True)
    opt_a = Muon([{"params": [("w1", w1)], "algorithm": "muon"}, {"params": [("w2", w2)], "algorithm": "adamw"}])
    _fill_grads([w1, w2], 0)
    opt_a.step()
    v1, v2 = w1.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    opt_b = Muon([{"params": [("w1", v1)], "algorithm": "adamw"}, {"params": [("w2", v2)], "algorithm": "muon"}])
    with pytest.raises(ValueError, match=r"w1.*'adamw'.*'muon'"):
        opt_b.load_state_dict(opt_a.state_dict())
    opt_c = Muon([{"params": [("w1", v1)], "algorithm": "muon"}])
    with pytest.raises(ValueError, match="param groups"):
        opt_c.load_state_dict(opt_a.state_dict())


def test_deepcopy_is_working_and_independent():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, nonfinite="skip", track_stats=True)
    _fill_grads(model.parameters(), 0)
    opt.step()
    snap = _snapshot(opt)
    clone = copy.deepcopy(opt)
    assert clone.nonfinite == "skip" and clone.track_stats is True
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(clone_params, model.parameters()))
    _fill_grads(clone_params, 1)
    clone.step()  # must work (attributes survive the copy) and must not touch the original
    _assert_same_snapshot(opt, snap)
    assert set(clone.last_stats) == set(opt.last_stats)
    assert str(clone.routing_report()) == str(opt.routing_report())


def test_repr_mentions_algorithms_and_options():
    model = TinyLM()
    opt = Muon(model, lr=torch.tensor(0.02), normuon=True)
    text = repr(opt)
    assert "[muon]" in text and "[adamw]" in text
    assert "normuon" in text and "(tensor)" in text and "adjust_lr_fn=original" in text
    assert str(opt) == text


def test_lambda_lr_scheduler_scales_every_group_and_the_step():
    torch.manual_seed(0)
    base = TinyLM()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    opt1 = Muon(m1, lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt1, lambda step: 0.5)
    assert [g["lr"] for g in opt1.param_groups] == [0.01, 0.0005]
    opt2 = Muon(m2, lr=0.01, adamw_lr=5e-4)
    for s in range(3):
        _fill_grads(m1.parameters(), s)
        _fill_grads(m2.parameters(), s)
        opt1.step()
        opt2.step()
        sched.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_cosine_scheduler_reaches_zero_and_stops_learning():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for s in range(4):
        _fill_grads(model.parameters(), s)
        opt.step()
        sched.step()
        expected = 0.5 * (1 + math.cos(math.pi * (s + 1) / 4))
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * expected, abs=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * expected, abs=1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    _fill_grads(model.parameters(), 9)
    opt.step()  # lr is 0 everywhere now
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_add_param_group_muon_and_adamw():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, adamw_lr=1e-3, **{k: v for k, v in EXACT.items() if k != "lr"}, lr=1.0)
    extra = nn.Linear(10, 6)
    opt.add_param_group({"params": [("extra.weight", extra.weight)], "algorithm": "muon"})
    opt.add_param_group({"params": [("extra.bias", extra.bias)], "algorithm": "adamw", "betas": (0.8, 0.9)})
    assert len(opt.param_groups) == 4
    new_muon, new_adamw = opt.param_groups[2], opt.param_groups[3]
    assert new_muon["ns_method"] == "svd" and new_muon["views"] == ["matrix"]
    assert new_adamw["lr"] == 1e-3 and new_adamw["betas"] == (0.8, 0.9) and new_adamw["eps"] == 1e-8
    rows = {r.name: r.algorithm for r in opt.routing_report().rows}
    assert rows["extra.weight"] == "muon" and rows["extra.bias"] == "adamw"
    w_before, b_before = extra.weight.detach().clone(), extra.bias.detach().clone()
    g = torch.randn(6, 10)
    _fill_grads(model.parameters(), 0)
    extra.weight.grad, extra.bias.grad = g.clone(), torch.randn(6)
    opt.step()
    torch.testing.assert_close(w_before - extra.weight.detach(), _msign(g), atol=1e-5, rtol=0)
    assert float((b_before - extra.bias.detach()).abs().max()) == pytest.approx(1e-3, rel=1e-3)  # Adam's first step
    # the same parameter twice is refused
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [("again", extra.weight)], "algorithm": "muon"})
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        opt.add_param_group({"params": [("x", torch.zeros(2, 2, requires_grad=True))], "algorithm": "sgd"})


def test_add_param_group_with_invalid_options_leaves_the_optimizer_unchanged():
    model = TinyLM()
    opt = Muon(model)
    n = len(opt.param_groups)
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"-1"):
        opt.add_param_group({"params": [("w", w)], "algorithm": "muon", "lr": -1.0})
    assert len(opt.param_groups) == n
    opt.add_param_group({"params": [("w", w)], "algorithm": "muon"})  # the parameter is still free
    assert len(opt.param_groups) == n + 1


def test_zero_grad_sets_grads_to_none():
    model = TinyLM()
    opt = Muon(model)
    _fill_grads(model.parameters(), 0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _fill_grads(model.parameters(), 0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_tensor_lr_equals_float_lr():
    torch.manual_seed(0)
    base = TinyLM()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    opt1 = Muon(m1, lr=torch.tensor(0.02), adamw_lr=torch.tensor(1e-3))
    opt2 = Muon(m2, lr=0.02, adamw_lr=1e-3)
    assert isinstance(opt1.param_groups[0]["lr"], torch.Tensor)
    for s in range(3):
        _fill_grads(m1.parameters(), s)
        _fill_grads(m2.parameters(), s)
        opt1.step()
        opt2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="one element"):
        Muon(TinyLM(), lr=torch.tensor([0.1, 0.2]))


# ====================================================================== bad input
def _matrix():
    return [{"params": [("w", nn.Parameter(torch.randn(6, 4)))], "algorithm": "muon"}]


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(lr=-0.1), r"learning rate -0\.1"),
    (dict(lr=float("nan")), r"learning rate nan"),
    (dict(weight_decay=-0.01), r"weight_decay -0\.01"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1\.0"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\), got -0\.1"),
    (dict(ns_steps=0), r"ns_steps must be an int >= 1, got 0"),
    (dict(ns_coefficients="nope"), r"'nope'"),
    (dict(ns_method="qr"), r"'qr'"),
    (dict(ns_dtype="int8"), r"'int8'"),
    (dict(adjust_lr_fn="bogus"), r"'bogus'"),
    (dict(momentum_form="avg"), r"'avg'"),
    (dict(clip_momentum_norm=0.0), r"clip_momentum_norm must be > 0 .*got 0\.0"),
    (dict(normuon_beta2=1.0), r"normuon_beta2 .* got 1\.0"),
    (dict(nonfinite="ignore"), r"'ignore'"),
    (dict(adamw_lr=-1e-3), r"learning rate -0\.001"),
    (dict(adamw_betas=(0.9, 1.5)), r"\(0\.9, 1\.5\)"),
    (dict(adamw_weight_decay=-0.1), r"weight_decay -0\.1"),
])
def test_bad_options_raise_with_the_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Muon(_matrix(), **kwargs)


@pytest.mark.parametrize("group,pattern", [
    ({"lr": -0.5}, r"param group 0: invalid learning rate -0\.5"),
    ({"momentum": 1.0}, r"param group 0: momentum must be in \[0, 1\), got 1\.0"),
    ({"ns_steps": 0}, r"got 0"),
    ({"ns_coefficients": "nope"}, r"'nope'"),
])
def test_bad_group_options_raise_with_the_value(group, pattern):
    with pytest.raises(ValueError, match=pattern):
        Muon([{**_matrix()[0], **group}])


def test_one_d_tensor_in_a_muon_group_names_its_shape():
    with pytest.raises(ValueError, match=r"bias.*\(5,\).*'adamw'"):
        Muon([{"params": [("bias", nn.Parameter(torch.zeros(5)))], "algorithm": "muon"}])
    with pytest.raises(ValueError, match=r"\(\)"):
        Muon([{"params": [("scalar", nn.Parameter(torch.tensor(1.0)))], "algorithm": "muon"}])


def test_complex_and_integer_params_raise_type_error():
    with pytest.raises(TypeError, match="complex"):
        Muon([{"params": [("z", nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)))], "algorithm": "muon"}])
    with pytest.raises(TypeError, match="complex"):
        Muon([{"params": [("z", nn.Parameter(torch.randn(4, dtype=torch.complex64)))], "algorithm": "adamw"}])
    with pytest.raises(TypeError, match="non-floating"):
        Muon([{"params": [("i", torch.zeros(4, 4, dtype=torch.int64))], "algorithm": "adamw"}])


def test_view_that_does_not_divide_names_parameter_and_shape():
    w = nn.Parameter(torch.randn(30, 16))
    with pytest.raises(ValueError, match=r"wq.*\(30, 16\).*heads:4"):
        Muon([{"params": [("wq", w)], "algorithm": "muon", "views": ["heads:4"]}])
    with pytest.raises(ValueError, match=r"wq.*\(30, 16\).*sum to 31"):
        Muon([{"params": [("wq", w)], "algorithm": "muon", "views": ["split:10,10,11"]}])
    with pytest.raises(ValueError, match="'views' has 2 entries for 1 parameters"):
        Muon([{"params": [("wq", w)], "algorithm": "muon", "views": ["matrix", "matrix"]}])


def test_sparse_gradient_raises_before_any_state_is_modified():
    torch.manual_seed(0)
    hidden = nn.Linear(4, 4, bias=False)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([{"params": [("hidden.weight", hidden.weight)], "algorithm": "muon"},
                {"params": [("emb.weight", emb.weight)], "algorithm": "adamw"}])
    hidden(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad.is_sparse
    snap = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"emb\.weight.*sparse"):
        opt.step()
    _assert_same_snapshot(opt, snap)
    assert len(opt.state) == 0


# ====================================================================== non-finite gradients
def _nonfinite_setup(policy: str):
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, nonfinite=policy)
    _fill_grads(model.parameters(), 0)
    opt.step()
    _fill_grads(model.parameters(), 1)
    model.down.weight.grad[0, 0] = float("nan")
    model.norm.bias.grad[1] = float("inf")
    return model, opt


def test_nonfinite_default_raises_and_changes_nothing():
    model, opt = _nonfinite_setup("raise")
    snap = _snapshot(opt)
    with pytest.raises(NonFiniteGradientError, match=r"down\.weight.*norm\.bias"):
        opt.step()
    _assert_same_snapshot(opt, snap)
    assert issubclass(muonlab.NonFiniteGradientError, RuntimeError)


def test_nonfinite_skip_warns_counts_and_changes_nothing():
    model, opt = _nonfinite_setup("skip")
    snap = _snapshot(opt)
    with pytest.warns(RuntimeWarning, match=r"skipped a step.*down\.weight"):
        opt.step()
    assert opt.skipped_steps == 1
    _assert_same_snapshot(opt, snap)
    _fill_grads(model.parameters(), 2)
    opt.step()  # the next finite step goes through
    assert opt.skipped_steps == 1
    assert not torch.equal(snap[0][0], next(model.parameters()))


def test_nonfinite_propagate_yields_nan():
    model, opt = _nonfinite_setup("propagate")
    opt.step()
    assert torch.isnan(model.down.weight).any()
    assert not torch.isfinite(model.norm.bias).all()


# ====================================================================== observability
@pytest.mark.parametrize("method,max_residual", [("svd", 1e-5), ("newton_schulz", None)])
def test_track_stats(method, max_residual):
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(model, track_stats=True, ns_method=method, adjust_lr_fn="none", lr=0.1, momentum=0.0, nesterov=False,
               normuon=False)
    _fill_grads(model.parameters(), 0)
    opt.step()
    stats = opt.last_stats
    assert set(stats) == {n for n, _ in model.named_parameters()}
    for name in ("up.weight", "down.weight"):
        st = stats[name]
        assert set(st) >= {"update_rms", "ortho_residual", "sv_min", "sv_max"}
        n = min(model.get_parameter(name).shape)
        numel = model.get_parameter(name).numel()
        if max_residual is not None:
            assert st["ortho_residual"] < max_residual
            assert st["sv_min"] == pytest.approx(1, abs=1e-5) and st["sv_max"] == pytest.approx(1, abs=1e-5)
            # an exactly orthogonal (a, b) step with lr 0.1: RMS = 0.1 * sqrt(min(a, b) / (a b))
            assert st["update_rms"] == pytest.approx(0.1 * math.sqrt(n / numel), rel=1e-4)
        else:
            # Keller's quintic leaves singular values spread around 1 on purpose
            assert 0.02 < st["ortho_residual"] < 0.5
            assert 0.5 < st["sv_min"] < 1.0 < st["sv_max"] < 1.5
    assert set(stats["emb.weight"]) == {"update_rms"} and stats["emb.weight"]["update_rms"] > 0
    # without track_stats nothing is recorded
    opt2 = Muon(TinyLM())
    _fill_grads(opt2.param_groups[0]["params"], 0)
    opt2.step()
    assert opt2.last_stats == {}


# ====================================================================== options
def _single(shape, seed=0, **kwargs):
    torch.manual_seed(seed)
    w = nn.Parameter(torch.randn(shape))
    opt = Muon([{"params": [("w", w)], "algorithm": "muon"}], **{**EXACT, **kwargs})
    return w, opt


def test_normuon_keeps_frobenius_norm_and_equalizes_rows():
    g = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    updates = {}
    for normuon in (False, True):
        w, opt = _single((32, 8), normuon=normuon)
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        updates[normuon] = before - w.detach()
    plain, nor = updates[False], updates[True]
    assert float(nor.norm()) == pytest.approx(float(plain.norm()), rel=1e-5)
    assert float(plain.norm()) == pytest.approx(math.sqrt(8), rel=1e-5)
    spread = lambda u: float(u.norm(dim=1).std() / u.norm(dim=1).mean())  # noqa: E731
    assert spread(plain) > 0.1
    assert spread(nor) < 1e-4  # first step: every row is divided by its own RMS
    assert not torch.allclose(nor, plain, atol=1e-3)


def test_normuon_moves_row_norms_toward_equal_over_steps():
    w, opt = _single((32, 8), normuon=True, momentum=0.9, normuon_beta2=0.9)
    w_plain, opt_plain = _single((32, 8), normuon=False, momentum=0.9)
    spreads = []
    for s in range(4):
        g = torch.randn(32, 8, generator=torch.Generator().manual_seed(s)) * torch.linspace(0.1, 3, 32)[:, None]
        outs = []
        for p, o in ((w, opt), (w_plain, opt_plain)):
            before = p.detach().clone()
            p.grad = g.clone()
            o.step()
            outs.append((before - p.detach()).norm(dim=1))
        spreads.append([float(r.std() / r.mean()) for r in outs])
    assert all(nor < plain for nor, plain in spreads)
    assert opt.state[w]["normuon_v"].shape == (32,)


def test_cautious_weight_decay_only_where_signs_agree():
    torch.manual_seed(0)
    p0 = torch.randn(12, 6)
    g = torch.randn(12, 6)
    results = {}
    for cautious in (False, True):
        w = nn.Parameter(p0.clone())
        opt = Muon([{"params": [("w", w)], "algorithm": "muon"}], **{**EXACT, "lr": 0.1, "weight_decay": 0.5},
                   cautious_weight_decay=cautious)
        w.grad = g.clone()
        opt.step()
        results[cautious] = w.detach().clone()
    upd = _msign(g)
    agree = (upd * p0) > 0
    assert 0 < int(agree.sum()) < agree.numel()
    expected_cautious = p0 - 0.1 * 0.5 * p0 * agree - 0.1 * upd
    expected_plain = p0 * (1 - 0.1 * 0.5) - 0.1 * upd
    torch.testing.assert_close(results[True], expected_cautious, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[False], expected_plain, atol=1e-5, rtol=0)
    # where the signs disagree, no decay at all
    torch.testing.assert_close(results[True][~agree], (p0 - 0.1 * upd)[~agree], atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", ["ema", "sum"])
def test_clip_momentum_norm_bounds_the_buffer(form):
    w, opt = _single((10, 6), momentum=0.9, clip_momentum_norm=1.0, momentum_form=form)
    for s in range(4):
        w.grad = 10 * torch.randn(10, 6, generator=torch.Generator().manual_seed(s))
        opt.step()
        assert float(opt.state[w]["momentum_buffer"].norm()) <= 1.0 + 1e-5
    assert float(opt.state[w]["momentum_buffer"].norm()) == pytest.approx(1.0, rel=1e-4)


def test_momentum_forms_buffers():
    mu = 0.9
    g1 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    g2 = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    for form, expected in (("sum", mu * g1 + g2), ("ema", mu * (1 - mu) * g1 + (1 - mu) * g2)):
        w, opt = _single((6, 4), momentum=mu, momentum_form=form)
        for g in (g1, g2):
            w.grad = g.clone()
            opt.step()
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], expected, atol=1e-6, rtol=0)


def test_nesterov_direction_is_orthogonalized():
    # sum form with Nesterov: the step direction is msign(g2 + mu (mu g1 + g2))
    mu = 0.5
    g1 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    g2 = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    w, opt = _single((6, 4), momentum=mu, nesterov=True, momentum_form="sum")
    w.grad = g1.clone()
    opt.step()
    before = w.detach().clone()
    w.grad = g2.clone()
    opt.step()
    torch.testing.assert_close(before - w.detach(), _msign(g2 + mu * (mu * g1 + g2)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,tall,wide", [
    ("original", 2.0, 1.0),  # sqrt(max(1, A/B)) for (32, 8) and (8, 32)
    ("match_rms_adamw", 0.2 * math.sqrt(32), 0.2 * math.sqrt(32)),  # 0.2 sqrt(max(A, B))
    ("spectral", 2.0, 0.5),  # sqrt(A/B)
    ("none", 1.0, 1.0),
])
def test_adjust_lr_fn_scales_the_update(mode, tall, wide):
    for shape, factor in (((32, 8), tall), ((8, 32), wide)):
        w, opt = _single(shape, adjust_lr_fn=mode, lr=0.01)
        before = w.detach().clone()
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        opt.step()
        s = _svals(before - w.detach())
        torch.testing.assert_close(s, torch.full_like(s, 0.01 * factor), atol=1e-6, rtol=1e-5)
        assert adjust_lr_scale(shape[0], shape[1], mode) == pytest.approx(factor)


def test_adjust_lr_fn_applies_per_logical_matrix():
    # with heads:4 on a (32, 16) matrix every head is (8, 16): wide, so "original" gives factor 1,
    # not sqrt(32/16) as for the whole matrix
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 16))
    opt = Muon([{"params": [("w", w)], "algorithm": "muon", "views": ["heads:4"]}], **{**EXACT, "adjust_lr_fn": "original"})
    before = w.detach().clone()
    w.grad = torch.randn(32, 16)
    opt.step()
    for h in range(4):
        s = _svals((before - w.detach())[8 * h:8 * (h + 1)])
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


def test_state_is_one_buffer_per_matrix():
    torch.manual_seed(0)
    layers = [nn.Linear(32, 64, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 16, bias=False)]
    weights = [l.weight for l in layers]
    numel = sum(w.numel() for w in weights)
    muon = Muon([{"params": weights, "algorithm": "muon"}], normuon=False)
    adamw = Muon([{"params": [w.detach().clone().requires_grad_() for w in weights], "algorithm": "adamw"}])
    ref = torch.optim.AdamW([w.detach().clone().requires_grad_() for w in weights])
    for opt in (muon, adamw, ref):
        params = [p for g in opt.param_groups for p in g["params"]]
        _fill_grads(params, 0)
        opt.step()
    ref_bytes = sum(v.numel() * v.element_size() for s in ref.state.values() for v in s.values())
    assert all(set(muon.state[w]) == {"momentum_buffer", "step"} for w in weights)
    assert muon.state_bytes() == 4 * numel + 3 * 4  # one fp32 buffer + a scalar step each
    assert adamw.state_bytes() == ref_bytes
    assert muon.state_bytes() / adamw.state_bytes() == pytest.approx(0.5, abs=1e-3)


def test_muon_trains_a_toy_regression():
    torch.manual_seed(0)
    X = torch.randn(256, 16)
    W = torch.randn(16, 8) / 4
    Y = torch.tanh(X @ W) @ torch.randn(8, 4)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = Muon(model, lr=0.02, adamw_lr=3e-3)
    assert [r.algorithm for r in opt.routing_report().rows].count("muon") == 2

    def loss_fn():
        return nn.functional.mse_loss(model(X), Y)

    first = float(loss_fn().detach())
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = float(loss_fn().detach())
    assert last < 0.2 * first, (first, last)


def test_rms_group_updates_nonmatrix_params():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Muon(muon_param_groups(model, nonmatrix="rms"), adamw_lr=1e-2)
    algs = {g["algorithm"]: g for g in opt.param_groups}
    assert set(algs) == {"muon", "adamw", "rms"}
    assert "norm.weight" in algs["rms"]["param_names"] and "emb.weight" in algs["adamw"]["param_names"]
    before = model.norm.weight.detach().clone()
    _fill_grads(model.parameters(), 0)
    opt.step()
    upd = before - model.norm.weight.detach()
    # m / rms(m) has RMS 1, so the step RMS is the lr
    assert float(upd.square().mean().sqrt()) == pytest.approx(1e-2, rel=1e-3)


@pytest.mark.parametrize("limit", [1, 32 * 48 * 3, None])
def test_chunked_batches_equal_the_loop(limit):
    torch.manual_seed(0)
    ps = [torch.randn(32, 48) for _ in range(7)] + [torch.randn(48, 32) for _ in range(3)]
    grads = [torch.randn_like(p) for p in ps]
    out = []
    for kw in (dict(batched=False), dict(batch_max_elements=limit)):
        qs = [torch.nn.Parameter(p.clone()) for p in ps]
        opt = Muon([{"params": qs, "algorithm": "muon"}], **kw)
        for _ in range(2):
            for q, g in zip(qs, grads):
                q.grad = g.clone()
            opt.step()
        out.append(torch.cat([q.detach().flatten() for q in qs]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)


def test_batch_max_elements_is_validated():
    with pytest.raises(ValueError, match="batch_max_elements"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], batch_max_elements=0)
