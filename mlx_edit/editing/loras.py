"""FluxPipeline's LoRAs: load, rescale and unload adapters by name.

`LoRAMixin` keeps `loras` ({name: mlx_edit.weights.lora.LoadedLoRA}); the transformer
property (mlx_edit.editing.components.ModelsMixin) applies them unfused to every transformer it
loads (`weights.lora.sync`), so they survive low_memory reloads and quantized models. File
formats and key names: mlx_edit.weights.lora; the adapter layers: mlx_edit.models.lora.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlx_edit.imaging.images import InputError
from mlx_edit.models.flux import FluxTransformer
from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
from mlx_edit.weights import lora as lora_files
from mlx_edit.weights.core import WeightLoadError


class LoRAMixin:
    """LoRA methods of FluxPipeline. Expects `loras` (set in FluxPipeline.__init__),
    `components`, `transformer` and `transformer_config` (mlx_edit.editing.components.ModelsMixin).
    """

    loras: dict[str, lora_files.LoadedLoRA]

    def load_lora(self, source: str | Path, scale: float = 1.0, name: str | None = None,
                  *, weight_name: str | None = None) -> str:
        """Apply a FLUX LoRA (any format diffusers reads; mlx_edit.weights.lora) unfused,
        on float or quantized transformers, summed with those already loaded. A BFL
        control LoRA (FLUX.1-Canny/Depth-dev-lora) makes FLUX.1-dev the control variant
        (mlx_edit.weights.lora_control); CLIP-L parts apply to the text encoder
        (mlx_edit.weights.lora_text).

        source: a .safetensors file, a Hugging Face repo id (`owner/name`, with
        `weight_name` or as `owner/name:file.safetensors`). Returns the adapter's name
        (default: the file's stem). Raises WeightLoadError for unreadable files, keys
        that map to no layer (named), layers the model lacks and text-encoder layers on
        FLUX.2 (named; diffusers' Flux2LoraLoaderMixin loads the transformer only),
        InputError for a name in use or a scale that is not finite or beyond +-100 (before
        any file is read); on error nothing is applied.
        """
        scale = lora_files.check_scale(scale)
        if name in self.loras:
            raise InputError(f"a LoRA named {name!r} is already loaded: unload it first")
        lora = lora_files.load_lora_file(source, weight_name)
        config = self.components.config("transformer")
        if isinstance(config, Flux2Config) and lora.text_parts:
            # diffusers' Flux2LoraLoaderMixin loads the transformer only; never "0 layers"
            raise WeightLoadError(
                f"{source}: text-encoder LoRA layers ({', '.join(sorted(lora.text_parts))}) "
                "do not apply to FLUX.2 (its LoRAs change the transformer only): remove them")
        name = name or lora_files.default_name(source, self.loras)
        loaded = lora_files.LoadedLoRA(lora, str(source), float(scale))
        # Check on the base's structure (lazy, no weights) with the others before recording.
        probe = _structure(config)
        lora_files.sync(probe, {**self.loras, name: loaded}, check_only=True)
        self.loras[name] = loaded
        if "transformer" in self.components.resident:
            try:
                self.transformer  # noqa: B018  (applies it now)
            except Exception:
                del self.loras[name]
                raise
        return name

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Change loaded LoRAs' strengths by name, without reloading (InputError for
        unknown names and bad scales, nothing changed then)."""
        unknown = sorted(set(scales) - set(self.loras))
        if unknown:
            raise InputError(f"no LoRA named {', '.join(unknown)} is loaded "
                             f"(loaded: {', '.join(self.loras) or 'none'})")
        checked = {n: lora_files.check_scale(v, f"scale of LoRA {n!r}")
                   for n, v in scales.items()}  # all checked before any is changed
        for n, value in checked.items():
            self.loras[n].scale = value

    def unload_loras(self, names: Sequence[str] | None = None) -> None:
        """Remove LoRAs by name (all when None); the base transformer is restored exactly
        (a control LoRA's widened img_in, replaced norms and in_channels too)."""
        for n in list(self.loras) if names is None else names:
            self.loras.pop(n, None)
        if "transformer" in self.components.resident:
            self.transformer  # noqa: B018  (removes them now)


def _structure(config):
    """A lazy transformer of `config` (FLUX.1 or FLUX.2; no weights evaluated) to check
    LoRAs against before recording them."""
    return (Flux2Transformer if isinstance(config, Flux2Config) else FluxTransformer)(config)
