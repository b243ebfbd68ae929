"""The csPCa classifier: a 3D EfficientNet-B0 on AxT2 (1 channel, the CCELLA setting) or AxT2, HighB and ADC
(3 channels), trained from scratch or fine-tuned, applied to exams of any geometry, explained by Grad-CAM.

Modules (each imports torch/MONAI only when used):

- :mod:`.config`: the classifier's YAML (``CCELLACore/configs/classifier_*.yaml``) as frozen dataclasses.
- :mod:`.data`: exams -> the classifier's grid and intensities; the training cache; augmentation.
- :mod:`.model`: building the network, loading a model directory.
- :mod:`.train`: ``ccella train-classifier`` (exact resume, best-AP model, DDP).
- :mod:`.classify`: ``ccella classify`` (probability of csPCa and a saliency map on the AxT2 input's grid).
- :mod:`.split`: ``ccella split`` (patient-level, label-stratified, seeded splits) and nested training fractions.
- :mod:`.metrics`: AUC, AP and threshold metrics.

The decisions behind them are written in ``docs/classifier.md``.
"""
