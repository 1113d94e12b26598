"""fastpt.nn.MultiheadSelfAttention and TransformerEncoderLayer against torch's modules."""
import pytest
import torch
import torch.nn.functional as F

import fastpt
from fastpt.nn import MultiheadSelfAttention, TransformerEncoderLayer


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pair(norm_first, activation="gelu", d=64, heads=4, ff=96):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, activation=activation, batch_first=True,
                                           norm_first=norm_first).eval()
    ours = TransformerEncoderLayer(d, heads, ff, dropout=0.1, activation=activation, norm_first=norm_first).eval()
    ours.load_state_dict(ref.state_dict())  # strict: every name and shape matches
    return ref, ours


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("mask", ["none", "padding", "causal", "causal+padding", "src_mask"])
def test_encoder_layer_matches_torch(norm_first, activation, mask):
    ref, ours = _pair(norm_first, activation)
    s = 21
    x = _x(3, s, 64)
    lengths = torch.tensor([s, 9, 14])
    pad = torch.arange(s)[None, :] >= lengths[:, None]  # torch: True = padding
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)  # torch bool masks: True = not allowed
    ref_kw, our_kw = {}, {}
    if "padding" in mask:
        ref_kw["src_key_padding_mask"] = our_kw["src_key_padding_mask"] = pad
    if mask.startswith("causal"):
        ref_kw |= dict(src_mask=causal, is_causal=True)
        our_kw["is_causal"] = True
    if mask == "src_mask":  # a general mask: torch's SDPA serves it
        general = _x(s, s, seed=1) > 0.5
        general.fill_diagonal_(False)  # torch bool masks: True = not allowed
        ref_kw["src_mask"] = our_kw["src_mask"] = general
    with torch.no_grad():
        want, got = ref(x, **ref_kw), ours(x, **our_kw)
    valid = ~pad if "padding" in mask else torch.ones_like(pad)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_encoder_layer_trains_and_rejects_what_it_cannot_do():
    layer = TransformerEncoderLayer(32, 4, 64, dropout=0.1)
    x = _x(2, 11, 32).requires_grad_()
    torch.manual_seed(3)
    a = layer(x, is_causal=True)
    torch.manual_seed(3)
    b = layer(x, is_causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout (attention and MLP) follows torch.manual_seed
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with pytest.raises(ValueError, match="batch_first"):
        TransformerEncoderLayer(32, 4, batch_first=False)
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(32, 4, activation="swish")
    left = torch.tensor([[True, False, False] + [False] * 8, [False] * 11])
    with pytest.raises(ValueError, match="src_key_padding_mask: only right padding"):
        layer(x, src_key_padding_mask=left)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=str)
def test_encoder_layer_per_head_src_mask(dtype):
    """torch's 3-D src_mask (B * nhead, S, S): one mask per row and head, as torch's layer takes it;
    a wrong leading size names src_mask."""
    ref, ours = _pair(False)
    b, s, h = 2, 13, 4
    x = _x(b, s, 64)
    mask = _x(b * h, s, s, seed=2) > 0.4  # torch bool masks: True = not allowed
    mask[:, torch.arange(s), torch.arange(s)] = False
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, src_mask=mask), ref(x, src_mask=mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"src_mask: a 3-D mask is \(batch \* nhead, S, S\) = \(8, S, S\)"):
        ours(x, src_mask=mask[:3])
    with pytest.raises(ValueError, match="attn_mask: expected a shape broadcastable to"):
        ours.self_attn(x, attn_mask=torch.ones(3, 1, s, s, dtype=torch.bool))


def test_encoder_layer_stacks_in_torch_encoder_and_takes_unbatched_input():
    """torch.nn.TransformerEncoder reads layers[0].self_attn.batch_first (it raised AttributeError), and
    torch's layer takes an unbatched (S, E) src with an (S,) padding mask."""
    ref, ours = _pair(False)
    x = _x(2, 13, 64)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, 9:] = True
    ref_stack = torch.nn.TransformerEncoder(ref, 2, enable_nested_tensor=False).eval()
    ours_stack = torch.nn.TransformerEncoder(ours, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        want, got = ref_stack(x, src_key_padding_mask=pad), ours_stack(x, src_key_padding_mask=pad)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1, :9], want[1, :9], rtol=1e-5, atol=1e-5)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(13)
        torch.testing.assert_close(ours_stack(x, mask=causal, is_causal=True), ref_stack(x, mask=causal, is_causal=True),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x[1]), ref(x[1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x[1], src_key_padding_mask=pad[1])[:9],
                                   ref(x[1], src_key_padding_mask=pad[1])[:9], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"src_key_padding_mask: an unbatched src \(S, E\) takes an \(S,\) mask"):
        ours(x[1], src_key_padding_mask=pad)


def test_head_dims_past_the_kernels_run_torchs_attention():
    """torch's layer takes any head dim; fastpt's raised past the kernels' 256 (nhead=1, d_model=320):
    plain, padded and causal rows now run torch's SDPA with a dense mask."""
    ref, ours = _pair(False, d=320, heads=1, ff=64)
    x = _x(2, 7, 320)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, src_key_padding_mask=pad)[1, :5], ref(x, src_key_padding_mask=pad)[1, :5],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, src_mask=causal, is_causal=True), ref(x, src_mask=causal, is_causal=True),
                                   rtol=1e-5, atol=1e-5)


def test_self_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(48, 6, batch_first=True).eval()
    ours = MultiheadSelfAttention(48, 6).eval()
    ours.load_state_dict(ref.state_dict())
    x = _x(2, 13, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_gqa_shapes_and_packed_equals_padded():
    """GQA parameters, (B, S, E) and packed (T, E) inputs; packed documents equal the same
    sequences right-padded in a batch, and an HF attention_mask equals seqlens."""
    torch.manual_seed(0)
    m = MultiheadSelfAttention(64, 8, num_kv_heads=2, causal=True).eval()
    assert m.in_proj_weight.shape == ((8 + 2 * 2) * 8, 64) and m.out_proj.weight.shape == (64, 64)
    lengths = [7, 1, 12]
    docs = [_x(n, 64, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    out_packed = m(packed, cu_seqlens=cu)
    assert out_packed.shape == (20, 64)
    padded = torch.zeros(3, 12, 64)
    for i, d in enumerate(docs):
        padded[i, :len(d)] = d
    seqlens = torch.tensor(lengths)
    out_padded = m(padded, seqlens=seqlens)
    assert out_padded.shape == (3, 12, 64)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(out_packed[a:b], out_padded[i, :b - a], rtol=1e-5, atol=1e-5)
    hf_mask = (torch.arange(12)[None, :] < seqlens[:, None]).long()
    torch.testing.assert_close(m(padded, attention_mask=hf_mask), out_padded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention_mask: only right padding"):
        m(padded, attention_mask=hf_mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask: give either"):
        m(padded, attention_mask=hf_mask, seqlens=seqlens)


def test_self_attention_prefix_lm_matches_dense_mask():
    """prefix_lens in the module is the prefix-LM mask written out for torch's SDPA."""
    torch.manual_seed(0)
    m = MultiheadSelfAttention(32, 4, num_kv_heads=1, bias=False).eval()
    x = _x(2, 10, 32)
    prefix = torch.tensor([4, 0])
    i = torch.arange(10)
    allowed = i[None, None, :] <= torch.maximum(i[None, :, None], prefix[:, None, None] - 1)  # (B, S, S)
    q, k, v = m.project(x)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=allowed[:, None], enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(m(x, prefix_lens=prefix), m.out_proj(want.flatten(-2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_project_gradients_match_slices(kv_heads):
    """project's q / k / v (one split of the fused projection) give the projection the gradients
    three slices would, also when only some of them are used."""
    torch.manual_seed(0)
    m = MultiheadSelfAttention(32, 4, num_kv_heads=kv_heads).double()
    x = _x(2, 7, 32).double().requires_grad_()
    h, hk, d = 4, kv_heads, 8
    for used in ((0, 1, 2), (0, 2), (1,)):
        weights = [torch.randn(2, 7, n, d, dtype=torch.float64) for n in (h, hk, hk)]
        got = torch.autograd.grad(sum((t * weights[i]).sum() for i, t in enumerate(m.project(x)) if i in used),
                                  (x, m.in_proj_weight, m.in_proj_bias))
        qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).unflatten(-1, (h + 2 * hk, d))
        parts = qkv[..., :h, :], qkv[..., h:h + hk, :], qkv[..., h + hk:, :]
        want = torch.autograd.grad(sum((t * weights[i]).sum() for i, t in enumerate(parts) if i in used),
                                   (x, m.in_proj_weight, m.in_proj_bias))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_padding_free_masks_run_as_no_mask(monkeypatch):
    """A mask with no padding becomes no mask at all (on CUDA the plain rows then reach torch's
    SDPA): the op sees seqlens=None, and the output is the unmasked one."""
    import fastpt.nn.attention as mod

    m = MultiheadSelfAttention(32, 4).eval()
    layer = TransformerEncoderLayer(32, 4, 48, dropout=0.0).eval()
    x = _x(2, 9, 32)
    seen = []
    real = mod.attention
    monkeypatch.setattr(mod, "attention", lambda *a, **kw: seen.append(kw["seqlens"]) or real(*a, **kw))
    torch.testing.assert_close(m(x, attention_mask=torch.ones(2, 9, dtype=torch.int64)), m(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x, src_key_padding_mask=torch.zeros(2, 9, dtype=torch.bool)), layer(x),
                               rtol=0, atol=0)
    padded = torch.ones(2, 9, dtype=torch.int64)
    padded[1, 5:] = 0
    m(x, attention_mask=padded)
    assert seen[:4] == [None] * 4 and seen[4].tolist() == [9, 5]


def test_self_attention_dropout_only_in_training():
    torch.manual_seed(0)
    m = MultiheadSelfAttention(32, 4, dropout=0.5)
    x = _x(2, 9, 32)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    torch.testing.assert_close(m(x), a, rtol=0, atol=0)  # the seed comes from torch's generator
    assert not torch.allclose(m(x), a)  # a new draw, a new mask
    m.eval()
    eval_out = m(x)
    m.dropout = 0.0
    m.train()
    torch.testing.assert_close(m(x), eval_out, rtol=0, atol=0)


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadSelfAttention(64, 8, num_kv_heads=3)
    with pytest.raises(ValueError, match="embed_dim"):
        MultiheadSelfAttention(60, 8)
    assert MultiheadSelfAttention(60, 8, head_dim=16).in_proj_weight.shape == (3 * 8 * 16, 60)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadSelfAttention(64, 8, dropout=1.0)
    assert "num_kv_heads=2" in repr(fastpt.nn.MultiheadSelfAttention(64, 8, num_kv_heads=2))


def test_encoder_layer_defaults_match_torch():
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 48, batch_first=True).eval()  # torch's default activation: relu
    ours = TransformerEncoderLayer(32, 4, 48).eval()
    ours.load_state_dict(ref.state_dict())
    x = _x(2, 11, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_padding_to_seqlens():
    """Lengths of a right-padded mask; None for a mask without padding when the caller asks (a
    model stack: its layers then run the plain mask); a left-padded row is named."""
    from fastpt.nn.attention import padding_to_seqlens
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert padding_to_seqlens(mask, "m").tolist() == [3, 2, 1]
    assert padding_to_seqlens(mask, "m", none_if_full=True).tolist() == [3, 2, 1]
    full = torch.ones(2, 3, dtype=torch.long)
    assert padding_to_seqlens(full, "m").tolist() == [3, 3]
    assert padding_to_seqlens(full, "m", none_if_full=True) is None
    with pytest.raises(ValueError, match=r"m: only right padding .* row 2 is not right-padded"):
        padding_to_seqlens(torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]]), "m", none_if_full=True)
    with pytest.raises(ValueError, match=r"m: expected shape \(B, S\)"):
        padding_to_seqlens(torch.ones(3), "m")


def test_encoder_without_padding_runs_the_plain_mask(monkeypatch):
    """A text encoder given an all-ones attention_mask hands its layers no lengths (the same
    result as no mask, and torch's SDPA on CUDA without dropout); with padding, the lengths."""
    import importlib

    from fastpt.models import text_encoder
    layers_mod = importlib.import_module("fastpt.models.layers")
    seen = []
    real = layers_mod.attention
    monkeypatch.setattr(layers_mod, "attention", lambda *a, **kw: seen.append(kw.get("seqlens")) or real(*a, **kw))
    torch.manual_seed(0)
    model = text_encoder(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2).eval()
    ids = torch.randint(1, 50, (2, 5))
    plain = model(ids).last_hidden_state
    ones = model(ids, torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(ones, plain, rtol=0, atol=0)
    assert seen[2:] == [None, None]
    model(ids, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert seen[-1].tolist() == [5, 3]


@pytest.mark.parametrize("module", ["layer", "self_attention"])
def test_left_padding_raises_under_torch_compile(module):
    """Compiled, a left-padded mask went through as right padding (padding_to_seqlens skipped its check
    there: 0.61 off torch at the real tokens). The check now runs inside the graph (torch._assert_async:
    no graph break, no host read), and a right-padded mask compiles whole and matches eager code."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(16, 4, 32, dropout=0.0).eval()
    x = _x(2, 6, 16)
    left = torch.tensor([[True, True, False, False, False, False], [False] * 6])  # True = padding
    right = left.flip(1)
    if module == "layer":
        fn, kw, name = layer, lambda pad: dict(src_key_padding_mask=pad), "src_key_padding_mask"
    else:
        fn, kw, name = layer.self_attn, lambda pad: dict(attention_mask=(~pad).long()), "attention_mask"
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, **kw(right)), fn(x, **kw(right)), rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match=f"{name}: only right padding is supported"):
            compiled(x, **kw(left))


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_padded_positions(norm_first):
    """What the docstring says of padded positions: the attention output there is out_proj's bias and
    the rest of the layer runs on it (torch's padded queries attend to the real tokens instead)."""
    ref, ours = _pair(norm_first)
    x = _x(2, 7, 64)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    with torch.no_grad():
        got = ours(x, src_key_padding_mask=pad)
        xp = x[pad]
        attn = ours.self_attn.out_proj.bias.expand_as(xp)
        if norm_first:
            h = xp + attn
            want = h + ours._ff_block(ours.norm2(h))
        else:
            h = ours.norm1(xp + attn)
            want = ours.norm2(h + ours._ff_block(h))
        torch.testing.assert_close(got[pad], want, rtol=1e-5, atol=1e-5)
        assert (got[pad] - ref(x, src_key_padding_mask=pad)[pad]).abs().max() > 1e-2  # torch's differ


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_modules_refuse_torch_jit_script_with_a_reason():
    """torch.jit.script failed deep inside TorchScript (keyword-only forward arguments); the modules
    now say they are not scriptable and what to use instead."""
    for module in (TransformerEncoderLayer(16, 4, 32), MultiheadSelfAttention(16, 4)):
        with pytest.raises(RuntimeError, match=rf"fastpt\.nn\.attention\.{type(module).__name__} is not scriptable"):
            torch.jit.script(module)


def test_forced_backend_is_not_ignored_by_torchs_attention():
    """A general attn_mask runs torch's SDPA: a module forced onto a fastpt backend raised nothing and
    ran torch's kernels; now fastpt.BackendError (backend=None runs torch's SDPA as before)."""
    x = _x(2, 5, 16)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    with pytest.raises(fastpt.BackendError, match="forced backend 'reference' cannot serve these inputs"):
        MultiheadSelfAttention(16, 4, backend="reference")(x, attn_mask=mask)
    MultiheadSelfAttention(16, 4)(x, attn_mask=mask)


def test_torch_func_transforms_match_torchs_layer(monkeypatch):
    """functional_call + torch.func.grad (eval) equals the same on torch's layer; in training the
    gradients equal eager autograd's after the same manual_seed; vmap(randomness="different") over
    the self-attention equals a loop with one dropout seed per sample. Before, the custom ops raised
    torch's 'setup_context' error under grad and the seed draw (.item()) failed under vmap."""
    ref, ours = _pair(norm_first=False, activation="relu", d=16, heads=2, ff=24)
    x = _x(3, 7, 16)
    grads = []
    for layer in (ref, ours):
        params = {k: v.detach() for k, v in layer.named_parameters()}
        grads.append(torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    ours.train()
    params = {k: v.detach() for k, v in ours.named_parameters()}
    torch.manual_seed(5)
    got = torch.func.grad(lambda p: torch.func.functional_call(ours, p, (x,)).square().sum())(params)
    torch.manual_seed(5)
    ours(x).square().sum().backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)

    attn = MultiheadSelfAttention(16, 2, dropout=0.3).train()
    xs = _x(3, 2, 5, 16, seed=1)
    torch.manual_seed(6)
    seeds = torch.randint(0, 2**62, (3,)).tolist()
    torch.manual_seed(6)
    batched = torch.func.vmap(attn, randomness="different")(xs)
    loop = []
    for xi, s in zip(xs, seeds):
        monkeypatch.setattr(fastpt.ops._rng, "fresh_seed", lambda s=s: s)
        loop.append(attn(xi))
    torch.testing.assert_close(batched, torch.stack(loop), rtol=1e-5, atol=1e-6)


def test_meta_tensors_infer_shapes():
    """On the meta device (shape inference) torch's layer runs; ours raised 'unknown device type for
    autocast' (then 'unsupported scalarType'), and a meta padding mask could not be read."""
    kw = dict(device="meta")
    x = torch.empty(3, 5, 16, **kw)
    pad = torch.zeros(3, 5, dtype=torch.bool, **kw)
    want = torch.nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, **kw)(x, src_key_padding_mask=pad)
    for train in (False, True):
        layer = TransformerEncoderLayer(16, 2, 24, **kw).train(train)
        for extra in ({}, dict(src_key_padding_mask=pad), dict(is_causal=True)):
            out = layer(x, **extra)
            assert out.shape == want.shape and out.device.type == "meta"
        out.sum().backward()
        assert layer.self_attn.in_proj_weight.grad.shape == layer.self_attn.in_proj_weight.shape
    out = MultiheadSelfAttention(16, 2, **kw)(x, attention_mask=torch.ones(3, 5, dtype=torch.long, **kw))
    assert out.shape == x.shape and out.device.type == "meta"
