"""Which pipeline components are in memory: loaded on demand, freed after their phase.

`FluxFill` keeps its transformer and VAE in a `Components`. By default both are loaded
once and stay. With `low_memory` each is loaded when a phase needs it and released when
that phase ends (`using`), so text encoding, VAE encode, denoising and VAE decode each
hold only their own weights: the peak is the largest component plus its activations
instead of all of them together (mlx_edit.editing.memory, `peak_low_memory`), paid for by
reading the weights again for every edit.

`Models` is the FluxPipeline component built on it (`pipe.models`): a model folder read
(by `FluxPipeline.from_pretrained`), its model family (mlx_edit.families: which loaders,
text encoders and latent normalisation), the transformer and VAE as properties loaded on demand, their
configs (known without weights), the variant the transformer is, and the memory an edit
on these models needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_edit import families, variants
from mlx_edit.imaging.images import InputError
from mlx_edit.editing.memory import MemoryEstimate, estimate, tile_threshold_gb
from mlx_edit.sampling.cache import CacheConfig
from mlx_edit.progress import report
from mlx_edit.editing.tiling import decode_auto, encode_auto
from mlx_edit.weights.core import WeightLoadError, check_headers, read_config
from mlx_edit.weights.sources import component_dir

if TYPE_CHECKING:
    from mlx_edit.editing.loras import LoRAs
from mlx_edit.weights.text import read_text_tools

# MLX keeps freed buffers in a cache for reuse; by default it may grow to the memory
# limit, so after a phase its freed weights and activations would still be held. Low
# memory caps it at 256 MB: enough to recycle the small per-step buffers (modulation,
# norms, RoPE) without going back to the allocator, while larger freed buffers are
# returned at once, so the process footprint stays near the active memory the estimate
# counts. Large activations are then re-allocated each step (a malloc on the CPU backend;
# not measured on Metal).
LOW_MEMORY_CACHE_BYTES = 256 * 2**20


def limit_cache(nbytes: int = LOW_MEMORY_CACHE_BYTES) -> int:
    """Cap MLX's buffer cache at `nbytes` for the whole process (every model, every
    pipeline) and empty it; returns the previous limit (bytes) for a caller that wants to
    restore it with `mx.set_cache_limit`."""
    previous = mx.set_cache_limit(nbytes)
    mx.clear_cache()
    return previous


class Components:
    """Named models built by their loaders on first use.

    loaders: {name: () -> nn.Module}; configs: {name: the model's config}, known without
    loading it. keep: True keeps a model once loaded (`release` is a no-op); False lets
    `release` / the end of `using` drop it and clear MLX's cache. `history` lists
    ("load" | "release", name) events in order (stats, tests).
    """

    def __init__(self, loaders: Mapping[str, Callable[[], nn.Module]],
                 configs: Mapping[str, Any], keep: bool = True):
        self._loaders, self._configs = dict(loaders), dict(configs)
        self._loaded: dict[str, nn.Module] = {}
        self.keep = keep
        self.history: list[tuple[str, str]] = []

    def config(self, name: str) -> Any:
        """The config of `name`: the loaded model's own when resident, else the one given."""
        return self._loaded[name].config if name in self._loaded else self._configs[name]

    @property
    def resident(self) -> tuple[str, ...]:
        """Names of the models in memory now."""
        return tuple(self._loaded)

    def get(self, name: str) -> nn.Module:
        """The model `name`, loaded now if it is not resident (KeyError: unknown name;
        the loader's errors, e.g. WeightLoadError, pass through)."""
        if name not in self._loaded:
            report(f"load_{name}", 0, 1)
            self._loaded[name] = self._loaders[name]()
            self.history.append(("load", name))
            report(f"load_{name}", 1, 1)
        return self._loaded[name]

    def release(self, *names: str) -> None:
        """Unless kept, drop the named models (all when none are named) and return MLX's
        cached buffers; their memory is freed once no other reference holds them."""
        if self.keep:
            return
        for name in names or tuple(self._loaded):
            if self._loaded.pop(name, None) is not None:
                self.history.append(("release", name))
        mx.clear_cache()

    @contextmanager
    def using(self, name: str, stats: dict | None = None) -> Iterator[None]:
        """The scope of a phase that needs `name`: loaded on entry (the seconds added to
        stats["load_<name>_s"] when it had to be loaded), released on exit (also on
        error) unless kept. Inside, reach the model through `get` (or the pipeline's
        property): a local reference would keep it alive after the release."""
        t0, loaded = time.perf_counter(), name in self._loaded
        self.get(name)
        if stats is not None and not loaded:
            key = f"load_{name}_s"
            stats[key] = stats.get(key, 0.0) + time.perf_counter() - t0
        try:
            yield
        finally:
            self.release(name)


class Models:
    """The models of one FluxPipeline: the folder it was read from, the family (`family`,
    with its prompt encoder `text`), the transformer and VAE on demand (`components`),
    their configs without weights, the variant, VAE encode/decode and memory estimates.

    variant_names: the names (mlx_edit.variants) the editing class runs; editor: its name (for
    messages); loras: the pipeline's mlx_edit.editing.loras.LoRAs, applied to every
    transformer load and counted in the configs and estimates.
    """

    def __init__(self, root: Path, dtype: mx.Dtype, source: str, transformer: Path, *,
                 variant_names: tuple[str, ...], editor: str, loras: LoRAs,
                 quantize: int | None = None, low_memory: bool = False):
        """Read configs, tokenizers and headers (no weights); set up `components`.
        transformer: the transformer's folder or BFL file. Raises WeightLoadError (also
        for a folder of a family `variants` do not cover)."""
        self.root, self.dtype, self.source = root, dtype, source
        self.variant_names, self.editor, self.loras = variant_names, editor, loras
        self.quantize = quantize  # bits for the transformer, T5 and ControlNets, or None
        self.low_memory = low_memory
        index, vae_dir = root / "model_index.json", component_dir(root, "vae")
        info = read_config(root, index.name) if index.is_file() else {}
        self.pipeline_class, self.distilled = info.get("_class_name"), info.get("is_distilled")
        self.family = self._own_family(variants.family_of(self.pipeline_class))
        kinds = variants.accepted_in_channels(*variant_names,
                                              pipeline_class=self.pipeline_class)
        # Configs come from config.json / tensor headers: no weights needed to plan an edit.
        f = self.family
        t_config, stored_bits = f.read_transformer_config(transformer)
        if t_config.in_channels not in kinds:
            raise WeightLoadError(self._wrong_variant(t_config))
        self.transformer_bits = stored_bits or quantize  # what the loaded transformer has
        self.components = Components(
            {"transformer": partial(f.load_transformer, transformer, dtype,
                                    expect_in_channels=kinds, quantize=quantize),
             "vae": partial(f.load_vae, vae_dir, dtype)},
            {"transformer": t_config, "vae": f.read_vae_config(vae_dir)}, keep=not low_memory)
        # damaged scheduler/tokenizer files fail here, as one WeightLoadError
        self.scheduler_config = read_text_tools(component_dir(root, "scheduler"), None, None)[0]
        self.text = f.text(root)  # the family's prompt encoder (mlx_edit.editing.prompts)
        for part in (transformer, vae_dir, *(component_dir(root, name)
                                            for name in self.text.folders)):
            check_headers(part)  # damaged files fail at load time, not mid-edit
        self.tile_threshold_gb = tile_threshold_gb()  # VAE tiling above this (GB)

    def _own_family(self, name: str) -> families.Family:
        """The family `name` when this class edits it (one of `VARIANTS` is of it), else
        WeightLoadError naming the class that does."""
        if any(variants.VARIANTS[v].family == name for v in self.variant_names):
            return families.get(name)
        wanted = {"flux1": "FluxFill or FluxKontext", "flux2": "FluxKlein"}[name]
        raise WeightLoadError(f"{self.root} holds a {families.get(name).title} model "
                              f"({self.pipeline_class}); {self.editor} does not edit "
                              f"it: use {wanted}")

    @property
    def transformer(self) -> nn.Module:
        """The family's transformer, loaded if not resident (with low_memory it is freed when
        the phase using it ends or the next edit starts; `transformer_config` needs no
        weights)."""
        model = self.components.get("transformer")
        self.loras.apply(model)  # (re)loaded models get the current LoRAs
        return model

    @property
    def vae(self) -> nn.Module:
        """The VAE, loaded if not resident (freed like `transformer`; `vae_config` needs no
        weights)."""
        return self.components.get("vae")

    @property
    def transformer_config(self) -> Any:
        """The transformer's config, known without loading its weights, with the loaded
        LoRAs' changes (`loras`; a control LoRA on FLUX.1-dev makes in_channels 128)."""
        return self.loras.effective_config(self.components.config("transformer"))

    @property
    def vae_config(self) -> Any:
        """The VAE's config, known without loading its weights."""
        return self.components.config("vae")

    @property
    def variant_info(self) -> variants.Variant:
        """The loaded transformer's variant (mlx_edit.variants), known without weights."""
        cfg = self.transformer_config
        found = variants.identify(cfg.in_channels, cfg.guidance_embeds, self.pipeline_class,
                                  self.distilled)
        ours = [variants.VARIANTS[n] for n in self.variant_names]
        same_width = [v for v in ours if v.in_channels == cfg.in_channels]
        if found not in ours and same_width:  # e.g. a BFL Kontext file: no model_index
            return same_width[0]
        return found or variants.Variant("unknown", variants.describe(cfg.in_channels), "",
                                         cfg.in_channels, cfg.guidance_embeds, 0, 0.0,
                                         "none", ())

    @property
    def variant(self) -> str:
        """The variant's name: 'fill' (FLUX.1 Fill, in_channels 384), 'control' (FLUX.1
        Canny/Depth-dev, 128), 'kontext' (64), 'klein' (FLUX.2 [klein], 128), ...
        (mlx_edit.variants)."""
        return self.variant_info.name

    def _wrong_variant(self, cfg) -> str:
        """The message for a transformer (its config: FluxConfig or Flux2Config) of a variant
        this pipeline cannot run: what was
        found, which model each of its edits needs and where to get it."""
        found = variants.describe(cfg.in_channels, cfg.guidance_embeds, self.pipeline_class)
        wants = [v for v in map(variants.VARIANTS.get, self.variant_names) if v.edits]
        need = "; ".join(f"{'/'.join(v.edits)} needs a {v.title} model ({v.repo}"
                         f"{v.alternative})" for v in wants)
        return (f"{self.source} holds a {found} transformer (in_channels {cfg.in_channels}); "
                f"{need}")

    def require(self, edit: str) -> None:
        """InputError unless the loaded transformer is a variant serving `edit`."""
        want = variants.for_edit(edit, self.family.name)
        if edit not in getattr(variants.VARIANTS.get(self.variant), "edits", ()):
            raise InputError(f"{edit} needs a {want.title} model ({want.repo}"
                             f"{want.alternative}); {self.source} is {self.variant_info.title}")

    def encode_image(self, pixels: np.ndarray, needed: np.ndarray | None = None) -> mx.array:
        """(H, W, 3) in [-1, 1] -> normalised, packed latents (1, N, C) (posterior mode;
        C = 64 for FLUX.1: scale/shift, 128 for FLUX.2: batch-norm statistics; the
        family's `to_tokens`).

        Large images go through overlapping VAE tiles (mlx_edit.editing.tiling) so activations
        stay within a few GB; needed (H/8, W/8) bool: only the tiles meeting it are
        encoded (the others' latents are 0 before normalising: `tiling.encode_tiled`)."""
        z = encode_auto(self.vae, mx.array(pixels)[None].astype(self.vae.dtype),
                        threshold_gb=self.tile_threshold_gb, needed=needed)
        return self.family.to_tokens(self.vae, z)

    def decode(self, latents: mx.array, width: int, height: int,
               needed: np.ndarray | None = None, fill: np.ndarray | None = None) -> mx.array:
        """Packed latents (B, N, C) -> images (B, H, W, 3) in [-1, 1] (float32). needed
        (H, W) bool / fill (H, W, 3): a tiled decode runs only the tiles meeting `needed`
        and takes `fill` elsewhere (mlx_edit.editing.tiling.decode_tiled)."""
        z = self.family.from_tokens(self.vae, latents, width, height)
        return decode_auto(self.vae, z, threshold_gb=self.tile_threshold_gb, needed=needed,
                           fill=fill).astype(mx.float32)

    def memory_estimate(self, width: int, height: int, num_images: int = 1,
                        cache: CacheConfig | None = None, segmenter=None, windows=None,
                        cache_branches: int = 1, **tokens) -> MemoryEstimate:
        """Estimated peak memory (GB, mlx_edit.editing.memory) of an edit on a width x height canvas
        with this pipeline's models, dtype, quantization, step cache (and SAM config;
        windows: the sampling.tiles.Windows of a tiled run, one window batch at a time;
        cache_branches: 2 with true CFG, one cache state per branch; tokens: estimate's
        text_tokens, reference_tokens, reference_px, reference_kv, source_reference)."""
        return estimate(
            width, height, num_images, self.dtype, self.transformer_bits, cache=cache,
            window=None if windows is None else (windows.tokens, windows.batch),
            transformer=self.transformer_config, vae=self.vae_config, family=self.family.name,
            text={name: read_config(component_dir(self.root, name)) for name in self.text.folders},
            lora_params=self.loras.parameter_count,
            segmenter=segmenter, cache_branches=cache_branches, **tokens)
