"""Text tokenizers of FLUX.1: CLIP-L byte-level BPE and T5 SentencePiece.

Fixed-length int32 ids as diffusers' FluxFillPipeline gets them from transformers
(`padding="max_length", truncation=True`; pipeline_flux_fill.py `_get_clip_prompt_embeds`,
`_get_t5_prompt_embeds`). References: transformers' `CLIPTokenizer` and `T5TokenizerFast`
(models/clip/tokenization_clip.py, models/t5/tokenization_t5.py, both `tokenizers`-backed).
Needs numpy and sentencepiece only (stdlib `unicodedata` stands in for `regex`'s \\p{L}).
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np

T5_MAX_LENGTH = 512


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the encoder's token limit; the tail was dropped.

    Attributes: `encoder` ("CLIP" or "T5"), `dropped` (number of ids removed), `limit`
    (max_length in ids, specials included).
    """

    def __init__(self, encoder: str, dropped: int, limit: int):
        self.encoder, self.dropped, self.limit = encoder, dropped, limit
        super().__init__(
            f"{encoder} prompt truncated: {dropped} token(s) beyond the {limit}-token limit "
            "were dropped"
        )


def _batch(tok, prompts: str | list[str], max_length: int, pad: int, encoder: str) -> np.ndarray:
    """(B, max_length) int32 rows: truncated keeping eos last (with a warning), then padded."""
    rows = []
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        ids = tok.encode(prompt)
        if len(ids) > max_length:
            dropped = len(ids) - max_length
            warnings.warn(PromptTruncatedWarning(encoder, dropped, max_length), stacklevel=3)
            ids = ids[: max_length - 1] + [tok.eos_id]
        rows.append(ids + [pad] * (max_length - len(ids)))
    return np.array(rows, dtype=np.int32).reshape(len(rows), max_length)


def _split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """Split `text` on literal special tokens (leftmost, longest first); ids replace them."""
    if not specials or not any(s in text for s in specials):
        return [text] if text else []
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    parts: list[str | int] = []
    for i, part in enumerate(re.split(f"({pattern})", text)):
        if i % 2:
            parts.append(specials[part])
        elif part:
            parts.append(part)
    return parts


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ---------------------------------------------------------------- CLIP

# Unicode White_Space: Oniguruma's `\s` (tokenizers' Regex) and Rust's char::is_whitespace
# (WhitespaceSplit). Python's `\s` also matches \x1c-\x1f, so it is spelled out here.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_WS += "\u2028\u2029\u202f\u205f\u3000"
_WS_RE = re.compile(f"[{_WS}]+")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_LITERALS = (_BOS, _EOS)
_CLIP_FIXED = _CLIP_LITERALS + ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP table mapping each byte to a printable unicode char."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# Combining marks that tokenizers' NFC (Unicode 9 tables) sees as ccc 0 starters, so it
# does not reorder them; found by comparing with unicodedata over all code points.
_NFC_STARTER_MARKS = re.compile(
    "([\u07fd\u0898-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b\u0d3c\u0eba\u1715"
    "\u1abf-\u1ace\u1df6-\u1dfa\ua82c\U00010d24-\U00010d27\U00010eab\U00010eac"
    "\U00010f46-\U00010f50\U00010f82-\U00010f85\U00011070\U0001133b\U0001145e"
    "\U00011839\U0001183a\U0001193d\U0001193e\U00011943\U000119e0\U00011a34\U00011a47"
    "\U00011a99\U00011d42\U00011d44\U00011d45\U00011d97\U00016ff0\U00016ff1"
    "\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef])"
)


def _clip_normalize(text: str) -> str:
    # tokenizers: NFC, Replace(\s+ -> " "), Lowercase (per char: no final-sigma rule)
    text = "".join(unicodedata.normalize("NFC", p) for p in _NFC_STARTER_MARKS.split(text))
    text = _WS_RE.sub(" ", text)
    return "".join(ch.lower() for ch in text)


def _char_class(ch: str) -> str:
    """W(hite_Space), L(etter), N(umber) or P (anything else) for the CLIP split regex."""
    return "W" if ch in _WS else {"L": "L", "N": "N"}.get(unicodedata.category(ch)[0], "P")


def _clip_pieces(text: str) -> list[str]:
    r"""CLIP's split regex on normalized text, left to right like the regex engine:
    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
    """
    cls = [_char_class(c) for c in text]
    pieces, i, n = [], 0, len(text)
    while i < n:
        fixed = next((s for s in _CLIP_FIXED if text.startswith(s, i)), "")
        j = i + max(len(fixed), 1)
        while not fixed and cls[i] in "LP" and j < n and cls[j] == cls[i]:  # runs of L / other
            j += 1
        if cls[i] != "W" or fixed:
            pieces.append(text[i:j])
        i = j
    return pieces


class ClipTokenizer:
    """CLIP-L byte-level BPE tokenizer (lower-cased), as transformers' `CLIPTokenizer`.

    `__call__` returns (B, max_length) int32: bos, BPE ids, eos, then the pad id
    (`<|endoftext|>` = 49407 for CLIP-L). Literal special tokens in a prompt map to
    their ids as in transformers (`<|endoftext|>` matched case-sensitively, `<|startoftext|>`
    after lower-casing, per the folder's `added_tokens_decoder` "normalized" flags).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad: str = _EOS,
        normalized: tuple[str, ...] = (_BOS,),
    ):
        self.vocab = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bos_id, self.eos_id, self.pad_id = vocab[_BOS], vocab[_EOS], vocab[pad]
        specials = {_BOS: self.bos_id, _EOS: self.eos_id}
        self._raw_specials = {s: i for s, i in specials.items() if s not in normalized}
        self._norm_specials = {s: i for s, i in specials.items() if s in normalized}
        self._byte_chars = _bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer:
        """Load `vocab.json` and `merges.txt` (+ `tokenizer_config.json` if present).

        Raises FileNotFoundError when vocab.json or merges.txt is missing.
        """
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(ln.split()) for ln in lines if ln and not ln.startswith("#version")]
        # transformers matches "normalized" added tokens after lower-casing: <|startoftext|>
        # for configs like FLUX's, none without a tokenizer_config.json
        config = _read_json(folder / "tokenizer_config.json")
        added = config.get("added_tokens_decoder", {}).values()
        normalized = tuple(t["content"] for t in added if t.get("normalized"))
        if not added and isinstance(config.get("bos_token"), dict):
            normalized = (_BOS,) if config["bos_token"].get("normalized") else ()
        pad = config.get("pad_token", _EOS)
        return cls(
            vocab,
            merges,
            pad=pad["content"] if isinstance(pad, dict) else pad,
            normalized=normalized,
        )

    def _bpe(self, piece: str) -> list[int]:
        """Byte-level BPE of one pre-token, `</w>` on its last symbol (lowest rank first)."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        word = [self._byte_chars[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        none = len(self.ranks)
        while len(word) > 1:  # leftmost lowest-rank pair first, as tokenizers' BPE
            rank, k = min((self.ranks.get(p, none), k) for k, p in enumerate(zip(word, word[1:])))
            if rank == none:
                break
            word[k : k + 2] = [word[k] + word[k + 1]]
        ids = [self.vocab[w] for w in word]
        if len(self._cache) < 50_000:
            self._cache[piece] = ids
        return ids

    def _encode_text(self, text: str) -> list[int]:
        out: list[int] = []
        for part in _split_specials(text, self._raw_specials):
            if isinstance(part, int):
                out.append(part)
                continue
            for sub in _split_specials(_clip_normalize(part), self._norm_specials):
                if isinstance(sub, int):
                    out.append(sub)
                    continue
                for piece in _clip_pieces(sub):
                    if piece in _CLIP_LITERALS:  # byte-level's GPT-2 regex splits "<|", word, "|>"
                        out += [
                            i for p in (piece[:2], piece[2:-2], piece[-2:]) for i in self._bpe(p)
                        ]
                    else:
                        out += self._bpe(piece)
        return out

    def encode(self, prompt: str) -> list[int]:
        """Untruncated ids of one prompt, bos and eos included."""
        return [self.bos_id, *self._encode_text(prompt), self.eos_id]

    def count_tokens(self, prompt: str) -> int:
        """Number of ids of `prompt` before truncation, bos and eos included."""
        return len(self.encode(prompt))

    def __call__(self, prompts: str | list[str], max_length: int = 77) -> np.ndarray:
        """Tokenize to (B, max_length) int32, truncated (eos kept last) and padded.

        Warns PromptTruncatedWarning per truncated prompt; raises ValueError if
        max_length < 2.
        """
        if max_length < 2:
            raise ValueError(f"CLIP max_length must be >= 2 (bos + eos), got {max_length}")
        return _batch(self, prompts, max_length, self.pad_id, "CLIP")


# ---------------------------------------------------------------- T5
# transformers' Precompiled normalizer (spm_precompiled) maps a grapheme under 6 bytes by the
# charsmap entry of its *shortest* matching prefix (e.g. "e\u0301\u0301" -> "é"); SentencePiece
# takes the longest. So the charsmap is applied here as tokenizers does, and SentencePiece
# encodes the result with its own normalisation switched off.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while buf[pos] >= 0x80:
        value, shift, pos = value | (buf[pos] & 0x7F) << shift, shift + 7, pos + 1
    return value | buf[pos] << shift, pos + 1


def _proto_fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """Protobuf fields as (number, payload, raw bytes); ModelProto and NormalizerSpec hold
    only varint and length-delimited fields at their top level."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            payload = b""
        elif wire == 2:
            size, pos = _varint(buf, pos)
            payload, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in spiece.model")
        fields.append((key >> 3, payload, buf[start:pos]))
    return fields


def _len_field(number: int, payload: bytes) -> bytes:
    out, size = bytearray([number << 3 | 2]), len(payload)
    while size >= 0x80:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    return bytes(out) + bytes([size]) + payload


def _split_model(proto: bytes) -> tuple[bytes, bytes]:
    """(charsmap, model proto with identity normalisation and no self-test data).

    ModelProto: 3 = normalizer_spec, 4 = self_test_data; NormalizerSpec: 1 name,
    2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_ws.
    """
    charsmap, kept = b"", []
    for number, payload, raw in _proto_fields(proto):
        if number == 3:
            charsmap = next((p for n, p, _ in _proto_fields(payload) if n == 2), b"")
        elif number != 4:
            kept.append(raw)
    spec = _len_field(1, b"identity") + bytes([0x18, 1, 0x20, 1, 0x28, 1])
    return charsmap, b"".join(kept) + _len_field(3, spec)


class _Charsmap:
    """SentencePiece precompiled charsmap: a darts-clone trie over UTF-8 keys plus a blob
    of NUL-terminated replacements (layout as read by spm_precompiled / sentencepiece)."""

    def __init__(self, blob: bytes):
        size = int.from_bytes(blob[:4], "little") if blob else 0
        self.units = np.frombuffer(blob[4 : 4 + size], dtype="<u4").tolist()
        self.strings = blob[4 + size :]
        self.cache: dict[str, str | None] = {}

    def shortest(self, chunk: str) -> str | None:
        """Replacement of the shortest key that prefixes `chunk`, None if no key does."""
        if chunk in self.cache:
            return self.cache[chunk]
        result, units = None, self.units
        if units:
            pos = (units[0] >> 10) << ((units[0] & 512) >> 6)
            for c in chunk.encode("utf-8"):
                if c == 0:  # spm_precompiled stops at NUL
                    break
                pos ^= c
                unit = units[pos]
                if unit & 0x800000FF != c:
                    break
                pos ^= (unit >> 10) << ((unit & 512) >> 6)
                if unit >> 8 & 1:
                    start = units[pos] & 0x7FFFFFFF
                    result = self.strings[start : self.strings.index(0, start)].decode("utf-8")
                    break
        self.cache[chunk] = result
        return result

    def normalize(self, text: str) -> str:
        """tokenizers' Precompiled.normalize: whole short graphemes, else char by char."""
        out, i, n = [], 0, len(text)
        while i < n:
            j = _grapheme_end(text, i)
            g = text[i:j]
            if j - i > 1 and len(g.encode("utf-8")) < 6:
                norm = self.shortest(g)
                if norm is not None:
                    out.append(norm)
                    i = j
                    continue
            for ch in g:
                norm = self.shortest(ch)
                out.append(ch if norm is None else norm)
            i = j
        return "".join(out)


# UAX #29 Prepend characters (2-3 byte UTF-8 ones; longer clusters are not looked up whole)
_PREPEND = set("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\u0d4e")


def _is_control(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Zl", "Zp") or (
        cat == "Cf"
        and ch not in "\u200c\u200d"
        and ch not in _PREPEND
        and not 0xE0020 <= ord(ch) <= 0xE007F
    )


def _is_extend(ch: str) -> bool:
    # UAX #29 Extend / SpacingMark / ZWJ, approximated by category (exact for marks)
    cp = ord(ch)
    return (
        unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or cp in (0x200C, 0x200D, 0xE33, 0xEB3, 0xFF9E, 0xFF9F)
        or 0x1F3FB <= cp <= 0x1F3FF
        or 0xE0020 <= cp <= 0xE007F
    )


def _grapheme_end(text: str, i: int) -> int:
    """End of the extended grapheme cluster starting at i (UAX #29 rules that can give
    clusters under 6 bytes: CR LF, controls, Prepend, Extend/SpacingMark/ZWJ)."""
    n = len(text)
    if text[i] == "\r":
        return i + 2 if text.startswith("\n", i + 1) else i + 1
    if _is_control(text[i]):
        return i + 1
    j = i
    while text[j] in _PREPEND and j + 1 < n and not _is_control(text[j + 1]):
        j += 1
    j += 1
    while j < n and _is_extend(text[j]):
        j += 1
    return j


class T5Tokenizer:
    """T5 SentencePiece tokenizer, as transformers' `T5TokenizerFast` (legacy=True).

    `__call__` returns (B, max_length) int32: SentencePiece ids, eos (`</s>`, 1), then pad
    (`<pad>`, 0). Special-token strings in a prompt (`</s>`, `<pad>`, `<unk>`,
    `<extra_id_N>`) map to their ids as in transformers; sentinel ids follow the spiece
    ids (`<extra_id_0>` last), per the folder's tokenizer_config.json (`extra_ids`).
    """

    def __init__(self, model_proto: bytes, extra_ids: int = 0):
        import sentencepiece as spm

        charsmap, identity_proto = _split_model(model_proto)
        self.charsmap = _Charsmap(charsmap)
        self.sp = spm.SentencePieceProcessor(model_proto=identity_proto)
        size = self.sp.get_piece_size()
        self.eos_id, self.pad_id, self.unk_id = self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id()
        self.specials = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.unk_id)}
        self.specials.update(
            {f"<extra_id_{k}>": size + extra_ids - 1 - k for k in range(extra_ids)}
        )
        self.vocab_size = size + extra_ids

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """Load `spiece.model` (+ `extra_ids` from `tokenizer_config.json`, default 100 as
        transformers). Raises FileNotFoundError when spiece.model is missing.
        """
        folder = Path(folder)
        proto = (folder / "spiece.model").read_bytes()
        config = _read_json(folder / "tokenizer_config.json")
        return cls(proto, extra_ids=int(config.get("extra_ids", 100)))

    def encode(self, prompt: str) -> list[int]:
        """Untruncated ids of one prompt, eos included."""
        ids: list[int] = []
        for part in _split_specials(prompt, self.specials):
            if isinstance(part, int):
                ids.append(part)
            else:  # words split on all White_Space after normalising, as WhitespaceSplit
                ids += self.sp.encode(_WS_RE.sub(" ", self.charsmap.normalize(part)))
        return ids + [self.eos_id]

    def count_tokens(self, prompt: str) -> int:
        """Number of ids of `prompt` before truncation, eos included."""
        return len(self.encode(prompt))

    def __call__(self, prompts: str | list[str], max_length: int = T5_MAX_LENGTH) -> np.ndarray:
        """Tokenize to (B, max_length) int32, truncated (eos kept last) and padded with 0.

        Warns PromptTruncatedWarning per truncated prompt. Raises ValueError when
        max_length > 512 (FLUX's T5 limit) or < 1.
        """
        if max_length > T5_MAX_LENGTH:
            raise ValueError(f"T5 max_length must be <= {T5_MAX_LENGTH}, got {max_length}")
        if max_length < 1:
            raise ValueError(f"T5 max_length must be >= 1, got {max_length}")
        return _batch(self, prompts, max_length, self.pad_id, "T5")
