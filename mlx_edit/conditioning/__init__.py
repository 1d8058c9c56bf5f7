"""Conditioners: prepared before the denoise loop, attached to the job by the pipeline."""
