"""The Muon step's fused paths held to a plain reference (issue 12, "less work around the matmuls").

A plain fp32/fp64 parameter takes its update straight from the orthogonalized stack
(θ <- θ − lr·scale·f_row·O in one pass, NorMuon's row factors included); other parameters
(low precision, cautious decay, ``track_stats``) go through an update buffer. Both must equal a
step written out by hand from the layer-2 reference functions (float64 SVD for msign,
``normuon_normalize`` for NorMuon), and each other. The gradient check groups gradients by dtype
and limit; its verdicts must not change.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from muonlab import Muon, NonFiniteGradientError
from muonlab.updates import adjust_lr_scale, normuon_normalize, normuon_row_scale
from muonlab.views import blocks


# ---------------------------------------------------------------------- NorMuon as row factors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_normuon_row_scale_equals_the_reference_normalization(dtype):
    gen = torch.Generator().manual_seed(0)
    O = (torch.randn(3, 6, 10, generator=gen) * torch.linspace(0.1, 4, 6)[:, None]).to(dtype)
    O[2] = 0  # a zero matrix stays zero
    v_ref = torch.rand(3, 6, generator=gen)
    v_fused = v_ref.clone()
    for _ in range(3):  # the running second moment evolves the same way
        ref = normuon_normalize(O.float(), v_ref, 0.95)
        got = (O.float() * normuon_row_scale(O, v_fused, 0.95).unsqueeze(-1)).float()
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(v_fused, v_ref, rtol=2e-6, atol=0)
    assert (got[2] == 0).all() and torch.isfinite(got).all()


def test_normuon_row_scale_propagates_nan():
    O = torch.randn(1, 4, 5)
    O[0, 1, 2] = float("nan")
    f = normuon_row_scale(O, torch.zeros(1, 4), 0.9)
    assert torch.isnan(f).any()


# ---------------------------------------------------------------------- the step against a hand-written one
def _reference_step(params, grads, bufs, vs, views, *, lr, wd, normuon, beta2=0.95, mu=0.9, adjust="original"):
    """One Muon step from the layer-2 references: EMA Nesterov momentum, msign by float64 SVD,
    NorMuon by ``normuon_normalize``, the shape scale, decoupled decay, the step."""
    for p, g, buf, v, view in zip(params, grads, bufs, vs, views):
        buf.lerp_(g.double(), 1 - mu)
        d = g.double().lerp(buf, mu)
        upd = torch.empty_like(d)
        off = 0
        for src, dst in zip(blocks(d, view), blocks(upd, view)):
            U, _, Vh = torch.linalg.svd(src, full_matrices=False)
            O = U @ Vh
            if normuon:
                k, a = O.shape[0], O.shape[1]
                O = normuon_normalize(O, v[off:off + k * a].view(k, a), beta2)
                off += k * a
            dst.copy_(O * adjust_lr_scale(O.shape[-2], O.shape[-1], adjust))
        p.mul_(1 - lr * wd).sub_(lr * upd)


SHAPES_VIEWS = [((12, 5), "matrix"), ((5, 12), "matrix"), ((16, 8), "heads:4"), ((8, 12), "T"),
                ((3, 8, 4), "experts"), ((2, 6, 4), "experts:split:4,2")]


def _pair(dtype, **kw):
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s, _ in SHAPES_VIEWS]
    views = [v for _, v in SHAPES_VIEWS]
    opts = []
    for track in (False, True):  # track_stats=True takes the buffered path
        ps = [nn.Parameter(w.to(dtype)) for w in init]
        opts.append((ps, Muon([{"params": ps, "algorithm": "muon", "views": views}], ns_method="svd",
                              momentum=0.9, track_stats=track, **kw)))
    return init, views, opts


def _step_both(opts, grads):
    for ps, opt in opts:
        for p, g in zip(ps, grads):
            p.grad = g.to(p.dtype, copy=True)
        opt.step()


@pytest.mark.parametrize("normuon", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fused_and_buffered_steps_equal_the_reference(normuon, wd, tensor_lr):
    lr = 0.05
    init, views, opts = _pair(torch.float32, lr=torch.tensor(lr) if tensor_lr else lr, weight_decay=wd, normuon=normuon)
    ref = [w.clone() for w in init]
    bufs = [torch.zeros_like(w) for w in init]
    vs = [torch.zeros(sum(b.shape[0] * b.shape[1] for b in blocks(w, v)), dtype=torch.float64) for w, v in zip(init, views)]
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in init]
        _step_both(opts, grads)
        _reference_step(ref, [g.float() for g in grads], bufs, vs, views, lr=lr, wd=wd, normuon=normuon)
    (fused, _), (buffered, opt_b) = opts
    assert opt_b.last_stats  # the buffered path did run (statistics are only recorded there)
    for f, b, r in zip(fused, buffered, ref):
        torch.testing.assert_close(f.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.detach().double(), r, rtol=1e-5, atol=1e-5)


def test_fp64_parameters_take_the_fused_step_in_fp64():
    init, views, opts = _pair(torch.float64, lr=0.05, weight_decay=0.1, normuon=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        _step_both(opts, [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in init])
    for f, b in zip(opts[0][0], opts[1][0]):
        assert f.dtype == torch.float64
        torch.testing.assert_close(f.detach(), b.detach(), rtol=1e-6, atol=1e-6)  # NorMuon's v is fp32


@pytest.mark.parametrize("batched", [True, False])
def test_stacked_same_shape_parameters_each_get_their_own_update(batched):
    """Parameters of one shape are orthogonalized in one stack and each adds its own slice."""
    gen = torch.Generator().manual_seed(4)
    ws = [nn.Parameter(torch.randn(6, 6, generator=gen)) for _ in range(3)]
    singles = [nn.Parameter(w.detach().clone()) for w in ws]
    together = Muon([{"params": ws, "algorithm": "muon"}], lr=0.1, batched=batched)
    alone = [Muon([{"params": [w], "algorithm": "muon"}], lr=0.1) for w in singles]
    for _ in range(2):
        grads = [torch.randn(6, 6, generator=gen) for _ in ws]
        for w, s, g in zip(ws, singles, grads):
            w.grad, s.grad = g.clone(), g.clone()
        together.step()
        for o in alone:
            o.step()
    for w, s in zip(ws, singles):
        torch.testing.assert_close(w.detach(), s.detach(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the gradient check, grouped by dtype
def _mixed():
    ps = {"f32": nn.Parameter(torch.randn(6, 4)), "bf16": nn.Parameter(torch.randn(6, 4).bfloat16()),
          "f16": nn.Parameter(torch.randn(6, 4).half()), "f64": nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
          "bias": nn.Parameter(torch.randn(4))}
    groups = [{"params": [(n, ps[n]) for n in ("f32", "bf16", "f16")], "algorithm": "muon"},
              {"params": [("f64", ps["f64"])], "algorithm": "muon", "state_dtype": "fp64"},
              {"params": [("bias", ps["bias"])], "algorithm": "adamw"}]
    for p in ps.values():
        p.grad = torch.randn(p.shape, dtype=torch.float64).to(p.dtype)
    return ps, groups


@pytest.mark.parametrize("bad", ["f32", "bf16", "f16", "f64", "bias"])
def test_a_nonfinite_gradient_among_mixed_dtypes_names_only_its_parameter(bad):
    ps, groups = _mixed()
    opt = Muon(groups, lr=0.01)
    ps[bad].grad.view(-1)[1] = float("inf")
    before = {n: p.detach().clone() for n, p in ps.items()}
    with pytest.raises(NonFiniteGradientError, match=r"in 1 parameter\(s\)") as info:
        opt.step()
    assert f" {bad} (" in f" {info.value}"
    assert all(torch.equal(p.detach(), before[n]) for n, p in ps.items())


def test_an_fp64_state_accepts_a_gradient_beyond_the_fp32_range():
    # sqrt(fp64 max)/2 is the limit there: 1e100 is large but its square fits fp64 state
    ps, groups = _mixed()
    opt = Muon(groups, lr=0.01)
    ps["f64"].grad.view(-1)[0] = 1e100
    before = ps["f64"].detach().clone()
    opt.step()
    assert torch.isfinite(ps["f64"]).all() and not torch.equal(before, ps["f64"].detach())
    ps["f64"].grad = torch.full_like(ps["f64"], 1e160)  # beyond it: refused, naming the parameter
    with pytest.raises(NonFiniteGradientError, match=r"f64 \(6, 4\).*1e\+160"):
        opt.step()


# ---------------------------------------------------------------------- a stack written prescaled from its sources
def test_prescale_stack_equals_prescaling_the_concatenation():
    from muonlab.orthogonalize import _prescale, prescale_stack

    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2, 5, 7, generator=gen) * 1e-30  # tiny and huge scales, a zero matrix, a transposed view
    b = torch.randn(7, 5, generator=gen).mT[None] * 3e37
    c = torch.zeros(1, 5, 7)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        got = prescale_stack([a, b, c], dt)
        assert got.is_contiguous() and got.dtype == dt
        assert torch.equal(got, _prescale(torch.cat([a, b, c]), dt, 1e-7))
    with pytest.raises(ValueError, match="fp16"):
        prescale_stack([a], torch.float16)


def test_a_stack_of_stored_and_transposed_parameters_steps_like_each_alone():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(10, 6, generator=gen)  # (out, in)
    stored = [nn.Parameter(w.clone()), nn.Parameter(w.T.clone()), nn.Parameter(torch.randn(10, 6, generator=gen))]
    views = ["matrix", "T", "matrix"]
    together = Muon([{"params": stored, "algorithm": "muon", "views": views}], lr=0.1, ns_dtype="fp32")
    singles = [nn.Parameter(p.detach().clone()) for p in stored]
    alone = [Muon([{"params": [s], "algorithm": "muon", "views": [v]}], lr=0.1, ns_dtype="fp32") for s, v in zip(singles, views)]
    for _ in range(2):
        g = torch.randn(10, 6, generator=gen)
        for ps in (stored, singles):
            ps[0].grad, ps[1].grad, ps[2].grad = g.clone(), g.T.clone(), (2 * g).clone()
        together.step()
        for o in alone:
            o.step()
    for p, s in zip(stored, singles):
        torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored[1].detach(), stored[0].detach().T, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- directions formed chunk by chunk
def _three_steps(**kw):
    gen = torch.Generator().manual_seed(4)
    # the last two share a stack: one stored plainly, one stored transposed (with a transposed gradient)
    init = [torch.randn(s, generator=gen) for s, _ in SHAPES_VIEWS] + [torch.randn(9, 6, generator=gen),
                                                                      torch.randn(6, 9, generator=gen).T]
    views = [v for _, v in SHAPES_VIEWS] + ["matrix", "matrix"]
    ps = [nn.Parameter(w.clone()) for w in init[:-1]] + [nn.Parameter(init[-1])]
    opt = Muon([{"params": ps, "algorithm": "muon", "views": views}], lr=0.05, weight_decay=0.1, **kw)
    ptrs = []
    for step in range(3):
        gen_g = torch.Generator().manual_seed(100 + step)
        for p in ps:
            g = torch.randn(p.shape[::-1] if not p.is_contiguous() else p.shape, generator=gen_g)
            p.grad = g.T if not p.is_contiguous() else g  # a transposed gradient for the transposed parameter
        opt.step()
        ptrs.append({k: w.data_ptr() for k, w in opt._workspaces.items()})
    return ps, opt, ptrs


@pytest.mark.parametrize("ns_dtype", ["fp32", "bf16"])
def test_directions_formed_per_chunk_equal_the_ones_formed_up_front(ns_dtype):
    """The single-process foreach step forms each stacked chunk's Nesterov directions into a reused
    workspace just before orthogonalizing them; foreach=False forms every direction up front with
    momentum_direction. Same numbers, bit for bit, for every view and a transposed parameter."""
    lazy, opt, ptrs = _three_steps(ns_dtype=ns_dtype)
    eager, _, _ = _three_steps(ns_dtype=ns_dtype, foreach=False)
    for a, b in zip(lazy, eager):
        assert torch.equal(a.detach(), b.detach())
    # the workspaces were made on the first step and reused on the others, and are not state
    assert {k[0] for k in opt._workspaces} == {"directions", "stack"}
    assert ptrs[0] == ptrs[1] == ptrs[2]
    assert "_workspaces" not in str(opt.state_dict().keys())
    import copy
    import pickle

    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._workspaces == {}
        clone.step()  # rebuilds its own workspaces


def test_min_max_equals_amin_and_amax_for_every_layout():
    from muonlab.orthogonalize import min_max

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(7, 9, generator=gen)
    cases = [base, base.T, base[:, ::2], base.bfloat16(), base.double().T, torch.randn(3, 4, 5, generator=gen).mT,
             torch.tensor([1.0, float("nan"), -2.0]), torch.tensor([float("inf"), 0.0])]
    for t in cases:
        lo, hi = min_max(t)
        assert lo.dtype == hi.dtype == t.dtype
        assert torch.equal(lo, t.amin()) or (lo.isnan() and t.amin().isnan()), t
        assert torch.equal(hi, t.amax()) or (hi.isnan() and t.amax().isnan()), t


def test_prescale_stack_writes_into_the_memory_it_is_given():
    from muonlab.orthogonalize import prescale_stack

    gen = torch.Generator().manual_seed(9)
    srcs = [torch.randn(1, 4, 6, generator=gen), torch.randn(6, 4, generator=gen).mT[None], torch.randn(2, 4, 6, generator=gen)]
    mem = torch.full((4 * 4 * 6,), float("nan"), dtype=torch.bfloat16)
    got = prescale_stack(srcs, torch.bfloat16, out=mem)
    assert got.data_ptr() == mem.data_ptr() and got.shape == (4, 4, 6)
    assert torch.equal(got, prescale_stack(srcs, torch.bfloat16))
    for bad in (torch.empty(95, dtype=torch.bfloat16), torch.empty(96), torch.empty(192, dtype=torch.bfloat16)[::2]):
        with pytest.raises(ValueError, match="prescale_stack: out must be a contiguous"):
            prescale_stack(srcs, torch.bfloat16, out=bad)


def test_cpu_stacks_hold_one_matrix_per_thread_at_least(monkeypatch):
    """On CPU a stack holds about 2**20 elements per intra-op thread, never fewer matrices than
    threads (a lone matrix's bf16 products would run on one thread) and a multiple of the threads
    (a bmm shares its batch out among them). An explicit limit is kept."""
    import muonlab.optimizer as optmod

    opt = Muon([nn.Parameter(torch.zeros(8, 4))], lr=0.1)
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert opt._batch_limit(cpu, 192 * 192) == 56 * 192 * 192  # 2**21 // 36864 = 56 matrices
    assert opt._batch_limit(cpu, 768 * 768) == 2 * 768 * 768  # 3 would fit in 2**21: rounded down to 2
    assert opt._batch_limit(cpu, 768 * 3072) == 2 * 768 * 3072
    assert opt._batch_limit(cpu) == 2**21
    chunks = optmod._chunk_by_numel([(torch.empty(1, 768, 768),)] * 7, opt._batch_limit(cpu, 768 * 768))
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert opt._batch_limit(cpu, 768 * 768) == 4 * 768 * 768  # 7 fit in 2**22: rounded down to 4
    assert opt._batch_limit(cpu, 100 * 100) == 416 * 100 * 100  # 2**22 // 10000 = 419 -> 416
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chunks = optmod._chunk_by_numel([(torch.empty(1, 768, 3072),)] * 5, opt._batch_limit(cpu, 768 * 3072))
    assert [len(c) for c in chunks] == [2, 2, 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert opt._batch_limit(cpu, 768 * 3072) == 768 * 3072  # one thread: a matrix larger than 2**20 stands alone
    explicit = Muon([nn.Parameter(torch.zeros(8, 4))], lr=0.1, batch_max_elements=1000)
    assert explicit._batch_limit(cpu, 768 * 3072) == 1000
