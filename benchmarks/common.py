"""Helpers shared by the benchmark scripts: machine description, demo data, memory, tables, JSON.

Every script prints a Markdown table and, with ``--out FILE``, writes the same numbers as JSON
together with a description of the machine they were taken on (numbers without it are useless).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import hgad
from hgad.demo import make_demo_dataset
from hgad.io import atomic_write_json

__all__ = ["add_common_args", "setup", "machine_info", "demo_data", "spread", "MemoryMeter", "sync",
           "timed", "median_p90", "markdown_table", "finish", "SMOKE_NOTE"]

SMOKE_NOTE = "SMOKE RUN (tiny settings, to check the script works): numbers are meaningless"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes: --device, --threads, --data, --out, --smoke."""
    parser.add_argument("--device", nargs="+", default=["cpu"], choices=("cpu", "cuda"),
                        help="device(s) to measure on (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, normally one per core)")
    parser.add_argument("--data", type=Path, default=None,
                        help="demo dataset folder; made there if absent (default: a folder in the temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings that only check the script runs (a few seconds; not a benchmark)")


def setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Apply --threads; refuse --device cuda without a CUDA device."""
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(devices: Sequence[str]) -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores_usable": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hgad": hgad.__version__,
        "platform": platform.platform(),
        "devices": list(devices),
        "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    load = info["load_average_1min_at_start"]
    if load is not None and cores and load > 0.5 * cores:
        info["busy_warning"] = (
            f"the machine was busy (load {load:.1f} on {cores} cores) when this run started: CPU numbers are "
            "not representative; with several threads on busy cores torch's OpenMP threads wait on each "
            "other and runs can be many times slower (re-run on a quiet machine, or compare with --threads 1)")
    if "cuda" in devices and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def demo_data(folder: Path | None, log: Callable[[str], None] = print) -> Path:
    """A dataset folder (MVTec layout): ``folder`` if it holds one, else the demo dataset made there.

    Default folder: ``hgad-bench-demo`` in the temp dir (made once, about 5 s).
    """
    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "hgad-bench-demo"
    if not (folder.is_dir() and any(folder.iterdir())):
        log(f"making the demo dataset in {folder} ...")
        make_demo_dataset(folder, seed=0)
    return folder


def spread(items: Sequence[Any], n: int | None) -> list[Any]:
    """``n`` items taken evenly over ``items`` (every class of a sorted record list is represented)."""
    if n is None or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


class MemoryMeter:
    """Peak memory since :meth:`reset`: process RSS on CPU, max allocated CUDA memory on CUDA (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 resets the peak-RSS counter (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; lifetime peak

    @property
    def label(self) -> str:
        return "CUDA max allocated" if self.device.type == "cuda" else "peak RSS"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of ``fn()`` (CUDA work included) and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median_p90(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns`` (missing cells left blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) if c in row and row[c] is not None else "" for c in columns)
                     + " |")
    return "\n".join(lines)


def finish(payload: dict[str, Any], table: str, out: Path | None, notes: Sequence[str] = ()) -> None:
    """Print the table (and notes), write the JSON if asked."""
    print()
    print(table)
    for note in notes:
        print(f"\n- {note}" if note == notes[0] else f"- {note}")
    info = payload["machine"]
    print(f"\n{info['cpu']}, {info['cpu_cores_usable']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load average {info['load_average_1min_at_start']}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""))
    if info.get("busy_warning"):
        print(f"WARNING: {info['busy_warning']}")
    if out is not None:
        atomic_write_json(Path(out), {**payload, "notes": list(notes), "table_markdown": table})
        print(f"results written to {out}")
