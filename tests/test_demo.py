"""``fastpt demo`` end to end on a tiny budget: preprocess, pre-train, evaluate, report."""
import json

from fastpt.cli import main
from fastpt.demo_pretrain import run


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
    assert set(saved) == {"preprocess", "pretrain", "eval"}
    assert any(line.startswith("downstream") for line in lines)
    # a second run reuses the shards and continues the run instead of starting over
    again = run(tmp_path / "demo", minutes=0.05, model="bert-tiny", vocab_size=600, seq_len=32, batch_size=8,
                evaluate=False, progress=False, log=lines.append)
    assert any("reusing" in line for line in lines) and again["pretrain"]["steps"] >= p["steps"]


def test_demo_cli_help(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--minutes" in capsys.readouterr().out
