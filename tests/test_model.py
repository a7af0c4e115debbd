"""Tests for muonlab.lab.model: the loss layout, causality, GQA, RoPE, tying, MoE, configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muonlab.lab.model import (
    GPT,
    MODEL_SIZES,
    GPTConfig,
    apply_rope,
    default_d_ff,
    precompute_rope,
)


def tiny(**overrides) -> GPTConfig:
    """A config even smaller than "tiny", for the structural tests."""
    base = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=32)
    return GPTConfig(**{**base, **overrides})


def batch(cfg: GPTConfig, B: int = 3, T: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# --- the loss -------------------------------------------------------------------------------


def test_loss_in_bvl_layout_equals_flattened_form():
    # seed 000: cross_entropy wants (B, V, L) logits against (B, L) targets.
    torch.manual_seed(0)
    B, L, V = 4, 7, 256
    logits = torch.randn(B, L, V)
    y = torch.randint(0, V, (B, L))
    bvl = F.cross_entropy(logits.transpose(1, 2), y)
    flat = F.cross_entropy(logits.reshape(B * L, V), y.reshape(B * L))
    manual = -(logits.log_softmax(-1).gather(-1, y.unsqueeze(-1))).mean()
    torch.testing.assert_close(bvl, flat)
    torch.testing.assert_close(bvl, manual)


def test_model_loss_is_next_token_cross_entropy():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = batch(cfg)
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, cfg.vocab_size)
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
    torch.testing.assert_close(loss, expected)
    _, none = model(x)
    assert none is None


@pytest.mark.parametrize("tie", [True, False])
def test_initial_loss_is_about_ln_vocab(tie):
    cfg = GPTConfig.from_name("tiny", tie_embeddings=tie)
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = batch(cfg, B=4, T=64)
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(256)) < 0.15, loss.item()


def test_adam_steps_on_repeated_batch_reduce_loss():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = batch(cfg, B=4, T=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


# --- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [0, 4])
def test_causality(moe):
    cfg = tiny(moe_experts=moe)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x, _ = batch(cfg, B=2, T=20)
    t = 11
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-4  # the change is seen from t on


def reference_attention(attn, x, cos, sin):
    """The attention block written out with explicit repeat_interleave, mask and softmax."""
    B, T, C = x.shape
    H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = apply_rope(attn.wq(x).view(B, T, H, D), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, T, K, D), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, T, K, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.wo(y)


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 1), (4, 2), (4, 4), (8, 2)])
def test_grouped_query_attention_shapes_and_reference(n_head, n_kv_head):
    cfg = tiny(n_head=n_head, n_kv_head=n_kv_head)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    attn = model.blocks[0].attn
    D = cfg.d_model // n_head
    assert attn.wq.weight.shape == (n_head * D, cfg.d_model)
    assert attn.wk.weight.shape == (n_kv_head * D, cfg.d_model)
    assert attn.wv.weight.shape == (n_kv_head * D, cfg.d_model)
    assert attn.wo.weight.shape == (cfg.d_model, n_head * D)
    x = torch.randn(2, 10, cfg.d_model)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    with torch.no_grad():
        out = attn(x, cos, sin)
        ref = reference_attention(attn, x, cos, sin)
    assert out.shape == (2, 10, cfg.d_model)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms_and_depends_on_relative_position():
    D, T = 16, 64
    cos, sin = precompute_rope(D, T, theta=10000.0)
    assert cos.shape == sin.shape == (T, D // 2)
    torch.manual_seed(0)
    x = torch.randn(2, T, 3, D)
    rx = apply_rope(x, cos, sin)
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rx[:, 0], x[:, 0])  # position 0 is not rotated

    # <rope(q, m), rope(k, n)> depends only on m - n.
    q, k = torch.randn(D), torch.randn(D)

    def score(m: int, n: int) -> torch.Tensor:
        qs = q.expand(1, T, 1, D)
        ks = k.expand(1, T, 1, D)
        return (apply_rope(qs, cos, sin)[0, m, 0] * apply_rope(ks, cos, sin)[0, n, 0]).sum()

    for m, n, shift in [(5, 2, 10), (20, 20, 7), (3, 9, 40)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim=5"):
        precompute_rope(5, 8)


# --- embeddings and init --------------------------------------------------------------------


def test_tied_head_shares_storage_untied_does_not():
    tied = GPT(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    V, C = 256, 32
    assert untied.num_parameters() - tied.num_parameters() == V * C
    assert tied.num_parameters(non_embedding=True) == untied.num_parameters(non_embedding=True)


def test_module_names_and_types_for_routing():
    model = GPT(tiny())
    modules = dict(model.named_modules())
    assert isinstance(modules["tok_emb"], nn.Embedding)
    assert isinstance(modules["lm_head"], nn.Linear)
    for name in ["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3"]:
        assert isinstance(modules[f"blocks.1.{name}"], nn.Linear), name
    one_d = [n for n, p in model.named_parameters() if p.ndim == 1]
    assert one_d and all("norm" in n for n in one_d)
    assert not any("bias" in n for n, _ in model.named_parameters())
    assert "rope_cos" not in model.state_dict()  # derived buffers stay out of checkpoints


def test_init_is_deterministic_and_output_projections_are_scaled():
    cfg = tiny(n_layer=4, d_model=64)
    torch.manual_seed(123)
    a = GPT(cfg)
    torch.manual_seed(123)
    b = GPT(cfg)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layer)
    w1 = torch.cat([blk.mlp.w1.weight.flatten() for blk in a.blocks])
    wo = torch.cat([blk.attn.wo.weight.flatten() for blk in a.blocks])
    assert abs(w1.std().item() - std) < 0.1 * std
    assert abs(wo.std().item() - out_std) < 0.1 * out_std
    assert all(torch.equal(blk.attn_norm.weight, torch.ones(cfg.d_model)) for blk in a.blocks)


# --- mixture of experts ---------------------------------------------------------------------


def test_moe_aux_loss_and_gradients_reach_every_expert():
    E, k = 4, 2
    cfg = tiny(moe_experts=E, moe_top_k=k, moe_aux_coef=0.01)
    torch.manual_seed(0)
    model = GPT(cfg)
    experts = model.blocks[0].mlp.experts
    assert experts.w1.shape == (E, cfg.d_ff, cfg.d_model)
    assert experts.w3.shape == (E, cfg.d_ff, cfg.d_model)
    assert experts.w2.shape == (E, cfg.d_model, cfg.d_ff)
    assert isinstance(model.blocks[0].mlp.router, nn.Linear)

    x, y = batch(cfg, B=4, T=32)
    model.train()
    logits, loss = model(x, y)
    aux = model.last_aux_loss
    assert 0 < aux.item() < 2  # E * sum_e f_e P_e is 1 for uniform routing; the init router is near uniform
    loss.backward()
    expert_params = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert len(expert_params) == 3 * cfg.n_layer
    for name, p in expert_params.items():
        assert p.ndim == 3 and p.shape[0] == E, name
        assert p.grad is not None, name
        per_expert = p.grad.flatten(1).abs().sum(dim=1)  # (E,)
        assert (per_expert > 0).all(), f"{name}: an expert got no gradient {per_expert}"
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0

    # The aux loss is part of the training loss only; eval mode gives the plain cross-entropy.
    model.eval()
    with torch.no_grad():
        _, eval_loss = model(x, y)
    torch.testing.assert_close(loss.detach() - eval_loss, cfg.moe_aux_coef * aux, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(eval_loss, F.cross_entropy(logits.detach().transpose(1, 2), y))


def test_moe_mixes_top_k_experts_like_a_loop_over_tokens():
    cfg = tiny(moe_experts=3, moe_top_k=2, n_layer=1)
    torch.manual_seed(0)
    moe = GPT(cfg).blocks[0].mlp
    x = torch.randn(2, 5, cfg.d_model)
    with torch.no_grad():
        out, _ = moe(x)
        probs = moe.router(x).softmax(-1)
        ref = torch.zeros_like(x)
        for b in range(2):
            for t in range(5):
                p, i = probs[b, t].topk(2)
                p = p / p.sum()
                for w, e in zip(p, i):
                    ref[b, t] += w * moe.experts(x[b, t : t + 1], int(e))[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(d_model=30, n_head=4), "d_model=30"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head=3"),
        (dict(d_model=12, n_head=4, n_kv_head=4), "head dim"),
        (dict(n_layer=0), "n_layer=0"),
        (dict(vocab_size=-1), "vocab_size=-1"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(moe_experts=2, moe_top_k=3), "moe_top_k=3"),
        (dict(moe_experts=-1), "moe_experts=-1"),
        (dict(d_ff=0), "d_ff=0"),
        (dict(norm_eps=0.0), "norm_eps=0.0"),
    ],
)
def test_invalid_configs_raise_value_error_naming_the_value(overrides, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        tiny(**overrides)


def test_unknown_size_and_field_names():
    with pytest.raises(ValueError) as info:
        GPTConfig.from_name("huge")
    for name in MODEL_SIZES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_name("tiny", n_layers=3)


def test_from_name_overrides_and_d_ff_rule():
    cfg = GPTConfig.from_name("small", moe_experts=4, seq_len=64)
    assert cfg.moe_experts == 4 and cfg.seq_len == 64 and cfg.d_model == MODEL_SIZES["small"]["d_model"]
    assert cfg.d_ff == default_d_ff(cfg.d_model, cfg.multiple_of)
    assert cfg.d_ff % cfg.multiple_of == 0 and cfg.d_ff >= 8 * cfg.d_model / 3
    assert GPTConfig.from_name("tiny", d_ff=100).d_ff == 100


@pytest.mark.parametrize(
    "name,lo,hi",
    [("micro", 0.05e6, 0.15e6), ("tiny", 0.2e6, 0.4e6), ("mini", 0.45e6, 0.8e6), ("small", 1e6, 3e6), ("medium", 8e6, 12e6), ("gpt2-small", 110e6, 135e6)],
)
def test_named_size_parameter_counts(name, lo, hi):
    cfg = GPTConfig.from_name(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(cfg)
    assert lo <= model.num_parameters() <= hi, model.num_parameters()


def test_gpt2_small_shapes():
    cfg = GPTConfig.from_name("gpt2-small")
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.seq_len, cfg.vocab_size) == (768, 12, 12, 1024, 50304)


# --- forward errors and generation ----------------------------------------------------------


def test_forward_rejects_too_long_sequences():
    cfg = tiny(seq_len=8)
    model = GPT(cfg)
    with pytest.raises(ValueError, match="seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_generate_shapes_greedy_and_context_crop():
    cfg = tiny(seq_len=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=10, temperature=0.0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(s1, s2)
    assert model.training  # generate restores the mode
