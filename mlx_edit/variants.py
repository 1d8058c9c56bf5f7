"""The transformer variants of both model families (FLUX.1 and FLUX.2 [klein]) as data:
one table, read by the pipeline, the loaders, the CLI and the memory estimate. What a
family does differently (text encoders, latent normalisation, position ids) is its entry
in mlx_edit.families; a variant names its family.

A variant is told apart by its transformer's `in_channels` (the width of `x_embedder`)
and, where two share a width (dev and Kontext: 64), by the pipeline class named in the
checkpoint's `model_index.json` (diffusers) or by the entry the user picked. Adding a
variant is one entry here plus its conditioner (mlx_edit/conditioning/). A BFL control
LoRA loaded onto FLUX.1-dev widens its input to 128 channels, so the pipeline's effective
config (mlx_edit.weights.lora_control.effective_config) identifies it as "control".

Defaults are the references': Fill from diffusers `FluxFillPipeline` / BFL `cli_fill`
(50 steps, guidance 30); Canny/Depth from BFL `cli_control` (50 steps, guidance 30 for
canny, 10 for depth); Kontext from diffusers `FluxKontextPipeline` (28 steps) with BFL
`cli_kontext`'s guidance 2.5 (diffusers' 3.5 was set for text-to-image). FLUX.2 [klein]
from diffusers `Flux2KleinPipeline` (pipelines/flux2/pipeline_flux2_klein.py): the
distilled models run 4 steps and ignore guidance (`is_distilled`); the Base models run 50
steps with true classifier-free guidance at `guidance` 4.0 (an empty negative prompt).
The KV variant (klein 9B-KV, diffusers `Flux2KleinKVPipeline`,
pipeline_flux2_klein_kv.py: same transformer config, told apart by the pipeline class
alone) runs 4 steps without CFG; its reference tokens attend only to themselves, so their
keys/values are computed at the first step and reused (`reference_kv`).
A folder's family and variant come from its model_index.json (`_class_name`,
`is_distilled`).
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
    family: "flux1" or "flux2" (mlx_edit.families). distilled: guidance is not used as
      true CFG (FLUX.2 [klein]'s `is_distilled`); False: `guidance` > 1 is the true-CFG
      scale with an empty negative prompt (klein Base).
    refuses: EditOptions fields this variant does not take (set to anything but their
      default: InputError naming the field, `EditOptions.for_mode`).
    reference_kv: reference tokens attend only to themselves, their keys/values computed
      once per edit and reused at every step (FLUX.2 [klein] KV,
      `Flux2Transformer.reference_kv`; mlx_edit.sampling.compiled.step_inputs).
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
    family: str = "flux1"
    distilled: bool = True
    refuses: tuple[str, ...] = ()
    reference_kv: bool = False


KLEIN_PIPELINES = ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline")
# FLUX.1's image prompts, ControlNets, two-pass refinement, seam repair and ranking (FluxFill's passes), Kontext's true_cfg_scale and
# auto_resize: not klein's. A distilled klein has no true CFG: no negative prompt either.
KLEIN_REFUSES = ("ip_adapters", "redux", "controlnets", "detail_pass", "global_pass",
                 "seam_fix", "rank", "keep_best", "true_cfg_scale", "auto_resize")
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
    Variant("klein", "FLUX.2 [klein]", "black-forest-labs/FLUX.2-klein-4B", 128, False, 4,
            1.0, "klein", ("edit", "inpaint"), KLEIN_PIPELINES, family="flux2",
            refuses=(*KLEIN_REFUSES, "negative_prompt")),
    Variant("klein-base", "FLUX.2 [klein] Base", "black-forest-labs/FLUX.2-klein-base-4B", 128,
            False, 50, 4.0, "klein", ("edit", "inpaint"), KLEIN_PIPELINES, family="flux2",
            distilled=False, refuses=KLEIN_REFUSES),
    Variant("klein-kv", "FLUX.2 [klein] KV", "black-forest-labs/FLUX.2-klein-9b-kv", 128,
            False, 4, 1.0, "klein", ("edit", "inpaint"), ("Flux2KleinKVPipeline",),
            family="flux2", refuses=(*KLEIN_REFUSES, "negative_prompt"),  # no CFG there
            reference_kv=True),
)}

# Per control type of the BFL Canny/Depth models: BFL cli_control.py's guidance.
CONTROL_GUIDANCE = {"canny": 30.0, "depth": 10.0}


def for_edit(edit: str, family: str = "flux1") -> Variant:
    """The `family`'s variant that serves pipeline method / CLI command `edit` (KeyError if
    none; FLUX.2: the distilled klein)."""
    for v in VARIANTS.values():
        if edit in v.edits and v.family == family:
            return v
    raise KeyError(edit)


def family_of(pipeline_class: str | None) -> str:
    """The family ("flux1", "flux2") of a folder whose model_index.json names
    `pipeline_class`; FLUX.1 when it names none we know (BFL files, mlx-edit folders
    of FLUX.1)."""
    for v in VARIANTS.values():
        if pipeline_class and pipeline_class in v.pipelines:
            return v.family
    return "flux1"


def for_folder(index: dict, edit: str) -> Variant:
    """The variant that runs `edit` on a folder with this model_index.json (`index`, {}
    for none: FLUX.1): FLUX.1's variant serving the edit, or for a FLUX.2 folder the one
    its pipeline class names (klein KV), else klein or klein Base by `is_distilled`.
    ValueError (a one-line message) when the folder's family has no variant serving
    `edit`."""
    cls = index.get("_class_name")
    family = family_of(cls)
    if family == "flux1":
        return for_edit(edit)
    serving = [v for v in VARIANTS.values() if v.family == family and edit in v.edits]
    if not serving:
        raise ValueError(f"{edit} needs a FLUX.1 model ({for_edit(edit).repo}); this folder "
                         f"holds a {family.replace('flux', 'FLUX.')} model "
                         f"({cls})")
    serving = [v for v in serving if cls in v.pipelines] or serving
    distilled = index.get("is_distilled")
    return ([v for v in serving if distilled is None or v.distilled == bool(distilled)]
            or serving)[0]


def identify(in_channels: int, guidance_embeds: bool = True,
             pipeline_class: str | None = None, distilled: bool | None = None
             ) -> Variant | None:
    """The variant of a transformer with these properties, or None if unknown.

    pipeline_class: `_class_name` of the folder's model_index.json, which separates
    variants of the same width (dev vs Kontext; control vs klein); without it a 64-channel
    model with guidance is taken for dev. distilled: model_index.json's `is_distilled`
    (klein vs klein Base; None: not stated, the distilled one).
    """
    matches = [v for v in VARIANTS.values()
               if v.in_channels == in_channels and v.guidance_embeds == guidance_embeds
               and v.family == family_of(pipeline_class)]
    if pipeline_class:
        named = [v for v in matches if pipeline_class in v.pipelines]
        matches = named or matches
    if distilled is not None:
        matches = [v for v in matches if v.distilled == distilled] or matches
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
