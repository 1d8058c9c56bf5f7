"""Images and masks: loading, grow/feather, crop-to-mask, stitching (Pillow/numpy only)."""
