"""fastpt.models parts: attention masks against a dense reference, rotary / ALiBi, norms, GLU,
embeddings, gradients, activation checkpointing, argument errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastpt.models import (CrossAttention, FeedForward, PatchEmbedding, RMSNorm, SelfAttention, TextEmbedding,
                           TransformerLayer, make_norm, text_encoder, vit)
from fastpt.models.embeddings import sincos_2d, sinusoidal_table
from fastpt.models.layers import alibi_slopes, apply_rotary, dense_attention_mask


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loop_mask(b, s, *, causal=False, prefix=None, lengths=None, cu=None):
    """The mask rule spelled out token by token (independent of the library's vectorised one)."""
    allowed = torch.zeros(b, s, s, dtype=torch.bool)
    docs = ([(0, cu[n], cu[n + 1] - cu[n], n) for n in range(len(cu) - 1)] if cu is not None
            else [(r, 0, lengths[r] if lengths is not None else s, r) for r in range(b)])
    for row, start, length, n in docs:
        p = prefix[n] if prefix is not None else (0 if causal else length)
        for i in range(length):
            for j in range(length):
                allowed[row, start + i, start + j] = j <= max(i, p - 1)
    return allowed


def _dense_attention(attn, x, allowed, bias=None):
    """Reference self-attention on the module's projections with a dense mask (padded rows -> 0)."""
    packed = x.dim() == 2
    xb = x[None] if packed else x
    q, k, v = attn.project(xb)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    has_key = allowed.any(-1)[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), -1) * has_key
    out = attn.out_proj(torch.einsum("bhij,bjhd->bihd", probs, v).flatten(-2))
    return out[0] if packed else out


MASKS = {
    "bidirectional": dict(),
    "causal": dict(causal=True),
    "prefix": dict(prefix_lens=torch.tensor([5, 0, 17])),
    "padding": dict(seqlens=torch.tensor([17, 9, 1])),
    "causal+padding": dict(causal=True, seqlens=torch.tensor([17, 9, 1])),
    "packed": dict(cu_seqlens=torch.tensor([0, 4, 4, 13, 17], dtype=torch.int32)),
    "packed+causal": dict(causal=True, cu_seqlens=torch.tensor([0, 4, 13, 17], dtype=torch.int32)),
    "packed+prefix": dict(cu_seqlens=torch.tensor([0, 4, 13, 17], dtype=torch.int32),
                          prefix_lens=torch.tensor([2, 9, 0])),
}


def _allowed_for(kind, b, s):
    kw = MASKS[kind]
    cu = kw.get("cu_seqlens")
    return _loop_mask(1 if cu is not None else b, s, causal=kw.get("causal", False),
                      prefix=kw["prefix_lens"].tolist() if "prefix_lens" in kw else None,
                      lengths=kw["seqlens"].tolist() if "seqlens" in kw else None,
                      cu=cu.tolist() if cu is not None else None)


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_self_attention_masks_match_dense_reference(kind, kv_heads):
    torch.manual_seed(0)
    attn = SelfAttention(40, 4, kv_heads).eval()  # head dim 10, GQA / MQA
    kw = MASKS[kind]
    x = _x(17, 40) if "cu_seqlens" in kw else _x(3, 17, 40)
    allowed = _allowed_for(kind, 3, 17)
    with torch.no_grad():
        got, want = attn(x, **kw), _dense_attention(attn, x, allowed)
    valid = allowed.any(-1)
    valid = valid[0] if x.dim() == 2 else valid
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(MASKS))
def test_dense_mask_rule_matches_loops(kind):
    kw = MASKS[kind]
    b = 1 if "cu_seqlens" in kw else 3
    allowed, valid = dense_attention_mask(b, 17, "cpu", **kw)
    want = _allowed_for(kind, 3, 17)
    assert torch.equal(allowed, want)
    assert torch.equal(valid, want.any(-1))


def _rotary_complex(x, pos, base=10000.0):
    """Rotary as complex multiplication of the pairs (i, i + D/2): the RoFormer definition."""
    d = x.shape[-1]
    freqs = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones((), dtype=torch.float64), pos.double()[..., None] * freqs)[..., None, :]
    return torch.cat([z.real, z.imag], -1).float()


def test_rotary_matches_complex_form_and_is_relative():
    q, pos = _x(2, 11, 3, 8), torch.arange(11).expand(2, 11)
    torch.testing.assert_close(apply_rotary(q, pos), _rotary_complex(q, pos), rtol=1e-5, atol=1e-5)
    # q(m) . k(n) depends only on m - n
    a, b = _x(1, 1, 1, 8, seed=1), _x(1, 1, 1, 8, seed=2)
    dots = [(apply_rotary(a, torch.tensor([[m]])) * apply_rotary(b, torch.tensor([[m - 3]]))).sum() for m in (3, 7, 40)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["rotary", "alibi"])
def test_position_in_attention_reference_and_packing(position):
    torch.manual_seed(0)
    attn = SelfAttention(48, 6, 2, position=position).eval()  # 6 heads: ALiBi's non-power-of-two slopes
    x = _x(2, 13, 48)
    lengths = torch.tensor([13, 6])
    allowed = _loop_mask(2, 13, causal=True, lengths=lengths.tolist())
    with torch.no_grad():
        got = attn(x, causal=True, seqlens=lengths)
        if position == "rotary":
            q, k, v = attn.project(x)
            pos = torch.arange(13)
            ref_attn = SelfAttention(48, 6, 2).eval()
            ref_attn.load_state_dict(attn.state_dict())
            ref_attn.project = lambda h: (apply_rotary(q, pos), apply_rotary(k, pos), v)
            want = _dense_attention(ref_attn, x, allowed)
        else:
            slopes = alibi_slopes(6)
            dist = (torch.arange(13)[None, :] - torch.arange(13)[:, None]).abs()
            want = _dense_attention(attn, x, allowed, bias=-slopes[:, None, None] * dist)
        valid = torch.arange(13)[None] < lengths[:, None]
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
        # packed documents: positions restart per document, so each equals its own unpacked run
        cu = torch.tensor([0, 13, 19], dtype=torch.int32)
        packed = attn(torch.cat([x[0], x[1, :6]]), causal=True, cu_seqlens=cu)
        torch.testing.assert_close(packed[:13], got[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[13:], attn(x[1:, :6], causal=True)[0], rtol=1e-5, atol=1e-5)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(6).shape == (6,) and bool((alibi_slopes(12) > 0).all())


def test_rmsnorm_and_make_norm():
    x = _x(3, 5, 24)
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(_x(24, seed=1))
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)
    half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, rtol=2e-2, atol=2e-2)
    assert isinstance(make_norm("layernorm", 8), torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm.*'layernorm', 'rmsnorm'"):
        make_norm("batchnorm", 8)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu"])
def test_feed_forward(activation):
    ff = FeedForward(24, 37, activation)
    x = _x(3, 24)
    h = ff.fc1(x)
    if activation in ("swiglu", "geglu"):
        assert ff.fc1.out_features == 74
        a, b = h[:, :37], h[:, 37:]
        h = (F.silu(a) if activation == "swiglu" else F.gelu(a)) * b
    else:
        h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
             "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))
             }[activation](h)
    torch.testing.assert_close(ff(x), ff.fc2(h), rtol=1e-5, atol=1e-6)


def test_text_embedding_factorised_sinusoidal_and_roberta_positions():
    emb = TextEmbedding(101, 32, 64, embed_dim=12, type_vocab_size=2, pad_token_id=0)
    assert emb.word_embeddings.weight.shape == (101, 12) and emb.projection.weight.shape == (32, 12)
    ids = torch.randint(1, 101, (3, 17))
    assert emb(ids).shape == (3, 17, 32)

    sin = sinusoidal_table(torch.arange(5), 7)
    i = torch.arange(7) // 2
    angle = torch.arange(5)[:, None] / 10000 ** (2 * i / 7)
    torch.testing.assert_close(sin, torch.where(torch.arange(7) % 2 == 0, angle.sin(), angle.cos()))

    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
    pad = 1
    rob = TextEmbedding(101, 16, 40, pad_token_id=pad, position_offset=pad + 1)
    ids = torch.randint(2, 101, (3, 17))
    ids[1, 9:] = pad
    ids[2, 3] = pad  # a pad in the middle keeps its pad position, as in Hugging Face
    assert torch.equal(rob.position_ids(ids), RobertaEmbeddings.create_position_ids_from_input_ids(ids, pad))
    with pytest.raises(ValueError, match="input_ids.*max_positions"):
        rob(torch.randint(2, 101, (1, 39)))
    with pytest.raises(ValueError, match="token_type_ids"):
        rob(ids, token_type_ids=torch.zeros_like(ids))


def test_patch_embedding_multispectral_and_sincos():
    pe = PatchEmbedding((24, 16), 8, in_channels=10, dim=32, position="sincos")
    assert pe.num_patches == 6 and pe(_x(2, 10, 24, 16)).shape == (2, 7, 32)
    assert pe(_x(2, 10, 24, 16), ids_keep=torch.tensor([[0, 5], [3, 1]])).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="pixel_values"):
        pe(_x(2, 3, 24, 16))

    def mae_1d(d, pos):  # MAE's get_1d_sincos_pos_embed_from_grid, in numpy
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(4, dtype=np.float32), np.arange(3, dtype=np.float32))  # (w, h) as MAE
    want = np.concatenate([mae_1d(16, grid[0]), mae_1d(16, grid[1])], axis=1)
    table = sincos_2d(32, (3, 4), cls_token=True)
    assert torch.equal(table[0, 0], torch.zeros(32))
    torch.testing.assert_close(table[0, 1:], torch.from_numpy(want).float())


def test_cross_attention_matches_reference():
    ca = CrossAttention(32, 4, kv_dim=24).eval()
    x, mem = _x(2, 5, 32), _x(2, 7, 24, seed=1)
    mask = torch.tensor([[1] * 7, [1, 0, 1, 1, 0, 0, 1]])
    q = ca.q_proj(x).unflatten(-1, (4, 8))
    k, v = ca.kv_proj(mem).unflatten(-1, (2, 4, 8)).unbind(2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    want = ca.out_proj(torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).flatten(-2))
    torch.testing.assert_close(ca(x, mem, mask), want, rtol=1e-5, atol=1e-5)


def test_layer_composition_pre_and_post_norm():
    attn, mlp = SelfAttention(24, 3).eval(), FeedForward(24, 40)
    n1, n2 = make_norm("rmsnorm", 24), make_norm("layernorm", 24)
    x = _x(2, 9, 24)
    pre = TransformerLayer(attn, mlp, n1, n2, pre_norm=True)
    h = x + attn(n1(x))
    torch.testing.assert_close(pre(x), h + mlp(n2(h)))
    post = TransformerLayer(attn, mlp, n1, n2, pre_norm=False)
    h = n1(x + attn(x))
    torch.testing.assert_close(post(x), n2(h + mlp(h)))


def _odd_encoder(**kw):
    return text_encoder(vocab_size=97, hidden_size=40, num_layers=2, num_heads=5, intermediate_size=37,
                        dropout=0.1, attention_dropout=0.1, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(position="rotary", pre_norm=True, norm="rmsnorm", activation="swiglu",
                                             num_kv_heads=1, type_vocab_size=0, embed_dim=16),
                                dict(position="alibi", causal=True, pre_norm=True, activation="geglu")],
                         ids=["bert", "llama-like", "alibi"])
def test_gradients_flow_and_checkpointing_is_exact(kw):
    model = _odd_encoder(**kw).train()
    for layer in model.layers:  # with dropout on CPU the dispatcher picks Triton, interpreted here: slow
        layer.attn.backend = "reference"
    ids = torch.randint(1, 97, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 11:] = 0

    def grads(ckpt):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout masks (attention dropout included) in both runs
        out = model(ids, mask).last_hidden_state
        (out * mask[..., None]).square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out0, g0 = grads(False)
    out1, g1 = grads(True)
    assert torch.equal(out0, out1)
    for name, g in g0.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        torch.testing.assert_close(g1[name], g, rtol=0, atol=0)


def test_vision_checkpointing_is_exact():
    model = vit(image_size=16, patch_size=4, in_channels=2, hidden_size=24, num_layers=2, num_heads=3,
                dropout=0.1).train()
    x = _x(2, 2, 16, 16)

    def grads(ckpt):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(3)
        model(x).last_hidden_state.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g0, g1 = grads(False), grads(True)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(position="relative"), "position"),
    (dict(activation="gelu2"), "activation"),
    (dict(norm="batchnorm"), "norm"),
    (dict(num_heads=7), "hidden_size"),
    (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(dropout=1.5), "dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(num_layers=-1), "num_layers"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(pad_token_id=500), "pad_token_id"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_builder_errors_name_the_argument(kwargs, name):
    args = dict(vocab_size=97, hidden_size=40, num_layers=1, num_heads=5) | kwargs
    with pytest.raises((ValueError, TypeError), match=rf"^{name}:"):
        text_encoder(**args)


def test_forward_errors_name_the_argument():
    model = _odd_encoder().eval()
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask.*right padding"):
        model(torch.randint(1, 97, (2, 3)), left_padded)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(1, 97, (2, 3)), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="position"):
        SelfAttention(30, 5, position="rotary")  # head dim 6 is fine ...
        SelfAttention(15, 5, position="rotary")  # ... 3 is odd
    with pytest.raises(ValueError, match="pixel_values"):
        vit(image_size=16, patch_size=4, hidden_size=24, num_layers=1, num_heads=3)(_x(1, 3, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        vit(image_size=18, patch_size=4, hidden_size=24, num_layers=1, num_heads=3)
