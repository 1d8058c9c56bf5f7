"""Option groups of the edit commands' help (cloup): which group each option is shown in.

    @main.command(cls=EditCommand)     # inpaint, outpaint, restyle, edit
    def inpaint(...): ...

The commands build their options as usual (`mlx_edit.cli.main.edit_options`, the
conditioning, LoRA and prompt-cache options); `EditCommand` sorts them into the named
groups of GROUPS, in its order, and cloup formats the help. A command only has the
options of its mode (mlx_edit.options.FIELDS), so a group shows only what it uses; an
option in no group lands in cloup's "Other options" (with --help).
"""

from __future__ import annotations

import cloup

# group title -> the options (parameter names) it shows, in order. The first screen of
# `inpaint --help` holds the first groups: what every edit needs.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Image and mask", ("image", "images", "reference", "mask", "mask_point", "mask_negative",
                        "mask_box", "mask_text", "mask_threshold", "mask_instances", "left",
                        "right", "top", "bottom", "overlap")),
    ("Prompt", ("prompt", "negative_prompt", "true_cfg_scale", "prompt_2",
                "max_sequence_length")),
    ("Output", ("output", "num_images", "seed", "width", "height", "keep_size",
                "auto_resize", "metadata", "overwrite")),
    ("Model", ("model", "transformer", "lora", "quantize", "segment_model",
               "text_segment_model")),
    ("Quality", ("steps", "guidance", "strength", "grow_mask", "feather", "soft_mask",
                 "paste_back", "color_match", "blend", "seam_fix", "rank", "keep_best",
                 "rank_model")),
    ("Restyle control", ("control_image", "control_type", "canny_low", "canny_high")),
    ("Large canvases", ("crop_to_mask", "tile_mode", "max_model_pixels", "tile_overlap",
                        "window_batch", "detail_pass", "global_pass")),
    ("Performance", ("low_memory", "cache", "prompt_cache", "prompt_cache_gb",
                     "no_prompt_cache")),
    ("ControlNet, IP-Adapter, Redux (repeatable: one group per model)", (
        "controlnet", "control_image", "control_type", "control_mode", "control_scale",
        "control_start", "control_end", "canny_low", "canny_high", "ip_adapter", "ip_image",
        "ip_scale", "redux", "redux_image", "redux_strength")),
)
# restyle's --control-image/--control-type are its own; inpaint's and outpaint's options of
# the same names belong to their repeatable ControlNets.
RESTYLE_ONLY, CONDITIONING = GROUPS[5][0], GROUPS[-1][0]
TITLES = {("outpaint", "Image and mask"): "Image and new area"}  # per command titles


def group_of(command: str) -> dict[str, tuple[int, int, str]]:
    """parameter name -> (group index, position, group title) for `command`."""
    out = {}
    for g, (title, names) in enumerate(GROUPS):
        if title == (CONDITIONING if command == "restyle" else RESTYLE_ONLY):
            continue
        for i, name in enumerate(names):
            out.setdefault(name, (g, i, TITLES.get((command, title), title)))
    return out


class EditCommand(cloup.Command):
    """A cloup command showing its options in GROUPS (module doc)."""

    def __init__(self, name: str | None = None, *args, params=None, **kwargs):
        where = group_of(name or "")
        groups: dict[str, cloup.OptionGroup] = {}
        params = list(params or [])
        for p in params:
            if p.name in where:
                title = where[p.name][2]
                p.group = groups.setdefault(title, cloup.OptionGroup(title))
        params.sort(key=lambda p: where.get(p.name, (len(GROUPS), 0))[:2])
        super().__init__(name, *args, params=params, **kwargs)


# The top-level help lists the commands in these sections.
SECTIONS = {"edit": cloup.Section("Edit a photo"),
            "many": cloup.Section("Many edits"),
            "models": cloup.Section("Models")}

# Help pages fit an 80-column terminal; option names take at most a third of it.
CONTEXT = {"formatter_settings": cloup.HelpFormatter.settings(max_width=100,
                                                               col1_max_width=30)}
