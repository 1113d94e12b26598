"""Result rows, their files and their tables: CSV and JSON appended run after run, Markdown and a
PNG of the latest run.

A row is a flat dict with the keys of :data:`COLUMNS` (what ran, on what, how long, how much
memory, against which baseline, under which versions and commit). :func:`make_row` builds one,
:func:`add_ratios` fills ``ratio`` (the baseline's median time / this row's, the baseline
measured in the same run on the same inputs) and ``mem_ratio``; :func:`write_results` appends to
``<out>/<stem>.csv`` and ``<out>/<stem>.json`` and rewrites ``<stem>.md`` and ``<stem>.png``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

COLUMNS = [
    "run", "date", "suite", "op", "case", "mode", "shape", "dtype", "provider", "baseline", "status",
    "time_ms", "min_ms", "repeats", "ratio", "tflops", "mfu", "rate", "rate_unit", "mem_mb", "mem_ratio",
    "device", "device_name", "cores", "torch_threads", "python", "torch", "triton", "transformers", "fastpt",
    "cuda", "driver", "commit", "loadavg_1m", "peak_tflops", "note",
]
MACHINE_KEYS = ("device", "device_name", "cores", "torch_threads", "python", "torch", "triton", "transformers",
                "fastpt", "cuda", "driver", "commit", "loadavg_1m")

__all__ = ["COLUMNS", "make_row", "add_ratios", "group_key", "is_fastpt", "write_results", "append_csv",
           "append_json", "markdown", "plot", "fmt_rate"]


def make_row(*, op: str, case: str, provider: str, baseline: str, shape, dtype: str, mode: str = "",
             suite: str = "kernels", timing=None, mem_bytes: int | None = None, flops: float | None = None,
             units: float | None = None, unit: str | None = None, peak=None, status: str = "ok",
             note: str = "") -> dict:
    """One result row (machine fields and ratios are filled later by the runner).

    Args:
        op, case, mode: what ran (e.g. "attention", "packed S2048 D64", "fwd+bwd").
        provider: who ran it ("fastpt", "fastpt-triton", "torch-sdpa", "hf-collator", ...).
        baseline: the provider of the same group that ratios are taken against.
        shape: the input shape (any JSON-able value; stored as text). dtype: "fp32", "bf16", ...
        timing: a ``harness.Timing`` (None for a skipped or failed row).
        mem_bytes: peak extra memory of one call (None: not measured).
        flops: FLOPs of one call (TFLOP/s and MFU derive from it). peak: a ``peaks.Peak``.
        units, unit: items one call processes and their name, for a rate ("tokens" -> tokens/s).
        status: "ok", "skipped: why" or "error: what".
    """
    row = dict.fromkeys(COLUMNS)
    row.update(suite=suite, op=op, case=case, mode=mode, shape=str(shape), dtype=dtype, provider=provider,
               baseline=baseline, status=status, note=note)
    if peak is not None:
        row["peak_tflops"] = peak.tflops
    if timing is not None:
        t = timing.median
        row.update(time_ms=t * 1e3, min_ms=timing.min * 1e3, repeats=timing.repeats)
        if flops:
            row["tflops"] = flops / t / 1e12
            row["mfu"] = peak.mfu(flops / t) if peak is not None else None
        if units:
            row.update(rate=units / t, rate_unit=f"{unit}/s")
    if mem_bytes is not None:
        row["mem_mb"] = mem_bytes / 2**20
    return row


def group_key(row: dict) -> tuple:
    """Rows of one group ran the same work on the same inputs: one baseline each."""
    return row["suite"], row["op"], row["case"], row["mode"], row["dtype"]


def is_fastpt(provider: str) -> bool:
    return provider == "fastpt" or provider.startswith("fastpt-")


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``ratio`` = baseline median / row median (> 1: faster than the baseline) and
    ``mem_ratio`` = row peak memory / baseline peak memory, within each group. In place; returns rows."""
    groups = defaultdict(list)
    for r in rows:
        groups[group_key(r)].append(r)
    for members in groups.values():
        by_name = {r["provider"]: r for r in members}
        for r in members:
            base = by_name.get(r["baseline"])
            if base is None or not r.get("time_ms") or not base.get("time_ms"):
                continue
            r["ratio"] = base["time_ms"] / r["time_ms"]
            if r.get("mem_mb") is not None and base.get("mem_mb"):
                r["mem_ratio"] = r["mem_mb"] / base["mem_mb"]
    return rows


# ----------------------------------------------------------------------------- files

def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def append_csv(path: str | Path, rows: list[dict]) -> None:
    """Append rows to a CSV with a header; a file with other columns is rewritten with their union."""
    path = Path(path)
    columns = list(COLUMNS)
    old: list[dict] = []
    rewrite = not path.exists() or not path.stat().st_size
    if not rewrite:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != COLUMNS:
                columns += [c for c in reader.fieldnames or [] if c not in columns]
                old, rewrite = list(reader), True
    if rewrite:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
            w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        os.replace(tmp, path)
        return
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, columns, extrasaction="ignore").writerows({k: _cell(v) for k, v in r.items()} for r in rows)


def append_json(path: str | Path, rows: list[dict]) -> None:
    """Append rows to a JSON list (written through a temp file); raises ValueError naming a file
    that holds something else."""
    path = Path(path)
    data = []
    if path.exists() and path.stat().st_size:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of result rows, found {type(data).__name__}")
    data.extend(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_results(rows: list[dict], out: str | Path, stem: str, *, run_rows: list[dict] | None = None,
                  machine: dict | None = None, peaks: dict | None = None) -> list[Path]:
    """Append ``rows`` to ``<out>/<stem>.csv`` and ``.json``; (re)write ``.md`` and, when
    matplotlib is installed, ``.png`` for ``run_rows`` (default ``rows``: the run so far).
    Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.csv", out / f"{stem}.json", out / f"{stem}.md"]
    append_csv(paths[0], rows)
    append_json(paths[1], rows)
    shown = rows if run_rows is None else run_rows
    png = out / f"{stem}.png"
    drawn = plot(shown, png)
    paths[2].write_text(markdown(shown, machine=machine, peaks=peaks, png=png.name if drawn else None))
    return paths + ([png] if drawn else [])


# ----------------------------------------------------------------------------- Markdown

def fmt_rate(r: float | None, unit: str | None = None) -> str:
    if r is None:
        return ""
    for scale, prefix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if r >= scale:
            return f"{r / scale:,.1f}{prefix}{unit or ''}"
    return f"{r:,.0f}{unit or ''}"


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _speedups(members: list[dict]) -> dict[str, float]:
    """fastpt's speed-up over each other row of a group: that row's median / fastpt's."""
    ours = next((r for r in members if r["provider"] == "fastpt" and r.get("time_ms")), None)
    if ours is None:
        return {}
    return {r["provider"]: r["time_ms"] / ours["time_ms"] for r in members
            if r is not ours and not is_fastpt(r["provider"]) and r.get("time_ms")}


def markdown(rows: list[dict], *, machine: dict | None = None, peaks: dict | None = None,
             png: str | None = None) -> str:
    """A Markdown report of one run: a header naming the machine, then one table per op.

    ``ratio`` columns: ``x baseline`` (baseline median / this median, > 1 is faster) and, on
    non-fastpt rows, ``fastpt x`` (this row's median / the ``fastpt`` row's: fastpt's speed-up
    over it). ``peaks``: dtype -> note on the peak FLOP/s behind MFU.
    """
    m = machine or (rows[0] if rows else {})
    title = f"# fastpt bench: {m.get('device', '?')} ({m.get('device_name', '?')})"
    lines = [title, ""]
    lines.append(f"- device: {m.get('device_name')}; {m.get('cores')} cores, torch threads {m.get('torch_threads')}"
                 + (f"; CUDA {m.get('cuda')}, driver {m.get('driver')}" if m.get("cuda") else ""))
    lines.append(f"- python {m.get('python')}, torch {m.get('torch')}, triton {m.get('triton')}, "
                 f"transformers {m.get('transformers')}, fastpt {m.get('fastpt')}")
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    during = f", {min(loads):.2f} to {max(loads):.2f} as each op ended" if loads else ""
    lines.append(f"- commit {m.get('commit') or 'unknown'}; {m.get('date', '')}; 1-minute load average "
                 f"{m.get('loadavg_1m')} at the start{during} ({m.get('cores')} cores: above that, other "
                 f"processes competed for them)")
    for dtype, note in (peaks or {}).items():
        lines.append(f"- peak for MFU, {dtype}: {note}")
    lines += [
        "- time: median of the repeats (fastest beside it); `x baseline` = the group's baseline median / this "
        "median (> 1: faster), the baseline measured in the same run on the same inputs; `fastpt x` = this "
        "row's median / the `fastpt` row's (fastpt's speed-up over it); memory: peak extra MiB of one call",
        "",
    ]
    if png:
        lines += [f"![speed-up over each group's baseline]({png})", ""]
    by_op: dict[tuple, list] = defaultdict(list)
    for r in rows:
        by_op[(r["suite"], r["op"])].append(r)
    for (suite, op), members in by_op.items():
        lines += [f"## {op}" + (" (end to end)" if suite == "e2e" else ""), ""]
        notes = sorted({r["note"] for r in members if r.get("note")})
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        lines += ["| case | mode | dtype | provider | median ms | min ms | TFLOP/s | MFU | throughput | peak MiB "
                  "| x baseline | fastpt x |", "|" + "---|" * 12]
        groups: dict[tuple, list] = defaultdict(list)
        for r in members:
            groups[group_key(r)].append(r)
        for members_g in groups.values():
            ups = _speedups(members_g)
            for r in members_g:
                if r["status"] != "ok":
                    lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['provider']} | "
                                 f"{r['status'][:120]} |  |  |  |  |  |  |  |")
                    continue
                base = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
                if r["provider"] == r["baseline"]:
                    base = "1.00x (baseline)"
                up = f"{ups[r['provider']]:.2f}x" if r["provider"] in ups else ""
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ("n/a" if r.get("tflops") else "")
                lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['provider']} | "
                             f"{_num(r.get('time_ms'), '.3f')} | {_num(r.get('min_ms'), '.3f')} | "
                             f"{_num(r.get('tflops'), '.3f')} | {mfu} | "
                             f"{fmt_rate(r.get('rate'), ' ' + (r.get('rate_unit') or ''))} | "
                             f"{_num(r.get('mem_mb'), ',.1f')} | {base} | {up} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- PNG

def plot(rows: list[dict], path: str | Path) -> bool:
    """Bar charts of each row's speed-up over its group's baseline, one panel per op (log scale).
    Returns False (and writes nothing) when matplotlib is not installed or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    by_op: dict[str, list] = defaultdict(list)
    for r in rows:
        if r.get("ratio") is not None and r["provider"] != r["baseline"]:
            by_op[r["op"]].append(r)
    if not by_op:
        return False
    heights = [max(1.5, 0.22 * len(v) + 0.8) for v in by_op.values()]
    fig, axes = plt.subplots(len(by_op), 1, figsize=(11, sum(heights) + 0.6), squeeze=False, layout="constrained",
                             gridspec_kw=dict(height_ratios=heights))
    first = rows[0]
    ticks = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    for ax, (op, members) in zip(axes[:, 0], by_op.items()):
        labels = [f"{r['case']} {r['mode']} {r['dtype']} | {r['provider']}".replace("  ", " ") for r in members]
        ratios = [r["ratio"] for r in members]
        colors = ["tab:blue" if is_fastpt(r["provider"]) else "tab:gray" for r in members]
        y = list(range(len(members)))
        ax.barh(y, [v - 1 for v in ratios], left=1, color=colors)  # bars grow from 1x either way
        ax.set_yticks(y, labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        lo, hi = min(ratios + [1.0]) / 1.6, max(ratios + [1.0]) * 1.6
        ax.set_xlim(lo, hi)
        ax.set_xticks([t for t in ticks if lo <= t <= hi], [f"{t:g}x" for t in ticks if lo <= t <= hi])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        baselines = sorted({r["baseline"] for r in members})
        ax.set_title(f"{op}: speed-up over {', '.join(baselines)} (same run; blue: fastpt)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        for yi, v in zip(y, ratios):
            ax.text(v, yi, f" {v:.2f}x " if v >= 1 else f" {v:.2f}x ", va="center", fontsize=5,
                    ha="left" if v >= 1 else "right")
    fig.suptitle(f"fastpt bench on {first.get('device_name')} ({first.get('device')}), commit "
                 f"{first.get('commit') or 'unknown'}, {str(first.get('date', ''))[:10]}", fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True
