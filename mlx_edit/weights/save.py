"""Writing mlx-edit model folders: sharded safetensors, index, configs, manifest.

Layout (what `mlx-edit convert` writes and every loader reads):

    DEST/
      mlx_edit.json            manifest: mlx-edit version, source, date, dtype, bits
      model_index.json         as in a diffusers pipeline folder
      transformer/ vae/ text_encoder/ text_encoder_2/
          config.json          the source config + "_mlx_edit_version" (+ "quantization")
          model.safetensors    or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      tokenizer/ tokenizer_2/ scheduler/   copied from the source

Tensors carry our parameter names (`tree_flatten(model.parameters())`), conv weights in
MLX's OHWI layout, quantized layers as `.weight` (uint32) + `.scales` + `.biases`.
Shards are written tensor by tensor: at most one shard is held in memory.
The index format is the Hugging Face one (`{"metadata": {"total_size"}, "weight_map"}`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

from mlx_edit import __version__
from mlx_edit.weights.core import evaluate_finite

MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard limit (5 GB)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "mlx_edit.json"

# FLUX.1-Fill-dev's model_index.json, written when the source has none (BFL files).
MODEL_INDEX = {
    "_class_name": "FluxFillPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def parse_size(text: str | int) -> int:
    """Bytes from an int or a string like "5GB", "512MB", "300KiB" (ValueError if bad)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    try:
        value = float(number) * units[s[len(number):]]
    except (KeyError, ValueError):
        raise ValueError(f"bad size {text!r}: use e.g. 5GB, 512MB or a number of bytes") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)


class ShardWriter:
    """Accumulates evaluated tensors and writes a shard whenever the next tensor would
    push it over `max_bytes` (a tensor larger than that gets a shard of its own).

    `add(key, array)` evaluates the array; `close()` writes the last shard, names the
    shards `model-0000i-of-0000n.safetensors` (or `model.safetensors` when there is one)
    and writes the index; returns {"files": [...], "bytes": total, "largest_shard": n,
    "largest_tensor": n}. Peak memory: one shard plus the tensor being added.
    """

    def __init__(self, folder: str | Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str], int]] = []  # (path, keys, bytes)
        self.largest_tensor = 0
        self.seen: set[str] = set()

    def add(self, key: str, value: mx.array) -> None:
        if key in self.seen:
            raise ValueError(f"tensor {key} written twice")
        self.seen.add(key)
        evaluate_finite(f"tensor {key} to write", [value])  # never published with NaN
        if self.pending and self.pending_bytes + value.nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = value
        self.pending_bytes += value.nbytes
        self.largest_tensor = max(self.largest_tensor, value.nbytes)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.parts.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()  # give the shard's buffers back, or RSS keeps growing per shard

    def close(self) -> dict:
        self.flush()
        n = len(self.parts)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                              for i in range(n)]
        weight_map = {}
        for (path, keys, _), name in zip(self.parts, names):
            path.rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        total = sum(b for _, _, b in self.parts)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / INDEX_NAME, index)
        return {"files": names, "bytes": total, "tensors": len(weight_map),
                "largest_shard": max((b for _, _, b in self.parts), default=0),
                "largest_tensor": self.largest_tensor}


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as indented JSON (with a final newline)."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def copy_folder(src: Path, dst: Path) -> None:
    """Copy a small folder (tokenizer, scheduler) file by file; FileNotFoundError if absent."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    shutil.copytree(src, dst, dirs_exist_ok=False)


def write_model_index(folder: Path, source_root: Path | None) -> None:
    """`model_index.json`: the source pipeline's (if any) or FLUX.1 Fill's, marked with
    the mlx-edit version."""
    index = dict(MODEL_INDEX)
    if source_root is not None and (source_root / "model_index.json").is_file():
        index = json.loads((source_root / "model_index.json").read_text())
    index["_mlx_edit_version"] = __version__
    write_json(folder / "model_index.json", index)


def write_scheduler(folder: Path, source: Path | None) -> None:
    """`scheduler/`: a copy of `source`, or FLUX.1's scheduler config when there is none."""
    if source is not None:
        copy_folder(source, folder / "scheduler")
        return
    from mlx_edit.sampling.sampler import SchedulerConfig  # FLUX.1's defaults

    (folder / "scheduler").mkdir()
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler",
           **json.loads(json.dumps(dataclasses.asdict(SchedulerConfig())))}
    write_json(folder / "scheduler" / "scheduler_config.json", cfg)


def folder_bytes(path: str | Path) -> int:
    """Total bytes of the regular files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def temp_folder_for(dest: Path) -> Path:
    """The hidden temporary folder next to `dest` a conversion writes into."""
    return dest.parent / f".{dest.name}.converting-{os.getpid()}"


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove temporary folders of earlier conversions into `dest` whose process is gone
    (killed runs); returns what was removed."""
    removed = []
    for path in dest.parent.glob(f".{dest.name}.converting-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MARKER_KEY = "_mlx_edit_version"  # = weights.quantize.MLX_LAYOUT_KEY: configs we wrote


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_ours(folder: Path) -> bool:
    """True for a folder `mlx-edit convert` wrote: a pipeline folder (its `mlx_edit.json`
    manifest says format "mlx-edit") or a ControlNet folder (config.json marked with
    `_mlx_edit_version`). Only such a folder may be replaced by `--overwrite`."""
    manifest = _json(folder / MANIFEST_NAME)
    if manifest is not None and manifest.get("format") == "mlx-edit":
        return True
    config = _json(folder / "config.json")
    return config is not None and MARKER_KEY in config


def check_dest(dest: Path, overwrite: bool) -> None:
    """FileExistsError unless `dest` is absent, an empty folder, or (with `overwrite`) a
    folder `is_ours`: a file, a link or any other non-empty folder (photos, a diffusers
    checkpoint) is never replaced."""
    if dest.is_symlink():
        raise FileExistsError(f"{dest} is a link; give the folder itself or another DEST")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder; choose another DEST")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty (pass --overwrite to replace "
                              "an earlier mlx-edit conversion)")
    if not is_ours(dest):
        raise FileExistsError(f"{dest} is not an mlx-edit conversion (no {MANIFEST_NAME} or "
                              "marked config.json): refusing to replace it, even with "
                              "--overwrite; choose another DEST")


def publish(tmp: Path, dest: Path) -> None:
    """Move the finished `tmp` folder to `dest`, replacing an old `dest` (only one
    `check_dest` accepts) once the new one is complete: the old one is renamed aside,
    the new one renamed in, then the old one deleted (restored if the rename fails)."""
    old = None
    if dest.is_symlink() or dest.exists():  # checked again: it may have changed meanwhile
        check_dest(dest, overwrite=True)
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        if any(dest.iterdir()):
            dest.rename(old)
        else:
            dest.rmdir()
            old = None
    try:
        tmp.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
