"""fastpt eval: text fine-tuning / linear probe on labelled files, vision linear probe and kNN,
the built-in Python-docs task, checkpoint discovery, and the CLI. Tiny random backbones on CPU."""
import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpt.data.tokenizer import train_tokenizer
from fastpt.models import text_encoder, vit
from fastpt.train.evaluate import (builtin_text_task, classification_metrics, eval_main, evaluate_text,
                                   evaluate_vision, extract_features, fresh_like, knn_predict, linear_probe,
                                   read_labelled, resolve_checkpoint, stratified_split)

WORDS = {"fruit": "apple banana cherry grape lemon mango".split(),
         "colour": "red green blue yellow purple orange".split(),
         "animal": "dog cat horse sheep goat mouse".split()}
FILLER = "the of and to in is it that".split()


def _line(rng, label):
    n = rng.randint(5, 15)
    return label + "\t" + " ".join(rng.choice(WORDS[label] + FILLER) for _ in range(n))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A separable 3-class text task (class keywords among shared filler), 120 train / 30 test lines."""
    d = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    (d / "train.tsv").write_text("\n".join(_line(rng, lab) for lab in list(WORDS) * 40) + "\n")
    (d / "test.tsv").write_text("\n".join(_line(rng, lab) for lab in list(WORDS) * 10) + "\n")
    return d / "train.tsv", d / "test.tsv"


@pytest.fixture(scope="module")
def tok():
    vocab = " ".join(sum(WORDS.values(), FILLER))
    return train_tokenizer([vocab] * 10, vocab_size=100, min_frequency=1)


def _text_backbone(vocab_size, seed=0):
    torch.manual_seed(seed)
    return text_encoder(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                        dropout=0.0, attention_dropout=0.0, max_positions=64)


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(image_size=16, patch_size=4, in_channels=1, hidden_size=32, num_layers=2, num_heads=2,
                intermediate_size=48)
    return vit(**{**args, **kw})


def _prototype_images(n, seed=0, size=16):
    """uint8 (n, 1, size, size): one random prototype per class (4 classes) plus a little noise, so
    even a random encoder's nearest neighbours share the class. Labels (n,) cycle 0..3."""
    base = torch.randint(0, 256, (4, 1, size, size), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (base[y] + torch.randint(-30, 31, (n, 1, size, size), generator=g)).clamp(0, 255).to(torch.uint8)
    return x.numpy(), y.numpy()


def _no_timing(r):
    return {k: v for k, v in r.items() if k != "seconds"}


# ----------------------------------------------------------------------------- text


def test_fine_tune_beats_chance_and_leaves_backbone_untouched(task, tok):
    backbone = _text_backbone(tok.get_vocab_size())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng_before = torch.get_rng_state()
    r = evaluate_text(backbone, tok, *task, epochs=4, lr=1e-3, head_lr=3e-3, batch_size=16)
    assert r["mode"] == "fine-tune" and r["n_train"] == 120 and r["n_test"] == 30
    assert r["labels"] == ["animal", "colour", "fruit"]
    assert r["accuracy"] > 0.6 and r["majority"] == pytest.approx(1 / 3)
    assert 0.0 <= r["macro_f1"] <= 1.0
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is not consumed


def test_fp16_fine_tuning_scales_the_loss(task, tok, monkeypatch):
    """fp16 autocast without loss scaling let small gradients underflow to 0 (17.6% of the encoder's late in
    fine-tuning); the fine-tune scales the loss as the pre-training recipe does."""
    import fastpt.train.evaluate as ev

    scaled = []
    real = torch.amp.GradScaler

    class Spy(real):
        def scale(self, outputs):
            scaled.append(1)
            return super().scale(outputs)

    monkeypatch.setattr(ev.torch.amp, "GradScaler", Spy)
    backbone = _text_backbone(tok.get_vocab_size())
    r = evaluate_text(backbone, tok, *task, epochs=1, lr=1e-3, batch_size=32, precision="fp16")
    assert len(scaled) == 4 and r["train_loss"] == r["train_loss"]  # 120 rows / 32: every step scaled
    scaled.clear()
    evaluate_text(backbone, tok, *task, epochs=1, lr=1e-3, batch_size=32, precision="fp32")
    assert not scaled


def test_fine_tune_is_deterministic(task, tok):
    backbone = _text_backbone(tok.get_vocab_size())
    a = evaluate_text(backbone, tok, *task, epochs=2, lr=1e-3, seed=3, pooling="first")
    b = evaluate_text(backbone, tok, *task, epochs=2, lr=1e-3, seed=3, pooling="first")
    assert _no_timing(a) == _no_timing(b)
    c = evaluate_text(backbone, tok, *task, epochs=2, lr=1e-3, seed=4, pooling="first")
    assert c["train_loss"] != a["train_loss"]


def test_linear_probe_on_frozen_encoder(task, tok, tmp_path):
    backbone = _text_backbone(tok.get_vocab_size())
    tok.save(str(tmp_path / "tokenizer.json"))
    r = evaluate_text(backbone, tmp_path / "tokenizer.json", *task, freeze=True)  # tokenizer given as a path
    assert r["mode"] == "linear-probe" and r["feature_dim"] == 32
    assert r["accuracy"] > 0.6
    assert _no_timing(r) == _no_timing(evaluate_text(backbone, tok, *task, freeze=True))


def test_held_out_split_when_no_test_file(task, tok):
    r = evaluate_text(_text_backbone(tok.get_vocab_size()), tok, task[0], freeze=True, test_fraction=0.25)
    assert (r["n_train"], r["n_test"]) == (90, 30)
    assert "held out" in r["test"]


def test_stratified_split():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 1
    tr, te = stratified_split(labels, 0.2, seed=1)
    assert sorted(tr + te) == list(range(16)) and not set(tr) & set(te)
    assert collections.Counter(labels[i] for i in te) == {"a": 2, "b": 1}
    assert (tr, te) == stratified_split(labels, 0.2, seed=1)
    assert te != stratified_split(labels, 0.2, seed=2)[1]
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 1.5)


def test_stratified_split_keeps_groups_on_one_side():
    labels = ["a"] * 10 + ["b"] * 6
    plain = stratified_split(labels, 0.3, seed=3)
    assert stratified_split(labels, 0.3, seed=3, groups=[f"t{i}" for i in range(16)]) == plain
    groups = [i // 2 for i in range(16)]  # every text twice in a row
    for seed in range(5):
        tr, te = stratified_split(labels, 0.3, seed=seed, groups=groups)
        assert sorted(tr + te) == list(range(16))
        assert not {groups[i] for i in tr} & {groups[i] for i in te}
        assert collections.Counter(labels[i] for i in te) == {"a": 4, "b": 2}  # round(0.3 * 5), round(0.3 * 3) pairs
    with pytest.raises(ValueError, match="groups"):
        stratified_split(labels, 0.3, groups=[0])


def test_held_out_split_never_scores_a_training_text(task, tok, tmp_path, monkeypatch):
    import fastpt.train.evaluate as ev

    lines = Path(task[0]).read_text().splitlines()
    dup = tmp_path / "dup.tsv"
    dup.write_text("".join(f"{line}\n{line.replace(' ', '  ')}\n" for line in lines))  # each text twice
    splits = []
    monkeypatch.setattr(ev, "stratified_split", lambda *a, **k: splits.append(stratified_split(*a, **k)) or splits[-1])
    r = evaluate_text(_text_backbone(tok.get_vocab_size()), tok, dup, freeze=True, test_fraction=0.25)
    (tr, te), = splits
    texts = [" ".join(line.split("\t", 1)[1].split()) for line in dup.read_text().splitlines()]
    assert (r["n_train"], r["n_test"]) == (len(tr), len(te)) == (180, 60)
    assert not {texts[i] for i in tr} & {texts[i] for i in te}
    # a text under a second label found nowhere else: grouped by text alone, that label's only example could
    # go to the test side (KeyError at scoring); (text, label) pairs keep every label on the training side
    odd = tmp_path / "odd.tsv"
    odd.write_text(dup.read_text() + "oddity\t" + lines[0].split("\t", 1)[1] + "\n")
    monkeypatch.undo()
    for seed in range(12):
        assert evaluate_text(_text_backbone(tok.get_vocab_size()), tok, odd, freeze=True, test_fraction=0.25,
                             seed=seed)["num_labels"] == 4


def test_bad_text_inputs(task, tok, tmp_path):
    backbone = _text_backbone(tok.get_vocab_size())
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        evaluate_text(backbone, tok, missing)
    bad = tmp_path / "bad.tsv"
    bad.write_text("fruit\tapple\n\n# a comment\nno tab on this line\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:4: expected 'label<TAB>text'"):
        read_labelled(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("fruit\t   \n")
    with pytest.raises(ValueError, match=r"empty\.tsv:1: empty text"):
        read_labelled(empty)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(b"fruit\tapple\nfruit\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin\.tsv:2: invalid UTF-8"):
        read_labelled(latin)
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("fruit\tapple\n# skipped\nvehicle\tcar bus\n")
    with pytest.raises(ValueError, match=r"unknown\.tsv:3: label 'vehicle' does not occur in the training file"):
        evaluate_text(backbone, tok, task[0], unknown)
    one = tmp_path / "one.tsv"
    one.write_text("fruit\tapple\nfruit\tlemon\n")
    with pytest.raises(ValueError, match="at least 2 labels"):
        evaluate_text(backbone, tok, one, freeze=True)
    small = _text_backbone(10)  # the tokenizer's ids do not fit its vocabulary
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate_text(small, tok, *task)
    with pytest.raises(TypeError, match="TextEncoder"):
        evaluate_text(_vit(), tok, *task)
    # tokenizers does not truncate below its special tokens: max_len 1 ran whole texts, 2 kept [CLS] [SEP] only
    specials = tok.num_special_tokens_to_add(False)
    for max_len in range(1, specials + 1):
        with pytest.raises(ValueError, match=rf"max_len: expected more than the {specials} special tokens"):
            evaluate_text(backbone, tok, *task, freeze=True, max_len=max_len)


# ----------------------------------------------------------------------------- probes and metrics


def _clusters(n_per, classes=5, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + torch.randn(len(y), dim, generator=g) * 0.5 + 10.0  # offset: cosine still separates
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_probes_separate_separable_features():
    x, y = _clusters(60)
    xt, yt = x[:200], y[:200]
    xe, ye = x[200:], y[200:]
    assert (linear_probe(xt, yt, xe) == ye).all()
    assert (knn_predict(xt, yt, xe, k=20) == ye).all()


def _knn_reference(train_x, train_y, test_x, k, temperature):
    """Brute force, one query at a time, in float64: sort by cosine similarity, sum exp(s/T) per class."""
    tn = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    preds = []
    for q in test_x.double():
        q = q / q.norm()
        sims = [(float(q @ tn[j]), int(train_y[j])) for j in range(len(tn))]
        sims.sort(key=lambda s: -s[0])
        votes = collections.defaultdict(float)
        for s, c in sims[:k]:
            votes[c] += np.exp(s / temperature)
        best = max(votes.values())
        preds.append(min(c for c, v in votes.items() if v == best))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,temperature,chunk", [(20, 0.07, None), (3, 0.5, 7), (1, 0.07, 2), (500, 0.1, 13)])
def test_knn_matches_brute_force(k, temperature, chunk):
    g = torch.Generator().manual_seed(k)
    train_x, train_y = torch.randn(97, 17, generator=g), torch.randint(0, 6, (97,), generator=g)
    test_x = torch.randn(23, 17, generator=g)
    got = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, chunk=chunk)
    assert torch.equal(got, _knn_reference(train_x, train_y, test_x, min(k, 97), temperature))
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(train_x, train_y, test_x, k=0)


def test_linear_probe_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g) + torch.randn(400, 4, generator=g)).argmax(1)
    got = linear_probe(x[:300], y[:300], x[300:], l2=1e-2)
    from fastpt.train.evaluate import standardize
    a, b = standardize(x[:300], x[300:])
    ref = sklearn.LogisticRegression(C=1 / (1e-2 * 300), tol=1e-8, max_iter=5000).fit(a.numpy(), y[:300].numpy())
    assert (got.numpy() == ref.predict(b.numpy())).mean() >= 0.98


def test_classification_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (101,), generator=g)
    pred = torch.where(torch.rand(101, generator=g) < 0.6, target, torch.randint(0, 6, (101,), generator=g))
    m = classification_metrics(pred, target)
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(target, pred))
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(target, pred, average="macro"))


# ----------------------------------------------------------------------------- vision


def test_extract_features_shapes_batching_and_adaptation():
    enc = _vit()
    enc.train()
    x, _ = _prototype_images(7)
    f = extract_features(enc, x, batch_size=3)
    assert f.shape == (7, 32) and f.dtype == torch.float32 and enc.training
    assert torch.allclose(f, extract_features(enc, torch.from_numpy(x), batch_size=7), atol=1e-5)
    assert torch.allclose(f, extract_features(enc, torch.from_numpy(x).float() / 127.5 - 1, batch_size=7), atol=1e-5)
    rgb = np.repeat(_prototype_images(3, size=24)[0], 3, axis=1)  # 3 channels, 24 px -> 1 channel, 16 px
    assert extract_features(enc, rgb).shape == (3, 32)
    assert extract_features(enc, x, pooling="mean").shape == (7, 32)
    with pytest.raises(ValueError, match="no cls token"):
        extract_features(_vit(cls_token=False), x, pooling="first")
    with pytest.raises(ValueError, match="images"):
        extract_features(enc, x[0])


def test_vision_probes_on_separable_images():
    enc = _vit()
    x, y = _prototype_images(120)
    xt, yt = _prototype_images(40, seed=1)
    r = evaluate_vision(enc, (x, y), (xt, yt), k=5)
    assert r["n_train"] == 120 and r["n_test"] == 40 and r["num_classes"] == 4 and r["pooling"] == "first"
    assert r["linear"]["accuracy"] >= 0.95 and r["knn"]["accuracy"] >= 0.95
    again = evaluate_vision(enc, (x, y), (xt, yt), k=5)
    assert _no_timing(again) == _no_timing(r)
    only = evaluate_vision(enc, (x, y), probe="knn", train_limit=50, test_fraction=0.2)
    assert "linear" not in only and only["n_train"] == 50 and only["n_test"] == 24
    with pytest.raises(ValueError, match="probe"):
        evaluate_vision(enc, (x, y), probe="svm")


def _write_pgm(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"P5 %d %d 255\n" % (img.shape[1], img.shape[0]) + img.tobytes())


def test_vision_on_image_folders(tmp_path):
    x, y = _prototype_images(48)
    names = ["a", "b", "c", "d"]
    for i, (img, label) in enumerate(zip(x, y)):
        split = "test" if i % 4 == 0 and i >= 16 else "train"
        _write_pgm(tmp_path / "split" / split / names[label] / f"{i:03d}.pgm", img[0])
        _write_pgm(tmp_path / "flat" / names[label] / f"{i:03d}.pgm", img[0])
    r = evaluate_vision(_vit(), tmp_path / "split", probe="knn", k=3)
    assert r["classes"] == sorted(names) and r["n_test"] == 8 and r["n_train"] == 40
    r = evaluate_vision(_vit(), tmp_path / "flat", probe="linear")
    assert r["n_train"] + r["n_test"] == 48 and r["linear"]["accuracy"] >= 0.9
    (tmp_path / "unlabelled").mkdir()
    _write_pgm(tmp_path / "unlabelled" / "a.pgm", x[0, 0])
    with pytest.raises(ValueError, match="subfolder per class"):
        evaluate_vision(_vit(), tmp_path / "unlabelled")


def test_vision_test_folder_of_some_classes_is_scored_by_class_name(tmp_path):
    """A test folder holding only class "c" numbered it 0 (its own first class) and scored it against the
    training's "a": accuracy near 0, silently. Labels now go by name; a class training never saw is an error."""
    x, y = _prototype_images(64)
    names = ["a", "b", "c", "d"]
    for i, (img, label) in enumerate(zip(x, y)):
        _write_pgm(tmp_path / "train" / names[label] / f"{i:03d}.pgm", img[0])
        if names[label] == "c":
            _write_pgm(tmp_path / "only_c" / "c" / f"{i:03d}.pgm", img[0])
    r = evaluate_vision(_vit(), tmp_path / "train", tmp_path / "only_c", probe="linear")
    assert r["n_test"] == 16 and r["linear"]["accuracy"] >= 0.9
    _write_pgm(tmp_path / "only_c" / "zebra" / "z.pgm", x[0, 0])
    with pytest.raises(ValueError, match=r"test classes \['zebra'\] are not among the training classes"):
        evaluate_vision(_vit(), tmp_path / "train", tmp_path / "only_c", probe="linear")


def test_fashion_mnist_subset():
    from fastpt.data.images import find_fashion_mnist

    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("apt-get install dataset-fashion-mnist")
    r = evaluate_vision(_vit(image_size=28, patch_size=7), "fashion-mnist", train_limit=300, test_limit=100)
    assert (r["n_train"], r["n_test"], r["num_classes"]) == (300, 100, 10)
    assert r["knn"]["accuracy"] > 0.3 and r["linear"]["accuracy"] > 0.3  # chance is 0.1


# ----------------------------------------------------------------------------- built-in task


def test_builtin_task_is_deterministic_and_balanced(tmp_path):
    train, test = builtin_text_task(seed=0, cache_dir=tmp_path / "a")
    again = builtin_text_task(seed=0, cache_dir=tmp_path / "b")
    assert train.read_bytes() == again[0].read_bytes() and test.read_bytes() == again[1].read_bytes()
    assert builtin_text_task(seed=0, cache_dir=tmp_path / "a") == (train, test)  # cached
    tr_labels, tr_texts = read_labelled(train)
    te_labels, te_texts = read_labelled(test)
    tr_counts, te_counts = collections.Counter(tr_labels), collections.Counter(te_labels)
    assert len(tr_counts) >= 5 and set(tr_counts) == set(te_counts)
    assert len(set(tr_counts.values())) == 1 and len(set(te_counts.values())) == 1
    assert not set(tr_texts) & set(te_texts)
    other = builtin_text_task(seed=1, cache_dir=tmp_path / "a")
    assert other[0].read_bytes() != train.read_bytes()
    with pytest.raises(ValueError, match="python-docs-topics"):
        builtin_text_task("imdb", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- checkpoints and CLI


def _touch_checkpoint(d):
    d.mkdir(parents=True)
    (d / "fastpt_config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")


def test_resolve_checkpoint(tmp_path):
    _touch_checkpoint(tmp_path / "out" / "ckpt-200")
    _touch_checkpoint(tmp_path / "out" / "ckpt-1000")
    _touch_checkpoint(tmp_path / "out" / ".tmp-ckpt-2000-77")
    assert resolve_checkpoint(tmp_path / "out").name == "ckpt-1000"
    assert resolve_checkpoint(tmp_path / "out" / "ckpt-200").name == "ckpt-200"
    (tmp_path / "empty" / ".tmp-x").mkdir(parents=True)
    _touch_checkpoint(tmp_path / "empty" / ".tmp-x" / "step-00000001")  # inside a torn write: ignored
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_checkpoint(tmp_path / "absent")


def test_resolve_checkpoint_of_a_pretrain_run(tmp_path):
    from fastpt.train.checkpoint import save_checkpoint

    def write_model(d):
        (d / "fastpt_config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"weights")

    root = tmp_path / "run" / "checkpoints"
    for step in (100, 300):
        save_checkpoint(root, step, write_model=write_model, optimizer_state=None, trainer_state={},
                        rng_tensors={"cpu": torch.zeros(2)})
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000300"
    (root / "step-00000300" / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="step-00000"):  # "step 300 is unusable", "using step 100"
        assert resolve_checkpoint(tmp_path / "run").name == "step-00000100"


def test_fresh_like_same_architecture_new_weights():
    enc = _vit()
    a, b = fresh_like(enc, seed=1), fresh_like(enc, seed=1)
    assert a.config == enc.config
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.patch_embed.projection.weight, enc.patch_embed.projection.weight)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert eval_main(["text", "--model", str(tmp_path / "absent"), "--train", "x.tsv"]) == 1
    assert "absent" in capsys.readouterr().err
    assert eval_main(["text", "--config", "bert-tiny", "--tokenizer", str(tmp_path / "t.json"),
                      "--train", "x.tsv"]) == 1
    assert "t.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["vision", "--model", "m", "--data", "d", "--probe", "svm"])
    for bad in ("-1", str(2**63), str(2**64 - 1)):  # as train.seed; 2**64 - 1 failed late naming no option
        with pytest.raises(SystemExit):
            eval_main(["text", "--model", "m", "--train", "x.tsv", "--seed", bad])
        assert "argument --seed: expected an integer in [0, 2**63)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end through checkpoints


def _tiny_text_config(vocab_size):
    return {"backbone": {"builder": "text_encoder", "vocab_size": vocab_size, "hidden_size": 32, "num_layers": 2,
                         "num_heads": 2, "intermediate_size": 48, "dropout": 0.0, "attention_dropout": 0.0,
                         "max_positions": 64},
            "objective": {"name": "mlm"}}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tok):
    """A pretrain-run directory: checkpoints/step-00000010 (save_pretrained inside) + tokenizer.json."""
    from fastpt.assemble import build
    from fastpt.data.tokenizer import special_token_ids
    from fastpt.train.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build(_tiny_text_config(tok.get_vocab_size()), special_ids=special_token_ids(tok))
    save_checkpoint(run / "checkpoints", 10, write_model=model.save_pretrained, optimizer_state=None,
                    trainer_state={}, rng_tensors={"cpu": torch.zeros(1)})
    tok.save(str(run / "tokenizer.json"))
    return run, model


def test_load_backbone_from_a_run_and_from_scratch(text_run, tok):
    from fastpt.train.evaluate import find_tokenizer, load_backbone

    run, model = text_run
    loaded = load_backbone(run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.backbone.state_dict().values()))
    scratch, again = load_backbone(run, from_scratch=True, seed=5), load_backbone(run, from_scratch=True, seed=5)
    assert scratch.config == loaded.config
    assert all(torch.equal(a, b) for a, b in zip(scratch.parameters(), again.parameters()))
    assert not torch.equal(scratch.embeddings.word_embeddings.weight, loaded.embeddings.word_embeddings.weight)
    assert find_tokenizer(run).get_vocab() == tok.get_vocab()  # beside the checkpoints, found from the checkpoint


def test_cli_text_with_baseline_writes_json(text_run, task, tmp_path, capsys):
    run, _ = text_run
    out = tmp_path / "res" / "eval.json"
    rc = eval_main(["text", "--model", str(run), "--train", str(task[0]), "--test", str(task[1]), "--epochs", "1",
                    "--lr", "1e-3", "--baseline", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"{run} (scratch)" in printed and "accuracy" in printed
    res = json.loads(out.read_text())
    assert res["kind"] == "text" and list(res["results"]) == [str(run), f"{run} (scratch)"]
    assert all(r["n_test"] == 30 and r["mode"] == "fine-tune" for r in res["results"].values())


def test_cli_text_from_zoo_config_and_hf_dir(tok, task, tmp_path, capsys):
    from fastpt.assemble import build, to_hf

    tok.save(str(tmp_path / "tokenizer.json"))
    args = ["--tokenizer", str(tmp_path / "tokenizer.json"), "--train", str(task[0]), "--test", str(task[1])]
    assert eval_main(["text", "--config", "bert-tiny", "--from-scratch", "--freeze", *args]) == 0
    assert "bert-tiny (scratch)" in capsys.readouterr().out
    torch.manual_seed(0)
    model = build({**_tiny_text_config(tok.get_vocab_size()), "backbone": {
        **_tiny_text_config(tok.get_vocab_size())["backbone"], "type_vocab_size": 2}}, special_ids={"mask": 4})
    to_hf(model, tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert eval_main(["text", "--model", str(tmp_path / "hf"), "--train", str(task[0]), "--freeze"]) == 0
    assert "linear-probe" in capsys.readouterr().out


def test_cli_vision_on_a_folder(tmp_path, capsys):
    from fastpt.assemble import build

    torch.manual_seed(0)
    model = build({"backbone": {"builder": "vit", "image_size": 16, "patch_size": 4, "in_channels": 1,
                                "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 48}})
    model.save_pretrained(tmp_path / "vit")
    x, y = _prototype_images(40)
    for i, (img, label) in enumerate(zip(x, y)):
        _write_pgm(tmp_path / "imgs" / ("test" if i < 8 else "train") / f"class{label}" / f"{i}.pgm", img[0])
    out = tmp_path / "v.json"
    rc = eval_main(["vision", "--model", str(tmp_path / "vit"), "--data", str(tmp_path / "imgs"), "--k", "5",
                    "--baseline", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "linear acc" in printed and "knn acc" in printed
    res = json.loads(out.read_text())["results"]
    assert res[str(tmp_path / "vit")]["linear"]["accuracy"] == 1.0 and len(res) == 2
    assert eval_main(["vision", "--model", str(tmp_path / "vit"), "--data", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


VIT16 = {"builder": "vit", "image_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 32, "num_layers": 2,
         "num_heads": 2, "intermediate_size": 48}


def _two_backbone_checkpoint(path, objective):
    """A saved model whose objective keeps a second backbone, made to differ from the trained one."""
    from fastpt.assemble import build

    torch.manual_seed(0)
    model = build({"backbone": VIT16, "objective": objective})
    second = getattr(model.objective, "teacher_backbone", None) or model.objective.momentum_backbone
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(path)
    return model.backbone, second


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dino_evaluates_the_teacher_moco_the_online_encoder(tmp_path, capsys):
    """DINO's eval_knn.py / eval_linear.py evaluate the EMA teacher (--checkpoint_key teacher), MoCo v3's
    main_lincls.py the base (online) encoder. load_backbone returned the student for both."""
    from fastpt.train.evaluate import load_backbone

    student, teacher = _two_backbone_checkpoint(tmp_path / "dino", {"name": "dino", "out_dim": 24,
                                                                    "head_hidden_dim": 16, "bottleneck_dim": 8})
    assert not _same(student, teacher)
    assert _same(load_backbone(tmp_path / "dino"), teacher)
    assert _same(load_backbone(tmp_path / "dino", weights="teacher"), teacher)
    assert _same(load_backbone(tmp_path / "dino", weights="student"), student)
    online, momentum = _two_backbone_checkpoint(tmp_path / "moco", {"name": "moco_v3", "proj_dim": 8,
                                                                    "proj_hidden_dim": 16})
    assert _same(load_backbone(tmp_path / "moco"), online)
    assert _same(load_backbone(tmp_path / "moco", weights="teacher"), momentum)
    from fastpt.assemble import build

    build({"backbone": VIT16}).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="teacher.*plain"):
        load_backbone(tmp_path / "plain", weights="teacher")
    with pytest.raises(ValueError, match="weights"):
        load_backbone(tmp_path / "dino", weights="ema")
    with pytest.raises(ValueError, match="weights"):
        load_backbone(tmp_path / "dino", from_scratch=True, weights="teacher")
    # the CLI says which weights it evaluated, in the table and the JSON
    x, y = _prototype_images(24)
    for i, (img, label) in enumerate(zip(x, y)):
        _write_pgm(tmp_path / "imgs" / f"class{label}" / f"{i}.pgm", img[0])
    common = ["--data", str(tmp_path / "imgs"), "--k", "3", "--probe", "knn", "--device", "cpu"]
    for args, want in (([], {"teacher", "random"}), (["--weights", "student"], {"student", "random"})):
        out = tmp_path / f"{want}.json"
        assert eval_main(["vision", "--model", str(tmp_path / "dino"), *args, "--baseline", *common,
                          "--out", str(out)]) == 0
        assert "weights" in capsys.readouterr().out
        assert {r["weights"] for r in json.loads(out.read_text())["results"].values()} == want
    assert eval_main(["vision", "--model", str(tmp_path / "dino"), "--from-scratch", "--weights", "teacher",
                      *common]) == 1
    assert "--weights teacher" in capsys.readouterr().err


def test_vision_too_few_images_to_split(tmp_path, capsys):
    """One image per class held out nothing: RuntimeError 'max(): Expected reduction dim ...' from
    num_classes over the empty test side. Now a ValueError naming the data and what it needs."""
    x, y = _prototype_images(4)  # one image in each of 4 classes
    for i, (img, label) in enumerate(zip(x, y)):
        _write_pgm(tmp_path / "one" / f"class{label}" / f"{i}.pgm", img[0])
    with pytest.raises(ValueError, match=r"one.*at least 2 images"):
        evaluate_vision(_vit(), tmp_path / "one")
    with pytest.raises(ValueError, match="no test images"):
        evaluate_vision(_vit(), (x, y), (x[:0], y[:0]))
    with pytest.raises(ValueError, match="no training images"):
        evaluate_vision(_vit(), (x[:0], y[:0]), (x, y))
    from fastpt.assemble import build

    build({"backbone": {"builder": "vit", "image_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 32,
                        "num_layers": 1, "num_heads": 2, "intermediate_size": 48}}).save_pretrained(tmp_path / "vit")
    rc = eval_main(["vision", "--model", str(tmp_path / "vit"), "--data", str(tmp_path / "one"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "fastpt eval: error:" in err and str(tmp_path / "one") in err and "Traceback" not in err


def test_the_teacher_to_evaluate_is_a_trainable_copy():
    """select_weights handed out DINO's frozen EMA teacher itself: eval text fine-tuning trained the head only
    (still reported as fine-tune), and load_backbone of a DINO run returned a module without gradients."""
    import fastpt
    from fastpt.train.evaluate import select_weights

    model = fastpt.build("dino-vit-tiny", backbone=dict(image_size=16, patch_size=4, in_channels=1, hidden_size=32,
                                                         num_layers=1, num_heads=4, intermediate_size=48),
                         objective=dict(out_dim=40, head_hidden_dim=24, bottleneck_dim=16, local_crop_size=8,
                                        num_local_crops=2))
    teacher, which = select_weights(model)
    assert which == "teacher" and teacher is not model.objective.teacher_backbone
    assert all(p.requires_grad for p in teacher.parameters())
    assert not any(p.requires_grad for p in model.objective.teacher_backbone.parameters())  # the run's own: frozen
