"""Joint training loss of the CCELLA LDM: L1 denoising loss + weighted focal loss on the adapter's class logits.

The authors' code (`diff_model_train_all.py`): ``L1(eps_pred, eps) + 1e-4 * focal``, where the focal
target is the one-hot label **x100** (its x100 conditioning transform also hit the label). MONAI's softmax focal loss,
``-alpha_c (1 - p_c)^gamma log(p_c) * target_c``, is linear in the target (the focusing factor depends on the
prediction only), so that is exactly ``1e-2 * focal(one-hot)``. The ``paper`` weight is therefore 1e-2 on a one-hot
target: the same objective, written plainly (docs/paper.md, "The class loss weight").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss

__all__ = ["LossConfig", "PAPER_CLASS_LOSS_WEIGHT", "ccella_loss", "class_focal_loss"]

#: Reference weight 1e-4 on a one-hot x100 target == 1e-2 on a one-hot target (softmax focal loss is linear in it).
PAPER_CLASS_LOSS_WEIGHT = 1e-2


@dataclass(frozen=True)
class LossConfig:
    """Joint loss settings; defaults are the paper's.

    Attributes:
        class_loss_weight: weight of the class focal loss on a one-hot target (reference: 1e-4 on one-hot x100).
        focal_alpha: alpha of MONAI's softmax focal loss: class weights [1 - alpha, alpha] = [0.25 negative,
            0.75 positive] for two classes.
        focal_gamma: focusing exponent.
        lesion_weight: extra weight of the denoising loss inside annotated lesions (paper 0: none). A latent voxel
            counts ``1 + lesion_weight * f``, f = the fraction of its image voxels inside the lesion mask. Lesions fill
            well under 1% of a volume, so a plain mean spends almost all of a short training run on anatomy; the
            weight makes the report's lesion worth learning early. Exams without a lesion mask count 1 everywhere.
        side_loss_weight: weight of the cross-entropy of the side head (``unet.side_map``; paper: no head) against
            the side of the exam's lesion mask (:func:`~CCELLACore.training.latents.lesion_sides`). Exams without a
            lesion mask or a report, and condition-dropped items, are left out of it.
    """

    class_loss_weight: float = PAPER_CLASS_LOSS_WEIGHT
    focal_alpha: float = 0.75
    focal_gamma: float = 2.0
    lesion_weight: float = 0.0
    side_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.class_loss_weight < 0:
            raise ValueError(f"class_loss_weight must be >= 0, got {self.class_loss_weight}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.lesion_weight < 0:
            raise ValueError(f"lesion_weight must be >= 0, got {self.lesion_weight}")
        if self.side_loss_weight < 0:
            raise ValueError(f"side_loss_weight must be >= 0, got {self.side_loss_weight}")


def class_focal_loss(
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    has_report: torch.Tensor,
    focal_alpha: float = 0.75,
    focal_gamma: float = 2.0,
    class_count: float | None = None,
) -> torch.Tensor:
    """Softmax focal loss on a one-hot target, summed over classes, averaged over the exams with a report.

    Args:
        class_logits: (B, num_classes).
        labels: (B,) long class indices (0 = csPCa negative, 1 = positive).
        has_report: (B,) bool; False for exams without a report and for condition-dropped items.
        class_count: the number of exams the sum is divided by (default: this batch's exams with a report). Under
            DDP, pass (global count / world size) so that DDP's gradient mean equals the global batch's mean.

    Returns:
        Scalar; exactly 0 (with a gradient path) when no exam in the batch has a report.
    """
    batch, num_classes = class_logits.shape
    if labels.shape != (batch,) or has_report.shape != (batch,):
        raise ValueError(
            f"labels and has_report must be ({batch},), got {tuple(labels.shape)} and {tuple(has_report.shape)}"
        )
    target = F.one_hot(labels.long(), num_classes).to(class_logits.dtype)
    focal = FocalLoss(use_softmax=True, gamma=focal_gamma, alpha=focal_alpha, reduction="none")
    per_exam = focal(class_logits, target).sum(dim=1)  # (B,)
    weights = has_report.to(per_exam.dtype)
    # clamp: an all-null batch gives 0 / 1 = 0 rather than NaN
    count = weights.sum() if class_count is None else torch.as_tensor(float(class_count))
    return (per_exam * weights).sum() / count.clamp(min=1.0 if class_count is None else 1e-12)


def ccella_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    has_report: torch.Tensor,
    class_loss_weight: float = PAPER_CLASS_LOSS_WEIGHT,
    focal_alpha: float = 0.75,
    focal_gamma: float = 2.0,
    class_count: float | None = None,
    voxel_weight: torch.Tensor | None = None,
    side_logits: torch.Tensor | None = None,
    side_labels: torch.Tensor | None = None,
    side_mask: torch.Tensor | None = None,
    side_loss_weight: float = 0.0,
    side_count: float | None = None,
) -> dict[str, torch.Tensor]:
    """Joint loss ``total = denoise + class_loss_weight * cls (+ side_loss_weight * side)``.

    Args:
        prediction: (B, C, X, Y, Z) U-Net output.
        target: (B, C, X, Y, Z) its target (noise or velocity).
        class_logits: (B, num_classes) adapter logits.
        labels: (B,) long exam classes.
        has_report: (B,) bool, exams whose (non-dropped) report was given to the adapter.
        class_loss_weight: weight on the one-hot focal loss (paper 1e-2).
        class_count: see :func:`class_focal_loss`.
        voxel_weight: (B, 1, X, Y, Z) weight per latent voxel (:attr:`LossConfig.lesion_weight`); the denoising loss
            is then the mean of ``weight * L1`` (divided by the voxel count, not the weights' sum, so that it stays a
            per-exam mean and DDP ranks need no shared normaliser).
        side_logits / side_labels / side_mask: (B, 3), (B,) long and (B,) bool: the side head, the side of each
            exam's lesion mask and which exams count; ``side_count`` as ``class_count``.

    Returns:
        ``{"total", "denoise", "cls"}`` scalars (and ``"side"`` with side logits); ``denoise`` is the (weighted) mean
        L1, ``cls`` the unweighted focal loss, ``side`` the unweighted mean cross-entropy.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if voxel_weight is None:
        denoise = F.l1_loss(prediction.float(), target.float())
    else:
        denoise = (voxel_weight.float() * (prediction.float() - target.float()).abs()).mean()
    cls = class_focal_loss(class_logits.float(), labels, has_report, focal_alpha, focal_gamma, class_count)
    losses = {"total": denoise + class_loss_weight * cls, "denoise": denoise, "cls": cls}
    if side_logits is not None:
        per_exam = F.cross_entropy(side_logits.float(), side_labels.long(), reduction="none")
        weights = side_mask.to(per_exam.dtype)
        count = weights.sum().clamp(min=1.0) if side_count is None else torch.as_tensor(max(float(side_count), 1e-12))
        losses["side"] = (per_exam * weights).sum() / count
        losses["total"] = losses["total"] + side_loss_weight * losses["side"]
    return losses
