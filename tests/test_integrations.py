"""Trainer integrations: Hugging Face Trainer, Lightning, and wrapped models (torch.compile, DDP, FSDP2).

Tiny random models, a few steps: each path trains, checkpoints and resumes exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from muonlab import Muon, muon_param_groups

VOCAB, SEQ = 64, 16


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'muonlab[integrations]'")
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


# ---------------------------------------------------------------------- the package boundary
def test_the_core_never_imports_the_integrations():
    code = ("import sys, muonlab, muonlab.cli; from torch import nn; "
            "muonlab.Muon(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))).routing_report(); "
            "bad = [m for m in sys.modules if m.startswith('muonlab.integrations') or m in ('transformers', 'lightning')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_split_decay_names_groups_and_keeps_norms_undecayed():
    from muonlab.integrations import build_optimizer

    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    opt = build_optimizer(model, weight_decay=0.1, lr=0.02, adamw_lr=1e-3)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon", "adamw", "adamw_no_decay"}
    assert groups["muon"]["weight_decay"] == groups["adamw"]["weight_decay"] == 0.1
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0
    assert groups["adamw"]["param_names"] == ["0.weight", "3.weight"]
    assert set(groups["adamw_no_decay"]["param_names"]) == {"1.bias", "2.weight", "2.bias", "3.bias"}
    assert groups["adamw"]["lr"] == 1e-3 and groups["muon"]["lr"] == 0.02


# ---------------------------------------------------------------------- Hugging Face Trainer
def _args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3,
                weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_steps=3,
                save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_hf_trainer_factory_routes_the_real_model_and_logs_both_lrs(tmp_path):
    pytest.importorskip("transformers", reason="needs transformers: pip install 'muonlab[integrations]'")
    from transformers import Trainer

    from muonlab.integrations.hf import LogGroupLRs, muon_optimizer

    model = _tiny_llama()
    args = _args(tmp_path / "run", max_steps=3, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(),
                      optimizer_cls_and_kwargs=muon_optimizer(args, lr=0.02), callbacks=[LogGroupLRs()])
    before = _params(model)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, Muon)
    groups = {g["name"]: g for g in opt.param_groups}
    # the real model was routed: embeddings and the head are on AdamW, not in Trainer's flat groups
    assert "model.embed_tokens.weight" in groups["adamw"]["param_names"]
    assert "lm_head.weight" in groups["adamw"]["param_names"]
    assert "model.layers.0.self_attn.q_proj.weight" in groups["muon"]["param_names"]
    # args: AdamW lr/betas/eps, weight decay on Muon and AdamW's matrices, none on norms
    assert groups["adamw"]["initial_lr"] == 2e-3 and groups["muon"]["initial_lr"] == 0.02
    assert groups["adamw"]["betas"] == (args.adam_beta1, args.adam_beta2) and groups["adamw"]["eps"] == args.adam_epsilon
    assert groups["muon"]["weight_decay"] == groups["adamw"]["weight_decay"] == 0.1
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0
    # both lrs in the log, scheduled alike (linear warmup then decay)
    logs = [h for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["learning_rate"] == h["learning_rate_muon"]
        assert h["learning_rate_muon"] == pytest.approx(10 * h["learning_rate_adamw"])
    assert logs[2]["learning_rate_adamw"] == pytest.approx(2e-3)  # end of the 2-step warmup: args.learning_rate
    assert logs[2]["learning_rate_muon"] == pytest.approx(0.02)
    after = _params(model)
    assert all(not torch.equal(before[n], after[n]) for n in after)


def test_hf_muon_trainer_checkpoints_and_resumes_exactly(tmp_path):
    """MuonTrainer (NorMuon on, so per-row state travels too): 6 steps straight, or 3 steps, a
    checkpoint, and 3 more from ``resume_from_checkpoint``: the same weights, bit for bit."""
    pytest.importorskip("transformers", reason="needs transformers: pip install 'muonlab[integrations]'")
    from muonlab.integrations.hf import MuonTrainer

    def run(out: Path, resume: str | None = None):
        model = _tiny_llama()
        trainer = MuonTrainer(model=model, args=_args(out), train_dataset=_Tokens(),
                              muon_kwargs={"lr": 0.02, "normuon": True})
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, trainer = run(tmp_path / "full")
    logged = [h for h in trainer.state.log_history if "learning_rate" in h]
    assert logged and all("learning_rate_muon" in h and "learning_rate_adamw" in h for h in logged)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    resumed, trainer2 = run(tmp_path / "resumed", resume=str(checkpoint))
    assert trainer2.state.global_step == 6
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_hf_trainer_with_your_own_muon_gets_trainers_scheduler(tmp_path):
    pytest.importorskip("transformers", reason="needs transformers: pip install 'muonlab[integrations]'")
    from transformers import Trainer

    model = _tiny_llama()
    opt = Muon(model, lr=0.02, adamw_lr=1e-3)
    trainer = Trainer(model=model, args=_args(tmp_path / "own", max_steps=2, save_strategy="no"),
                      train_dataset=_Tokens(8), optimizers=(opt, None))
    trainer.train()
    assert trainer.lr_scheduler is not None
    assert [g["initial_lr"] for g in opt.param_groups] == [0.02, 1e-3]
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # linear decay to 0 at max_steps, every group


# ---------------------------------------------------------------------- Lightning
def _lit_module():
    L = pytest.importorskip("lightning", reason="needs lightning: pip install 'muonlab[integrations]'")
    from muonlab.integrations.lightning import muon_optimizers

    class LitLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(VOCAB, 32)
            self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.norm = nn.LayerNorm(32)
            self.lm_head = nn.Linear(32, VOCAB, bias=False)

        def training_step(self, batch, _):
            x = batch["input_ids"]
            h = self.norm(self.emb(x) + self.body(self.emb(x)))
            return nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), batch["labels"].flatten())

        def train_dataloader(self):
            # one batch an epoch: a plain DataLoader has no position to restore, and Lightning resumes
            # a checkpoint taken at a step as mid-epoch, replaying batches from the epoch's start;
            # with one batch every step sees the same data, so what is tested is the optimizer's and
            # the scheduler's state
            return torch.utils.data.DataLoader(_Tokens(4), batch_size=4, shuffle=False)

        def configure_optimizers(self):
            warmup = lambda step: min(1.0, (step + 1) / 2)  # noqa: E731
            return muon_optimizers(self, lr=0.02, adamw_lr=2e-3, weight_decay=0.1,
                                   scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup))

    return L, LitLM()


def _fit(L, module, root: Path, max_steps: int, ckpt_path: str | None = None):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(root / "logs"),
                        callbacks=[ckpt, LearningRateMonitor(logging_interval="step")], log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_lightning_configure_optimizers_trains_and_resumes_exactly(tmp_path):
    L, full = _lit_module()
    trainer = _fit(L, full, tmp_path / "full", max_steps=6)
    opt = trainer.optimizers[0]
    assert isinstance(opt, Muon)
    assert {g["name"]: g["param_names"] for g in opt.param_groups} == {
        "muon": ["body.0.weight", "body.2.weight"], "adamw": ["emb.weight", "lm_head.weight"],
        "adamw_no_decay": ["body.0.bias", "body.2.bias", "norm.weight", "norm.bias"]}
    header = next((tmp_path / "full" / "logs").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"lr-Muon/muon", "lr-Muon/adamw", "lr-Muon/adamw_no_decay"} <= set(header)  # named groups
    checkpoint = tmp_path / "full" / "ckpt" / "step=3.ckpt"
    assert checkpoint.exists()
    _, resumed = _lit_module()
    _fit(L, resumed, tmp_path / "resumed", max_steps=6, ckpt_path=str(checkpoint))
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------- wrapped models
def test_torch_compile_wrapped_model_routes_like_the_plain_one():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, VOCAB))
    compiled = torch.compile(plain)
    opt = Muon(compiled, lr=0.02, adamw_lr=1e-3)
    report = {r.name: r for r in opt.routing_report().rows}
    assert report["_orig_mod.1.weight"].algorithm == "muon"
    assert report["_orig_mod.0.weight"].algorithm == report["_orig_mod.3.weight"].algorithm == "adamw"
    groups = muon_param_groups(compiled, adamw=["1.weight"])  # a pattern without the prefix
    assert {g["algorithm"]: g["param_names"] for g in groups}["adamw"][0] == "_orig_mod.0.weight"
    assert "_orig_mod.1.weight" in {g["algorithm"]: g["param_names"] for g in groups}["adamw"]


WRAPPED_WORKER = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from muonlab import Muon, muon_param_groups
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 32))

def routing(model):
    return [(g["algorithm"], [n.replace("module.", "", 1) if n.startswith("module.") else n for n in g["param_names"]],
             g["views"], g["routing"]) for g in muon_param_groups(model)]

def step(model, **kw):
    opt = Muon(model, lr=0.02, adamw_lr=1e-3, **kw)
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    return {n.replace("module.", "", 1): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for n, p in model.named_parameters()}

want = routing(make())
ddp = nn.parallel.DistributedDataParallel(make())
assert routing(ddp) == want, (routing(ddp), want)
assert "module.1.weight" in muon_param_groups(ddp, adamw=["1.weight"])[0]["param_names"]  # no prefix needed
after_ddp = step(ddp, process_group=False)

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
fsdp = make()
fully_shard(fsdp, mesh=init_device_mesh("cpu", (1,)))
assert routing(fsdp) == want, (routing(fsdp), want)
after_plain = step(make(), process_group=False)
after_fsdp = step(fsdp)  # the world group: FSDP2's DTensor path
for n, p in after_plain.items():
    torch.testing.assert_close(after_ddp[n], p, msg=n)
    torch.testing.assert_close(after_fsdp[n], p, msg=n)
dist.destroy_process_group()
print("ok")
"""


def test_ddp_and_fsdp2_wrapped_models_route_like_the_plain_one(tmp_path):
    """One gloo rank in a subprocess (a process group must not leak into the other tests)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WRAPPED_WORKER))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
