"""The prompt-cache options every editing command shares (inpaint, outpaint, restyle,
edit, batch): the on-disk cache of prompt embeddings (mlx_edit.editing.prompt_cache) is on by
default, so a prompt already encoded never loads T5-XXL or CLIP again.

The folder defaults to $MLX_EDIT_PROMPT_CACHE, else ~/.cache/mlx-edit/prompts.
"""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_FOLDER = Path("~/.cache/mlx-edit/prompts")
ENV = "MLX_EDIT_PROMPT_CACHE"


def prompt_cache_options(f):
    """--prompt-cache DIR, --prompt-cache-gb, --no-prompt-cache on a click command."""
    for opt in reversed([
        click.option("--prompt-cache", type=click.Path(path_type=Path, file_okay=False),
                     default=DEFAULT_FOLDER, envvar=ENV, show_default=True,
                     show_envvar=True, help="Folder of cached prompt embeddings."),
        click.option("--prompt-cache-gb", type=click.FloatRange(0, min_open=True), default=2.0,
                     show_default=True, help="Size bound of the prompt cache folder."),
        click.option("--no-prompt-cache", is_flag=True,
                     help="Neither read nor write cached prompt embeddings."),
    ]):
        f = opt(f)
    return f


def open_prompt_cache(opts: dict):
    """The PromptCache the options ask for (popped from `opts`), or None with
    --no-prompt-cache. Raises InputError when the folder cannot be created."""
    folder, gb, off = (opts.pop(k) for k in ("prompt_cache", "prompt_cache_gb",
                                             "no_prompt_cache"))
    if off:
        return None
    from mlx_edit.editing.prompt_cache import PromptCache

    return PromptCache(folder, int(gb * 2**30))


def cache_stats(cache) -> dict:
    """The run's prompt-cache lookups for its stats (hits: the text encoders were not
    loaded for that prompt); {} without a cache."""
    if cache is None:
        return {}
    return {"prompt_cache_hits": cache.hits, "prompt_cache_misses": cache.misses}
