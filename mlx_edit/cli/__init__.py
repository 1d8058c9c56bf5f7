"""The `mlx-edit` command line: one module per command group; heavy imports inside commands."""

from mlx_edit.cli.main import main

__all__ = ["main"]
