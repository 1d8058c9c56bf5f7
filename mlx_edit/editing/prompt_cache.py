"""Prompt embeddings cached on disk, so repeated prompts never pay for T5-XXL (or Qwen3)
again.

    cache = PromptCache("~/.cache/mlx-edit/prompts", max_bytes=2 * 2**30)
    pipe.disk_prompt_cache = cache        # FluxPipeline.encode_prompt looks here first

One entry is one safetensors file `<key>.safetensors` holding `txt` (FLUX.1: (1, L, 4096),
the T5 sequence; FLUX.2 [klein]: (1, L, 3 x hidden), Qwen3's stacked hidden states) and,
for FLUX.1, `pooled` (1, 768: CLIP's pooled output), in the pipeline's dtype. The key is a
SHA-256 of: the prompt encoder's files (name, size, modification time of every file in
its encoder and tokenizer folders: `text_encoder/`, `text_encoder_2/`, `tokenizer/`,
`tokenizer_2/` for FLUX.1, `text_encoder/` and `tokenizer/` (with the chat template) for
FLUX.2: a re-converted or replaced encoder or template misses), the dtype, the
quantization, the prompt, the T5 prompt, max_sequence_length and the loaded LoRAs
that change the text encoder (none for FLUX.2, whose LoRAs are the transformer's).
Entries are written atomically (temp file, rename), so concurrent processes (batch
ranks sharing a folder) at worst both encode a prompt once. The folder is bounded:
after each write the least recently used entries (by modification time, refreshed on
every hit) are removed until it holds at most `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from pathlib import Path

import mlx.core as mx

from mlx_edit.imaging.images import InputError

DEFAULT_MAX_BYTES = 2 * 2**30  # ~500 T5-XXL prompts at 512 tokens in bfloat16
SUFFIX = ".safetensors"


def encoder_fingerprint(folders: list[Path]) -> list:
    """(folder name, file name, size, mtime_ns) of every file of the encoder folders: what
    identifies the weights without reading GBs of them."""
    out = []
    for folder in folders:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                st = f.stat()
                out.append([Path(folder).name, f.name, st.st_size, st.st_mtime_ns])
    return out


class PromptCache:
    """A bounded folder of prompt embeddings (see the module docstring); `hits`,
    `misses` count this object's lookups. Creates the folder; raises InputError when it
    cannot. A failed write only warns."""

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the prompt cache folder {self.folder}: "
                             f"{e.strerror or e}; choose another (--prompt-cache) or pass "
                             "--no-prompt-cache") from None
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0
        self._fingerprints: dict[tuple, str] = {}

    def key(self, encoders: list[Path], dtype, quantize: int | None, prompt: str,
            t5_prompt: str, max_sequence_length: int, loras: tuple = ()) -> str:
        """The entry name (hex SHA-256) of these prompts for these encoder folders (and
        text-encoder LoRAs: mlx_edit.weights.lora_text.text_key)."""
        folders = tuple(str(f) for f in encoders)
        if folders not in self._fingerprints:  # stat the weights once per process
            self._fingerprints[folders] = json.dumps(encoder_fingerprint(list(encoders)))
        blob = json.dumps([self._fingerprints[folders], str(dtype), quantize, prompt,
                           t5_prompt, max_sequence_length] + ([list(loras)] if loras else []),
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str):
        """The cached PromptEmbeds of `key`, or None (missing or unreadable entry)."""
        from mlx_edit.sampling.denoise import PromptEmbeds

        path = self._path(key)
        try:
            arrays = mx.load(str(path))
            embeds = PromptEmbeds(arrays["txt"], arrays.get("pooled"))  # FLUX.2: none
            os.utime(path)  # least recently used goes first
        except (OSError, ValueError, RuntimeError, KeyError):
            self.misses += 1
            return None
        self.hits += 1
        return embeds

    def put(self, key: str, embeds) -> None:
        """Store `embeds` (a PromptEmbeds) under `key` atomically, then trim the folder."""
        path = self._path(key)
        tmp = path.with_name(f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp{SUFFIX}")
        try:
            arrays = {"txt": embeds.txt, "pooled": embeds.pooled}
            mx.save_safetensors(str(tmp), {k: v for k, v in arrays.items() if v is not None})
            os.replace(tmp, path)
            self.trim()
        except OSError as e:  # a full or read-only disk costs re-encoding, not the edit
            warnings.warn(f"prompt cache {self.folder}: not stored ({e})", stacklevel=2)
        finally:
            tmp.unlink(missing_ok=True)

    def trim(self) -> None:
        """Remove the least recently used entries until the folder holds <= max_bytes."""
        entries = []
        for f in self.folder.glob(f"*{SUFFIX}"):
            if f.name.startswith("."):
                continue
            try:
                st = f.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            entries.append((st.st_mtime_ns, st.st_size, f))
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
