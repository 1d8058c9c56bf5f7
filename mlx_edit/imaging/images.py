"""Image and mask I/O: loading, [-1, 1] array conversion, PNG/JSON writing.

Pure Pillow/numpy (no mlx). The editing geometry (grow/feather, crop-to-mask, paste-back,
outpaint canvas) lives in `mlx_edit.imaging.stitch`.

Conventions: sizes are PIL's `(width, height)`; arrays are `(H, W)` or `(H, W, C)`; a mask
is float32 in [0, 1] where 1 (white) means "repaint", as in diffusers' FluxFillPipeline.
Bad user input raises `InputError` (a `ValueError`) or one of its subclasses, with a
one-line message that says what was wrong and what to do.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

PathLike = str | os.PathLike
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class InputError(ValueError):
    """Bad user input (file, mask, option); the message says what to do."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input file does not exist."""


class EmptyMaskError(InputError):
    """The mask selects nothing: no pixel >= 0.5 (white = repaint)."""


class OutputExistsError(InputError, FileExistsError):
    """The output file exists and overwriting was not allowed."""


# ---------------------------------------------------------------- loading


def _register_heif() -> None:
    # iPhone photos are HEIC; Pillow reads them only through the optional pillow-heif.
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def _open(src: PathLike | Image.Image, what: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"{what} must be a file path or a PIL image, got {type(src).__name__}")
    path = Path(src).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"{what} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} path is a directory, not an image file: {path}")
    _register_heif()
    try:
        img = Image.open(path)
        img.load()  # decode now so truncated files fail here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise InputError(
            f"cannot read {what} file {path} ({type(e).__name__}: {e}); "
            "use a PNG, JPEG, WebP or TIFF file (HEIC needs `pip install pillow-heif`)"
        ) from e
    return img


def _orient(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # corrupt EXIF must not make a readable photo unusable
        warnings.warn(f"ignoring unreadable EXIF orientation ({e})", stacklevel=3)
        return img


def _high_depth_unit(img: Image.Image) -> np.ndarray:
    """Single-band 16/32-bit or float image -> float32 (H, W) in [0, 1]."""
    a = np.asarray(img).astype(np.float32)
    if img.mode.startswith("I;16"):
        return a / 65535.0
    if img.mode == "F":
        return np.clip(a if a.max(initial=0.0) <= 1.0 else a / 255.0, 0.0, 1.0)
    # mode "I" holds 8- or 16-bit data (TIFF, old Pillow PNG): guess from the range.
    return np.clip(a / (65535.0 if a.max(initial=0.0) > 255 else 255.0), 0.0, 1.0)


def _rgb_icc(img: Image.Image) -> bytes | None:
    icc = img.info.get("icc_profile")
    # Only an RGB profile stays valid once the pixels are RGB (not CMYK or GRAY ones).
    return icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None


def load_image(
    src: PathLike | Image.Image | np.ndarray,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Load an image as 8-bit RGB, upright.

    Args:
      src: a file path, a PIL image, or a uint8 array (H, W, 3).
      background: RGB colour that transparent pixels (RGBA, LA, PA, P with transparency)
        are composited onto. White is what viewers show and what users expect; fully
        opaque images are unchanged, and masked pixels are zeroed before the model anyway.
    Returns: PIL image, mode "RGB", EXIF orientation applied (`ImageOps.exif_transpose`).
      An embedded RGB ICC profile (e.g. Display P3) is kept in `.info["icc_profile"]` so
      `save_png` can write it back; pixels are not colour-converted.
    Conversions: P/L/1/CMYK/YCbCr/HSV/LAB through Pillow; 16-bit ("I;16*", "I") scaled by
      65535 -> 255 with rounding (not truncation); "F" taken as [0, 1] (or [0, 255] if
      larger).
    Raises: InputNotFoundError (missing file), InputError (unreadable file, bad type).
    """
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise InputError(f"image array must be uint8 (H, W, 3), got {src.dtype} {src.shape}")
        return Image.fromarray(src, "RGB")
    img = _orient(_open(src, "image"))
    icc = _rgb_icc(img)
    mode = img.mode
    try:
        if mode in _HIGH_DEPTH:
            u8 = np.rint(_high_depth_unit(img) * 255.0).astype(np.uint8)
            out = Image.fromarray(u8, "L").convert("RGB")
        elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*background, 255))
            out = Image.alpha_composite(base, rgba).convert("RGB")
        else:
            out = img.convert("RGB")  # always a copy: callers may mutate it
    except ValueError as e:
        raise InputError(f"cannot convert image mode {mode} to RGB ({e}); save it as RGB") from e
    # Only the colour profile travels: the file's own keys (JPEG's jfif*, dpi, exif...)
    # would otherwise leak into the edit's metadata.
    out.info = {} if icc is None else {"icc_profile": icc}
    return out


def _unit_from_array(a: np.ndarray) -> np.ndarray:
    """Any-dtype mask array -> float32 in [0, 1] (same shape)."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise InputError(f"mask array must be bool, integer or float, got {a.dtype}")
    wide = a.astype(np.float64)  # checked before the float32 cast, which could overflow
    if not np.isfinite(wide).all():
        raise InputError("mask array contains NaN or inf; pass values in [0, 1]")
    lo, hi = float(wide.min(initial=0.0)), float(wide.max(initial=0.0))
    f = a.astype(np.float32) if -1.0 <= lo and hi <= 65535.0 else wide
    if np.issubdtype(a.dtype, np.integer) and 0 <= lo and hi <= 255:
        return f / (255.0 if hi > 1 else 1.0)
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise InputError(
            f"mask values must lie in [0, 1] (float) or [0, 255] (integer), "
            f"got [{lo:g}, {hi:g}] ({a.dtype})"
        )
    return np.clip(f, 0.0, 1.0)


def _from_channels(x: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W). Colour: max over channels (a red stroke counts as
    white). With alpha: if the colour is uniform the alpha is the mask (a stroke layer);
    otherwise colour x alpha (transparent = keep)."""
    c = x.shape[2]
    if c == 1:
        return x[..., 0]
    if c not in (2, 3, 4):
        raise InputError(f"mask must have 1-4 channels, got {c}")
    has_alpha = c in (2, 4)
    gray = x[..., : c - 1 if has_alpha else c].max(axis=2)
    if not has_alpha:
        return gray
    alpha = x[..., -1]
    if alpha.min() >= 1.0:
        return gray
    if gray.max() - gray.min() <= 1.0 / 255:
        return alpha
    return gray * alpha


def _mask_from_pil(img: Image.Image) -> np.ndarray:
    if img.mode in _HIGH_DEPTH:
        return _high_depth_unit(img)
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        x = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    elif img.mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    else:
        x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return _from_channels(x)


def load_mask(
    src: PathLike | Image.Image | np.ndarray,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Load an edit mask as float32 (H, W) in [0, 1]; white (1) = repaint.

    Args:
      src: file path, PIL image, or array (H, W) / (H, W, 1|2|3|4) of bool, uint8,
        uint16 or float in [0, 1].
      size: `(width, height)` of the image. A mask of another size is resized (bilinear,
        on the float values) with a `UserWarning` naming both sizes.
    Rules: EXIF orientation is applied; colour masks use the max over RGB; an alpha channel
      is the mask when the colour is uniform, otherwise it multiplies it (see
      `_from_channels`). The result is soft; the model mask is `binarize_mask` (>= 0.5).
    Raises: InputNotFoundError, InputError (unreadable file, bad array), EmptyMaskError
      (no pixel >= 0.5 after resizing: nothing to edit).
    """
    if isinstance(src, np.ndarray):
        a = _unit_from_array(src)
        if a.ndim == 3 and a.shape[0] <= 4 < a.shape[2]:
            raise InputError(f"mask array of shape {src.shape} is channels-first (C, H, W): "
                             "give (H, W) or (H, W, C), e.g. mask[0] or "
                             "mask.transpose(1, 2, 0)")
        if a.ndim == 3:
            a = _from_channels(a)
        elif a.ndim != 2:
            raise InputError(f"mask array must be (H, W) or (H, W, C), got shape {src.shape}")
        m = np.ascontiguousarray(a, dtype=np.float32)
    else:
        m = _mask_from_pil(_orient(_open(src, "mask")))
    if size is not None:
        w, h = int(size[0]), int(size[1])
        if m.shape != (h, w):
            mh, mw = m.shape
            note = "" if abs(mw * h - mh * w) <= 0.01 * mh * w else " (aspect ratios differ)"
            warnings.warn(
                f"mask size {mw}x{mh} differs from image size {w}x{h}{note}; "
                "resizing the mask (bilinear)",
                stacklevel=2,
            )
            m = np.asarray(Image.fromarray(m, "F").resize((w, h), Image.BILINEAR))
            m = np.clip(m, 0.0, 1.0).astype(np.float32)
    if not (m >= 0.5).any():
        raise EmptyMaskError(
            "mask is empty: no pixel is >= 0.5; paint the area to edit in white on black"
        )
    return m


# ---------------------------------------------------------------- model arrays


def to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> float32 (H, W, 3) in [-1, 1].

    Same arithmetic as diffusers `VaeImageProcessor` (image_processor.py `pil_to_numpy`
    then `normalize`): `x / 255` then `2x - 1`, in float32.
    """
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return 2.0 * x - 1.0


def from_array(arr: Any) -> Image.Image:
    """float array (H, W, 3) or (1, H, W, 3) in [-1, 1] -> PIL RGB image.

    Same arithmetic as diffusers `postprocess` (`denormalize`: clamp(x/2 + 0.5, 0, 1)) and
    `numpy_to_pil` (`(x * 255).round()`), in float32. Accepts numpy or mlx arrays.
    Raises: ValueError on a wrong shape or non-finite values (a numerical bug upstream).
    """
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an image array (H, W, 3), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("image array contains NaN or inf (numerical overflow upstream?)")
    x = np.clip(a * 0.5 + 0.5, 0.0, 1.0)
    return Image.fromarray((x * 255).round().astype(np.uint8), "RGB")


# ---------------------------------------------------------------- writing


def _same_file(a: Path, b: Path) -> bool:
    """True when writing `a` would replace `b`'s content: the same path once links are
    followed, or the same inode (hard links; case-insensitive file systems)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe_writable(folder: Path) -> None:
    # os.access is wrong for root and for read-only mounts: create and remove a file.
    try:
        fd, probe = tempfile.mkstemp(prefix=".mlx-edit-probe-", dir=folder)
    except OSError as e:
        raise InputError(f"cannot write to the output folder {folder}: "
                         f"{e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_output(path: PathLike, overwrite: bool = False, protect: Iterable[PathLike] = (),
                 *, probe: bool = True) -> Path:
    """Refuse an output path before any work; returns it (expanded).

    Refused: a directory; a missing or unwritable folder (probed by creating a file when
    `probe`); any path that is, or links to, one of `protect` (the inputs: compared
    resolved and with `os.path.samefile`, so symlinks and hard links count), even with
    `overwrite`; an existing path (a dangling symlink too) without `overwrite`.
    Raises: InputError, OutputExistsError (one line, naming the path).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"output path is a directory: {path}; give a file name")
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}; create it first")
    for p in protect:
        if p is not None and _same_file(path, Path(p).expanduser()):
            raise InputError(f"refusing to write {path}: it is one of the input files "
                             f"({p}); choose another output path")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    if probe:
        _probe_writable(path.parent)
    return path


_check_output = check_output  # the name the writers below used


def _write_temp(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a hidden temp file next to `path` and fsync it; removed on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    except OSError as e:
        raise InputError(f"cannot write to {path.parent}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file into place (never clobbering without `overwrite`)."""
    try:
        if overwrite:
            os.replace(tmp, path)
            return
        try:  # link() refuses to clobber, closing the race after check_output
            os.link(tmp, path)
        except FileExistsError:
            raise OutputExistsError(
                f"{path} already exists (written meanwhile?); pass --overwrite to replace it"
            ) from None
        except OSError:  # file systems without hard links (exFAT, some SMB)
            if os.path.lexists(path):
                raise OutputExistsError(
                    f"{path} already exists; pass --overwrite to replace it") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], overwrite: bool) -> None:
    """Write to a temp file in the same directory, fsync, then move it into place."""
    _commit(_write_temp(path, write), path, overwrite)


def write_together(files: Sequence[tuple[PathLike, Callable[[BinaryIO], None]]], *,
                   overwrite: bool = False, protect: Iterable[PathLike] = ()) -> list[Path]:
    """Write several files (an image and its sidecar, a batch) as one commit: every path
    is checked, every temp file written, then all are moved into place; if one cannot be,
    the ones this call created are removed again, so a failure leaves no new file.
    Raises as `check_output`."""
    protect = list(protect)
    paths = [check_output(p, overwrite, protect, probe=False) for p, _ in files]
    if len(set(paths)) != len(paths):
        raise InputError(f"two outputs share one path: {', '.join(map(str, paths))}")
    temps: list[Path] = []
    done: list[Path] = []
    try:
        for path, (_, write) in zip(paths, files):
            temps.append(_write_temp(path, write))
        for path, tmp in zip(paths, temps):
            existed = os.path.lexists(path)
            _commit(tmp, path, overwrite)
            if not existed:
                done.append(path)
    except BaseException:
        for p in done:
            p.unlink(missing_ok=True)
        raise
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    return paths


def _png_info(metadata: dict[str, Any] | None) -> PngInfo:
    info = PngInfo()
    for key, value in (metadata or {}).items():
        if not (isinstance(key, str) and 1 <= len(key) <= 79 and key.isprintable()
                and key.isascii() and key == key.strip()):
            raise InputError(f"PNG metadata key must be 1-79 printable ASCII chars: {key!r}")
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        info.add_text(key, text, zip=len(text) > 1024)  # non-Latin-1 text goes to iTXt
    return info


def save_png(
    img: Image.Image,
    path: PathLike,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    protect: Iterable[PathLike] = (),
    icc_profile: bytes | None = None,
) -> Path:
    """Write `img` as a PNG with one text chunk per metadata key, atomically.

    Args:
      metadata: key -> value; str values are written as is, others as JSON. Read back
        with `Image.open(path).text`.
      overwrite: replace an existing file; without it an existing file is an error.
      protect: input paths never to overwrite, even with `overwrite=True` (compared
        resolved, and with `os.path.samefile`).
      icc_profile: colour profile to embed; defaults to `img.info["icc_profile"]`.
    Returns: the path written. The file appears complete or not at all: a temp file in the
      same directory is fsynced and moved into place; it is removed on any failure.
    Raises: OutputExistsError (exists, no overwrite; mentions --overwrite), InputError
      (protected path, missing directory, bad key, unwritable directory).
    """
    out = _check_output(path, overwrite, protect)
    _atomic_write(out, png_writer(img, metadata, icc_profile), overwrite)
    return out


def png_writer(img: Image.Image, metadata: dict[str, Any] | None = None,
               icc_profile: bytes | None = None) -> Callable[[BinaryIO], None]:
    """A writer of `img` as PNG (metadata as text chunks, as `save_png`) for
    `write_together`. Raises InputError (bad metadata key) now, not when writing."""
    info = _png_info(metadata)
    icc = icc_profile if icc_profile is not None else img.info.get("icc_profile")
    extra = {"icc_profile": icc} if icc else {}
    return lambda f: img.save(f, format="PNG", pnginfo=info, **extra)


TEXT_KEYS = ("prompt", "prompt_2", "negative_prompt", "model")  # user text, kept as given


def typed_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """An image's `.info` metadata (str values, as the pipelines give them) with numbers,
    booleans, lists and dicts as such: each str value that is a Python literal ("2",
    "30.0", "True", "[512, 512]") is read back, except user text (TEXT_KEYS). Binary
    values (the ICC profile) are left out. For JSON sidecars."""
    out = {}
    for key, value in info.items():
        if isinstance(value, bytes):
            continue
        if isinstance(value, str) and key not in TEXT_KEYS:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
        out[key] = value
    return out


def json_writer(metadata: dict[str, Any]) -> Callable[[BinaryIO], None]:
    """A writer of `metadata` as indented UTF-8 JSON (as `save_json_sidecar`)."""
    data = (json.dumps(metadata, indent=2, ensure_ascii=False, default=str) + "\n").encode()
    return lambda f: f.write(data)


def sidecar_path(png_path: PathLike) -> Path:
    """`out.png` -> `out.json`: where `save_json_sidecar` output usually goes."""
    return Path(png_path).expanduser().with_suffix(".json")


def save_json_sidecar(
    path: PathLike,
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
    protect: Iterable[PathLike] = (),
) -> Path:
    """Write `metadata` as indented UTF-8 JSON, atomically (same rules as `save_png`).

    Values JSON cannot encode (paths, numpy scalars) are written with `str()`.
    Raises: OutputExistsError, InputError as `save_png`.
    """
    out = _check_output(path, overwrite, protect)
    _atomic_write(out, json_writer(metadata), overwrite)
    return out
