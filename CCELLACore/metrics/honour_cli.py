"""``ccella honour``: measure whether a model's generated exams honour their reports; write the model card's figures.

Writes ``<out>/honour.json`` (per-case records and summary, no report text) and ``<out>/honour.md`` (a Markdown
section for the model card); ``<out>/generated.jsonl`` keeps each generated exam's record as it is judged, so a
killed run, started again with the same command, generates only the rest. ``--update-card`` also puts the section
into ``<model>/README.md`` between ``<!-- honour:start -->`` and ``<!-- honour:end -->``. See
:mod:`CCELLACore.metrics.honour` for the procedure.

``--ceiling-only`` judges gates 1 and 2 alone (real exams, and real exams through the autoencoder; nothing is
generated) and writes ``<out>/ceiling.json``; with ``--autoencoder DIR`` (a ``ccella train-autoencoder`` model folder
of any architecture on the model's grid) that autoencoder stands in for the model's, and ``--adc-window`` gives the
ADC window its training volumes were normalised with: a candidate autoencoder is judged before any diffusion model is
trained on its latents.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli import add_decoder_argument, add_precision_argument, positive_int, precision_dtype
from ..errors import CCELLAError
from ..fileio import atomic_write_json

from .honour import HonourSettings, ceiling_gates, evaluate_ceiling, evaluate_honour, honour_gates
from .honour_card import honour_markdown, update_model_card, write_honour

__all__ = ["add_arguments", "run"]

logger = logging.getLogger("CCELLACore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..pipelines.generate_cli import DEMO_MODEL_DIR

    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR,
                        help="model directory (default: the embedded demo model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for honour.json and honour.md")
    parser.add_argument("--n", type=positive_int, default=50, help="phantom reports to generate from (default 50)")
    parser.add_argument("--seed", type=int, default=1000,
                        help="phantom seed of the evaluated reports; must not have been used in training (default 1000)")
    parser.add_argument("--atlas-seed", type=int, default=2000, help="phantom seed of the gland-atlas exams (default 2000)")
    parser.add_argument("--atlas-n", type=positive_int, default=40, help="exams in the gland atlas (default 40)")
    parser.add_argument("--validation-seed", type=int, default=3000,
                        help="phantom seed on which the detector itself is validated (gate 1; default 3000)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--sampler", default=None, help="ddpm, ddim, dpm-solver++ or rflow (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--institution", type=int, choices=(1, 2), default=1, help="phantom institution (default 1)")
    parser.add_argument("--phantom-size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="grid the real phantom exams are rendered on (default: the model's phantoms: section, "
                             "else the institution's)")
    parser.add_argument("--phantom-spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                        help="their voxel size in mm (default: the institution's)")
    parser.add_argument("--handwritten-seeds", type=int, default=3,
                        help="seeds per hand-written report (10 reports outside the phantom templates; 0 = skip; "
                             "default 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_precision_argument(parser, " (the card names it)")
    add_decoder_argument(parser, "; it decodes the generated exams and the autoencoder ceiling (gate 2) alike")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="gates 1 and 2 only (real exams, also through the autoencoder; nothing generated): "
                             "<out>/ceiling.json")
    parser.add_argument("--autoencoder", type=Path, default=None,
                        help="with --ceiling-only: judge this autoencoder model folder (train-autoencoder output, any "
                             "architecture, the model's grid) instead of the model's")
    parser.add_argument("--adc-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="with --ceiling-only: the ADC window (10^-6 mm^2/s) of the normalisation the judged "
                             "autoencoder was trained with (default: the model's preprocess.ldm.adc_window)")
    parser.add_argument("--update-card", action="store_true",
                        help="also write the section into the model directory's README.md (weights are untouched)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..pipelines.generation import CCELLAPipeline

    settings = HonourSettings(
        n=args.n, seed=args.seed, atlas_seed=args.atlas_seed, atlas_n=args.atlas_n,
        validation_seed=args.validation_seed, steps=args.steps,
        sampler=args.sampler, guidance=args.guidance, institution=args.institution,
        phantom_size=tuple(args.phantom_size) if args.phantom_size else None,
        phantom_spacing=tuple(args.phantom_spacing) if args.phantom_spacing else None,
        handwritten_seeds=args.handwritten_seeds,
    )
    if (args.autoencoder is not None or args.adc_window is not None) and not args.ceiling_only:
        raise CCELLAError("--autoencoder and --adc-window need --ceiling-only: the model's diffusion model was "
                          "trained on the latents of its own autoencoder")
    if args.ceiling_only and args.update_card:
        raise CCELLAError("--update-card needs the whole evaluation, not --ceiling-only")
    pipe = CCELLAPipeline.from_pretrained(args.model, device=args.device, dtype=precision_dtype(args.precision),
                                          decoder=args.decoder)
    if args.ceiling_only:
        return _run_ceiling(args, pipe, settings)
    result = evaluate_honour(pipe, settings, progress=not args.no_progress,
                             journal_path=args.out / "generated.jsonl")
    json_path, md_path = write_honour(result, args.out)
    summary = result["summary"]
    logger.info("honour: lesion found %s (PI-RADS >= 4), %s (PI-RADS 1-2), %s (PI-RADS 3); side correct %s",
                summary["pirads_4_5"]["lesion_found"]["count"], summary["pirads_1_2"]["lesion_found"]["count"],
                summary["pirads_3"]["lesion_found"]["count"], summary["side_correct"]["count"])
    ceiling = result["detector_validity"]["summary"]["autoencoder_atlas"]
    logger.info("honour: ceiling of the model's autoencoder (real exams reconstructed): %s (PI-RADS >= 4), "
                "%s (PI-RADS 1-2)", ceiling["sensitivity"]["count"], ceiling["false_positive_rate"]["count"])
    _log_gates(honour_gates(result))
    print(f"wrote {json_path} and {md_path}")
    if args.update_card:
        card = update_model_card(args.model, honour_markdown(result))
        print(f"updated the model card {card} (README only; the model hash is unchanged)")
    return 0


def _run_ceiling(args: argparse.Namespace, pipe, settings: HonourSettings) -> int:
    from dataclasses import replace

    preprocess = pipe.config.preprocess.ldm
    if args.adc_window is not None:
        try:
            preprocess = replace(preprocess, adc_window=tuple(args.adc_window))
        except ValueError as exc:
            raise CCELLAError(f"--adc-window: {exc}") from None
    if args.autoencoder is not None:
        from ..models.autoencoder import load_autoencoder_dir
        from ..models.light_decoder import SequenceCodec

        if pipe.autoencoder.decoder_name != "full":
            raise CCELLAError("--autoencoder judges that autoencoder's own decoder: give --decoder full")
        candidate, metadata = load_autoencoder_dir(args.autoencoder, pipe.device)
        grid, own = tuple(metadata.get("grid_size") or ()), tuple(pipe.metadata["grid_size"])
        if grid != own:
            raise CCELLAError(f"{args.autoencoder}: trained on the grid {grid}, not on the model's {own}")
        # Its own architecture (a joint or wider candidate too): only real exams pass through it, no latent of it
        # reaches the diffusion model.
        pipe.autoencoder = SequenceCodec(candidate, pipe.device, pipe.autoencoder.dtype,
                                         tiling=pipe.autoencoder.tiling)
    result = evaluate_ceiling(pipe, settings, progress=not args.no_progress, preprocess=preprocess)
    if args.autoencoder is not None:
        from ..models.serialization import component_hash

        result["settings"]["autoencoder"] = {"folder": str(args.autoencoder),
                                             "hash": component_hash(args.autoencoder, "autoencoder")}
    else:
        result["settings"]["autoencoder"] = "the model's"
    args.out.mkdir(parents=True, exist_ok=True)
    path = atomic_write_json(args.out / "ceiling.json", result)
    _log_gates(ceiling_gates(result))
    _log_false_regions(result["detector_validity"]["records"])
    print(f"wrote {path}")
    return 0


def _log_false_regions(records) -> None:
    """Each lesion the autoencoder put into a PI-RADS 1-2 exam, read there and in the real exam (case indices only)."""
    for record in records:
        if record["group"] != "pirads_1_2":
            continue
        for r in record.get("autoencoder_atlas_regions", ()):
            logger.info("false lesion through the autoencoder, case %d: %.0f mm^3, ADC %.0f (real %.0f), HighB %.2f x "
                        "the gland (real %.2f)", record["case_index"], r["volume_mm3"], r["adc"], r["real_adc"],
                        r["highb_ratio"], r["real_highb_ratio"])


def _log_gates(gates: list[dict]) -> None:
    for gate in gates:
        for check in gate["checks"]:
            logger.info("gate %d (%s): %s, target %s: %s", gate["gate"], gate["name"], check["figure"],
                        check["target"], {True: "met", False: "NOT met", None: "no exams"}[check["met"]])
