"""``python -m CCELLACore.jobs generate``: one exam from a report file, with structured progress on stdout.

What the Slicer module runs in a child process (``PythonSlicer -m CCELLACore.jobs generate ...``); it writes the
same files as ``ccella generate`` (``axt2/highb/adc.nii.gz``, ``preview.png``, ``generation.json``). Example::

    python -m CCELLACore.jobs generate --report-file report.txt --out exam1 --steps 30 --seed 3 --device auto

The report comes only from ``--report-file`` (never argv, never stdout: other users can read a process's argv);
progress, results and errors are protocol lines (:mod:`.protocol`); tracebacks go to stderr, which the parent keeps
in the job's log file.

Stages: ``check_device`` (free GPU memory checked before anything is put on the GPU; ``--device auto`` falls back
to the CPU when it is short, ``--device cuda`` stops with a ``gpu_memory`` error the GUI turns into "run on the
CPU?"), ``load_model``, ``encode_report``, ``sample`` (one progress line per denoising step), ``decode``, ``write``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from ..cli import add_precision_argument, precision_dtype
from ..errors import CCELLAError
from .model_info import estimate_gpu_bytes, read_model_info
from .protocol import ProgressWriter

__all__ = ["add_arguments", "run", "main", "JobError", "choose_device"]

_FORMATS = ("nifti", "nrrd", "mha")


class JobError(CCELLAError):
    """An error the parent can act on; ``kind`` is one of :data:`~.protocol.ERROR_KINDS`."""

    def __init__(self, kind: str, message: str, hint: str = ""):
        super().__init__(message)
        self.kind, self.hint = kind, hint


def _default_model() -> Path:
    from ..pipelines.generate_cli import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--report-file", type=Path, help="UTF-8 text file holding the report")
    src.add_argument("--unconditional", action="store_true", help="generate without a report (null condition)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded demo model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's sampling config")
    parser.add_argument("--sampler", default=None, help="one the model supports; default: the model's own")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's sampling config")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                        help="output spacing in mm (default: the model's)")
    parser.add_argument("--format", choices=_FORMATS, default="nifti")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    add_precision_argument(parser)
    parser.add_argument("--min-free-gpu-gb", type=float, default=None,
                        help="free GPU memory needed to run on the GPU (default: an estimate from the model size)")


def choose_device(requested: str, model_dir: Path, writer: ProgressWriter, min_free_gb: float | None = None) -> str:
    """``"cuda"`` or ``"cpu"``; checks that CUDA exists and has enough free memory before the model loads.

    Raises:
        JobError: ``no_cuda`` (asked for CUDA, torch has none) or ``gpu_memory`` (asked for CUDA, too little free).
    """
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "cuda":
            build = torch.version.cuda or "none (a CPU-only build)"
            raise JobError("no_cuda", f"CUDA is not available to this Python (torch {torch.__version__}, CUDA "
                           f"{build})", hint="Run on the CPU, or reinstall PyTorch with the PyTorch extension "
                           "(it picks the CUDA build that matches the driver).")
        writer.log("No CUDA GPU available: running on the CPU")
        return "cpu"
    free, total = torch.cuda.mem_get_info()
    need = estimate_gpu_bytes(model_dir) if min_free_gb is None else int(min_free_gb * 2**30)
    if free < need:
        message = (f"the GPU has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB; this model needs about "
                   f"{need / 2**30:.1f} GiB")
        if requested == "cuda":
            raise JobError("gpu_memory", message, hint="Run on the CPU (slower), or close what else uses the GPU.")
        writer.log(f"{message}: running on the CPU")
        return "cpu"
    writer.log(f"GPU: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    return "cuda"


def _watch_denoiser(pipe, total: int, writer: ProgressWriter) -> list:
    """Report each denoising step from hooks on the U-Net: the pipeline calls it exactly once per step (guidance
    batches the conditional and unconditional halves into one call). Returns the hook handles."""
    calls = 0

    def before(_module, _inputs):
        if calls == 0:
            writer.stage("sample")

    def after(_module, _inputs, _output):
        nonlocal calls
        calls += 1
        writer.progress(min(calls, total), total)
        if calls == total:  # the pipeline decodes right after the last step
            writer.stage("decode")

    return [pipe.ldm.register_forward_pre_hook(before), pipe.ldm.register_forward_hook(after)]


def run(args: argparse.Namespace, writer: ProgressWriter) -> int:
    from ..reports import read_report_file

    model_dir = args.model or _default_model()
    if args.format not in _FORMATS:
        raise JobError("input", f"--format must be one of {_FORMATS}, got {args.format!r}")
    info = read_model_info(model_dir)  # a missing or broken folder fails here, before torch loads
    report = None if args.unconditional else read_report_file(args.report_file)

    # 1. Device: free GPU memory is checked before anything is put on the GPU
    writer.stage("check_device")
    device = choose_device(args.device, model_dir, writer, args.min_free_gpu_gb)
    # 2. Model
    writer.stage("load_model")
    from ..pipelines.generate_cli import write_generation
    from ..pipelines.generation import CCELLAPipeline

    pipe = CCELLAPipeline.from_pretrained(model_dir, device=device, dtype=precision_dtype(args.precision))
    steps = args.steps if args.steps is not None else pipe.config.sampling.steps
    # 3.-5. Encode the report, sample (one progress line per step), decode
    writer.stage("encode_report")
    handles = _watch_denoiser(pipe, steps, writer)
    try:
        output = pipe(report, seed=args.seed, steps=steps, sampler=args.sampler, guidance=args.guidance,
                      spacing=tuple(args.spacing) if args.spacing else None, unconditional=report is None)
    finally:
        for handle in handles:
            handle.remove()
    # 6. Files, then the result the parent loads
    writer.stage("write")
    sidecar = write_generation(output, report, args.out, args.format)
    writer.result(out_dir=str(args.out), files=sidecar["files"], preview=sidecar["preview"],
                  sidecar="generation.json", class_probability=output.class_probability,
                  settings=output.settings, model=info.name)
    return 0


def main(argv: list[str] | None = None, writer: ProgressWriter | None = None) -> int:
    """Parse ``argv``, run, and turn every failure into one ``error`` line (exit status 1)."""
    parser = argparse.ArgumentParser(prog="python -m CCELLACore.jobs generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    writer = writer or ProgressWriter()
    try:
        return run(args, writer)
    except JobError as exc:
        writer.error(str(exc), kind=exc.kind, hint=exc.hint)
    except CCELLAError as exc:  # bad report file, model folder, sampler, steps: the message names the culprit
        writer.error(str(exc), kind="input")
    except Exception as exc:  # noqa: BLE001 - a child must always end with an error line
        import torch

        traceback.print_exc(file=sys.stderr)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            writer.error("the GPU ran out of memory", kind="gpu_memory",
                         hint="Run on the CPU (slower), or close what else uses the GPU.")
        else:
            writer.error(f"{type(exc).__name__}: {exc}", kind="internal", hint="The log holds the traceback.")
    return 1
