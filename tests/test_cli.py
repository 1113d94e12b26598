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
