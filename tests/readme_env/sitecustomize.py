"""Loaded by every Python process that tests/test_readme.py starts (this folder leads its
PYTHONPATH), so that the README's examples take seconds on the tiny fixture: the models'
default step counts become 2 (an example that names its steps keeps them) and FLUX.1
Kontext's preferred resolutions (about 1 MP) are divided by 8. Nothing else changes."""

import os

if os.environ.get("MLX_EDIT_README_TEST"):
    import dataclasses

    import mlx_edit.conditioning.kontext as _kontext
    from mlx_edit import variants as _variants

    _variants.VARIANTS = {name: dataclasses.replace(v, steps=2)
                          for name, v in _variants.VARIANTS.items()}
    _kontext.PREFERRED_RESOLUTIONS = tuple(
        (max(16, w // 8 // 16 * 16), max(16, h // 8 // 16 * 16))
        for w, h in _kontext.PREFERRED_RESOLUTIONS)
