"""mlx-edit: edit photos with FLUX on Apple MLX (FLUX.1 Fill inpainting and outpainting,
Canny/Depth restyling, Kontext instruction edits; FLUX.2 [klein] multi-reference edits and
inpainting), proven against diffusers.

    from mlx_edit import FluxFill, FluxKontext, FluxKlein, ControlNetSpec, IPAdapterSpec

Names load lazily (PEP 562), so `import mlx_edit` stays light (the CLI's --help).
"""

from mlx_edit import _blas  # noqa: F401  (must run before mlx is imported)

__version__ = "0.1.0"

_EXPORTS = {
    "FluxFill": "mlx_edit.editing.fill",
    "FluxPipeline": "mlx_edit.editing.pipeline",
    "FluxKontext": "mlx_edit.editing.kontext",
    "FluxKlein": "mlx_edit.editing.klein",
    "ControlNetSpec": "mlx_edit.conditioning.controlnet",
    "IPAdapterSpec": "mlx_edit.conditioning.image_prompts",
    "ReduxSpec": "mlx_edit.conditioning.image_prompts",
    "InputError": "mlx_edit.imaging.images",
    "WeightLoadError": "mlx_edit.weights.core",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlx_edit' has no attribute {name!r}")
