"""QK-Clip (muonlab.qkclip): the rule against hand-computed cases, GQA / fused / MLA / bias / transposed
row maps, the lab model's logit tracking, bit-identical training when nothing is clipped, the bound
after clipping, Hugging Face Llama hooks, and DTensor shards + the cross-rank max (2 gloo ranks).

Run as a script (``python tests/test_qkclip.py worker RANK WORLD PORT``) it is the distributed worker.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from _ranks import free_port, run_ranks  # tests/_ranks.py

from muonlab import Muon, QKClip, QKSpec, qk_clip_factors
from muonlab.qkclip import HeadRows, grouped_max_logits, hf_qk_specs, hf_track_max_logits
import muonlab.qkclip as qkclip_module

from muonlab.lab.model import GPT, GPTConfig, apply_rope

REL = 1e-5


# ---------------------------------------------------------------------- an independent reference
def logits_by_loop(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """Per-head max of q.k*scale, head by head and position by position (the reference for
    grouped_max_logits). q (B, H, T, D), k (B, K, S, D); query head h reads key head h // (H/K)."""
    B, H, T, _ = q.shape
    K, S = k.shape[1], k.shape[2]
    out = torch.full((H,), -math.inf, dtype=torch.float64)
    for h in range(H):
        kh = h // (H // K)
        for b in range(B):
            for t in range(T):
                for s in range(S):
                    if causal and s > t:
                        continue
                    out[h] = max(out[h], float((q[b, h, t].double() * k[b, kh, s].double()).sum()) * scale)
    return out


def heads_logits(wq, wk, x, H, K, bq=None, bk=None):
    """Per-head max logits of a plain causal attention without RoPE: x (B, T, C)."""
    B, T, _ = x.shape
    q = F.linear(x, wq, bq).view(B, T, H, -1).transpose(1, 2)
    k = F.linear(x, wk, bk).view(B, T, K, -1).transpose(1, 2)
    return grouped_max_logits(q, k, 1.0 / math.sqrt(q.shape[-1])).double()


# ---------------------------------------------------------------------- hand-computed
def test_hand_computed_two_heads():
    # two heads of width 1 over C = 2; tokens x0 = (1, 0), x1 = (1, 1), causal, scale 1/sqrt(1)
    wq = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    wk = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # head 0: q = (2, 2), k = (3, 3): every attended logit is 6. head 1: q = (0, 1), k = (0, 1):
    # logits (0,0) = 0, (1,0) = 0, (1,1) = 1 -> max 1
    before = heads_logits(wq, wk, x, 2, 2)
    assert before.tolist() == [6.0, 1.0]
    q = F.linear(x, wq).view(1, 2, 2, 1).transpose(1, 2)
    k = F.linear(x, wk).view(1, 2, 2, 1).transpose(1, 2)
    assert logits_by_loop(q, k, 1.0).tolist() == [6.0, 1.0]

    stats = QKClip([QKSpec.separate("attn", wq, wk, n_heads=2)], tau=1.5).apply({"attn": before})
    # gamma_0 = 1.5 / 6 = 0.25: both head-0 rows take sqrt(0.25) = 0.5; head 1 is under tau
    assert wq.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert wk.tolist() == [[1.5, 0.0], [0.0, 1.0]]
    assert heads_logits(wq, wk, x, 2, 2).tolist() == [1.5, 1.0]
    assert (stats.clipped_heads, stats.total_heads, stats.max_logit, stats.min_gamma) == (1, 2, 6.0, 0.25)
    assert stats.as_metrics() == {"max_attn_logit": 6.0, "qk_clipped_heads": 1, "qk_min_gamma": 0.25}


def test_bias_takes_the_head_factor():
    wq, wk = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    bq, bk = torch.tensor([1.0]), torch.tensor([2.0])
    x = torch.tensor([[[1.0, 0.0]]])  # one token: q = 1 + 1 = 2, k = 2 + 2 = 4, logit 8
    assert heads_logits(wq, wk, x, 1, 1, bq, bk).tolist() == [8.0]
    QKClip([QKSpec.separate("a", wq, wk, 1, q_bias=bq, k_bias=bk)], tau=2.0).apply([torch.tensor([8.0])])
    # gamma = 2 / 8: every q and k entry of the head, bias included, takes sqrt(1/4) = 1/2
    assert (wq[0, 0].item(), bq.item(), wk[0, 0].item(), bk.item()) == (0.5, 0.5, 1.0, 1.0)
    assert heads_logits(wq, wk, x, 1, 1, bq, bk).tolist() == [2.0]


# ---------------------------------------------------------------------- the GQA rule
@pytest.mark.parametrize("logits,gamma,q_scale,k_scale", [
    # group 0: head 0 clipped, head 1 under tau -> key untouched, query 0 takes all of gamma;
    # group 1: both at gamma 0.5 -> the paper's sqrt split
    ([8.0, 1.0, 4.0, 4.0], [0.25, 1.0, 0.5, 0.5], [0.25, 1.0, math.sqrt(0.5), math.sqrt(0.5)], [1.0, math.sqrt(0.5)]),
    # all clipped, unequal: key takes sqrt(min gamma) = 0.4 >= max gamma 0.36; queries the rest
    ([2 / 0.16, 2 / 0.36], [0.16, 0.36], [0.4, 0.9], [0.4]),
    # all clipped, sqrt(min) = 0.3 < max gamma 0.5: the key takes 0.5 so no query grows
    ([2 / 0.09, 4.0], [0.09, 0.5], [0.18, 1.0], [0.5]),
])
def test_gqa_factors_hand_cases(logits, gamma, q_scale, k_scale):
    n_kv = len(k_scale)
    g, q, k = qk_clip_factors(logits, 2.0, n_kv)
    for got, want in ((g, gamma), (q, q_scale), (k, k_scale)):
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("H,K", [(1, 1), (4, 4), (4, 2), (6, 1), (8, 2)])
def test_gqa_factors_properties(H, K):
    gen = torch.Generator().manual_seed(H * 10 + K)
    for _ in range(50):
        logits = (torch.rand(H, generator=gen, dtype=torch.float64) * 8 - 1).tolist()
        tau = 2.0
        gamma, q, k = qk_clip_factors(logits, tau, K)
        G = H // K
        for h in range(H):
            assert q[h] * k[h // G] == pytest.approx(gamma[h], rel=1e-14)  # each head gets exactly its gamma
            assert 0 < q[h] <= 1 and 0 < k[h // G] <= 1  # no weight grows
            assert gamma[h] == (tau / logits[h] if logits[h] > tau else 1.0)
        for g in range(K):
            grp = gamma[g * G:(g + 1) * G]
            if max(grp) == 1.0:
                assert k[g] == 1.0  # a group with a head under tau keeps its key
            if G == 1:
                assert k[g] == pytest.approx(math.sqrt(gamma[g]), rel=1e-15) and q[g] == k[g] or gamma[g] == 1.0


def test_gqa_weights_logits_exact_and_untouched_heads_bit_identical():
    torch.manual_seed(0)
    H, K, D, C = 6, 2, 4, 16
    wq, wk = torch.randn(H * D, C), torch.randn(K * D, C)
    x = torch.randn(3, 5, C)
    before = heads_logits(wq, wk, x, H, K)
    tau = float(before.sort().values[2])  # some heads clipped, some not; a group with both kinds
    wq0, wk0 = wq.clone(), wk.clone()
    stats = QKClip([QKSpec.separate("l", wq, wk, H, K)], tau).apply({"l": before.float()})
    after = heads_logits(wq, wk, x, H, K)
    gamma, q_scale, k_scale = qk_clip_factors(before.float().double().tolist(), tau, K)
    assert stats.clipped_heads == sum(g < 1 for g in gamma) > 0
    for h in range(H):
        if gamma[h] < 1:
            assert after[h] == pytest.approx(tau, rel=REL)
        else:
            assert after[h] == before[h]  # bit-identical logits
        assert after[h] <= tau * (1 + REL) or gamma[h] == 1
        rows = slice(h * D, (h + 1) * D)
        if q_scale[h] == 1:
            assert torch.equal(wq[rows], wq0[rows])
        else:
            torch.testing.assert_close(wq[rows], wq0[rows] * q_scale[h])
    for g in range(K):
        rows = slice(g * D, (g + 1) * D)
        if k_scale[g] == 1:
            assert torch.equal(wk[rows], wk0[rows])


# ---------------------------------------------------------------------- fused / transposed / MLA
def _grouped(t_q, t_k, t_v, H, K, D):
    G = H // K
    parts = []
    for g in range(K):
        parts += [t_q[g * G * D:(g + 1) * G * D], t_k[g * D:(g + 1) * D], t_v[g * D:(g + 1) * D]]
    return torch.cat(parts)


def _ungroup(t, H, K, D):
    G = H // K
    block = (G + 2) * D
    q = torch.cat([t[g * block:g * block + G * D] for g in range(K)])
    k = torch.cat([t[g * block + G * D:g * block + (G + 1) * D] for g in range(K)])
    v = torch.cat([t[g * block + (G + 1) * D:(g + 1) * block] for g in range(K)])
    return q, k, v


@pytest.mark.parametrize("H,K", [(4, 2), (4, 4), (3, 1)])
def test_fused_layouts_and_transposed_match_separate(H, K):
    torch.manual_seed(1)
    D, C = 3, 8
    wq, wk, wv = torch.randn(H * D, C), torch.randn(K * D, C), torch.randn(K * D, C)
    bq, bk, bv = torch.randn(H * D), torch.randn(K * D), torch.randn(K * D)
    logits = torch.tensor([1.0 + 3 * h for h in range(H)])
    tau = 4.0

    sep = [t.clone() for t in (wq, wk, bq, bk)]
    QKClip([QKSpec.separate("a", sep[0], sep[1], H, K, q_bias=sep[2], k_bias=sep[3])], tau).apply([logits])

    stacked, sbias = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
    QKClip([QKSpec.fused("a", stacked, H, K, bias=sbias)], tau).apply([logits])
    torch.testing.assert_close(stacked, torch.cat([sep[0], sep[1], wv]), rtol=0, atol=0)
    torch.testing.assert_close(sbias, torch.cat([sep[2], sep[3], bv]), rtol=0, atol=0)

    grouped, gbias = _grouped(wq, wk, wv, H, K, D), _grouped(bq, bk, bv, H, K, D)
    QKClip([QKSpec.fused("a", grouped, H, K, D, bias=gbias, layout="grouped")], tau).apply([logits])
    for got, want in zip(_ungroup(grouped, H, K, D) + _ungroup(gbias, H, K, D), (sep[0], sep[1], wv, sep[2], sep[3], bv)):
        assert torch.equal(got, want)

    # transposed storage (in, out), e.g. GPT-2's Conv1D: scale columns
    tq, tk = wq.T.contiguous(), wk.T.contiguous()
    QKClip([QKSpec.separate("a", tq, tk, H, K, transposed=True)], tau).apply([logits])
    assert torch.equal(tq.T, sep[0]) and torch.equal(tk.T, sep[1])
    tf = torch.cat([wq, wk, wv]).T.contiguous()
    QKClip([QKSpec.fused("a", tf, H, K, transposed=True)], tau).apply([logits])
    assert torch.equal(tf.T, torch.cat([sep[0], sep[1], wv]))


def test_mla_scales_nope_by_sqrt_rope_by_gamma_and_leaves_shared_key():
    torch.manual_seed(2)
    H, dn, dr, dv, C, R = 3, 4, 2, 5, 10, 6
    wq = torch.randn(H * (dn + dr), C)  # per head [q_nope, q_rope]
    wkv = torch.randn(H * (dn + dv), R)  # per head [k_nope, v] from the latent
    wkr = torch.randn(dr, C)  # the shared rotary key
    wlat = torch.randn(R, C)
    x = torch.randn(2, 5, C)
    scale = 1 / math.sqrt(dn + dr)

    def logits() -> torch.Tensor:
        B, T, _ = x.shape
        q = (x @ wq.T).view(B, T, H, dn + dr).transpose(1, 2)  # (B, H, T, dn+dr)
        kv = ((x @ wlat.T) @ wkv.T).view(B, T, H, dn + dv).transpose(1, 2)
        k_rope = (x @ wkr.T)[:, None].expand(B, H, T, dr)
        k = torch.cat([kv[..., :dn], k_rope], dim=-1)  # (B, H, T, dn+dr)
        return grouped_max_logits(q, k, scale).double()

    before = logits()
    tau = float(before.median())
    wkr0, wkv0 = wkr.clone(), wkv.clone()
    QKClip([QKSpec.mla("mla", wq, wkv, H, dn, dr, dv)], tau).apply({"mla": before})
    after = logits()
    for h in range(H):
        if before[h] > tau:
            assert after[h] == pytest.approx(tau, rel=REL)
        else:
            assert after[h] == before[h]
    assert torch.equal(wkr, wkr0)  # shared key untouched
    for h in range(H):  # values untouched
        assert torch.equal(wkv[h * (dn + dv) + dn:(h + 1) * (dn + dv)], wkv0[h * (dn + dv) + dn:(h + 1) * (dn + dv)])


# ---------------------------------------------------------------------- bad input
def test_errors_name_the_layer_and_value():
    w = torch.randn(8, 4)
    spec = QKSpec.separate("blocks.3.attn", w, torch.randn(4, 4), 4, 2)
    for tau in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="tau"):
            QKClip([spec], tau)
    clip = QKClip([spec], 1.0)
    with pytest.raises(ValueError, match=r"blocks\.3\.attn.*3 max logits.*n_heads=4"):
        clip.apply({"blocks.3.attn": torch.ones(3)})
    with pytest.raises(ValueError, match=r"blocks\.3\.attn.*head 2 is nan"):
        clip.apply({"blocks.3.attn": torch.tensor([1.0, 2.0, float("nan"), 1.0])})
    with pytest.raises(ValueError, match=r"head 0 is inf"):
        clip.apply([torch.tensor([float("inf"), 2.0, 1.0, 1.0])])
    with pytest.raises(ValueError, match=r"no max logits reported for layer\(s\) \['blocks\.3\.attn'\]"):
        clip.apply({})
    with pytest.raises(ValueError, match="2 layers"):
        clip.apply([torch.ones(4), torch.ones(4)])
    w0 = w.clone()
    with pytest.raises(ValueError):
        clip.apply({"blocks.3.attn": torch.tensor([9.0, 9.0, float("nan"), 1.0])})
    assert torch.equal(w, w0)  # nothing scaled before the error
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        QKSpec.separate("x", w, torch.randn(6, 4), 4, 3)
    with pytest.raises(ValueError, match=r"k weight.*n_kv_heads\*head_dim = 2\*2 = 4"):
        QKSpec.separate("x", w, torch.randn(6, 4), 4, 2)
    with pytest.raises(ValueError, match="overlap"):
        QKSpec("x", 2, 2, (HeadRows.contiguous(w, 2, 2),), (HeadRows.contiguous(w, 2, 2, offset=2),))
    with pytest.raises(ValueError, match="outside"):
        HeadRows.contiguous(w, 3, 3)
    with pytest.raises(ValueError, match="unknown fused layout"):
        QKSpec.fused("x", torch.randn(16, 4), 2, 1, layout="interleaved")
    with pytest.raises(ValueError, match="unique"):
        QKClip([spec, spec], 1.0)


# ---------------------------------------------------------------------- the lab model
def small_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=32), **kw})


def capture_attention_inputs(model: GPT) -> tuple[dict[str, torch.Tensor], list]:
    inputs: dict[str, torch.Tensor] = {}
    handles = [attn.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach().clone()))
               for name, attn in model.attention_layers()]
    return inputs, handles


def layer_logits(model: GPT, name: str, xin: torch.Tensor, loop: bool = False) -> torch.Tensor:
    """Recompute one layer's per-head max logits from its input, the way its forward does."""
    attn = dict(model.attention_layers())[name]
    B, T, _ = xin.shape
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q = apply_rope(attn.wq(xin).view(B, T, attn.n_head, attn.head_dim), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(xin).view(B, T, attn.n_kv_head, attn.head_dim), cos, sin).transpose(1, 2)
    scale = 1 / math.sqrt(attn.head_dim)
    with torch.no_grad():
        return logits_by_loop(q, k, scale) if loop else grouped_max_logits(q, k, scale).double()


def test_lab_tracking_matches_reference_and_leaves_forward_unchanged(monkeypatch):
    torch.manual_seed(0)
    model = GPT(small_cfg())
    x = torch.randint(0, 256, (2, 6))
    plain, _ = model(x)
    inputs, handles = capture_attention_inputs(model)
    with model.track_max_logits() as ml:
        tracked, _ = model(x)
        assert ml == {}  # filled at exit
        with pytest.raises(RuntimeError, match="already active"):
            with model.track_max_logits():
                pass
    for h in handles:
        h.remove()
    assert torch.equal(plain, tracked)
    assert sorted(ml) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(not a.record_max_logit and a.max_logit is None for _, a in model.attention_layers())
    for name, v in ml.items():
        assert v.shape == (4,) and v.dtype == torch.float32
        torch.testing.assert_close(v.double(), layer_logits(model, name, inputs[name], loop=True), rtol=1e-5, atol=1e-7)
    # the blocked path (several batch blocks) gives the same values, to rounding
    monkeypatch.setattr(qkclip_module, "SCORE_BLOCK_ELEMENTS", 1)
    with model.track_max_logits() as ml_blocked:
        model(x)
    for name in ml:
        # equal up to rounding: the score matmul's kernel may change with the batch block's size
        # (bitwise equal on the AVX512 machine, last-bit differences on an AVX2 Zen3)
        torch.testing.assert_close(ml_blocked[name], ml[name], rtol=1e-6, atol=1e-7)
    # two forwards (gradient accumulation): the elementwise max
    x2 = torch.randint(0, 256, (2, 6))
    with model.track_max_logits() as one:
        model(x2)
    with model.track_max_logits() as both:
        model(x)
        model(x2)
    for name in ml:
        assert torch.equal(both[name], torch.maximum(ml[name], one[name]))


def test_lab_heads_split_across_ranks_need_head_offset():
    model = GPT(small_cfg())
    name, attn = model.attention_layers()[1]
    attn.n_head = 2  # what tensor parallelism over 2 ranks leaves on each rank
    with pytest.raises(RuntimeError, match=r"blocks\.1\.attn computes 2 of 4 query heads.*head_offset"):
        model._per_global_head(name, attn, torch.tensor([1.0, 2.0]))
    attn.head_offset = 2
    assert model._per_global_head(name, attn, torch.tensor([1.0, 2.0])).tolist() == [-math.inf, -math.inf, 1.0, 2.0]


def _train(clip_tau, steps=4, lr=0.02):
    """A few Muon steps on the lab model; with ``clip_tau``, the trainer's QK-Clip loop."""
    torch.manual_seed(0)
    model = GPT(small_cfg())
    opt = Muon(model, lr=lr, adamw_lr=3e-3)
    clip = QKClip(model.qk_clip_specs(), clip_tau) if clip_tau is not None else None
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (4, 17), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        if clip is None:
            _, loss = model(x, y)
            loss.backward()
            opt.step()
        else:
            with model.track_max_logits() as ml:
                _, loss = model(x, y)
                loss.backward()
            opt.step()
            history.append(clip.apply(ml))
        opt.zero_grad(set_to_none=True)
    return model, history


def test_lab_training_bit_identical_when_nothing_is_clipped():
    off, _ = _train(None)
    on, hist = _train(1e9)
    inf, _ = _train(math.inf)
    assert all(s.clipped_heads == 0 and s.min_gamma == 1.0 for s in hist)
    assert hist[-1].total_heads == 8 and math.isfinite(hist[-1].max_logit)
    for (n, a), b, c in zip(off.named_parameters(), on.parameters(), inf.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), n


def test_lab_clip_bound_every_step():
    """Each step of a clipped run: measure on the updated weights, clip, recompute from the same
    layer inputs: every head <= tau, and a clipped head lands on tau."""
    tau, clip = None, None
    torch.manual_seed(0)
    model = GPT(small_cfg())
    opt = Muon(model, lr=0.05, adamw_lr=3e-3)
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for _ in range(3):
        tokens = torch.randint(0, 256, (4, 17), generator=g)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        inputs, handles = capture_attention_inputs(model)
        with torch.no_grad(), model.track_max_logits() as before:
            model(tokens[:, :-1])
        for h in handles:
            h.remove()
        if clip is None:  # tau = the median head of the first step: about half the heads get clipped
            tau = float(torch.cat(list(before.values())).median())
            clip = QKClip(model.qk_clip_specs(), tau)
        clipped += clip.apply(before).clipped_heads
        for name, xin in inputs.items():
            after = layer_logits(model, name, xin)
            for h in range(after.numel()):
                if before[name][h] > tau:
                    assert after[h] == pytest.approx(tau, rel=REL), (name, h)
                else:
                    assert after[h] == before[name][h].double()
    assert clipped > 0


# ---------------------------------------------------------------------- Hugging Face
def _need_transformers() -> None:
    pytest.importorskip("transformers")  # not at import: the distributed worker runs this file


def _llama(layers=2, bias=True, impl="sdpa"):
    _need_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, attention_bias=bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
    with torch.no_grad():  # larger logits than the 0.02-std init gives
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
            layer.self_attn.q_proj.bias.normal_() if bias else None
    return model


def _probe_logits(model, *args, **kwargs) -> dict[str, torch.Tensor]:
    """The pre-softmax scores as the model's own eager attention computes them (registered as an
    attention function): the reference for the hooks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import repeat_kv

    seen: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def probe(module, q, k, v, mask, scaling, dropout=0.0, **kw):
        if q.shape[-1] != k.shape[-1]:
            raise AssertionError("q and k widths differ")
        s = q.float() @ repeat_kv(k, q.shape[1] // k.shape[1]).float().transpose(2, 3) * scaling
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
        seen[names[id(module)]] = s.detach().amax(dim=(0, 2, 3))
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the model's own
        return eager(module, q, k, v, mask, scaling, dropout, **kw)

    AttentionInterface.register("muonlab_qk_probe", probe)
    AttentionMaskInterface.register("muonlab_qk_probe", eager_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation("muonlab_qk_probe")
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.set_attn_implementation(before)
    return seen


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_hooks_match_the_models_scores(impl):
    model = _llama(impl=impl)
    x = torch.randint(0, 64, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # left padding
    for kwargs in ({}, {"attention_mask": mask}):
        with hf_track_max_logits(model) as ml:
            model(x, **kwargs)
        ref = _probe_logits(model, x, **kwargs)
        assert sorted(ml) == ["model.layers.0.self_attn", "model.layers.1.self_attn"] == sorted(ref)
        for name in ml:
            torch.testing.assert_close(ml[name], ref[name], rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_hf_llama_specs_and_clip_bring_logits_under_tau():
    model = _llama(layers=1)
    specs = hf_qk_specs(model)
    assert [(s.name, s.n_heads, s.n_kv_heads, len(s.q), len(s.k)) for s in specs] == \
        [("model.layers.0.self_attn", 4, 2, 2, 2)]  # weights + biases
    x = torch.randint(0, 64, (2, 9))
    with hf_track_max_logits(model) as ml:
        model(x)
    tau = float(ml["model.layers.0.self_attn"].median())
    stats = QKClip(specs, tau).apply(ml)
    assert stats.clipped_heads >= 1
    after = _probe_logits(model, x)["model.layers.0.self_attn"]
    before = ml["model.layers.0.self_attn"]
    for h in range(4):
        if before[h] > tau:
            assert float(after[h]) == pytest.approx(tau, rel=REL)
        else:
            assert float(after[h]) <= tau * (1 + REL)


def test_hf_mla_specs_clip_deepseek_v3():
    _need_transformers()
    from muonlab.integrations.hf import small_config
    from transformers import AutoModelForCausalLM

    cfg = small_config("deepseek_v3", {"num_hidden_layers": 1, "num_key_value_heads": 4})  # MLA: one k per head
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_b_proj.weight.mul_(20)
        attn.kv_b_proj.weight.mul_(20)
    specs = hf_qk_specs(model)
    assert len(specs) == 1 and specs[0].q_shared_key and specs[0].q[0].tensor is attn.q_b_proj.weight
    x = torch.randint(0, cfg.vocab_size, (2, 6))
    before = _probe_logits(model, x)
    name = "model.layers.0.self_attn"
    tau = float(before[name].median())
    kv_a = attn.kv_a_proj_with_mqa.weight.clone()
    QKClip(specs, tau).apply(before)
    after = _probe_logits(model, x)
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, kv_a)  # the shared rotary key is not touched
    for h in range(cfg.num_attention_heads):
        if before[name][h] > tau:
            assert float(after[name][h]) == pytest.approx(tau, rel=1e-4)
        else:
            assert float(after[name][h]) == pytest.approx(float(before[name][h]), rel=1e-5)
    with pytest.raises(ValueError, match="MLA"):
        with hf_track_max_logits(model):
            pass


def test_hf_qk_norm_is_refused():
    _need_transformers()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = Qwen3ForCausalLM(cfg)
    with pytest.raises(ValueError, match="q_norm"):
        hf_qk_specs(model)
    with pytest.raises(ValueError, match="q_norm"):
        with hf_track_max_logits(model):
            pass


# ---------------------------------------------------------------------- DTensor shards, cross-rank max
H_D, D_D, C_D = 3, 3, 4  # 3 query heads of width 3 over 1 key head: 9 q rows split 5/4 (head 1 straddles)


def _dist_case(rank: int):
    torch.manual_seed(0)
    wq, wk = torch.randn(H_D * D_D, C_D), torch.randn(D_D, C_D)
    wqkv = torch.cat([wq, wk, torch.randn(D_D, C_D)])  # 15 rows: 8 / 7
    local = [torch.tensor([4.0, 1.0, 3.0]), torch.tensor([1.0, 5.0, 2.5])]  # each rank sees part of the batch
    return wq, wk, wqkv, local[rank], torch.maximum(*local)


def _tensor_parallel_case(mesh, rank: int) -> None:
    """The lab GPT under the lab's tensor parallelism (each rank computes half the heads; wq/wk are
    DTensors split by rows): tracked logits per global head and the clip match one process."""
    from muonlab.lab.parallel import tensor_parallel

    cfg = small_cfg()
    torch.manual_seed(0)
    ref = GPT(cfg)
    torch.manual_seed(0)
    tp = GPT(cfg)
    tensor_parallel(tp, mesh)
    for block in tp.blocks:  # what the TP wrapper must record: this rank's first global query head
        block.attn.head_offset = mesh.get_local_rank() * block.attn.n_head
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), ref.track_max_logits() as mr:
        ref(x)
    with torch.no_grad(), tp.track_max_logits() as mt:
        tp(x)
    for name in mr:
        mine = mt[name][rank * 2:(rank + 1) * 2]  # 4 heads over 2 ranks; the others are -inf here
        if not (torch.allclose(mine, mr[name][rank * 2:(rank + 1) * 2], rtol=1e-5)
                and bool(torch.isinf(mt[name]).sum() == 2)):
            raise SystemExit(f"rank {rank}: tensor-parallel max logits of {name} {mt[name]} vs {mr[name]}")
    values = torch.cat(list(mr.values())).sort().values
    tau = float(values[3] + values[4]) / 2
    want = QKClip(ref.qk_clip_specs(), tau, process_group=False).apply(mr)
    got = QKClip(tp.qk_clip_specs(), tau).apply(mt)
    if (got.clipped_heads, got.total_heads) != (want.clipped_heads, want.total_heads) or want.clipped_heads == 0:
        raise SystemExit(f"rank {rank}: tensor-parallel clip stats {got} vs {want}")
    for (name, a), b in zip(ref.attention_layers(), tp.blocks):
        for w_ref, w_tp in ((a.wq.weight, b.attn.wq.weight), (a.wk.weight, b.attn.wk.weight)):
            if not torch.allclose(w_tp.full_tensor(), w_ref, rtol=1e-5, atol=1e-8):
                raise SystemExit(f"rank {rank}: tensor-parallel clip of {name} differs from one process")


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        tau = 2.0
        wq, wk, wqkv, mine, glob = _dist_case(rank)
        ref = [t.clone() for t in (wq, wk, wqkv)]
        QKClip([QKSpec.separate("a", ref[0], ref[1], H_D, 1), QKSpec.fused("b", ref[2], H_D, 1)], tau,
               process_group=False).apply([glob, glob])
        for placement in (Shard(0), Shard(1)):
            dq, dk, dqkv = (distribute_tensor(t.clone(), mesh, [placement]) for t in (wq, wk, wqkv))
            QKClip([QKSpec.separate("a", dq, dk, H_D, 1), QKSpec.fused("b", dqkv, H_D, 1)], tau).apply([mine, mine])
            for got, want in zip((dq, dk, dqkv), ref):
                got = got.full_tensor()
                if not torch.allclose(got, want, rtol=1e-6, atol=0):
                    raise SystemExit(f"rank {rank} {placement}: sharded clip differs by {(got - want).abs().max()}")
        # replicated plain tensors (DDP): every rank ends equal to the reference
        pq, pk = wq.clone(), wk.clone()
        QKClip([QKSpec.separate("a", pq, pk, H_D, 1)], tau).apply([mine])
        if not (torch.equal(pq, ref[0]) and torch.equal(pk, ref[1])):
            raise SystemExit(f"rank {rank}: replicated clip did not use the cross-rank max")
        _tensor_parallel_case(mesh, rank)
        # a non-finite logit on one rank is an error on every rank (no hang)
        bad = torch.tensor([float("nan"), 1.0, 1.0]) if rank == 1 else torch.ones(3)
        try:
            QKClip([QKSpec.separate("a", pq, pk, H_D, 1)], tau).apply([bad])
            raise SystemExit(f"rank {rank}: a NaN on rank 1 was not reported")
        except ValueError as e:
            assert "not finite" in str(e)
        dist.barrier()  # no rank tears the group down while a peer still uses it
    finally:
        dist.destroy_process_group()


def test_dtensor_shards_and_cross_rank_max():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    port = free_port()
    run_ranks([[__file__, "worker", r, 2, port] for r in range(2)], 120, "the 2-rank QK-Clip run", tail=3000)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    torch.set_num_threads(1)
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
