"""The train-step benchmark's figures: matmul peaks per dtype, a results row per side (median step,
tokens/s, achieved FLOP/s, MFU) and the printed table."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from benchmarks.common import median, spread
from benchmarks.train_step_contenders import DTYPES
from training.mfu import (
    MFU_ABOVE_PEAK_NOTE, TRAIN_FLOPS_PER_FORWARD_FLOP, BusyPeakWarning, datasheet_peak_flops, format_mfu,
    measured_peak_flops,
)


def mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.0f}"


def dtype_peaks(precisions, device: torch.device) -> dict[str, dict]:
    """Each precision's matmul peaks, each measured or looked up once: "measured" (MFU's; None where
    there is none: bf16 on a CPU without bf16 instructions), "datasheet" (None off the table) and
    "busy" (measured while other processes used the CPU: too low, so that MFU reads high; said on
    stderr in one line)."""
    peaks = {}
    for name in precisions:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BusyPeakWarning)
            measured = measured_peak_flops(DTYPES[name], device)
        busy = [w for w in caught if issubclass(w.category, BusyPeakWarning)]
        for warning in busy:
            print(f"warning: {warning.message}", file=sys.stderr)
        peaks[name] = {"measured": None if math.isnan(measured) else measured,
                       "datasheet": datasheet_peak_flops(DTYPES[name], device), "busy": bool(busy)}
    return peaks


def report_line(label: str, seconds: list[float], tokens: int, flops_per_token: float, peaks: dict) -> dict:
    """One row of results; `peaks`: one precision's entry of `dtype_peaks`."""
    step = median(seconds)
    tps = tokens / step
    achieved = tps * flops_per_token * TRAIN_FLOPS_PER_FORWARD_FLOP
    row = {"label": label, "step_ms": step * 1e3, "spread": spread(seconds), "tokens_per_s": tps,
           "achieved_flops": achieved, "peak_flops": peaks["measured"],
           "mfu": achieved / peaks["measured"] if peaks["measured"] else None}
    if peaks["datasheet"]:
        row.update(datasheet_peak_flops=peaks["datasheet"], mfu_datasheet=achieved / peaks["datasheet"])
    row["mfu_above_peak"] = any(row.get(key) is not None and row[key] > 1 for key in ("mfu", "mfu_datasheet"))
    return row


def _flops(rate: float) -> str:
    return f"{rate / 1e12:,.0f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:,.0f} GFLOP/s"


def results_table(rows: dict[str, dict], peaks: dict[str, dict], device: torch.device) -> list[str]:
    """The printed results: a row per side, then what each MFU is against."""
    lines = [f"{'':<52}{'step ms':>9}{'':>6}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>8}{'mem MiB':>9}"]
    for row in rows.values():
        lines.append(f"{row['label']:<52}{row['step_ms']:>9.1f}{row['spread']:>6}{row['tokens_per_s']:>10,.0f}"
                     f"{row['achieved_flops'] / 1e9:>9.1f}{format_mfu(row['mfu']):>8}"
                     f"{mib(row.get('peak_step_memory_bytes')):>9}")
    shown = []
    for name, peak in peaks.items():
        if peak["measured"]:
            shown.append(f"{name} {_flops(peak['measured'])}")
        elif device.type == "cpu" and name == "bf16":
            shown.append("bf16 n/a (this CPU has no bf16 instructions: bf16 is emulated and has no meaningful peak)")
        else:
            shown.append(f"{name} n/a")
    lines.append(f"MFU: against the matmul peak measured on this {device.type} for the row's dtype (square matmuls, "
                 "best of several, training/mfu.py): " + ", ".join(shown))
    datasheet = {name: peak["datasheet"] for name, peak in peaks.items() if peak["datasheet"]}
    if datasheet:
        lines.append("MFU against the datasheet's peak instead ("
                     + ", ".join(f"{name} {_flops(value)}" for name, value in datasheet.items()) + "): "
                     + ", ".join(f"{row['label']} {format_mfu(row.get('mfu_datasheet'))}" for row in rows.values()))
    if any(row["mfu_above_peak"] for row in rows.values()):
        lines.append(MFU_ABOVE_PEAK_NOTE)
    return lines
