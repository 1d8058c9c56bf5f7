"""FluxPipeline's prompt encoding, cached; the text encoders of each model family.

`Prompts.encode` (`pipe.encode_prompt`) has the family's text encoder (`pipe.models.text`,
built from the family's entry, mlx_edit.families) check the prompt's length, then looks in
the pipeline's in-memory cache (a few prompts), then in its `disk_cache`
(mlx_edit.editing.prompt_cache, when set), and only then has the encoder load its models, one at
a time, freeing each after use, so they never sit in memory during denoising.

`ClipT5Text` is FLUX.1's: CLIP-L pooled + T5 sequence; numerics follow diffusers'
FluxPipeline (`_get_clip_prompt_embeds`, `_get_t5_prompt_embeds`). `Qwen3Text` is
FLUX.2's: Qwen3 hidden states of the out layers, stacked (Flux2KleinPipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_edit.imaging.images import InputError
from mlx_edit.progress import ticks
from mlx_edit.sampling.denoise import PromptEmbeds
from mlx_edit.editing.text_qwen3 import Qwen3Tokenizer, encode_qwen3_prompt
from mlx_edit.weights import lora_text
from mlx_edit.weights.qwen3 import load_qwen3
from mlx_edit.weights.sources import component_dir
from mlx_edit.weights.text import load_t5, read_text_tools

if TYPE_CHECKING:
    from mlx_edit.editing.components import Models
    from mlx_edit.editing.loras import LoRAs

PROMPT_CACHE_SIZE = 4  # prompt embeddings kept per pipeline (T5 1x512x4096 bf16: 4 MB)
MAX_SEQUENCE_LENGTH = 512


def check_length(n: int, max_sequence_length: int, encoder: str) -> None:
    """InputError unless 1 <= max_sequence_length <= 512 and the prompt's `n` tokens
    (of `encoder`, e.g. "T5") fit it."""
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise InputError(f"max_sequence_length must be 1..{MAX_SEQUENCE_LENGTH}, got "
                         f"{max_sequence_length}")
    if n > max_sequence_length:
        raise InputError(
            f"prompt is {n} {encoder} tokens, over the limit of {max_sequence_length}: "
            f"shorten it (or raise --max-sequence-length, at most {MAX_SEQUENCE_LENGTH})")


class ClipT5Text:
    """FLUX.1's text encoders: CLIP-L (`text_encoder/`, pooled from `prompt`) and T5
    (`text_encoder_2/`, the sequence from `prompt_2 or prompt`). `folders`: the encoders'
    folders (checked at load); they and `tokenizers` key the disk prompt cache. The
    tokenizers are read when made (WeightLoadError for damaged files)."""

    folders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")

    def __init__(self, root: Path):
        self.root = root
        # damaged tokenizer files fail here, as one WeightLoadError
        _, self.clip_tokenizer, self.t5_tokenizer = read_text_tools(
            None, *(component_dir(root, c) for c in ("tokenizer", "tokenizer_2")))

    def check(self, prompt: str, prompt_2: str | None, max_sequence_length: int) -> str:
        """The T5 prompt, after checking its length (InputError: over max_sequence_length
        tokens; a CLIP prompt over 77 tokens is truncated with a PromptTruncatedWarning
        when encoded, as CLIP only gives the pooled summary)."""
        t5_prompt = prompt_2 if prompt_2 is not None else prompt
        check_length(self.t5_tokenizer.count_tokens(t5_prompt), max_sequence_length, "T5")
        return t5_prompt

    def encode(self, prompt: str, prompt_2: str, max_sequence_length: int, dtype: mx.Dtype,
               quantize: int | None, loras: dict) -> PromptEmbeds:
        """Load CLIP (with its CLIP LoRAs), encode, free it; load T5, encode, free it (one
        model resident). prompt_2: the T5 prompt (`check`'s result)."""
        tick = ticks("text_encode", 2)
        clip = lora_text.load_clip(self.root, dtype, loras)
        pooled = clip(mx.array(self.clip_tokenizer(prompt)))[1]  # no lazy ref to CLIP kept
        mx.eval(pooled)
        del clip
        mx.clear_cache()
        tick(1)
        t5 = load_t5(component_dir(self.root, "text_encoder_2"), dtype, quantize)
        txt = t5(mx.array(self.t5_tokenizer(prompt_2, max_length=max_sequence_length)))
        mx.eval(txt)
        del t5
        mx.clear_cache()
        tick(2)
        return PromptEmbeds(txt.astype(dtype), pooled.astype(dtype))


class Qwen3Text:
    """FLUX.2's text encoder: Qwen3 (`text_encoder/`) over the chat-templated prompt
    (`tokenizer/`), the hidden states of its out layers (klein: 9, 18, 27) stacked per
    token (diffusers Flux2KleinPipeline `_get_qwen3_prompt_embeds`; mlx_edit.editing.text_qwen3);
    no pooled vector. The tokenizer (and its chat template) is read when made
    (WeightLoadError when damaged); `folders` and `tokenizers` key the disk cache."""

    folders = ("text_encoder",)
    tokenizers = ("tokenizer",)

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = Qwen3Tokenizer.from_folder(component_dir(root, "tokenizer"))

    def check(self, prompt: str, prompt_2: str | None, max_sequence_length: int) -> str:
        """The prompt, after checking its length with the chat template's tokens
        (InputError; also for a prompt_2, FLUX.1's T5 prompt)."""
        if prompt_2 is not None:
            raise InputError("prompt_2 is FLUX.1's T5 prompt: FLUX.2 has one text encoder "
                             "(leave --prompt-2 out)")
        check_length(self.tokenizer.count_tokens(prompt), max_sequence_length, "Qwen3")
        return prompt

    def encode(self, prompt: str, prompt_2: str, max_sequence_length: int, dtype: mx.Dtype,
               quantize: int | None, loras: dict) -> PromptEmbeds:
        """Load Qwen3 (its layers up to the last out layer), encode, free it."""
        tick = ticks("text_encode", 1)
        encoder = load_qwen3(component_dir(self.root, "text_encoder"), dtype,
                             quantize=quantize)
        txt, _ = encode_qwen3_prompt(encoder, self.tokenizer, prompt, max_sequence_length,
                                     dtype)
        mx.eval(txt)
        del encoder
        mx.clear_cache()
        tick(1)
        return PromptEmbeds(txt, None)


class Prompts:
    """Prompt encoding of a pipeline (`pipe.prompts`), cached: `models` gives the folder,
    dtype, quantization and the family's text encoder (`models.text`,
    mlx_edit.editing.components.Models); `loras` the pipeline's LoRAs (CLIP-L LoRAs are
    applied when encoding and key the caches, mlx_edit.weights.lora_text). Keeps the last
    PROMPT_CACHE_SIZE embeddings in memory; `disk_cache`: a
    mlx_edit.editing.prompt_cache.PromptCache looked in next, or None."""

    def __init__(self, models: Models, loras: LoRAs):
        self.models, self.loras = models, loras
        self.cache: dict[tuple, PromptEmbeds] = {}
        self.disk_cache = None

    def encode(
        self, prompt: str, prompt_2: str | None = None, max_sequence_length: int = 512
    ) -> PromptEmbeds:
        """The transformer's text inputs for `prompt` (FLUX.1: CLIP pooled from `prompt`,
        T5 sequence from `prompt_2 or prompt`, as diffusers).

        Raises InputError when the prompt exceeds max_sequence_length tokens (or the
        family takes no prompt_2), before any text encoder loads.
        """
        m = self.models
        key = (prompt, prompt_2, max_sequence_length, lora_text.text_key(self.loras))
        if key in self.cache:
            return self.cache[key]
        second = m.text.check(prompt, prompt_2, max_sequence_length)
        disk, disk_key, embeds = self.disk_cache, None, None
        if disk is not None:  # on disk: the text encoders are not loaded at all on a hit
            encoders = [component_dir(m.root, c)  # weights, tokenizers, chat template
                        for c in (*m.text.folders, *m.text.tokenizers)]
            disk_key = disk.key(encoders, m.dtype, m.quantize, prompt, second,
                                max_sequence_length, key[3])
            embeds = disk.get(disk_key)
        if embeds is None:
            embeds = m.text.encode(prompt, second, max_sequence_length, m.dtype, m.quantize,
                                   self.loras)
            if disk is not None:
                disk.put(disk_key, embeds)
        self.cache[key] = embeds  # small: a few prompts (e.g. a negative) kept
        while len(self.cache) > PROMPT_CACHE_SIZE:
            self.cache.pop(next(iter(self.cache)))
        return embeds
