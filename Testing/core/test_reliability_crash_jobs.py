"""Crashes of the batch jobs (RELIABILITY.md): `ccella synthesize` and `ccella evaluate` killed with SIGKILL mid-run,
then run again with the same command, end with exactly the outputs of a run that was never interrupted; no partial
file is taken for a finished result and no temporary file is left."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from CCELLACore.cli import main
from test_reliability_crash import ENV, sigkill, wait_until
from test_reliability_load import bulk_manifest

N_SYNTHETIC = 16
CHILD_ENV = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@contextmanager
def one_thread() -> Iterator[None]:
    """Runs in this process at the killed child's thread count: bitwise equality holds only at equal thread counts
    (another count sums reductions in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "CCELLACore.cli", *args], env=CHILD_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_synthesis_sigkilled_mid_exam_ends_with_the_bytes_of_an_uninterrupted_run(data, trained, tmp_path):
    """16 exams; killed once 8 records exist and the next exam has a volume on disk and a file being written (a
    partial exam), then the same command again: the partial exam is made again, the finished ones are kept."""
    manifest = bulk_manifest(data, N_SYNTHETIC, tmp_path / "bulk.csv")

    def args(out: Path) -> list[str]:
        return ["synthesize", "--manifest", str(manifest), "--model", str(trained), "--out", str(out), "--steps", "1",
                "--device", "cpu", "--no-progress"]

    killed = tmp_path / "killed"
    cases = killed / "cases"

    def mid_exam() -> bool:
        done = [d for d in cases.glob("*") if (d / "generation.json").is_file()]
        return len(done) >= N_SYNTHETIC // 2 and any(
            not (d / "generation.json").exists() and list(d.glob("*.nii.gz")) and list(d.glob(".tmp-*"))
            for d in cases.glob("*"))

    child = _start(args(killed))
    try:
        wait_until(child, mid_exam, "an exam half written after 8 finished ones", interval=0.001)
    finally:
        sigkill(child)
    finished = {d.name for d in cases.iterdir() if (d / "generation.json").is_file()}
    partial = {d.name for d in cases.iterdir() if not (d / "generation.json").exists()}
    orphans = list(killed.rglob(".tmp-*"))
    print(f"killed with {len(finished)} exams finished, {len(partial)} partial, {len(orphans)} temporary file(s)")
    assert N_SYNTHETIC // 2 <= len(finished) < N_SYNTHETIC and partial and not (killed / "manifest.csv").exists()
    kept = {p: p.stat().st_mtime_ns for d in finished for p in (cases / d).iterdir()}

    straight = tmp_path / "straight"
    with one_thread():
        assert main(args(straight)) == 0
        assert main(args(killed)) == 0  # the same command again
    summary = json.loads((killed / "synthesize_summary.json").read_text(encoding="utf-8"))
    assert (summary["n_reused"], summary["n_done"]) == (len(finished), N_SYNTHETIC - len(finished))
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished exams are not made again
    assert not list(killed.rglob(".tmp-*")), list(killed.rglob(".tmp-*"))  # the killed run's temporaries removed
    one, two = files(straight), files(killed)
    assert one.keys() == two.keys()  # volumes, previews, sidecars, manifest, summary; nothing more
    differ = [name for name in one if one[name] != two[name]]
    # The summary says which exams this run made and which it found done; it has no timing field.
    assert differ == ["synthesize_summary.json"], differ
    first = json.loads(one["synthesize_summary.json"])
    assert first["n_done"] == N_SYNTHETIC and first["n_reused"] == 0
    for key in ("n_done", "n_reused"):
        first.pop(key), summary.pop(key)
    assert first == summary


def test_evaluation_sigkilled_mid_run_ends_with_the_metrics_of_an_uninterrupted_run(eval_sets, standin, tmp_path):
    """Killed once 7 of its 20 feature-cache entries exist, then the same command again: the same metrics.json apart
    from its run time; a cut-short cache entry is computed again, never read."""
    def args(out: Path) -> list[str]:
        return ["evaluate", "--real", str(eval_sets["real"]), "--synthetic", str(eval_sets["same"]), "--out",
                str(out), "--standin", str(standin), "--bootstrap", "20", "--kid-subsets", "5", "--diversity-exams",
                "4", "--device", "cpu", "--no-progress"]

    killed = tmp_path / "killed"

    def entries() -> list[Path]:  # finished entries only: pathlib's glob also matches .tmp-* files being written
        return sorted(p for p in (killed / "feature_cache").glob("*/*.npz") if not p.name.startswith("."))

    child = _start(args(killed))
    try:
        wait_until(child, lambda: len(entries()) >= 7, "7 feature-cache entries")
    finally:
        sigkill(child)
    written = entries()
    print(f"killed with {len(written)} of 20 feature-cache entries written")
    assert 7 <= len(written) < 20 and not (killed / "metrics.json").exists()
    # What a writer without the atomic rename would leave (or a copy cut short): half an entry under its final name.
    victim = written[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    kept = {p: p.stat().st_mtime_ns for p in written[1:]}

    straight = tmp_path / "straight"
    with one_thread():
        assert main(args(straight)) == 0
        assert main(args(killed)) == 0  # the same command again
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished entries are reused
    with np.load(victim) as again, np.load(straight / victim.relative_to(killed)) as reference:
        assert again.files == reference.files and all(np.array_equal(again[k], reference[k]) for k in again.files)
    assert not list(killed.rglob(".tmp-*")), list(killed.rglob(".tmp-*"))
    one, two = (json.loads((out / "metrics.json").read_text(encoding="utf-8")) for out in (straight, killed))
    assert one.pop("seconds") >= 0 and two.pop("seconds") >= 0  # the only timing field
    assert one == two
    assert one["fidelity"]["standin"]["per_key"]["bpMRI"]["fid"]["n_real"] == 10  # the features were all used


ORPHAN = r"""
import os, signal, sys
from CCELLACore.fileio import atomic_path
with atomic_path(sys.argv[1]) as tmp:  # killed inside the write: the temporary stays
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # alive until the test closes stdin
"""


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    """A job that shares a folder (a feature cache) with a live one removes what a killed writer left, never the file
    the live writer is writing."""
    from CCELLACore.fileio import remove_orphaned_temporaries

    dead = subprocess.run([sys.executable, "-c", ORPHAN, str(tmp_path / "a.npz"), "die"], env=CHILD_ENV,
                          capture_output=True, text=True, timeout=120)
    assert dead.returncode == -9, dead.stderr
    live = subprocess.Popen([sys.executable, "-c", ORPHAN, str(tmp_path / "b.npz"), "live"], env=CHILD_ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        writing = Path(live.stdout.readline().strip())
        left = Path(dead.stdout.strip())
        assert left.is_file() and writing.is_file() and left.name.startswith(".tmp-")
        assert remove_orphaned_temporaries(tmp_path) == [left]
        assert writing.is_file()
        live.stdin.close()  # the live writer finishes: its file is renamed into place
        assert live.wait(timeout=60) == 0
    finally:
        live.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz"] and (tmp_path / "b.npz").read_bytes() == b"half"
