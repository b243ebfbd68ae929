"""``ccella replace-decoder``: put a fine-tuned decoder into a generator model folder.

A decoder fine-tuned with ``train_autoencoder.train_encoder: false`` (``ccella train-autoencoder``, starting from the
model's own autoencoder) decodes the same latents better; the diffusion model, trained on those latents, stays valid.
This job writes that autoencoder into the generator's folder in place of its own::

    ccella replace-decoder --model models/ccella --autoencoder runs/decoder_ft/model

It refuses unless the new autoencoder's encoder and latent heads equal the model's bit for bit and the architecture
and data grid are the same (anything else would change the latents the diffusion model learnt). The model folder
records the replaced autoencoder's hash (``extra.autoencoder_hash``) and where the new one came from
(``extra.decoder_fine_tuned``); its ``model_hash`` changes, so a model card's figures must be measured again
(``ccella honour --update-card``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..errors import CCELLAError

__all__ = ["add_arguments", "run", "replace_decoder"]

logger = logging.getLogger("CCELLACore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="generator model folder (changed in place)")
    parser.add_argument("--autoencoder", required=True, type=Path,
                        help="autoencoder model folder whose decoder was fine-tuned from the model's own autoencoder "
                             "(`ccella train-autoencoder` with train_autoencoder.train_encoder: false)")


def replace_decoder(model_dir: str | Path, autoencoder_dir: str | Path) -> dict:
    """Replace the ``autoencoder`` component of ``model_dir`` by that of ``autoencoder_dir``.

    Returns:
        The model folder's new ``model.json`` metadata.

    Raises:
        CCELLAError: either folder missing or unreadable, the architectures, grids or sequences differ, or any
            encoder weight differs (the message names the first differing tensor).
    """
    from .autoencoder import ENCODER_PARTS, load_autoencoder_dir
    from .serialization import add_component, component_hash

    model_dir, autoencoder_dir = Path(model_dir), Path(autoencoder_dir)
    old, old_meta = load_autoencoder_dir(model_dir)
    new, new_meta = load_autoencoder_dir(autoencoder_dir)
    for key in ("grid_size", "spacing", "sequences"):
        if list(old_meta.get(key) or []) != list(new_meta.get(key) or []):
            raise CCELLAError(f"{autoencoder_dir}: {key} {new_meta.get(key)} differs from the model's "
                              f"{old_meta.get(key)} ({model_dir})")
    old_state, new_state = old.state_dict(), new.state_dict()
    if old_state.keys() != new_state.keys() or any(old_state[k].shape != new_state[k].shape for k in old_state):
        raise CCELLAError(f"{autoencoder_dir}: another autoencoder architecture than the model's ({model_dir})")
    for name, tensor in old_state.items():
        if name.startswith(ENCODER_PARTS) and not torch.equal(tensor, new_state[name]):
            raise CCELLAError(f"{autoencoder_dir}: encoder weight {name} differs from the model's: its latents are "
                              "not the ones the diffusion model learnt; fine-tune with train_encoder: false")
    before = component_hash(model_dir, "autoencoder")
    trained = new_meta.get("extra", {})
    meta = add_component(model_dir, "autoencoder", new, extra=lambda new_hash: {
        "autoencoder_hash": new_hash,
        "decoder_fine_tuned": {"replaced_autoencoder_hash": before, "steps": trained.get("steps"),
                               "initialised_from": trained.get("initialised_from")}})
    logger.info("%s: autoencoder %s... replaced by the fine-tuned one from %s (encoder unchanged); model_hash %s...",
                model_dir, before[:12], autoencoder_dir, meta["model_hash"][:12])
    return meta


def run(args: argparse.Namespace) -> int:
    replace_decoder(args.model, args.autoencoder)
    print(f"{args.model}: decoder replaced; measure the model again (`ccella honour --model {args.model} ...`)")
    return 0
