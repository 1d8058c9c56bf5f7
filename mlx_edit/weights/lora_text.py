"""CLIP-L text-encoder LoRAs: the names FLUX LoRA files give them, and their application to
our CLIP text tower (`mlx_edit.models.clip.CLIPTextModel`, fused q/k/v `qkv_proj`).

Names (diffusers `loaders/lora_conversion_utils.py`: `_convert_kohya_flux_lora_to_diffusers`
maps kohya's `lora_te1_text_model_encoder_layers_N_self_attn_q_proj` (alpha/rank folded)
to PEFT's `text_encoder.text_model.encoder.layers.N.self_attn.q_proj` (or without
`text_model.`); `load_lora_weights`
loads both into the pipeline's `text_encoder`, and `set_adapters` weights scale them as
the transformer's). q, k and v become parts of our fused projection at their row offsets
(`mlx_edit.models.lora.combine`: exact). The pooled prompt vector is all FLUX reads of
CLIP, so the LoRA reaches the image through it. T5 LoRA keys are not applied (a warning;
`mlx_edit.weights.lora.IGNORED`).

A pipeline loads CLIP for each new prompt and frees it after encoding: `with_text_loras`
attaches the loaded LoRAs to that fresh model, and `text_key` makes the LoRAs (and their
scales) part of the prompt-cache keys, so rescaling re-encodes.
"""

from __future__ import annotations

from collections.abc import Mapping

# Our CLIP layer paths in a LoRAFile's parts start with this.
TEXT = "text_encoder."

_L = "encoder.layers.{i}."
_O = TEXT + "encoder.layers.{i}."
# (module in the file, our layer, output offset in units of the hidden size)
CLIP_NAMES: tuple[tuple[str, str, int], ...] = (
    *((_L + f"self_attn.{c}_proj", _O + "self_attn.qkv_proj", k) for k, c in enumerate("qkv")),
    (_L + "self_attn.out_proj", _O + "self_attn.out_proj", 0),
    (_L + "mlp.fc1", _O + "mlp.fc1", 0),
    (_L + "mlp.fc2", _O + "mlp.fc2", 0),
)
# kohya's CLIP-L prefixes (lora_te_ in single-encoder files); PEFT's, with or without the
# `text_model.` level (transformers 5's CLIPTextModel has none; diffusers strips it).
KOHYA_PREFIXES = ("lora_te1_text_model_", "lora_te_text_model_")
PEFT_PREFIXES = ("text_encoder.text_model.", "text_encoder.")


def split_parts(parts: Mapping[str, list]) -> tuple[dict, dict]:
    """({transformer layer: parts}, {CLIP layer (TEXT removed): parts}) of a LoRAFile."""
    flux = {p: v for p, v in parts.items() if not p.startswith(TEXT)}
    clip = {p.removeprefix(TEXT): v for p, v in parts.items() if p.startswith(TEXT)}
    return flux, clip


def text_key(loras: Mapping) -> tuple:
    """((name, source, scale), ...) of the LoRAs ({name: LoadedLoRA}) with CLIP parts: what
    a prompt's embeddings also depend on (empty when none has)."""
    return tuple((n, lora.source, lora.scale) for n, lora in loras.items()
                 if lora.file.text_parts)


def load_clip(root, dtype, loras: Mapping):
    """The CLIP text tower of the model folder `root` (its text_encoder/, loaded by
    mlx_edit.weights.text.load_clip_text) in `dtype` with `loras` attached
    (`with_text_loras`)."""
    from mlx_edit.weights.sources import component_dir
    from mlx_edit.weights.text import load_clip_text

    return with_text_loras(load_clip_text(component_dir(root, "text_encoder"), dtype), loras)


def with_text_loras(clip, loras: Mapping):
    """`clip` (a freshly loaded CLIPTextModel) with the CLIP parts of `loras` attached as
    unfused adapters at their scales; returned for chaining. Raises WeightLoadError
    (layers this CLIP lacks, shapes that do not fit)."""
    from mlx_edit.models import lora as adapters
    from mlx_edit.weights.core import WeightLoadError

    for name, lora in loras.items():
        if lora.file.text_parts:
            try:
                adapters.attach(clip, name, lora.file.text_updates(clip), lora.scale)
            except ValueError as e:
                raise WeightLoadError(f"LoRA {name} (CLIP text encoder): {e}") from None
    return clip
