"""vforge.layers: closed forms, equivalences between attention kinds, simplex maps, embeddings, norms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vforge.layers import attention as attention_module
from vforge.layers.activations import (
    ACTIVATIONS,
    GLU_ACTIVATIONS,
    entmax15,
    get_activation,
    get_simplex_map,
    glu_factor,
    sparsemax,
)
from vforge.layers.attention import (
    ATTENTIONS,
    GroupedQueryAttention,
    LinearAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    SlidingWindowAttention,
    attend,
    get_attention,
)
from vforge.layers.blocks import DropPath, FeedForward, TransformerBlock
from vforge.layers.embeddings import (
    CategoricalEmbeddings,
    FeatureTokenizer,
    FlatInput,
    LinearEmbeddings,
    PeriodicEmbeddings,
    PiecewiseLinearEncoding,
    get_num_embeddings,
)
from vforge.layers.norms import (
    AdaptiveLayerNorm,
    ConditionalLayerNorm,
    GhostBatchNorm,
    LayerScale,
    QKNorm,
    get_norm,
)

D, HEADS = 32, 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _same_weights(target: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    target.load_state_dict(source.state_dict())  # strict: the kinds share parameter names and shapes
    return target.eval()


# --- activations ---------------------------------------------------------------------------------------------------

def test_sixteen_activations_build_and_keep_or_halve_the_width():
    assert len(ACTIVATIONS) == 16
    x = torch.randn(4, 3, 2 * D)
    for name in ACTIVATIONS:
        out = get_activation(name, d=2 * D if name not in GLU_ACTIVATIONS else D)(x)
        expected = D if name in GLU_ACTIVATIONS else 2 * D
        assert out.shape == (4, 3, expected), name
        assert glu_factor(name) == (2 if name in GLU_ACTIVATIONS else 1)
        assert torch.isfinite(out).all(), name


def test_glu_activations_match_their_closed_forms():
    x = torch.randn(5, 2 * D)
    a, b = x[:, :D], x[:, D:]
    torch.testing.assert_close(get_activation("reglu")(x), a * F.relu(b))
    torch.testing.assert_close(get_activation("geglu")(x), a * F.gelu(b))
    torch.testing.assert_close(get_activation("swiglu")(x), a * F.silu(b))
    with pytest.raises(ValueError, match="even last dimension"):
        get_activation("swiglu")(torch.randn(2, 3))


def test_pointwise_activations_match_their_closed_forms():
    x = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(get_activation("lisht")(x), x * torch.tanh(x))
    torch.testing.assert_close(get_activation("squared_relu")(x), F.relu(x) ** 2)
    torch.testing.assert_close(get_activation("star")(x), 0.8944 * F.relu(x) ** 2 - 0.4472)
    # ACON-C at its initialisation (p1=1, p2=0, beta=1) is Swish / SiLU; with a large beta it tends to ReLU.
    acon = get_activation("acon_c", d=61)
    torch.testing.assert_close(acon(x), F.silu(x))
    torch.nn.init.constant_(acon.beta, 1e4)
    torch.testing.assert_close(acon(x), F.relu(x))
    # Meta-ACON whose generated beta is sigmoid(50) = 1 for every row is ACON-C at beta = 1.
    meta = get_activation("meta_acon", d=61)
    torch.nn.init.zeros_(meta.beta_net[1].weight)
    torch.nn.init.constant_(meta.beta_net[1].bias, 50.0)
    torch.testing.assert_close(meta(x[None])[0], F.silu(x))


def test_activation_lookup_errors_list_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'swishglu'; valid names: relu, gelu.*swiglu"):
        get_activation("swishglu")
    with pytest.raises(ValueError, match="meta_acon needs the feature width"):
        get_activation("meta_acon")


# --- sparsemax / entmax ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [sparsemax, entmax15], ids=["sparsemax", "entmax15"])
def test_simplex_maps_land_on_the_simplex(fn):
    z = torch.randn(200, 17) * 3
    p = fn(z)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(200))
    assert (p == 0).any(), "expected exact zeros for spread-out logits"
    # Invariant to shifting the logits, and order-preserving.
    torch.testing.assert_close(fn(z + 5.0), p)
    i = z.argmax(-1)
    assert (p.argmax(-1) == i).all()


def test_sparsemax_reference_values():
    torch.testing.assert_close(sparsemax(torch.tensor([0.5, 0.0])), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(sparsemax(torch.tensor([1.0, 0.0])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(sparsemax(torch.tensor([0.2, 0.2, 0.2])), torch.full((3,), 1 / 3))
    # Projection property: sparsemax(z) is the closest simplex point, so it beats a random simplex point.
    z = torch.randn(50, 6)
    p, q = sparsemax(z), torch.softmax(torch.randn(50, 6), -1)
    assert ((p - z).norm(dim=-1) <= (q - z).norm(dim=-1) + 1e-6).all()


def test_entmax15_matches_a_bisection_solution():
    z = torch.randn(30, 9, dtype=torch.float64) * 2
    half = z / 2
    lo, hi = half.max(-1, keepdim=True).values - 1, half.max(-1, keepdim=True).values
    for _ in range(100):  # find tau with sum(relu(z/2 - tau)^2) = 1
        tau = (lo + hi) / 2
        too_big = ((half - tau).clamp_min(0) ** 2).sum(-1, keepdim=True) < 1
        hi, lo = torch.where(too_big, tau, hi), torch.where(too_big, lo, tau)
    torch.testing.assert_close(entmax15(z), (half - tau).clamp_min(0) ** 2)


@pytest.mark.parametrize("fn", [sparsemax, entmax15], ids=["sparsemax", "entmax15"])
def test_simplex_map_gradients_are_exact(fn):
    z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (z,))


def test_simplex_map_lookup():
    assert get_simplex_map("entmax15") is entmax15
    with pytest.raises(ValueError, match="valid names: softmax, sparsemax, entmax15"):
        get_simplex_map("entmax")


# --- attention ---------------------------------------------------------------------------------------------------

def test_grouped_query_with_groups_equal_heads_equals_multi_head():
    x = torch.randn(4, 12, D)
    mha = MultiHeadAttention(d_embedding=D, n_heads=HEADS).eval()
    gqa = _same_weights(GroupedQueryAttention(d_embedding=D, n_heads=HEADS, n_kv_heads=HEADS), mha)
    torch.testing.assert_close(gqa(x), mha(x))


def test_multi_query_equals_grouped_query_with_one_group():
    x = torch.randn(4, 12, D)
    mqa = MultiQueryAttention(d_embedding=D, n_heads=HEADS).eval()
    gqa = _same_weights(GroupedQueryAttention(d_embedding=D, n_heads=HEADS, n_kv_heads=1), mqa)
    torch.testing.assert_close(gqa(x), mqa(x))
    assert mqa.qkv.out_features == D + 2 * (D // HEADS)  # one key/value head


def test_sliding_window_wider_than_the_sequence_equals_full_attention():
    x = torch.randn(4, 12, D)
    mha = MultiHeadAttention(d_embedding=D, n_heads=HEADS).eval()
    swa = _same_weights(SlidingWindowAttention(d_embedding=D, n_heads=HEADS, window=12), mha)
    torch.testing.assert_close(swa(x), mha(x))
    narrow = _same_weights(SlidingWindowAttention(d_embedding=D, n_heads=HEADS, window=2), mha)
    assert not torch.allclose(narrow(x), mha(x))


def test_sliding_window_only_sees_its_neighbours():
    swa = SlidingWindowAttention(d_embedding=D, n_heads=HEADS, window=2).eval()
    x = torch.randn(1, 12, D)
    y = x.clone()
    y[0, 8:] += 10.0  # change tokens 8.. : outputs at positions <= 5 must not move
    out_x, out_y = swa(x), swa(y)
    torch.testing.assert_close(out_x[0, :6], out_y[0, :6])
    assert not torch.allclose(out_x[0, 6], out_y[0, 6])


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_explicit_attention_path_equals_sdpa(n_kv_heads, masked):
    q = torch.randn(3, HEADS, 12, 4)
    k, v = torch.randn(2, 3, n_kv_heads, 12, 4)
    mask = (torch.arange(12)[:, None] - torch.arange(12)[None]).abs() <= 3 if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv_heads != HEADS)
    torch.testing.assert_close(attend(q, k, v, mask=mask), expected)


def _plain_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v written out, key/value heads repeated for their query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1) @ v


@pytest.mark.parametrize("n_tokens", [12, attention_module.SDPA_MIN_TOKENS])  # explicit matmuls / SDPA
@pytest.mark.parametrize("n_kv_heads", [HEADS, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_both_attention_paths_equal_the_plain_math_in_float64_with_gradients(n_tokens, n_kv_heads, masked):
    gen = torch.Generator().manual_seed(n_tokens + n_kv_heads + masked)
    q = torch.randn(3, HEADS, n_tokens, 4, dtype=torch.float64, generator=gen)
    k, v = torch.randn(2, 3, n_kv_heads, n_tokens, 4, dtype=torch.float64, generator=gen)
    mask = (torch.arange(n_tokens)[:, None] - torch.arange(n_tokens)[None]).abs() <= 3 if masked else None
    grad_out = torch.randn(3, HEADS, n_tokens, 4, dtype=torch.float64, generator=gen)
    results = []
    for fn in (attend, _plain_attention):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, mask=mask) if fn is attend else fn(*inputs, mask)
        out.backward(grad_out)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)


def _attention_and_grads(att, x, n_queries, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks on both paths
    out = att(x[:, :n_queries], x) if n_queries else att(x)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed)))
    grads = [out.detach(), x.grad] + [p.grad for p in att.parameters()]
    att.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", ["multi_head", "grouped_query", "multi_query", "sliding_window"])
@pytest.mark.parametrize("n_queries", [None, 3, 1])  # self-attention; cross-attention of a prefix; CLS only
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_projected_attention_equals_the_autograd_path_with_gradients(monkeypatch, kind, n_queries, dropout):
    """MultiHeadAttention's fused path (attend_projected, backward written out) against the same module through
    attend and autograd, in float64 over 11 tokens: outputs, input and parameter gradients; and, without dropout,
    against the plain softmax math."""
    extra = {"n_kv_heads": 2} if kind == "grouped_query" else {"window": 2} if kind == "sliding_window" else {}
    att = get_attention(kind, d_embedding=D, n_heads=HEADS, dropout=dropout, **extra).double().train()
    x = torch.randn(5, 11, D, dtype=torch.float64)
    calls = []
    real = attention_module._ProjectedAttention.apply
    monkeypatch.setattr(attention_module._ProjectedAttention, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _attention_and_grads(att, x, n_queries, seed=3)
    assert calls == [1]  # the fused path ran
    monkeypatch.setattr(type(att), "_fused", lambda self, n_kv, device: False)
    reference = _attention_and_grads(att, x, n_queries, seed=3)
    assert len(calls) == 1
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    if not dropout:  # the plain math, heads split by hand
        n_q = n_queries or 11
        q, kv = att.qkv(x).split([D, att.qkv.out_features - D], dim=-1)
        q = q[:, :n_q].reshape(5, n_q, HEADS, D // HEADS).transpose(1, 2)
        k, v = kv.reshape(5, 11, 2, att.n_kv_heads, D // HEADS).permute(2, 0, 3, 1, 4)
        window = extra.get("window", 11)
        mask = (torch.arange(n_q)[:, None] - torch.arange(11)[None]).abs() <= window
        plain = _plain_attention(q, k, v, mask).transpose(1, 2).reshape(5, n_q, D)
        torch.testing.assert_close(fused[0], att.out(plain).detach(), atol=1e-12, rtol=1e-12)


def test_projected_attention_without_gradients_is_the_same_function():
    att = MultiHeadAttention(d_embedding=D, n_heads=HEADS, dropout=0.2).train()
    x = torch.randn(4, 9, D)
    torch.manual_seed(1)
    with_grad = att(x)
    assert with_grad.grad_fn is not None
    torch.manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(att(x), with_grad.detach(), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not att._fused(9, x.device)  # autocast's dtypes stay autograd's: the attend path


def test_long_sequences_take_the_sdpa_path(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = k = v = torch.randn(1, 2, attention_module.SDPA_MIN_TOKENS, 4)
    attend(q, k, v)
    attend(q[:, :, :12], k[:, :, :12], v[:, :, :12])
    assert len(calls) == 1


def test_attention_dropout_is_inverted_dropout():
    q = k = torch.zeros(1, 1, 12, 4)  # uniform weights 1/12
    v = torch.ones(1, 1, 12, 4)
    out = attend(q, k, v, dropout_p=0.5)
    # Each output is (kept weights) * 2 summed: mean over many keys ~ 1; values are multiples of 2/12.
    torch.testing.assert_close(out * 6, (out * 6).round())


def test_linear_attention_matches_the_naive_formula():
    att = LinearAttention(d_embedding=D, n_heads=HEADS).eval()
    x = torch.randn(2, 10, D)
    q, kv = att.qkv(x).split([D, 2 * D], dim=-1)
    k, v = kv.view(2, 10, 2, HEADS, D // HEADS).unbind(2)
    q, k, v = (t.reshape(2, 10, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    sim = fq @ fk.transpose(-1, -2)  # (batch, heads, n, n), non-negative "attention"
    naive = (sim / sim.sum(-1, keepdim=True)) @ v
    expected = att.out(naive.transpose(1, 2).reshape(2, 10, D))
    torch.testing.assert_close(att(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_cross_attention_with_a_prefix_of_queries_equals_self_attention_rows(name):
    extra = {"n_kv_heads": 2} if name == "grouped_query" else {"window": 3} if name == "sliding_window" else {}
    att = get_attention(name, d_embedding=D, n_heads=HEADS, qk_norm=name == "multi_head", **extra).eval()
    x = torch.randn(3, 12, D)
    torch.testing.assert_close(att(x[:, :2], x), att(x)[:, :2], atol=1e-5, rtol=1e-4)
    assert att(x[:, :1], torch.randn(3, 20, D)).shape == (3, 1, D)  # true cross-attention over other tokens


def test_attention_lookup_errors():
    with pytest.raises(ValueError, match=r"unknown attention 'flash'; valid names: multi_head, multi_query"):
        get_attention("flash", d_embedding=D, n_heads=HEADS)
    with pytest.raises(ValueError, match="needs n_kv_heads"):
        get_attention("grouped_query", d_embedding=D, n_heads=HEADS)
    with pytest.raises(ValueError, match="window=3 only applies to attention SlidingWindowAttention"):
        get_attention("multi_head", d_embedding=D, n_heads=HEADS, window=3)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(d_embedding=30, n_heads=8)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GroupedQueryAttention(d_embedding=D, n_heads=8, n_kv_heads=3)


# --- norms ---------------------------------------------------------------------------------------------------------

def test_ghost_batch_norm_normalizes_each_virtual_batch():
    gbn = GhostBatchNorm(5, virtual_batch_size=16)
    x = torch.randn(48, 5) * 3 + torch.arange(48.0)[:, None]  # the three chunks have different means
    out = gbn(x)
    for chunk in out.split(16):
        torch.testing.assert_close(chunk.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    assert not torch.allclose(out, F.batch_norm(x, None, None, training=True), atol=1e-3)
    gbn.eval()  # eval: the running statistics, row by row
    torch.testing.assert_close(gbn(x[:1]), gbn(x)[:1])


def test_conditional_norms_start_as_layer_norm_and_then_condition():
    x = torch.randn(4, 6, 8)
    plain = F.layer_norm(x, (8,))
    ada = AdaptiveLayerNorm(8, d_cond=3)
    torch.testing.assert_close(ada(x, torch.randn(4, 3)), plain)
    cln = ConditionalLayerNorm(8, n_conditions=2)
    torch.testing.assert_close(cln(x, torch.tensor([0, 1, 1, 0])), plain)
    with torch.no_grad():
        cln.gain.weight[1] = 2.0
    out = cln(x, torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(out[1], 2 * plain[1])
    torch.testing.assert_close(out[0], plain[0])


def test_layer_scale_and_qk_norm():
    torch.testing.assert_close(LayerScale(4, init=0.1)(torch.ones(2, 4)), torch.full((2, 4), 0.1))
    q, k = QKNorm(8)(torch.randn(2, 4, 5, 8) * 7, torch.randn(2, 1, 5, 8) * 0.1)
    for t in (q, k):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), atol=1e-3, rtol=1e-3)


def test_norm_lookup():
    for name in ("layernorm", "rmsnorm", "batchnorm", "ghost_batchnorm", "identity"):
        assert get_norm(name, 8)(torch.randn(4, 3, 8) if name != "ghost_batchnorm" else torch.randn(4, 8)).shape[-1] == 8
    with pytest.raises(ValueError, match="unknown norm 'rms'; valid names: layernorm, rmsnorm"):
        get_norm("rms", 8)


# --- embeddings ----------------------------------------------------------------------------------------------------

def test_linear_and_periodic_embeddings_closed_forms():
    x = torch.randn(5, 3)
    lin = LinearEmbeddings(3, 4)
    torch.testing.assert_close(lin(x), x[..., None] * lin.weight + lin.bias)
    per = PeriodicEmbeddings(3, 4, n_frequencies=6, sigma=0.5, lite=True)
    angle = 2 * torch.pi * per.frequencies * x[..., None]
    expected = F.relu(per.linear(torch.cat([torch.cos(angle), torch.sin(angle)], -1)))
    torch.testing.assert_close(per(x), expected)
    assert PeriodicEmbeddings(3, 4)(x).shape == (5, 3, 4)
    assert (per.frequencies.abs() <= 1.5 + 1e-6).all()  # truncated at 3 sigma


def test_piecewise_linear_encoding_reference_values():
    ple = PiecewiseLinearEncoding(1, n_bins=3)
    ple.edges.copy_(torch.tensor([[0.0, 1.0, 2.0, 4.0]]))
    x = torch.tensor([[-1.0], [0.5], [1.5], [3.0], [6.0]])
    expected = torch.tensor([[-1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 1.0, 0.5], [1.0, 1.0, 2.0]])
    torch.testing.assert_close(ple(x)[:, 0], expected)
    data = torch.rand(1000, 2) * torch.tensor([1.0, 10.0])
    ple2 = PiecewiseLinearEncoding(2, n_bins=4)
    ple2.fit_bins(data)
    torch.testing.assert_close(ple2.edges[1], torch.tensor([0.0, 2.5, 5.0, 7.5, 10.0]), atol=0.4, rtol=0)
    assert "edges" in ple2.state_dict()


def test_categorical_embeddings_are_one_table_per_feature():
    emb = CategoricalEmbeddings([3, 5], 4)
    x = torch.tensor([[0, 0], [2, 4]])
    out = emb(x)
    torch.testing.assert_close(out[1, 1], emb.embeddings.weight[3 + 4])
    assert not torch.equal(out[0, 0], out[0, 1])  # category 0 of each feature is a different row


def test_feature_tokenizer_and_flat_input_shapes():
    tok = FeatureTokenizer(4, [3, 5], 8, num_embeddings="piecewise_linear")
    assert tok(torch.randn(2, 4), torch.tensor([[0, 1], [2, 4]])).shape == (2, 1 + 4 + 2, 8) and tok.n_tokens == 7
    with pytest.raises(ValueError, match="pass x_cat"):
        tok(torch.randn(2, 4), None)
    flat = FlatInput(4, [3], 2, num_embeddings="periodic", d_num_embedding=6)
    assert flat(torch.randn(2, 4), torch.tensor([[0], [2]])).shape == (2, flat.d_out) == (2, 4 * 6 + 2)
    with pytest.raises(ValueError, match="unknown numeric embeddings 'plr'; valid names: linear, periodic"):
        get_num_embeddings("plr", n_features=3, d_embedding=4)


# --- blocks --------------------------------------------------------------------------------------------------------

def test_drop_path_drops_whole_rows_and_keeps_the_mean():
    dp = DropPath(0.25)
    x = torch.ones(4000, 3)
    out = dp(x)
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert (out == out[:, :1]).all()
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(dp.eval()(x), x)


def test_parallel_block_matches_its_formula_and_glu_ffn_width():
    att = MultiHeadAttention(d_embedding=D, n_heads=HEADS)
    block = TransformerBlock(D, att, ffn_d_hidden=16, ffn_activation="swiglu", parallel=True).eval()
    assert block.ffn.linear1.out_features == 32 and block.ffn.linear2.in_features == 16
    x = torch.randn(2, 5, D)
    h = block.attention_norm(x)
    torch.testing.assert_close(block(x), x + att(h) + block.ffn(h))
    torch.testing.assert_close(block(x, n_queries=1), block(x)[:, :1], atol=1e-5, rtol=1e-4)
    ffn = FeedForward(D, 8, activation="relu")
    assert ffn(torch.randn(3, D)).shape == (3, D)
    assert copy.deepcopy(block) is not None


def test_cheap_dropout_masks_keep_their_probability_and_rescale():
    from vforge.layers.dropout import Dropout, keep_mask

    mask, keep = keep_mask((300_001,), 0.2)
    assert keep == 1 - round(0.2 * 2**16) / 2**16 and abs(keep - 0.8) < 2**-17 and mask.shape == (300_001,)
    # 300k Bernoulli(0.8) draws: the kept share is within 5 standard errors (0.0036) of 0.8.
    assert abs(mask.mean().item() - 0.8) < 0.0036
    # The four 16-bit lanes of a draw (neighbouring elements) each keep 0.8 and are independent: pairs of lanes are
    # kept together as often as chance says (0.64; 75k pairs, 5 standard errors 0.009).
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    lanes = mask[: 4 * 75_000].view(-1, 4)
    assert torch.allclose(lanes.mean(0), torch.full((4,), 0.8), atol=0.0075)
    for i, j in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert abs((lanes[:, i] * lanes[:, j]).mean().item() - 0.64) < 0.009
    drop = Dropout(0.2)
    x = torch.ones(1000, 100)
    y = drop(x)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1.0 / keep)]
    assert torch.equal(drop.eval()(x), x)
