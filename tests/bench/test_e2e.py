"""fastpt.bench.e2e's GPT-2 pair: the builders agree with each other, refuse what GPT-2 cannot be, and
the bench loop yields a row per side for both models. Tiny sizes: seconds, no real benchmarking."""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastpt.bench import e2e, report
from fastpt.bench.kernels import Context

pytest.importorskip("transformers")

TINY = dict(vocab_size=512, num_layers=2, hidden_size=64, num_heads=2, intermediate_size=256)


def test_gpt2_flops_per_token_counts_causal_attention_in_full_and_the_head_on_every_token():
    cfg = e2e.gpt2_backbone_config("gpt2-small")
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["vocab_size"], cfg["activation"]) == (12, 768, 50257,
                                                                                              "gelu_tanh")
    expected = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 12 * 768 * 1024 + 6 * 768 * 50257
    assert e2e.clm_flops_per_token(cfg, 1024) == pytest.approx(expected)
    mini = e2e.gpt2_backbone_config("gpt2-mini", dropout=0.0)
    assert (mini["num_layers"], mini["hidden_size"], mini["num_heads"], mini["intermediate_size"]) == (4, 256, 4, 1024)
    assert (mini["dropout"], mini["attention_dropout"]) == (0.0, 0.0) and mini["pre_norm"] and mini["causal"]
    with pytest.raises(ValueError, match="gpt2-mini"):
        e2e.gpt2_backbone_config("gpt2-nonsense")


def test_gpt2_builders_train_with_finite_loss_and_the_same_parameters():
    cfg = e2e.gpt2_backbone_config("gpt2-mini", **TINY)
    batches = e2e.make_clm_batches(2, 2, 16, "cpu", vocab_size=TINY["vocab_size"])
    assert torch.equal(batches[0]["input_ids"], batches[0]["labels"])
    counts = {}
    for name, build in (("fastpt", e2e.build_fastpt_gpt2), ("transformers", e2e.build_transformers_gpt2)):
        torch.manual_seed(0)
        loss_fn, params, how = build("tiny", cfg)
        counts[name] = sum(p.numel() for p in params)  # tied head counted once (_unique)
        loss = loss_fn(batches[0])
        assert math.isfinite(loss.item()) and abs(loss.item() - math.log(TINY["vocab_size"])) < 1.0, (how, loss)
        e2e.train_step(loss_fn, params, batches, "cpu", torch.float32)()  # one full step runs
    d, v, inter, layers = TINY["hidden_size"], TINY["vocab_size"], TINY["intermediate_size"], TINY["num_layers"]
    per_layer = 4 * d * d + 4 * d + 2 * d * inter + inter + d + 4 * d  # attention, MLP, two LayerNorms
    assert counts["fastpt"] == counts["transformers"] == v * d + 1024 * d + layers * per_layer + 2 * d


def test_gpt2_config_matches_fastpt_exactly_on_the_same_weights(tmp_path):
    """fastpt's own converter writes the fastpt model as GPT-2 weights; transformers' model built
    from ``gpt2_config`` takes them and gives the same loss (dropout off)."""
    import fastpt.assemble as assemble
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    cfg = e2e.gpt2_backbone_config("gpt2-mini", dropout=0.0, **TINY)
    torch.manual_seed(0)
    ours = assemble.build("gpt2-small", backbone=cfg).eval()
    assemble.to_hf(ours, tmp_path)
    theirs = GPT2LMHeadModel._from_config(e2e.gpt2_config(cfg), attn_implementation="sdpa").eval()
    missing, unexpected = theirs.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied head is the embedding
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    batch = e2e.make_clm_batches(1, 2, 24, "cpu", vocab_size=TINY["vocab_size"], seed=3)[0]
    with torch.no_grad():
        assert ours(**batch).loss.item() == pytest.approx(theirs(**batch).loss.item(), rel=1e-5, abs=1e-5)


def test_gpt2_refuses_a_config_it_cannot_express_naming_the_keys():
    bert = e2e.backbone_config("bert-tiny")
    with pytest.raises(ValueError, match="not a GPT-2 architecture") as exc:
        e2e.build_transformers_gpt2("bert-tiny", bert)
    for key in ("pre_norm", "causal", "activation", "embedding_norm", "final_norm", "type_vocab_size"):
        assert key in str(exc.value)
    rotary = e2e.gpt2_backbone_config("gpt2-mini", position="rotary", norm="rmsnorm", **TINY)
    with pytest.raises(ValueError) as exc:
        e2e.gpt2_config(rotary, size="rotary-gpt")
    msg = str(exc.value)
    assert "rotary-gpt" in msg and "position='rotary'" in msg and "norm='rmsnorm'" in msg and "pre_norm" not in msg
    # and the BERT builder refuses a GPT-2
    with pytest.raises(ValueError, match="not a BERT architecture"):
        e2e.build_transformers("gpt2-mini", e2e.gpt2_backbone_config("gpt2-mini", **TINY))


def test_bench_e2e_times_bert_then_gpt2_and_the_report_renders(monkeypatch, tmp_path):
    real = e2e.gpt2_backbone_config
    monkeypatch.setattr(e2e, "gpt2_backbone_config", lambda size, dropout=None: real(size, dropout=dropout, **TINY))
    logs = []
    ctx = Context(device="cpu", quick=True, log=logs.append, machine={"device_name": "t"})
    rows = report.add_ratios(e2e.bench_e2e(ctx, batch=2, seq=16))
    assert [(r["op"], r["provider"], r["status"]) for r in rows] == [
        ("bert-tiny MLM train step", "fastpt", "ok"), ("bert-tiny MLM train step", "transformers", "ok"),
        ("gpt2-tiny CLM train step", "fastpt", "ok"), ("gpt2-tiny CLM train step", "transformers", "ok")]
    gpt = rows[2:]
    assert all(r["rate"] > 0 and r["rate_unit"] == "tokens/s" and r["case"] == "gpt2-tiny B2 S16" for r in gpt)
    assert gpt[1]["ratio"] == pytest.approx(1.0) and gpt[0]["ratio"] > 0
    assert "GPT2LMHeadModel" in gpt[1]["note"] and "causal attention in full" in gpt[0]["note"]
    assert gpt[0]["tflops"] == pytest.approx(e2e.clm_flops_per_token(real("gpt2-tiny", **TINY), 16) * 32
                                             / (gpt[0]["time_ms"] / 1e3) / 1e12)
    md = report.markdown(rows, machine={"device": "cpu", "device_name": "t"})
    assert "## bert-tiny MLM train step (end to end)" in md and "## gpt2-tiny CLM train step (end to end)" in md
    paths = report.write_results(rows, tmp_path, "e2e")
    assert {"e2e.csv", "e2e.json", "e2e.md"} <= {p.name for p in paths}
    assert e2e.bench_e2e(ctx, models=()) == []
    with pytest.raises(ValueError, match="models"):
        e2e.bench_e2e(ctx, models=("t5",))


def test_cli_model_names_are_the_bench_sizes(tmp_path):
    """``fastpt bench --model`` offers exactly the BERT and GPT-2 sizes, and runs only that pair."""
    import fastpt.bench as bench

    assert set(bench.E2E_MODELS) == set(e2e.BERT_SIZES) | set(e2e.GPT2_SIZES)
    rows = bench.run(suite="e2e", device="cpu", out=tmp_path, quick=True, model="gpt2-tiny", batch=2, seq=16,
                     log=lambda s: None)
    assert rows and all(r["op"].startswith("gpt2-tiny") for r in rows)
    with pytest.raises(ValueError, match="model"):
        bench.run(suite="e2e", device="cpu", out=tmp_path, quick=True, model="t5-small", log=lambda s: None)


def test_cpu_pairs_are_timed_under_both_malloc_settings(monkeypatch):
    """A full (not quick) CPU run times each pair with glibc's malloc as it comes and again with
    freed memory kept (fastpt pretrain's setting): one row group per setting, each with its own
    baseline; malloc is as it was afterwards."""
    from fastpt import _cpu_malloc

    if _cpu_malloc.refusal() is not None:
        pytest.skip(_cpu_malloc.refusal())
    ctx = Context(device="cpu", quick=False, log=lambda s: None)
    monkeypatch.setitem(e2e.GPT2_SIZES, "gpt2-micro", (1, 32, 2, 64))
    rows = e2e.bench_e2e(ctx, models=("gpt2",), gpt_size="gpt2-micro", batch=2, seq=8, dtypes=[torch.float32])
    report.add_ratios(rows)
    cases = [r["case"] for r in rows]
    assert cases == ["gpt2-micro B2 S8"] * 2 + ["gpt2-micro B2 S8" + e2e.MALLOC_KEPT_CASE] * 2
    assert [r["provider"] for r in rows] == ["fastpt", "transformers"] * 2
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in rows)
    assert "as it comes" in rows[0]["note"] and "keeps freed memory" in rows[2]["note"]
    assert not _cpu_malloc.is_tuned()


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # warm-up, the memory step, the timed steps
def test_a_side_that_fails_at_any_stage_gets_an_error_row_and_the_other_is_measured(fail_at):
    """A side failing after its warm-up (in the memory step or the timed rounds) crashed the whole
    suite and wrote nothing; now it gets an error row naming the stage, as a build failure did."""
    calls = {"n": 0}

    def flaky():
        loss_fn, params, how = good()

        def fn(batch):
            calls["n"] += 1
            if calls["n"] >= fail_at:
                raise RuntimeError(f"injected at call {calls['n']}")
            return loss_fn(batch)
        return fn, params, how

    model = torch.nn.Linear(4, 1)
    good = lambda: (lambda batch: model(batch["x"]).sum(), list(model.parameters()), "linear")  # noqa: E731
    ctx = Context(device="cpu", quick=True, log=lambda s: None)
    rows = e2e._time_pair(ctx, {"fastpt": flaky, "transformers": good}, [{"x": torch.randn(2, 4)}], op="t",
                          size="s", batch=2, seq=2, dtype=torch.float32, flops=1.0, note="")
    by = {r["provider"]: r for r in rows}
    assert by["fastpt"]["status"].startswith("error (") and "injected" in by["fastpt"]["status"]
    assert by["transformers"].get("time_ms") and not str(by["transformers"].get("status", "")).startswith("error")


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("FASTPT_SLOW_TESTS"), reason="slow (Inductor compiles C++: ~60 s): FASTPT_SLOW_TESTS=1")]),
])
def test_compiled_case_compiles_what_each_training_path_compiles(monkeypatch, backend):
    """``compile=True``: one case of its own, both sides compiled and warmed up past compilation:
    fastpt's backbone only (as ``fastpt pretrain``'s train.compile), transformers' whole model (as
    HF Trainer). The bench compiles with Inductor; here ``aot_eager`` (Dynamo's graphs and the
    autograd split without code generation: seconds) unless FASTPT_SLOW_TESTS=1 asks for Inductor."""
    compiled = []
    real_compile = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        assert not args and not kwargs  # the bench compiles with torch.compile's defaults
        compiled.append(type(self).__name__)
        return real_compile(self, backend=backend)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    monkeypatch.setattr(e2e, "_COMPILER_STARTED", {})  # as in a fresh process
    logs = []
    ctx = Context(device="cpu", quick=True, log=logs.append, machine={"device_name": "t"})
    rows = report.add_ratios(e2e.bench_e2e(ctx, models=("bert",), batch=2, seq=16, compile=True))
    case = "bert-tiny B2 S16, torch.compile"
    assert e2e.COMPILE_CASE == ", torch.compile"
    assert [(r["provider"], r["status"], r["case"]) for r in rows] == [("fastpt", "ok", case),
                                                                       ("transformers", "ok", case),
                                                                       (e2e.EAGER_SIDE, "ok", case)]
    ours, theirs, eager = rows
    assert eager["baseline"] == "transformers" and "not compiled: the eager baseline" in eager["note"]
    rows = rows[:2]
    assert compiled == ["TextEncoder", "BertForMaskedLM"]  # fastpt's backbone (not PretrainModel), HF's whole model
    # what the notes say is compiled is read back from the modules, not echoed from the flag
    assert "torch.compile: model.backbone (" in ours["note"] and "torch.compile: model (" in theirs["note"]
    for r in rows:
        assert r["dynamo_graphs"] >= 1 and r["graph_breaks"] >= 0  # Dynamo compiled during the warm-up
        assert r["warmup_s"] > 0 and f"compile warm-up {r['warmup_s']:.1f} s over 2 untimed steps" in r["note"]
        assert "during the timed steps" not in r["note"]  # the warm-up absorbed compilation
        assert r["rate"] > 0 and r["ratio"] > 0
    assert theirs["ratio"] == pytest.approx(1.0)  # the baseline: transformers compiled, in the same run
    row_lines = [line for line in logs if line.startswith(f"e2e {case} ")]
    assert len(row_lines) == 3 and all("warm-up" in line and "graph breaks" in line for line in row_lines)
    assert "Dynamo and Inductor started in" in logs[0]  # the compiler's one-time start, before either side


def test_cli_compile_flag_reaches_the_e2e_bench_and_names_its_own_files(monkeypatch, tmp_path, capsys):
    """``fastpt bench --suite e2e --compile``: the compiled case only, written to its own default
    stem; refused where nothing compiles (``--suite kernels``)."""
    import fastpt.bench as bench

    calls = []

    def fake(ctx, **kw):
        calls.append(kw)
        return [report.make_row(suite="e2e", op="stub", case="c" + e2e.COMPILE_CASE, provider="transformers",
                                baseline="transformers", shape=(1,), dtype="fp32")]

    monkeypatch.setattr(e2e, "bench_e2e", fake)
    assert bench.bench_main(["--suite", "e2e", "--compile", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert [c["compile"] for c in calls] == [True, True]  # BERT's pair, then GPT-2's
    assert (tmp_path / "bench-cpu-quick-compile.json").exists()
    assert bench.bench_main(["--suite", "e2e", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert [c["compile"] for c in calls[2:]] == [False, False] and (tmp_path / "bench-cpu-quick.json").exists()
    with pytest.raises(SystemExit) as exc:
        bench.bench_main(["--suite", "kernels", "--compile", "--device", "cpu"])
    assert exc.value.code == 2 and "--compile" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compile"):
        bench.run(suite="kernels", device="cpu", out=tmp_path, compile=True, log=lambda s: None)
