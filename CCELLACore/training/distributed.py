"""Distributed training without ceremony (nanoGPT style): detect ``torchrun`` from the environment.

One process: ``ccella train-ldm ...``. One node, 4 GPUs: ``torchrun --standalone --nproc_per_node=4
Training/train_ldm.py ...``. Two nodes: ``torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500
--nproc_per_node=8 Training/train_ldm.py ...`` (and ``--node_rank=1`` on the other). NCCL on GPUs, gloo on CPUs.

A process that hangs while alive (a stuck file system, a deadlock, ``kill -STOP``) stops the job once a collective
has waited ``CCELLA_DIST_TIMEOUT_S`` seconds for it (default :data:`DEFAULT_TIMEOUT_S`), instead of torch's 30
minutes for gloo. Between two collectives rank 0 alone writes checkpoints and the model folder, validates, encodes
the reports on a first start and (synthesize) merges and audits while the others wait: the default leaves it that
long; set the variable higher where one of these takes longer (a first start on a large manifest on CPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_distributed", "shard", "run_record", "peer_failure", "collective_timeout",
           "DEFAULT_TIMEOUT_S", "TIMEOUT_VARIABLE"]

TIMEOUT_VARIABLE = "CCELLA_DIST_TIMEOUT_S"
#: 10 minutes, torch's own NCCL default: a third of gloo's 30, and well above rank 0's solo steps of a run (a
#: checkpoint of a few GB on slow storage, validation, the final model folder take seconds to a minute or two).
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process logs, writes checkpoints and shows progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (a copy; the input is unchanged)."""
        value = value.detach().clone()
        if self.is_distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value


def collective_timeout() -> float:
    """Seconds a collective waits for the other processes: ``CCELLA_DIST_TIMEOUT_S``, else the default."""
    from ..errors import CCELLAError

    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise CCELLAError(f"{TIMEOUT_VARIABLE}={raw!r}: expected a positive number of seconds (default "
                          f"{DEFAULT_TIMEOUT_S:g})")
    return seconds


def init_distributed(device: str = "auto") -> DistributedContext:
    """Initialise the process group when launched by torchrun (``RANK``/``WORLD_SIZE`` set), else a single process.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.

    Raises:
        CCELLAError: ``CCELLA_DIST_TIMEOUT_S`` is not a positive number.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=timedelta(seconds=collective_timeout()))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shard(items: list, ctx: DistributedContext) -> list:
    """This rank's share of ``items`` (every world_size-th item, starting at its rank)."""
    return items[ctx.rank :: ctx.world_size]


def run_record(ctx: DistributedContext, batch_size: int, institution: str | None = None) -> dict:
    """What a model folder records about the run that trained it (``model.json`` ``extra``): the number of
    processes, the batch per process and the global batch the learning-rate schedule was counted in, and the
    institution trained on (``None`` = all of the manifest's)."""
    return {"world_size": ctx.world_size, "batch_size_per_process": batch_size,
            "global_batch": batch_size * ctx.world_size, "institution": institution}


def print_run_end(model_dir: Path, run_dir: Path) -> None:
    """The last line of a training job, printed by the main process only: where the model is, or that the run
    stopped early and how to continue it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if (model_dir / "model.json").is_file():
        print(f"model: {model_dir}; metrics: {Path(run_dir) / 'metrics.csv'}")
    else:
        print(f"stopped early; checkpoints in {Path(run_dir) / 'checkpoints'}: run the same command to continue")


# What gloo and NCCL say when the other end of a collective has gone (died, killed, or its machine lost), and when
# it has not answered within the timeout (alive but hanging).
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "ProcessGroupNCCL")
_PEER_SILENT = ("timed out", "Timed out", "timing out")


def peer_failure(exc: BaseException) -> str | None:
    """One line for the user when ``exc`` is a collective that failed because another process of this distributed
    job died or stopped answering, else None. torchrun then stops every process (no hang); the checkpoints stay."""
    if not isinstance(exc, RuntimeError) or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    text = str(exc)
    rank = os.environ.get("RANK", "0")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if any(marker in text for marker in _PEER_SILENT):
        from ..errors import CCELLAError

        try:
            seconds = f"{collective_timeout():g} s"
        except CCELLAError:  # not this job's group (it checked the value): never mask the failure
            seconds = "the timeout"
        return (f"rank {rank}: another process of this distributed job did not answer within {seconds} "
                f"({TIMEOUT_VARIABLE}; it hangs or died: {first[:160]}); this process stops too. Run the same "
                f"command again: it resumes from the last checkpoint (if that process was only busy, set "
                f"{TIMEOUT_VARIABLE} higher)")
    if not any(marker in text for marker in _PEER_GONE):
        return None
    return (f"rank {rank}: another process of this distributed job stopped or stopped answering "
            f"({first[:200]}); this process stops too. Run the same command again: it resumes from the last "
            "checkpoint")
