"""The recipe YAML: defaults, validation errors that name the key, --set overrides, model defaults."""
import pytest
import yaml

from fastpt.train.config import DEFAULTS, ConfigError, load_recipe, parse_override

BASE = {"model": "bert-mini", "data": {"path": "shards"}, "train": {"max_steps": 10}}


def load(cfg=None, overrides=(), **kw):
    return load_recipe(cfg or BASE, overrides, **kw)


def test_defaults_filled():
    cfg = load()
    assert set(cfg) == set(DEFAULTS)
    for section in ("data", "train", "output"):
        assert set(cfg[section]) == set(DEFAULTS[section])
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["schedule"] == "cosine" and cfg["data"]["mode"] == "pack"


def test_yaml_file_and_float_spelling(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: bert-mini\ndata: {path: shards}\ntrain: {max_steps: 5, lr: 3e-4, eps: 1e-6}\n")
    cfg = load_recipe(path)
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["eps"], float)


def test_a_key_given_twice_is_refused_and_quoted_numbers_stay_strings(tmp_path):
    """PyYAML keeps the last of two equal keys: a recipe with two train: blocks trained with the second alone
    (batch 8, lr 3e-4 became the zoo's 256 and 1e-4), and a model YAML with two backbone: blocks built the
    second. Both are refused naming the key and its lines. --set turned a quoted '2024' into 2024.0 (a run
    directory could not be named so); a model YAML's 1e-1 was the string '1e-1' (refused as not a float)."""
    from fastpt.assemble import load_config

    path = tmp_path / "r.yaml"
    path.write_text("model: bert-mini\ndata: {path: shards}\ntrain: {max_steps: 5, batch_size: 8}\n"
                    "output: {}\ntrain: {max_steps: 5}\n")
    with pytest.raises(ConfigError, match=r"(?s)config: .*duplicate key 'train' \(first on line 3.*line 5"):
        load_recipe(path)
    path.write_text("model: bert-mini\ndata: {path: shards}\ntrain: {max_steps: 5, lr: 1.0e-4, lr: 5.0}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(first on line 3, column 23"):  # within one line
        load_recipe(path)
    model = tmp_path / "m.yaml"
    model.write_text("backbone: {builder: text_encoder, hidden_size: 64}\nobjective: {name: mlm}\n"
                     "backbone: {builder: text_encoder, hidden_size: 32}\n")
    with pytest.raises(ValueError, match="duplicate key 'backbone'"):
        load_config(str(model))
    model.write_text("backbone: {builder: text_encoder, vocab_size: 50, hidden_size: 32, num_layers: 1, "
                     "num_heads: 2}\nobjective: {name: mlm, mask_prob: 1e-1}\n")
    assert load_config(str(model))["objective"]["mask_prob"] == 0.1
    assert parse_override("output.dir='2024'") == (["output", "dir"], "2024")
    assert load(overrides=["output.dir='1e3'"])["output"]["dir"] == "1e3"
    assert parse_override("train.lr=1E-4") == (["train", "lr"], 1e-4)


def test_quoted_floats_and_the_config_yaml_round_trip(tmp_path):
    """Recipes that quoted numbers for YAML 1.1 (lr: "1e-4") are still read as numbers where a number is
    expected; a string that reads as a float (a run directory "1e3") is quoted in a run's config.yaml, so it
    reads back as the string it was."""
    from fastpt.train.config import to_yaml

    path = tmp_path / "r.yaml"
    path.write_text("model: bert-mini\ndata: {path: shards}\ntrain: {max_steps: 5, lr: '1e-4', eps: \"1e-6\"}\n"
                    "output: {dir: '1e3'}\n")
    cfg = load_recipe(path)
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["eps"] == 1e-6 and cfg["output"]["dir"] == "1e3"
    (tmp_path / "again.yaml").write_text(to_yaml(cfg))
    assert load_recipe(tmp_path / "again.yaml") == cfg
    assert load_recipe(cfg) == cfg  # as a Python dict too (float-like strings of path keys stayed floats)


@pytest.mark.parametrize("cfg, match", [
    ({**BASE, "trian": {}}, r"trian: unknown key \(did you mean 'train'\?\); valid keys: model, init_from"),
    ({**BASE, "train": {"max_steps": 10, "lrr": 1}}, r"train\.lrr: unknown key \(did you mean 'lr'\?\)"),
    ({**BASE, "train": {"max_steps": 10, "lr": "fast"}}, r"train\.lr: expected a number, got 'fast'"),
    ({**BASE, "train": {"max_steps": 10, "lr": -1}}, r"train\.lr: expected a value > 0"),
    ({**BASE, "train": {"max_steps": 2.5}}, r"train\.max_steps: expected an integer"),
    ({**BASE, "train": {"max_steps": 10, "precision": "fp8"}}, r"train\.precision: expected one of"),
    ({**BASE, "train": {"max_steps": 10, "betas": [0.9]}}, r"train\.betas: expected \[beta1, beta2\]"),
    ({**BASE, "train": {"max_steps": 10, "compile": "yes"}}, r"train\.compile: expected true, false or a torch\.compile mode"),
    ({**BASE, "data": {"path": "x", "mode": "packed"}}, r"data\.mode: expected one of \['pack', 'doc'\]"),
    ({**BASE, "data": {"path": "x", "images": "fashion-mnist"}}, r"set exactly one of data\.path"),
    ({**BASE, "data": {}}, r"set exactly one of data\.path"),
    ({**BASE, "train": {}}, r"train\.max_steps: set at least one of"),
    ({**BASE, "train": {"max_time_s": 60}}, r"train\.schedule: 'cosine' needs a length"),
    ({**BASE, "train": {"max_steps": 5, "warmup_steps": 6}}, r"train\.warmup_steps: 6 exceeds"),
    ({"data": {"path": "x"}, "train": {"max_steps": 1}}, r"model: required"),
    ({**BASE, "output": {"log_every": 0}}, r"output\.log_every: expected a value >= 1"),
    ({**BASE, "train": {"max_steps": 10, "fsdp": True, "find_unused_parameters": True}}, r"DDP only"),
])
def test_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load(cfg)


def test_overrides():
    cfg = load(overrides=["train.lr=1e-3", "train.compile=true", "train.betas=[0.9, 0.95]", "output.dir=runs/x",
                          "train.clip_grad=null", "data.seq_len=64"])
    t = cfg["train"]
    assert t["lr"] == 1e-3 and t["compile"] is True and t["betas"] == [0.9, 0.95] and t["clip_grad"] is None
    assert cfg["output"]["dir"] == "runs/x" and cfg["data"]["seq_len"] == 64
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    with pytest.raises(ConfigError, match=r"--set 'train\.lr': expected KEY=VALUE"):
        load(overrides=["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load(overrides=["train.lrr=1"])


def test_model_defaults_sit_between_recipe_and_defaults():
    model_defaults = {"seq_len": 256, "batch_size": 8, "lr": 5e-4, "warmup_steps": 3}
    cfg = load({**BASE, "train": {"max_steps": 10, "lr": 2e-4}}, model_defaults=model_defaults)
    assert cfg["data"]["seq_len"] == 256 and cfg["train"]["batch_size"] == 8
    assert cfg["train"]["lr"] == 2e-4  # the recipe wins
    with pytest.raises(ConfigError, match=r"warmup_steps: 3 exceeds .*model config's defaults"):
        load({**BASE, "train": {"max_steps": 2}}, model_defaults=model_defaults)


def test_zoo_model_defaults_and_model_overrides():
    from fastpt.assemble import load_config

    cfg = load({**BASE, "train": {"max_steps": 20000}}, resolve_model=load_config)
    assert cfg["train"]["batch_size"] == 256 and cfg["train"]["schedule"] == "linear"  # bert-mini's defaults
    cfg = load(overrides=["model.backbone.num_layers=2", "train.warmup_steps=0"], resolve_model=load_config)
    assert isinstance(cfg["model"], dict) and cfg["model"]["backbone"]["num_layers"] == 2
    assert cfg["model"]["backbone"]["hidden_size"] == 256
    # --set model=X goes first whatever its place: the model.* edits apply to X (they were dropped)
    cfg = load(overrides=["model.backbone.num_layers=1", "model=bert-tiny", "train.warmup_steps=0"],
               resolve_model=load_config)
    assert cfg["model"]["backbone"]["num_layers"] == 1 and cfg["model"]["backbone"]["hidden_size"] == 128


def test_resolved_recipe_round_trips_through_yaml():
    from fastpt.train.config import to_yaml

    cfg = load()
    assert load_recipe(yaml.safe_load(to_yaml(cfg))) == cfg


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """train.compile: a torch.compile mode by name goes to the backbone's compile; true compiles
    in torch's default mode; false does not compile."""
    import torch

    from fastpt.train import pretrain

    from .pretrain_helpers import make_shards, recipe, tiny_model

    assert load(overrides=["train.compile=max-autotune"])["train"]["compile"] == "max-autotune"
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: calls.append((type(self).__name__, kw)))
    shards = make_shards(tmp_path / "shards")
    for i, mode in enumerate(("max-autotune", True, False)):
        cfg = recipe(shards, tmp_path / f"run{i}", model=tiny_model(), train={"compile": mode, "max_steps": 1},
                     output={"save_every": 0, "tensorboard": False, "plot": False, "progress": False})
        pretrain(cfg, log=lambda m: None)
    assert [kw for _, kw in calls] == [{"mode": "max-autotune"}, {}]


def test_a_zoo_name_given_as_the_recipe_says_where_it_goes(tmp_path):
    # `--config bert-tiny` (or a near miss) names a model, not a recipe: the error says to put it under model:
    for given in ("bert-tiny", "bert-tinyy"):
        with pytest.raises(ConfigError, match=rf"config: {given} does not exist \(--config takes a recipe YAML .*"
                                              r"`model: bert-tiny`\)"):
            load_recipe(given)
    with pytest.raises(ConfigError, match=r"does not exist$"):  # a path that names nothing like a model: no hint
        load_recipe(tmp_path / "nothing.yaml")
