"""Grad-CAM saliency of the csPCa class, mapped back onto the AxT2 input's own grid for overlay.

MONAI's ``GradCAM`` on a middle stage of the EfficientNet (default ``_blocks.4``, stride 16: 16 x 16 x 2 cells on the
paper's 256 x 256 x 32 grid, 4 x 4 x 2 on the demo's 64 x 64 x 32; the last stage, stride 32, would give one cell
through-plane). MONAI upsamples the map to the classifier grid and scales it to [0, 1] (0 = no evidence for csPCa);
:func:`saliency_on_input_grid` then resamples it (linear, 0 outside the classifier's field of view) onto the AxT2
volume the user gave, so it overlays in Slicer without registration.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.volume import NIFTI_DESCRIP_KEY, Volume, resample_to_grid

__all__ = ["DEFAULT_LAYER", "grad_cam", "saliency_on_input_grid"]

#: The EfficientNet stage whose activations Grad-CAM weighs (stride 16).
DEFAULT_LAYER = "_blocks.4"


def grad_cam(network: nn.Module, x: torch.Tensor, *, layer: str = DEFAULT_LAYER, class_index: int = 1) -> np.ndarray:
    """Grad-CAM map (X, Y, Z) in [0, 1] of ``class_index`` for one input ``x`` (1, C, X, Y, Z).

    Raises:
        ValueError: ``layer`` is not a module of ``network`` (the message lists the stages).
    """
    from monai.visualize import GradCAM

    names = {name for name, _ in network.named_modules()}
    if layer not in names:
        stages = sorted(n for n in names if n.startswith("_blocks.") and n.count(".") == 1)
        raise ValueError(f"no layer {layer!r} in the classifier; choose one of {stages} or '_conv_head'")
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad():
            cam = GradCAM(nn_module=network, target_layers=layer)
            out = cam(x.detach().clone().requires_grad_(False), class_idx=class_index)
    finally:
        network.train(was_training)
    array = out.detach().float().cpu().numpy()[0, 0]
    return np.nan_to_num(array, nan=0.0).astype(np.float32)


def saliency_on_input_grid(saliency: np.ndarray, classifier_grid: Volume, axt2: Volume) -> Volume:
    """The map (X, Y, Z) on ``classifier_grid``'s geometry resampled onto the AxT2 input ``axt2``'s grid."""
    on_grid = Volume(saliency.astype(np.float32), classifier_grid.spacing, classifier_grid.origin,
                     classifier_grid.direction.copy(), {})
    out = resample_to_grid(on_grid, axt2, interpolation="linear", default_value=0.0)
    return Volume(np.clip(out.array, 0.0, 1.0).astype(np.float32), out.spacing, out.origin, out.direction,
                  {NIFTI_DESCRIP_KEY: "CCELLA Grad-CAM saliency of csPCa (0-1)"})
