"""Turn the pytest-benchmark JSON of bench_masking.py into a Markdown table.

Usage: python benches/report_masking.py RESULTS.json [MORE.json ...] > RESULTS.md
(several files, e.g. the same bench at different thread counts, become consecutive sections)

Throughput is tokens (MLM) or patches (MAE) per second from the fastest round, the figure least
disturbed by other processes on a shared machine (the median is shown beside it). Each MLM row is
compared with transformers' DataCollatorForLanguageModeling measured in the same run on the same
examples (``input_ids`` only, and with a ``special_tokens_mask``); each MAE row with the plain
torch argsort masking.
"""
from __future__ import annotations

import json
import sys

LEGEND = [
    "What each row runs (same batches within a shape):",
    "",
    "- `hf_collator`: transformers' DataCollatorForLanguageModeling on a list of `{\"input_ids\": [...]}`;",
    "  `+stm`: the examples also carry `special_tokens_mask` lists, as `run_mlm.py` prepares them",
    "- `fastpt_collator`: fastpt.data.MLMCollator on the same examples (lists to tensors included)",
    "- `torch_vectorised`: Hugging Face's algorithm vectorised in torch on the padded id tensor",
    "- `mlm_mask[...]`: fastpt.ops.mlm_mask on that tensor (cpu: C++ kernel; reference: PyTorch)",
    "- `torch_argsort`: MAE's rand + argsort + argsort + gather; `random_masking[...]`: fastpt.ops.random_masking",
    "",
]
BASELINES = {"mlm": ["hf_collator", "hf_collator+stm"], "mae": ["torch_argsort"]}


def _rate(bench, stat="min") -> float:
    return bench["extra_info"]["tokens"] / bench["stats"][stat]


def _fmt_rate(r: float) -> str:
    return f"{r / 1e6:,.1f} M" if r >= 1e6 else f"{r / 1e3:,.0f} k"


def report(data: dict, title: str = "# Masking throughput (CPU)") -> str:
    benches = data["benchmarks"]
    if not benches:
        return "no benchmarks in this file\n"
    info = benches[0]["extra_info"]
    commit = data.get("commit_info", {})
    loads = [b["extra_info"]["loadavg_1m"] for b in benches]
    lines = [
        f"{title}, {info['torch_threads']} thread(s)",
        "",
        f"- machine: {info['cpu']} ({info.get('simd', '?')}), {info['cores']} cores "
        f"(torch and the fastpt kernels use {info['torch_threads']} threads)",
        f"- torch {info['torch']}, transformers {info['transformers']}, fastpt {info['fastpt']}",
        f"- date: {data.get('datetime', '?')[:19]} UTC; commit {commit.get('id', '?')[:12]}"
        + (" (working tree had uncommitted changes)" if commit.get("dirty") else ""),
        f"- 1-minute load average while measuring: {min(loads):.2f} to {max(loads):.2f}",
        "- throughput from the fastest round (median round beside it); MLM in tokens/s, MAE in patches/s;",
        "  ratios from the fastest rounds",
        "",
    ]
    if title.startswith("# "):
        lines += LEGEND
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b["group"], []).append(b)
    for group in sorted(groups, key=lambda g: (g.split()[0] != "mlm", g)):
        rows = groups[group]
        kind = group.split()[0]
        base = {b["extra_info"]["impl"]: _rate(b) for b in rows if b["extra_info"]["impl"] in BASELINES[kind]}
        names = [n for n in BASELINES[kind] if n in base]
        head = ("| implementation | per second | per second (median) | best ms | rounds | "
                + " | ".join(f"x {n}" for n in names) + " |")
        lines += [f"#{title.split()[0]} {group}", "", head, "|" + "---|" * (5 + len(names))]
        for b in sorted(rows, key=_rate):
            r, st = _rate(b), b["stats"]
            ratios = " | ".join(f"{r / base[n]:,.1f}" for n in names)
            lines.append(f"| {b['extra_info']['impl']} | {_fmt_rate(r)} | {_fmt_rate(_rate(b, 'median'))} | "
                         f"{st['min'] * 1e3:,.2f} | {st['rounds']} | {ratios} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for i, path in enumerate(argv):
        with open(path) as f:
            data = json.load(f)
        sys.stdout.write(report(data, "# Masking throughput (CPU)" if i == 0 else "## Same bench") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
