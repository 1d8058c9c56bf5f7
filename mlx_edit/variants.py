"""The FLUX.1 transformer variants as data: one table, read by the pipeline, the loaders,
the CLI and the memory estimate.

A variant is told apart by its transformer's `in_channels` (the width of `x_embedder`)
and, where two share a width (dev and Kontext: 64), by the pipeline class named in the
checkpoint's `model_index.json` (diffusers) or by the entry the user picked. Adding a
variant is one entry here plus its conditioner (mlx_edit/conditioning/). A BFL control
LoRA loaded onto FLUX.1-dev widens its input to 128 channels, so the pipeline's effective
config (mlx_edit.weights.lora_control.effective_config) identifies it as "control".

Defaults are the references': Fill from diffusers `FluxFillPipeline` / BFL `cli_fill`
(50 steps, guidance 30); Canny/Depth from BFL `cli_control` (50 steps, guidance 30 for
canny, 10 for depth); Kontext from diffusers `FluxKontextPipeline` (28 steps) with BFL
`cli_kontext`'s guidance 2.5 (diffusers' 3.5 was set for text-to-image).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One FLUX.1 transformer variant.

    name: short id ("fill", "control", "kontext", "dev", "schnell").
    title: what an error message calls it. repo: the reference Hugging Face repo.
    in_channels: transformer input width: 64 packed latent channels + the conditioning's.
    guidance_embeds: whether the model takes the distilled guidance value.
    steps / guidance: default number of steps and guidance.
    conditioner: how the extra input is built ("fill": masked image + mask channels,
      "bfl_control": control-image latent channels, "kontext": reference tokens appended
      to the sequence, "none": text-to-image).
    edits: the pipeline methods (and CLI commands) this variant serves.
    pipelines: diffusers pipeline class names whose folders hold this variant.
    alternative: another way to get it, for messages (", or ...").
    """

    name: str
    title: str
    repo: str
    in_channels: int
    guidance_embeds: bool
    steps: int
    guidance: float
    conditioner: str
    edits: tuple[str, ...]
    pipelines: tuple[str, ...] = ()
    alternative: str = ""


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fill", "FLUX.1 Fill", "black-forest-labs/FLUX.1-Fill-dev", 384, True, 50, 30.0,
            "fill", ("inpaint", "outpaint"), ("FluxFillPipeline",)),
    Variant("control", "FLUX.1 Canny or Depth control", "black-forest-labs/FLUX.1-Canny-dev",
            128, True, 50, 30.0, "bfl_control", ("restyle",),
            ("FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline"),
            ", or FLUX.1-dev with a BFL control LoRA such as "
            "black-forest-labs/FLUX.1-Canny-dev-lora (load_lora / --lora)"),
    Variant("dev", "FLUX.1 dev", "black-forest-labs/FLUX.1-dev", 64, True, 28, 3.5, "none", (),
            ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")),
    Variant("kontext", "FLUX.1 Kontext", "black-forest-labs/FLUX.1-Kontext-dev", 64, True, 28,
            2.5, "kontext", ("edit",),
            ("FluxKontextPipeline", "FluxKontextInpaintPipeline")),
    Variant("schnell", "FLUX.1 schnell", "black-forest-labs/FLUX.1-schnell", 64, False, 4, 0.0,
            "none", ()),
)}

# Per control type of the BFL Canny/Depth models: BFL cli_control.py's guidance.
CONTROL_GUIDANCE = {"canny": 30.0, "depth": 10.0}


def for_edit(edit: str) -> Variant:
    """The variant that serves pipeline method / CLI command `edit` (KeyError if none)."""
    for v in VARIANTS.values():
        if edit in v.edits:
            return v
    raise KeyError(edit)


def identify(in_channels: int, guidance_embeds: bool = True,
             pipeline_class: str | None = None) -> Variant | None:
    """The variant of a transformer with these properties, or None if unknown.

    pipeline_class: `_class_name` of the folder's model_index.json, which separates
    variants of the same width (dev vs Kontext); without it a 64-channel model with
    guidance is taken for dev.
    """
    matches = [v for v in VARIANTS.values()
               if v.in_channels == in_channels and v.guidance_embeds == guidance_embeds]
    if pipeline_class:
        named = [v for v in matches if pipeline_class in v.pipelines]
        matches = named or matches
    return matches[0] if matches else None


def describe(in_channels: int, guidance_embeds: bool = True,
             pipeline_class: str | None = None) -> str:
    """Human name of a transformer variant ("FLUX.1 Fill", ...) for messages."""
    v = identify(in_channels, guidance_embeds, pipeline_class)
    return v.title if v else f"an unknown FLUX variant (in_channels {in_channels})"


def accepted_in_channels(*names: str, pipeline_class: str | None = None) -> tuple[int, ...]:
    """The in_channels of the named variants (for the loader's kind check). A named variant
    that serves no edit itself (dev: a base for control LoRAs) does not make its width
    accepted for a folder whose pipeline_class names another variant of that width
    (FluxFill takes FLUX.1-dev, 64, but not a Kontext folder, also 64)."""
    other = {v.in_channels for v in VARIANTS.values()
             if pipeline_class in v.pipelines and v.name not in names}
    return tuple(dict.fromkeys(VARIANTS[n].in_channels for n in names
                               if VARIANTS[n].edits or VARIANTS[n].in_channels not in other))
