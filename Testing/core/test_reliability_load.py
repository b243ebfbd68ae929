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

# 1 000 would take ~100 s of CPU (per exam ~45 ms report encoding, ~25 ms decoding, ~15 ms denoising and ~15 ms
# writing, all real work): 300 fit the suite's ~40 s for this test on an idle core.
N_EXAMS = 300


def bulk_manifest(data: Path, n: int, path: Path) -> Path:
    """A manifest of ``n`` test exams cycling through the 8 preprocessed phantoms, each with its own case id."""
    source = read_manifest(data / "prep" / "manifest.csv").studies
    studies = [replace(source[k % len(source)], case_id=f"bulk{k:04d}", patient_id=f"bulkp{k:04d}", split="test")
               for k in range(n)]
    return write_manifest(studies, path)


def test_bulk_synthesis_memory_does_not_grow_with_the_exam_count(data, trained, tmp_path):
    """300 tiny exams in one `ccella synthesize`: the child's RSS (psutil, every 10 ms) while the last 20 exams are
    made is no higher than while exams 10-20 were, within 16 MiB (a leak of 60 KiB per exam would show)."""
    manifest = bulk_manifest(data, N_EXAMS, tmp_path / "bulk.csv")
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "CCELLACore.cli", "synthesize", "--manifest", str(manifest), "--model", str(trained),
           "--out", str(out), "--steps", "1", "--device", "cpu", "--no-progress"]
    child = subprocess.Popen(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, int]] = []  # (exams finished, RSS bytes)
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
            samples.append((max(0, started - 1), rss))
            time.sleep(0.01)
        _, err = child.communicate(timeout=600)
    finally:
        child.kill()
    seconds, used = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    assert child.returncode == 0, err[-3000:]
    assert json.loads((out / "synthesize_summary.json").read_text(encoding="utf-8"))["n_done"] == N_EXAMS
    early = max(rss for done, rss in samples if 10 <= done < 20)
    late = max(rss for done, rss in samples if N_EXAMS - 20 <= done < N_EXAMS)
    print(f"{N_EXAMS} exams: {seconds:.1f} s wall, {used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.1f} s "
          f"CPU; peak RSS while exams 10-20 were made: {early / 2**20:.1f} MiB; the last 20: {late / 2**20:.1f} MiB")
    assert late - early < 16 * 2**20, (early / 2**20, late / 2**20)


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
