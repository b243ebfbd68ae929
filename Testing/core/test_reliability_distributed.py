"""Distributed training (RELIABILITY.md): torchrun with 2 gloo processes on CPU computes what one process computes
(per-step losses, gradient norms, optimiser state, weights), a rank that dies stops the job with a message naming
it instead of a hang, a rank that hangs while alive stops it once the collective timeout has passed, and the same
command resumes from the last checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.training.distributed import TIMEOUT_VARIABLE
from test_reliability_crash import ENV, optimizer_state, train_rows, wait_for_step

REPO = Path(__file__).resolve().parents[2]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-2) -> None:
    # Relative error of the whole tensor (AdamW's second moments are ~1e-12, its first moments ~1e-6): element-wise
    # tolerances trip on near-zero entries, which with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) differ by up to a few
    # 1e-3 of the tensor's scale (whole-tensor error up to 2e-3) between gloo's and one process's sum order. Summed
    # instead of averaged gradients would double the first moments (error 1.0) and quadruple the second (3.0).
    error = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))
    assert error <= tol, (error, tuple(b.shape))


def torchrun_ldm(data: Path, tmp_path: Path, run: Path) -> tuple[list[str], dict[str, str]]:
    """train-ldm of the tiny config under torchrun, 2 gloo processes of batch 1 (the global batch of one process of
    batch 2): the command and its environment."""
    yaml = (REPO / "CCELLACore" / "configs" / "tiny.yaml").read_text(encoding="utf-8")
    config_file = tmp_path / "tiny_ddp.yaml"
    config_file.write_text(yaml.replace("  batch_size: 2\n", "  batch_size: 1\n", 1), encoding="utf-8")
    env = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # The agent checks its workers every 5 s: the surviving rank meets the broken collective first and says so.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "5", str(REPO / "Training" / "train_ldm.py"), "--config", str(config_file),
           "--manifest", str(data / "prep" / "manifest.csv"), "--autoencoder", str(data / "ae"), "--out", str(run),
           "--device", "cpu", "--no-progress"]
    return cmd, env


def ranks(job: subprocess.Popen) -> dict[str, psutil.Process]:
    """torchrun's worker processes by their RANK."""
    return {p.environ().get("RANK"): p for p in psutil.Process(job.pid).children(recursive=True)
            if p.environ().get("LOCAL_RANK") is not None}


def assert_matches_one_process(run: Path, trained: Path) -> None:
    """Summed instead of averaged gradients would give twice the gradient norm and other AdamW moments; a wrong noise
    slice other losses: so losses, norms and optimiser state are compared step by step, not only the weights."""
    single, ddp = train_rows(trained.parent), train_rows(run)
    assert sorted(ddp) == sorted(single) == [1, 2, 3, 4, 5, 6]
    for step, values in single.items():
        assert ddp[step].keys() == values.keys()
        for key, value in values.items():
            assert abs(ddp[step][key] - value) <= 1e-5 * abs(value) + 1e-7, (step, key, ddp[step][key], value)
    one, two = optimizer_state(trained.parent), optimizer_state(run)
    assert one["state"].keys() == two["state"].keys()
    for k, values in one["state"].items():
        for name, value in values.items():
            # AVX2 sum order: 1.2% on a 16-entry tensor on an Intel Xeon (AVX2 forced); summed instead of averaged
            # gradients give 100% (exp_avg) and 300% (exp_avg_sq), so 5% still tells them apart.
            _close(two["state"][k][name], value, tol=5e-2)
    weights_one, weights_two = load_file(str(trained / "ldm.safetensors")), load_file(str(run / "model" /
                                                                                         "ldm.safetensors"))
    for key, value in weights_one.items():
        # whole-tensor error: Adam divides by sqrt(v), so entries with near-zero gradients carry the sum-order noise
        # into the weights (AVX2: up to 1.2e-2 on a 16-entry tensor after 6 steps on an Intel Xeon, 1.3e-3 on an AMD
        # EPYC; AVX-512: below 1e-5). Summed gradients are caught above by the per-step gradient norms (2x).
        _close(weights_two[key], value, tol=5e-2)


def test_two_gloo_processes_match_one_process_through_a_rank_death(data, trained, tmp_path):
    """2 processes of batch 1 == 1 process of batch 2 (same global batch, noise and loss), even across a crash."""
    run = tmp_path / "ddp"
    cmd, env = torchrun_ldm(data, tmp_path, run)
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(job, run, 4)  # checkpoint 3 written, step 4 done: rank 1 dies between checkpoints
        ranks(job)["1"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.communicate(timeout=120)  # a hang fails here
    finally:
        job.kill()
    stopped_after = time.monotonic() - killed
    assert job.returncode not in (0, None) and stopped_after < 60, stopped_after
    assert "rank 0: another process of this distributed job stopped or stopped answering" in output, output[-3000:]
    assert "Run the same command again: it resumes from the last checkpoint" in output
    assert "rank      : 1 (local_rank: 1)" in output and "Signal 9 (SIGKILL)" in output  # torchrun's root cause
    assert not (run / "model").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 3" in again.stderr
    assert_matches_one_process(run, trained)


TIMEOUT_S = 15  # above rank 0's longest solo step here (the first start's report encoding) on a loaded machine


def test_a_rank_that_hangs_alive_stops_the_job_after_the_timeout_and_it_resumes(data, trained, tmp_path):
    """Rank 1 stopped with SIGSTOP between two checkpoints: rank 0's next collective gives up after
    CCELLA_DIST_TIMEOUT_S with a message that names the timeout, not after gloo's 30 minutes."""
    run = tmp_path / "ddp"
    cmd, env = torchrun_ldm(data, tmp_path, run)
    env = {**env, TIMEOUT_VARIABLE: str(TIMEOUT_S)}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)  # a pipe read never blocks us
    reader.start()
    workers: dict[str, psutil.Process] = {}
    try:
        try:
            wait_for_step(job, run, 4)
        except AssertionError as error:  # say why the job ended before the hang was made
            reader.join(timeout=30)
            raise AssertionError(f"{error}:\n{''.join(lines)[-3000:]}") from None
        workers = ranks(job)
        workers["1"].send_signal(signal.SIGSTOP)
        hung = time.monotonic()
        while not any("did not answer within" in line for line in lines) and job.poll() is None:
            assert time.monotonic() - hung < TIMEOUT_S + 60, "no timeout message: the job waits for the hung rank"
            time.sleep(0.05)
        told_after = time.monotonic() - hung
        # torchrun now sends SIGTERM to the stopped rank and SIGKILL 30 s later (its fixed grace): SIGCONT lets the
        # SIGTERM land at once, so the test does not sit out the grace.
        workers["1"].send_signal(signal.SIGCONT)
        job.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        for worker in workers.values():  # nothing stopped or orphaned is left behind, whatever failed
            try:
                worker.send_signal(signal.SIGCONT)
                worker.kill()
            except psutil.NoSuchProcess:
                pass
        job.kill()
    output = "".join(lines)
    print(f"rank 1 stopped; rank 0 gave up after {told_after:.1f} s (timeout {TIMEOUT_S} s)")
    assert job.returncode not in (0, None), output[-3000:]
    assert TIMEOUT_S - 1 <= told_after < TIMEOUT_S + 30, (told_after, output[-3000:])
    message = next(line for line in lines if "did not answer within" in line)
    print(message.strip())
    assert message.startswith(f"ccella train-ldm: error: rank 0: another process of this distributed job did not "
                              f"answer within {TIMEOUT_S} s ({TIMEOUT_VARIABLE}; it hangs or died"), message
    assert "Run the same command again: it resumes from the last checkpoint" in message
    assert not (run / "model").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 3" in again.stderr
    assert_matches_one_process(run, trained)


def test_a_timeout_that_is_not_a_positive_number_is_named(monkeypatch):
    from CCELLACore.errors import CCELLAError
    from CCELLACore.training.distributed import DEFAULT_TIMEOUT_S, collective_timeout

    monkeypatch.delenv(TIMEOUT_VARIABLE, raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv(TIMEOUT_VARIABLE, "90")
    assert collective_timeout() == 90
    for bad in ("ten", "0", "-5", "nan", "inf"):
        monkeypatch.setenv(TIMEOUT_VARIABLE, bad)
        with pytest.raises(CCELLAError) as info:
            collective_timeout()
        assert str(info.value) == f"{TIMEOUT_VARIABLE}={bad!r}: expected a positive number of seconds (default 600)"


LATE_RANK = """
import os, sys, time
from pathlib import Path
import torch
from CCELLACore.data.manifest import read_manifest
from CCELLACore.models.autoencoder import SequenceAutoencoder, load_autoencoder_dir
from CCELLACore.training.distributed import init_distributed
from CCELLACore.training.latents import encode_latents
data, cache = Path(sys.argv[1]), Path(sys.argv[2])
ctx = init_distributed("cpu")
studies = read_manifest(data / "prep" / "manifest.csv").select(("train", "val", "test"))
if ctx.rank == 1:  # starts late: rank 0 has already written to the cache when this rank looks at it
    while not list(cache.glob("*.safetensors")):
        time.sleep(0.01)
model, _ = load_autoencoder_dir(data / "ae", ctx.device)
assert encode_latents(studies, SequenceAutoencoder(model, ctx.device), cache, ctx, progress=False) == []
print("encoded", len(studies))
"""


def test_a_rank_that_starts_late_leaves_no_case_unencoded(data, tmp_path):
    """The latent cache is shared: a rank that lists it after another rank began writing must still take its own
    share of every case (it once sharded the shorter list it saw, and cases were left to nobody)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "latents"
    jobs = [subprocess.Popen([sys.executable, "-c", LATE_RANK, str(data), str(cache)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**ENV, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                  "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank in (0, 1)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    from CCELLACore.data.manifest import read_manifest

    cases = {s.case_id for s in read_manifest(data / "prep" / "manifest.csv").select(("train", "val", "test"))}
    assert len(cases) >= 6
    assert {p.stem for p in cache.glob("*.safetensors")} == cases
