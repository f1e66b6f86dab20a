"""Weight-space analysis of LoRA adapters: planted updates on tiny models of every zoo family, read back exactly."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.modules import READ_TYPES, lora_layers
from lora_lens.lab.tokenizer import build_tokenizer, token_id
from lora_lens.lab.zoo import build_model, load_model
from lora_lens.lens import delta as D


@pytest.fixture(scope="module")
def tok(tiny_world):
    return build_tokenizer(tiny_world)


def lora(model, r=4, alpha=None, targets="all-linear", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # peft's Conv1D fan_in_fan_out notice
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=r if alpha is None else alpha,
                                                target_modules=targets, lora_dropout=0.0, **kw))


def fresh(family, tok, **kw):
    return lora(build_model(family, "tiny", tok, seed=0), **kw)


def plant(pm, name, B, A, adapter="default"):
    layer = pm.get_base_model().get_submodule(name)
    with torch.no_grad():
        layer.lora_B[adapter].weight.copy_(B)
        layer.lora_A[adapter].weight.copy_(A)
    return layer


def orthonormal(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].float()


# ------------------------------------------------------------------------------------------------- factor SVD


def test_factor_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(96, 8, generator=g), torch.randn(8, 40, generator=g)
    U, S, Vh = D.factor_svd(B, A, 0.5)
    dense = 0.5 * B.double() @ A.double()
    Ud, Sd, Vhd = torch.linalg.svd(dense, full_matrices=False)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.shape == (96, 8) and S.shape == (8,) and Vh.shape == (8, 40)
    assert torch.all((S.double() - Sd[:8]).abs() <= 1e-5 * Sd[:8])          # singular values, 1e-5 relative
    assert torch.allclose((U.double().T @ Ud[:, :8]).diagonal().abs(), torch.ones(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose((Vh.double() @ Vhd[:8].T).diagonal().abs(), torch.ones(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(U * S @ Vh, dense.float(), atol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-5)


def test_factor_svd_rank_deficient_and_bad_shapes():
    B = torch.zeros(10, 3)
    B[:, 0] = torch.arange(10.0)
    A = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    U, S, Vh = D.factor_svd(B, A, 2.0)
    assert S[1:].abs().max() < 1e-5 < S[0]
    assert torch.allclose(U.T @ U, torch.eye(3), atol=1e-5)
    assert torch.allclose(U * S @ Vh, 2.0 * B @ A, atol=1e-4)
    with pytest.raises(ConfigError, match=r"B \(10, 3\) and A \(4, 7\)"):
        D.factor_svd(B, torch.zeros(4, 7))


def test_spectral_ranks():
    assert D.effective_rank([5.0, 0, 0, 0]) == pytest.approx(1.0)
    assert D.effective_rank([2.0] * 6) == pytest.approx(6.0)
    assert D.effective_rank([0.0, 0.0]) == 0.0
    assert D.stable_rank([3.0, 3.0, 3.0]) == pytest.approx(3.0)
    assert D.stable_rank([2.0, 1.0]) == pytest.approx(1.25)


# ---------------------------------------------------------------------------------------------- extraction


EXPECTED_TYPES = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"},
    "qwen2": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"},
    "mistral": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"},
    "phi3": {"attn_qkv", "attn_o", "mlp_gate_up", "mlp_down"},
    "gpt2": {"attn_qkv", "attn_o", "mlp_up", "mlp_down"},
    "gpt_neox": {"attn_qkv", "attn_o", "mlp_up", "mlp_down"},
}


@pytest.mark.parametrize("family", sorted(EXPECTED_TYPES))
def test_lora_modules_every_family(family, tok):
    pm = fresh(family, tok, alpha=8)
    for name, layer in lora_layers(pm).items():                     # random B so that ΔW ≠ 0
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    deltas = D.lora_modules(pm)
    assert {d.module_type for d in deltas} == EXPECTED_TYPES[family]
    assert {d.layer for d in deltas} == {0, 1} and {d.depth for d in deltas} == {0.0, 1.0}
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    hf = pm.get_base_model()
    for d in deltas:
        layer = hf.get_submodule(d.name)
        assert d.scaling == 2.0 and d.rank == 4 and d.W.shape == d.shape == (d.B.shape[0], d.A.shape[1])
        xin = torch.randn(5, d.shape[1], generator=torch.Generator().manual_seed(1))
        base = layer.get_base_layer()
        bias = base.bias if base.bias is not None else 0.0
        with torch.no_grad():
            assert torch.allclose(xin @ d.W.T + bias, base(xin), atol=1e-5)          # W is [out, in]
            assert torch.allclose(layer(xin) - base(xin), xin @ d.delta().T, atol=1e-5)  # so is ΔW
            stored = layer.get_delta_weight("default")
            assert torch.allclose(stored.T if d.fan_in_fan_out else stored, d.delta(), atol=1e-6)
        assert d.fan_in_fan_out == (family == "gpt2")
    del x


def test_conv1d_orientation_planted(tok):
    pm = fresh("gpt2", tok)
    name = "transformer.h.1.attn.c_attn"                     # Conv1D weight stored [in=32, out=96]
    u = orthonormal(96, 1, 3)[:, 0]
    v = orthonormal(32, 1, 4)[:, 0]
    B, A = torch.zeros(96, 4), torch.zeros(4, 32)
    B[:, 0], A[0] = 3.0 * u, v
    layer = plant(pm, name, B, A)
    (d,) = D.lora_modules(pm, names=[name])
    assert layer.get_base_layer().weight.shape == (32, 96) and d.W.shape == (96, 32) and d.fan_in_fan_out
    assert torch.allclose(d.delta(), 3.0 * torch.outer(u, v), atol=1e-6)
    U, S, Vh = d.svd()
    assert S[0] == pytest.approx(3.0, rel=1e-5) and S[1:].abs().max() < 1e-6
    assert abs(float(U[:, 0] @ u)) == pytest.approx(1.0, abs=1e-5)       # output side is the 96-dim u
    assert abs(float(Vh[0] @ v)) == pytest.approx(1.0, abs=1e-5)         # input side is the 32-dim v


def test_scaling_rslora_merged_and_dora(tok):
    pm = fresh("llama", tok, r=4, alpha=8, use_rslora=True)
    assert {d.scaling for d in D.lora_modules(pm)} == {8 / math.sqrt(4)}
    for layer in lora_layers(pm).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    before = D.lora_modules(pm)
    pm.merge_adapter()
    after = D.lora_modules(pm)
    for b, a in zip(before, after):
        assert torch.allclose(b.W, a.W, atol=1e-5) and torch.allclose(b.delta(), a.delta())
    with pytest.warns(UserWarning, match="DoRA"):
        deltas = D.lora_modules(fresh("llama", tok, use_dora=True))
    assert all(d.dora for d in deltas)


def test_embedding_and_lm_head_lora(tok):
    pm = fresh("llama", tok, targets=["embed_tokens", "q_proj", "lm_head"])
    hf = pm.get_base_model()
    with torch.no_grad():
        hf.model.embed_tokens.lora_embedding_A["default"].normal_(std=0.1)
        hf.lm_head.lora_B["default"].weight.normal_(std=0.1)
    deltas = {d.module_type: d for d in D.lora_modules(pm)}
    emb = deltas["embed"]
    assert emb.shape == (32, len(tok)) and emb.layer is None and math.isnan(emb.depth)    # [hidden, vocab]
    ids = torch.tensor([[5, 7, 9]])
    with torch.no_grad():
        change = hf.model.embed_tokens(ids) - hf.model.embed_tokens.get_base_layer()(ids)
    assert torch.allclose(change[0], emb.delta()[:, ids[0]].T, atol=1e-6)
    assert deltas["lm_head"].shape == (len(tok), 32)
    by_layer = D.energy_by(D.summary(pm, intruders=False), "layer")
    assert by_layer["layer"].isna().sum() == 1 and by_layer["share"].sum() == pytest.approx(1.0)


def test_bad_inputs(tok):
    model = build_model("llama", "tiny", tok)
    with pytest.raises(ConfigError, match="no LoRA layers"):
        D.lora_modules(model)
    pm = lora(model)
    with pytest.raises(ConfigError, match=r"adapter_name='other'.*\['default'\]"):
        D.lora_modules(pm, "other")
    with pytest.raises(ConfigError, match="not an adapted module"):
        D.read_directions(pm, "layers.9.self_attn.o_proj")
    with pytest.raises(ConfigError, match="ambiguous"):
        D.read_directions(pm, "o_proj")
    with pytest.raises(ConfigError, match="by='head'"):
        D.energy_by(D.summary(pm, intruders=False), "head")
    with pytest.raises(ConfigError, match="summary"):
        D.energy_by(pd.DataFrame({"x": [1]}), "layer")


# ------------------------------------------------------------------------------------------------ summary


def test_summary_planted_ranks_and_energy(tok):
    pm = fresh("llama", tok, r=4)
    # rank-1 update on q_proj of layer 0, four equal singular values on down_proj of layer 1
    q = "model.layers.0.self_attn.q_proj"
    B, A = torch.zeros(32, 4), torch.zeros(4, 32)
    B[:, 0], A[0] = 2.0 * orthonormal(32, 1, 0)[:, 0], orthonormal(32, 1, 1)[:, 0]
    plant(pm, q, B, A)
    down = "model.layers.1.mlp.down_proj"
    plant(pm, down, orthonormal(32, 4, 2), orthonormal(64, 4, 3).T)
    df = D.summary(pm)
    row = df.set_index("module")
    assert row.loc[q, "effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert row.loc[q, "stable_rank"] == pytest.approx(1.0, abs=1e-4)
    assert row.loc[q, "fro"] == pytest.approx(2.0, rel=1e-5) and row.loc[q, "spec"] == pytest.approx(2.0, rel=1e-5)
    assert row.loc[down, "effective_rank"] == pytest.approx(4.0, abs=1e-4)
    assert row.loc[down, "stable_rank"] == pytest.approx(4.0, abs=1e-4)
    W = pm.get_base_model().get_submodule(down).get_base_layer().weight
    assert row.loc[down, "rel_fro"] == pytest.approx(2.0 / float(torch.linalg.matrix_norm(W)), rel=1e-5)
    assert row.loc[down, "rel_spec"] == pytest.approx(1.0 / float(torch.linalg.matrix_norm(W, ord=2)), rel=1e-5)
    assert row.loc[q, "energy_share"] == pytest.approx(0.5) and row.loc[down, "energy_share"] == pytest.approx(0.5)
    assert df["energy_share"].sum() == pytest.approx(1.0)
    assert len(row.loc[down, "singular_values"]) == 4
    by_layer = D.energy_by(df, "layer")
    assert by_layer["share"].tolist() == pytest.approx([0.5, 0.5]) and by_layer["depth"].tolist() == [0.0, 1.0]
    by_type = D.energy_by(df, "module_type").set_index("module_type")["share"]
    assert by_type["attn_q"] == pytest.approx(0.5) and by_type["mlp_down"] == pytest.approx(0.5)
    assert by_type.sum() == pytest.approx(1.0) and by_type["attn_k"] == 0.0
    bins = D.energy_by(df, "depth_bin", bins=2)
    assert bins["share"].tolist() == pytest.approx([0.5, 0.5])


def test_energy_shares_random_adapter(tok):
    pm = fresh("gpt_neox", tok)
    for layer in lora_layers(pm).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    df = D.summary(pm, intruders=False)
    assert (df["intruders"] == -1).all()
    for by in ("layer", "module_type", "depth_bin"):
        shares = D.energy_by(df, by)["share"]
        assert shares.sum() == pytest.approx(1.0)
    by_type = D.energy_by(df, "module_type").set_index("module_type")["energy"]
    assert by_type["mlp_up"] == pytest.approx(df.loc[df.module_type == "mlp_up", "energy"].sum())


# ------------------------------------------------------------------------------------------ amplification


def _hand_delta(W, B, A, name="m.layers.0.x.q_proj", scaling=1.0):
    return D.ModuleDelta(name=name, layer=0, module_type="attn_q", depth=0.0, B=B, A=A, scaling=scaling, W=W)


def test_amplification_hand_computed():
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    W[0, 3] = 1.0
    e = torch.eye(4)
    # ΔW = 4·e3 e3ᵀ: U = V = e3, UᵀWVᵀ = W[3, 3] = 0.5 → factor 4 / 0.5 = 8
    d1 = _hand_delta(W, 2.0 * e[:, 3:4], 2.0 * e[3:4])
    assert D.amplification_factor(d1) == pytest.approx(8.0, rel=1e-5)
    # ΔW = 6·e0 e3ᵀ (scaling 3): projection W[0, 3] = 1 → factor 6
    d2 = _hand_delta(W, e[:, 0:1], 2.0 * e[3:4], scaling=3.0)
    assert D.amplification_factor(d2) == pytest.approx(6.0, rel=1e-5)
    df = D.summary([d1, d2], intruders=False)
    assert df["amplification"].tolist() == pytest.approx([8.0, 6.0], rel=1e-5)
    assert df["proj_fro"].tolist() == pytest.approx([0.5, 1.0], rel=1e-5)
    # pooled: sqrt((16 + 36) / (0.25 + 1))
    assert D.amplification(df) == pytest.approx(math.sqrt(52 / 1.25), rel=1e-5)
    assert D.amplification(df, by="module_type")["amplification"].tolist() == pytest.approx([math.sqrt(52 / 1.25)])


# ---------------------------------------------------------------------------------------------- intruders


def test_intruders_zero_and_planted(tok):
    pm = fresh("llama", tok)                                  # B = 0 at init: ΔW = 0
    df = D.summary(pm)
    assert (df["intruders"] == 0).all() and df["fro"].max() == 0.0
    name = "model.layers.0.mlp.up_proj"                       # W is [64, 32]: its column space leaves 32 dims free
    W = pm.get_base_model().get_submodule(name).get_base_layer().weight.detach()
    Uf, Sw, Vw = torch.linalg.svd(W)
    B, A = torch.zeros(64, 4), torch.zeros(4, 32)
    B[:, 0], A[0] = 10 * float(Sw[0]) * Uf[:, 40], orthonormal(32, 1, 5)[:, 0]   # u ⟂ every singular vector of W
    plant(pm, name, B, A)
    (d,) = D.lora_modules(pm, names=[name])
    res = D.intruder_dimensions(d)
    assert res.count >= 1 and 0 in res.indices and res.max_cos[0] < 0.1 and len(res.max_cos) == 10
    # a small update along W's own top direction is no intruder
    B[:, 0], A[0] = 0.1 * Sw[0] * Uf[:, 0], Vw[0]
    plant(pm, name, B, A)
    (d,) = D.lora_modules(pm, names=[name])
    assert D.intruder_dimensions(d).count == 0
    total = D.summary(pm)["intruders"].sum()
    assert total == 0
    with pytest.raises(ConfigError, match="epsilon=1.5"):
        D.intruder_dimensions(d, epsilon=1.5)


# -------------------------------------------------------------------------------------------------- phi


def test_phi_same_orthogonal_and_shared_top(tok):
    name = "model.layers.1.self_attn.q_proj"
    Qo, Qi = orthonormal(32, 32, 10), orthonormal(32, 32, 11)
    m8 = fresh("llama", tok, r=8, targets=["q_proj"])
    plant(m8, name, Qo[:, :8] * torch.arange(8.0, 0.0, -1.0), Qi[:, :8].T)
    m16 = fresh("llama", tok, r=16, targets=["q_proj"])
    cols = [0] + list(range(8, 23))                           # shares only the top direction with m8
    plant(m16, name, Qo[:, cols] * torch.cat([torch.tensor([100.0]), torch.arange(15.0, 0.0, -1.0)]),
          Qi[:, cols].T)
    orth = fresh("llama", tok, r=8, targets=["q_proj"])
    plant(orth, name, Qo[:, 8:16], Qi[:, 8:16].T)

    (a,), (b,), (c,) = (D.lora_modules(m, names=[name]) for m in (m8, m16, orth))
    for i in (1, 4, 8):
        assert D.phi(a, a, i, i) == pytest.approx(1.0, abs=1e-5)
    assert D.phi(a, b, 1, 1) == pytest.approx(1.0, abs=1e-5)
    assert D.phi(a, b, 8, 16) == pytest.approx(1 / 8, abs=1e-5)
    assert D.phi(a, c, 8, 8) == pytest.approx(0.0, abs=1e-6)
    assert D.phi(a, c, 8, 8, side="left") == pytest.approx(0.0, abs=1e-6)
    # side="A": A's own right singular vectors (paper); same spans at full rank, but here A has equal singular
    # values so its ordering is arbitrary — only full-rank comparisons are meaningful
    assert D.phi(a, b, 8, 16, side="A") == pytest.approx(1 / 8, abs=1e-5)
    assert D.phi(a, c, 8, 8, side="A") == pytest.approx(0.0, abs=1e-6)

    grid = D.phi_grid(m8, m16, "layers.1.self_attn.q_proj")
    assert grid.shape == (8, 16)
    for i, j in [(1, 1), (3, 7), (8, 16), (5, 2)]:
        assert grid[i - 1, j - 1] == pytest.approx(D.phi(a, b, i, j), abs=1e-5)
    assert D.phi_grid(m8, m16, name, 4, 5).shape == (4, 5)
    table = D.phi_table(m8, m16)
    assert table.set_index("module").loc[name, "phi"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="i=9"):
        D.phi(a, b, 9, 1)


def test_phi_mismatch_names_both(tok):
    m = fresh("llama", tok)
    q, k = (D.lora_modules(m, names=[f"model.layers.0.self_attn.{p}"])[0] for p in ("q_proj", "k_proj"))
    with pytest.raises(MismatchError, match=r"q_proj.*\(32, 32\).*k_proj.*\(16, 32\)"):
        D.phi(q, k)
    mq, mv = fresh("llama", tok, targets=["q_proj"]), fresh("llama", tok, targets=["v_proj"])
    with pytest.raises(MismatchError, match=r"only in the first \['model.layers.0.self_attn.q_proj'.*v_proj"):
        D.phi_table(mq, mv)
    with pytest.raises(MismatchError, match="not adapted in the second"):
        D.phi_grid(mq, mv, "layers.0.self_attn.q_proj")


# ------------------------------------------------------------------------------------- vocabulary reading


def _plant_write(pm, name, u, seed=0):
    out_dim = u.shape[0]
    in_dim = pm.get_base_model().get_submodule(name).in_features
    B, A = torch.zeros(out_dim, 4), torch.zeros(4, in_dim)
    B[:, 0], A[0] = 5.0 * u / u.norm(), orthonormal(in_dim, 1, seed)[:, 0]
    plant(pm, name, B, A)


def _check_top(pm, name, tok, t, planted_u):
    dirs = D.read_directions(pm, name, k=1, top=5, tokenizer=tok, sign="both")
    assert [x.sign for x in dirs] == ["+", "-"] and dirs[0].via == "unembedding"
    (U, _, _), = [d.svd() for d in D.lora_modules(pm, names=[name])]
    want = "+" if float(U[:, 0] @ planted_u) > 0 else "-"       # the sign SVD happened to return
    hit = next(x for x in dirs if x.sign == want)
    assert hit.tokens[0] == tok.decode([t]).strip() and hit.sigma == pytest.approx(5.0, rel=1e-5)
    other = next(x for x in dirs if x.sign != want)
    assert other.tokens[0] != hit.tokens[0]
    (auto,) = D.read_directions(pm, name, k=1, top=5, tokenizer=tok)
    assert auto == next(x for x in dirs if x.sign == auto.sign)


def test_read_write_direction_through_final_norm(tiny_llama):
    model, tok = load_model(tiny_llama.path)
    pm = lora(model)
    hf = pm.get_base_model()
    g = hf.model.norm.weight.detach()
    assert not torch.allclose(g, torch.ones_like(g))          # a pretrained, non-trivial gain
    W_U = hf.lm_head.weight.detach()
    # logits W_U (g ⊙ u) = W_U W_U[t] peak at t when t has the longest unembedding row (Cauchy–Schwarz)
    t = int(W_U.norm(dim=1).argmax())
    u = W_U[t] / g
    name = "model.layers.1.self_attn.o_proj"
    _plant_write(pm, name, u)
    _check_top(pm, name, tok, t, u / u.norm())
    assert D.final_norm(pm) is hf.model.norm


@pytest.mark.parametrize("family,name", [("qwen2", "model.layers.1.self_attn.o_proj"),
                                         ("mistral", "model.layers.0.mlp.down_proj"),
                                         ("gpt2", "transformer.h.0.mlp.c_proj"),
                                         ("gpt_neox", "gpt_neox.layers.1.attention.dense"),
                                         ("phi3", "model.layers.0.mlp.down_proj")])
def test_read_write_direction_families(family, name, tok, tiny_world):
    pm = fresh(family, tok)
    hf = pm.get_base_model()
    t = token_id(tok, tiny_world.values["colour"][1])
    u = hf.get_output_embeddings().weight[t].detach().clone()   # gpt2: the tied wte row
    if family == "gpt2":
        assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    _plant_write(pm, name, u)
    _check_top(pm, name, tok, t, u / u.norm())


@pytest.mark.parametrize("family,name", [("llama", "model.layers.1.mlp.up_proj"),
                                         ("gpt2", "transformer.h.1.attn.c_attn")])
def test_read_side_direction_through_embedding(family, name, tok, tiny_world):
    pm = fresh(family, tok)
    hf = pm.get_base_model()
    t = token_id(tok, tiny_world.values["profession"][0])
    e = hf.get_input_embeddings().weight[t].detach().clone()
    v = e - e.mean() if family == "gpt2" else e                   # what the block's norm makes of token t
    out_dim = hf.get_submodule(name).out_features
    B, A = torch.zeros(out_dim, 4), torch.zeros(4, 32)
    B[:, 0], A[0] = 2.0 * orthonormal(out_dim, 1, 0)[:, 0], v / v.norm()
    plant(pm, name, B, A)
    dirs = D.read_directions(pm, name, k=2, top=3, tokenizer=tok, sign="both")
    assert len(dirs) == 4 and {x.via for x in dirs} == {"embedding"}
    _, _, Vh = D.lora_modules(pm, names=[name])[0].svd()
    want = "+" if float(Vh[0] @ v) > 0 else "-"
    hit = next(x for x in dirs if x.index == 0 and x.sign == want)
    assert hit.tokens[0] == tok.decode([t]).strip()
    assert hit.scores == sorted(hit.scores, reverse=True)


def test_directions_table_and_role_errors(tok, tiny_world):
    pm = fresh("llama", tok)
    t = token_id(tok, tiny_world.values["city"][0])
    name = "model.layers.1.mlp.down_proj"
    _plant_write(pm, name, pm.get_base_model().lm_head.weight[t].detach().clone())
    table = D.directions_table(pm, tok, k=1, top=3)
    assert set(table["module_type"]) == {"attn_o", "mlp_down"} and set(table["sign"]) == {"+", "-"}
    mine = table[(table.module == name) & (table["rank"] == 0)]
    assert tiny_world.values["city"][0] in set(mine["token"])
    assert len(table) == 4 * 2 * 3                             # 4 write modules × 2 signs × 3 tokens
    assert set(D.directions_table(pm, None, role="read", top=1)["module_type"]) == READ_TYPES - {
        "attn_qkv", "mlp_gate_up"}
    head = lora(build_model("llama", "tiny", tok), targets=["lm_head"])
    with pytest.raises(ConfigError, match="neither write-side"):
        D.read_directions(head, "lm_head")
    with pytest.raises(ConfigError, match="sign='x'"):
        D.read_directions(pm, name, sign="x")


def test_phi_grid_values_are_finite_numpy(tok):
    m = fresh("llama", tok, targets=["v_proj"])
    grid = D.phi_grid(m, m, "layers.0.self_attn.v_proj")
    assert isinstance(grid, np.ndarray) and grid.dtype == np.float32 and np.isfinite(grid).all()


def test_bench_svd_smoke():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_svd.py"
    spec = importlib.util.spec_from_file_location("bench_svd", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.base_shapes()["k_proj"] == (128, 256) and bench.base_shapes()["down_proj"] == (256, 768)
    row = bench.bench_one(96, 48, 4, repeats=1, device="cpu")
    assert row["max_rel_sigma_err"] < 1e-5 and row["ratio"] == pytest.approx(row["dense_s"] / row["factor_s"])
    table = bench.format_table({"rows": [{"case": "x", **row}], "meta": {"device": "cpu", "threads": 1,
                                                                      "torch": "t", "repeats": 1}})
    assert "96×48" in table


# ------------------------------------------------------------------------------------ random-matrix nulls
def _synthetic(shapes, r: int, seed: int = 0, module_type: str = "attn_q") -> list:
    g = torch.Generator().manual_seed(seed)
    return [D.ModuleDelta(name=f"m{i}", layer=i, module_type=module_type, depth=0.0,
                          B=torch.randn(o, r, generator=g), A=torch.randn(r, n, generator=g), scaling=0.5,
                          W=torch.randn(o, n, generator=g)) for i, (o, n) in enumerate(shapes)]


def test_marchenko_pastur_limits_match_the_sampled_ranks():
    # square factor (r = out): the MP law of ratio 1 gives stable rank r/4; a long A makes B @ A ~ B · sqrt(in)
    eff, stable = D.marchenko_pastur_ranks(1.0)
    assert stable == pytest.approx(0.25) and 0.79 < eff < 0.82
    sampled = D.random_lora_ranks(64, 64 * 40, 64, n_samples=8, seed=0)
    assert sampled.effective_ratio == pytest.approx(eff, abs=0.015)
    assert sampled.stable_ratio == pytest.approx(stable, abs=0.03)
    assert sampled.effective_low <= sampled.effective_ratio <= sampled.effective_high
    # ratio → 0: r directions of (almost) equal length, full ranks
    eff, stable = D.marchenko_pastur_ranks(1e-4)
    assert eff > 0.999 and stable == pytest.approx(1 / (1 + 0.01) ** 2)
    assert D.random_lora_ranks(2048, 2048, 4, n_samples=8).effective_ratio > 0.99
    # seeded: the same expectation on every machine
    assert D.random_lora_ranks(64, 256, 4, seed=3) == D.random_lora_ranks(64, 256, 4, seed=3)


@pytest.mark.parametrize("kwargs, needle", [({"rank": 9}, "rank=9 exceeds"), ({"rank": 0}, "rank=0"),
                                            ({"n_samples": 0}, "n_samples=0")])
def test_random_lora_ranks_rejects_bad_input(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        D.random_lora_ranks(**{"out_features": 8, "in_features": 16, "rank": 4, **kwargs})
    with pytest.raises(ConfigError, match="ratio=1.5"):
        D.marchenko_pastur_ranks(1.5)


def test_random_like_keeps_shapes_and_norm():
    mods = _synthetic([(32, 32), (128, 32), (32, 128)], r=4)
    total = sum(float(torch.linalg.matrix_norm(d.delta())) ** 2 for d in mods)
    rand = D.random_like(mods, seed=1, norm="total")
    assert [d.shape for d in rand] == [d.shape for d in mods] and [d.rank for d in rand] == [4, 4, 4]
    assert sum(float(torch.linalg.matrix_norm(d.delta())) ** 2 for d in rand) == pytest.approx(total, rel=1e-4)
    assert all(torch.equal(a.W, b.W) for a, b in zip(rand, mods))
    per_module = D.random_like(mods, seed=1, norm="module")
    for a, b in zip(per_module, mods):
        assert float(torch.linalg.matrix_norm(a.delta())) == pytest.approx(float(torch.linalg.matrix_norm(b.delta())),
                                                                           rel=1e-4)
    assert not torch.equal(rand[0].B, D.random_like(mods, seed=2)[0].B)
    assert torch.equal(rand[0].B, D.random_like(mods, seed=1)[0].B)
    with pytest.raises(ConfigError, match="norm='layer'"):
        D.random_like(mods, norm="layer")


def test_random_adapter_energy_follows_the_dense_size():
    """One scale for all factors: a module's expected energy is ∝ out · in · r, whatever the trained norms."""
    mods = _synthetic([(64, 64)] * 2 + [(256, 64), (64, 256)], r=16)
    size = np.array([o * n for o, n in (d.shape for d in mods)], dtype=float)
    shares = []
    for seed in range(8):
        e = np.array([float(torch.linalg.matrix_norm(d.delta())) ** 2 for d in D.random_like(mods, seed=seed)])
        shares.append(e[2:].sum() / e.sum())
    assert np.mean(shares) == pytest.approx(size[2:].sum() / size.sum(), abs=0.02)


def test_random_phi_is_max_ij_over_d_within_monte_carlo_error():
    # two random adapters of the same shapes: uniform singular vectors, so E φ(1, 1) = 1/d of the compared side
    small = _synthetic([(16, 40), (24, 40), (16, 10)], r=2, seed=0)
    large = _synthetic([(16, 40), (24, 40), (16, 10)], r=8, seed=1)
    n = 120
    null = D.random_phi(small, large, 1, 1, n_samples=n, seed=0)
    assert null.shape == (n,) and np.all((null >= 0) & (null <= 1))
    expected = np.mean([1 / 40, 1 / 40, 1 / 10])
    # four standard errors of the Monte Carlo mean
    assert abs(null.mean() - expected) < 4 * null.std(ddof=1) / math.sqrt(n)
    left = D.random_phi(small, large, 1, 1, side="left", n_samples=n, seed=0)
    assert abs(left.mean() - np.mean([1 / 16, 1 / 24, 1 / 16])) < 4 * left.std(ddof=1) / math.sqrt(n)
    # φ(1, j) of a random j-dimensional subspace: j / d
    wide = D.random_phi(small, large, 1, 8, n_samples=n, seed=0)
    assert abs(wide.mean() - np.mean([8 / 40, 8 / 40, 8 / 10])) < 4 * wide.std(ddof=1) / math.sqrt(n)
    # seeded, and the trained pair's own φ is not what is returned
    np.testing.assert_array_equal(D.random_phi(small, large, n_samples=5, seed=3),
                                  D.random_phi(small, large, n_samples=5, seed=3))
    assert D.phi_table(small, small)["phi"].mean() == pytest.approx(1.0, abs=1e-5)
    assert D.random_phi(small, small, n_samples=50).mean() < 0.2
    with pytest.raises(ConfigError, match="n_samples=0"):
        D.random_phi(small, large, n_samples=0)
    with pytest.raises(ConfigError, match="side='up'"):
        D.random_phi(small, large, side="up")
