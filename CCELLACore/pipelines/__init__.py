"""Pipelines: report -> synthetic exam (:mod:`.generation`)."""
