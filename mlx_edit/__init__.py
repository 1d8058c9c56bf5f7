"""mlx-edit: FLUX.1 Fill inpainting and outpainting on Apple MLX."""

from mlx_edit import _blas  # noqa: F401  (must run before mlx is imported)

__version__ = "0.1.0"
