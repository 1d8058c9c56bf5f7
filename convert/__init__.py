"""Conversion entry points: a source checkpoint -> an mlx-edit folder, quantized or not.

    python -m convert SOURCE DEST [--quantize 4|8] [--dtype ...] [...]

The same command as `mlx-edit convert` (see `mlx_edit.cli.convert`); the library is
`mlx_edit.weights.convert.convert_checkpoint`. Nothing in `mlx_edit` imports this package.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before anything imports mlx)
from mlx_edit.weights.convert import ConversionError, convert_checkpoint

__all__ = ["ConversionError", "convert_checkpoint"]
