"""Shared helpers of the benchmark scripts: the machine's description, timing, peak memory in a fresh process, and
rewriting one section of BENCHMARKS.md.

Every figure a script writes is measured in that one run on one machine, so ratios between its rows are fair even on
a shared CPU; absolute seconds are not comparable between runs (these machines vary by +-15% and more when loaded).
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # plain scripts: make CCELLACore importable without installing
    sys.path.insert(0, str(REPO))

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
GIB = 2 ** 30

# The paper's sizes (CCELLACore/configs/paper.yaml): 256 x 256 x 128 volumes, 4x downsampling, 3 sequences.
PAPER_VOLUME = (256, 256, 128)
PAPER_LATENT = (64, 64, 32)


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (falls back to /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from CCELLACore.precision import cpu_model_name

    return cpu_model_name()


def cpu_capability() -> str:
    """``AVX2`` / ``AVX-512`` plus ``bf16`` and ``AMX`` where the CPU has them natively, and torch's dispatch."""
    import torch

    from CCELLACore.precision import cpu_flags

    flags = cpu_flags()
    parts = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]
    if "avx512_bf16" in flags:
        parts.append("bf16")
    if "amx_bf16" in flags or "amx_tile" in flags:
        parts.append("AMX")
    return f"{' + '.join(parts)} (torch dispatch {torch.backends.cpu.get_cpu_capability()})"


def machine_kind() -> str:
    """The CPU kind that sets the speed figures: ``amx``, ``avx512-bf16``, ``avx512`` or ``avx2`` (each machine
    kind keeps its own BENCHMARKS.md sections, so a run on one kind never replaces another kind's figures)."""
    from CCELLACore.precision import cpu_flags

    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    return "avx512" if "avx512f" in flags else "avx2"


def machine_load() -> dict[str, Any]:
    """How busy the machine is before we start: 1-minute load average and CPU use over one second."""
    import psutil

    busy = psutil.cpu_percent(interval=1.0)
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return {"load_average_1min": round(load1, 2), "cpu_busy_percent": busy, "cores": cores,
            "loaded": bool(load1 > 0.5 * cores or busy > 30.0)}


def describe_machine(threads: int) -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "capability": cpu_capability(), "torch": torch.__version__,
            "threads": threads, "python": platform.python_version(), "load_at_start": machine_load()}


def machine_lines(machine: dict[str, Any], load_at_end: dict[str, Any] | None = None) -> list[str]:
    """The header lines naming the machine, for a BENCHMARKS.md section."""
    start = machine["load_at_start"]
    lines = [
        f"- CPU: {machine['cpu']}, {machine['capability']}; torch {machine['torch']}, "
        f"{machine['threads']} threads of {start['cores']} cores",
        f"- Load before the run: load average {start['load_average_1min']}, {start['cpu_busy_percent']:.0f}% CPU "
        f"busy -> machine {'LOADED (shared with other jobs)' if start['loaded'] else 'idle'}",
    ]
    if load_at_end is not None:
        lines.append(f"- Load average at the end: {load_at_end['load_average_1min']} (includes this run)")
    return lines


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def time_call(fn: Callable[[], Any], repeats: int = 1, warmup: int = 0) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def peak_rss_gib() -> float:
    """Peak resident memory of THIS process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def current_rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / GIB


class PeakRSS:
    """Context manager sampling this process's resident memory every ``interval`` s in a thread: ``peak_gib`` is
    the highest value seen and ``rise_gib`` its rise above the value at entry (the transient memory of the work
    inside, e.g. activations; torch's large CPU tensors are mmap-backed, so freed memory leaves RSS at once)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_gib = self.start_gib = 0.0

    def __enter__(self) -> "PeakRSS":
        import threading

        import psutil

        self._proc = psutil.Process()
        self.start_gib = self.peak_gib = self._proc.memory_info().rss / GIB
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak_gib = max(self.peak_gib, self._proc.memory_info().rss / GIB)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_gib = max(self.peak_gib, self._proc.memory_info().rss / GIB)

    @property
    def rise_gib(self) -> float:
        return self.peak_gib - self.start_gib


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Time every callable once per round, rotating the order each round, so that a machine whose load changes
    over minutes slows all variants alike; one untimed warm-up round first.

    Returns per name: ``median_s``, ``times_s`` and ``peak_rise_gib`` (the largest memory rise over one call).
    """
    import statistics

    names = list(runs)
    out = {name: {"times_s": [], "peak_rise_gib": 0.0} for name in names}
    for fn in runs.values():
        fn()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with PeakRSS() as mem:
                started = time.perf_counter()
                runs[name]()
                out[name]["times_s"].append(time.perf_counter() - started)
            out[name]["peak_rise_gib"] = max(out[name]["peak_rise_gib"], mem.rise_gib)
    for name in names:
        out[name]["median_s"] = statistics.median(out[name]["times_s"])
    return out


def paired_ratio(result: dict[str, dict], slow: str, fast: str) -> float:
    """Median over rounds of time(slow) / time(fast), each ratio taken within one round."""
    import statistics

    return statistics.median(a / b for a, b in zip(result[slow]["times_s"], result[fast]["times_s"]))


def _child(fn: Callable[..., dict], threads: int, kwargs: dict) -> dict:
    set_threads(threads)
    import torch  # noqa: F401  (imported before the baseline so that its libraries count as baseline)

    baseline = current_rss_gib()
    result = dict(fn(**kwargs))
    result["peak_rss_gib"] = round(peak_rss_gib(), 3)
    result["baseline_rss_gib"] = round(baseline, 3)
    result["peak_above_baseline_gib"] = round(peak_rss_gib() - baseline, 3)
    return result


def isolated(fn: Callable[..., dict], threads: int, timeout_s: float | None = None, **kwargs) -> dict:
    """Run ``fn(**kwargs)`` in a fresh process so that its peak memory (``ru_maxrss``) is its own.

    Returns ``fn``'s dict plus ``peak_rss_gib`` (the process's peak resident memory, Python and torch included),
    ``baseline_rss_gib`` (after importing torch) and ``peak_above_baseline_gib``; on a timeout or crash, a dict with
    ``error`` saying why.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        future = pool.submit(_child, fn, threads, kwargs)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            for pid in list(pool._processes):  # our own worker, by its id
                os.kill(pid, 9)
            return {"error": f"did not finish within {timeout_s:.0f} s"}
        except Exception as exc:  # a crash in the child (e.g. out of memory) is a result, not a script failure
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def write_section(name: str, title: str, lines: list[str], path: Path = BENCHMARKS_MD, *,
                  per_machine: bool = False) -> Path:
    """Replace (or append) the section between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``;
    ``per_machine``: one section per :func:`machine_kind` (NAME@KIND, the kind in the title)."""
    from CCELLACore.fileio import atomic_write_text

    if per_machine:
        kind = machine_kind()
        name, title = f"{name}@{kind}", f"{title} ({kind} CPU)"

    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    body = "\n".join([begin, f"## {title}", "", *lines, end])
    import fcntl

    with open(path.with_name(".BENCHMARKS.lock"), "w") as lock:  # scripts run side by side: one writer at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
        return atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"
