"""Low-memory optimizer state (issue 15): ``Muon(..., state_dtype="bf16")`` for the Muon momentum
and the AdamW moments, with fp32 arithmetic and stochastic rounding into the state; exact resume;
the distributed step; and the memory analysis that reports it.

Everything runs on CPU with tiny tensors (the distributed test starts two gloo processes).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _ranks import free_port, run_ranks  # tests/_ranks.py

from muonlab import Muon
from muonlab.updates import stochastic_round_

HERE = Path(__file__).parent


class Net(nn.Module):
    """Embedding, two hidden matrices (one tall), a LayerNorm and a head: Muon and AdamW groups."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.up = nn.Linear(12, 24)
        self.down = nn.Linear(24, 12, bias=False)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 16, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(500 + step)
    idx = torch.randint(0, 16, (4, 7), generator=gen)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 16), idx[:, 1:].reshape(-1))


def _make(model: nn.Module, **kw) -> Muon:
    return Muon(model, lr=0.02, adamw_lr=3e-3, weight_decay=0.01, adamw_weight_decay=0.01, **kw)


def _train(model: nn.Module, opt: Muon, start: int, stop: int) -> None:
    for step in range(start, stop):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def _state_tensors(opt: Muon):
    return {(id(p), k): v for p, st in opt.state.items() for k, v in st.items() if isinstance(v, torch.Tensor)}


# ====================================================================== the option
def test_bf16_state_holds_every_moment_in_bf16_and_halves_the_bytes():
    torch.manual_seed(0)
    base = Net()
    m32, m16 = copy.deepcopy(base), copy.deepcopy(base)
    opt32, opt16 = _make(m32), _make(m16, state_dtype="bf16")
    _train(m32, opt32, 0, 1)
    _train(m16, opt16, 0, 1)
    for p, st in opt16.state.items():
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in st:
                assert st[key].dtype == torch.bfloat16, key
        assert p.dtype == torch.float32  # the parameters stay as they are
    # step counters and NorMuon's per-row second moments (one fp32 value per row) are not moments of
    # the parameter's size: they stay as they are
    fixed = sum(v.numel() * v.element_size() for st in opt32.state.values() for k, v in st.items()
                if isinstance(v, torch.Tensor) and (v.ndim == 0 or k == "normuon_v"))
    assert any("normuon_v" in st for st in opt16.state.values())
    assert all(st["normuon_v"].dtype == torch.float32 for st in opt16.state.values() if "normuon_v" in st)
    assert opt16.state_bytes() - fixed == (opt32.state_bytes() - fixed) // 2


@pytest.mark.parametrize("value,expected", [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    ("fp32", torch.float32), (torch.float32, torch.float32), (None, torch.float32),
])
def test_state_dtype_accepts_names_and_dtypes(value, expected):
    model = Net()
    opt = _make(model, state_dtype=value)
    _train(model, opt, 0, 1)
    assert opt.state[model.up.weight]["momentum_buffer"].dtype == expected
    assert opt.state[model.emb.weight]["exp_avg_sq"].dtype == expected


@pytest.mark.parametrize("value,pattern", [
    ("fp16", r"state_dtype 'fp16'.*range.*bf16"),
    (torch.float16, r"state_dtype torch\.float16.*range"),
    ("int8", r"state_dtype 'int8'.*valid: .*'bf16'"),
    (torch.int32, r"state_dtype torch\.int32"),
    (3, r"state_dtype 3"),
])
def test_bad_state_dtype_is_refused_with_the_value(value, pattern):
    with pytest.raises(ValueError, match=pattern):
        _make(Net(), state_dtype=value)


def test_state_dtype_is_overridable_per_group_and_validated_there():
    model = Net()
    groups = [{"params": [model.up.weight, model.down.weight], "algorithm": "muon", "state_dtype": "bf16"},
              {"params": [p for n, p in model.named_parameters() if n not in ("up.weight", "down.weight")],
               "algorithm": "adamw"}]
    opt = Muon(groups)
    _train(model, opt, 0, 1)
    assert opt.state[model.up.weight]["momentum_buffer"].dtype == torch.bfloat16
    assert opt.state[model.emb.weight]["exp_avg"].dtype == torch.float32
    assert opt.param_groups[0]["state_dtype"] == "bf16" and opt.param_groups[1]["state_dtype"] is None
    with pytest.raises(ValueError, match=r"param group 1: state_dtype 'half'"):
        Muon([groups[0], {**groups[1], "state_dtype": "half"}])


# ====================================================================== stochastic rounding
def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    x = torch.full((200_000,), 1.0 + 2**-10)  # an eighth of the way from 1 to the next bf16, 1 + 2**-7
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    vals = set(out.float().unique().tolist())
    assert vals == {1.0, 1.0 + 2**-7}
    assert float(out.float().mean()) == pytest.approx(1.0 + 2**-10, abs=3e-5)
    # negative numbers and exact values: signs kept, representable values untouched, inf stays inf
    y = torch.tensor([-1.0 - 2**-10, 0.5, -2.0, float("inf"), float("-inf"), 0.0])
    o = torch.empty_like(y, dtype=torch.bfloat16)
    stochastic_round_(o, y, torch.Generator().manual_seed(1))
    assert float(o[0]) in (-1.0, -1.0 - 2**-7)
    assert o[1:].float().tolist() == [0.5, -2.0, float("inf"), float("-inf"), 0.0]


def test_stochastic_rounding_is_deterministic_given_the_generator():
    x = torch.randn(1000)
    a, b = torch.empty(1000, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.bfloat16)
    stochastic_round_(a, x, torch.Generator().manual_seed(7))
    stochastic_round_(b, x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    stochastic_round_(b, x, torch.Generator().manual_seed(8))
    assert not torch.equal(a, b)


def test_small_second_moment_updates_are_not_lost_in_bf16():
    # AdamW's v <- 0.999 v + 0.001 g²: near v = 0.5 each step adds ~5e-4, under half of bf16's
    # spacing (2**-9): round-to-nearest stalls there, stochastic rounding follows the fp32 moment.
    steps = 1500
    w32 = nn.Parameter(torch.zeros(256))
    w16 = nn.Parameter(torch.zeros(256))
    opt32 = Muon([{"params": [w32], "algorithm": "adamw"}], adamw_lr=1e-6, adamw_betas=(0.9, 0.999))
    opt16 = Muon([{"params": [w16], "algorithm": "adamw"}], adamw_lr=1e-6, adamw_betas=(0.9, 0.999), state_dtype="bf16")
    rtn = torch.zeros(256, dtype=torch.bfloat16)
    for _ in range(steps):
        w32.grad = torch.ones(256)
        w16.grad = torch.ones(256)
        opt32.step()
        opt16.step()
        rtn = (rtn.float() * 0.999 + 0.001).to(torch.bfloat16)  # what round-to-nearest would keep
    want = float(opt32.state[w32]["exp_avg_sq"].mean())
    got = float(opt16.state[w16]["exp_avg_sq"].float().mean())
    assert want == pytest.approx(1 - 0.999**steps, rel=1e-4)
    assert abs(got - want) < 0.01, (got, want)
    assert want - float(rtn.float().mean()) > 0.2  # the test would catch plain rounding


# ====================================================================== resume and checkpoints
def test_resume_from_a_file_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    base = Net()
    straight, first = copy.deepcopy(base), copy.deepcopy(base)
    opt = _make(straight, state_dtype="bf16")
    _train(straight, opt, 0, 8)

    opt1 = _make(first, state_dtype="bf16")
    _train(first, opt1, 0, 4)
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["opt"]["state"][0]["momentum_buffer"].dtype == torch.bfloat16  # the file records the dtype
    resumed = Net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _make(resumed, state_dtype="bf16")
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 4, 8)

    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    for pid in sa:
        for k, v in sa[pid].items():
            w = sb[pid][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w, (pid, k)


def test_a_checkpoint_loads_into_another_state_dtype_by_converting():
    torch.manual_seed(0)
    model = Net()
    opt16 = _make(model, state_dtype="bf16")
    _train(model, opt16, 0, 3)
    sd16 = copy.deepcopy(opt16.state_dict())
    # bf16 -> fp32: exact widening; the optimizer keeps its own setting
    opt32 = _make(model)
    opt32.load_state_dict(sd16)
    assert all(g["state_dtype"] is None for g in opt32.param_groups)
    for pid, p in enumerate(p for g in opt32.param_groups for p in g["params"]):
        for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if k in opt32.state[p]:
                assert opt32.state[p][k].dtype == torch.float32
                assert torch.equal(opt32.state[p][k], sd16["state"][pid][k].float())
    _train(model, opt32, 3, 4)
    # fp32 -> bf16: rounded to nearest once
    sd32 = copy.deepcopy(opt32.state_dict())
    opt16b = _make(model, state_dtype="bf16")
    opt16b.load_state_dict(sd32)
    assert all(g["state_dtype"] == "bf16" for g in opt16b.param_groups)
    p0 = model.up.weight
    pid0 = next(i for i, p in enumerate(p for g in opt16b.param_groups for p in g["params"]) if p is p0)
    assert opt16b.state[p0]["momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(opt16b.state[p0]["momentum_buffer"], sd32["state"][pid0]["momentum_buffer"].bfloat16())
    _train(model, opt16b, 4, 5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_copied_state_dict_continues_exactly():
    torch.manual_seed(0)
    model = Net()
    opt = _make(model, state_dtype="bf16")
    _train(model, opt, 0, 2)
    model2 = copy.deepcopy(model)
    opt2 = _make(model2, state_dtype="bf16")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, 2, 4)
    _train(model2, opt2, 2, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_bf16_state_trains_like_fp32_state():
    torch.manual_seed(0)
    base = Net()
    m32, m16 = copy.deepcopy(base), copy.deepcopy(base)
    o32, o16 = _make(m32), _make(m16, state_dtype="bf16")
    with torch.no_grad():
        start = float(_loss(base, 0))
    for model, opt in ((m32, o32), (m16, o16)):
        for _ in range(30):  # fit one batch: the loss must fall well below its start
            opt.zero_grad()
            _loss(model, 0).backward()
            opt.step()
    with torch.no_grad():
        l32, l16 = float(_loss(m32, 0)), float(_loss(m16, 0))
    assert l32 < 0.8 * start and abs(l16 - l32) < 0.02 * start, (start, l32, l16)


# ====================================================================== low-precision parameters with bf16 state
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_with_bf16_state(pdtype):
    torch.manual_seed(0)
    model = Net().to(pdtype)
    opt = _make(model, state_dtype="bf16", nonfinite="raise")
    for step in range(3):
        opt.zero_grad()
        logits = model(torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(step)))
        logits.float().logsumexp(-1).mean().backward()
        opt.step()
    for p in model.parameters():
        assert p.dtype == pdtype and torch.isfinite(p).all()
    assert opt.state[model.up.weight]["momentum_buffer"].dtype == torch.bfloat16


# ====================================================================== the memory analysis
def test_memory_analysis_reports_bf16_muon_state_against_fp32_adamw():
    from muonlab.lab.analysis import memory

    summary = memory.model_summary("tiny")
    m, a, tensors = summary["muon_matrix_elements"], summary["adamw_elements"], summary["param_tensors"]
    row = memory.measure_entry("muon", "tiny")
    adamw = memory.measure_entry("adamw", "tiny")
    # bf16 momentum for the matrices, bf16 m and v for the AdamW part, the fp32 step counters
    assert row.bf16_state_bytes == 2 * m + 2 * 2 * a + 4 * tensors
    assert row.bf16_vs_adamw == pytest.approx(row.bf16_state_bytes / adamw.state_bytes)
    assert row.bf16_vs_adamw <= 0.3  # issue 15's goal on the lab model
    assert row.vs_adamw == pytest.approx(row.state_bytes / adamw.state_bytes)
    assert adamw.vs_adamw == pytest.approx(1.0) and adamw.bf16_state_bytes is None
    table = memory.table_rows([adamw, row])
    col = memory.TABLE_HEADERS.index("bf16 state x AdamW")
    assert table[1][col] == f"{row.bf16_vs_adamw:.3f}" and table[0][col] == "-"
    assert table[1][memory.TABLE_HEADERS.index("x AdamW")] == f"{row.vs_adamw:.3f}"


# ====================================================================== the distributed step
_DIST_SCRIPT = r"""
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import dist_worker as W
import muonlab.optimizer as O

rank, world, port, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
stochastic = O.stochastic_round_
res = {}
model = W.make_model()
opt = W.make_optimizer(model, state_dtype="bf16")
W.train_steps(model, opt, rank, world, 0, W.STEPS, allreduce=True)
res["replicated"] = W.full_params(model)
for rounding in ("nearest", "stochastic"):
    O.stochastic_round_ = stochastic if rounding == "stochastic" else (lambda d, s, g: d.copy_(s))
    for nesterov in (True, False):
        model = W.fsdp_model(world)
        opt = W.make_optimizer(model, state_dtype="bf16", nesterov=nesterov)
        W.train_steps(model, opt, rank, world, 0, W.STEPS)
        bufs = [st["momentum_buffer"] for st in opt.state.values() if "momentum_buffer" in st]
        assert bufs and all(b.dtype == torch.bfloat16 and type(b).__name__ == "DTensor" for b in bufs)
        res[f"fsdp {rounding} nesterov={nesterov}"] = W.full_params(model)
torch.save(res, os.path.join(out, f"rank{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: a gloo thread torn down there can abort ("terminate called")
"""


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_bf16_state_matches_the_single_process_run(tmp_path, monkeypatch):
    """bf16 momentum and moments through the sharded step (FSDP2, Nesterov's buffer reused for the
    update and the plain-momentum form) and with replicated parameters, at 2 ranks."""
    import muonlab.optimizer as O

    spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
    W = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(W)
    script = tmp_path / "bf16_worker.py"
    script.write_text(_DIST_SCRIPT)
    port, world = free_port(), 2
    run_ranks([[script, HERE, r, world, port, tmp_path] for r in range(world)], 180, "the distributed bf16-state run")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    init = {n: p.detach() for n, p in W.make_model().named_parameters()}
    refs = {nesterov: W.reference(state_dtype="bf16", nesterov=nesterov) for nesterov in (True, False)}
    fp32 = {nesterov: W.reference(nesterov=nesterov) for nesterov in (True, False)}
    with monkeypatch.context() as m:
        m.setattr(O, "stochastic_round_", lambda d, s, g: d.copy_(s))
        nearest = {nesterov: W.reference(state_dtype="bf16", nesterov=nesterov) for nesterov in (True, False)}
    assert _max_diff(refs[True], init) > 0.1  # training moved the parameters
    for r in range(world):
        got = results[r]
        # every rank rounds its whole replicated momentum with the seeds one process uses
        assert _max_diff(got["replicated"], refs[True]) < 1e-4, r
        for nesterov in (True, False):
            # rounding to nearest is elementwise: the sharded step must equal one process exactly
            assert _max_diff(got[f"fsdp nearest nesterov={nesterov}"], nearest[nesterov]) < 1e-5, (r, nesterov)
            # stochastic rounding of each rank's own shard draws other bits: the difference from
            # one process is of the size of bf16 state's own effect (~4e-3 here), not more
            effect = _max_diff(refs[nesterov], fp32[nesterov])
            assert 1e-4 < effect < 1e-2
            assert _max_diff(got[f"fsdp stochastic nesterov={nesterov}"], refs[nesterov]) < 3 * effect, (r, nesterov)


# ====================================================================== the AdamW kernels (issue 12)
class _CountSyncs(TorchDispatchMode):
    """Counts reads of a tensor value back to the host (``.item()``, ``float(t)``, ``bool(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [None, False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_adamw_kernels_match_torch_adamw(fused, weight_decay, tensor_lr, monkeypatch):
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k))[1])
    gen = torch.Generator().manual_seed(0)
    shapes = [(10, 4), (7,), (3, 5), (), (33, 17)]
    ours = [nn.Parameter(torch.randn(s, generator=gen) * 2) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    ref_start = {id(a): a.detach().clone() for a in ours}
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    opt = Muon([{"params": ours, "algorithm": "adamw"}], adamw_lr=lr, adamw_betas=(0.9, 0.99), adamw_eps=1e-8,
               adamw_weight_decay=weight_decay, fused=fused)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    for _ in range(8):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        # the kernels order their fp32 operations differently: a few ulps (|θ| reaches ~6 here)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)
        assert float((a.detach() - ref_start[id(a)]).abs().max()) > 0.05  # and the parameters did move
    # the fused kernel ran (one call per step for all five tensors) unless foreach was asked for
    assert calls == ([] if fused is False else [5] * 8)


def test_fused_true_without_a_kernel_is_a_clear_error(monkeypatch):
    import muonlab.optimizer as O

    monkeypatch.setattr(O, "fused_adamw_available", lambda device, dtype: False)
    p = nn.Parameter(torch.randn(4))
    opt = Muon([{"params": [("bias", p)], "algorithm": "adamw"}], fused=True)
    p.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match=r"fused=True but torch\._fused_adamw_ has no kernel for torch\.float32 on cpu"):
        opt.step()
    with pytest.raises(ValueError, match="fused must be None, True or False, got 'yes'"):
        Muon([{"params": [p], "algorithm": "adamw"}], fused="yes")


@pytest.mark.parametrize("options", [
    dict(),
    dict(fused=False),
    dict(state_dtype="bf16"),
    dict(nonfinite="propagate"),
])
def test_step_reads_nothing_back_per_parameter(options):
    """One host sync per step at most (the non-finite check), however many parameters; none with
    ``nonfinite="propagate"``. Tensor learning rates stay on the device."""
    counts = []
    for width in (2, 12):
        model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(width)])
        opt = Muon(model, lr=torch.tensor(0.02), adamw_lr=torch.tensor(1e-3), **options)
        for step in range(2):
            opt.zero_grad()
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            with _CountSyncs() as c:
                opt.step()
            counts.append(c.count)
    assert len({*counts}) == 1, counts  # independent of the number of parameters (4 per layer)
    assert counts[0] == (0 if options.get("nonfinite") == "propagate" else 1), counts


@pytest.mark.parametrize("pdtype,state_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                (torch.float32, "bf16"), (torch.bfloat16, "bf16")])
def test_low_precision_adamw_agrees_across_kernels_and_the_reference_loop(pdtype, state_dtype):
    gen = torch.Generator().manual_seed(0)
    base = [(torch.randn(s, generator=gen) * 0.5) for s in [(16, 8), (8,), (5,)]]
    runs = {}
    for name, kw in (("fused", dict(fused=True)), ("foreach", dict(fused=False)), ("loop", dict(foreach=False))):
        ps = [nn.Parameter(b.to(pdtype)) for b in base]
        opt = Muon([{"params": ps, "algorithm": "adamw"}], adamw_lr=1e-2, adamw_weight_decay=0.1,
                   state_dtype=state_dtype, **kw)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(pdtype)
            opt.step()
        runs[name] = ps
        assert all(opt.state[p]["exp_avg"].dtype == (torch.bfloat16 if state_dtype else torch.float32) for p in ps)
    ulp = torch.finfo(pdtype).eps
    for name in ("foreach", "loop"):
        for a, b in zip(runs[name], runs["fused"]):
            assert a.dtype == pdtype
            # the same fp32 arithmetic up to operation order, rounded once: at most an ulp or two apart
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * ulp, atol=1e-6, msg=name)
