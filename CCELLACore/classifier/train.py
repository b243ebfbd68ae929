"""``ccella train-classifier``: train the csPCa classifier from scratch or fine-tune one (``--init``), resumably.

One process::

    ccella train-classifier --config paper --manifest inst1.csv --out runs/cls_real --institution 1

Several GPUs (DDP; NCCL on GPUs, gloo on CPUs)::

    torchrun --standalone --nproc_per_node=4 Training/train_classifier.py --config paper --manifest ... --out ...

The recipe is the reference's (``tfproxy*.py``) with the paper's LR schedule: focal loss (gamma 2), AdamW (1e-4 from
scratch, 1e-5 fine-tuning, all layers trained, nothing frozen or reset), polynomial decay (power 2) over the real
number of optimiser steps, validation every 5 epochs and the best validation AP kept as the model. bf16 autocast on
GPUs that have it (the reference's ``--autocast``), fp32 on CPUs.

Exact resume: the batch of step ``s`` (sample order and augmentation) derives from ``(seed, s)``; weights, the best
weights so far, the optimiser, RNG states (dropout, drop-connect), the step and the validation history are saved
every ``checkpoint_every`` epochs in ``<out>/checkpoints`` (atomic, ``last`` and ``previous``), so a killed run
started again with the same command finishes with the same bytes as one never interrupted (same machine and
library versions). The result is ``<out>/model`` (see :mod:`CCELLACore.classifier.model`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.manifest import read_manifest
from ..errors import CCELLAError, DataError
from ..training.checkpoint import TrainingState, config_hash, find_checkpoint, load_checkpoint, save_checkpoint
from ..training.distributed import DistributedContext, init_distributed
from ..training.logs import MetricsLogger
from ..precision import autocast_context, describe_device, training_dtype
from ..training.schedule import polynomial_lr, set_lr
from .config import ClassifierConfig, resolve_preprocess
from .data import PreparedCase, augment, batch_indices, build_augmentation, prepare_studies, sample_seed, \
    steps_per_epoch
from .metrics import classification_metrics
from .model import COMPONENT, MODEL_KIND, build_classifier, load_classifier_dir

__all__ = ["train_classifier", "predict_cases"]

logger = logging.getLogger("CCELLACore")


class _StepBatches(torch.utils.data.Dataset):
    """Item ``i`` = this rank's (augmented) batch of optimiser step ``first_step + i``; pure in ``(seed, step)``."""

    def __init__(self, cases: list[PreparedCase], first_step: int, last_step: int, global_batch: int,
                 ctx: DistributedContext, seed: int, transform):
        self.cases, self.first, self.last = cases, first_step, last_step
        self.global_batch, self.rank, self.world = global_batch, ctx.rank, ctx.world_size
        self.seed, self.transform = seed, transform

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.first + i
        order = batch_indices(len(self.cases), step, self.global_batch, self.seed)
        positions = range(self.rank, self.global_batch, self.world)
        xs = [augment(self.cases[order[p]].load(), self.transform, sample_seed(self.seed, step, p)) for p in positions]
        ys = [self.cases[order[p]].label for p in positions]
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


@torch.no_grad()
def predict_cases(network: nn.Module, cases: list[PreparedCase], device: torch.device, dtype: torch.dtype,
                  batch_size: int = 8) -> np.ndarray:
    """p(csPCa) (N,) of prepared cases, in eval mode (the network's mode is restored afterwards)."""
    was_training = network.training
    network.eval()
    out = []
    for start in range(0, len(cases), batch_size):
        x = torch.stack([torch.as_tensor(np.array(c.load(), dtype=np.float32)) for c in cases[start:start + batch_size]])
        with autocast_context(device, dtype):
            logits = network(x.to(device))
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    network.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def _summary(cases: list[PreparedCase]) -> dict[str, Any]:
    labels = [c.label for c in cases]
    return {"n": len(cases), "n_pos": int(sum(labels)), "n_neg": int(len(labels) - sum(labels)),
            "patients": len({c.patient_id for c in cases}),
            "label_sources": dict(sorted(Counter(c.label_source for c in cases).items())),
            "institutions": dict(sorted(Counter(c.institution or "?" for c in cases).items()))}


def _select(studies, splits, institution: str | None):
    return [s for s in studies if s.split in splits and (institution is None or s.institution == institution)]


def _load_cases(manifest_path, splits, institution, preprocess, config, cache_dir, ctx, progress, what):
    manifest = read_manifest(manifest_path)
    if ctx.is_main:
        for problem in manifest.problems:
            logger.warning("manifest %s: skipped case %s: %s", Path(manifest_path).name, problem.case_id,
                           problem.reason)
    studies = _select(manifest.studies, splits, institution)
    sequences = tuple(config.network.sequences)
    # Rank 0 prepares the cache; the others then find every case prepared.
    cases, skipped = [], []
    for turn in (0, 1):
        if (turn == 0) == ctx.is_main:
            cases, skipped = prepare_studies(studies, preprocess, config.intensity, sequences, cache_dir,
                                             progress=progress and ctx.is_main)
        ctx.barrier()
    if ctx.is_main:
        for case, reason in skipped:
            logger.warning("%s: skipped case %s: %s", what, case, reason)
    return cases, skipped, len(studies)


def train_classifier(
    config: ClassifierConfig,
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    init: str | Path | None = None,
    institution: str | int | None = None,
    sequences: tuple[str, ...] | list[str] | None = None,
    val_manifest: str | Path | None = None,
    cache_dir: str | Path | None = None,
    epochs: int | None = None,
    stop_after_epoch: int | None = None,
    device: str = "auto",
    name: str | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume) a classifier; returns the model directory ``<out_dir>/model``.

    Args:
        config: the classifier config (:func:`~CCELLACore.classifier.config.load_classifier_config`).
        manifest_path: any manifest (raw or preprocessed, real or synthetic exams): rows of ``train.train_splits``
            train, rows of ``train.val_split`` validate; each row's ``label`` is the target (synthetic exams: the
            generator's predicted class). Exams are brought to the classifier's grid internally.
        out_dir: the run folder: ``cache/`` (prepared exams), ``checkpoints/``, ``metrics.csv``, ``model/``.
        init: a classifier model directory to fine-tune (then ``finetune_lr`` and ``finetune_epochs``).
        institution: use only rows of this institution (training and validation).
        sequences: the input channels (overrides ``network.sequences``): ``("AxT2",)`` or ``("AxT2", "HighB", "ADC")``.
        val_manifest: validate on this manifest's ``val_split`` rows instead of ``manifest_path``'s.
        cache_dir: where prepared exams are kept (default ``<out_dir>/cache``; runs may share one).
        epochs: overrides the config's epochs (or finetune_epochs with ``init``).
        stop_after_epoch: stop after this epoch with a checkpoint and without writing the model, as a kill would;
            running again continues exactly.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (under torchrun each rank takes its local GPU).
        name: the model's name in its card and in ``classify`` outputs (default: the run folder's name).

    Raises:
        DataError: no usable labelled exam in the training splits.
        CCELLAError: ``init`` is not a classifier or does not fit (sequences, variant); a checkpoint written with
            another config.
    """
    from monai.losses import FocalLoss
    from tqdm.auto import tqdm

    config = config.with_sequences(sequences)
    cfg = config.train
    preprocess = resolve_preprocess(config)
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    institution = None if institution is None else str(institution)
    ctx = init_distributed(device)
    dev = ctx.device
    dtype = training_dtype(dev)
    name = name or out_dir.resolve().name
    seqs = tuple(config.network.sequences)
    if ctx.is_main:
        logger.info("train-classifier on %s, %s, world size %d, sequences %s, grid %s at %s mm",
                    describe_device(dev), str(dtype).replace("torch.", ""), ctx.world_size, "+".join(seqs),
                    list(preprocess.grid.size), list(preprocess.grid.spacing))

    # 1. Data (prepared once into the cache).
    train, skipped, n_listed = _load_cases(manifest_path, cfg.train_splits, institution, preprocess, config,
                                           cache_dir, ctx, progress, "train")
    if not train:
        where = f" of institution {institution}" if institution is not None else ""
        raise DataError("<none>", f"{manifest_path}: no usable labelled exam{where} in splits "
                        f"{list(cfg.train_splits)} ({n_listed} listed, {len(skipped)} skipped)")
    val: list[PreparedCase] = []
    if cfg.val_split:
        val, _, _ = _load_cases(val_manifest or manifest_path, (cfg.val_split,), institution, preprocess, config,
                                cache_dir, ctx, progress, "val")
    if ctx.is_main:
        logger.info("%d training exams (%d positive), %d validation exams (%d positive)", len(train),
                    sum(c.label for c in train), len(val), sum(c.label for c in val))
        if len({c.label for c in val}) < 2 and val:
            logger.warning("the validation split has one class only: AP is undefined; the last weights are kept")

    # 2. Network, optimiser (same seed on every rank; DDP also broadcasts rank 0's weights).
    base = None
    if init is not None:
        base = load_classifier_dir(init, "cpu")
        if base.sequences != seqs or base.config.network.variant != config.network.variant:
            raise CCELLAError(f"{init}: the model to fine-tune reads {'+'.join(base.sequences)} with "
                              f"{base.config.network.variant}; this run asks for {'+'.join(seqs)} with "
                              f"{config.network.variant}")
        if tuple(base.preprocess.grid.size) != tuple(preprocess.grid.size) or \
                tuple(base.preprocess.grid.spacing) != tuple(preprocess.grid.spacing):
            logger.warning("%s was trained on grid %s at %s mm; fine-tuning on %s at %s mm", init,
                           list(base.preprocess.grid.size), list(base.preprocess.grid.spacing),
                           list(preprocess.grid.size), list(preprocess.grid.spacing))
    n_epochs = epochs or (cfg.finetune_epochs if base is not None else cfg.epochs)
    base_lr = cfg.finetune_lr if base is not None else cfg.lr
    torch.manual_seed(cfg.seed)
    net = build_classifier(config.network)
    if base is not None:
        net.load_state_dict(base.network.state_dict())
    net.to(dev).train()
    best = copy.deepcopy(net).eval()
    optimizer = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    relevant = {"classifier": replace(config, train=replace(cfg, epochs=1, finetune_epochs=1, validate_every=1,
                                                            checkpoint_every=1, num_workers=0)),
                "preprocess": preprocess, "institution": institution,
                "init": None if base is None else base.model_hash}
    state = TrainingState(models={"classifier": net, "best": best}, optimizers={"classifier": optimizer},
                          config_hash=config_hash(relevant),
                          extra={"best_ap": None, "best_epoch": 0, "best_metrics": {}, "last_metrics": {}})
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed + 1 + ctx.rank)  # dropout / drop-connect differ per rank
    if find_checkpoint(ckpt_dir) is not None:
        load_checkpoint(ckpt_dir, state)
        if ctx.is_main:
            logger.info("resumed from %s at epoch %d (step %d)", ckpt_dir, state.epoch, state.step)
    ddp = torch.nn.parallel.DistributedDataParallel(net) if ctx.is_distributed else net
    focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=cfg.focal_gamma)

    # 3. The loop: epochs of full batches; the LR decays over the real step count.
    global_batch = cfg.batch_size * ctx.world_size
    spe = steps_per_epoch(len(train), global_batch)
    total = n_epochs * spe
    end_epoch = n_epochs if stop_after_epoch is None else min(n_epochs, stop_after_epoch)
    transform = build_augmentation(config.augmentation, preprocess.grid.spacing)
    batches = _StepBatches(train, state.step, end_epoch * spe, global_batch, ctx, cfg.seed, transform)
    # Its own generator: creating the iterator must not draw from the global RNG (restored on resume for dropout).
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                         persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))
    metrics = MetricsLogger(out_dir, enabled=ctx.is_main, resume_step=state.step if state.step else None)
    bar = tqdm(total=total, initial=state.step, desc="train-classifier", unit="step",
               disable=not (progress and ctx.is_main))

    def validate() -> dict[str, float]:
        probs = predict_cases(net, val, dev, dtype, cfg.batch_size)
        labels = np.array([c.label for c in val])
        result = classification_metrics(labels, probs)
        logits = torch.log(torch.from_numpy(np.stack([1 - probs, probs], 1)).clamp_min(1e-12))
        result["loss"] = float(focal(logits, torch.from_numpy(labels)[:, None]))
        return result

    epoch_loss = 0.0
    for x, y in loader:
        lr = polynomial_lr(base_lr, state.step, total, cfg.lr_power)
        set_lr(optimizer, lr)
        with autocast_context(dev, dtype):
            logits = ddp(x.to(dev, non_blocking=True))
        loss = focal(logits.float(), y.to(dev)[:, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        state.step += 1
        bar.update(1)
        reduced = float(ctx.all_reduce_mean(loss.detach()))
        epoch_loss += reduced
        metrics.log(state.step, train_loss=reduced, lr=lr)
        if state.step % spe:
            continue
        # End of an epoch.
        state.epoch = state.step // spe
        metrics.log(state.step, epoch=state.epoch, train_epoch_loss=epoch_loss / spe)
        epoch_loss = 0.0
        if val and ctx.is_main and (state.epoch % cfg.validate_every == 0 or state.epoch == n_epochs):
            result = validate()
            metrics.log(state.step, **{f"val_{k}": v for k, v in result.items()})
            state.extra["last_metrics"] = {"epoch": state.epoch, **result}
            best_ap = state.extra.get("best_ap")
            if not math.isnan(result["ap"]) and (best_ap is None or result["ap"] >= best_ap):
                best.load_state_dict(net.state_dict())
                state.extra.update(best_ap=result["ap"], best_epoch=state.epoch,
                                   best_metrics={"epoch": state.epoch, **result})
            bar.set_postfix(val_ap=f"{result['ap']:.3f}", best=f"{state.extra.get('best_ap') or math.nan:.3f}")
        ctx.barrier()
        if state.epoch % cfg.checkpoint_every == 0 or state.epoch in (n_epochs, end_epoch):
            if ctx.is_main:
                save_checkpoint(ckpt_dir, state)
            ctx.barrier()
    bar.close()
    metrics.close()
    model_dir = out_dir / "model"
    if state.epoch < n_epochs:
        if ctx.is_main:
            logger.info("stopped after epoch %d of %d; run the same command to continue", state.epoch, n_epochs)
        return model_dir

    # 4. The model directory (rank 0): best-AP weights (or the last ones without a usable validation).
    if ctx.is_main:
        from ..models.serialization import ModelMetadata, save_model_dir

        chosen = best if state.extra.get("best_ap") is not None else net
        extra = {
            "kind": MODEL_KIND,
            "name": name,
            "variant": config.network.variant,
            "epochs": n_epochs,
            "steps": state.step,
            "batch_size": cfg.batch_size,
            "world_size": ctx.world_size,
            "lr": base_lr,
            "selected": "best validation AP" if chosen is best else "last epoch",
            "best_epoch": state.extra.get("best_epoch") if chosen is best else n_epochs,
            "validation": state.extra.get("best_metrics") if chosen is best else state.extra.get("last_metrics"),
            "training_data": {"manifest": Path(manifest_path).name, "institution": institution,
                              "splits": list(cfg.train_splits), "skipped": len(skipped), **_summary(train)},
            "validation_data": {"manifest": Path(val_manifest or manifest_path).name, "split": cfg.val_split,
                                **_summary(val)},
            "initialised_from": None if base is None else {"name": base.name, "model_hash": base.model_hash},
            "machine": describe_device(dev),
        }
        metadata = ModelMetadata(sequences=seqs, grid_size=tuple(preprocess.grid.size),
                                 spacing=tuple(preprocess.grid.spacing), text_encoder="", extra=extra)
        saved = {"classifier": replace(config, train=replace(cfg, epochs=n_epochs) if base is None else
                                       replace(cfg, finetune_epochs=n_epochs)),
                 "preprocess": preprocess}
        chosen_cpu = copy.deepcopy(chosen).to("cpu")
        save_model_dir(model_dir, {COMPONENT: chosen_cpu}, saved, metadata, _model_card(extra, config, preprocess))
        logger.info("wrote %s (%s, epoch %s)", model_dir, extra["selected"], extra["best_epoch"])
    ctx.barrier()
    return model_dir


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _model_card(extra: dict[str, Any], config: ClassifierConfig, preprocess) -> str:
    train, val = extra["training_data"], extra["validation_data"]
    metrics = extra.get("validation") or {}
    init = extra.get("initialised_from")
    return (
        f"# CCELLA++ csPCa classifier: {extra['name']}\n\n"
        f"- Network: MONAI EfficientNetBN {config.network.variant} (3D), inputs {' + '.join(config.network.sequences)},"
        f" output p(clinically significant cancer).\n"
        f"- Grid: {list(preprocess.grid.size)} voxels at {list(preprocess.grid.spacing)} mm, centred on the AxT2 "
        "volume; per-sequence soft clipping at the "
        f"{config.intensity.lower_percentile:g}-{config.intensity.upper_percentile:g} percentiles and z-score.\n"
        f"- Training: {'fine-tuned from ' + init['name'] + ' (' + init['model_hash'][:12] + ')' if init else 'from scratch'}"
        f", {extra['epochs']} epochs ({extra['steps']} steps, batch {extra['batch_size']} x {extra['world_size']}), "
        f"focal loss, AdamW lr {extra['lr']:g} with polynomial decay (power {config.train.lr_power:g}).\n"
        f"- Training data: {train['n']} exams ({train['n_pos']} positive) of {train['patients']} patients from "
        f"{train['manifest']}; label sources {train['label_sources']}; institutions {train['institutions']}.\n"
        f"- Validation data: {val['n']} exams ({val['n_pos']} positive), split '{val['split']}'.\n"
        f"- Kept: {extra['selected']} (epoch {extra['best_epoch']}): validation AUC {_fmt(metrics.get('auc'))}, "
        f"AP {_fmt(metrics.get('ap'))}, accuracy {_fmt(metrics.get('accuracy'))} at p >= 0.5.\n"
        f"- Machine: {extra['machine']}.\n"
        "- Research use only: not a medical device.\n"
    )
