"""One bench per fused op, each timing fastpt and its baselines on the same inputs in the same run.

* ``masking``: MLM masking (tokens/s) against transformers' ``DataCollatorForLanguageModeling``
  (the baseline), fastpt's ``MLMCollator`` and a vectorised torch version of Hugging Face's
  algorithm; MAE masking (patches/s) against the plain torch rand + argsort + argsort + gather.
  The two collators run on the CPU from Python lists of the same ids: HF's with
  ``special_tokens_mask`` lists, as ``run_mlm.py`` prepares them (without them it rebuilds the mask
  row by row, ~10% slower), fastpt's without (it finds the special tokens by id); ``fastpt``
  (``mlm_mask``) and the torch version start from a ready id tensor on the device, so their ratio
  to a collator row also counts the lists-to-tensor work a collator does.
* ``attention``: none / causal / packed documents / prefix-LM, forward and forward + backward,
  against torch SDPA (the baseline; on CUDA also forced to flash / efficient / cudnn where they
  take the mask), FlexAttention with a block mask (CUDA), and eager softmax(QK^T)V; on CUDA also
  BERT-base's attention (32 x 512 tokens, 12 heads of 64) without and with dropout 0.1, the
  e2e step's own (fastpt's counter-based dropout against torch's in SDPA).
* ``contrastive``: InfoNCE and CLIP forward + backward against eager matmul + cross-entropy (and
  the PyPI package inf-cl on CUDA in fp32 when importable).
* ``contrastive_1m`` (CUDA only): InfoNCE at N = 1M, fastpt alone (nothing else fits).
* ``dropout``: hidden-state dropout forward and forward + backward against ``F.dropout``.
* ``cross_entropy``: fused linear cross-entropy forward + backward against eager
  ``F.cross_entropy(F.linear(h, w), y)`` (the baseline), the same on the labelled rows only, and
  liger-kernel on CUDA when importable.

FLOPs credit only the work the result needs, so a kernel that skips masked work is not credited
with it and one that does it anyway is not either: attention ``4 * attended pairs * D * H``
forward, 2.5 times that backward (FlashAttention's convention); contrastive ``6 N M D`` (the
logits and their two gradients); cross-entropy ``6 * labelled rows * D * V``. The provider
``fastpt`` is the public function with ``backend=None`` (what a user gets); ``fastpt-<backend>``
rows force one backend. On CUDA, attention's dispatch sends plain and causal rows to torch's
SDPA, so there ``fastpt`` equals ``torch-sdpa`` by construction.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .harness import Timing, calls_per_sample, peak_memory, time_fn
from .peaks import Peak, dtype_name, peak
from .report import make_row

__all__ = ["Context", "measure", "SUITES", "run_kernels", "bench_masking", "bench_attention", "bench_contrastive",
           "bench_cross_entropy", "bench_dropout", "bert_tokenizer", "mlm_inputs", "torch_mlm", "torch_mae", "AttentionCase",
           "attention_cases", "bench_contrastive_million", "contrastive_inputs", "eager_info_nce", "eager_clip", "ce_inputs", "ce_contenders", "backend_refusal"]

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "int64"}


# ----------------------------------------------------------------------------- the runner

@dataclass
class Context:
    """Where and how a suite runs: ``device`` ("cpu"/"cuda"), ``quick`` (small shapes, few
    repeats: a smoke run), ``log`` (one line per row), ``machine`` (``harness.machine_info``)."""

    device: str = "cpu"
    quick: bool = False
    log: Callable[[str], None] = print
    machine: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)  # dtype name -> Peak, filled as rows ask
    # gets each group's rows as ``measure`` finishes it (``run_kernels(on_rows=...)``): a cut keeps them
    on_rows: Callable[[list[dict]], None] | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def peak(self, dtype: torch.dtype) -> Peak:
        name = dtype_name(dtype, self.device)
        if name not in self.peaks:
            self.peaks[name] = peak(self.machine.get("device_name"), dtype, device=self.device)
        return self.peaks[name]


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0][:200] if text else ''}"


def measure(ctx: Context, *, op: str, case: str, mode: str, shape, dtype: torch.dtype, baseline: str,
            providers: dict[str, Callable[[], object] | str], setup: Callable[[], object] | None = None,
            flops: float | None = None, units: float | None = None, unit: str | None = None,
            warmup: int | None = None, repeats: int | None = None, budget_s: float | None = None,
            memory: bool = True, host_timed: tuple[str, ...] = (), notes: dict[str, str] | None = None) -> list[dict]:
    """Time every provider of one group (same work, same inputs) and return their rows.

    ``providers``: name -> a no-argument callable, or a string saying why it is skipped here.
    Each provider is warmed up, then the timed calls go round-robin (one sample of each provider
    per round), so that a disturbance on a shared machine hits every provider alike. On CUDA a
    sample of a provider faster than ``harness.SAMPLE_S`` is a batch of back-to-back calls
    (``harness.calls_per_sample`` of its first call; the row's note says how many), not one call
    from an idle GPU: a training loop queues its kernels, and so does the bench. The rounds
    stop at ``repeats``, or once the slowest provider's timed calls add up to ``budget_s`` (after 3).
    ``setup`` runs before every call, outside the timing. ``host_timed`` names providers that run
    on the CPU even in a CUDA suite (a collator): timed with ``perf_counter``. A provider that
    raises becomes an ``error: ...`` row; the others still run.
    """
    warmup = (2 if ctx.cuda else 1) if warmup is None else warmup
    repeats = ((3 if ctx.quick else 10) if ctx.cuda else (2 if ctx.quick else 5)) if repeats is None else repeats
    p = ctx.peak(dtype) if flops else None
    dt = DTYPES.get(dtype, str(dtype))
    rows: dict[str, dict] = {}
    timings: dict[str, Timing] = {}

    batches: dict[str, int] = {}  # CUDA: calls per timed sample (harness.calls_per_sample)

    def row(name, **kw):
        note = "; ".join(x for x in ((notes or {}).get(name, ""),
                                     f"{batches[name]} back-to-back calls per timed sample" if name in batches else "")
                         if x)
        return make_row(op=op, case=case, mode=mode, shape=shape, dtype=dt, provider=name, baseline=baseline,
                        note=note, **kw)

    def timed_call(name, fn, warm=0):
        try:
            got = time_fn(fn, device="cpu" if name in host_timed else ctx.device, warmup=warm, repeats=1, setup=setup,
                          batch=batches.get(name, 1))
            timings[name].times += got.times
        except Exception as exc:  # noqa: BLE001 - one failing provider must not lose the run
            rows[name] = row(name, status=_error(exc))
            ctx.log(f"{op:<14} {case:<24} {mode:<8} {name:<16} {_error(exc)}")
            timings.pop(name)
            if ctx.cuda:
                torch.cuda.empty_cache()

    for name, fn in providers.items():
        if isinstance(fn, str):
            rows[name] = row(name, status=f"skipped: {fn}")
            ctx.log(f"{op:<14} {case:<24} {mode:<8} {name:<16} skipped: {fn}")
        else:
            timings[name] = Timing()
            timed_call(name, fn, warm=warmup)  # warm-up (compile, autotune, allocator) and the first round
            if ctx.cuda and name in timings and name not in host_timed and setup is None:
                n = calls_per_sample(timings[name].times[-1])
                if n > 1:  # that single call from an idle GPU also timed the host's launch latency: redo it batched
                    batches[name] = n
                    timings[name].times.clear()
                    timed_call(name, fn)
    for i in range(1, repeats):
        if i >= 3 and budget_s is not None and max((sum(t.times) for t in timings.values()), default=0) >= budget_s:
            break
        for name in list(timings):
            timed_call(name, providers[name])
    for name, timing in timings.items():
        fn = providers[name]
        try:
            mem = peak_memory(fn, device="cpu" if name in host_timed else ctx.device, setup=setup) if memory else None
        except Exception as exc:  # noqa: BLE001
            rows[name] = row(name, status=_error(exc))
            continue
        rows[name] = row(name, timing=timing, mem_bytes=mem, flops=flops, units=units, unit=unit, peak=p)
        ctx.log(f"{op:<14} {case:<24} {mode:<8} {name:<16} {timing.median * 1e3:10.3f} ms"
                + (f" {mem / 2**20:9.1f} MiB" if mem is not None else ""))
    result = [rows[name] for name in providers]
    if ctx.on_rows is not None:
        ctx.on_rows(result)
    return result


def backend_refusal(module: str, backend: str, device: str, **inputs) -> str | None:
    """Why ``fastpt.ops.<module>``'s ``backend`` would refuse typical inputs on ``device`` (None: it serves)."""
    op = importlib.import_module(f"fastpt.ops.{module}").OP
    probe = op.probe(device) | inputs
    return op.refusals(**probe).get(backend, f"no backend {backend!r}")


# ----------------------------------------------------------------------------- masking

VOCAB = 30522  # bert-base-uncased
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
CLS_ID, SEP_ID, MASK_ID = 2, 3, 4


@functools.lru_cache(maxsize=None)
def bert_tokenizer():
    """A BERT-sized WordPiece tokenizer built in code (no download): 5 specials + 30517 words.
    Needs transformers (raises ImportError without it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast

    vocab = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return BertTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


@functools.lru_cache(maxsize=4)
def mlm_inputs(batch: int, length: int) -> dict:
    """The same pre-tokenised batch in every form: ``[CLS] words... [SEP]`` rows of ``length`` ids.

    Returns ``tensor`` (B, L) int64, ``ids`` (examples ``{"input_ids": list}``) and ``ids_stm``
    (the same with a ``special_tokens_mask`` list, as ``run_mlm.py`` prepares them).
    """
    g = torch.Generator().manual_seed(batch * length)
    ids = torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    rows = ids.tolist()
    stm = [[1] + [0] * (length - 2) + [1]] * batch
    return dict(tensor=ids, ids=[{"input_ids": r} for r in rows],
                ids_stm=[{"input_ids": r, "special_tokens_mask": s} for r, s in zip(rows, stm)])


def torch_mlm(ids, special_ids, mask_id, vocab, p=0.15, mask_p=0.8, rand_p=0.1, generator=None):
    """Hugging Face's ``torch_mask_tokens``, vectorised (the special-tokens mask by ``torch.isin``).
    Returns ``(masked ids, labels)``, labels -100 where not selected."""
    dev = ids.device
    labels = ids.clone()
    prob = torch.full(ids.shape, p, device=dev)
    prob.masked_fill_(torch.isin(ids, special_ids), 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = -100
    out = ids.clone()
    replaced = torch.bernoulli(torch.full(ids.shape, mask_p, device=dev), generator=generator).bool() & selected
    out[replaced] = mask_id
    # HF's random_replace_prob is a fraction of all selected tokens: rescale it to those not masked
    rand = torch.bernoulli(torch.full(ids.shape, rand_p / (1 - mask_p), device=dev), generator=generator).bool()
    rand &= selected & ~replaced
    words = torch.randint(vocab, ids.shape, generator=generator, device=dev)
    out[rand] = words[rand]
    return out, labels


def torch_mae(batch, length, mask_ratio=0.75, generator=None, device="cpu"):
    """MAE's random_masking index work (facebookresearch/mae models_mae.py) without the gather of x.
    Returns ``(ids_keep (B, K), mask (B, L) 1 = removed, ids_restore (B, L))``."""
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(batch, length, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


# what each MLM masking row starts from, on every device: the collators' rows compare with each other,
# the kernel's ratio to them also counts turning Python lists into a tensor
_MASKING_NOTES = {
    "hf-collator": "hf-collator: transformers' DataCollatorForLanguageModeling on the CPU, from Python lists of ids "
                   "with special_tokens_mask (as run_mlm.py prepares them and a DataLoader runs it)",
    "fastpt-collator": "fastpt-collator: fastpt.data.MLMCollator on the CPU, from lists of the same ids (no "
                       "special_tokens_mask: it finds the special tokens by id); against hf-collator: like for like",
    "torch-vectorised": "torch-vectorised: Hugging Face's algorithm in torch, on a ready (B, L) id tensor on the device",
    "fastpt": "fastpt: fastpt.ops.mlm_mask on a ready (B, L) id tensor on the device; its ratio to the collator "
              "rows (from lists) includes their lists-to-tensor work",
}


def bench_masking(ctx: Context) -> list[dict]:
    """MLM masking (tokens/s) and MAE masking (patches/s); see the module docstring."""
    from fastpt.ops import mlm_mask, random_masking

    dev = ctx.device
    rows = []
    try:
        from transformers import DataCollatorForLanguageModeling

        from fastpt.data import MLMCollator

        tok, missing = bert_tokenizer(), None
    except ImportError as exc:
        tok, missing = None, f"transformers is not importable ({exc})"
    for b, length in [(64, 128)] if ctx.quick else [(256, 512), (4096, 128)]:
        data = mlm_inputs(b, length)
        ids = data["tensor"].to(dev)
        special = torch.tensor([0, 1, CLS_ID, SEP_ID, MASK_ID], device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        providers: dict = {}
        if tok is not None:
            # HF's from the lists run_mlm.py prepares: special_tokens_mask spares it rebuilding the mask row by
            # row in Python; fastpt's finds the special tokens by id
            providers["hf-collator"] = functools.partial(DataCollatorForLanguageModeling(tok, seed=0), data["ids_stm"])
            providers["fastpt-collator"] = functools.partial(MLMCollator(tok, seed=0), data["ids"])
        else:
            providers["hf-collator"] = providers["fastpt-collator"] = missing
        providers["torch-vectorised"] = functools.partial(torch_mlm, ids, special, MASK_ID, VOCAB, generator=gen)
        providers["fastpt"] = functools.partial(mlm_mask, ids, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                                special_token_ids=[0, 1, CLS_ID, SEP_ID, MASK_ID], seed=0)
        rows += measure(ctx, op="masking", case=f"mlm {b}x{length}", mode="", shape=(b, length), dtype=torch.int64,
                        baseline="hf-collator" if tok is not None else "torch-vectorised", providers=providers,
                        units=b * length, unit="tokens", memory=False, host_timed=("hf-collator", "fastpt-collator"),
                        repeats=None if ctx.cuda else (3 if ctx.quick else 10), notes=_MASKING_NOTES)
    for b, length in [(64, 196)] if ctx.quick else [(256, 196), (64, 1024)]:
        gen = torch.Generator(device=dev).manual_seed(0)
        providers = {"torch-argsort": functools.partial(torch_mae, b, length, generator=gen, device=dev),
                     "fastpt": functools.partial(random_masking, b, length, mask_ratio=0.75, seed=0, device=dev)}
        rows += measure(ctx, op="masking", case=f"mae {b}x{length}", mode="", shape=(b, length), dtype=torch.int64,
                        baseline="torch-argsort", providers=providers, units=b * length, unit="patches",
                        memory=False, repeats=None if ctx.cuda else (3 if ctx.quick else 20))
    return rows


# ----------------------------------------------------------------------------- attention

ATTN_KINDS = ("none", "causal", "packed", "prefix")
ATTN_MODES = ("fwd", "fwd+bwd")
DOC_SHARES = (412, 96, 350, 180, 301, 64, 397, 248)  # 8 unequal documents, in 2048ths of a row


class AttentionCase:
    """One mask case: inputs ``qkv`` (B, S, H, D) with grad, the fastpt keywords ``kw``, torch's
    equivalent ``torch_kw`` for SDPA, the attended pair count ``pairs`` and a FlexAttention
    ``mask_mod``. ``kind``: "none", "causal", "packed" (8 unequal documents per row) or "prefix".
    ``dropout``: attention dropout probability for every provider (fastpt's counter-based mask,
    torch's own RNG in SDPA and the eager version); FlexAttention has none and is left out."""

    def __init__(self, kind: str, seq: int, batch: int, heads: int, hd: int, device: str, dtype: torch.dtype,
                 dropout: float = 0.0):
        self.kind, self.seq, self.batch, self.heads, self.hd, self.dtype = kind, seq, batch, heads, hd, dtype
        self.dropout = dropout
        g = torch.Generator().manual_seed(0)
        gd = torch.Generator(device=device).manual_seed(0)  # 100M values: drawn where they live
        self.qkv = [torch.randn(batch, seq, heads, hd, generator=gd, device=device, dtype=dtype).requires_grad_()
                    for _ in range(3)]
        i = torch.arange(seq, device=device)
        self.kw, self.torch_kw, self.mask_mod, self.allowed = {}, {}, None, None
        if kind == "causal":
            self.kw["causal"] = self.torch_kw["is_causal"] = True
            self.pairs = batch * seq * (seq + 1) // 2
            self.mask_mod = lambda b, h, qi, ki: ki <= qi
        elif kind == "packed":
            lengths = [s * seq // 2048 for s in DOC_SHARES]
            lengths[-1] += seq - sum(lengths)
            lens = torch.tensor(lengths * batch, device=device)
            self.kw["cu_seqlens"] = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).int()
            doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens[:len(lengths)])
            doc = doc[None].expand(batch, seq)
            self.torch_kw["attn_mask"] = self.allowed = doc[:, None, :, None] == doc[:, None, None, :]
            self.pairs = batch * sum(n * n for n in lengths)
            self.mask_mod = lambda b, h, qi, ki: doc[b, qi] == doc[b, ki]
        elif kind == "prefix":
            prefix = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=g).to(device)
            self.kw["prefix_lens"] = prefix
            allowed = i[None, None, :] <= torch.maximum(i[None, :, None], prefix[:, None, None] - 1)
            self.torch_kw["attn_mask"] = self.allowed = allowed[:, None]
            self.pairs = int(allowed.sum())
            self.mask_mod = lambda b, h, qi, ki: (ki <= qi) | (ki < prefix[b])
        elif kind == "none":
            self.pairs = batch * seq * seq
        else:
            raise ValueError(f"kind: expected one of {ATTN_KINDS}, got {kind!r}")
        if dropout:
            self.kw["dropout_p"] = self.torch_kw["dropout_p"] = dropout

    @property
    def name(self) -> str:
        return f"{self.kind} S{self.seq} D{self.hd}" + (f" p{self.dropout:g}" if self.dropout else "")

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.pairs * self.hd * self.heads
        return fwd * (3.5 if mode == "fwd+bwd" else 1.0)

    def fastpt(self, backend: str | None = None):
        from fastpt.ops import attention

        def run(q, k, v):
            if self.kind == "packed":  # packed input: (T, H, D) with the documents' boundaries
                out = attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), backend=backend, **self.kw)
                return out.view(q.shape)
            return attention(q, k, v, backend=backend, **self.kw)
        return run

    def torch_sdpa(self, sdpa_backend=None):
        def run(q, k, v):
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if sdpa_backend is None:
                return F.scaled_dot_product_attention(*args, **self.torch_kw).transpose(1, 2)
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(sdpa_backend):
                return F.scaled_dot_product_attention(*args, **self.torch_kw).transpose(1, 2)
        return run

    def eager(self):
        """softmax(Q K^T * scale + mask) V written out in torch (softmax in float32)."""
        allowed = self.allowed
        if self.kind == "causal":
            allowed = torch.ones(self.seq, self.seq, dtype=torch.bool, device=self.qkv[0].device).tril()

        def run(q, k, v):
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            s = (q @ k.transpose(-1, -2)).float() * self.hd**-0.5
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            p = F.dropout(s.softmax(-1), self.dropout) if self.dropout else s.softmax(-1)
            return (p.to(v.dtype) @ v).transpose(1, 2)
        return run

    def flex(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = None
        if self.mask_mod is not None:
            block = create_block_mask(self.mask_mod, self.batch, None, self.seq, self.seq, device=self.qkv[0].device)
        compiled = torch.compile(flex_attention)

        def run(q, k, v):
            return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block).transpose(1, 2)
        return run

    def refusal(self, backend: str) -> str | None:
        """Why fastpt's ``backend`` does not serve this case here (None: it does)."""
        attn = importlib.import_module("fastpt.ops.attention")
        q, k, v = (x.detach() for x in self.qkv)
        return attn.OP.refusals(**attn.OP.probe(q.device.type) | dict(q4=q, k4=k, v4=v)).get(backend, "unknown")


def attention_providers(case: AttentionCase) -> dict:
    """The contenders for one case on its device (name -> fn(q, k, v), or a skip reason)."""
    out: dict = {"fastpt": case.fastpt()}
    cuda = case.qkv[0].device.type == "cuda"
    if cuda:
        for b in ("triton", "cuda"):
            why = case.refusal(b)
            out[f"fastpt-{b}"] = case.fastpt(b) if why is None else why
    out["torch-sdpa"] = case.torch_sdpa()
    if cuda:
        try:
            from torch.nn.attention import SDPBackend
        except ImportError:
            SDPBackend = None
        if SDPBackend is not None:
            unmasked = "attn_mask" not in case.torch_kw  # flash and cudnn take no arbitrary mask
            for name, b in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                            ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                if unmasked or name == "efficient":
                    out[f"sdpa-{name}"] = case.torch_sdpa(b)
        # the masks flex exists for (none/causal have SDPA's own kernels); it compiles per case
        if case.hd == 128 and case.kind in ("packed", "prefix") and not case.dropout:
            try:
                importlib.import_module("torch.nn.attention.flex_attention")
                out["flex"] = case.flex()
            except ImportError:
                out["flex"] = "torch.nn.attention.flex_attention is not importable (torch < 2.5)"
    out["torch-eager"] = case.eager()
    return out


# BERT-base's attention in the e2e step (issue 6): 32 rows of 512 tokens, 12 heads of 64, with and
# without its attention dropout of 0.1 (CUDA only)
BERT_ATTENTION = dict(seq=512, batch=32, heads=12, hd=64, dropouts=(0.0, 0.1))


def attention_cases(ctx: Context):
    """The ``AttentionCase`` grid, one case at a time (each holds its inputs): on CUDA BERT-base's
    shape first (small, and what the e2e step runs), then the four mask kinds at 4,096 tokens and
    head dims 64 / 128 (16k tokens, 2,048 channels); on the CPU the four kinds at 2,048 tokens,
    8 heads of 64, float32."""
    if not ctx.cuda:
        for kind in ATTN_KINDS:
            yield AttentionCase(kind, 256 if ctx.quick else 2048, 1, 8, 64, "cpu", torch.float32)
        return
    if not ctx.quick:
        b = BERT_ATTENTION
        for p in b["dropouts"]:
            yield AttentionCase("none", b["seq"], b["batch"], b["heads"], b["hd"], "cuda", torch.bfloat16, dropout=p)
    for hd in (64,) if ctx.quick else (64, 128):
        seq = 1024 if ctx.quick else 4096
        for kind in ATTN_KINDS:
            yield AttentionCase(kind, seq, 16384 // seq, 2048 // hd, hd, "cuda", torch.bfloat16)


def bench_attention(ctx: Context) -> list[dict]:
    """Attention forward and forward + backward over the four mask kinds; see the module docstring."""
    rows = []
    for case in attention_cases(ctx):
        rows += _attention_rows(ctx, case)
    return rows


def _attention_rows(ctx: Context, case: AttentionCase) -> list[dict]:
    """Both modes of one case. The backward is ``torch.autograd.grad`` of the output (nothing
    accumulates into ``.grad``), so calls need no reset between them and fast ones are timed in
    back-to-back batches on CUDA."""
    q, k, v = case.qkv
    grad = torch.randn_like(q)
    providers = attention_providers(case)
    rows = []
    for mode in ATTN_MODES:
        def wrap(fn, mode=mode):
            if isinstance(fn, str):
                return fn
            if mode == "fwd":
                def run():
                    with torch.no_grad():
                        fn(q, k, v)
            else:
                def run():
                    torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
            return run

        rows += measure(ctx, op="attention", case=case.name, mode=mode,
                        shape=(case.batch, case.seq, case.heads, case.hd), dtype=case.dtype,
                        baseline="torch-sdpa", providers={n: wrap(f) for n, f in providers.items()},
                        flops=case.flops(mode), units=case.batch * case.seq, unit="tokens",
                        repeats=None if ctx.cuda else (2 if ctx.quick else 3))
    return rows


# ----------------------------------------------------------------------------- contrastive

TEMPERATURE = 0.07


def contrastive_inputs(n: int, d: int, dtype=torch.float32, device="cpu"):
    """Unit-norm query and key embeddings ``(n, d)`` (drawn on the CPU: the same on every device)."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    k = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    return q, k


def eager_info_nce(q, k, temperature=TEMPERATURE):
    """InfoNCE as users write it: ``F.cross_entropy(q @ k.T / t, arange(N))``."""
    return F.cross_entropy(q @ k.T / temperature, torch.arange(q.shape[0], device=q.device))


def eager_clip(q, k, logit_scale):
    """open_clip's symmetric loss on normalised embeddings."""
    logits = logit_scale.exp().clamp(max=100) * q @ k.T
    target = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def bench_contrastive(ctx: Context) -> list[dict]:
    """InfoNCE and CLIP forward + backward; see the module docstring."""
    from fastpt.ops import clip_loss, info_nce

    if ctx.cuda:
        n, d = (4096, 256) if ctx.quick else (16384, 512)
        grid = [("info_nce", torch.bfloat16), ("info_nce", torch.float32), ("clip", torch.bfloat16)]
        backends = ("blas", "triton", "cuda")
    else:
        n, d = (512, 128) if ctx.quick else (4096, 512)
        grid = [("info_nce", torch.float32), ("clip", torch.float32)]
        backends = ()
    rows = []
    for loss, dtype in grid:
        q, k = (t.requires_grad_() for t in contrastive_inputs(n, d, dtype, ctx.device))
        scale = torch.tensor(math.log(1 / TEMPERATURE), device=ctx.device, requires_grad=True)
        leaves = [q, k, scale]

        def fastpt(backend=None, loss=loss, q=q, k=k, scale=scale):
            if loss == "info_nce":
                return lambda: info_nce(q, k, temperature=TEMPERATURE, backend=backend).backward()
            return lambda: clip_loss(q, k, scale, normalize=False, backend=backend).backward()

        providers: dict = {"fastpt": fastpt()}
        for b in backends:
            why = backend_refusal("contrastive", b, ctx.device, q=q.detach(), k=k.detach())
            if b == "cuda" and dtype == torch.float32:
                continue  # fp32 is the CUDA C++ backend's FMA path: measured in bf16 only
            providers[f"fastpt-{b}"] = fastpt(b) if why is None else why
        providers["torch-eager"] = ((lambda q=q, k=k: eager_info_nce(q, k).backward()) if loss == "info_nce"
                                    else (lambda q=q, k=k, s=scale: eager_clip(q, k, s).backward()))
        if ctx.cuda and loss == "info_nce" and dtype == torch.float32:
            try:
                import inf_cl

                providers["inf-cl"] = lambda q=q, k=k: inf_cl.cal_flash_loss(q, k, scale=1 / TEMPERATURE).mean().backward()
            except ImportError:
                providers["inf-cl"] = "inf-cl (PyPI inf_cl) is not importable"

        def reset(leaves=leaves):
            for t in leaves:
                t.grad = None

        rows += measure(ctx, op="contrastive", case=f"{loss} N{n} D{d}", mode="fwd+bwd", shape=(n, d), dtype=dtype,
                        baseline="torch-eager", providers=providers, setup=reset, flops=6.0 * n * n * d,
                        units=n, unit="samples", repeats=None if ctx.cuda else (2 if ctx.quick else 3))
    return rows


MILLION = (1 << 20, 512)  # issue 4: InfoNCE over N = 1M samples on one GPU


def bench_contrastive_million(ctx: Context) -> list[dict]:
    """InfoNCE at N = 2**20, D = 512, bf16, forward + backward (CUDA, not ``quick``; elsewhere no
    rows): fastpt's default backend only.

    No baseline can run it: torch eager's N x N scores alone are 2 TiB in bf16 (4 in float32), and
    inf-cl (float32 only) would take minutes a call at this N. The row gives the time, the rate and
    the peak memory of the one call that fits. About 3.3 PFLOP a call, seconds each: two timed
    calls and no warm-up (the N = 16k contrastive case compiles the same kernels first), as an op
    of its own, so a run cut during it keeps the other ops' rows."""
    if not ctx.cuda or ctx.quick:
        return []
    return _contrastive_million(ctx)


def _contrastive_million(ctx: Context) -> list[dict]:
    from fastpt.ops import info_nce

    n, d = MILLION
    g = torch.Generator(ctx.device).manual_seed(0)  # drawn on the device: 2**30 numbers, seconds on a host
    q, k = (F.normalize(torch.randn(n, d, device=ctx.device, generator=g), dim=1).to(torch.bfloat16).requires_grad_()
            for _ in range(2))

    def reset():
        q.grad = k.grad = None

    providers = {"fastpt": lambda: info_nce(q, k, temperature=TEMPERATURE).backward(),
                 "torch-eager": f"its {n} x {n} scores alone would need {n * n * 2 / 2**40:.0f} TiB in bf16"}
    rows = measure(ctx, op="contrastive", case=f"info_nce N{n} D{d}", mode="fwd+bwd", shape=(n, d),
                   dtype=torch.bfloat16, baseline="torch-eager", providers=providers, setup=reset,
                   flops=6.0 * n * n * d, units=n, unit="samples", warmup=0, repeats=2)
    del q, k
    if ctx.cuda:
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- cross-entropy

CE_CASES = {  # name: (tokens, D, V, fraction of tokens with a label)
    "bert-mlm": (32 * 128, 768, 30522, 0.15),
    "gpt-small": (1024, 512, 32000, 1.0),
}
CE_CPU_CASES = {"bert-mlm": (16 * 128, 768, 30522, 0.15), "gpt-small": (512, 512, 32000, 1.0)}
CE_GPU_CASES = {**CE_CASES, "llama3-8k": (8192, 2048, 128256, 1.0)}
CE_QUICK_CASES = {"tiny-mlm": (256, 128, 8192, 0.15)}


def ce_inputs(shape: tuple, device: str, dtype: torch.dtype):
    """``(h (T, D), w (V, D), labels (T,))`` with grads on h and w; a ``1 - active`` share of the
    labels is -100. ``shape`` is ``(T, D, V, active)``."""
    t, d, v, frac = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(t, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) >= frac] = -100
    return h, w, labels.to(device)


def ce_contenders(device: str) -> dict:
    """name -> fn(h, w, y) -> loss, or a skip reason: torch-eager, torch-gather, fastpt, liger (CUDA)."""
    from fastpt.ops import linear_cross_entropy

    def eager(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y)

    def gather(h, w, y):
        keep = y != -100
        return F.cross_entropy(F.linear(h[keep], w).float(), y[keep])

    out: dict = {"torch-eager": eager, "torch-gather": gather,
                 "fastpt": lambda h, w, y: linear_cross_entropy(h, w, y)}
    if torch.device(device).type == "cuda":
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def liger(h, w, y):
                res = LigerFusedLinearCrossEntropyFunction.apply(h, w, y)  # a tuple in recent versions
                return res[0] if isinstance(res, tuple) else res
            out["liger"] = liger
        except ImportError:
            out["liger"] = "liger-kernel is not importable"
    return out


def bench_cross_entropy(ctx: Context) -> list[dict]:
    """Fused linear cross-entropy forward + backward; see the module docstring."""
    cases = CE_QUICK_CASES if ctx.quick else CE_GPU_CASES if ctx.cuda else CE_CPU_CASES
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    rows = []
    for name, shape in cases.items():
        h, w, y = ce_inputs(shape, ctx.device, dtype)
        active = int((y != -100).sum())
        t, d, v, _ = shape

        def reset():
            h.grad = w.grad = None

        providers = {n: fn if isinstance(fn, str) else (lambda fn=fn: fn(h, w, y).backward())
                     for n, fn in ce_contenders(ctx.device).items()}
        rows += measure(ctx, op="cross_entropy", case=f"{name} T{t} D{d} V{v}", mode="fwd+bwd", shape=(t, d, v),
                        dtype=dtype, baseline="torch-eager", providers=providers, setup=reset,
                        flops=6.0 * active * d * v, units=t, unit="tokens",
                        repeats=None if ctx.cuda else (2 if ctx.quick else 5), budget_s=None if ctx.cuda else 20)
    return rows


# ----------------------------------------------------------------------------- dropout

DROPOUT_P = 0.1


def bench_dropout(ctx: Context) -> list[dict]:
    """Hidden-state dropout (p = 0.1), forward and forward + backward, against ``F.dropout``.

    ``fastpt`` is ``fastpt.ops.dropout`` with a seed drawn per call as ``fastpt.nn.Dropout`` does:
    the C++ counter-based kernel on the CPU, the Triton kernel (``ops/dropout_triton.py``) on CUDA.
    The harness also reports each provider's peak extra memory: fastpt stores no mask for the
    backward (it recomputes it), torch's CUDA dropout keeps a bool mask. On the CPU fastpt's calls
    follow torch's in each round, while MKL's threads may still spin after torch's CPU dropout (up
    to 200 ms): that can only slow fastpt's figures. (Spacing the calls by a sleep instead measured
    both sides cold and noisier.) On CUDA ``fastpt.nn.Dropout`` still runs torch's dropout, until
    this bench shows the Triton kernel at least as fast.
    """
    from fastpt.ops import dropout
    from fastpt.ops.dropout import OP

    rows = []
    # CUDA: bert-base's hidden and FFN activations at 32 x 512 tokens too; at 1-4M elements both
    # sides' times are mostly host overhead (the H100 run: 0.03-0.4 ms a call)
    shapes = [(1024, 256)] if ctx.quick else [(4096, 256), (4096, 1024)] + (
        [(16384, 768), (16384, 3072)] if ctx.cuda else [])
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=ctx.device, dtype=dtype)
            for mode in ("fwd", "fwd+bwd"):
                grad = mode == "fwd+bwd"
                leaf = x.detach().requires_grad_(grad)

                def call(fn, leaf=leaf, grad=grad):
                    y = fn(leaf)
                    if grad:
                        y.backward(torch.ones_like(y))
                        leaf.grad = None
                    return y

                providers = {"torch": functools.partial(call, lambda t: F.dropout(t, DROPOUT_P, True)),
                             "fastpt": functools.partial(call, lambda t: dropout(t, DROPOUT_P))}
                rows += measure(ctx, op="dropout", case=f"{shape[0]}x{shape[1]}", mode=mode, shape=shape, dtype=dtype,
                                baseline="torch", providers=providers, units=x.numel(), unit="elements",
                                repeats=None if ctx.cuda else (2 if ctx.quick else 7),
                                notes={"fastpt": f"{OP.select(x=x, key=0, p=DROPOUT_P).name} backend"} if ctx.cuda
                                else None)
    return rows


SUITES = {"masking": bench_masking, "dropout": bench_dropout, "attention": bench_attention,
          "contrastive": bench_contrastive, "cross_entropy": bench_cross_entropy,
          "contrastive_1m": bench_contrastive_million}


def run_kernels(ctx: Context, ops=None, on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run the op benches named in ``ops`` (default all, cheapest first); ``on_rows`` gets each
    group's rows (one case and mode: the baseline and its contenders) as soon as they exist, so a run
    cut short keeps every case it finished, also inside an op."""
    for name in ops or SUITES:
        if name not in SUITES:
            raise ValueError(f"ops: unknown op bench {name!r}; expected some of {list(SUITES)}")
    rows, outer = [], ctx.on_rows
    ctx.on_rows = on_rows
    try:
        for name in ops or SUITES:
            rows += SUITES[name](ctx)
    finally:
        ctx.on_rows = outer
    return rows
