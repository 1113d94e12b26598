"""Summarise any pytest-benchmark JSON of benches/ as a Markdown table.

Usage: python benches/report.py RESULTS.json > RESULTS.md

Rows are grouped as the bench grouped them; within a group every fastpt row is compared
with every other row of the same group (the baselines measured in the same run), as
``baseline time / fastpt time`` from the fastest rounds. The machine, versions, date and
commit come from the JSON's own record of the run.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> str:
    data = json.load(open(path))
    mi = data["machine_info"]
    commit = data.get("commit_info", {})
    lines = [
        f"# {path.rsplit('/', 1)[-1]}",
        "",
        f"- machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
        f"{mi.get('cpu', {}).get('count', '?')} logical cores; python {mi.get('python_version')}",
        f"- date: {data.get('datetime')}; commit {commit.get('id', '?')[:12]}"
        f"{' (dirty tree)' if commit.get('dirty') else ''}",
        "- times are the fastest round (median beside it); ratio = baseline / fastpt, same run, same inputs",
        "",
        "| group | implementation | min ms | median ms | rounds | speed-up of fastpt |",
        "|---|---|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    for group, rows in groups.items():
        ours = [r for r in rows if "fastpt" in r["name"]]
        for r in sorted(rows, key=lambda r: r["stats"]["min"]):
            ratio = ""
            if "fastpt" not in r["name"] and ours:
                ratio = ", ".join(f"{r['stats']['min'] / o['stats']['min']:.2f}x" for o in ours)
            lines.append(f"| {group} | {r['name'].split('[', 1)[-1].rstrip(']')} | {r['stats']['min'] * 1e3:.3f} | "
                         f"{r['stats']['median'] * 1e3:.3f} | {r['stats']['rounds']} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1]))
