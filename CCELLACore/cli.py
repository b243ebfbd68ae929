"""The ``ccella`` command: one subcommand per headless job.

Each job lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their subcommand runs, so ``ccella --help`` starts fast and needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import CCELLAError

__all__ = ["main", "COMMANDS", "positive_int"]

#: subcommand -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantoms": ("CCELLACore.data.phantoms_cli", "write a procedural bpMRI data set (phantom world) in every layout"),
    "import": ("CCELLACore.data.importers.cli", "detect a data layout (authors' JSON, PI-CAI, Prostate158) and write a manifest"),
    "preprocess": ("CCELLACore.data.preprocess_cli", "resample, crop/pad around the gland and normalise a manifest's studies"),
    "encode": ("CCELLACore.models.encode_cli", "cache text-encoder embeddings of a manifest's reports"),
    "import-autoencoder": ("CCELLACore.models.import_cli", "a frozen autoencoder model folder from pretrained weights (NVIDIA's MAISI), no training"),
    "train-autoencoder": ("CCELLACore.training.autoencoder_cli", "train the MAISI-architecture autoencoder on preprocessed exams"),
    "train-ldm": ("CCELLACore.training.ldm_cli", "train the CCELLA adapter + U-Net (one process or torchrun DDP)"),
    "replace-decoder": ("CCELLACore.models.replace_decoder_cli", "put a fine-tuned decoder (same encoder, same latents) into a generator model folder"),
    "distill-decoder": ("CCELLACore.training.distill_decoder_cli", "distil a light decoder from a model's full decoder and add it to the model folder"),
    "generate": ("CCELLACore.pipelines.generate_cli", "generate synthetic AxT2/HighB/ADC exams from reports"),
    "synthesize": ("CCELLACore.pipelines.synthesize_cli", "one synthetic exam per real exam of a manifest (torchrun-sharded, resumable)"),
    "honour": ("CCELLACore.metrics.honour_cli", "measure whether generated exams honour their reports; write the model card's figures"),
    "split": ("CCELLACore.classifier.split_cli", "patient-level train/val/test splits stratified by label, seeded"),
    "train-classifier": ("CCELLACore.classifier.train_cli", "train the csPCa classifier (3D EfficientNet-B0; resumable, DDP)"),
    "classify": ("CCELLACore.classifier.classify_cli", "p(csPCa) and a Grad-CAM saliency map for exams of any geometry"),
    "domain-adaptation": ("CCELLACore.study.cli", "the domain-adaptation study: pretrain, fine-tune on fractions, compare"),
    "evaluate": ("CCELLACore.evaluation.evaluate_cli", "FID/KID, MS-SSIM diversity, intensities, faithfulness and memorisation audit"),
}


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (steps, workers, cases)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_decoder_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--decoder`` of the jobs that generate exams (generate, synthesize, honour): one choice, one help text."""
    parser.add_argument("--decoder", choices=("auto", "full", "light"), default="auto",
                        help="full: the autoencoder's decoder; light: the distilled one (ccella distill-decoder); "
                        "auto: light only where the model folder records that it met the quality bar" + note)


def add_precision_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--precision`` of the jobs that run a model (generate, honour, the Slicer generate job); see
    :func:`precision_dtype`."""
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 where the GPU or CPU has it natively, else fp32" + note)


def precision_dtype(name: str):
    """The torch dtype that a ``--precision`` name asks for; None for ``auto`` (the pipeline then chooses,
    ``precision.choose_dtype``). torch is imported here, not when the parser is built."""
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccella",
        description="CCELLA++ headless jobs: data, training, generation and evaluation for synthetic bpMRI.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<job>")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the global part first; the job's own parser takes the rest.
    split = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if split is None:
        args = parser.parse_args(argv)  # prints help / errors for unknown jobs
        parser.print_help()
        return 2
    global_args = parser.parse_args(argv[:split])
    name = argv[split]
    module_name, help_text = COMMANDS[name]
    job_parser = argparse.ArgumentParser(prog=f"ccella {name}", description=help_text)
    module = importlib.import_module(module_name)
    module.add_arguments(job_parser)
    args = job_parser.parse_args(argv[split + 1 :])
    logging.basicConfig(
        level=logging.DEBUG if global_args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(module.run(args) or 0)
    except CCELLAError as exc:
        print(f"ccella {name}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "torch" in sys.modules:  # a distributed job whose other process died: say so, not a gloo traceback
            from .training.distributed import peer_failure

            message = peer_failure(exc)
            if message:
                print(f"ccella {name}: error: {message}", file=sys.stderr)
                return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
