"""FluxPipeline's prompt encoding: CLIP pooled + T5 sequence embeddings, cached.

`PromptMixin.encode_prompt` checks the prompt's length, then looks in the pipeline's
in-memory cache (a few prompts), then in `disk_prompt_cache` (mlx_edit.prompt_cache, when
set), and only then loads the text encoders, one at a time, freeing each after use, so they
never sit in memory during denoising. Numerics follow diffusers' FluxPipeline
(`_get_clip_prompt_embeds`, `_get_t5_prompt_embeds`).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_edit.imaging.images import InputError
from mlx_edit.progress import ticks
from mlx_edit.sampling.denoise import PromptEmbeds
from mlx_edit.weights import lora_text
from mlx_edit.weights.sources import component_dir
from mlx_edit.weights.text import load_t5

PROMPT_CACHE_SIZE = 4  # prompt embeddings kept per pipeline (T5 1x512x4096 bf16: 4 MB)


class PromptMixin:
    """Prompt encoding of FluxPipeline. Expects `_prompt_cache` ({key: PromptEmbeds}) and
    `disk_prompt_cache` (set in FluxPipeline.__init__), `root`, `dtype`, `quantize` and the
    tokenizers (mlx_edit.components.ModelsMixin), `loras` (mlx_edit.loras.LoRAMixin: CLIP-L
    LoRAs are applied when encoding and key the caches, mlx_edit.weights.lora_text)."""

    _prompt_cache: dict[tuple, PromptEmbeds]

    def encode_prompt(
        self, prompt: str, prompt_2: str | None = None, max_sequence_length: int = 512
    ) -> PromptEmbeds:
        """CLIP pooled from `prompt`, T5 sequence from `prompt_2 or prompt` (as diffusers).

        Raises InputError when the T5 prompt exceeds max_sequence_length tokens (a CLIP
        prompt over 77 tokens is truncated with a PromptTruncatedWarning, as CLIP only
        gives the pooled summary).
        """
        key = (prompt, prompt_2, max_sequence_length, lora_text.text_key(self.loras))
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        if not 1 <= max_sequence_length <= 512:
            raise InputError(f"max_sequence_length must be 1..512, got {max_sequence_length}")
        t5_prompt = prompt_2 if prompt_2 is not None else prompt
        n = self.t5_tokenizer.count_tokens(t5_prompt)
        if n > max_sequence_length:
            raise InputError(
                f"prompt is {n} T5 tokens, over the limit of {max_sequence_length}: "
                "shorten it (or raise --max-sequence-length, at most 512)"
            )
        disk, disk_key, embeds = self.disk_prompt_cache, None, None
        if disk is not None:  # on disk: the text encoders are not loaded at all on a hit
            encoders = [component_dir(self.root, c) for c in ("text_encoder", "text_encoder_2")]
            disk_key = disk.key(encoders, self.dtype, self.quantize, prompt, t5_prompt,
                                max_sequence_length, key[3])
            embeds = disk.get(disk_key)
        if embeds is None:
            embeds = self._encode_text(prompt, t5_prompt, max_sequence_length)
            if disk is not None:
                disk.put(disk_key, embeds)
        self._prompt_cache[key] = embeds  # small: a few prompts (e.g. a negative) kept
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return embeds

    def _encode_text(self, prompt: str, t5_prompt: str, max_sequence_length: int
                     ) -> PromptEmbeds:
        """Load CLIP, encode, free it; load T5, encode, free it (one model resident)."""
        tick = ticks("text_encode", 2)
        clip = lora_text.load_clip(self.root, self.dtype, self.loras)  # with its CLIP LoRAs
        pooled = clip(mx.array(self.clip_tokenizer(prompt)))[1]  # no lazy ref to CLIP kept
        mx.eval(pooled)
        del clip
        mx.clear_cache()
        tick(1)
        t5 = load_t5(component_dir(self.root, "text_encoder_2"), self.dtype, self.quantize)
        txt = t5(mx.array(self.t5_tokenizer(t5_prompt, max_length=max_sequence_length)))
        mx.eval(txt)
        del t5
        mx.clear_cache()
        tick(2)
        return PromptEmbeds(txt.astype(self.dtype), pooled.astype(self.dtype))
