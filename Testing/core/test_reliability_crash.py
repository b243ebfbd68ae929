"""Crashes (RELIABILITY.md): train-ldm killed with SIGKILL between two checkpoints resumes to exactly the result of
the uninterrupted run; a full disk (the process's file-size limit, and a real file system filled up) during a write
leaves the earlier files intact."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.data.volume import Volume, read_volume, write_volume
from CCELLACore.fileio import Journal
from CCELLACore.settings import load_config
from CCELLACore.training.checkpoint import load_checkpoint, save_checkpoint
from CCELLACore.training.ldm import train_ldm
from test_reliability_inputs import _job, snapshot

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def train_rows(run: Path) -> dict[int, dict[str, float]]:
    """Per-step training values of a run's metrics.csv (loss terms, LR, gradient norm)."""
    with (run / "metrics.csv").open(encoding="utf-8", newline="") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v and not k.startswith("val_") and k != "step"}
                for r in csv.DictReader(f) if r.get("train_total")}


def optimizer_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last" / "training.pt", weights_only=True)["optimizers"]["adamw"]


def wait_until(process: subprocess.Popen, ready: Callable[[], T | None], what: str, timeout: float = 300,
               interval: float = 0.01) -> T:
    """Poll ``ready()`` while ``process`` runs until it returns a value (not None, not False); that value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        value = ready()
        if value is not None and value is not False:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen (exit code {process.poll()})")


def wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> int:
    """Poll the run's metrics until a training row at ``step`` or later is logged; the last logged step."""
    def logged() -> int | None:
        try:
            last = max(train_rows(run), default=0)
        except (OSError, ValueError, KeyError):  # the file is being created or a row half written
            return None
        return last if last >= step else None

    return wait_until(process, logged, f"the run reaching step {step}", timeout)


def sigkill(process: subprocess.Popen) -> None:
    """SIGKILL (no clean-up runs, as when a machine loses power or the OOM killer strikes) and reap."""
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.returncode


def start_and_sigkill(cmd: list[str], until: Callable[[subprocess.Popen], T]) -> T:
    """Start ``cmd`` (this repository on its path), wait with ``until(process)`` for the moment to kill it, SIGKILL
    it there and reap it; ``until``'s value. The process never outlives the call, even when the wait fails."""
    process = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        value = until(process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.returncode
    return value


def test_ldm_sigkill_between_checkpoints_resumes_to_the_uninterrupted_result(data, trained, tmp_path):
    """tiny: 6 steps, checkpoints at 3 and 6. Killed once step 4 is logged, the run restarts from step 3, redoes step
    4 and ends with the per-step losses, optimiser state and weights of the run that was never interrupted."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "CCELLACore.cli", "train-ldm", "--config", "tiny", "--manifest",
           str(data / "prep" / "manifest.csv"), "--autoencoder", str(data / "ae"), "--out", str(run), "--device",
           "cpu", "--no-progress"]
    logged = start_and_sigkill(cmd, lambda process: wait_for_step(process, run, 4))
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == 3 < logged < 6, (state["step"], logged)  # killed between two checkpoints
    assert not (run / "model").exists()

    resumed = train_ldm(load_config("tiny"), data / "prep" / "manifest.csv", data / "ae", run, device="cpu",
                        progress=False)
    assert train_rows(run) == train_rows(trained.parent)  # every step's loss terms, LR and gradient norm
    straight, again = optimizer_state(trained.parent), optimizer_state(run)
    assert straight["state"].keys() == again["state"].keys()
    for k, values in straight["state"].items():
        for name, value in values.items():
            assert torch.equal(value, again["state"][k][name]), (k, name)
    full, other = load_file(str(trained / "ldm.safetensors")), load_file(str(resumed / "ldm.safetensors"))
    assert full.keys() == other.keys() and all(torch.equal(full[k], other[k]) for k in full)
    # Nothing half-written is left to be taken for a result: no temporary checkpoint folder or file remains.
    assert not [p for p in run.rglob(".tmp-*")], list(run.rglob(".tmp-*"))


def test_journal_drops_a_truncated_line_and_restarts_under_another_key(tmp_path):
    """What a job killed mid-append leaves (half a line) is never read as an item; another key starts afresh."""
    path = tmp_path / "out" / "done.jsonl"
    journal = Journal(path, key={"seed": 1, "size": (4, 4)})
    assert journal.items() == [] and journal.stale
    journal.append({"case": 0})
    journal.append({"case": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"case": 2, "tr')  # SIGKILL inside the write
    again = Journal(path, key={"seed": 1, "size": [4, 4]})  # tuples read back as lists: the same key
    assert again.items() == [{"case": 0}, {"case": 1}] and not again.stale
    again.append({"case": 2})
    assert Journal(path, key={"seed": 1, "size": [4, 4]}).items() == [{"case": 0}, {"case": 1}, {"case": 2}]
    other = Journal(path, key={"seed": 2, "size": [4, 4]})
    assert other.items() == [] and other.stale
    assert path.read_text(encoding="utf-8") == '{"journal_key": {"seed": 2, "size": [4, 4]}}\n'
    path.write_bytes(b"\xff\xfe garbage\n")
    assert Journal(path, key={"seed": 2}).items() == []


FULL_DISK = r"""
import json, resource, signal, sys
from pathlib import Path
import numpy as np, torch
from CCELLACore.data.volume import Volume, write_volume
from CCELLACore.errors import CCELLAError
from CCELLACore.fileio import atomic_write_text
from CCELLACore.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from CCELLACore.training.ema import EMA

folder = Path(sys.argv[1])
model = torch.nn.Linear(8, 4)  # as test_reliability_inputs._job builds it
state = TrainingState(models={"net": model}, optimizers={"adamw": torch.optim.AdamW(model.parameters())},
                      emas={"net": EMA(model, decay=0.9)}, config_hash="same")
load_checkpoint(folder / "ckpt", state)
with torch.no_grad():
    state.models["net"].weight.add_(1.0)
state.step += 1
if sys.argv[2] == "limit":  # a write past the limit fails with EFBIG, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
errors = {}
for name, write in (("checkpoint", lambda: save_checkpoint(folder / "ckpt", state)),
                    ("volume", lambda: write_volume(Volume(np.ones((32, 32, 16), np.float32)), folder / "t2.nii")),
                    ("text", lambda: atomic_write_text(folder / "notes.txt", "y" * 10_000))):
    try:
        write()
        errors[name] = None
    except (CCELLAError, OSError) as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(errors))
"""


@contextlib.contextmanager
def full_file_system(parent: Path):
    """A real file system with no space left: a 1 MiB tmpfs mounted under ``parent``, filled by the caller.
    Skips where this process may not mount (no root / CAP_SYS_ADMIN), saying so."""
    where = parent / "tmpfs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                             text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else 'no mount command'}); the "
                    "file-size-limit variant covers the same writes")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("disk", ["limit", "tmpfs"])
def test_full_disk_during_writes_keeps_the_previous_files(tmp_path, disk):
    """``limit``: the process's file-size limit (EFBIG, "File too large"), runs anywhere; ``tmpfs``: a real file
    system filled to its last byte (ENOSPC, "No space left on device")."""
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(full_file_system(tmp_path)) if disk == "tmpfs" else tmp_path
        state = _job(1)
        state.step = 1
        save_checkpoint(folder / "ckpt", state)
        write_volume(Volume(np.zeros((8, 8, 4), np.float32)), folder / "t2.nii")
        (folder / "notes.txt").write_text("earlier", encoding="utf-8")
        if disk == "tmpfs":
            with open(folder / "filler", "wb", buffering=0) as filler, pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 4096)
        before = snapshot(folder)
        done = subprocess.run([sys.executable, "-c", FULL_DISK, str(folder), disk], env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        errors = json.loads(done.stdout.strip().splitlines()[-1])
        assert errors["checkpoint"].startswith(f"CCELLAError: {folder / 'ckpt'}: cannot write the checkpoint")
        assert errors["checkpoint"].endswith("disk full?); the last complete checkpoint is unchanged")
        # ITK's NIfTI writer only prints a short write; the check before the rename turns it into an error.
        assert errors["volume"].startswith(f"VolumeError: {folder / 't2.nii'}: cannot write image")
        assert ("File too large" if disk == "limit" else "No space left on device") in errors["text"]
        assert snapshot(folder) == before  # no new, partial or temporary file anywhere
        again = _job(5)
        load_checkpoint(folder / "ckpt", again)
        assert again.step == 1 and torch.equal(again.models["net"].weight, state.models["net"].weight)
        assert np.array_equal(read_volume(folder / "t2.nii").array, np.zeros((8, 8, 4), np.float32))
