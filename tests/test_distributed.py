"""Distributed Muon: real gloo processes on CPU, compared with the single-process run.

Each world size is launched once (tests/dist_worker.py runs every scenario in one process group)
and the per-scenario tests read the saved parameters. Ranks take equal slices of the same global
batches, so every scenario must reproduce the single-process ``Muon`` run on the full batches.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from _ranks import free_port, run_ranks  # tests/_ranks.py

from muonlab.distributed import Layout, assign_owners, build_plan, matrix_cost, shard_indices

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"
SCENARIOS = ("replicated", "ddp", "fsdp", "fsdp_clip", "nograd", "nonfinite")
LAYOUTS = ("rows", "cols", "ep", "hsdp", "fsdp_tp", "mixed")
SHARDED = tuple(f"layout:{n}" for n in LAYOUTS) + ("layout:hsdp:normuon", "layout:fsdp_tp:normuon", "real_fsdp_tp")
TOL = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _load_worker()


def launch(scenarios, world: int, out: Path, ckpt: Path | None = None, timeout: float = 180, env: dict | None = None,
           ranks: list[int] | None = None) -> dict:
    """Run the worker on ``world`` ranks; returns {scenario: [params of rank 0, rank 1, ...]}.

    A hang (a rank waiting in a collective the others never call) fails the test at ``timeout``.
    """
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tail = [str(ckpt)] if ckpt else []
    run_ranks([[WORKER, ",".join(scenarios), rank, world, port, out, *tail] for rank in range(world)], timeout,
              f"distributed run {scenarios} at world size {world}", env=env)
    return {sc: [torch.load(out / f"{sc}_rank{r}.pt") for r in (ranks if ranks is not None else range(world))]
            for sc in scenarios}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return W.reference()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            cache[world] = launch(SCENARIOS + SHARDED, world, tmp_path_factory.mktemp(f"dist{world}"))
        return cache[world]

    return get


# ---------------------------------------------------------------------- ownership (no processes)
def _rows_layout(shape, world):
    return Layout(tuple(shape), tuple((r, (range(r * shape[0] // world, (r + 1) * shape[0] // world), range(shape[1])))
                                     for r in range(world)))


def test_plan_pieces_owners_and_traffic():
    """A (8, 4) matrix sharded by rows over 4 ranks: four pieces of 2 rows, one owner, and the
    traffic is 3 pieces in and 3 pieces out (fp32)."""
    plan = build_plan([(_rows_layout((8, 4), 4), "matrix", None)], 4, lambda shape, k: 1.0, [(4, 4)], 2**20)
    (m,) = plan.matrices
    assert [p.rank for p in m.pieces] == [0, 1, 2, 3] and all(p.numel == 8 for p in m.pieces)
    assert m.owner == 0 and [p.box for p in m.pieces][1] == (slice(2, 4), slice(0, 4))
    assert plan.received_bytes[0] == 3 * 8 * 4 and plan.sent_bytes[0] == 3 * 8 * 4
    assert plan.sent_bytes[1:] == [32, 32, 32]


def test_plan_prefers_whole_holders_and_bounds_rounds():
    """heads:4 of a (8, 4) matrix over 4 row shards: each head is whole on one rank and owned
    there; a byte budget smaller than two matrices puts each matrix in its own round."""
    plan = build_plan([(_rows_layout((8, 4), 4), "heads:4", None)], 4, lambda shape, k: 1.0, [(4, 4)], 2**20)
    assert [m.owner for m in plan.matrices] == [0, 1, 2, 3]
    assert plan.sent_bytes == [0, 0, 0, 0] and plan.rounds == 1
    rep = Layout((8, 4), tuple((r, (range(8), range(4))) for r in range(2)))
    plan = build_plan([(rep, "heads:4", None)], 2, lambda shape, k: 1.0, [(4, 4)], 2 * 4 * 4 * 2)
    assert plan.rounds == 4 and sorted(m.owner for m in plan.matrices) == [0, 0, 1, 1]


def test_plan_refuses_shards_that_do_not_tile():
    bad = Layout((4, 4), ((0, (range(0, 2), range(4))), (1, (range(1, 3), range(4)))))
    with pytest.raises(RuntimeError, match="do not tile"):
        build_plan([(bad, "matrix", None)], 2, lambda shape, k: 1.0, [(4, 4)], 2**20)


@pytest.mark.parametrize("length,sf,n", [(12, 2, 2), (13, 2, 3), (5, 3, 2), (7, 2, 4)])
def test_strided_shard_indices_follow_torch(length, sf, n):
    """FSDP2-over-TP's _StridedShard: our index computation agrees with DTensor's own split."""
    from torch.distributed.tensor.placement_types import _StridedShard

    pl = _StridedShard(0, split_factor=sf)
    shards, _ = pl._split_tensor(torch.arange(length), n, with_padding=False)
    for c in range(n):
        (got,) = shard_indices((length,), (n,), (c,), [pl])
        assert list(got) == shards[c].tolist()

def test_assign_owners_is_deterministic_and_balanced():
    costs = [matrix_cost(a, b) for a, b in [(768, 768)] * 6 + [(768, 3072)] * 4 + [(3, 12), (1, 3)]]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(load) / min(load) < 1.2
    assert assign_owners([5.0, 1.0, 1.0, 3.0], 2) == [0, 1, 1, 1]
    assert assign_owners([1.0, 2.0], 3) == [1, 0]
    assert set(assign_owners(costs, 1)) == {0}


def test_owner_balance_uses_the_flops_of_the_method_that_runs():
    from muonlab.optimizer import _ortho_flops
    from muonlab.orthogonalize import flops

    assert matrix_cost(768, 3072) == flops("newton_schulz", 768, 3072, 5)
    settings = ("auto", "keller", 5, "fp32", 1e-7)
    cpu = torch.device("cpu")
    # fp32: "auto" runs the Gram form on a wide matrix, plain Newton-Schulz on a square one
    assert _ortho_flops(((768, 3072), settings, cpu, torch.float32)) == flops("gram", 768, 3072, 5)
    assert _ortho_flops(((768, 768), settings, cpu, torch.float32)) == flops("newton_schulz", 768, 768, 5)
    assert _ortho_flops(((768, 3072), ("newton_schulz",) + settings[1:], cpu, torch.float32)) == matrix_cost(768, 3072)
    # bf16: the Gram form with its restarts (every 2 steps), still cheaper than Newton-Schulz on 768x3072
    bf16 = _ortho_flops(((768, 3072), settings[:3] + ("bf16", 1e-7), cpu, torch.float32))
    assert bf16 == flops("gram", 768, 3072, 5, (2, 4)) < matrix_cost(768, 3072)


def test_single_process_default_unchanged(reference):
    """Without a process group, Muon does not touch torch.distributed and matches process_group=False."""
    assert not dist.is_initialized()
    torch.set_num_threads(1)
    model = W.make_model()
    opt = W.make_optimizer(model)
    got = W.reference(model=model, opt=opt)
    assert max_diff(got, reference) == 0.0


# ---------------------------------------------------------------------- parity with one process
@pytest.mark.parametrize("world", [2, 4, pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("scenario", ["replicated", "ddp", "fsdp"])
def test_matches_single_process(runs, reference, world, scenario):
    """(a) replicated params + manual all-reduce, (b) DDP, (c) FSDP2 fully_shard (uneven (3, 12)
    and (1, 3) shards, a heads view and an expert stack): same parameters as one process."""
    results = runs(world)[scenario]
    init = dict(W.make_model().named_parameters())
    assert max_diff(reference, {n: p.detach() for n, p in init.items()}) > 1e-3  # training moved them
    for rank, got in enumerate(results):
        assert max_diff(got, reference) < TOL, (scenario, world, rank)


@pytest.mark.parametrize("world", [1, 2])
def test_fsdp_momentum_clipping_uses_the_global_norm(runs, world):
    """clip_momentum_norm on a sharded momentum buffer clips by the norm of the whole buffer."""
    ref = W.reference(**W.CLIP)
    assert max_diff(ref, W.reference()) > 1e-3  # the clipping is active
    for got in runs(world)["fsdp_clip"]:
        assert max_diff(got, ref) < TOL


@pytest.mark.parametrize("world", [1, 2])
def test_missing_gradient_on_one_rank_does_not_hang(runs, world):
    """The last rank never uses ``w6``: the step agrees to skip it on every rank (no hang), and all
    ranks stay identical."""
    results = runs(world)["nograd"]
    init = W.make_model().w6.detach()
    for got in results:
        assert max_diff(got, results[0]) == 0.0
        assert torch.equal(got["w6"], init)
        assert (got["a.weight"] - W.make_model().a.weight).abs().max() > 1e-3


@pytest.mark.parametrize("world", [1, 2])
def test_nonfinite_gradient_on_one_rank_skips_everywhere(runs, world):
    """A NaN gradient on the last rank only: with nonfinite="skip" every rank skips the step
    (the worker asserts skipped_steps == 1 and unchanged parameters); no rank hangs."""
    results = runs(world)["nonfinite"]
    for got in results:
        assert max_diff(got, results[0]) == 0.0


# ---------------------------------------------------------------------- the sharded engine's layouts
WORLDS = [2, 4, pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]


def _params(got: dict) -> dict:
    return {k: v for k, v in got.items() if not k.startswith("__")}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_layouts_match_single_process(runs, reference, world, layout):
    """Parameters as DTensors on 1-D and 2-D meshes: TP rows (Shard(0)) and columns (Shard(1)),
    expert parallel (the expert stack on its E dimension), HSDP (Replicate, Shard(0)) on every
    parameter, FSDP+TP (Shard(0), Shard(1)), and a mix with replicated tensors: after several
    steps the parameters equal the single-process optimizer's."""
    for rank, got in enumerate(runs(world)[f"layout:{layout}"]):
        assert max_diff(_params(got), reference) < TOL, (layout, world, rank)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", ["hsdp", "fsdp_tp"])
def test_sharded_normuon_and_rms_group_match_single_process(runs, world, layout):
    """NorMuon (its per-row state computed by each matrix's owner and shared) and an ``rms`` group."""
    ref = W.reference(normuon=True, rms=True)
    assert max_diff(ref, W.reference()) > 1e-4  # NorMuon and the rms group change the run
    for got in runs(world)[f"layout:{layout}:normuon"]:
        assert max_diff(_params(got), ref) < TOL


@pytest.mark.parametrize("world", [2, 4, pytest.param(3, marks=pytest.mark.slow)])
def test_real_fsdp2_over_tensor_parallel_matches_single_process(runs, reference, world):
    """fully_shard over parallelize_module on a (dp, tp) mesh: FSDP2 puts _StridedShard on the
    dimension TP already shards, and parameters TP left alone live on the dp sub-mesh."""
    results = runs(world)["real_fsdp_tp"]
    if world == 4:
        assert "_StridedShard" in results[0]["__placements__"]["a.weight"]
    for got in results:
        assert max_diff(_params(got), reference) < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_local_experts_and_heads_need_no_communication(runs, world):
    """Expert parallel: each expert lives whole on one rank and is orthogonalized there (no piece
    travels). TP rows at 2 ranks: each head of the heads:2 view lives on one rank, likewise."""
    plan = runs(world)["layout:ep"][0]["__plan__"]
    experts = [o for o in plan["owners"] if o[0] == "experts"]
    assert len(experts) == 2
    for _, _, owner, holders, sources in experts:
        assert holders == [owner] and sources == [owner]
    if world == 2:
        heads = [o for o in runs(world)["layout:rows"][0]["__plan__"]["owners"] if o[0] == "w6"]
        assert [(h[2], h[3]) for h in heads] == [(0, [0]), (1, [1])]


@pytest.mark.parametrize("world", [2, 4])
def test_hsdp_spreads_owners_over_replicas(runs, world):
    """HSDP: the work is spread over the replicas too (every rank owns matrices), and each
    distinct piece is sent once (one source per piece, not one per replica)."""
    plan = runs(world)["layout:hsdp"][0]["__plan__"]
    owners = {o[2] for o in plan["owners"]}
    assert owners == set(range(world))
    for _, _, _, holders, sources in plan["owners"]:
        assert len(sources) <= max(1, len(holders) // 2)


def test_stalled_rank_fails_the_others_with_a_clear_error(tmp_path):
    """A rank that stops answering (here: sleeps) makes the others raise CollectiveError naming
    the collective, their rank and the process group's timeout, within about that timeout."""
    res = launch(("stall",), 2, tmp_path, env={"MUONLAB_TEST_PG_TIMEOUT": "3"}, ranks=[0], timeout=60)["stall"][0]
    assert res["error"] == "CollectiveError", res
    assert "failed on rank 0 of 2" in res["message"] and "timeout of 3 s" in res["message"], res["message"]
    assert res["seconds"] < 10


# ---------------------------------------------------------------------- checkpoints (DCP)
def test_optimizer_state_dict_by_fqn_single_process():
    """torch.distributed.checkpoint.state_dict helpers work with Muon (state keyed by FQN)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.set_num_threads(1)
    model = W.make_model()
    opt = W.make_optimizer(model)
    W.reference(steps=2, model=model, opt=opt)
    osd = get_optimizer_state_dict(model, opt)
    assert "a.weight" in osd["state"] and "momentum_buffer" in osd["state"]["a.weight"]
    assert "exp_avg" in osd["state"]["head.weight"]
    model2 = W.make_model()
    model2.load_state_dict(model.state_dict())
    opt2 = W.make_optimizer(model2)
    set_optimizer_state_dict(model2, opt2, copy.deepcopy(osd))  # a checkpoint shares no tensors
    a = W.reference(steps=2, start=2, model=model, opt=opt)
    b = W.reference(steps=2, start=2, model=model2, opt=opt2)
    assert max_diff(a, b) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("save_world,load_world", [(2, 1), (1, 2)])
def test_dcp_checkpoint_resume_across_world_sizes(tmp_path, save_world, load_world):
    """FSDP2 + DCP: save model and optimizer at one world size, load at another, and continue
    exactly like a run that never stopped (and like one process)."""
    ckpt = tmp_path / "ckpt"
    saved = launch(("ckpt_save",), save_world, tmp_path / "save", ckpt)["ckpt_save"]
    loaded = launch(("ckpt_load",), load_world, tmp_path / "load", ckpt)["ckpt_load"]
    ref = W.reference(steps=2 * W.STEPS)
    for got in saved + loaded:
        assert max_diff(got, ref) < TOL
    assert max_diff(loaded[0], saved[0]) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("save,load", [((4, "hsdp"), (4, "")), ((4, "hsdp"), (1, "")), ((1, ""), (4, "hsdp"))])
def test_dcp_checkpoint_resume_across_meshes(tmp_path, save, load):
    """DCP save on one mesh, load on another: HSDP 2x2 -> FSDP 4 -> 1 rank and back; the run
    continues exactly like one that never stopped."""
    ckpt = tmp_path / "ckpt"
    sc_save = "ckpt_save" + (f":{save[1]}" if save[1] else "")
    sc_load = "ckpt_load" + (f":{load[1]}" if load[1] else "")
    saved = launch((sc_save,), save[0], tmp_path / "save", ckpt)[sc_save]
    loaded = launch((sc_load,), load[0], tmp_path / "load", ckpt)[sc_load]
    ref = W.reference(steps=2 * W.STEPS)
    for got in saved + loaded:
        assert max_diff(got, ref) < TOL


# ---------------------------------------------------------------------- the lab: torchrun --parallel
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_lab_torchrun_two_ranks_matches_one_process(tmp_path, mode):
    """`torchrun --nproc_per_node=2 -m muonlab train --parallel MODE` ends with the loss of a
    single-process run on the same global batches; only rank 0 writes the run folder."""
    import json

    from muonlab.lab.train import TrainConfig, train

    args = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--max-corpus-bytes", "200000",
            "--eval-batches", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "muonlab", "train", "--parallel", mode, *args, "--out", str(tmp_path / mode)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / mode / "result.json").read_text())
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, max_corpus_bytes=200000, eval_batches=2,
                      eval_every=max(1, 6 // 10), checkpoint_every=max(1, 6 // 4))  # the CLI's values
    assert got["config_key"] == cfg.key()
    torch.set_num_threads(1)
    ref = train(cfg, tmp_path / "none", progress=False)
    assert abs(got["final_val_loss"] - ref["final_val_loss"]) < 1e-4
    rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses == pytest.approx([r["loss"] for r in ref_rows if r["kind"] == "train"], abs=1e-4)
    assert len(losses) == 6  # one writer: rank 0's rows only


_LAB_SCRIPT = """
import json, sys
import torch
from muonlab.lab.train import TrainConfig, train
torch.set_num_threads(1)
mode, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, max_corpus_bytes=200000, eval_batches=2, eval_every=3,
                  checkpoint_every=3)
res = train(cfg, out, progress=False, parallel=mode, stop_after=int(stop) if stop != "none" else None)
print("RESULT", json.dumps(res))
"""


@pytest.mark.slow
def test_lab_fsdp_checkpoint_resumes_at_another_world_size(tmp_path):
    """An FSDP run interrupted after 3 of 6 steps at 2 ranks resumes at 1 rank and ends like an
    uninterrupted single-process run (the lab's parallel checkpoints are sharded DCP folders, keyed by
    parameter name). More meshes: tests/test_lab_parallel.py."""
    import json

    script = tmp_path / "run.py"
    script.write_text(_LAB_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def run(nproc: int, mode: str, out: Path, stop: str) -> dict:
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
               if nproc else [sys.executable]) + [str(script), mode, str(out), stop]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][0][7:])

    assert run(2, "fsdp", tmp_path / "p", "3") == {"finished": False, "step": 3}
    resumed = run(1, "fsdp", tmp_path / "p", "none")
    plain = run(0, "none", tmp_path / "q", "none")
    assert resumed["finished"] and resumed["config_key"] == plain["config_key"]
    assert abs(resumed["final_val_loss"] - plain["final_val_loss"]) < 1e-4
