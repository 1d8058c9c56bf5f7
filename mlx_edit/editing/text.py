"""FLUX.1's tokenizers (CLIP-L byte-level BPE, T5 Unigram) on the HF `tokenizers` library.

Fixed-length int32 ids as diffusers' FluxFillPipeline gets them from transformers
(`padding="max_length", truncation=True`; pipeline_flux_fill.py `_get_*_prompt_embeds`).
A folder's `tokenizer.json` is used when present (FLUX repos ship one in `tokenizer_2/`), else
the pipeline is built as transformers 5 does (models/clip/tokenization_clip.py, models/t5/
tokenization_t5.py) from `vocab.json` + `merges.txt` (CLIP) or `spiece.model` (T5)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from mlx_edit.weights.core import WeightLoadError

T5_MAX_LENGTH = 512
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
               r"|[^\s\p{L}\p{N}]+")


class PromptTruncatedWarning(UserWarning):
    """A prompt's tail beyond the token limit was dropped. Attributes: `encoder` ("CLIP" or
    "T5"), `dropped` (ids removed), `limit` (max_length in ids, specials included)."""

    def __init__(self, encoder: str, dropped: int, limit: int):
        self.encoder, self.dropped, self.limit = encoder, dropped, limit
        super().__init__(f"{encoder} prompt truncated: {dropped} token(s) beyond the "
                         f"{limit}-token limit were dropped")


def _added_tokens(config: dict, defaults: list[str]) -> list[AddedToken]:
    """Special tokens of tokenizer_config.json's `added_tokens_decoder` (else `defaults`): their
    `normalized` flag says whether they match before or after normalisation."""
    entries = list(config.get("added_tokens_decoder", {}).values()) or [{"content": t}
                                                                       for t in defaults]
    keys = ("single_word", "lstrip", "rstrip", "normalized")
    return [AddedToken(e["content"], special=True, **{k: e[k] for k in keys if k in e})
            for e in entries]


def _clip_pipeline(folder: Path, config: dict) -> Tokenizer:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(ln.split()) for ln in lines if ln and not ln.startswith("#version")]
    tok = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=_EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.add_special_tokens(_added_tokens(config, [_BOS, _EOS]))
    tok.post_processor = processors.RobertaProcessing((_EOS, tok.token_to_id(_EOS)),
                                                      (_BOS, tok.token_to_id(_BOS)), False, False)
    return tok


def _t5_pipeline(folder: Path, config: dict) -> Tokenizer:
    from sentencepiece import sentencepiece_model_pb2  # protobuf: only without tokenizer.json
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "spiece.model").read_bytes())
    # the <extra_id_N> sentinels follow the pieces, <extra_id_0> last (as transformers')
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(int(config.get("extra_ids", 100))))]
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(t, 0.0) for t in sentinels]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    if proto.normalizer_spec.precompiled_charsmap:
        tok.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.add_special_tokens(_added_tokens(config, ["<pad>", "</s>", "<unk>", *sentinels]))
    eos = ("</s>", tok.token_to_id("</s>"))
    tok.post_processor = processors.TemplateProcessing("$A </s>", "$A </s> $B </s>", [eos])
    return tok


class _Tokenizer:
    """Loading, truncation and padding shared by `ClipTokenizer` and `T5Tokenizer`."""

    encoder, eos, pad, max_length, low, limit, files, build = "", "", "", 0, 1, 0, (), None

    def __init__(self, tokenizer: Tokenizer, pad: str | None = None):
        self.tokenizer = tokenizer
        tokenizer.no_padding(), tokenizer.no_truncation()  # a tokenizer.json may set them
        self.eos_id, self.pad_id = (tokenizer.token_to_id(t) for t in (self.eos, pad or self.pad))
        if None in (self.eos_id, self.pad_id):
            raise ValueError(f"no {self.eos!r} or {pad or self.pad!r} token")
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_folder(cls, folder: str | Path):
        """Load `tokenizer.json` if present, else the classic files (module doc), with
        tokenizer_config.json's special tokens. WeightLoadError: files missing or damaged."""
        folder = Path(folder)
        tj, fix = folder / "tokenizer.json", "download the model folder again"
        if not tj.is_file() and not all((folder / f).is_file() for f in cls.files):
            raise WeightLoadError(f"{folder}: no {cls.encoder} tokenizer (tokenizer.json or "
                                  f"{' + '.join(cls.files)}); {fix}")
        try:
            cfg = folder / "tokenizer_config.json"
            config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
            pad = config.get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            return cls(Tokenizer.from_file(str(tj)) if tj.is_file() else cls.build(folder, config), pad)
        except Exception as e:  # JSON, protobuf, tokenizers errors: one line naming the folder
            why = (str(e).splitlines() or [type(e).__name__])[0]
            err = WeightLoadError(f"{folder}: cannot read the {cls.encoder} tokenizer ({why}); {fix}")
        raise err from None

    def encode(self, prompt: str) -> list[int]:  # untruncated, specials (bos, eos) included
        return self.tokenizer.encode(prompt).ids

    def count_tokens(self, prompt: str) -> int:  # before truncation, specials included
        return len(self.encode(prompt))

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
        """(B, max_length) int32 ids: truncated keeping eos last (one PromptTruncatedWarning
        per truncated prompt), then padded. ValueError: max_length < 2 (CLIP), not 1..512 (T5)."""
        n = self.max_length if max_length is None else max_length
        if n < self.low or (self.limit and n > self.limit):
            raise ValueError(f"{self.encoder} max_length {n} not in {self.low}..{self.limit or ''}")
        rows = []
        for ids in (self.encode(p) for p in ([prompts] if isinstance(prompts, str) else prompts)):
            if len(ids) > n:
                warnings.warn(PromptTruncatedWarning(self.encoder, len(ids) - n, n), stacklevel=2)
                ids = ids[: n - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        return np.array(rows, dtype=np.int32).reshape(len(rows), n)


class ClipTokenizer(_Tokenizer):
    """CLIP-L, as transformers' `CLIPTokenizer`: (B, 77) ids: bos 49406, BPE ids, eos, pad."""

    encoder, eos, pad, max_length, low = "CLIP", _EOS, _EOS, 77, 2
    files, build = ("vocab.json", "merges.txt"), staticmethod(_clip_pipeline)


class Sam3Tokenizer(ClipTokenizer):
    """SAM 3's CLIP tokenizer as `Sam3Processor` calls it (padding="max_length",
    max_length=32): ids padded with eos, plus the attention mask the text encoder needs."""

    max_length = 32

    def with_mask(self, prompts: str | list[str], max_length: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both (B, max_length) int32; mask 1 on the tokens
        (bos .. eos), 0 on padding. Truncation and errors as `__call__`."""
        ids = self(prompts, max_length)
        rows = [prompts] if isinstance(prompts, str) else prompts
        lengths = np.array([min(self.count_tokens(p), ids.shape[1]) for p in rows])
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return ids, mask.astype(np.int32)


class T5Tokenizer(_Tokenizer):
    """T5, as transformers' `T5TokenizerFast`: (B, 512) ids, eos (`</s>`, 1), pad (`<pad>`, 0);
    the `<extra_id_N>` sentinels follow the pieces, `<extra_id_0>` last."""

    encoder, eos, pad, max_length, limit = "T5", "</s>", "<pad>", T5_MAX_LENGTH, T5_MAX_LENGTH
    files, build = ("spiece.model",), staticmethod(_t5_pipeline)
