"""Networks and their wrappers: the text encoder, autoencoder, diffusion U-Net, class adapter and classifier.

Import the submodule you need (``from CCELLACore.models.text_encoder import TextEncoder``); this package imports
nothing heavy itself, so that ``ccella --help`` and the data jobs start without torch or transformers.
"""
