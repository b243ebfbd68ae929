"""``ccella domain-adaptation``: the study as resumable cells.

Layout of ``<out>``::

    data/                   phantom institutions (data.phantoms), the filtered manifests, the synthetic twins
    subsets/trial<k>/       p<percent>.csv (chosen Institution-2 train rows + every val row), subsets.json
    cache/<variant>/        prepared exams shared by all runs of a variant
    runs/<cell>/            train_classifier's run folder (checkpoints removed once the cell is done)
    cells/<cell>.json       one result per cell, written atomically last: its presence means "done, skip"
    results.csv, table.*, statistics.*, figure_*.png, study.json   (see :mod:`.report`)

A cell is one training run plus its evaluation on Institution 2's test set: ``<variant>/pretrain_<real|synthetic>/
trial<k>`` (Institution 1; its test result is the 0 % point of strategy real or synthetic) or
``<variant>/<strategy>/p<percent>/trial<k>``. A killed study started again skips finished cells and continues the
unfinished run from its last checkpoint (``train_classifier`` resumes exactly).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from ..data.manifest import read_manifest, write_manifest
from ..data.study import Study
from ..errors import CCELLAError, DataError
from ..fileio import atomic_write_json, read_json
from .config import StudyConfig

__all__ = ["Cell", "plan_cells", "run_study", "percent_label", "StudyData"]

logger = logging.getLogger("CCELLACore")


def percent_label(fraction: float) -> str:
    """0.0625 -> ``"6.25"``; 1.0 -> ``"100"``."""
    return f"{100.0 * fraction:g}"


@dataclass(frozen=True)
class Cell:
    """One training run + evaluation. ``fraction`` 0 = pretraining on Institution 1 (``strategy`` = its source)."""

    variant: str
    strategy: str
    fraction: float
    trial: int

    @property
    def key(self) -> str:
        if self.fraction == 0:
            return f"{self.variant}/pretrain_{self.strategy}/trial{self.trial}"
        return f"{self.variant}/{self.strategy}/p{percent_label(self.fraction)}/trial{self.trial}"


def plan_cells(config: StudyConfig) -> list[Cell]:
    """Every cell, pretraining first (fine-tuning needs it), then fractions from the largest."""
    cells = []
    pretrain_trials = range(config.trials if config.pretrain_per_trial else 1)
    for variant in config.variants:
        for source in ("real", "synthetic"):
            if source in config.strategies:
                cells += [Cell(variant, source, 0.0, k) for k in pretrain_trials]
    for trial in range(config.trials):
        for variant in config.variants:
            for fraction in sorted(config.fractions, reverse=True):
                cells += [Cell(variant, s, fraction, trial) for s in config.strategies]
    return cells


def _run_job(name: str, argv: list[str]) -> int:
    """Run a ``ccella`` job in this process through its own parser (the same code path as the command line)."""
    from ..cli import COMMANDS

    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ccella {name}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


@dataclass
class StudyData:
    """The manifests a study trains and tests on (all filtered to the rows it uses)."""

    real: Path  # Institution 1 train/val
    synthetic: Path  # Institution 1's synthetic twins, train/val
    institution2: list[Study]  # every Institution 2 row
    test: list[Study]  # Institution 2 test rows
    n_pretrain: int  # Institution 1 training rows

    @property
    def pool(self) -> list[Study]:
        return [s for s in self.institution2 if s.split == "train"]


def _rows(path: Path, institution: str, splits: tuple[str, ...]) -> list[Study]:
    manifest = read_manifest(path)
    for problem in manifest.problems:
        logger.warning("manifest %s: skipped case %s: %s", path.name, problem.case_id, problem.reason)
    return [s for s in manifest.studies if s.institution == institution and s.split in splits]


def _check_sequences(studies: list[Study], config: StudyConfig, where: str) -> None:
    for variant, seqs in config.variants.items():
        for study in studies:
            missing = [s for s in seqs if s not in study.images]
            if missing:
                raise DataError(study.case_id, f"{where}: no {', '.join(missing)} image, needed by variant "
                                f"'{variant}' ({'+'.join(seqs)})")


def prepare_data(config: StudyConfig, out: Path, device: str, progress: bool) -> StudyData:
    """Phantoms (if asked for), the filtered manifests and the synthetic twins; each step is skipped once done."""
    data_dir = out / "data"
    inst1, inst2 = config.data.institution_ids
    sources = {"1": config.data.institution1, "2": config.data.institution2}
    if config.data.phantoms is not None:
        ph = config.data.phantoms
        for number, spec in (("1", ph.institution1), ("2", ph.institution2)):
            target = data_dir / f"phantoms{number}"
            if not (target / "manifest.csv").is_file():
                grid = (["--size", *map(str, ph.size)] if ph.size else []) + \
                       (["--spacing", *map(str, ph.spacing)] if ph.spacing else [])
                _run_job("phantoms", ["--institution", number, "--n", str(spec.n), "--seed", str(spec.seed),
                                      "--splits", *map(str, spec.splits), "--out", str(target), "--layouts", "none",
                                      *grid, *([] if progress else ["--no-progress"])])
            sources[number] = target / "manifest.csv"
        inst1, inst2 = "1", "2"
    real = _rows(sources["1"], inst1, ("train", "val"))
    institution2 = _rows(sources["2"], inst2, ("train", "val", "test"))
    for rows, what, manifest in ((real, f"institution {inst1} train/val", sources["1"]),
                                 (institution2, f"institution {inst2}", sources["2"])):
        if not [s for s in rows if s.split == "train" and s.label is not None]:
            raise CCELLAError(f"{manifest}: no labelled {what} training rows")
    _check_sequences(real, config, str(sources["1"]))
    _check_sequences(institution2, config, str(sources["2"]))
    test = sorted((s for s in institution2 if s.split == "test"), key=lambda s: s.case_id)
    if len({s.label for s in test if s.label is not None}) < 2:
        raise CCELLAError(f"{sources['2']}: institution {inst2}'s test split needs labelled exams of both classes "
                          f"(has {len(test)} rows)")
    real_path = data_dir / "institution1_real.csv"
    if not real_path.is_file():
        write_manifest(real, real_path)
    synthetic = config.synthetic
    if synthetic.manifest is not None:
        synthetic_path = synthetic.manifest
    else:
        synth_dir = data_dir / "synthetic"
        synthetic_path = synth_dir / "manifest.csv"
        needed = "synthetic" in config.strategies
        if needed and not (synth_dir / "synthesize_summary.json").is_file():
            from ..pipelines.generate_cli import DEMO_MODEL_DIR

            generator = DEMO_MODEL_DIR if synthetic.generator == "demo" else Path(synthetic.generator)
            logger.info("synthesizing institution 1's exams with %s (%d steps)", generator.name, synthetic.steps)
            _run_job("synthesize", ["--manifest", str(real_path), "--model", str(generator), "--out", str(synth_dir),
                                    "--splits", *synthetic.splits, "--seed", str(synthetic.seed),
                                    "--steps", str(synthetic.steps), "--guidance", str(synthetic.guidance),
                                    "--device", device, *(["--sampler", synthetic.sampler] if synthetic.sampler else []),
                                    *([] if progress else ["--no-progress"])])
        if not needed:
            synthetic_path = real_path  # never read
    if "synthetic" in config.strategies:
        rows = [s for s in read_manifest(synthetic_path).studies if s.split in ("train", "val")]
        if not [s for s in rows if s.split == "train" and s.label is not None]:
            raise CCELLAError(f"{synthetic_path}: no labelled synthetic training rows")
        _check_sequences(rows, config, str(synthetic_path))
    n_pretrain = sum(1 for s in real if s.split == "train")
    return StudyData(real_path, synthetic_path, institution2, test, n_pretrain)


def write_subsets(config: StudyConfig, data: StudyData, out: Path) -> dict[int, dict[float, list[str]]]:
    """Per trial: nested, label-stratified Institution-2 training subsets (seed ``seed + trial``) as manifests."""
    from ..classifier.split import nested_fractions

    val = [s for s in data.institution2 if s.split == "val"]
    by_case = {s.case_id: s for s in data.pool}
    subsets = {}
    for trial in range(config.trials):
        chosen = nested_fractions(data.pool, config.fractions, seed=config.seed + trial)
        folder = out / "subsets" / f"trial{trial}"
        for fraction, cases in chosen.items():
            path = folder / f"p{percent_label(fraction)}.csv"
            if not path.is_file():
                write_manifest([by_case[c] for c in cases] + val, path)
        atomic_write_json(folder / "subsets.json", {percent_label(f): c for f, c in chosen.items()})
        subsets[trial] = chosen
    return subsets


def _device(name: str):
    import torch

    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def evaluate(model_dir: Path, test: list[Study], cache_dir: Path, device: str = "auto") -> tuple[list[str], list[int],
                                                                                                  list[float]]:
    """``(case ids, labels, p(csPCa))`` of the test rows, prepared exactly as in training.

    Raises:
        DataError: a test exam cannot be prepared (named): the comparisons need every test exam.
    """
    from ..classifier.data import prepare_studies
    from ..classifier.model import load_classifier_dir
    from ..classifier.train import predict_cases
    from ..precision import training_dtype

    dev = _device(device)
    model = load_classifier_dir(model_dir, device=dev)
    cases, skipped = prepare_studies(test, model.preprocess, model.config.intensity, model.sequences, cache_dir)
    if skipped:
        case, reason = skipped[0]
        raise DataError(case, f"test exam cannot be used: {reason}")
    scores = predict_cases(model.network, cases, dev, training_dtype(dev))
    return [c.case_id for c in cases], [c.label for c in cases], [float(p) for p in scores]


def _run_cell(cell: Cell, config: StudyConfig, data: StudyData, subsets, out: Path, device: str) -> dict[str, Any]:
    from ..classifier.metrics import classification_metrics
    from ..classifier.train import train_classifier

    base = config.classifier_config()
    pretrain_trial = cell.trial if config.pretrain_per_trial else 0
    seed = config.seed + (pretrain_trial if cell.fraction == 0 else cell.trial)
    classifier = replace(base, train=replace(base.train, seed=seed))
    init = None
    if cell.fraction == 0:
        manifest, epochs = (data.real if cell.strategy == "real" else data.synthetic), config.epochs.pretrain
        n_train = sum(1 for s in read_manifest(manifest).studies if s.split in classifier.train.train_splits)
    else:
        manifest = out / "subsets" / f"trial{cell.trial}" / f"p{percent_label(cell.fraction)}.csv"
        n_train = len(subsets[cell.trial][cell.fraction])
        if cell.strategy == "scratch":
            epochs = config.epochs.scratch
        else:
            epochs = config.epochs.finetune
            init = out / "runs" / Cell(cell.variant, cell.strategy, 0.0, pretrain_trial).key / "model"
    run_dir = out / "runs" / cell.key
    started = time.time()
    model_dir = train_classifier(classifier, manifest, run_dir, init=init, sequences=config.variants[cell.variant],
                                 cache_dir=out / "cache" / cell.variant, epochs=epochs, device=device,
                                 name=cell.key.replace("/", "_"), progress=False)
    case_ids, labels, scores = evaluate(model_dir, data.test, out / "cache" / cell.variant, device)
    metrics = classification_metrics(labels, scores)
    result = {"cell": cell.key, "variant": cell.variant, "sequences": list(config.variants[cell.variant]),
              "strategy": cell.strategy, "fraction": cell.fraction, "trial": cell.trial, "seed": seed,
              "n_train": n_train, "initialised_from": None if init is None else str(init.relative_to(out)),
              "model_hash": read_json(model_dir / "model.json").get("model_hash"),
              "auc": metrics["auc"], "ap": metrics["ap"], "seconds": round(time.time() - started, 1),
              "test": {"case_ids": case_ids, "labels": labels, "scores": scores}}
    atomic_write_json(out / "cells" / f"{cell.key}.json", result)
    _tidy(cell, config, out)
    return result


def _tidy(cell: Cell, config: StudyConfig, out: Path) -> None:
    """Remove a finished cell's checkpoints (large; the model folder is what is kept) and, for fine-tuning cells,
    its model unless ``keep_models``. Idempotent: a study killed between a cell's result and this is tidied when it
    runs again."""
    run_dir = out / "runs" / cell.key
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if cell.fraction > 0 and not config.keep_models:
        shutil.rmtree(run_dir / "model", ignore_errors=True)


def _cost(cell: Cell, config: StudyConfig, data: StudyData, subsets) -> float:
    """Relative cost of a cell for the time-left estimate: training exams x epochs (+ the test exams)."""
    train = config.classifier_config().train
    if cell.fraction == 0:
        n, epochs = data.n_pretrain, config.epochs.pretrain or train.epochs
    else:
        n = len(subsets[cell.trial][cell.fraction])
        epochs = (config.epochs.scratch or train.epochs) if cell.strategy == "scratch" else \
            (config.epochs.finetune or train.finetune_epochs)
    return float(n * epochs + len(data.test))


def run_study(config: StudyConfig, out: str | Path, *, device: str = "auto", progress: bool = True,
              stop_after_cells: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole study and write its table, statistics and figures; returns the summary.

    Args:
        stop_after_cells: stop after finishing this many cells in this call (as a kill would); run again to go on.
    """
    from tqdm.auto import tqdm

    from ..config import dump_yaml
    from ..fileio import atomic_write_text
    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(config)
    if (out / "study.yaml").is_file() and (out / "study.yaml").read_text(encoding="utf-8") != text:
        # Finished cells of another config would be mixed into this study's table.
        raise CCELLAError(f"{out} holds a study run with another config ({out / 'study.yaml'}); use a new --out")
    atomic_write_text(out / "study.yaml", text)
    data = prepare_data(config, out, device, progress)
    subsets = write_subsets(config, data, out)
    cells = plan_cells(config)
    done = {c.key for c in cells if (out / "cells" / f"{c.key}.json").is_file()}
    for cell in cells:
        if cell.key in done:
            _tidy(cell, config, out)
    costs = {c.key: _cost(c, config, data, subsets) for c in cells}
    todo = [c for c in cells if c.key not in done]
    logger.info("domain-adaptation: %d cells, %d done, %d to run; %d Institution-2 test exams",
                len(cells), len(done), len(todo), len(data.test))
    bar = tqdm(total=len(cells), initial=len(done), desc="study", unit="cell", disable=not progress)
    started, spent_cost, finished_now = time.time(), 0.0, 0
    for cell in todo:
        if stop_after_cells is not None and finished_now >= stop_after_cells:
            break
        bar.set_postfix_str(cell.key)
        result = _run_cell(cell, config, data, subsets, out, device)
        finished_now += 1
        spent_cost += costs[cell.key]
        remaining = sum(costs[c.key] for c in todo[finished_now:])
        left = (time.time() - started) / spent_cost * remaining
        bar.update(1)
        logger.info("cell %d/%d done: %s AP %.3f AUC %.3f (%.0f s); about %.1f min left", len(done) + finished_now,
                    len(cells), cell.key, result["ap"], result["auc"], result["seconds"], left / 60.0)
    bar.close()
    n_done = sum(1 for c in cells if (out / "cells" / f"{c.key}.json").is_file())
    if n_done < len(cells):
        logger.info("stopped with %d of %d cells done; run the same command to continue", n_done, len(cells))
        return {"complete": False, "cells_done": n_done, "cells": len(cells)}
    results = [read_json(out / "cells" / f"{c.key}.json") for c in cells]
    return write_report(config, results, out)
