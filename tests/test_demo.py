"""``fastpt demo`` end to end on a tiny budget: preprocess, pre-train, evaluate, report."""
import json
import shutil

import pytest

import fastpt.demo_pretrain as demo_pretrain
from fastpt.cli import main
from fastpt.demo_pretrain import SAVE_EVERY, run

TINY = dict(model="bert-tiny", vocab_size=600, seq_len=32, batch_size=8, progress=False)
TINY_ARGS = ["--model", "bert-tiny", "--vocab-size", "600", "--seq-len", "32", "--batch-size", "8"]


def test_demo_pipeline_runs_and_reports(tmp_path):
    lines = []
    result = run(tmp_path / "demo", minutes=0.05, model="bert-tiny", vocab_size=600, seq_len=32, batch_size=8,
                 eval_epochs=1, progress=False, log=lines.append)
    assert result["preprocess"]["tokens"] > 100_000
    p = result["pretrain"]
    assert p["steps"] >= 1 and p["tokens_per_s"] > 0 and p["final_loss"] == p["final_loss"]
    assert (tmp_path / "demo" / "pretrain" / "metrics.csv").is_file()
    for row in result["eval"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert {"preprocess", "pretrain", "eval"} <= set(saved)
    assert any(line.startswith("downstream") for line in lines)
    # a second run reuses the shards and continues the run instead of starting over
    lines.clear()
    again = run(tmp_path / "demo", minutes=0.05, model="bert-tiny", vocab_size=600, seq_len=32, batch_size=8,
                evaluate=False, progress=False, log=lines.append)
    assert any("reusing" in line for line in lines) and again["pretrain"]["steps"] >= p["steps"]
    # ... which had used its whole budget: the report says so instead of "N steps in 0 s: 0 tokens/s, MFU 0.0%"
    assert again["pretrain"]["steps_this_run"] == 0
    report = [line for line in lines if line.startswith("pre-training:")]
    assert len(report) == 1 and "nothing left to train" in report[0] and "0 tokens/s" not in report[0], report
    # --no-eval kept the earlier evaluation in demo.json (it overwrote it, dropping the accuracies)
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved.get("eval") == json.loads(json.dumps(result["eval"])) and saved["eval_at_step"] == p["steps"]
    assert any(line.startswith("downstream") and "earlier run" in line for line in lines)


def test_demo_cli_help(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--minutes" in capsys.readouterr().out


# ---------------------------------------------------------------- reruns, interrupts, bad arguments
@pytest.fixture(scope="module")
def shards600(tmp_path_factory):
    """The demo's shards at --vocab-size 600, made once (preprocessing is most of a tiny demo's time)."""
    from fastpt.data.preprocess import preprocess_text

    path = tmp_path_factory.mktemp("demo_shards") / "shards"
    preprocess_text([], path, corpus="python-docs-heldout", train_tokenizer="wordpiece", vocab_size=600, progress=False,
                    log=None)
    return path


def _demo_dir(tmp_path, shards600):
    out = tmp_path / "demo"
    shutil.copytree(shards600, out / "shards")
    return out


def _assert_clean_error(rc, err, flag, prog="fastpt demo"):
    assert rc not in (0, None) and f"{prog}: error: {flag}" in err and "Traceback" not in err, err[-2000:]


def test_demo_rerun_with_another_model_is_refused(tmp_path, shards600, capsys):
    """A rerun into the same --out with another --model resumed the old model's checkpoint under the new
    name (summary.json and config.yaml then claimed the new one)."""
    out = _demo_dir(tmp_path, shards600)
    run(out, minutes=0.01, evaluate=False, log=lambda _: None, **TINY)
    ckpts = sorted(p.name for p in (out / "pretrain" / "checkpoints").iterdir())
    config = (out / "pretrain" / "config.yaml").read_text()
    args = ["demo", "--out", str(out), *TINY_ARGS, "--minutes", "0.01", "--no-eval", "--model", "bert-small"]
    rc = main(args)
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "--model")
    assert "bert-tiny" in err and "bert-small" in err and "another --out" in err
    assert sorted(p.name for p in (out / "pretrain" / "checkpoints").iterdir()) == ckpts
    assert (out / "pretrain" / "config.yaml").read_text() == config
    # the same model resumes, as before
    lines = []
    again = run(out, minutes=0.02, evaluate=False, log=lines.append, **TINY)
    assert any("resumed from" in line for line in lines) and again["pretrain"]["model"] == "bert-tiny"
    # an error of a step (here: resuming with another --seq-len) is an error line naming a flag, no traceback
    rc = main(["demo", "--out", str(out), *TINY_ARGS, "--minutes", "0.05", "--no-eval", "--seq-len", "16"])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "--out")


def test_demo_pretrains_without_the_eval_tasks_texts(tmp_path, shards600, capsys):
    """The demo pre-trained on every stdlib docstring, the eval task's included: all 270 test texts were in
    the corpus (a transductive score). Its corpus leaves the task's modules out now, and an older demo's
    shards are refused, saying why."""
    from fastpt.data.corpus import heldout_packages, python_docs_corpus
    from fastpt.data.tasks import builtin_text_task, read_labelled

    blob = "\n".join(" ".join(d.split()) for d in python_docs_corpus(exclude_packages=heldout_packages()))
    _, test_texts = read_labelled(builtin_text_task("python-docs-topics", seed=0)[1])
    assert not [t for t in test_texts if " ".join(t.split()) in blob]
    full = "\n".join(" ".join(d.split()) for d in python_docs_corpus())
    assert all(" ".join(t.split()) in full for t in test_texts[:20])  # the full corpus holds them
    out = _demo_dir(tmp_path, shards600)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    manifest["options"]["corpus"] = "python-docs"  # as an older demo made them
    (out / "shards" / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["demo", "--out", str(out), *TINY_ARGS, "--minutes", "0.01", "--no-eval"])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "--out")
    assert "older demo's shards" in err and "transductive" in err


def test_demo_vocab_size_of_existing_shards_is_checked(tmp_path, shards600, capsys):
    """--vocab-size was ignored when the shards existed: any readable manifest was reused."""
    out = _demo_dir(tmp_path, shards600)
    rc = main(["demo", "--out", str(out), *TINY_ARGS, "--minutes", "0.01", "--no-eval", "--vocab-size", "700"])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, "--vocab-size")
    assert "600" in err and "700" in err
    assert not (out / "pretrain").exists()  # refused before pre-training; the shards are left as they were
    assert json.loads((out / "shards" / "manifest.json").read_text())["options"]["tokenizer"]["vocab_size"] == 600


def test_interrupted_demo_resumes_from_a_periodic_checkpoint(tmp_path, shards600, capsys, monkeypatch):
    """The demo saved no checkpoint before the end (save_every 0): Ctrl-C left nothing to resume."""
    out = _demo_dir(tmp_path, shards600)
    stop_at = f"step {SAVE_EVERY + 20}:"

    def log(line):
        if line.startswith(stop_at):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(out, minutes=30, evaluate=False, log=log, **TINY)  # stopped at step 120 by log, whatever the load
    saved = sorted(p.name for p in (out / "pretrain" / "checkpoints").iterdir())
    assert saved == [f"step-{SAVE_EVERY:08d}"], saved
    # demo_main says where it can resume from (a KeyboardInterrupt traceback before)
    monkeypatch.setattr(demo_pretrain, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["demo", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"step {SAVE_EVERY}" in err and "rerun" in err and "Traceback" not in err
    monkeypatch.undo()
    lines = []
    # --minutes counts over resumes: the checkpoint's own training seconds (a loaded machine took over 2 s
    # to reach it), and 2 s more
    state = json.loads((out / "pretrain" / "checkpoints" / f"step-{SAVE_EVERY:08d}" / "trainer_state.json").read_text())
    again = run(out, minutes=(state["elapsed_s"] + 2) / 60, evaluate=False, log=lines.append, **TINY)
    assert any("resumed from" in line and f"step {SAVE_EVERY}," in line for line in lines), lines
    assert again["pretrain"]["steps"] > SAVE_EVERY


@pytest.mark.parametrize("flag,value", [
    ("--minutes", "0"), ("--minutes", "-1"), ("--minutes", "nan"), ("--batch-size", "0"), ("--seq-len", "1000"),
    ("--seq-len", "0"), ("--eval-epochs", "0"), ("--vocab-size", "5"), ("--lr", "0"), ("--seed", "-1"),
    ("--model", "no-such-model"), ("--model", "vit-mae-tiny"),
])
def test_demo_bad_flags_fail_up_front(tmp_path, capsys, flag, value):
    """ConfigError tracebacks naming recipe keys (train.max_time_s ...), some after preprocessing; --eval-epochs 0
    only after pre-training."""
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), *TINY_ARGS, "--minutes", "0.01", flag, value])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, flag)
    assert rc == 2 and "expected" in err or "--model" in err
    assert not out.exists()  # nothing was done
    if flag == "--minutes" and value == "-1":
        assert "fastpt demo: error: --minutes: expected a number > 0, got -1" in err


def test_demo_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    _assert_clean_error(main(["demo", "--out", str(tmp_path / "f"), "--minutes", "0.01"]), capsys.readouterr().err,
                        "--out")


@pytest.mark.parametrize("flag,value", [("--seq-len", "2"), ("--seq-len", "1"), ("--vocab-size", "50"),
                                        ("--batch", "0"), ("--seed", "-1")])
def test_demo_masking_bad_flags(capsys, flag, value):
    """ZeroDivisionError (--seq-len 2), OverflowError (--vocab-size 50), a wrong diagnosis (--batch 0: "the corpus
    has 0 tokens, too few for one row"), all after building the corpus and tokenizer."""
    rc = main(["demo-masking", "--batch", "4", "--seq-len", "16", flag, value])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, flag, prog="fastpt demo-masking")
    assert rc == 2 and "expected an integer in [" in err


def test_demo_masking_check_args_bounds():
    from fastpt.demo import MaskingDemoError, check_args

    check_args(batch=1, seq_len=3, vocab_size=109, seed=0)  # the smallest valid values (the demo runs on them)
    with pytest.raises(MaskingDemoError, match="--batch x --seq-len"):
        check_args(batch=2**20, seq_len=512, vocab_size=8000, seed=0)


@pytest.mark.parametrize("pre,scratch", [(0.111, 0.419), (0.611, 0.419)])
def test_demo_report_explains_a_pretraining_that_has_not_paid_off(tmp_path, pre, scratch):
    """A short --minutes leaves an MLM whose features fine-tune worse than random ones (0.3 min: 0.111 vs 0.419):
    the report says why and how to train on, instead of only printing the two numbers."""
    lines = []
    result = {"pretrain": {"model": "bert-mini", "steps": 80, "steps_this_run": 80, "train_time_s": 18.0,
                           "device": "cpu", "tokens_per_s": 16000.0, "mfu": 0.5, "tokens": 327680,
                           "first_loss": 8.7, "final_loss": 6.2},
              "eval": {"pre-trained": {"accuracy": pre}, "from scratch": {"accuracy": scratch}}}
    demo_pretrain._report(result, tmp_path, lines.append, minutes=0.3)
    note = [line for line in lines if "has not paid off" in line]
    assert len(note) == (1 if pre <= scratch else 0), lines
    if note:
        assert "after 80 steps" in note[0] and "--minutes" in note[0]
