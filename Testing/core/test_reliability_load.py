"""Load (RELIABILITY.md): bulk synthesis runs in memory that does not grow with the number of exams, and a
10 000-case manifest imports in seconds."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil

from CCELLACore.cli import main
from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.study import Study
from test_reliability_crash import ENV

# Per exam ~0.1 s, all real work: encoding the report, 1 denoising step, decoding, writing three volumes, the preview
# and the sidecar; the child uses both cores (polling costs the parent little).
N_EXAMS = 1000
#: Measured (2026-12-03, Intel Xeon with AMX run on AVX2 kernels, 2 threads, unique reports; 109 s): peak RSS climbs
#: ~20 MiB over the first ~350 exams (allocator arenas and caches filling) and is flat from there to 1 000 (717-718
#: MiB). A leak is growth that does not stop: exams 400-500 against the last 100, within 16 MiB (a leak of 33 KiB
#: per exam would show); and the whole run within 64 MiB of exams 20-40.
WINDOWS = ((400, 500), (N_EXAMS - 100, N_EXAMS))
RSS_SLACK = 16 * 2**20
WARMUP_SLACK = 64 * 2**20


def bulk_manifest(data: Path, n: int, path: Path) -> Path:
    """A manifest of ``n`` test exams cycling through the 8 preprocessed phantoms, each with its own case id and its
    own report (the phantom report's first 45 words, ~60 tokens, plus its exam number, so that no two are alike).

    Shorter than a whole report (100-220 tokens) because the text encoder is most of an exam's cost here; a cache
    that kept every report's features would still grow ~90 KiB per exam, well above the 33 KiB a leak needs to show.
    """
    source = read_manifest(data / "prep" / "manifest.csv").studies
    studies = [replace(source[k % len(source)], case_id=f"bulk{k:04d}", patient_id=f"bulkp{k:04d}", split="test",
                       report=" ".join(source[k % len(source)].report.split()[:45]) + f" Exam {k}.") for k in range(n)]
    return write_manifest(studies, path)


def test_bulk_synthesis_memory_does_not_grow_with_the_exam_count(data, trained, tmp_path):
    """1 000 tiny exams with unique reports in one `ccella synthesize`: the child's peak RSS (psutil, every 10 ms)
    while the last 100 exams are made is no higher than while exams 400-500 were, within 16 MiB (see WINDOWS)."""
    manifest = bulk_manifest(data, N_EXAMS, tmp_path / "bulk.csv")
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "CCELLACore.cli", "synthesize", "--manifest", str(manifest), "--model", str(trained),
           "--out", str(out), "--steps", "1", "--device", "cpu", "--no-progress"]
    child = subprocess.Popen(cmd, env={**ENV, "OMP_NUM_THREADS": "2"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, int]] = []  # (exams started, RSS bytes)
    process = psutil.Process(child.pid)
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        while child.poll() is None:
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                break
            try:  # an exam's folder appears when it is written: one listing, not a stat per exam (cheap to poll)
                started = len(os.listdir(out / "cases"))
            except FileNotFoundError:
                started = 0
            samples.append((started, rss))
            time.sleep(0.01)
        _, err = child.communicate(timeout=600)
    finally:
        child.kill()
    seconds, used = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    assert child.returncode == 0, err[-3000:]
    assert json.loads((out / "synthesize_summary.json").read_text(encoding="utf-8"))["n_done"] == N_EXAMS

    def peak(lo: int, hi: int) -> int:  # up to the last exam, not the merge after it (one manifest row per exam)
        return max(rss for started, rss in samples if lo <= started < hi)

    first, (middle, late) = peak(20, 40), (peak(*window) for window in WINDOWS)
    print(f"{N_EXAMS} exams: {seconds:.1f} s wall, {used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.1f} s "
          f"CPU; peak RSS while exams 20-40 were made: {first / 2**20:.1f} MiB, 400-500: {middle / 2**20:.1f} MiB, "
          f"the last 100: {late / 2**20:.1f} MiB")
    assert late - middle < RSS_SLACK, (middle / 2**20, late / 2**20)
    assert late - first < WARMUP_SLACK, (first / 2**20, late / 2**20)


def test_a_10000_case_manifest_imports_in_seconds(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    studies = []
    for k in range(10_000):
        axt2 = images / f"c{k:05d}_t2.nii.gz"
        axt2.touch()  # `ccella import` of a manifest checks that the files exist (headers only with --check-images)
        studies.append(Study(case_id=f"c{k:05d}", patient_id=f"p{k // 2:05d}", institution=str(k % 3), split="train",
                             images={"AxT2": axt2}, report=f"PI-RADS {k % 5 + 1}, lesion {k % 17} mm.",
                             pirads=k % 5 + 1))
    source = write_manifest(studies, tmp_path / "source.csv")
    start, cpu = time.perf_counter(), time.process_time()
    assert main(["import", str(source), "--out", str(tmp_path / "imported.csv")]) == 0
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"ccella import of 10 000 cases: {seconds:.2f} s wall, {cpu:.2f} s CPU")
    imported = read_manifest(tmp_path / "imported.csv")
    assert len(imported) == 10_000 and not imported.problems
    assert imported.studies[9_999].report == studies[9_999].report
    assert "10000 studies of 5000 patients" in capsys.readouterr().out
    # CPU time: what the import costs, whatever else the machine runs (wall time equals it on an idle machine).
    assert cpu < 5.0, (seconds, cpu)
