"""``ccella import-autoencoder``: a frozen autoencoder model folder from a pretrained weights file, without training.

The paper uses NVIDIA's pretrained MAISI autoencoder as it is (frozen: never trained on the prostate data). This job
makes the model folder ``ccella train-ldm --autoencoder`` takes from that weights file::

    ccella import-autoencoder --weights /models/model_maisi_autoencoder_epoch273_alternative.pt --config paper \\
        --out models/maisi_ae

The architecture comes from the config's ``autoencoder:`` section (``paper`` = MAISI's: channels 64/128/256, 2
residual blocks per level, 4 latent channels); every key and shape of the file must fit it (strict, the error lists
missing / unexpected / mismatched keys). Accepted files: a plain state dict (the MAISI file above), one nested under
``unet_state_dict`` / ``state_dict`` / ... with or without a DDP ``module.`` prefix, or ``.safetensors``; pickles are
read with ``torch.load(weights_only=True)`` only. The folder records the source file's name and SHA-256 and is
marked frozen; NVIDIA's licence applies to it as to the file, so do not redistribute it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import replace
from pathlib import Path

__all__ = ["add_arguments", "run", "import_autoencoder"]

logger = logging.getLogger("CCELLACore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path,
                        help="pretrained weights file (.pt/.pth state dict or .safetensors), e.g. NVIDIA's MAISI file")
    parser.add_argument("--config", default="paper",
                        help="config whose autoencoder: section describes the architecture (default paper = MAISI)")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_autoencoder(config, weights: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir``, an autoencoder model folder holding ``weights`` unchanged (no training step).

    Args:
        config: a :class:`~CCELLACore.settings.CCELLAConfig`; its ``autoencoder`` section is the architecture and
            ``preprocess.ldm.grid`` the grid recorded with the model (the grid the data are preprocessed to).
        weights: the weights file.
        out_dir: the model folder (replaced atomically if it is a model folder already).

    Raises:
        CCELLAError: naming the file when it is missing, a pickle that needs code execution, or does not fit the
            architecture (listing missing / unexpected / shape-mismatched keys).
    """
    from .autoencoder import build_autoencoder
    from .serialization import ModelMetadata, save_model_dir

    weights = Path(weights)
    ae_cfg = replace(config.autoencoder, weights_path=weights)
    model = build_autoencoder(ae_cfg, "cpu").eval()  # strict load: every key and shape
    grid = config.preprocess.ldm.grid
    n_params = sum(p.numel() for p in model.parameters())
    extra = {"steps": 0, "frozen": True, "initialised_from": weights.name, "source_sha256": _sha256(weights),
             "parameters": n_params}
    metadata = ModelMetadata(sequences=tuple(config.sequences), grid_size=tuple(grid.size),
                             spacing=tuple(float(s) for s in grid.spacing), text_encoder="", extra=extra)
    card = (
        "# Pretrained autoencoder (imported, frozen)\n\n"
        f"- Weights: `{weights.name}` (SHA-256 {extra['source_sha256']}), imported unchanged by "
        "`ccella import-autoencoder`; not trained on any data here.\n"
        f"- Architecture: MAISI `AutoencoderKlMaisi`, channels {list(ae_cfg.num_channels)}, residual blocks "
        f"{list(ae_cfg.num_res_blocks)}, {ae_cfg.latent_channels} latent channels, {ae_cfg.downsample_factor}x "
        f"smaller per axis; {n_params / 1e6:.2f} M parameters.\n"
        f"- Encodes each of {', '.join(metadata.sequences)} separately; data grid {metadata.grid_size} voxels at "
        f"{metadata.spacing} mm, intensities normalised to [0, 1].\n"
        "- Licence: that of the weights file (NVIDIA's for the MAISI weights); do not redistribute this folder.\n"
        "- Reconstructions are not diagnostic images.\n"
    )
    saved_cfg = replace(ae_cfg, weights_path=None)  # the weights live in the folder now
    save_model_dir(out_dir, {"autoencoder": model}, {"autoencoder": saved_cfg}, metadata, card)
    logger.info("imported %s (%.2f M parameters) into %s", weights.name, n_params / 1e6, out_dir)
    return Path(out_dir)


def run(args: argparse.Namespace) -> int:
    from ..settings import load_config

    model_dir = import_autoencoder(load_config(args.config), args.weights, args.out)
    print(f"model: {model_dir}; use it with: ccella train-ldm --autoencoder {model_dir} ...")
    return 0
