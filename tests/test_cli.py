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
