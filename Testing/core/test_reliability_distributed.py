"""Distributed training (RELIABILITY.md): torchrun with 2 gloo processes on CPU computes what one process computes
(per-step losses, gradient norms, optimiser state, weights), a rank that dies stops the job with a message naming
it instead of a hang, and the same command resumes from the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from test_reliability_crash import ENV, optimizer_state, train_rows, wait_for_step

REPO = Path(__file__).resolve().parents[2]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    # Relative to the tensor's scale: AdamW's second moments are ~1e-12, its first moments ~1e-6.
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-30)


def test_two_gloo_processes_match_one_process_through_a_rank_death(data, trained, tmp_path):
    """2 processes of batch 1 == 1 process of batch 2 (same global batch, noise and loss), even across a crash.

    Summed instead of averaged gradients would give twice the gradient norm and other AdamW moments; a wrong noise
    slice other losses: so losses, norms and optimiser state are compared step by step, not only the weights."""
    yaml = (REPO / "CCELLACore" / "configs" / "tiny.yaml").read_text(encoding="utf-8")
    config_file = tmp_path / "tiny_ddp.yaml"
    config_file.write_text(yaml.replace("  batch_size: 2\n", "  batch_size: 1\n", 1), encoding="utf-8")
    run = tmp_path / "ddp"
    env = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # The agent checks its workers every 5 s: the surviving rank meets the broken collective first and says so.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "5", str(REPO / "Training" / "train_ldm.py"), "--config", str(config_file),
           "--manifest", str(data / "prep" / "manifest.csv"), "--autoencoder", str(data / "ae"), "--out", str(run),
           "--device", "cpu", "--no-progress"]

    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(job, run, 4)  # checkpoint 3 written, step 4 done: rank 1 dies between checkpoints
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(job.pid).children(recursive=True)
                 if p.environ().get("LOCAL_RANK") is not None}
        ranks["1"].send_signal(signal.SIGKILL)
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
            _close(two["state"][k][name], value)
    weights_one, weights_two = load_file(str(trained / "ldm.safetensors")), load_file(str(run / "model" /
                                                                                         "ldm.safetensors"))
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=1e-4, atol=1e-6)
