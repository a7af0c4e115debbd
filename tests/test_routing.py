"""Tests for module-aware routing (``muonlab.muon_param_groups``) and the routing report."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from muonlab import Muon, RoutingReport, muon_param_groups



def _assignment(groups) -> dict[str, str]:
    return {n: g["algorithm"] for g in groups for n in g["param_names"]}


def _reasons(groups) -> dict[str, str]:
    return {n: r for g in groups for n, r in zip(g["param_names"], g["routing"])}


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 30, d: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.tok.weight  # weight tying

    def forward(self, idx):
        return self.out(torch.relu(self.hidden(self.tok(idx))))


class Block(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)


class SmallGPT(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.final_norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


class EncoderLM(nn.Module):
    """A small transformer from nn.TransformerEncoderLayer (which holds nn.MultiheadAttention)."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)


# ---------------------------------------------------------------------- the rules
def test_tied_embedding_and_head_is_assigned_once_to_adamw():
    model = TiedLM()
    groups = muon_param_groups(model)
    names = [n for g in groups for n in g["param_names"]]
    tensors = [p for g in groups for p in g["params"]]
    assert len(names) == len(set(names)) == 3  # tok.weight (= out.weight), hidden.weight, hidden.bias
    assert len({id(p) for p in tensors}) == len(tensors) == len(list(model.parameters()))
    assignment = _assignment(groups)
    assert assignment == {"tok.weight": "adamw", "hidden.weight": "muon", "hidden.bias": "adamw"}
    assert "tied to the output head" in _reasons(groups)["tok.weight"]
    # the tied weight exists once in the optimizer, too
    opt = Muon(model)
    assert sum(p is model.tok.weight for g in opt.param_groups for p in g["params"]) == 1


def test_tied_head_is_recognized_even_with_another_last_linear():
    class Model(TiedLM):
        def __init__(self):
            super().__init__()
            self.value_head = nn.Linear(16, 2)  # registered after the tied head

    groups = muon_param_groups(Model())
    assignment = _assignment(groups)
    # a tied head exists, so there is no last-Linear fallback: value_head is an ordinary Linear
    assert assignment["value_head.weight"] == "muon"
    assert assignment["tok.weight"] == "adamw"


def test_conventional_head_names_go_to_adamw():
    model = SmallGPT()
    groups = muon_param_groups(model)
    assignment = _assignment(groups)
    assert assignment["lm_head.weight"] == "adamw"
    assert _reasons(groups)["lm_head.weight"] == "output head (named 'lm_head')"
    assert assignment["emb.weight"] == "adamw"
    for i in range(2):
        for m in ("wq", "wk", "fc", "proj"):
            assert assignment[f"blocks.{i}.{m}.weight"] == "muon"
        assert assignment[f"blocks.{i}.fc.bias"] == "adamw"
        assert assignment[f"blocks.{i}.ln.weight"] == "adamw"
    assert _reasons(groups)["blocks.0.ln.weight"] == "normalization weight"
    assert _reasons(groups)["blocks.0.fc.bias"] == "bias"


def test_head_named_by_user():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.decoder = nn.Linear(8, 12)
            self.aux = nn.Linear(8, 8)  # last Linear, but not the head

    groups = muon_param_groups(Model(), head="decoder")
    assignment = _assignment(groups)
    assert assignment["decoder.weight"] == "adamw" and assignment["decoder.bias"] == "adamw"
    assert _reasons(groups)["decoder.weight"] == "output head (named by user)"
    assert assignment["aux.weight"] == "muon" and assignment["body.weight"] == "muon"
    # several heads, and head given as a weight name
    assignment = _assignment(muon_param_groups(Model(), head=["decoder.weight", "aux"]))
    assert assignment["decoder.weight"] == assignment["aux.weight"] == "adamw"
    assert assignment["body.weight"] == "muon"
    with pytest.raises(ValueError, match="'nohead'"):
        muon_param_groups(Model(), head="nohead")


def test_last_linear_fallback_and_head_none():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    groups = muon_param_groups(model)
    assignment = _assignment(groups)
    assert assignment["4.weight"] == "adamw" and assignment["4.bias"] == "adamw"
    assert _reasons(groups)["4.weight"] == "output head (last Linear layer)"
    assert assignment["0.weight"] == assignment["2.weight"] == "muon"
    assignment = _assignment(muon_param_groups(model, head=None))
    assert assignment["4.weight"] == "muon"


def test_norm_layers_biases_and_scalars_go_to_adamw():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8, bias=False)
            self.bn = nn.BatchNorm1d(8)
            self.gn = nn.GroupNorm(2, 8)
            self.rms = nn.RMSNorm(8)
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.gate = nn.Parameter(torch.ones(8))
            self.lm_head = nn.Linear(8, 2)

    groups = muon_param_groups(Model())
    assignment, reasons = _assignment(groups), _reasons(groups)
    assert [n for n, a in assignment.items() if a == "muon"] == ["lin.weight"]
    for name in ("bn.weight", "gn.weight", "rms.weight"):
        assert reasons[name] == "normalization weight"
    assert reasons["scale"] == "0-D tensor" and reasons["gate"] == "1-D tensor"
    # nonmatrix="rms" sends the 0-D/1-D tensors to the RMS rule instead
    assignment = _assignment(muon_param_groups(Model(), nonmatrix="rms"))
    assert assignment["gate"] == assignment["bn.weight"] == "rms"
    assert assignment["lm_head.weight"] == "adamw"
    with pytest.raises(ValueError, match="'sgd'"):
        muon_param_groups(Model(), nonmatrix="sgd")


def test_conv_and_expert_tensors():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv1d = nn.Conv1d(8, 8, 5)
            self.experts = nn.Parameter(torch.randn(4, 8, 16))
            self.classifier = nn.Linear(8, 10)

    groups = muon_param_groups(Model())
    muon = next(g for g in groups if g["algorithm"] == "muon")
    views = dict(zip(muon["param_names"], muon["views"]))
    assert views == {"conv.weight": "flatten", "conv1d.weight": "flatten", "experts": "experts"}
    reasons = _reasons(groups)
    assert reasons["conv.weight"] == "conv kernel (flattened)"
    assert reasons["experts"] == "expert stack (4 batched matmuls)"
    assert _assignment(groups)["classifier.weight"] == "adamw"


def test_frozen_parameters_are_listed_and_left_out():
    model = SmallGPT()
    model.emb.weight.requires_grad_(False)
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    groups = muon_param_groups(model)
    in_groups = {n for g in groups for n in g["param_names"]}
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert in_groups.isdisjoint(frozen_names)
    assert {n for n, _ in groups.frozen} == frozen_names
    assert dict(groups.frozen)["emb.weight"] == (40, 16)
    opt = Muon(model)
    rows = {r.name: r for r in opt.routing_report().rows}
    for n in frozen_names:
        assert rows[n].algorithm == "frozen" and rows[n].lr is None
        assert "requires_grad=False" in rows[n].reason
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    assert "frozen" in str(opt.routing_report())


def test_override_patterns():
    model = SmallGPT()
    groups = muon_param_groups(model, adamw=["blocks.*.wk.weight"], muon=["emb.weight"])
    assignment, reasons = _assignment(groups), _reasons(groups)
    assert assignment["blocks.0.wk.weight"] == assignment["blocks.1.wk.weight"] == "adamw"
    assert assignment["blocks.0.wq.weight"] == "muon"
    assert assignment["emb.weight"] == "muon"
    assert reasons["emb.weight"] == "user override (muon pattern)"
    assert reasons["blocks.1.wk.weight"] == "user override (adamw pattern)"
    with pytest.raises(ValueError, match="both"):
        muon_param_groups(model, adamw=["blocks.0.*"], muon=["blocks.0.wq.weight"])
    with pytest.raises(ValueError, match=r"blocks\.0\.fc\.bias.*\(64,\)"):
        muon_param_groups(model, muon=["blocks.0.fc.bias"])


@pytest.mark.parametrize("kwargs,what", [
    (dict(adamw=["decoder.*"]), "adamw pattern 'decoder.*'"),
    (dict(muon=["blocks.9.*"]), "muon pattern 'blocks.9.*'"),
    (dict(views={"blocks.*.attn.weight": "heads:2"}), "views pattern 'blocks.*.attn.weight'"),
    (dict(views={"emb.weight": "heads:2"}), "views pattern 'emb.weight' matches no parameter routed to Muon"),
])
def test_pattern_matching_nothing_is_an_error(kwargs, what):
    with pytest.raises(ValueError, match=what.replace(".", r"\.").replace("*", r"\*")):
        muon_param_groups(SmallGPT(), **kwargs)


def test_pattern_matching_only_frozen_parameters_is_an_error():
    model = SmallGPT()
    model.blocks[1].wq.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        muon_param_groups(model, adamw=["blocks.1.wq.weight"])


def test_views_mapping():
    model = SmallGPT()
    groups = muon_param_groups(model, views={"blocks.*.wq.weight": "heads:4", "blocks.0.fc.weight": "heads:2"})
    muon = next(g for g in groups if g["algorithm"] == "muon")
    views = dict(zip(muon["param_names"], muon["views"]))
    assert views["blocks.0.wq.weight"] == views["blocks.1.wq.weight"] == "heads:4"
    assert views["blocks.0.fc.weight"] == "heads:2" and views["blocks.1.fc.weight"] == "matrix"
    assert views["blocks.0.wk.weight"] == "matrix"
    assert _reasons(groups)["blocks.0.wq.weight"] == "hidden Linear weight (user view)"
    report = {r.name: r for r in Muon(groups).routing_report().rows}
    assert report["blocks.0.wq.weight"].matrices == "4x(4, 16)"
    assert report["blocks.0.fc.weight"].matrices == "2x(32, 16)"
    with pytest.raises(ValueError, match=r"blocks\.0\.wq\.weight with shape \(16, 16\).*heads:3"):
        muon_param_groups(model, views={"blocks.0.wq.weight": "heads:3"})
    with pytest.raises(ValueError, match="invalid view 'rows:2'"):
        muon_param_groups(model, views={"blocks.0.wq.weight": "rows:2"})


def test_lr_options_set_group_learning_rates():
    groups = muon_param_groups(SmallGPT(), lr=0.05, adamw_lr=1e-3)
    lrs = {g["algorithm"]: g["lr"] for g in groups}
    assert lrs == {"muon": 0.05, "adamw": 1e-3}
    opt = Muon(groups, lr=0.02, adamw_lr=3e-4)  # the group values win over the defaults
    assert {g["algorithm"]: g["lr"] for g in opt.param_groups} == {"muon": 0.05, "adamw": 1e-3}
    assert "lr" not in next(g for g in muon_param_groups(SmallGPT()) if g["algorithm"] == "muon")


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        muon_param_groups([torch.zeros(2, 2)])


# ---------------------------------------------------------------------- a small transformer end to end
def test_every_trainable_parameter_assigned_exactly_once_in_a_transformer():
    torch.manual_seed(0)
    model = EncoderLM()
    model.pos.weight.requires_grad_(False)
    groups = muon_param_groups(model)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assigned = Counter(id(p) for g in groups for p in g["params"])
    assert set(assigned) == set(trainable)
    assert all(c == 1 for c in assigned.values())
    assert [n for n, _ in groups.frozen] == ["pos.weight"]
    assignment, reasons = _assignment(groups), _reasons(groups)
    muon_names = sorted(n for n, a in assignment.items() if a == "muon")
    expected = sorted(f"encoder.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"))
    assert muon_names == expected
    muon = next(g for g in groups if g["algorithm"] == "muon")
    views = dict(zip(muon["param_names"], muon["views"]))
    assert views["encoder.layers.0.self_attn.in_proj_weight"] == "split:32,32,32"
    assert reasons["encoder.layers.1.self_attn.in_proj_weight"] == "fused q/k/v projection (split)"
    assert views["encoder.layers.0.linear1.weight"] == "matrix"
    assert assignment["emb.weight"] == assignment["lm_head.weight"] == "adamw"
    assert assignment["encoder.layers.0.self_attn.in_proj_bias"] == "adamw"
    assert reasons["encoder.layers.0.norm1.weight"] == "normalization weight"
    # the optimizer trains it: one step changes every trainable parameter and no frozen one
    opt = Muon(model)
    idx = torch.randint(0, 50, (2, 8))
    h = model.emb(idx) + model.pos(torch.arange(8))
    logits = model.lm_head(model.norm(model.encoder(h)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1)).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) == (not p.requires_grad), n


# ---------------------------------------------------------------------- the report
def test_report_table_and_data():
    model = SmallGPT(layers=1)
    model.final_norm.bias.requires_grad_(False)
    opt = Muon(model, lr=0.02, adamw_lr=1e-3)
    report = opt.routing_report()
    assert isinstance(report, RoutingReport)
    text = str(report)
    header = text.splitlines()[0].split()
    assert header == ["parameter", "shape", "algorithm", "view", "matrices", "lr", "why"]
    for name, _ in model.named_parameters():
        assert name in text
    fc_line = next(line for line in text.splitlines() if line.startswith("blocks.0.fc.weight "))
    assert fc_line.split()[1:5] == ["64x16", "muon", "matrix", "1x(64,"]
    assert "muon: 4 tensors / 2,560 elements" in text
    assert "adamw: 7 tensors / 1,408 elements" in text
    assert "frozen: 1 tensors / 16 elements" in text
    assert report.counts() == {"muon": (4, 2560), "adamw": (7, 1408), "frozen": (1, 16)}
    data = report.to_dicts()
    assert len(data) == len(list(model.parameters()))
    row = next(d for d in data if d["name"] == "blocks.0.fc.weight")
    assert row == {"name": "blocks.0.fc.weight", "shape": (64, 16), "algorithm": "muon", "view": "matrix",
                   "matrices": "1x(64, 16)", "lr": 0.02, "reason": "hidden Linear weight"}
    emb = next(d for d in data if d["name"] == "emb.weight")
    assert (emb["algorithm"], emb["lr"], emb["reason"]) == ("adamw", 1e-3, "embedding")
    assert repr(report) == f"RoutingReport({len(data)} parameters)"


def test_report_of_plain_tensors_says_by_shape():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning):
        opt = Muon([a, b])
    rows = opt.routing_report().rows
    assert [(r.algorithm, r.reason) for r in rows] == [("muon", "by shape (no module given)"),
                                                         ("adamw", "by shape (no module given)")]
    assert rows[0].name == "group0.param0"


def test_report_formatting_does_not_import_the_lab():
    # layer 3 must not reach up into layer 4: the table formatter lives in muonlab._tables
    import subprocess
    import sys

    code = (
        "import sys; from torch import nn; import muonlab; "
        "print(muonlab.Muon(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))).routing_report()); "
        "assert not [m for m in sys.modules if m.startswith('muonlab.lab')], sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hidden Linear weight" in out.stdout
    from muonlab._tables import format_table
    from muonlab.lab.tables import format_table as lab_format_table

    assert lab_format_table is format_table


# ---------------------------------------------------------------------- routing by what a parameter does
def test_raw_parameters_go_to_adamw_with_the_pattern_that_changes_it():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
            self.mix = nn.Parameter(torch.randn(8, 8))  # multiplied by custom code: unknown to routing
            self.lm_head = nn.Linear(8, 4)

    groups = muon_param_groups(Model())
    assignment, reasons = _assignment(groups), _reasons(groups)
    assert [n for n, a in assignment.items() if a == "muon"] == ["blocks.0.weight", "blocks.1.weight"]
    assert reasons["cls_token"].startswith("class/register token, not multiplied by a known matmul module")
    assert reasons["pos_embed"].startswith("position embedding")
    assert reasons["relative_position_bias_table"].startswith("relative-position bias table")
    assert reasons["mix"] == "2-D tensor, not multiplied by a known matmul module; muon=['mix'] routes it to Muon"
    # ... and that one pattern does route it, with its natural view
    muon = next(g for g in muon_param_groups(Model(), muon=["mix"]) if g["algorithm"] == "muon")
    assert dict(zip(muon["param_names"], muon["views"]))["mix"] == "matrix"


def test_vectors_shaped_1_x_n_depthwise_and_patch_embedding_convs_go_to_adamw():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, kernel_size=4, stride=4)  # first conv, non-overlapping patches
            self.dw = nn.Conv1d(16, 16, 3, groups=16)  # depthwise
            self.grouped = nn.Conv1d(16, 16, 3, groups=4)
            self.down = nn.Conv2d(16, 16, kernel_size=2, stride=2)  # patchify too, but not the input layer
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)  # weight stored (in, out, k, k)
            self.proj = nn.Linear(16, 16)
            self.score = nn.Linear(16, 1)  # a vector
            self.lm_head = nn.Linear(16, 4)

    groups = muon_param_groups(Model())
    assignment, reasons = _assignment(groups), _reasons(groups)
    muon = next(g for g in groups if g["algorithm"] == "muon")
    views = dict(zip(muon["param_names"], muon["views"]))
    assert views == {"grouped.weight": "flatten", "down.weight": "flatten", "up.weight": "T:flatten",
                     "proj.weight": "matrix"}
    assert reasons["patch.weight"].startswith("input layer (patch embedding conv)")
    assert "muon=['patch.weight']" in reasons["patch.weight"]
    assert reasons["dw.weight"].startswith("depthwise conv kernel")
    assert reasons["grouped.weight"] == "grouped conv kernel (4 groups, flattened together)"
    assert reasons["score.weight"] == "Linear weight shaped 1 x 16: a vector, not a matrix (msign would only normalize it)"
    assert assignment["score.weight"] == "adamw"
    # the transposed conv reads as (out * k * k, in): 8 * 2 * 2 = 32 outputs per input channel
    report = {r.name: r for r in Muon(groups).routing_report().rows}
    assert report["up.weight"].matrices == "1x(32, 16)"
    # the patch embedding is also recognized by name, as a Linear
    named = nn.Module()
    named.patch_embed = nn.Linear(48, 16)
    named.body = nn.Linear(16, 16)
    named.head = nn.Linear(16, 2)
    assert _assignment(muon_param_groups(named))["patch_embed.weight"] == "adamw"


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(4, 8, 16))  # (E, in, out): stored transposed
        self.w_in_bias = nn.Parameter(torch.zeros(4, 16))
        self.is_transposed = True  # transformers' @use_experts_implementation attribute


class _MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = _Experts()
        self.shared_expert_gate = nn.Linear(8, 1, bias=False)


def test_moe_router_is_a_judgment_call_that_one_pattern_changes():
    model = nn.Module()
    model.layers = nn.ModuleList(_MoE() for _ in range(2))
    model.lm_head = nn.Linear(8, 3)
    groups = muon_param_groups(model)
    assignment, reasons = _assignment(groups), _reasons(groups)
    assert assignment["layers.0.gate.weight"] == "adamw"
    assert reasons["layers.1.gate.weight"].startswith("MoE router: AdamW (judgment call")
    assert reasons["layers.1.gate.weight"].endswith("muon=['layers.*.gate.weight'] routes it to Muon")
    assert reasons["layers.0.shared_expert_gate.weight"].startswith("gate weight shaped 1 x 8: a vector")
    assert reasons["layers.0.experts.w_in_bias"] == "expert bias stack (E, out)"
    muon = next(g for g in groups if g["algorithm"] == "muon")
    assert dict(zip(muon["param_names"], muon["views"])) == {"layers.0.experts.w_in": "experts:T",
                                                             "layers.1.experts.w_in": "experts:T"}
    assert reasons["layers.0.experts.w_in"] == "expert stack (4 batched matmuls), stored (E, in, out): transposed"
    assignment = _assignment(muon_param_groups(model, muon=["layers.*.gate.weight"]))
    assert assignment["layers.0.gate.weight"] == assignment["layers.1.gate.weight"] == "muon"


def test_recurrent_and_attention_weights_go_to_muon():
    model = nn.Module()
    model.emb = nn.Embedding(10, 8)
    model.rnn = nn.LSTM(8, 8, batch_first=True)
    model.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    model.lm_head = nn.Linear(8, 10)
    groups = muon_param_groups(model)
    reasons = _reasons(groups)
    assert reasons["rnn.weight_ih_l0"] == reasons["rnn.weight_hh_l0"] == "recurrent layer weight"
    assert reasons["attn.q_proj_weight"] == reasons["attn.k_proj_weight"] == "attention projection"
    assert _assignment(groups)["attn.out_proj.weight"] == "muon"


# ---------------------------------------------------------------------- wrappers and pattern hints
class _DDPLike(nn.Module):
    """What DDP, DataParallel and DeepSpeed look like to routing: one child named 'module'."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["compile", "ddp", "both"])
def test_routing_and_patterns_see_through_wrappers(wrap):
    torch.manual_seed(0)
    plain = SmallGPT()
    wrapped: nn.Module = plain
    if wrap in ("ddp", "both"):
        wrapped = _DDPLike(wrapped)
    if wrap in ("compile", "both"):
        wrapped = torch.compile(wrapped)  # compiles lazily: nothing runs until a forward
    prefix = {"compile": "_orig_mod.", "ddp": "module.", "both": "_orig_mod.module."}[wrap]
    kwargs = dict(adamw=["blocks.0.wk.weight"], views={"blocks.*.wq.weight": "heads:4"}, head="lm_head")
    want = muon_param_groups(plain, **kwargs)
    got = muon_param_groups(wrapped, **kwargs)
    assert [g["algorithm"] for g in got] == [g["algorithm"] for g in want]
    for g, w in zip(got, want):
        assert g["param_names"] == [prefix + n for n in w["param_names"]]
        assert g["views"] == w["views"] and g["routing"] == w["routing"]
        assert all(a is b for a, b in zip(g["params"], w["params"]))
    # the full (prefixed) spelling matches too
    assert _assignment(muon_param_groups(wrapped, adamw=[prefix + "blocks.1.wq.weight"]))[prefix + "blocks.1.wq.weight"] == "adamw"


def test_a_child_named_module_in_a_real_model_is_not_a_wrapper():
    model = nn.Module()
    model.module = nn.Linear(4, 4)
    model.other = nn.Linear(4, 4)
    model.lm_head = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        muon_param_groups(model, adamw=["weight"])


def test_a_pattern_that_matches_nothing_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"pattern 'blocks\.0\.attn\.wq\.weight' matches no trainable parameter "
                                         r"of the model; closest names: blocks\.0\.wq\.weight"):
        muon_param_groups(SmallGPT(), adamw=["blocks.0.attn.wq.weight"])
    with pytest.raises(ValueError, match=r"closest names: .*blocks\.1\.fc\.weight"):
        muon_param_groups(SmallGPT(), views={"blocks.*.fc1.weight": "heads:2"})
    with pytest.raises(ValueError, match=r"head pattern 'lm_haed' matches no module or parameter; closest names: lm_head"):
        muon_param_groups(SmallGPT(), head="lm_haed")
    with pytest.raises(ValueError, match=r"add a muon=\[\.\.\.\] pattern"):
        muon_param_groups(SmallGPT(), views={"emb.weight": "heads:2"})


def test_a_model_without_a_head_keeps_its_last_block_linear_on_muon():
    # a base model (a stack of blocks, no head): the last Linear sits inside the repeated layers
    model = nn.Module()
    model.emb = nn.Embedding(10, 16)
    model.blocks = nn.ModuleList(Block() for _ in range(2))
    assignment = _assignment(muon_param_groups(model))
    assert assignment["blocks.1.proj.weight"] == "muon"
    assert not any("output head" in r for r in _reasons(muon_param_groups(model)).values())
