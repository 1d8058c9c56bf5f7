"""`python -m convert SOURCE DEST ...`: the `mlx-edit convert` command, standalone."""

from __future__ import annotations

from mlx_edit.cli.convert import main

if __name__ == "__main__":
    main(prog_name="python -m convert")
