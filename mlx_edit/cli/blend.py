"""Paste-back and ranking options of `mlx-edit inpaint`: --color-match, --blend, --soft-mask,
--seam-fix, --rank, --keep-best, --rank-model.

`blend_options` adds the options to a command; `pop_blend_kwargs(opts)` removes them from
the command's keyword arguments and returns the `FluxFill.inpaint` keywords. Light
imports only (the method names live in mlx_edit.imaging.blend, numpy + Pillow).
"""

from __future__ import annotations

import click

from mlx_edit.imaging.blend import BLEND_METHODS, COLOR_MATCH_METHODS

# The pipeline's defaults (mlx_edit.pipeline.DEFAULT_COLOR_MATCH / DEFAULT_BLEND), restated
# here so `--help` does not import mlx; tests/test_blend_cli.py checks they agree.
COLOR_MATCH_DEFAULT = "mean-std"
BLEND_DEFAULT = "feather"


def blend_options(f):
    """Decorator: the paste-back options (see the module docstring)."""
    opts = [
        click.option("--color-match", type=click.Choice(COLOR_MATCH_METHODS),
                     default=COLOR_MATCH_DEFAULT, show_default=True,
                     help="Match the edit's colours to the photo's, measured in a ring "
                          "just outside the mask (Lab mean/std or histogram); fixes the "
                          "colour drift of the VAE round trip."),
        click.option("--blend", "blend_method", type=click.Choice(BLEND_METHODS),
                     default=BLEND_DEFAULT, show_default=True,
                     help="feather: soft alpha blend; poisson: seamless cloning "
                          "(OpenCV, pip install 'mlx-edit[blend]')."),
        click.option("--soft-mask", is_flag=True,
                     help="Grey levels of the mask are per-pixel strengths (differential "
                          "diffusion): darker areas change less."),
        click.option("--seam-fix", type=click.FloatRange(min=0), default=0, show_default=True,
                     metavar="PX", help="Then redraw a band of PX px each side of the mask "
                     "boundary at low strength (0.3): a second pass for stubborn seams."),
        click.option("--rank", type=click.Choice(["clip"]), default=None,
                     help="Order the --num-images candidates by CLIP similarity of the "
                          "edited region to the prompt (scores in the metadata)."),
        click.option("--keep-best", type=click.IntRange(min=1), default=None, metavar="K",
                     help="With --rank: write only the best K candidates."),
        click.option("--rank-model", default=None, metavar="REPO_OR_PATH",
                     help="Ranking CLIP (a CLIPModel folder or repo; default: the model "
                          "folder's ranker/ when present, else openai/clip-vit-large-patch14)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def pop_blend_kwargs(opts: dict) -> dict:
    """Remove the paste-back options from `opts`; return FluxFill.inpaint's keywords."""
    if opts["keep_best"] is not None and opts["rank"] is None:
        raise click.UsageError("--keep-best needs --rank clip")
    return {"color_match": opts.pop("color_match"), "blend": opts.pop("blend_method"),
            "soft_mask": opts.pop("soft_mask"), "seam_fix": opts.pop("seam_fix"),
            "rank": opts.pop("rank"), "keep_best": opts.pop("keep_best"),
            "rank_model": opts.pop("rank_model")}
