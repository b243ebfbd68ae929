"""Evaluation: the report-faithfulness lesion detector (image-quality metrics come with the evaluation issue)."""
