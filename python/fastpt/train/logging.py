"""What a run shows and leaves behind: a progress bar (loss, tokens/s, MFU), ``metrics.csv``,
TensorBoard events (when the ``tensorboard`` package is installed), ``loss.png`` (loss and
throughput, when matplotlib is installed), ``summary.json`` and a one-line summary.

Only rank 0 logs. A resumed run keeps the CSV rows up to the checkpoint's step and drops the
ones a killed run wrote after it, so the file reads as one uninterrupted run; a last row torn by a
write the disk had no room for (no line end, or cells that do not parse) is dropped with a warning.

A full disk or a read-only directory: a ``metrics.csv`` row that cannot be written ends the run with
``MetricsWriteError`` naming the file (the partial row is cut off again, so ``--resume`` reads a clean
file once there is room); TensorBoard events are a second copy of the same rows, so a failed write
there is a warning and the run goes on without them. At the end of a run (its final checkpoint saved),
``loss.png``, ``summary.json`` or the TensorBoard files that cannot be written are a warning naming the
file: the run's result stands. ``loss.png`` and ``summary.json`` are written to a temporary name and
moved into place, never left half written.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from ..data.shards import unlink_quietly

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


class MetricsWriteError(OSError):
    """``metrics.csv`` could not be written (a full disk, a read-only directory ...): names the file."""


def _parse_row(raw: dict) -> dict:
    """One ``csv.DictReader`` row as ``read_metrics`` returns it; ValueError for a cell that does not parse,
    a missing ``step`` or more cells than columns."""
    if None in raw:
        raise ValueError(f"{len(raw[None])} cells more than the header's columns")
    row = {k: None if v in ("", None) else (int(v) if k in ("step", "tokens") else float(v)) for k, v in raw.items()}
    if row.get("step") is None:
        raise ValueError("no step")
    return row


def read_metrics(path: str | Path, *, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts of floats (empty cells: None; ``step``/``tokens``: int).

    Every row is written whole with its line end last, so a last line without one is a row the disk had no
    room for (a full disk cuts an append anywhere: ``6``, ``6,306,4.5``, ``...,1.449e-``). With ``warn``
    such a last line, or a last row whose cells do not parse, is dropped and ``warn`` called naming it
    (``RunLogger`` on resume); without, or for any other row, ValueError naming the file and the line.
    """
    with open(path, newline="") as f:
        text = f.read()
    torn = None
    if warn is not None and text and not text.endswith("\n"):
        head, sep, last = text.rpartition("\n")
        if sep:  # the header is written whole (RunLogger._rewrite is atomic): only a row can be torn
            text, torn = head + sep, last
    reader = csv.DictReader(io.StringIO(text, newline=""))
    raws = list(reader)
    rows = []
    for i, raw in enumerate(raws):
        try:
            rows.append(_parse_row(raw))
        except ValueError as exc:
            if warn is not None and i == len(raws) - 1 and torn is None:
                torn = text.rstrip("\r\n").rpartition("\n")[2]
                break
            raise ValueError(f"{path}: line {i + 2}: {exc} (not a row fastpt wrote; remove the line)") from exc
    if torn is not None:
        warn(f"{path}: dropped the torn last row {torn.rstrip()[:120]!r} (a write cut short, e.g. by a full disk)")
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
            self.rows = [r for r in read_metrics(self.csv_path, warn=self._warn) if r["step"] <= start_step]
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
        """The whole CSV (header and rows) through ``metrics.csv.tmp`` and a rename; MetricsWriteError naming
        the file, the ``.tmp`` removed, when it cannot be written."""
        tmp = self.csv_path.with_name(CSV_NAME + ".tmp")
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.columns)
                for r in self.rows:
                    w.writerow([_cell(r.get(c)) for c in self.columns])
            tmp.replace(self.csv_path)
        except OSError as exc:
            unlink_quietly(tmp)
            raise _error(MetricsWriteError, exc, f"{self.csv_path}: cannot be written ({exc.strerror or exc})") \
                from exc

    def _append(self, row: dict) -> None:
        """One row at the end of the CSV. A failed append (the disk full part way through the row) is cut back
        to the file's previous end, so the file holds whole rows only, and raises MetricsWriteError."""
        try:
            size = self.csv_path.stat().st_size
        except OSError:
            size = None
        try:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])
        except OSError as exc:
            if size is not None:
                try:
                    os.truncate(self.csv_path, size)
                except OSError:
                    pass
            raise _error(MetricsWriteError, exc, f"{self.csv_path}: cannot append the row of step {row.get('step')} "
                         f"({exc.strerror or exc}); the run stops here: make room and rerun with --resume") from exc

    def _warn(self, msg: str) -> None:
        self.log_line(f"pretrain: warning: {msg}")

    def _tb_failed(self, exc: BaseException, *, close: bool = True) -> None:
        """A TensorBoard write failed: warn once, close the writer (``close``; its own errors too) and go on
        without it (``close=False``: the failure was the close at the end of the run)."""
        why = getattr(exc, "strerror", None) or exc
        then = f"logging goes on to {self.csv_path} only" if close else "the run's result stands"
        self._warn(f"{self.out / TB_DIR}: TensorBoard events cannot be written ({why}); {then}")
        if close:
            self._close_tb()
        else:
            self.tb = None

    def _close_tb(self) -> None:
        """Close the TensorBoard writer, if open, and drop it (its own errors too: warned, or past caring)."""
        tb, self.tb = self.tb, None
        if tb is not None:
            try:
                tb.close()
            except OSError:
                pass

    def close(self) -> None:
        """Release the progress bar and the TensorBoard writer (its thread) if still open: the recipe's cleanup
        calls it after ``finish`` and also when a run ends on an exception, where ``finish`` never ran (each
        failed ``pretrain`` call in one process left a writer thread behind)."""
        if self.bar is not None:
            self.bar.close()
        self._close_tb()

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
            self._append(row)
        if self.tb is not None:
            try:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and v is not None:
                        self.tb.add_scalar(f"train/{k}", v, row["step"])
            except OSError as exc:  # raised by the writer thread's failed write, at the next add_scalar
                self._tb_failed(exc)
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
        """``loss.png``: loss and tokens/s against the step (None without matplotlib or rows), written to a
        temporary name and moved into place. Raises OSError naming ``loss.png`` when it cannot be written."""
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
        tmp = path.with_name(f".{PLOT_NAME}.tmp-{os.getpid()}")
        try:
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, path)
        except OSError as exc:
            unlink_quietly(tmp)
            if exc.errno is None:
                raise OSError(f"{path}: {exc}") from exc
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc  # loss.png, not the temporary
        finally:
            plt.close(fig)
        return path

    def finish(self, summary: dict) -> str:
        """Close the bar and TensorBoard, write the plot and ``summary.json``; ``summary`` gains the
        paths (``metrics_csv``, ``plot``, ``tensorboard``) and ``summary_line``, which is returned.

        The run is over (its final checkpoint saved): a file here that cannot be written (a full disk) is a
        warning line naming it, not an error; ``plot`` / ``tensorboard`` are then None in the summary.
        """
        if not self.enabled:
            return ""
        if self.bar is not None:
            self.bar.close()
        tb = self.tb
        if tb is not None:
            try:
                tb.close()
            except OSError as exc:
                self._tb_failed(exc, close=False)
        try:
            plot = self.write_plot()
        except OSError as exc:
            plot = None
            self._warn(f"{self.out / PLOT_NAME}: not written ({exc.strerror or exc}); the run's result stands")
        summary.update(metrics_csv=str(self.csv_path), plot=str(plot) if plot else None,
                       tensorboard=str(self.out / TB_DIR) if tb is not None and self.tb is not None else None)
        summary["summary_line"] = line = summary_line(summary)
        path = self.out / SUMMARY_NAME
        tmp = path.with_name(f".{SUMMARY_NAME}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1, default=str)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as exc:
            unlink_quietly(tmp)
            self._warn(f"{path}: not written ({exc.strerror or exc}); the run's result stands")
        self.log_line(line)
        return line


def _error(cls: type[OSError], exc: OSError, message: str) -> OSError:
    """``cls`` carrying ``exc``'s errno (when it has one) and ``message``, which names the file."""
    return cls(exc.errno, message) if exc.errno is not None else cls(message)


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
