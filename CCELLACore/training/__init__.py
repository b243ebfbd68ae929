"""Training jobs and the utilities they share.

- :mod:`.precision`: ``choose_dtype``, ``autocast_context``, ``describe_device`` (bf16 only where it is native).
- :mod:`.checkpoint`: ``TrainingState``, ``save_checkpoint`` / ``load_checkpoint`` (exact resume, ``last`` and
  ``previous``, safetensors + weights-only state).
- :mod:`.ema`: ``EMA`` of network weights.
- :mod:`.distributed`: DDP set-up; :mod:`.logs`: metrics logging.

Import the submodule you need; this package imports nothing heavy itself.
"""
