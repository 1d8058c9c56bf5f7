"""ServeConfig: what `mlx-edit serve` loads and the limits it enforces on requests."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """The server's configuration; only the server chooses models (clients never send
    paths).

    model: FLUX.1 Fill repo id or folder (the "fill" kind: inpaint, outpaint); None:
      FluxFill's default repo, or no Fill at all when klein_model is given.
    kontext_model: FLUX.1 Kontext repo id or folder (the "kontext" kind: `edit` mode);
      None = none.
    klein_model: FLUX.2 [klein] repo id or folder (the "klein" kind: `edit` mode with
      reference images, `inpaint` with an optional reference, text-to-image over the
      OpenAI API), resident next to (or instead of) the FLUX.1 models; None = none.
    segment_model: SAM 2.1 checkpoint for masks from points/boxes; None = the Fill
      folder's `segmenter/` when it has one, else points/boxes are refused.
    text_segment_model: SAM 3 checkpoint for masks from words; None = the Fill folder's
      `text-segmenter/` when it has one, else text masks are refused.
    quantize: 4 / 8 bits for the transformers, or None. low_memory: as FluxFill's.
    token: when set, every /v1 route but health needs `Authorization: Bearer <token>`
      (or `?token=`, for EventSource and image links).
    max_queue: jobs waiting (not counting the running one) before 429.
    max_upload_bytes: request body limit (413). max_pixels: per uploaded image, checked
      from its header before decoding (413).
    max_images: num_images per job. keep_jobs / keep_bytes: finished jobs (and their PNGs)
      kept, evicted oldest first.
    local_hosts: without a token, the Host names requests may carry (a web page cannot
      reach the loopback server through a DNS name of its own: DNS rebinding).
    max_resident_gb: models kept loaded are evicted least recently used beyond this
      estimate (serve/resident.py); None = no bound.
    preview_every: a JPEG preview in every N-th `step` event (0 = none), at most
      preview_max_side px on its longer side (serve/preview.py).
    prompt_cache: folder of prompt embeddings shared with `mlx-edit batch` and other
      servers (mlx_edit.editing.prompt_cache; a cached prompt loads no text encoder), bounded to
      prompt_cache_gb; None = embeddings kept in memory only.
    """

    model: str | None = None
    kontext_model: str | None = None
    klein_model: str | None = None
    segment_model: str | None = None
    text_segment_model: str | None = None
    quantize: int | None = None
    low_memory: bool = False
    token: str | None = None
    max_queue: int = 16
    max_upload_bytes: int = 50 * MB
    max_pixels: int = 40_000_000
    max_images: int = 8
    keep_jobs: int = 64
    keep_bytes: int = 1024 * MB
    local_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    max_resident_gb: float | None = None
    preview_every: int = 1
    preview_max_side: int = 256
    prompt_cache: str | None = None
    prompt_cache_gb: float = 2.0

    def __post_init__(self):
        for name in ("max_queue", "max_upload_bytes", "max_pixels", "max_images",
                     "keep_jobs", "keep_bytes", "preview_max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) \
                or self.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {self.preview_every!r}")
        for name in ("max_resident_gb", "prompt_cache_gb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty")


def host_name(host_header: str) -> str:
    """The name of a Host header without its port: "[::1]:7860" -> "::1"."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an address) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
