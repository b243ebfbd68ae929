"""Evaluation of a generator against real exams: fidelity (FID, KID), diversity (MS-SSIM), intensities, faithfulness
and a memorisation audit, written as one report (``ccella evaluate``; definitions in docs/evaluation.md).

Modules: :mod:`.backbones` (feature networks from local weights), :mod:`.features` (cached extraction),
:mod:`.stats` (FID, KID, bootstrap), :mod:`.diversity` (MS-SSIM, intensity table), :mod:`.faithfulness`,
:mod:`.memorisation`, :mod:`.evaluate` (the whole run), :mod:`.report` (Markdown and PNG), :mod:`.evaluate_cli`.
Nothing here imports torch at package import time.
"""
