"""Routing of real architectures: tiny random ``transformers`` models built from config objects.

For each architecture every parameter's algorithm and (fan_out, fan_in) orientation is asserted
against the model's own dimensions, and one step with ``ns_method="svd"``, ``lr=1``, no momentum and
no weight decay proves that each Muon matrix moved by exactly ``adjust_lr_scale(fan_out, fan_in)``
times the polar factor of its gradient (so its spectral norm is the scale its shape promises).
Nothing is downloaded.
"""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the architecture tests need transformers: pip install 'muonlab[integrations]'"
)

from muonlab import Muon, adjust_lr_scale, muon_param_groups  # noqa: E402
from muonlab.integrations.hf import build_model  # noqa: E402
from muonlab.views import blocks  # noqa: E402

VERSION = transformers.__version__
BATCH, SEQ, VOCAB = 4, 16, 64


def _model(arch: str, task: str = "auto", **config):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if arch not in CONFIG_MAPPING_NAMES:  # say which version lacks it; never a silent pass
        pytest.skip(f"transformers {VERSION} has no '{arch}' architecture")
    torch.manual_seed(0)
    return build_model(arch, config, task=task).float().train()


def _rows(groups) -> dict[str, tuple[str, str, str]]:
    """name -> (algorithm, view, matrices) from the optimizer's own report."""
    report = Muon(groups).routing_report()
    return {r.name: (r.algorithm, r.view, r.matrices, r.reason) for r in report.rows}


def _check_table(groups, table: list[tuple[str, str, str | None, str | None]]) -> None:
    """Every parameter matches exactly one (pattern, algorithm, matrices, reason prefix) row, and
    every row matches a parameter."""
    rows = _rows(groups)
    used = set()
    for name, (alg, view, matrices, reason) in rows.items():
        hits = [i for i, (pat, *_) in enumerate(table) if fnmatch.fnmatchcase(name, pat)]
        assert len(hits) == 1, f"{name} matches rows {[table[i][0] for i in hits]}"
        pat, want_alg, want_matrices, want_reason = table[hits[0]]
        used.add(hits[0])
        assert alg == want_alg, f"{name}: {alg} ({reason}), expected {want_alg}"
        if want_matrices is not None:
            assert matrices == want_matrices, f"{name}: {matrices} (view {view}), expected {want_matrices}"
        if want_reason is not None:
            assert reason.startswith(want_reason), f"{name}: reason {reason!r}, expected {want_reason!r}..."
    assert used == set(range(len(table))), f"rows matching nothing: {[table[i][0] for i in set(range(len(table))) - used]}"


def _loss(model, arch: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        x = torch.randn(BATCH, 3, 16, 16, generator=g)
        return model(pixel_values=x, labels=torch.tensor([0, 1, 0, 1])).loss
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if arch == "t5":
        return model(input_ids=ids, labels=ids.flip(1)).loss
    return model(input_ids=ids, labels=ids).loss


def _check_step(model, arch: str, groups_fn) -> None:
    """One exact step per adjust_lr_fn: each logical matrix of each Muon parameter moves by
    -scale(fan_out, fan_in) * msign(its gradient)."""
    for fn in ("original", "spectral"):
        m = copy.deepcopy(model)
        groups = groups_fn(m)
        opt = Muon(groups, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, ns_method="svd",
                   adjust_lr_fn=fn, adamw_lr=0.0, normuon=False)
        _loss(m, arch).backward()
        muon = next(g for g in opt.param_groups if g["algorithm"] == "muon")
        before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in zip(muon["param_names"], muon["params"])}
        opt.step()
        for name, p, view in zip(muon["param_names"], muon["params"], muon["views"]):
            p0, grad = before[name]
            assert grad.abs().sum() > 0, f"{name} got no gradient: the step proves nothing"
            delta = (p0 - p.detach()).double()
            for d_blk, g_blk in zip(blocks(delta, view), blocks(grad.double(), view)):
                for d, gm in zip(d_blk.unbind(0), g_blk.unbind(0)):
                    a, b = d.shape
                    scale = adjust_lr_scale(a, b, fn)
                    sigma = torch.linalg.matrix_norm(d, ord=2).item()
                    assert sigma == pytest.approx(scale, rel=1e-4), f"{name} [{view}] ({a}, {b}) {fn}: {sigma} != {scale}"
                    s = torch.linalg.svdvals(gm)
                    # well conditioned (the polar factor of an fp32 gradient is then accurate to ~1e-5):
                    # compare it whole; structurally low-rank gradients (MLA's o_proj) keep the norm check
                    if s[-1] > 1e-2 * s[0]:
                        U, _, Vh = torch.linalg.svd(gm, full_matrices=False)
                        torch.testing.assert_close(d, scale * (U @ Vh), atol=1e-3, rtol=1e-3)


NORMS = [("*norm*.weight", "adamw", None, "normalization weight")]


# ---------------------------------------------------------------------- dense decoders
@pytest.mark.parametrize("tied", [False, True])
def test_llama(tied):
    H, I, KV = 32, 48, 2 * 8
    model = _model("llama", hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, tie_word_embeddings=tied)
    table = [
        ("model.embed_tokens.weight", "adamw", None, "embedding (tied to the output head)" if tied else "embedding"),
        ("*.q_proj.weight", "muon", f"1x({H}, {H})", "hidden Linear weight"),
        ("*.k_proj.weight", "muon", f"1x({KV}, {H})", None),
        ("*.v_proj.weight", "muon", f"1x({KV}, {H})", None),
        ("*.o_proj.weight", "muon", f"1x({H}, {H})", None),
        ("*.gate_proj.weight", "muon", f"1x({I}, {H})", None),
        ("*.up_proj.weight", "muon", f"1x({I}, {H})", None),
        ("*.down_proj.weight", "muon", f"1x({H}, {I})", None),
        *NORMS,
    ]
    if not tied:
        table.append(("lm_head.weight", "adamw", None, "output head (named 'lm_head')"))
    groups = muon_param_groups(model)
    _check_table(groups, table)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _check_step(model, "llama", muon_param_groups)


def test_gpt2_conv1d_is_transposed():
    H = 32
    model = _model("gpt2", n_embd=H, n_layer=2, n_head=4, n_positions=SEQ, vocab_size=VOCAB)
    table = [
        ("transformer.wte.weight", "adamw", None, "embedding (tied to the output head)"),
        ("transformer.wpe.weight", "adamw", None, "position embedding"),
        ("*.attn.c_attn.weight", "muon", f"1x({H}, {H}) + 1x({H}, {H}) + 1x({H}, {H})",
         "Conv1D fused q/k/v, stored (in, out): transposed, split"),
        ("*.attn.c_proj.weight", "muon", f"1x({H}, {H})", "Conv1D weight, stored (in, out): transposed"),
        ("*.mlp.c_fc.weight", "muon", f"1x({4 * H}, {H})", "Conv1D weight"),
        ("*.mlp.c_proj.weight", "muon", f"1x({H}, {4 * H})", "Conv1D weight"),
        ("*.bias", "adamw", None, None),
        ("*.ln_*.weight", "adamw", None, "normalization weight"),
    ]
    groups = muon_param_groups(model)
    _check_table(groups, table)
    views = dict(zip(groups[0]["param_names"], groups[0]["views"]))
    assert views["transformer.h.0.mlp.c_fc.weight"] == "T"
    assert views["transformer.h.0.attn.c_attn.weight"] == f"T:split:{H},{H},{H}"
    _check_step(model, "gpt2", muon_param_groups)
    # the numbers: c_fc (stored 32x128, really 128 outputs of 32 inputs) steps 2.0, c_proj 1.0
    m = copy.deepcopy(model)
    opt = Muon(m, lr=1.0, momentum=0.0, nesterov=False, ns_method="svd", adamw_lr=0.0, normuon=False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _loss(m, "gpt2").backward()
    opt.step()
    step = {n: torch.linalg.matrix_norm(before[n] - p.detach(), ord=2).item() for n, p in m.named_parameters()
            if n.endswith("mlp.c_fc.weight") or n.endswith("mlp.c_proj.weight")}
    assert step["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(2.0, rel=1e-4)
    assert step["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------------- encoders, encoder-decoders, vision
def test_bert():
    H, I = 32, 64
    model = _model("bert", hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=VOCAB, max_position_embeddings=SEQ)
    assert type(model).__name__ == "BertForMaskedLM"
    table = [
        ("bert.embeddings.word_embeddings.weight", "adamw", None, "embedding (tied to the output head)"),
        ("bert.embeddings.position_embeddings.weight", "adamw", None, "position embedding"),
        ("bert.embeddings.token_type_embeddings.weight", "adamw", None, "embedding"),
        ("*.attention.self.*.weight", "muon", f"1x({H}, {H})", "hidden Linear weight"),
        ("*.attention.output.dense.weight", "muon", f"1x({H}, {H})", None),
        ("*.intermediate.dense.weight", "muon", f"1x({I}, {H})", None),
        ("bert.encoder.layer.[0-9].output.dense.weight", "muon", f"1x({H}, {I})", None),
        ("cls.predictions.transform.dense.weight", "muon", f"1x({H}, {H})", None),
        ("cls.predictions.bias", "adamw", None, "output head (tied to an embedding) bias"),
        ("*LayerNorm.*", "adamw", None, "normalization weight"),
        ("*dense.bias", "adamw", None, "bias"),
        ("*.attention.self.*.bias", "adamw", None, "bias"),
    ]
    _check_table(muon_param_groups(model), table)
    _check_step(model, "bert", muon_param_groups)


def test_t5():
    D, F = 32, 64
    model = _model("t5", d_model=D, d_ff=F, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                   vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0)
    table = [
        ("shared.weight", "adamw", None, "embedding (tied to the output head)"),
        ("*.relative_attention_bias.weight", "adamw", None, "relative-position bias table (embedding)"),
        ("*Attention.[qkvo].weight", "muon", f"1x({D}, {D})", "hidden Linear weight"),
        ("*.DenseReluDense.wi.weight", "muon", f"1x({F}, {D})", None),
        ("*.DenseReluDense.wo.weight", "muon", f"1x({D}, {F})", None),
        ("*layer_norm.weight", "adamw", None, "normalization weight"),
    ]
    _check_table(muon_param_groups(model), table)
    _check_step(model, "t5", muon_param_groups)


def test_vit_patch_embedding_and_tokens_go_to_adamw():
    H, I = 32, 64
    model = _model("vit", hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                   image_size=16, patch_size=4, num_labels=2)
    table = [
        ("vit.embeddings.cls_token", "adamw", None, "class/register token"),
        ("vit.embeddings.position_embeddings", "adamw", None, "position embedding"),
        ("vit.embeddings.patch_embeddings.projection.weight", "adamw", None, "input layer (patch embedding conv)"),
        ("vit.embeddings.patch_embeddings.projection.bias", "adamw", None, "bias"),
        ("*.attention.*_proj.weight", "muon", f"1x({H}, {H})", "hidden Linear weight"),
        ("*.mlp.fc1.weight", "muon", f"1x({I}, {H})", None),
        ("*.mlp.fc2.weight", "muon", f"1x({H}, {I})", None),
        ("vit.layers.*_proj.bias", "adamw", None, "bias"),
        ("vit.layers.*.fc?.bias", "adamw", None, "bias"),
        ("*layernorm*", "adamw", None, "normalization weight"),
        ("classifier.*", "adamw", None, "output head (named 'classifier')"),
    ]
    _check_table(muon_param_groups(model), table)
    _check_step(model, "vit", muon_param_groups)


# ---------------------------------------------------------------------- mixtures of experts
def _moe_table(H: int, moe_I: int, E: int) -> list:
    return [
        ("model.embed_tokens.weight", "adamw", None, "embedding"),
        ("lm_head.weight", "adamw", None, "output head"),
        ("*.self_attn.q_proj.weight", "muon", f"1x({H}, {H})", None),
        ("*.self_attn.[kv]_proj.weight", "muon", f"1x(16, {H})", None),
        ("*.self_attn.o_proj.weight", "muon", f"1x({H}, {H})", None),
        # a fused [gate; up] expert stack (E, 2I, H) splits into E gate and E up matrices (I, H)
        ("*.mlp.experts.gate_up_proj", "muon", f"{2 * E}x({moe_I}, {H})", "expert stack (4 batched matmuls), fused gate/up: split"),
        ("*.mlp.experts.down_proj", "muon", f"{E}x({H}, {moe_I})", "expert stack (4 batched matmuls)"),
        ("*.mlp.gate.weight", "adamw", None, "MoE router: AdamW (judgment call"),
        *NORMS,
    ]


MOE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
           num_experts_per_tok=4)  # every token to every expert: each expert gets a gradient


def test_mixtral():
    model = _model("mixtral", intermediate_size=48, num_local_experts=4, head_dim=8, **MOE)
    groups = muon_param_groups(model)
    _check_table(groups, _moe_table(32, 48, 4))
    reason = _rows(groups)["model.layers.0.mlp.gate.weight"][3]
    assert reason.endswith("muon=['model.layers.*.mlp.gate.weight'] routes it to Muon")
    # one pattern changes the judgment call
    assert _rows(muon_param_groups(model, muon=["model.layers.*.mlp.gate.weight"]))["model.layers.1.mlp.gate.weight"][0] == "muon"
    _check_step(model, "mixtral", muon_param_groups)


def test_qwen2_moe():
    model = _model("qwen2_moe", intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                   num_experts=4, **MOE)
    table = _moe_table(32, 24, 4) + [
        ("*.self_attn.[qkv]_proj.bias", "adamw", None, "bias"),
        ("*.mlp.shared_expert.gate_proj.weight", "muon", "1x(40, 32)", "hidden Linear weight"),
        ("*.mlp.shared_expert.up_proj.weight", "muon", "1x(40, 32)", None),
        ("*.mlp.shared_expert.down_proj.weight", "muon", "1x(32, 40)", None),
        ("*.mlp.shared_expert_gate.weight", "adamw", None, "gate weight shaped 1 x 32: a vector"),
    ]
    _check_table(muon_param_groups(model), table)
    _check_step(model, "qwen2_moe", muon_param_groups)


def test_qwen3_moe():
    model = _model("qwen3_moe", intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8, **MOE)
    _check_table(muon_param_groups(model), _moe_table(32, 24, 4))
    _check_step(model, "qwen3_moe", muon_param_groups)


DEEPSEEK_SPLIT = {"*.self_attn.q_b_proj.weight": "heads:4", "*.self_attn.kv_b_proj.weight": "heads:4"}


@pytest.mark.parametrize("per_head", [False, True])
def test_deepseek_v3_mla_and_moe(per_head):
    """MLA (low-rank q and kv projections) + MoE. With ``views=DEEPSEEK_SPLIT`` (Muon Split) q_b_proj
    and kv_b_proj are orthogonalized per attention head: q_b_proj (H*(nope+rope), q_lora) as H blocks
    (nope+rope, q_lora), kv_b_proj (H*(nope+v), kv_lora) as H blocks (nope+v, kv_lora)."""
    H, heads, nope, rope, v, q_lora, kv_lora = 32, 4, 8, 4, 8, 16, 12
    model = _model("deepseek_v3", hidden_size=H, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                   first_k_dense_replace=1, num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                   n_routed_experts=4, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
                   q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                   v_head_dim=v)
    views = DEEPSEEK_SPLIT if per_head else None
    q_b = f"{heads}x({nope + rope}, {q_lora})" if per_head else f"1x({heads * (nope + rope)}, {q_lora})"
    kv_b = f"{heads}x({nope + v}, {kv_lora})" if per_head else f"1x({heads * (nope + v)}, {kv_lora})"
    table = [
        ("model.embed_tokens.weight", "adamw", None, "embedding"),
        ("lm_head.weight", "adamw", None, "output head"),
        ("*.self_attn.q_a_proj.weight", "muon", f"1x({q_lora}, {H})", None),
        ("*.self_attn.q_b_proj.weight", "muon", q_b, None),
        ("*.self_attn.kv_a_proj_with_mqa.weight", "muon", f"1x({kv_lora + rope}, {H})", None),
        ("*.self_attn.kv_b_proj.weight", "muon", kv_b, "hidden Linear weight (user view)" if per_head else None),
        ("*.self_attn.o_proj.weight", "muon", f"1x({H}, {heads * v})", None),
        ("model.layers.0.mlp.*_proj.weight", "muon", None, "hidden Linear weight"),  # the dense first layer
        ("*.mlp.experts.gate_up_proj", "muon", "8x(24, 32)", "expert stack (4 batched matmuls), fused gate/up: split"),
        ("*.mlp.experts.down_proj", "muon", "4x(32, 24)", None),
        ("*.mlp.shared_experts.*_proj.weight", "muon", None, "hidden Linear weight"),
        ("*.mlp.gate.weight", "adamw", None, "MoE router"),
        *NORMS,
    ]
    groups = muon_param_groups(model, views=views)
    _check_table(groups, table)
    _check_step(model, "deepseek_v3", lambda m: muon_param_groups(m, views=views))


# ---------------------------------------------------------------------- state-space models
def test_mamba_ssm_parameters_go_to_adamw():
    H, inner, state, dt_rank = 32, 64, 8, 2
    model = _model("mamba", hidden_size=H, intermediate_size=inner, state_size=state, num_hidden_layers=2, vocab_size=VOCAB, expand=2,
                   conv_kernel=4, time_step_rank=dt_rank)
    table = [
        ("backbone.embeddings.weight", "adamw", None, "embedding (tied to the output head)"),
        ("*.mixer.in_proj.weight", "muon", f"1x({2 * inner}, {H})", "hidden Linear weight"),
        ("*.mixer.x_proj.weight", "muon", f"1x({dt_rank + 2 * state}, {inner})", None),
        ("*.mixer.out_proj.weight", "muon", f"1x({H}, {inner})", None),
        ("*.mixer.dt_proj.weight", "adamw", None, "SSM Δ (dt) projection: AdamW (judgment call"),
        ("*.mixer.A_log", "adamw", None, "SSM parameter, not multiplied by a known matmul module"),
        ("*.mixer.D", "adamw", None, "1-D tensor"),
        ("*.mixer.conv1d.weight", "adamw", None, "depthwise conv kernel"),
        ("*.bias", "adamw", None, "bias"),
        ("*norm*.weight", "adamw", None, "normalization weight"),
    ]
    _check_table(muon_param_groups(model), table)
    _check_step(model, "mamba", muon_param_groups)


# ---------------------------------------------------------------------- the route command
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_route_command_prints_the_report(arch, capsys):
    from muonlab.cli import main

    assert main(["route", "--arch", arch]) == 0
    out = capsys.readouterr().out
    assert f"({arch}, transformers {VERSION})" in out and "shapes only" in out
    assert "muon:" in out.splitlines()[-1] and "adamw:" in out.splitlines()[-1]


def test_route_command_options_and_config(tmp_path, capsys):
    from muonlab.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "deepseek_v3", "num_attention_heads": 8, "num_hidden_layers": 2}')
    assert main(["route", "--config", str(cfg), "--view", "*.q_b_proj.weight=heads:8",
                 "--muon", "*.mlp.gate.weight"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("model.layers.1.self_attn.q_b_proj.weight"))
    assert " heads:8 " in line and "8x(" in line
    gate = next(x for x in out.splitlines() if x.startswith("model.layers.1.mlp.gate.weight"))
    assert "user override (muon pattern)" in gate
    assert main(["route", "--arch", "qwen3moe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("muonlab route: error: unknown architecture 'qwen3moe'") and "qwen3_moe" in err
    assert "\n" not in err


def test_route_command_without_transformers_says_how_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "from muonlab.cli import main\nsys.exit(main(['route', '--arch', 'llama']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("muonlab route: error: the route command builds models with transformers, which is "
                                  "not installed: pip install 'muonlab[integrations]'")
