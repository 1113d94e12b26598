"""What a run shows and leaves behind: a progress bar (loss, tokens/s, MFU), ``metrics.csv``,
TensorBoard events (when the ``tensorboard`` package is installed), ``loss.png`` (loss and
throughput, when matplotlib is installed), ``summary.json`` and a one-line summary.

Only rank 0 logs. A resumed run keeps the CSV rows up to the checkpoint's step and drops the
ones a killed run wrote after it, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Callable

CSV_NAME, PLOT_NAME, SUMMARY_NAME, TB_DIR = "metrics.csv", "loss.png", "summary.json", "tensorboard"
LEADING = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"]


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: a resumed run's rows compare bit for bit
    return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts of floats (empty cells: None; ``step``/``tokens``: int)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                row[k] = None if v in ("", None) else (int(v) if k in ("step", "tokens") else float(v))
            rows.append(row)
    return rows


class RunLogger:
    """Rank 0's logs of one run in ``out_dir``; on other ranks (``enabled=False``) every call is a no-op.

    Args:
        start_step: the step the run starts from (a resumed run truncates the CSV after it).
        total_steps: length of the progress bar (None: open-ended).
        tensorboard, plot, progress: the recipe's ``output.*`` switches.
        log: where plain lines go (``print``).
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, start_step: int = 0,
                 total_steps: int | None = None, tensorboard: bool = True, plot: bool = True, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.out, self.enabled, self.plot, self.log_line = Path(out_dir), enabled, plot, log
        self.rows: list[dict] = []
        self.columns: list[str] = list(LEADING)
        self.tb = self.bar = None
        self.tb_missing = False
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / CSV_NAME
        if self.csv_path.is_file() and start_step > 0:
            self.rows = [r for r in read_metrics(self.csv_path) if r["step"] <= start_step]
            for r in self.rows:
                self.columns += [k for k in r if k not in self.columns]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is an optional dependency (fastpt[logs])
                self.tb_missing = True
            else:
                self.tb = SummaryWriter(str(self.out / TB_DIR), purge_step=start_step + 1 if start_step else None)
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="pretrain")

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_name(CSV_NAME + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            for r in self.rows:
                w.writerow([_cell(r.get(c)) for c in self.columns])
        tmp.replace(self.csv_path)

    def step(self, n: int = 1) -> None:
        """Advance the progress bar by ``n`` optimizer steps."""
        if self.bar is not None:
            self.bar.update(n)

    def log(self, row: dict) -> None:
        """Record one logging interval: ``row`` holds the ``LEADING`` keys and any objective metrics."""
        if not self.enabled:
            return
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        from .mfu import format_mfu

        fields = dict(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=human(row["tokens_per_s"]),
                      mfu=format_mfu(row.get("mfu")))
        if row.get("skipped_steps"):  # fp16: updates GradScaler skipped in this window (gradients overflowed)
            fields["skipped"] = str(row["skipped_steps"])
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
        else:
            self.log_line(f"step {row['step']}: " + "  ".join(f"{k} {v}" for k, v in fields.items())
                          + f"  tokens {human(row['tokens'])}")

    def write_plot(self) -> Path | None:
        """``loss.png``: loss and tokens/s against the step (None without matplotlib or rows)."""
        if not (self.enabled and self.plot and self.rows):
            return None
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        ax1.plot(steps, [r["loss"] for r in self.rows], lw=1.2)
        ax1.set_ylabel("training loss")
        ax1.grid(alpha=0.3)
        ax2.plot(steps, [r["tokens_per_s"] for r in self.rows], lw=1.2, color="tab:orange")
        ax2.set_ylabel("tokens / s")
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        fig.suptitle(f"fastpt pretrain: {self.out.name}")
        fig.tight_layout()
        path = self.out / PLOT_NAME
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def finish(self, summary: dict) -> str:
        """Close the bar and TensorBoard, write the plot and ``summary.json``; ``summary`` gains the
        paths (``metrics_csv``, ``plot``, ``tensorboard``) and ``summary_line``, which is returned."""
        if not self.enabled:
            return ""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        plot = self.write_plot()
        summary.update(metrics_csv=str(self.csv_path), plot=str(plot) if plot else None,
                       tensorboard=str(self.out / TB_DIR) if self.tb is not None else None)
        summary["summary_line"] = line = summary_line(summary)
        with open(self.out / SUMMARY_NAME, "w") as f:
            json.dump(summary, f, indent=1, default=str)
            f.write("\n")
        self.log_line(line)
        return line


def summary_line(s: dict) -> str:
    from .mfu import format_mfu

    unit = s.get("unit", "tokens")
    loss = "" if None in (s.get("first_loss"), s.get("final_loss")) else \
        f", loss {s['first_loss']:.4g} -> {s['final_loss']:.4g}"
    where = f"; loss curve {s['plot']}" if s.get("plot") else f"; metrics {s.get('metrics_csv')}"
    ckpt = f"; checkpoint {s['checkpoint']}" if s.get("checkpoint") else ""
    rate = s.get("tokens_per_s") or 0.0
    images = f", {human(s['samples_per_s'])} images/s" if unit == "patches" and s.get("samples_per_s") else ""
    steps = f"{s['steps']} steps, {human(s['tokens'])} {unit}"
    if s.get("steps_this_run") is not None and s["steps_this_run"] != s["steps"]:  # resumed: time and rate are ours
        steps += f"; resumed at step {s['steps'] - s['steps_this_run']}, {s['steps_this_run']} steps"
    return (f"pretrain: {steps} in {duration(s['train_time_s'])} "
            f"({human(rate)} {unit}/s{images}, MFU {format_mfu(s.get('mfu'))}){loss}{where}{ckpt}")


def now() -> float:
    return time.perf_counter()
