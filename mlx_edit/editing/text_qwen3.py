"""FLUX.2 [klein]'s prompt side: the Qwen3 tokenizer with its chat template, and the
prompt embeddings the transformer takes.

Reference: diffusers `pipelines/flux2/pipeline_flux2_klein.py`
(`Flux2KleinPipeline._get_qwen3_prompt_embeds`, `encode_prompt`, `_prepare_text_ids`) with
transformers' `Qwen2Tokenizer` (models/qwen2/tokenization_qwen2.py) and
`apply_chat_template` (utils/chat_template_utils.py). Each prompt becomes the one user
message of a chat, rendered with the folder's chat template (`add_generation_prompt=True,
enable_thinking=False`), tokenized without added specials, truncated and padded to
`max_sequence_length` (512) as `padding="max_length", truncation=True` does; the encoder
runs with that attention mask and the hidden states of layers (9, 18, 27) are
concatenated per token into (B, L, 3 * hidden). Every position, padding included, is fed
to the transformer (no mask there).

Files: `tokenizer.json` (HF `tokenizers`), `tokenizer_config.json`, and the chat template
from `chat_template.jinja` (what transformers 5 `save_pretrained` writes) or else
`tokenizer_config.json`'s `chat_template`, rendered by jinja2 in a sandbox set up as
transformers does (trim_blocks, lstrip_blocks, loopcontrols, `tojson`,
`raise_exception`). Like transformers' `Qwen2Tokenizer`, a folder of that class gets
Qwen2's own normaliser and pre-tokenizer whatever its tokenizer.json holds.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

from mlx_edit.editing.text import PromptTruncatedWarning
from mlx_edit.weights.core import WeightLoadError

QWEN3_MAX_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length default
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                 "cls_token", "mask_token")


def qwen2_pre_tokenizer(add_prefix_space: bool = False) -> pre_tokenizers.PreTokenizer:
    """transformers' `Qwen2Tokenizer` pre-tokenizer: its regex split, then byte level."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def compile_chat_template(source: str):
    """The jinja2 template of `source`, in a sandbox set up as transformers'
    `_compile_jinja_template` (raises jinja2.TemplateSyntaxError on a bad template)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def read_chat_template(folder: Path, config: dict) -> str:
    """The chat template of a tokenizer folder: `chat_template.jinja`, else the config's
    `chat_template` (a string, or a list of {name, template} whose "default" is used).
    Raises WeightLoadError when there is none."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not isinstance(template, str):
        raise WeightLoadError(f"{folder}: no chat template (chat_template.jinja or "
                              "tokenizer_config.json's chat_template); download the model "
                              "folder again")
    return template


class Qwen3Tokenizer:
    """Chat template + byte-level BPE of a klein `tokenizer/` folder (module doc).

    Attributes: tokenizer (tokenizers.Tokenizer), template (compiled jinja2 template),
    template_vars (the named special tokens a template may use), pad_id,
    padding_side / truncation_side ("right" unless tokenizer_config.json says "left").
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str, config: dict):
        self.tokenizer = tokenizer
        tokenizer.no_padding(), tokenizer.no_truncation()  # a tokenizer.json may set them
        if config.get("tokenizer_class") in _QWEN2_CLASSES:  # as transformers' Qwen2Tokenizer
            tokenizer.normalizer = normalizers.NFC()
            tokenizer.pre_tokenizer = qwen2_pre_tokenizer(bool(config.get("add_prefix_space")))
        self.template = compile_chat_template(chat_template)
        self.template_vars = {k: _token(config[k]) for k in _NAMED_TOKENS
                              if _token(config.get(k)) is not None}
        pad = _token(config.get("pad_token")) or "<|endoftext|>"
        self.pad_id = tokenizer.token_to_id(pad)
        if self.pad_id is None:
            raise ValueError(f"no pad token {pad!r} in the vocabulary")
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Qwen3Tokenizer:
        """Load a tokenizer folder (module doc) and render + encode one prompt, so that
        damaged files fail now. Raises WeightLoadError naming the folder."""
        folder = Path(folder)
        fix = "download the model folder again"
        if not (folder / "tokenizer.json").is_file():
            raise WeightLoadError(f"{folder}: no Qwen3 tokenizer (tokenizer.json); {fix}")
        try:
            cfg = folder / "tokenizer_config.json"
            config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
            tok = cls(Tokenizer.from_file(str(folder / "tokenizer.json")),
                      read_chat_template(folder, config), config)
            tok.encode(tok.render("a photo"))
            return tok
        except WeightLoadError:
            raise
        except Exception as e:  # JSON, jinja2, tokenizers errors: one line naming the folder
            why = (str(e).splitlines() or [type(e).__name__])[0]
            err = WeightLoadError(f"{folder}: cannot read the Qwen3 tokenizer ({why}); {fix}")
        raise err from None

    def render(self, prompt: str) -> str:
        """The prompt as the chat template renders it for one user message, as diffusers
        calls `apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
        enable_thinking=False)`."""
        return self.template.render(
            messages=[{"role": "user", "content": prompt}], tools=None, documents=None,
            add_generation_prompt=True, **self.template_vars, enable_thinking=False)

    def encode(self, text: str) -> list[int]:
        """Ids of already rendered text, untruncated (with whatever the tokenizer.json's
        post-processor adds: nothing for Qwen's byte-level one)."""
        return self.tokenizer.encode(text).ids

    def count_tokens(self, prompt: str) -> int:
        """Ids of the rendered prompt before truncation (the template's tokens included)."""
        return len(self.encode(self.render(prompt)))

    def __call__(self, prompts: str | list[str], max_length: int = QWEN3_MAX_LENGTH
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), each (B, max_length) int32, of the rendered
        prompts: truncated (one PromptTruncatedWarning per truncated prompt; the template's
        tail goes with it, as in diffusers) and padded with the pad id (mask 0).
        ValueError: max_length < 1."""
        if max_length < 1:
            raise ValueError(f"Qwen3 max_length {max_length} must be at least 1")
        ids, mask = [], []
        for prompt in [prompts] if isinstance(prompts, str) else prompts:
            row = self.encode(self.render(prompt))
            if len(row) > max_length:
                warnings.warn(PromptTruncatedWarning("Qwen3", len(row) - max_length, max_length),
                              stacklevel=2)
                row = row[:max_length] if self.truncation_side == "right" else row[-max_length:]
            pad = max_length - len(row)
            left = self.padding_side == "left"
            ids.append([self.pad_id] * pad * left + row + [self.pad_id] * pad * (not left))
            mask.append([0] * pad * left + [1] * len(row) + [0] * pad * (not left))
        return (np.array(ids, np.int32).reshape(-1, max_length),
                np.array(mask, np.int32).reshape(-1, max_length))


def qwen3_text_ids(batch: int, length: int) -> mx.array:
    """(batch, length, 4) int32 position ids of the text tokens: (t, h, w, l) = (0, 0, 0,
    l), as `Flux2KleinPipeline._prepare_text_ids` builds them without `t_coord`."""
    ids = mx.zeros((length, 4), mx.int32)
    ids[:, 3] = mx.arange(length, dtype=mx.int32)
    return mx.broadcast_to(ids[None], (batch, length, 4))


def encode_qwen3_prompt(encoder, tokenizer: Qwen3Tokenizer, prompts: str | list[str],
                        max_sequence_length: int = QWEN3_MAX_LENGTH,
                        dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array]:
    """(prompt_embeds, text_ids) of `prompts`, as `Flux2KleinPipeline.encode_prompt` returns
    them for one image per prompt.

    encoder: a `Qwen3TextEncoder` (`weights.qwen3.load_qwen3`); tokenizer: a
    `Qwen3Tokenizer`. prompt_embeds: (B, max_sequence_length, len(out_layers) * hidden)
    in `dtype` (None: the encoder's), each token's hidden states of the out layers
    concatenated in order; text_ids: (B, max_sequence_length, 4) int32 (`qwen3_text_ids`).
    ValueError: max_sequence_length < 1.
    """
    ids, mask = tokenizer(prompts, max_sequence_length)
    states = encoder(mx.array(ids), mx.array(mask))
    b, n, h = states[0].shape
    embeds = mx.stack(states, axis=2).reshape(b, n, len(states) * h)
    if dtype is not None:
        embeds = embeds.astype(dtype)
    return embeds, qwen3_text_ids(b, n)
