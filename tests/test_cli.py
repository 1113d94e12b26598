"""The ``fastpt`` command's own routing: subcommands delegate to their modules' entry points."""
import pytest

import fastpt
from fastpt.cli import DELEGATED, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ["info", "demo-masking", *DELEGATED]:
        assert name in out


def test_configs_lists_the_zoo(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in fastpt.list_configs())
    assert main(["configs", "bert-tiny"]) == 0
    assert "text_encoder" in capsys.readouterr().out


def test_convert_to_hf_takes_a_training_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model = fastpt.build("bert-tiny", backbone={"vocab_size": 97, "max_positions": 32},
                         special_ids={"mask": 3, "pad": 0, "cls": 1, "sep": 2})
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "BertForMaskedLM" and hf.config.vocab_size == 97
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2"), "--dtype", "float16"]) == 2


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_convert_to_hf_writes_the_checkpoints_tokenizer(tmp_path, capsys, kind):
    """`fastpt convert --to-hf` of a pretrain checkpoint wrote no tokenizer files although the checkpoint holds
    the shards' tokenizer.json: transformers then built an empty 5-token tokenizer ([UNK] for every word).
    It copies tokenizer.json with a tokenizer_config.json naming its special tokens, and takes a run directory
    (its newest checkpoint) as eval and init_from do."""
    transformers = pytest.importorskip("transformers")
    from fastpt.data.tokenizer import special_token_ids, train_tokenizer
    from fastpt.train import checkpoint as ckpt

    tok = train_tokenizer(iter(["river stone cloud rain", "stone rivers flow over clouds"] * 20), kind,
                          300 if kind == "bpe" else 60)
    ids = special_token_ids(tok)
    model = fastpt.build("bert-tiny", vocab_size=tok.get_vocab_size(), special_ids=ids,
                         backbone={"num_layers": 1, "max_positions": 48})

    def write_model(d):
        model.save_pretrained(d)
        tok.save(str(d / "tokenizer.json"))

    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 3, write_model=write_model, optimizer_state=None,
                         trainer_state={"step": 3}, rng_tensors={})
    assert main(["convert", "--to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "step-00000003" in capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "stone rivers flow over the clouds"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids and len(hf_tok) == tok.get_vocab_size()
    for role in ("cls", "sep", "pad", "mask", "unk"):
        assert getattr(hf_tok, f"{role}_token_id") == ids[role], role
    assert hf_tok.model_max_length == 48
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    assert st.tokenizer(text)["input_ids"] == tok.encode(text).ids


def _assert_clean_error(rc, err, prefix):
    assert rc not in (0, None) and f"{prefix}: error:" in err and "Traceback" not in err, err[-1000:]


@pytest.mark.parametrize("zoo,overrides,named", [
    ("t5-small", {"backbone": {"vocab_size": 64, "hidden_size": 16, "num_encoder_layers": 1, "num_decoder_layers": 1,
                               "num_heads": 2, "intermediate_size": 32}}, "EncoderDecoder"),
    ("vit-mae-tiny", {"backbone": {"image_size": 8, "patch_size": 4, "in_channels": 1, "hidden_size": 16,
                                   "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
                      "objective": {"decoder_hidden_size": 16, "decoder_layers": 1, "decoder_heads": 2}}, "cls token"),
    ("albert-base", {"backbone": {"vocab_size": 64, "embed_dim": 8, "hidden_size": 16, "num_layers": 1,
                                  "num_heads": 2, "intermediate_size": 32, "max_positions": 16}},
     "factorised embedding"),
], ids=["encoder-decoder", "vit-sincos", "albert"])
def test_convert_to_hf_of_what_hugging_face_cannot_express(tmp_path, capsys, zoo, overrides, named):
    """fastpt.to_hf's TypeError / ValueError escaped `fastpt convert --to-hf` as a traceback; the
    backbone path (models.hf.convert_main) already answered `fastpt convert: error:` and status 1."""
    model = fastpt.build(zoo, **overrides)
    model.save_pretrained(tmp_path / "ckpt")
    rc = main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "fastpt convert")
    assert named in err and str(tmp_path / "ckpt") in err


def test_configs_of_an_unknown_name_or_a_recipe_file(tmp_path, capsys):
    """load_config's ValueError (a clear message) escaped `fastpt configs NAME` as a traceback."""
    _assert_clean_error(main(["configs", "nope"]), capsys.readouterr().err, "fastpt configs")
    (tmp_path / "recipe.yaml").write_text("model: bert-tiny\ntrain: {max_steps: 1}\n")  # a pretrain recipe
    rc = main(["configs", str(tmp_path / "recipe.yaml")])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "fastpt configs")
    assert "'model'" in err


def test_a_damaged_checkpoint_named_directly_is_refused(tmp_path, capsys):
    """`fastpt convert --to-hf runs/x/checkpoints/step-N` (the README's form) and eval on a step directory
    loaded a checkpoint whose weights no longer match its checkpoint.json (exit 0: corrupt weights exported);
    a run directory was verified. Both now verify a checkpoint named directly."""
    from fastpt.train import checkpoint as ckpt
    from fastpt.train.evaluate import resolve_checkpoint

    model = fastpt.build("bert-tiny", vocab_size=97, special_ids={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
                         backbone={"num_layers": 1, "max_positions": 48})
    step = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 3, write_model=model.save_pretrained,
                                optimizer_state=None, trainer_state={"step": 3}, rng_tensors={})
    assert resolve_checkpoint(step) == step
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of a tensor
    weights.write_bytes(bytes(data))
    assert main(["convert", "--to-hf", str(step), str(tmp_path / "hf")]) == 1
    assert "sha256 differs" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    with pytest.raises(ckpt.CorruptCheckpointError, match="sha256 differs"):
        resolve_checkpoint(step)


def _tokenized_checkpoint(root, kind):
    from fastpt.data.tokenizer import special_token_ids, train_tokenizer
    from fastpt.train import checkpoint as ckpt

    tok = train_tokenizer(iter(["river stone cloud rain", "stone rivers flow over clouds"] * 20), kind,
                          300 if kind == "bpe" else 60)
    model = fastpt.build("bert-tiny", vocab_size=tok.get_vocab_size(), special_ids=special_token_ids(tok),
                         backbone={"num_layers": 1, "max_positions": 48})

    def write_model(d):
        model.save_pretrained(d)
        tok.save(str(d / "tokenizer.json"))

    return ckpt.save_checkpoint(root / "checkpoints", 1, write_model=write_model, optimizer_state=None,
                                trainer_state={"step": 1}, rng_tensors={}), tok


def test_convert_refuses_out_in_the_source_and_replaces_a_stale_tokenizer_config(tmp_path, capsys):
    """convert with OUT = the source directory overwrote the source's weights before failing (--to-hf) or
    replaced a Hugging Face checkpoint's weights by fastpt's (--from-hf, exit 0); both are refused before
    anything is written. A second --to-hf into the same OUT kept the first tokenizer's tokenizer_config.json
    beside the new tokenizer.json ([MASK] added past the model's vocabulary)."""
    transformers = pytest.importorskip("transformers")
    step, _ = _tokenized_checkpoint(tmp_path / "a", "wordpiece")
    before = (step / "model.safetensors").read_bytes()
    assert main(["convert", "--to-hf", str(step), str(step)]) == 1
    assert "is the --to-hf directory" in capsys.readouterr().err
    assert (step / "model.safetensors").read_bytes() == before and not (step / "config.json").exists()
    assert main(["convert", "--to-hf", str(step), str(tmp_path / "hf")]) == 0
    hf_before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "hf" / "sub")]) == 1
    assert "inside the --from-hf directory" in capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == hf_before
    step_b, tok_b = _tokenized_checkpoint(tmp_path / "b", "bpe")
    assert main(["convert", "--to-hf", str(step_b), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf_tok) == tok_b.get_vocab_size()  # no special token added past the vocabulary
    assert hf_tok("river stone")["input_ids"] == tok_b.encode("river stone").ids


def test_a_closed_pipe_ends_quietly():
    """`fastpt configs t5-small | true` printed a BrokenPipeError traceback, status 1."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "fastpt", "configs", "t5-small"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_convert_to_hf_reports_unwritable_weights_and_a_corrupt_source_in_one_line(tmp_path, capsys, monkeypatch):
    """safetensors' SafetensorError (a plain Exception) escaped `fastpt convert --to-hf` as a traceback, for a
    read-only or full OUT (writing) and a truncated model.safetensors (reading). Both are one error line naming
    the file and status 1."""
    import safetensors.torch
    from safetensors import SafetensorError

    model = fastpt.build("bert-tiny", backbone={"vocab_size": 97, "max_positions": 32},
                         special_ids={"mask": 3, "pad": 0, "cls": 1, "sep": 2})
    model.save_pretrained(tmp_path / "ckpt")
    real = safetensors.torch.save_file

    def read_only(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: Read-only file system (os error 30) at path '
                              f'"{filename}.tmpX"')

    monkeypatch.setattr(safetensors.torch, "save_file", read_only)
    rc = main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "fastpt convert")
    assert f"Read-only file system: '{tmp_path / 'hf' / 'model.safetensors'}'" in err, err
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc = main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "fastpt convert")
    assert f"{weights}: not a valid safetensors file" in err, err
