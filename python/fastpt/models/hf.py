"""Hugging Face checkpoints (config.json + safetensors) to and from fastpt, for BERT, RoBERTa, GPT-2, ViT.

Everything is driven by ``config.json``: the backbone is built by the same typed builders the YAML
zoo uses (``text_encoder``, ``vit``) with arguments read from it, then each weight is mapped by
name. Hugging Face's separate q / k / v projections become row blocks of the fused
``in_proj_weight`` (a concatenation, so exact both ways); GPT-2's ``Conv1D`` weights are stored
transposed and are transposed back. No ``transformers`` import: only ``safetensors``.

fastpt's own on-disk format (``save_fastpt`` / ``load_fastpt``, what ``fastpt convert --from-hf``
writes): a directory with ``fastpt_config.json`` (the builder arguments of the backbone, the head
specs, the original Hugging Face config) and ``model.safetensors`` (``backbone.*`` and
``heads.<name>.*``; a head weight tied to the embedding is stored once, under the backbone).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data.shards import check_file_name, named_os_error, read_json_object, unlink_quietly, write_text_atomic
from .encoder import TextEncoder, text_encoder
from .encoder_decoder import encoder_decoder
from .heads import LMHead, MLMHead, Pooler
from .vision import VisionEncoder, vit

ARCHS = ("bert", "roberta", "gpt2", "vit")
BUILDERS = {"text_encoder": text_encoder, "encoder_decoder": encoder_decoder, "vit": vit}
FORMAT_VERSION = 1
# files of a Hugging Face directory that are not weights: copied along by `fastpt convert`
SIDE_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
              "preprocessor_config.json", "generation_config.json")
# the special-token roles a tokenizer_config.json names (``<role>_token``)
TOKENIZER_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
_BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "vit": "vit."}
_TOP_LEVEL = ("cls.", "lm_head.", "classifier.")  # head keys outside the base model's prefix
# weights a checkpoint may hold that fastpt does not need (buffers, tied copies, task heads)
_IGNORED = re.compile(r"(^|\.)position_ids$|\.attn\.(masked_)?bias$|^cls\.predictions\.decoder\.|^lm_head\.decoder\."
                      r"|^lm_head\.weight$")


# ----------------------------------------------------------------------------- config.json <-> builder kwargs


def _act(cfg: dict, key: str, default: str) -> str:
    name = cfg.get(key, default)
    if name not in _ACT_FROM_HF:
        raise ValueError(f"config.json: {key}={name!r} is not supported (expected one of {sorted(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


def _backbone_kwargs(arch: str, cfg: dict) -> tuple[str, dict]:
    """(builder name, builder kwargs) for a Hugging Face config dict."""
    if arch in ("bert", "roberta"):
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type={cfg['position_embedding_type']!r} is not "
                             f"supported (only 'absolute')")
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ValueError("config.json: decoder BERT / RoBERTa (is_decoder, add_cross_attention) is not supported")
        pad = cfg.get("pad_token_id", 1 if arch == "roberta" else 0)
        return "text_encoder", dict(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
            activation=_act(cfg, "hidden_act", "gelu"), norm="layernorm", norm_eps=cfg.get("layer_norm_eps", 1e-12),
            pre_norm=False, position="learned", max_positions=cfg.get("max_position_embeddings", 512),
            position_offset=pad + 1 if arch == "roberta" else 0, type_vocab_size=cfg.get("type_vocab_size", 2),
            pad_token_id=pad, dropout=cfg.get("hidden_dropout_prob", 0.1),
            attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1), causal=False,
            initializer_range=cfg.get("initializer_range", 0.02))
    if arch == "gpt2":
        for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                         ("add_cross_attention", True)):
            if cfg.get(key, not bad) == bad:
                raise ValueError(f"config.json: {key}={bad} is not supported")
        d = cfg["n_embd"]
        return "text_encoder", dict(
            vocab_size=cfg["vocab_size"], hidden_size=d, num_layers=cfg["n_layer"], num_heads=cfg["n_head"],
            intermediate_size=cfg.get("n_inner") or 4 * d, activation=_act(cfg, "activation_function", "gelu_new"),
            norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), pre_norm=True, embedding_norm=False,
            final_norm=True, position="learned", max_positions=cfg.get("n_positions", 1024), type_vocab_size=0,
            pad_token_id=None, dropout=cfg.get("resid_pdrop", 0.1), attention_dropout=cfg.get("attn_pdrop", 0.1),
            embedding_dropout=cfg.get("embd_pdrop", 0.1), causal=True,
            initializer_range=cfg.get("initializer_range", 0.02))
    return "vit", dict(
        image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 16),
        in_channels=cfg.get("num_channels", 3), hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        activation=_act(cfg, "hidden_act", "gelu"), norm="layernorm", norm_eps=cfg.get("layer_norm_eps", 1e-12),
        pre_norm=True, cls_token=True, position="learned", qkv_bias=cfg.get("qkv_bias", True),
        dropout=cfg.get("hidden_dropout_prob", 0.0), attention_dropout=cfg.get("attention_probs_dropout_prob", 0.0),
        initializer_range=cfg.get("initializer_range", 0.02))


def _need(arch: str, cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"to_hf: a Hugging Face {arch} model cannot express {what}")


def _hf_config(arch: str, kw: dict, heads: dict, backbone: nn.Module) -> dict:
    """config.json for a backbone built with builder kwargs ``kw``; raises ValueError naming what the
    Hugging Face architecture cannot express."""
    nl, act = kw["num_layers"], kw.get("activation", "gelu")
    inter = backbone.layers[0].mlp.fc2.in_features if nl else (kw.get("intermediate_size") or 4 * kw["hidden_size"])
    _need(arch, act in _ACT_TO_HF, f"activation={act!r}")
    _need(arch, kw.get("norm", "layernorm") == "layernorm", f"norm={kw.get('norm')!r}")
    _need(arch, kw.get("num_kv_heads") in (None, kw["num_heads"]), "grouped-query attention (num_kv_heads)")
    _need(arch, kw.get("bias", True), "bias=False")
    if arch == "vit":
        _need(arch, kw.get("pre_norm", True) and kw.get("final_norm") in (None, True), "post-norm layers")
        _need(arch, kw.get("cls_token", True) and kw.get("position", "learned") == "learned",
              "no cls token or fixed sin-cos positions")
        _need(arch, not kw.get("embedding_norm"), "a norm of the patch embeddings (embedding_norm, CLIP's ln_pre)")
        image, patch = kw.get("image_size", 224), kw.get("patch_size", 16)
        return dict(model_type="vit", hidden_size=kw["hidden_size"], num_hidden_layers=nl,
                    num_attention_heads=kw["num_heads"], intermediate_size=inter, hidden_act=_ACT_TO_HF[act],
                    hidden_dropout_prob=kw.get("dropout", 0.0),
                    attention_probs_dropout_prob=kw.get("attention_dropout", 0.0),
                    initializer_range=kw.get("initializer_range", 0.02), layer_norm_eps=kw.get("norm_eps", 1e-12),
                    image_size=image, patch_size=patch, num_channels=kw.get("in_channels", 3),
                    qkv_bias=kw.get("qkv_bias", True), architectures=["ViTModel"])
    _need(arch, kw.get("position", "learned") == "learned", f"position={kw.get('position')!r}")
    _need(arch, kw.get("embed_dim") in (None, kw["hidden_size"]), "a factorised embedding (embed_dim)")
    if arch == "gpt2":
        _need(arch, kw.get("pre_norm") and kw.get("causal") and kw.get("embedding_norm") is not True
              and kw.get("final_norm") is not False, "anything but a pre-norm causal stack with a final norm")
        _need(arch, not kw.get("type_vocab_size"), "token type embeddings")
        lm = heads.get("lm")
        drop = kw.get("dropout", 0.1)
        return dict(model_type="gpt2", vocab_size=kw["vocab_size"], n_positions=kw["max_positions"],
                    n_embd=kw["hidden_size"], n_layer=nl, n_head=kw["num_heads"], n_inner=inter,
                    activation_function=_ACT_TO_HF[act], resid_pdrop=drop, attn_pdrop=kw.get("attention_dropout", 0.1),
                    embd_pdrop=drop if kw.get("embedding_dropout") is None else kw["embedding_dropout"],
                    layer_norm_epsilon=kw.get("norm_eps", 1e-5), initializer_range=kw.get("initializer_range", 0.02),
                    tie_word_embeddings=lm is None or _is_tied(lm, backbone),
                    architectures=["GPT2LMHeadModel" if lm is not None else "GPT2Model"])
    _need(arch, not kw.get("pre_norm") and not kw.get("causal") and kw.get("embedding_norm") is not False
          and not kw.get("final_norm"), "anything but a post-norm bidirectional stack with an embedding norm")
    _need(arch, kw.get("type_vocab_size", 2) >= 1, "type_vocab_size=0 (it needs a token type table)")
    pad = kw.get("pad_token_id")
    if arch == "roberta":
        _need(arch, pad is not None and kw.get("position_offset") == pad + 1,
              "positions that do not start at pad_token_id + 1")
    else:
        _need(arch, not kw.get("position_offset"), "a position_offset (that is RoBERTa)")
    mlm = heads.get("mlm")
    if mlm is not None:
        want = kw.get("activation", "gelu") if arch == "bert" else "gelu"
        _need(arch, mlm.activation == want, f"an MLM head activation {mlm.activation!r} (its MLM head uses {want!r})")
        eps = kw.get("norm_eps", 1e-12)
        _need(arch, mlm.layer_norm.eps == eps, f"an MLM head LayerNorm eps {mlm.layer_norm.eps!r} other than the "
                                               f"backbone's norm_eps {eps!r} (its config has one layer_norm_eps)")
    name = {"bert": "Bert", "roberta": "Roberta"}[arch]
    if "nsp" in heads:  # BertForPreTraining / BertForNextSentencePrediction: the NSP classifier reads the pooler
        _need(arch, "pooler" in heads, "an NSP head without the pooler it classifies")
    if mlm is not None and "nsp" in heads and arch == "bert":
        architecture = "BertForPreTraining"
    elif "nsp" in heads and arch == "bert":  # NSP alone: bert.* + cls.seq_relationship.*
        architecture = "BertForNextSentencePrediction"
    else:
        architecture = f"{name}ForMaskedLM" if mlm is not None else f"{name}Model"
    drop = kw.get("dropout", 0.1)
    return dict(model_type=arch, vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"], num_hidden_layers=nl,
                num_attention_heads=kw["num_heads"], intermediate_size=inter, hidden_act=_ACT_TO_HF[act],
                hidden_dropout_prob=drop, attention_probs_dropout_prob=kw.get("attention_dropout", 0.1),
                max_position_embeddings=kw["max_positions"], type_vocab_size=kw.get("type_vocab_size", 2),
                initializer_range=kw.get("initializer_range", 0.02), layer_norm_eps=kw.get("norm_eps", 1e-12),
                pad_token_id=pad, position_embedding_type="absolute",
                tie_word_embeddings=mlm is None or _is_tied(mlm, backbone), architectures=[architecture])


def infer_arch(backbone: nn.Module) -> str:
    """The Hugging Face architecture a fastpt backbone corresponds to: "vit" for a VisionEncoder;
    for a TextEncoder "gpt2" when causal, "roberta" with a position offset, else "bert"."""
    if isinstance(backbone, VisionEncoder):
        return "vit"
    if not isinstance(backbone, TextEncoder):
        raise TypeError(f"backbone: expected a TextEncoder or VisionEncoder, got {type(backbone).__name__}")
    if backbone.causal:
        return "gpt2"
    return "roberta" if backbone.embeddings.position_offset else "bert"


# ----------------------------------------------------------------------------- weight names


def _rules(arch: str, num_layers: int) -> list[tuple[tuple[str, ...], str, str]]:
    """(Hugging Face keys, fastpt key, op) for every weight; op is "copy", "T" (transpose, GPT-2's
    Conv1D) or "cat" (q, k, v rows into one fused projection). HF keys are relative to the base
    model unless they start with one of ``_TOP_LEVEL``; fastpt keys start with "backbone." or
    "heads.<name>."."""
    r = []

    def add(hf, ours, op="copy", params=("weight", "bias")):
        for p in params:
            r.append((tuple(f"{h}.{p}" for h in hf) if isinstance(hf, tuple) else (f"{hf}.{p}",), f"{ours}.{p}", op))

    def encoder_layer(h, o, attention, norm1, norm2):
        """One post-LN encoder layer: BERT's and ViT's differ only in the names below ``h``."""
        for p in ("weight", "bias"):
            r.append((tuple(f"{h}{attention}.{x}.{p}" for x in ("query", "key", "value")),
                      f"{o}attn.in_proj_{p}", "cat"))
        add(f"{h}attention.output.dense", f"{o}attn.out_proj")
        add(f"{h}{norm1}", f"{o}norm1")
        add(f"{h}intermediate.dense", f"{o}mlp.fc1")
        add(f"{h}output.dense", f"{o}mlp.fc2")
        add(f"{h}{norm2}", f"{o}norm2")

    b = "backbone."
    if arch in ("bert", "roberta"):
        for name in ("word", "position", "token_type"):
            add(f"embeddings.{name}_embeddings", f"{b}embeddings.{name}_embeddings", params=("weight",))
        add("embeddings.LayerNorm", f"{b}embeddings.norm")
        for i in range(num_layers):
            encoder_layer(f"encoder.layer.{i}.", f"{b}layers.{i}.", "attention.self", "attention.output.LayerNorm",
                          "output.LayerNorm")
        add("pooler.dense", "heads.pooler.dense")
        head = "cls.predictions" if arch == "bert" else "lm_head"
        add(f"{head}.transform.dense" if arch == "bert" else f"{head}.dense", "heads.mlm.dense")
        add(f"{head}.transform.LayerNorm" if arch == "bert" else f"{head}.layer_norm", "heads.mlm.layer_norm")
        # The output bias: transformers < 5 ties decoder.bias to bias in code; 5.x ties them with the embedding
        # (tie_word_embeddings) and otherwise uses decoder.bias alone. Read decoder.bias when present, write both.
        r.append(((f"{head}.decoder.bias", f"{head}.bias"), "heads.mlm.bias", "any"))
        r.append(((f"{head}.decoder.weight",), "heads.mlm.weight", "copy"))  # untied heads only
        add("cls.seq_relationship", "heads.nsp")
    elif arch == "gpt2":
        add("wte", f"{b}embeddings.word_embeddings", params=("weight",))
        add("wpe", f"{b}embeddings.position_embeddings", params=("weight",))
        for i in range(num_layers):
            h, o = f"h.{i}.", f"{b}layers.{i}."
            add(f"{h}ln_1", f"{o}norm1")
            r.append(((f"{h}attn.c_attn.weight",), f"{o}attn.in_proj_weight", "T"))
            r.append(((f"{h}attn.c_attn.bias",), f"{o}attn.in_proj_bias", "copy"))
            r.append(((f"{h}attn.c_proj.weight",), f"{o}attn.out_proj.weight", "T"))
            r.append(((f"{h}attn.c_proj.bias",), f"{o}attn.out_proj.bias", "copy"))
            add(f"{h}ln_2", f"{o}norm2")
            for hf, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
                r.append(((f"{h}mlp.{hf}.weight",), f"{o}mlp.{ours}.weight", "T"))
                r.append(((f"{h}mlp.{hf}.bias",), f"{o}mlp.{ours}.bias", "copy"))
        add("ln_f", f"{b}final_norm")
        r.append((("lm_head.weight",), "heads.lm.weight", "copy"))  # untied heads only
    else:
        for name in ("cls_token", "position_embeddings"):
            r.append(((f"embeddings.{name}",), f"{b}patch_embed.{name}", "copy"))
        add("embeddings.patch_embeddings.projection", f"{b}patch_embed.projection")
        for i in range(num_layers):
            encoder_layer(f"encoder.layer.{i}.", f"{b}layers.{i}.", "attention.attention", "layernorm_before",
                          "layernorm_after")
        add("layernorm", f"{b}final_norm")
        add("pooler.dense", "heads.pooler.dense")
    return r


# transformers >= 5 names ViT weights like this in memory (it saves the names above): accept both
_VIT_NEW = [(re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."), (re.compile(r"\.attention\.q_proj\."),
            ".attention.attention.query."), (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
            (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
            (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
            (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."), (re.compile(r"\.mlp\.fc2\."), ".output.dense.")]


def _normalise(arch: str, sd: dict) -> dict:
    """Strip the base-model prefix and undo legacy spellings (``LayerNorm.gamma`` / ``beta``)."""
    prefix = _BASE_PREFIX[arch]
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        if arch == "vit":
            for pattern, repl in _VIT_NEW:
                key = pattern.sub(repl, key)
        out[key] = value
    return out


def _tied_head_weight(key: str, heads: dict, backbone: nn.Module) -> bool:
    """Whether ``key`` names a head's vocabulary weight that is the embedding itself (mapped once)."""
    parts = key.split(".")
    return parts[0] == "heads" and parts[-1] == "weight" and len(parts) == 3 and parts[1] in heads \
        and isinstance(heads[parts[1]], (MLMHead, LMHead)) and _is_tied(heads[parts[1]], backbone)


def _is_tied(head: nn.Module, backbone: nn.Module) -> bool:
    emb = getattr(getattr(backbone, "embeddings", None), "word_embeddings", None)
    return emb is not None and head.weight is emb.weight


# ----------------------------------------------------------------------------- loading and saving tensors


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # an optional dependency (the hf extra)
        raise ImportError("fastpt's checkpoint conversion needs safetensors: pip install safetensors") from exc
    return st


def _as_path(path, where: str) -> Path:
    """``path`` as a Path; TypeError naming it (not pathlib's "expected str, bytes or os.PathLike") otherwise."""
    try:
        return Path(path)
    except TypeError:
        raise TypeError(f"{where}: path: expected a directory (str or os.PathLike), got {type(path).__name__}") \
            from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, its SafetensorError (neither ValueError nor OSError) as a
    ValueError naming the file."""
    st = _safetensors()
    from safetensors import SafetensorError
    try:
        return st.load_file(str(file))
    except SafetensorError as exc:
        raise ValueError(f"{file}: not a valid safetensors file (truncated or corrupt): {exc}") from exc


_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``. The umask is read from
    ``/proc/self/status`` (Linux), else by setting it and back under a lock (``os.umask`` has no getter)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, torch.Tensor], file, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` to ``file`` through ``.<name>.tmp-PID`` beside it, fsynced, with the mode
    any other file of the directory gets (``new_file_mode``), then ``os.replace``: readers see the old file or
    the whole new one.

    safetensors writes through a ``tempfile.mkstemp`` file, mode 0600 whatever the umask: a checkpoint's
    weights were unreadable to another user (or container uid) who read its JSON files, and ``from_pretrained``
    there said FileNotFoundError. Its SafetensorError (neither OSError nor ValueError: a read-only directory or
    a full disk ended ``fastpt convert`` in a traceback) becomes an OSError naming ``file`` (the errno read from
    its message); the temporary file is removed and ``file`` left as it was.
    """
    st, file = _safetensors(), Path(file)  # ImportError naming the extra first
    from safetensors import SafetensorError

    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        st.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, new_file_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, file)
    except SafetensorError as exc:
        m = re.search(r"os error (\d+)", str(exc))  # "I/O error: No space left on device (os error 28)"
        if m:
            raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(file)) from exc
        raise OSError(f"{file}: cannot write the weights (safetensors: {exc})") from exc
    except OSError as exc:  # chmod / fsync (a disk full or failing after the data was handed over)
        if exc.filename is not None:
            raise
        raise named_os_error(exc, file) from exc  # the temporary file is gone (finally)
    finally:
        unlink_quietly(tmp)  # e.g. a read-only directory, where nothing was written either


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, a sharded safetensors index, or (fallback) pytorch_model.bin.

    Raises ValueError naming the index, the weight and the file when a weight_map value is not a
    file name of ``path`` (absolute, or with '/', '\\' or '..': it would read files outside it).
    """
    _safetensors()
    if (path / "model.safetensors").exists():
        return _load_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").exists():
        index = _read_config(path, "model.safetensors.index.json")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{path / 'model.safetensors.index.json'}: expected a \"weight_map\" object of "
                             f"weight name -> shard file, got {weight_map!r:.80}")
        for name, shard in weight_map.items():  # the index ships with the directory: no ../x, no /abs
            check_file_name(path / "model.safetensors.index.json", f"weight_map[{name!r}]", shard, ValueError)
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_safetensors(path / shard))
        return sd
    if (path / "pytorch_model.bin").exists():
        file = path / "pytorch_model.bin"
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
            raise ValueError(f"{file}: not a valid PyTorch checkpoint (truncated or corrupt, or not a plain "
                             f"state dict of tensors; torch.load raised {type(exc).__name__})") from exc
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError(f"{file}: expected a state dict (weight name -> tensor), got {type(sd).__name__}")
        return sd
    raise FileNotFoundError(f"path: no model.safetensors (or index, or pytorch_model.bin) in {path}")


def _read_config(path: Path, name: str) -> dict:
    """A JSON object file of the directory; FileNotFoundError / ValueError naming the file."""
    file = path / name
    if not file.exists():
        raise FileNotFoundError(f"path: no {name} in {path}")
    return read_json_object(file)


def _named(backbone: nn.Module, heads: dict) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under "backbone." / "heads.<name>." (tied ones twice)."""
    named = {f"backbone.{k}": v for k, v in backbone.state_dict(keep_vars=True).items()}
    for name, head in heads.items():
        named.update({f"heads.{name}.{k}": v for k, v in head.state_dict(keep_vars=True).items()})
    return named


def _load_into(named: dict, values: dict, what: str) -> None:
    """Copy ``values`` into the tensors of ``named``; every tensor must get a value (tied copies
    count as filled once their shared tensor is)."""
    filled = set()
    with torch.no_grad():
        for key, value in values.items():
            target = named[key]
            if value.dim() == 0 and tuple(target.shape) == (1,):  # a scalar saved 0-dim (CLIP's logit_scale before
                value = value.reshape(1)                           # it took shape (1,) for FSDP2)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(target.shape)}")
            target.copy_(value)
            filled.add(id(target))
    missing = [k for k, t in named.items() if id(t) not in filled]
    if missing:
        raise ValueError(f"{what}: no weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")


# ----------------------------------------------------------------------------- heads


def head_spec(name: str, head: nn.Module, backbone: nn.Module) -> dict:
    """A JSON-able description of a head, enough for ``build_heads`` to rebuild it."""
    if isinstance(head, MLMHead):
        return dict(type="mlm", activation=head.activation, layer_norm_eps=head.layer_norm.eps,
                    tied=_is_tied(head, backbone))
    if isinstance(head, LMHead):
        return dict(type="lm", bias=head.bias is not None, tied=_is_tied(head, backbone))
    if isinstance(head, Pooler):
        return dict(type="pooler")
    if type(head) is nn.Linear:
        return dict(type="linear", in_features=head.in_features, out_features=head.out_features,
                    bias=head.bias is not None)
    raise TypeError(f"heads[{name!r}]: cannot describe a {type(head).__name__} (expected MLMHead, LMHead, Pooler "
                    f"or nn.Linear)")


def build_heads(specs: dict, backbone: nn.Module) -> dict[str, nn.Module]:
    """Heads from ``head_spec`` dicts; tied ones share ``backbone.embeddings.word_embeddings.weight``."""
    d, heads = backbone.hidden_size, {}
    for name, spec in specs.items():
        kind = spec.get("type")
        tied = backbone.embeddings.word_embeddings.weight if spec.get("tied") else None
        if kind == "mlm":
            heads[name] = MLMHead(d, backbone.vocab_size, activation=spec.get("activation", "gelu"),
                                  layer_norm_eps=spec.get("layer_norm_eps", 1e-12), tied_weight=tied)
        elif kind == "lm":
            heads[name] = LMHead(d, backbone.vocab_size, tied_weight=tied, bias=spec.get("bias", False))
        elif kind == "pooler":
            heads[name] = Pooler(d)
        elif kind == "linear":
            heads[name] = nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", True))
        else:
            raise ValueError(f"heads.{name}.type: expected one of ['mlm', 'lm', 'pooler', 'linear'], got {kind!r}")
    return heads


def _hf_heads(arch: str, cfg: dict, sd: dict, backbone: nn.Module) -> dict:
    """The head specs a Hugging Face checkpoint holds weights for."""
    tied = cfg.get("tie_word_embeddings", True)
    specs = {}
    if arch in ("bert", "roberta"):
        mlm = "cls.predictions.bias" if arch == "bert" else "lm_head.bias"
        if mlm in sd or f"{mlm[:-4]}decoder.bias" in sd:
            act = backbone.config["activation"] if arch == "bert" else "gelu"  # RobertaLMHead: always gelu
            specs["mlm"] = dict(type="mlm", activation=act, layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                                tied=tied or f"{mlm[:-4]}decoder.weight" not in sd)
        if "cls.seq_relationship.weight" in sd:
            specs["nsp"] = dict(type="linear", in_features=backbone.hidden_size, out_features=2, bias=True)
    elif arch == "gpt2":  # GPT-2's LM head is the (tied) embedding: every checkpoint has it
        specs["lm"] = dict(type="lm", bias=False, tied=tied or "lm_head.weight" not in sd)
    if "pooler.dense.weight" in sd:
        if arch == "vit" and (cfg.get("pooler_act", "tanh") != "tanh"
                              or cfg.get("pooler_output_size") not in (None, cfg["hidden_size"])):
            warnings.warn("from_hf: this ViT pooler (pooler_act / pooler_output_size) is not supported; dropped it")
        else:
            specs["pooler"] = dict(type="pooler")
    return specs


# ----------------------------------------------------------------------------- public API


def from_hf(path, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """Load a Hugging Face BERT, RoBERTa, GPT-2 or ViT directory (config.json + safetensors).

    Args:
        path: the directory (any of the base model or its *ForMaskedLM / *LMHeadModel /
            *ForPreTraining / *ForImageClassification variants; task heads such as a classifier
            are ignored with a warning).
        dtype: parameter dtype (default float32).

    Returns ``(backbone, heads, config)``:
        backbone: a ``TextEncoder`` (BERT, RoBERTa: post-norm, bidirectional; GPT-2: pre-norm,
            causal) or ``VisionEncoder`` (ViT), built by ``text_encoder`` / ``vit`` from config.json;
        heads: dict with the heads the checkpoint has weights for: "mlm" (``MLMHead``, BERT's
            ``cls.predictions`` / RoBERTa's ``lm_head``, tied to the word embedding), "lm" (GPT-2,
            ``LMHead`` tied to ``wte``), "pooler" (``Pooler``), "nsp" (``nn.Linear(D, 2)``, BERT's
            ``cls.seq_relationship``);
        config: ``{"format": "fastpt", "format_version", "arch", "backbone": backbone.config,
            "heads": {name: head_spec}, "hf_config": the config.json dict}``.

    Raises FileNotFoundError (no config.json / weights), ValueError (an unsupported model_type or
    option, a missing config.json key, a corrupt config.json / weights file, missing or mis-shaped
    weights; the message names it), TypeError (``path`` not a str or os.PathLike).
    """
    path = _as_path(path, "from_hf")
    cfg = _read_config(path, "config.json")
    arch = cfg.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"config.json: model_type={arch!r} is not supported (expected one of {list(ARCHS)})")
    try:
        builder, kwargs = _backbone_kwargs(arch, cfg)
    except KeyError as exc:
        raise ValueError(f"{path / 'config.json'}: no {exc.args[0]!r} (required for model_type "
                         f"{arch!r})") from None
    backbone = BUILDERS[builder](**kwargs)
    sd = _normalise(arch, _read_weights(path))
    heads = build_heads(_hf_heads(arch, cfg, sd, backbone), backbone)
    named = _named(backbone, heads)
    values, used = {}, set()
    for hf_keys, ours, op in _rules(arch, kwargs["num_layers"]):
        if ours not in named or _tied_head_weight(ours, heads, backbone):
            continue
        present = [k for k in hf_keys if k in sd]
        if not present or (op != "any" and len(present) < len(hf_keys)):
            continue  # reported below as the model tensor nobody filled
        ts = [sd[k] for k in present]  # "any": the first name the checkpoint holds (to_hf writes them all)
        values[ours] = torch.cat(ts, 0) if op == "cat" else ts[0].t() if op == "T" else ts[0]
        used.update(present)
    _load_into(named, values, f"from_hf({path})")
    unused = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
    if unused:
        warnings.warn(f"from_hf: ignored {len(unused)} weights fastpt has no place for: {unused[:6]}"
                      f"{' ...' if len(unused) > 6 else ''}")
    if dtype is not None:
        backbone.to(dtype)
        for head in heads.values():
            head.to(dtype)
    config = dict(format="fastpt", format_version=FORMAT_VERSION, arch=arch, backbone=dict(backbone.config),
                  heads={n: head_spec(n, h, backbone) for n, h in heads.items()}, hf_config=cfg)
    return backbone, heads, config


def to_hf(backbone: nn.Module, heads: dict | None, path, *, arch: str | None = None,
          hf_config: dict | None = None) -> Path:
    """Write ``backbone`` (+ ``heads``) as a Hugging Face directory: config.json + model.safetensors.

    Args:
        backbone: a ``TextEncoder`` or ``VisionEncoder`` built by ``text_encoder`` / ``vit`` (its
            ``.config`` gives the architecture's arguments).
        heads: dict of heads ("mlm", "lm", "pooler", "nsp"; others raise), or None.
        path: output directory (created).
        arch: "bert", "roberta", "gpt2" or "vit"; default ``infer_arch(backbone)``.
        hf_config: a config.json dict to start from (``from_hf``'s ``config["hf_config"]``): keys
            fastpt does not model (token ids, tokenizer class, ...) are kept, structural ones
            overwritten.

    The architecture written: BertForPreTraining (mlm + nsp), BertForNextSentencePrediction (nsp
    alone), Bert/RobertaForMaskedLM (mlm), GPT2LMHeadModel (lm), else the base model (an "nsp" head
    needs the "pooler" it classifies). Tied head weights are not written (transformers ties them on
    load). config.json's ``dtype`` (and the older ``torch_dtype``) is the dtype of the tensors written,
    not ``hf_config``'s: transformers 5 loads a checkpoint in that dtype by default, so a float16 source
    trained and written in float32 is not rounded back to float16 on load. Returns the directory.
    Raises ValueError naming what the Hugging Face architecture cannot express (e.g. rotary positions,
    RMSNorm, GLU); OSError naming the file that cannot be written (a full disk, a read-only ``path``). Each
    file goes to a temporary name first and is moved into place (``save_safetensors``), so a failed write
    leaves the file an earlier conversion wrote there whole.
    """
    heads = dict(heads or {})
    arch = infer_arch(backbone) if arch is None else arch
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {list(ARCHS)}, got {arch!r}")
    kw = backbone.config
    if not kw:
        raise ValueError("backbone: has no .config (build it with text_encoder / vit)")
    allowed = {"bert": ("mlm", "nsp", "pooler"), "roberta": ("mlm", "pooler"), "gpt2": ("lm",), "vit": ("pooler",)}
    for name in heads:
        if name not in allowed[arch]:
            raise ValueError(f"heads: {arch} has no place for a {name!r} head (expected some of {allowed[arch]})")
    new = _hf_config(arch, kw, heads, backbone)
    cfg = {k: v for k, v in (hf_config or {}).items()
           if k not in ("architectures", "_name_or_path", "dtype", "torch_dtype")}
    cfg.update(new)
    wrapped = new["architectures"][0] not in ("BertModel", "RobertaModel", "GPT2Model", "ViTModel")
    named = _named(backbone, heads)
    out = {}
    for hf_keys, ours, op in _rules(arch, kw["num_layers"]):
        if ours not in named or _tied_head_weight(ours, heads, backbone):
            continue
        t = named[ours].detach()
        parts = t.chunk(3, 0) if op == "cat" else [t] * len(hf_keys) if op == "any" else [t.t() if op == "T" else t]
        for k, part in zip(hf_keys, parts):
            if wrapped and not k.startswith(_TOP_LEVEL):
                k = _BASE_PREFIX[arch] + k
            out[k] = part.contiguous().clone()
    dtype = _written_dtype(out.values())
    if dtype is not None:  # transformers 5 loads in config.json's dtype by default (dtype="auto"); 4.x: torch_dtype
        cfg["dtype"] = cfg["torch_dtype"] = dtype
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, path / "model.safetensors", metadata={"format": "pt"})
    write_text_atomic(path / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def _written_dtype(tensors) -> str | None:
    """config.json's ``dtype`` for the tensors written: their floating dtype ("float32", "bfloat16" ...), float32
    when they mix several (a wider one than any of them would round none), None without floating tensors."""
    kinds = {t.dtype for t in tensors if t.is_floating_point()}
    if not kinds:
        return None
    return str(kinds.pop() if len(kinds) == 1 else torch.float32).removeprefix("torch.")


def save_fastpt(path, backbone: nn.Module, heads: dict | None = None, *, hf_config: dict | None = None,
                arch: str | None = None) -> Path:
    """Write fastpt's format: ``fastpt_config.json`` + ``model.safetensors`` (see the module docstring).
    ``hf_config`` / ``arch`` are kept for a later ``to_hf``. Returns the directory. Raises OSError naming the
    file that cannot be written (each is written to a temporary name and moved into place)."""
    heads = dict(heads or {})
    config = dict(format="fastpt", format_version=FORMAT_VERSION, arch=arch, backbone=dict(backbone.config),
                  heads={n: head_spec(n, h, backbone) for n, h in heads.items()}, hf_config=hf_config)
    if config["backbone"].get("builder") not in BUILDERS:
        raise ValueError(f"backbone: its .config must name a builder in {sorted(BUILDERS)}")
    tensors, seen = {}, set()
    for key, t in _named(backbone, heads).items():
        if id(t) in seen:  # a tied weight: stored once, under the backbone
            continue
        seen.add(id(t))
        tensors[key] = t.detach().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path / "model.safetensors", metadata={"format": "pt", "fastpt": "1"})
    write_text_atomic(path / "fastpt_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def load_fastpt(path, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """Read ``save_fastpt``'s directory: ``(backbone, heads, config)`` as ``from_hf`` returns them.

    Raises ValueError naming fastpt_config.json when it is not a fastpt config or its
    ``format_version`` is newer than ``FORMAT_VERSION`` (a later fastpt wrote it: its keys may mean
    what this one cannot read, so it is refused rather than half-loaded), as
    ``models.model.read_checkpoint_config`` does for ``save_pretrained`` directories.
    """
    path = _as_path(path, "load_fastpt")
    config = _read_config(path, "fastpt_config.json")
    file = path / "fastpt_config.json"
    if config.get("format") != "fastpt":
        raise ValueError(f"path: {file} is not a fastpt config (format != 'fastpt')")
    version = config.get("format_version", 0)  # absent: written before versions were recorded
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{file}: format_version must be a non-negative integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version} is newer than this fastpt reads ({FORMAT_VERSION}); "
                         f"upgrade fastpt")
    kwargs = dict(config["backbone"])
    builder = kwargs.pop("builder", None)
    if builder not in BUILDERS:
        raise ValueError(f"backbone.builder: expected one of {sorted(BUILDERS)}, got {builder!r}")
    backbone = BUILDERS[builder](**kwargs)
    heads = build_heads(config.get("heads", {}), backbone)
    _load_into(_named(backbone, heads), _read_weights(path), f"load_fastpt({path})")
    if dtype is not None:
        backbone.to(dtype)
        for head in heads.values():
            head.to(dtype)
    return backbone, heads, config


TOKENIZER_FILES = SIDE_FILES[:9]  # the tokenizer's files among SIDE_FILES


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy ``src``'s tokenizer / processor files into ``dst``. When ``src`` brings a tokenizer, tokenizer files
    ``dst`` holds from an earlier conversion and ``src`` lacks are removed: a stale tokenizer_config.json kept
    another tokenizer's special tokens beside the new tokenizer.json (ids past the model's vocabulary)."""
    if any((src / name).is_file() for name in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            if not (src / name).is_file() and (dst / name).is_file():
                (dst / name).unlink()
    for name in SIDE_FILES:
        if (src / name).is_file():
            try:
                shutil.copyfile(src / name, dst / name)
            except OSError as exc:
                if exc.filename is not None:
                    raise
                raise named_os_error(exc, dst / name) from exc  # a full disk's error names no file


def check_out_dir(src, out, flag: str) -> None:
    """ValueError when OUT is the source directory or inside it: the conversion writes its model.safetensors
    and config.json there (the source's weights were overwritten before the error)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if o == s or s in o.parents:
        raise ValueError(f"OUT: {out} is {'the' if o == s else 'inside the'} {flag} directory {src}; the conversion "
                         "would overwrite its files: choose another OUT")


def write_tokenizer_config(path, special_ids: dict | None = None) -> Path | None:
    """Give a Hugging Face directory's ``tokenizer.json`` the ``tokenizer_config.json`` transformers needs.

    A pretrain checkpoint carries only its shards' ``tokenizer.json``. Beside a config.json and no
    tokenizer_config.json, ``AutoTokenizer`` builds the model type's tokenizer class from its defaults
    (transformers 5: an empty 5-token BertTokenizer, [UNK] for every word, or a WordPiece error for a
    BPE tokenizer.json; 4.x: BertTokenizerFast with its own do_lower_case default). This writes
    ``tokenizer_class: PreTrainedTokenizerFast`` (tokenizer.json as it is), the special tokens by
    role (``cls_token`` ... as ``fastpt.data.tokenizer.special_token_ids`` finds them by name;
    ``special_ids``, role -> id, win where the id is a token of that role's names, or a special token
    for a role the names miss) and ``model_max_length`` from config.json's positions. Nothing is written when ``path`` has no tokenizer.json or already has a
    tokenizer_config.json. Returns the file written, or None. Raises ValueError for an unreadable
    tokenizer.json.
    """
    from ..data.tokenizer import _ROLE_TOKENS, load_tokenizer, special_token_ids

    path = Path(path)
    if not (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").exists():
        return None
    tok = load_tokenizer(path / "tokenizer.json")
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tokens = {role: tok.id_to_token(tid) for role, tid in special_token_ids(tok).items()}
    for role, tid in (special_ids or {}).items():
        token = tok.id_to_token(int(tid)) if role in TOKENIZER_ROLES else None
        # the model's id wins where it names a token of that role, or a special token for a role the names
        # miss; not an id of another tokenizer (a zoo config's unk 100, config.json's default pad 0 = <s>)
        if token is not None and (token in _ROLE_TOKENS[role] or (role not in tokens and token in specials)):
            tokens[role] = token
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({f"{role}_token": tokens[role] for role in TOKENIZER_ROLES if role in tokens})
    hf = read_json_object(path / "config.json", ValueError) if (path / "config.json").is_file() else {}
    positions = hf.get("n_positions") if hf.get("model_type") == "gpt2" else hf.get("max_position_embeddings")
    if isinstance(positions, int):
        if hf.get("model_type") == "roberta":  # positions start after the pad id
            pad = hf.get("pad_token_id")
            positions -= (1 if pad is None else pad) + 1
        config["model_max_length"] = positions
    write_text_atomic(path / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path / "tokenizer_config.json"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_main(argv: list[str] | None = None) -> int:
    """``fastpt convert --from-hf DIR OUT`` / ``--to-hf DIR OUT``; returns the exit status.

    --from-hf: a Hugging Face directory to fastpt's format (``save_fastpt``); --to-hf: fastpt's
    format to a Hugging Face directory (``to_hf``, architecture from the saved config or
    inferred, or ``--arch``). Tokenizer / processor files are copied along; --to-hf gives a
    tokenizer.json without tokenizer_config.json one (``write_tokenizer_config``).
    """
    parser = argparse.ArgumentParser(prog="fastpt convert",
                                     description="Convert checkpoints between Hugging Face and fastpt.")
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", help="Hugging Face directory (config.json + model.safetensors)")
    way.add_argument("--to-hf", metavar="DIR", help="fastpt directory (fastpt_config.json + model.safetensors)")
    parser.add_argument("out", metavar="OUT", help="output directory")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="parameter dtype to write")
    parser.add_argument("--arch", choices=ARCHS, default=None, help="--to-hf: Hugging Face architecture")
    args = parser.parse_args(argv)
    dtype = _DTYPES.get(args.dtype)
    try:
        check_out_dir(args.from_hf or args.to_hf, args.out, "--from-hf" if args.from_hf else "--to-hf")
        if args.from_hf:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                backbone, heads, config = from_hf(args.from_hf, dtype=dtype)
            for w in caught:
                print(f"fastpt convert: warning: {w.message}", file=sys.stderr)
            out = save_fastpt(args.out, backbone, heads, hf_config=config["hf_config"], arch=config["arch"])
            src = Path(args.from_hf)
        else:
            backbone, heads, config = load_fastpt(args.to_hf, dtype=dtype)
            out = to_hf(backbone, heads, args.out, arch=args.arch or config.get("arch"),
                        hf_config=config.get("hf_config"))
            src = Path(args.to_hf)
        _copy_side_files(src, out)
        if args.to_hf:  # a tokenizer.json alone loads as an empty tokenizer of the model type
            hf = config.get("hf_config") or {}
            write_tokenizer_config(out, {role: hf[f"{role}_token_id"] for role in TOKENIZER_ROLES
                                         if isinstance(hf.get(f"{role}_token_id"), int)})
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"fastpt convert: error: {exc}", file=sys.stderr)
        return 1
    params = {id(p): p for m in [backbone, *heads.values()] for p in m.parameters()}
    n = sum(p.numel() for p in params.values())
    print(f"fastpt convert: wrote {out} ({type(backbone).__name__}, heads {sorted(heads)}, {n:,} parameters)")
    return 0
