"""One-line errors for every `mlx-edit` command.

Every error a user can cause (a click usage error, `InputError`, `WeightLoadError`,
`ConversionError`, an OS error such as a full disk) is printed as ONE line,
`Error: <message>`, on stderr, with exit status 2: no click Usage/Try banner, no
traceback. Ctrl-C prints `Error: interrupted` (status 130). Anything else is a bug:
one line naming the exception, status 1. `MLX_EDIT_DEBUG=1` re-raises instead, so
the traceback shows. Warnings print as `Warning: <message>` (no source path).

    @click.group(cls=OneLineGroup)          # or @click.command(cls=OneLineCommand)
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import click
import cloup

USAGE_EXIT = 2
INTERRUPTED_EXIT = 130
BUG_EXIT = 1
# Our documented exception types, by module and name: importing them here would load
# mlx for `--help`; they are looked up among the modules already imported.
_USER_ERRORS = (("mlx_edit.imaging.images", "InputError"),
                ("mlx_edit.weights.core", "WeightLoadError"),
                ("mlx_edit.weights.convert", "ConversionError"))


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def _user_error_types() -> tuple[type, ...]:
    found = [getattr(sys.modules[mod], name) for mod, name in _USER_ERRORS
             if mod in sys.modules and hasattr(sys.modules[mod], name)]
    return (click.ClickException, OSError, *found)


def _fail(message: str, status: int) -> None:
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(status)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {one_line(message)}", err=True)


@contextlib.contextmanager
def _plain_warnings():
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


def _message(e: BaseException) -> str:
    if isinstance(e, click.ClickException):
        return e.format_message()
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def run_one_line(invoke) -> None:
    """Run `invoke()` (a click main in non-standalone mode) and exit with its status,
    turning every error into one line (module doc)."""
    debug = os.environ.get("MLX_EDIT_DEBUG", "") not in ("", "0")
    with _plain_warnings():
        try:
            rv = invoke()
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            if debug:
                raise
            _fail("interrupted", INTERRUPTED_EXIT)
        except Exception as e:
            if debug:
                raise
            if isinstance(e, _user_error_types()):
                _fail(_message(e), USAGE_EXIT)
            _fail(f"internal error: {type(e).__name__}: {e} (MLX_EDIT_DEBUG=1 shows the "
                  "traceback; please report it)", BUG_EXIT)
    sys.exit(rv if isinstance(rv, int) else 0)


class _OneLine:
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        run_one_line(lambda: super(_OneLine, self).main(
            args, prog_name, complete_var, standalone_mode=False, **extra))


class OneLineGroup(_OneLine, cloup.Group):
    """A (cloup) click group whose errors are one line (module doc)."""


class OneLineCommand(_OneLine, click.Command):
    """A click command whose errors are one line (module doc)."""
