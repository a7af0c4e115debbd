"""The league's pieces: weight decay for every zoo entry, pytorch-optimizer's AdaMuon and MuonClip in
the zoo (MuonClip fed the lab GPT's per-head logits), and compare's weight-decay stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from muonlab.cli import main
from muonlab.lab.compare import compare
from muonlab.lab.data import load_corpus
from muonlab.lab.model import GPT, GPTConfig
from muonlab.lab.train import TrainConfig, train
from muonlab.lab.zoo import ZOO, build_optimizer

pytest.importorskip("pytorch_optimizer")

SMALL = dict(d_model=32, n_layer=1, n_head=4, n_kv_head=2, seq_len=32)


def _lab(root, **overrides) -> TrainConfig:
    """A small text corpus in ``root`` (cached there) and a CPU TrainConfig of the small lab GPT on it."""
    text = "".join(f"class C{i}:\n    def m(self, y):\n        return y + {i}\n\n" for i in range(3000))
    (root / "data.py").write_text(text)
    load_corpus(root / "data.py", cache_dir=root / "cache")
    return TrainConfig(**{**dict(model="tiny", model_overrides=SMALL, batch_size=2, eval_batches=1, warmup=1,
                                 device="cpu", data=str(root / "data.py")), **overrides})


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("tiny", vocab_size=64, **SMALL))


def _loss_step(model: GPT, opt: torch.optim.Optimizer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 16), generator=g)
    _, loss = model(x, x.roll(-1, 1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# sophia's step needs a Hessian-vector product from a create_graph backward; test_lab_train trains it
@pytest.mark.parametrize("name", sorted(n for n, e in ZOO.items() if not e.backward_create_graph))
def test_weight_decay_reaches_every_zoo_entry(name):
    """With zero gradients, decay alone moves the weights: wd=0 leaves them, wd>0 shrinks every matrix
    (decoupled in AdamW, Lion and the Muon family; coupled into the gradient in Adam and SGD)."""
    moved = {}
    for wd in (0.0, 0.5):
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(name, model, size="tiny", lr=1e-2, weight_decay=wd)
        for _ in range(2):  # SOAP spends its first step on the preconditioner's bases
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
        moved[wd] = [not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters())]
    matrices = [i for i, p in enumerate(_model().parameters()) if p.ndim == 2]
    assert all(moved[0.5][i] for i in matrices), f"{name}: weight decay left a matrix unchanged"
    if ZOO[name].family in ("muon", "sign") or name in ("adamw", "adafactor", "lamb"):
        assert not any(moved[0.0]), f"{name}: zero gradient and no decay should leave every weight"


def test_weight_decay_is_decoupled_and_identical_across_muon_parts():
    """muonlab Muon with the lab's weight decay: every parameter shrinks by exactly (1 - lr * wd) on a
    zero gradient (the Muon part with its lr, the AdamW part with its adamw_lr)."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer("muon", model, size="tiny", lr=0.05, adamw_lr=0.01, weight_decay=0.2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for group in opt.param_groups:
        lr = group["lr"]
        assert group["weight_decay"] == 0.2
        for name, p in zip(group["param_names"], group["params"]):
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * 0.2), msg=name)


def test_bad_weight_decay_is_named():
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got -0.1"):
        build_optimizer("adamw", _model(), weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got nan"):
        TrainConfig(weight_decay=math.nan).validate()


def test_weight_decay_leaves_old_run_keys_alone():
    """Runs without a weight decay keep the cache key they had before the field existed."""
    assert TrainConfig().key() == TrainConfig(weight_decay=None).key()
    assert TrainConfig(weight_decay=0.1).key() != TrainConfig().key()


def test_adamuon_matches_a_hand_computed_first_step():
    """pytorch-optimizer's AdaMuon as the zoo builds it: the first step of a hidden matrix is
    -lr * 0.2 * sqrt(max(A, B)) * sqrt(min(A, B)) * U / ||U||_F with U = NS(m) / (|NS(m)| + eps)."""
    model = _model()
    opt = build_optimizer("adamuon", model, size="tiny", lr=1e-2)
    w = model.blocks[0].mlp.w1.weight
    w0 = w.detach().clone()
    _loss_step(model, opt)
    assert not torch.equal(w0, w.detach())
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    other = [g for g in opt.param_groups if not g["use_muon"]]
    assert any(p is w for g in muon_groups for p in g["params"])
    assert any(p is model.tok_emb.weight for g in other for p in g["params"])  # embeddings stay on AdamW
    rows, cols = w.shape
    step = w.detach() - w0
    expected_rms = 1e-2 * 0.2 * math.sqrt(max(rows, cols)) * math.sqrt(min(rows, cols)) / math.sqrt(rows * cols)
    assert step.square().mean().sqrt().item() == pytest.approx(expected_rms, rel=1e-3)


def test_muonclip_clips_the_right_heads_under_grouped_query_attention():
    """The zoo's MuonClip scales query head h by (tau / s_h)^0.5 and key head j by (tau / max of its
    query group)^0.5 (pytorch-optimizer's rule, alpha 0.5), given the lab GPT's logits."""
    model = _model()
    opt = build_optimizer("muonclip", model, size="tiny", lr=1e-12, adamw_lr=1e-12)  # the clip alone
    attn = model.blocks[0].attn
    wq0, wk0 = attn.wq.weight.detach().clone(), attn.wk.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    logits = torch.tensor([50.0, 400.0, 100.0, 25.0])  # 4 query heads, 2 key heads: groups {0,1}, {2,3}
    opt.set_max_logits({"blocks.0.attn": logits})
    opt.step()
    hd = attn.head_dim
    q_scale = (100.0 / logits.clamp_min(100.0)).sqrt()
    k_scale = (100.0 / torch.tensor([400.0, 100.0])).sqrt()
    torch.testing.assert_close(attn.wq.weight.detach(), wq0 * q_scale.repeat_interleave(hd)[:, None])
    torch.testing.assert_close(attn.wk.weight.detach(), wk0 * k_scale.repeat_interleave(hd)[:, None])
    # the logits are used once: the next step without new ones clips nothing
    wq1 = attn.wq.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(attn.wq.weight.detach(), wq1)


def test_muonclip_trains_in_the_lab_and_gets_logits(tmp_path, monkeypatch):
    cfg = _lab(tmp_path, optimizer="muonclip", steps=3, eval_every=3, checkpoint_every=3)
    corpus = load_corpus(tmp_path / "data.py", cache_dir=tmp_path / "cache")
    seen = []
    from muonlab.lab import zoo

    real = zoo._po_muonclip

    def spy(*a, **k):
        opt = real(*a, **k)
        orig = opt.set_max_logits
        opt.set_max_logits = lambda d: (seen.append(sorted(d)), orig(d))[1]
        return opt

    monkeypatch.setattr(zoo.ZOO["muonclip"], "build", spy)
    res = train(cfg, tmp_path / "run", progress=False, corpus=corpus)
    assert math.isfinite(res["final_val_loss"])
    assert seen == [["blocks.0.attn"]] * 3


@pytest.fixture(scope="module")
def wd_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd")
    base = _lab(root, steps=8, batch_size=4, eval_every=4, eval_batches=2, checkpoint_every=8)
    out = root / "out"
    lines: list[str] = []
    summary = compare(["muon", "sgd", "adamw"], base=base, sweep=True, lr_multipliers=(0.5, 1.0), seeds=(0,),
                      out=out, weight_decays=(0.0, 0.5), wd_top=1, progress=False, log=lines.append, report=False)
    return out, summary, lines


def test_weight_decay_stage_trains_the_leaders_and_the_baseline(wd_compare):
    out, summary, lines = wd_compare
    opts = summary["optimizers"]
    leader = min(("muon", "sgd", "adamw"),
                 key=lambda n: min(p["final_val_loss"] for p in opts[n]["sweep"] if p["weight_decay"] is None))
    expected = [leader] + (["adamw"] if leader != "adamw" else [])
    assert summary["config"]["weight_decay_swept_for"] == expected
    assert "optimizer" not in summary["config"] and summary["config"]["seeds"] == [0]
    for name in ("muon", "sgd", "adamw"):
        wds = sorted(p["weight_decay"] for p in opts[name]["sweep"] if p["weight_decay"] is not None)
        assert wds == ([0.0, 0.5] if name in expected else []), name
        best = min(opts[name]["sweep"], key=lambda p: p["final_val_loss"])
        assert (opts[name]["best_lr"], opts[name]["best_weight_decay"]) == (best["lr"], best["weight_decay"])
    for name in expected:  # the stage runs at the lr sweep's best lr, recorded in each run's config
        lr_best = min((p for p in opts[name]["sweep"] if p["weight_decay"] is None), key=lambda p: p["final_val_loss"])["lr"]
        for wd in (0.0, 0.5):
            cfg = json.loads((out / "runs" / name / f"lr{lr_best:.3g}_wd{wd:g}_seed0" / "config.json").read_text())
            assert cfg["config"]["weight_decay"] == wd and cfg["config"]["lr"] == lr_best
    assert any("weight decay [0.0, 0.5]" in line for line in lines)


def test_weight_decay_flags_are_checked(capsys, tmp_path):
    assert main(["compare", "--weight-decays", "0.1,-1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "muonlab compare: error: --weight-decays must be distinct comma-separated numbers >= 0" in err
    assert main(["compare", "--weight-decays", "0.1", "--wd-top", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--wd-top must be >= 1, got 0" in capsys.readouterr().err


def test_efficiency_says_when_a_best_lr_sits_at_the_end_of_its_sweep(tmp_path):
    base = _lab(tmp_path, steps=6)
    from muonlab.lab.compare import bracketed, efficiency

    lines: list[str] = []
    res = efficiency("muon", "adamw", base=base, fractions=(0.5, 1.0), seeds=(0,), lr_multipliers=(0.5, 1.0, 2.0),
                     out=tmp_path / "e", progress=False, log=lines.append)
    assert res["lr_multipliers"] == [0.5, 1.0, 2.0]
    # the template's optimizer and seed are not the study's: the JSON names what ran, once
    assert base.optimizer != "muon" and "optimizer" not in res["config"] and "seed" not in res["config"]
    assert (res["optimizer"], res["baseline"], res["seeds"]) == ("muon", "adamw", [0])
    full = res["points"][-1]
    assert res["optimizer_full_budget_lr"] == full["best_lr"]
    for key, swept, name in (("baseline_lr_bracketed", res["baseline_result"], "adamw"),
                             ("optimizer_lr_bracketed", full, "muon")):
        assert (res[key], res[key.replace("bracketed", "edge")]) == bracketed(swept["sweep"])
        warned = [ln for ln in lines if ln.startswith(f"  warning: {name}'s best lr")]
        assert bool(warned) == (not res[key]), (key, lines)
    # a one-point "sweep" brackets nothing: both are flagged
    lines.clear()
    res = efficiency("muon", "adamw", base=base, fractions=(0.5, 1.0), seeds=(0,), lr_multipliers=(1.0,),
                     out=tmp_path / "e", progress=False, log=lines.append)
    assert res["baseline_lr_bracketed"] is False and res["optimizer_lr_bracketed"] is False
    assert sum("warning:" in ln and "widen it (--lr-multipliers)" in ln for ln in lines) == 2


def test_efficiency_cli_passes_the_lr_multipliers(monkeypatch, capsys, tmp_path):
    from muonlab.lab import compare as compare_mod

    calls = []
    monkeypatch.setattr(compare_mod, "efficiency", lambda *a, **kw: calls.append(kw) or {})
    assert main(["efficiency", "--lr-multipliers", "0.5,1,2,4", "--out", str(tmp_path / "e")]) == 0
    assert calls[0]["lr_multipliers"] == (0.5, 1.0, 2.0, 4.0)
    assert main(["efficiency", "--lr-multipliers", "0,1", "--out", str(tmp_path / "f")]) == 2
    assert "muonlab efficiency: error: --lr-multipliers must be positive, got '0,1'" in capsys.readouterr().err


def test_compare_extends_a_sweep_whose_best_lr_is_at_an_end(tmp_path):
    """After the lr sweep, an optimizer whose best lr is at an end of its grid gets the next point out
    (x2 or /2, up to MAX_LR_EXTENSIONS times); the summary says whether each optimum is inside."""
    from muonlab.lab.compare import MAX_LR_EXTENSIONS, bracketed

    base = _lab(tmp_path, steps=6, eval_every=3, checkpoint_every=6)
    lines: list[str] = []
    # sgd at 1e-4..4e-4 times its default barely moves: its best is the top of the grid, every time
    summary = compare(["sgd", "adamw"], base=base, sweep=True, lr_multipliers=(0.5, 1.0, 2.0), seeds=(0,),
                      out=tmp_path / "c", progress=False, log=lines.append, report=False)
    extended = summary["config"]["lr_extended"]
    for name, s in summary["optimizers"].items():
        lrs = sorted(p["lr"] for p in s["sweep"])
        assert len(lrs) == 3 + len(extended.get(name, []))
        inside = bracketed({p["lr"]: p["final_val_loss"] for p in s["sweep"]})[0]
        assert s["lr_bracketed"] == inside
        assert inside or len(extended.get(name, [])) == MAX_LR_EXTENSIONS, (name, s["sweep"])
        grid = [p for p in lrs if p not in extended.get(name, [])]
        for lr in extended.get(name, []):  # each added point is one factor of 2 beyond the grid before it
            assert lr in (min(grid) / 2, max(grid) * 2), (lr, grid)
            grid.append(lr)
    assert any(line.startswith("muonlab compare: best lr at an end of the sweep") for line in lines) == bool(extended)


def test_weight_decay_flag_reaches_the_run_config(monkeypatch, capsys, tmp_path):
    from muonlab.lab import train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, out, **kw: calls.append(cfg) or {})
    assert main(["train", "--weight-decay", "0.1", "--out", str(tmp_path / "r")]) == 0
    assert calls[0].weight_decay == 0.1
    assert main(["train", "--weight-decay", "-1", "--out", str(tmp_path / "s")]) == 2
    assert "muonlab train: error: weight_decay must be a number >= 0, got -1.0" in capsys.readouterr().err
