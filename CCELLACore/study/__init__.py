"""The domain-adaptation study (``ccella domain-adaptation``): classifiers pretrained on Institution 1's real or
synthetic exams, fine-tuned on shrinking fractions of Institution 2, compared with training from scratch.

Modules:

- :mod:`.config`: the study's YAML (``CCELLACore/configs/study_*.yaml``) as frozen dataclasses.
- :mod:`.runner`: data, synthetic twins, nested fractions and the resumable cells (one training run + evaluation each),
  built on :mod:`CCELLACore.classifier` (``train_classifier``, ``prepare_studies``, ``predict_cases``).
- :mod:`.report`: table (mean +- SD over trials), paired statistics and figures.
- :mod:`.stats`: fast DeLong (Sun & Xu 2014) and the paired bootstrap for AP.
- :mod:`.cli`: the command.

The decisions behind them are written in ``docs/study.md``.
"""
