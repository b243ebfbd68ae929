"""The child-process protocol with real subprocesses: progress parsed, cancel kills the whole tree, errors readable,
and a real generation with the session's tiny model reports every stage and step."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from CCELLACore.jobs.protocol import STAGES, ProgressWriter, parse_line
from CCELLAPlusPlusLib.process import ChildJob, JobFailed, child_environment, kill_process_tree

psutil = pytest.importorskip("psutil")
REPORT = "Private report text: PI-RADS 5 lesion, left peripheral zone, 17 mm, patient Jane Roe."


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def test_parse_line_tells_protocol_lines_from_plain_output():
    event = parse_line('{"ccella": 1, "event": "progress", "stage": "sample", "step": 2, "total": 5}\n')
    assert event.protocol and event.kind == "progress" and event.get("step") == 2 and event.get("total") == 5
    for line in ("UserWarning: something", '{"event": "result"}', '{"ccella": 1, "event": "nonsense"}', "{not json"):
        plain = parse_line(line)
        assert plain.kind == "log" and not plain.protocol and plain.message == line


def test_progress_writer_eta_and_error_kinds():
    lines: list[str] = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    now = [100.0]
    writer = ProgressWriter(Stream(), clock=lambda: now[0])
    writer.stage("sample")
    now[0] += 4.0
    writer.progress(2, 10)  # 2 s per step, 8 steps left
    events = [parse_line(line) for line in lines]
    assert events[0].get("label") == STAGES["sample"]
    assert events[1].get("eta") == pytest.approx(16.0) and events[1].get("elapsed") == pytest.approx(4.0)
    with pytest.raises(ValueError, match="error kind"):
        writer.error("x", kind="unknown")


def test_real_child_progress_is_parsed_and_logged(tmp_path):
    command = _script(tmp_path, """
        import sys, warnings
        from CCELLACore.jobs.protocol import ProgressWriter
        w = ProgressWriter()
        w.stage("sample")
        for i in range(1, 4):
            w.progress(i, 3)
        print("a plain line from a library", file=sys.stderr, flush=True)
        w.result(out_dir="somewhere", files={"AxT2": "axt2.nii.gz"})
    """)
    job = ChildJob(command, tmp_path / "logs" / "job.log", env=child_environment()).start()
    result = job.wait(timeout=60)
    assert result.get("files") == {"AxT2": "axt2.nii.gz"}
    log = (tmp_path / "logs" / "job.log").read_text()
    assert "a plain line from a library" in log and '"step": 3' in log


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("with_psutil", [True, False])
def test_cancel_kills_the_child_and_its_children(tmp_path, monkeypatch, with_psutil):
    command = _script(tmp_path, """
        import subprocess, sys, time
        from CCELLACore.jobs.protocol import ProgressWriter
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        w = ProgressWriter()
        w.log(f"grandchild {grandchild.pid}")
        w.stage("sample")
        time.sleep(120)
    """)
    job = ChildJob(command, tmp_path / "job.log", env=child_environment()).start()
    grandchild = None
    deadline = time.monotonic() + 60
    while grandchild is None and time.monotonic() < deadline:
        for event in job.poll():
            if event.kind == "log" and event.message.startswith("grandchild"):
                grandchild = int(event.message.split()[1])
        time.sleep(0.05)
    assert grandchild is not None and _alive(grandchild)
    child = job.process.pid
    with monkeypatch.context() as patch:
        if not with_psutil:
            patch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError: the process-group path
        job.cancel()
    assert job.finished
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)
    with pytest.raises(JobFailed) as failure:
        job.outcome()
    assert failure.value.kind == "cancelled"
    assert "[cancelled by the user]" in (tmp_path / "job.log").read_text()


def test_kill_process_tree_of_a_finished_process_is_harmless(tmp_path):
    job = ChildJob([sys.executable, "-c", "pass"], tmp_path / "job.log").start()
    job.wait(timeout=30)
    kill_process_tree(job.process.pid)


def test_child_error_event_becomes_a_readable_message(tmp_path):
    command = [sys.executable, "-m", "CCELLACore.jobs", "generate", "--model", str(tmp_path / "no_model"),
               "--unconditional", "--out", str(tmp_path / "out")]
    job = ChildJob(command, tmp_path / "job.log", env=child_environment()).start()
    with pytest.raises(JobFailed) as failure:
        job.wait(timeout=120)
    assert failure.value.kind == "input" and "no_model: model folder not found" in str(failure.value)
    text = ChildJob.failure_message(failure.value)
    assert str(tmp_path / "job.log") in text


def test_a_crash_without_error_event_shows_the_last_lines(tmp_path):
    command = _script(tmp_path, "raise RuntimeError('boom in the child')\n")
    job = ChildJob(command, tmp_path / "job.log", env=child_environment()).start()
    with pytest.raises(JobFailed, match=r"exit status 1:[\s\S]*RuntimeError: boom in the child"):
        job.wait(timeout=60)


def test_generate_job_reports_every_stage_and_step(tiny_generation):
    events, out_dir, log_path, command = tiny_generation
    stages = [e.get("stage") for e in events if e.kind == "stage"]
    assert stages == ["check_device", "load_model", "encode_report", "sample", "decode", "write"]
    steps = [(e.get("step"), e.get("total")) for e in events if e.kind == "progress"]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert all(e.get("eta") is not None and e.get("eta") >= 0 for e in events if e.kind == "progress")
    result = [e for e in events if e.kind == "result"][0]
    assert set(result.get("files")) == {"AxT2", "HighB", "ADC"}
    assert 0.0 <= result.get("class_probability") <= 1.0 and result.get("settings")["steps"] == 3
    assert all((out_dir / name).is_file() for name in result.get("files").values())
    sidecar = json.loads((out_dir / "generation.json").read_text())
    assert sidecar["report"] == REPORT and sidecar["synthetic"] is True
    # Privacy: the report reaches the child through a file only; never argv, never the log.
    assert REPORT not in " ".join(command) and "Jane Roe" not in log_path.read_text()


def test_generate_job_refuses_cuda_where_there_is_none(tmp_path, trained):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command = [sys.executable, "-m", "CCELLACore.jobs", "generate", "--model", str(trained), "--unconditional",
               "--device", "cuda", "--out", str(tmp_path / "out")]
    job = ChildJob(command, tmp_path / "job.log", env=child_environment()).start()
    with pytest.raises(JobFailed) as failure:
        job.wait(timeout=180)
    assert failure.value.kind == "no_cuda" and "CUDA is not available" in str(failure.value)
    assert "CPU" in failure.value.hint
    assert not (tmp_path / "out").exists()
    assert os.path.getsize(tmp_path / "job.log") > 0
