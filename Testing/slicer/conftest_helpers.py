"""Helpers shared by the Slicer tests' fixtures (a plain module: conftest files cannot be imported by name)."""

from __future__ import annotations

from pathlib import Path

from CCELLAPlusPlusLib.jobs import GenerationRequest, generation_command
from CCELLAPlusPlusLib.process import ChildJob, child_environment

REPORT = "Private report text: PI-RADS 5 lesion, left peripheral zone, 17 mm, patient Jane Roe."


def run_tiny_generation(model_dir: Path, folder: Path):
    """Run ``python -m CCELLACore.jobs generate`` on the CPU, 3 steps, and collect every event."""
    report_file = folder / "report.txt"
    report_file.write_text(REPORT, encoding="utf-8")
    out_dir = folder / "exam"
    request = GenerationRequest(report=REPORT, model_dir=str(model_dir), steps=3, seed=5, device="cpu")
    command = generation_command(request, report_file, out_dir)
    events = []
    job = ChildJob(command, folder / "job.log", env=child_environment("cpu"), on_event=events.append).start()
    job.wait(timeout=300)
    return events, out_dir, folder / "job.log", command
