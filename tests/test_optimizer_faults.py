"""Faults of ``muonlab.Muon`` found by issue 13's audit (library items 5, 6, 8 and 9): low-precision
parameters, a huge but finite gradient, messages that name what is wrong, and non-finite state in a
checkpoint. Every failure is checked to leave the optimizer exactly as it was.

Everything runs on CPU with tiny tensors.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from muonlab import Muon, NonFiniteGradientError


# ---------------------------------------------------------------------- helpers
def _snapshot(opt: Muon):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def _assert_unchanged(opt: Muon, snap) -> None:
    params, state = snap
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now)), "a parameter changed"
    assert set(state) == {id(p) for p in opt.state}, "state was created or dropped"
    for p, s in opt.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            old = state[id(p)][k]
            if isinstance(v, torch.Tensor):
                assert v.dtype == old.dtype and torch.equal(v, old), f"state {k!r} changed"
            else:
                assert v == old, f"state {k!r} changed"


def _two_groups(dtype=torch.float32, scale: float = 1.0):
    """A Muon matrix 'w' (12, 8) and an AdamW vector 'b' (12,), with one finite step taken."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter((torch.randn(12, 8, generator=gen) * scale).to(dtype))
    b = nn.Parameter((torch.randn(12, generator=gen) * scale).to(dtype))
    return w, b


def _groups(w, b, **kw):
    return [{"params": [("w", w)], "algorithm": "muon", **kw}, {"params": [("b", b)], "algorithm": "adamw", **kw}]


# ====================================================================== item 5: fp16 and bf16 parameters
LOW = [torch.float16, torch.bfloat16]
STEPS = 5


def _low_precision_pair(dtype):
    """The same parameters twice: in ``dtype`` and as an fp32 copy of the rounded values."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"w1": (24, 16), "w2": (16, 24), "emb": (10, 16), "b1": (24,), "ln": (16,)}
    low = {n: nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for n, s in shapes.items()}
    ref = {n: nn.Parameter(p.detach().float()) for n, p in low.items()}

    def make(ps):
        return Muon([{"params": [("w1", ps["w1"]), ("w2", ps["w2"])], "algorithm": "muon"},
                     {"params": [("emb", ps["emb"]), ("b1", ps["b1"]), ("ln", ps["ln"])], "algorithm": "adamw"}],
                    lr=0.3, adjust_lr_fn="none", weight_decay=0.01, adamw_lr=0.05, adamw_weight_decay=0.01,
                    nonfinite="raise")

    return low, ref, make(low), make(ref)


def _small_grads(ps_low, ps_ref, step, dtype):
    # gradients of 1e-4 and below: their squares underflow fp16 (AdamW's eps 1e-8 is 0 in fp16 too)
    gen = torch.Generator().manual_seed(100 + step)
    for n in ps_low:
        g = (torch.randn(ps_low[n].shape, generator=gen) * 1e-4).to(dtype)
        ps_low[n].grad = g
        ps_ref[n].grad = g.float()


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_parameters_keep_fp32_state_and_round_once(dtype):
    low, ref, opt, ref_opt = _low_precision_pair(dtype)
    _small_grads(low, ref, 0, dtype)
    opt.step()
    ref_opt.step()
    for n, p in low.items():
        assert p.dtype == dtype  # the parameter keeps its dtype
        for k, v in opt.state[p].items():
            if k != "step":
                assert v.dtype == torch.float32, f"{n}: state {k} is {v.dtype}, not fp32"
        # arithmetic in fp32 and one rounding: the fp32 run's result, rounded, bit for bit
        assert torch.equal(p.detach(), ref[n].detach().to(dtype)), n


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_parameters_track_an_fp32_copy(dtype):
    low, ref, opt, ref_opt = _low_precision_pair(dtype)
    start = {n: p.detach().float().clone() for n, p in ref.items()}
    for step in range(STEPS):
        _small_grads(low, ref, step, dtype)
        opt.step()  # nonfinite="raise": a spurious NaN/inf would raise here
        ref_opt.step()
    eps = torch.finfo(dtype).eps
    for n, p in low.items():
        got, want = p.detach().float(), ref[n].detach()
        assert torch.isfinite(got).all(), n
        # each step rounds once (at most half an ulp of the largest value); the states are the same
        bound = STEPS * eps * float(want.abs().max())
        err = float((got - want).abs().max())
        moved = float((want - start[n]).abs().max())
        assert err <= bound, f"{n}: {err:.3g} from the fp32 run, bound {bound:.3g}"
        assert moved > 5 * bound, f"{n}: the parameter barely moved ({moved:.3g}); the test would prove nothing"


@pytest.mark.parametrize("dtype", LOW)
def test_a_low_precision_model_trains_under_nonfinite_raise(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    opt = Muon([{"params": [model[2].weight], "algorithm": "muon"},
                {"params": [p for n, p in model.named_parameters() if n != "2.weight"], "algorithm": "adamw"}],
               lr=0.02, adamw_lr=3e-3, nonfinite="raise")
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=gen)
    Y = torch.tanh(X @ torch.randn(8, 4, generator=gen))
    losses = []
    for _ in range(15):
        loss = (model(X.to(dtype)).float() - Y).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


# ====================================================================== item 6: one huge but finite gradient
def _huge_setup(policy: str, where: str):
    w, b = _two_groups()
    opt = Muon(_groups(w, b), nonfinite=policy, adamw_lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    w.grad, b.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    opt.step()
    w.grad, b.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    (b if where == "adamw" else w).grad.view(-1)[3] = 1e30  # finite, but its square is not (fp32)
    return w, b, opt


@pytest.mark.parametrize("where", ["adamw", "muon"])
def test_huge_gradient_raises_naming_the_parameter_and_changes_nothing(where):
    w, b, opt = _huge_setup("raise", where)
    snap = _snapshot(opt)
    name = "b" if where == "adamw" else "w"
    with pytest.raises(NonFiniteGradientError, match=rf"\b{name} \(.*1e\+30"):
        opt.step()
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("where", ["adamw", "muon"])
def test_huge_gradient_is_skipped_and_the_parameter_keeps_learning(where):
    w, b, opt = _huge_setup("skip", where)
    snap = _snapshot(opt)
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    assert opt.skipped_steps == 1
    _assert_unchanged(opt, snap)
    # the next ordinary gradient moves every element (nothing froze)
    gen = torch.Generator().manual_seed(7)
    w.grad, b.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    before = b.detach().clone()
    opt.step()
    assert (b.detach() != before).all()
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def test_huge_gradient_under_propagate_is_applied_as_given():
    # "propagate" checks nothing (no host sync): AdamW's second moment of that element becomes inf
    # and the element stops moving. The documented price of turning the check off.
    w, b, opt = _huge_setup("propagate", "adamw")
    opt.step()
    assert math.isinf(float(opt.state[b]["exp_avg_sq"][3]))
    assert opt.skipped_steps == 0


def test_a_large_gradient_below_the_limit_still_steps():
    # 1e18: its square (1e36) fits fp32, so the state stays finite and the step is taken
    w, b, opt = _huge_setup("raise", "adamw")
    b.grad[3] = 1e18
    before = b.detach().clone()
    opt.step()
    assert torch.isfinite(opt.state[b]["exp_avg_sq"]).all()
    assert not torch.equal(before, b.detach())


# ====================================================================== item 8: messages that say what is wrong
def _stepped_optimizer():
    w, b = _two_groups()
    opt = Muon(_groups(w, b))
    gen = torch.Generator().manual_seed(1)
    w.grad, b.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    opt.step()
    return w, b, opt


@pytest.mark.parametrize("drop,pattern", [
    ("state", r"no 'state' entry.*keys: \['param_groups'\]"),
    ("param_groups", r"no 'param_groups' entry.*keys: \['state'\]"),
])
def test_load_state_dict_without_a_section_says_which(drop, pattern):
    w, b, opt = _stepped_optimizer()
    sd = opt.state_dict()
    del sd[drop]
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_load_state_dict_of_a_model_says_it_is_not_an_optimizer_state():
    w, b, opt = _stepped_optimizer()
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"not an optimizer state_dict.*'weight'.*model"):
        opt.load_state_dict(model.state_dict())
    with pytest.raises(TypeError, match=r"dict.*list"):
        opt.load_state_dict([1, 2])


def test_parameters_on_the_meta_device_are_a_clear_error_before_any_state():
    lin = nn.Linear(4, 6, device="meta")
    opt = Muon(_groups(lin.weight, lin.bias))
    lin.weight.grad = torch.empty(6, 4, device="meta")
    lin.bias.grad = torch.empty(6, device="meta")
    with pytest.raises(RuntimeError, match=r"parameter w with shape \(6, 4\) is on the meta device"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("which", ["w", "b"])
def test_a_gradient_of_another_dtype_names_the_parameter_and_changes_nothing(which):
    w, b, opt = _stepped_optimizer()
    gen = torch.Generator().manual_seed(2)
    w.grad, b.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    p = w if which == "w" else b
    p.grad_dtype = None  # torch lets a user opt into a gradient dtype of their own
    p.grad = p.grad.double()
    snap = _snapshot(opt)
    shape = re_shape(p)
    with pytest.raises(RuntimeError, match=rf"parameter {which} with shape {shape}: gradient dtype torch\.float64 "
                                          r"!= parameter dtype torch\.float32"):
        opt.step()
    _assert_unchanged(opt, snap)  # no step counter was bumped


def re_shape(p: torch.Tensor) -> str:
    import re

    return re.escape(str(tuple(p.shape)))


def test_a_gradient_of_another_shape_changes_nothing():
    w, b, opt = _stepped_optimizer()
    w.grad = torch.randn(12, 8)
    b.grad = torch.randn(12)
    with torch.no_grad():
        # set a wrongly shaped gradient past autograd's own check, as a custom hook could
        b.grad.data = torch.randn(13)
    snap = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"parameter b.*gradient shape \(13,\) != parameter shape \(12,\)"):
        opt.step()
    _assert_unchanged(opt, snap)


# ====================================================================== item 9: non-finite state in a checkpoint
@pytest.mark.parametrize("key,pid,name", [
    ("exp_avg_sq", 1, "b"),
    ("exp_avg", 1, "b"),
    ("momentum_buffer", 0, "w"),
    ("step", 0, "w"),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_state_dict_rejects_nonfinite_state_naming_parameter_and_key(key, pid, name, bad):
    w, b, opt = _stepped_optimizer()
    sd = opt.state_dict()
    sd = {"state": {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                    for i, s in sd["state"].items()},
          "param_groups": sd["param_groups"]}
    sd["state"][pid][key].view(-1)[0] = bad
    # the optimizer it is loaded into has its own, different state: it must survive the failed load
    gen = torch.Generator().manual_seed(5)
    w.grad, b.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
    opt.step()
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"parameter {name} .*saved {key!s} holds {'nan' if bad != bad else 'inf'}"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_load_state_dict_rejects_a_negative_step():
    w, b, opt = _stepped_optimizer()
    sd = opt.state_dict()
    sd["state"][1] = {**sd["state"][1], "step": torch.tensor(-3.0)}
    with pytest.raises(ValueError, match=r"parameter b .*step -3"):
        opt.load_state_dict(sd)


def test_a_finite_state_dict_still_loads_and_continues():
    w, b, opt = _stepped_optimizer()
    sd = copy.deepcopy(opt.state_dict())  # torch.optim semantics: a loaded live state_dict would share tensors
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = Muon(_groups(w2, b2))
    opt2.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for opt_, w_, b_ in ((opt, w, b), (opt2, w2, b2)):
            gen = torch.Generator().manual_seed(9)
            w_.grad, b_.grad = torch.randn(w.shape, generator=gen), torch.randn(b.shape, generator=gen)
            opt_.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)
