"""FluxPipeline's LoRAs: load, rescale and unload adapters by name.

`LoRAs` (`pipe.loras`) is a read-only mapping {name: mlx_edit.weights.lora.LoadedLoRA};
the pipeline's `Models` (mlx_edit.editing.components) applies it unfused to every
transformer it loads (`LoRAs.apply`), so the adapters survive low_memory reloads and
quantized models; the prompt encoder reads its CLIP-L parts (mlx_edit.editing.prompts).
File formats and key names: mlx_edit.weights.lora; the adapter layers: mlx_edit.models.lora.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.nn as nn

from mlx_edit.imaging.images import InputError
from mlx_edit.models.flux import FluxTransformer
from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
from mlx_edit.weights import lora as lora_files
from mlx_edit.weights.core import WeightLoadError

if TYPE_CHECKING:
    from mlx_edit.editing.components import Models


class LoRAs(Mapping[str, lora_files.LoadedLoRA]):
    """The LoRAs of one pipeline, by name, in load order. `load` / `unload` take the
    pipeline's `Models` to check against its transformer's structure and to re-sync a
    resident transformer at once."""

    def __init__(self) -> None:
        self._active: dict[str, lora_files.LoadedLoRA] = {}

    def __getitem__(self, name: str) -> lora_files.LoadedLoRA:
        return self._active[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._active)

    def __len__(self) -> int:
        return len(self._active)

    def apply(self, model: nn.Module) -> None:
        """Make the adapters on a transformer exactly these (mlx_edit.weights.lora.sync)."""
        lora_files.sync(model, self._active)

    def effective_config(self, config):
        """The transformer `config` with these LoRAs' changes (a control LoRA on FLUX.1-dev
        makes in_channels 128; mlx_edit.weights.lora_control)."""
        return lora_files.effective_config(config, self._active)

    @property
    def parameter_count(self) -> int:
        """The adapters' parameters together (the memory estimate counts them)."""
        return sum(x.file.parameter_count for x in self._active.values())

    def load(self, models: Models, source: str | Path, scale: float = 1.0,
             name: str | None = None, *, weight_name: str | None = None) -> str:
        """Add a LoRA for `models`' transformer: FluxPipeline.load_lora documents the
        arguments, result and errors (on error nothing is added)."""
        scale = lora_files.check_scale(scale)
        if name in self._active:
            raise InputError(f"a LoRA named {name!r} is already loaded: unload it first")
        lora = lora_files.load_lora_file(source, weight_name)
        config = models.components.config("transformer")
        if isinstance(config, Flux2Config) and lora.text_parts:
            # diffusers' Flux2LoraLoaderMixin loads the transformer only; never "0 layers"
            raise WeightLoadError(
                f"{source}: text-encoder LoRA layers ({', '.join(sorted(lora.text_parts))}) "
                "do not apply to FLUX.2 (its LoRAs change the transformer only): remove them")
        name = name or lora_files.default_name(source, self._active)
        loaded = lora_files.LoadedLoRA(lora, str(source), float(scale))
        # Check on the base's structure (lazy, no weights) with the others before recording.
        lora_files.sync(_structure(config), {**self._active, name: loaded}, check_only=True)
        self._active[name] = loaded
        if "transformer" in models.components.resident:
            try:
                models.transformer  # noqa: B018  (applies it now)
            except Exception:
                del self._active[name]
                raise
        return name

    def set_scales(self, scales: dict[str, float]) -> None:
        """Change loaded LoRAs' strengths by name, without reloading (InputError for
        unknown names and bad scales, nothing changed then)."""
        unknown = sorted(set(scales) - set(self._active))
        if unknown:
            raise InputError(f"no LoRA named {', '.join(unknown)} is loaded "
                             f"(loaded: {', '.join(self._active) or 'none'})")
        checked = {n: lora_files.check_scale(v, f"scale of LoRA {n!r}")
                   for n, v in scales.items()}  # all checked before any is changed
        for n, value in checked.items():
            self._active[n].scale = value

    def unload(self, models: Models, names: Sequence[str] | None = None) -> None:
        """Remove LoRAs by name (all when None); a resident transformer of `models` is
        restored to its base exactly (a control LoRA's widened img_in, replaced norms and
        in_channels too)."""
        for n in list(self._active) if names is None else names:
            self._active.pop(n, None)
        if "transformer" in models.components.resident:
            models.transformer  # noqa: B018  (removes them now)


def _structure(config):
    """A lazy transformer of `config` (FLUX.1 or FLUX.2; no weights evaluated) to check
    LoRAs against before recording them."""
    return (Flux2Transformer if isinstance(config, Flux2Config) else FluxTransformer)(config)
