"""Tokenizer fixture files in the layout of the FLUX.1 checkpoint folders.

- `write_clip_tokenizer(folder)`: the real CLIP-L BPE (49408 ids), written as
  `openai/clip-vit-large-patch14`'s `tokenizer/` folder (`vocab.json`, `merges.txt`,
  `special_tokens_map.json`, `tokenizer_config.json`). The merges come from the BPE file
  that the open-clip-torch wheel ships (`open_clip/bpe_simple_vocab_16e6.txt.gz`), which
  holds the same merges as OpenAI's CLIP; open_clip itself is never imported.
- `write_t5_tokenizer(folder)`: no real T5 `spiece.model` is available offline, so a small
  unigram SentencePiece model (1000 pieces) is trained here with T5's special ids
  (`<pad>`=0, `</s>`=1, `<unk>`=2, no bos) on a corpus generated deterministically from
  the CLIP BPE word list, and written as FLUX.1's `tokenizer_2/` folder (`spiece.model`,
  configs and the `tokenizer.json` the FLUX repos also ship).

- `write_qwen3_tokenizer(folder)`: a small byte-level BPE (`QWEN3_BPE_SIZE` ids trained
  here by HF `tokenizers` on a fixed corpus, then Qwen's special and added tokens) with
  Qwen2's normaliser and pre-tokenizer and a Qwen3-style chat template, written as
  FLUX.2 [klein]'s `tokenizer/` folder (`tokenizer.json`, `tokenizer_config.json` with the
  template, as the Qwen3 hub files hold it). transformers loads it as `Qwen2Tokenizer`.

Neither torch nor transformers is needed (the non-parity tests run without them).

Used by `scripts/make_tiny_checkpoint.py` and by the tokenizer tests.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import itertools
import json
import random
from pathlib import Path

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_NUM_MERGES = 49152 - 256 - 2  # 48894, as in OpenAI's SimpleTokenizer
T5_SPIECE_SIZE = 1000
T5_EXTRA_IDS = 100  # sentinel tokens <extra_id_N>, added after the spiece ids as in real T5


CLIP_BPE_MISSING = ("the CLIP tokenizer's BPE merges ship in open-clip-torch, which is not "
                    "installed: pip install --no-deps open-clip-torch (its data only; no torch)")


def clip_bpe_path() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed open-clip-torch wheel.

    Raises FileNotFoundError when open-clip-torch is not installed.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(CLIP_BPE_MISSING)
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(CLIP_BPE_MISSING)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte -> printable unicode char table (same order as OpenAI's clip/simple_tokenizer)
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


def clip_merges() -> list[tuple[str, str]]:
    """The 48894 CLIP merges, in rank order (header line skipped)."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab)}


def _special(content: str, normalized: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: str | Path) -> None:
    """Write the CLIP-L tokenizer files (vocab 49408: bos 49406, eos = pad = unk 49407).

    The configs follow FLUX.1's `tokenizer/` folder (a copy of openai/clip-vit-large-patch14).
    Raises FileNotFoundError when open-clip-torch is not installed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    vocab = _clip_vocab(merges)
    assert len(vocab) == 49408, len(vocab)
    _write_json(folder / "vocab.json", vocab)
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": _special(CLIP_BOS, True),
            "eos_token": _special(CLIP_EOS, False),
            "pad_token": CLIP_EOS,
            "unk_token": _special(CLIP_EOS, False),
        },
    )
    added = {
        str(vocab[CLIP_BOS]): {**_special(CLIP_BOS, True), "special": True},
        str(vocab[CLIP_EOS]): {**_special(CLIP_EOS, False), "special": True},
    }
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "bos_token": CLIP_BOS,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": CLIP_EOS,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": CLIP_EOS,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_EOS,
        },
    )


# Words the CLIP list lacks as whole ASCII words: accents, so the T5 model has those chars.
_ACCENTED = (
    "café naïve über façade São Paulo Straße résumé piñata smörgåsbord crème brûlée "
    "Ångström jalapeño déjà vu fiancée Zürich Kraków Málaga Øresund Æsir señor coöperate"
).split()
_PUNCT = [",", ".", "!", "?", ";", ":", " -", "'s", "'", '"', "(", ")", "&", "%", "#", "/"]


def t5_corpus(num_sentences: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences for training the fixture SentencePiece model.

    Words are drawn from the CLIP BPE's whole-word merges with Zipf weights (merge rank
    roughly follows frequency), plus accented words, digits and punctuation.
    """
    words = []
    for a, b in clip_merges():
        w = a + b
        if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 5:
            words.append(w[:-4])
    cum_weights = list(itertools.accumulate(1.0 / (rank + 20) for rank in range(len(words))))
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        toks = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 16))
        for j in range(len(toks)):
            r = rng.random()
            if r < 0.05:
                toks[j] = toks[j].capitalize()
            elif r < 0.07:
                toks[j] = rng.choice(_ACCENTED)
            elif r < 0.10:
                toks[j] = str(rng.randint(0, 2048))
            elif r < 0.18:
                toks[j] += rng.choice(_PUNCT)
        text = " ".join(toks)
        sentences.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", ""]))
    return sentences


def train_t5_spiece(vocab_size: int = T5_SPIECE_SIZE) -> bytes:
    """Train the fixture unigram model; returns the serialized `spiece.model` bytes.

    Single-threaded, unshuffled, unsampled input, so the result is the same on every run
    of a given sentencepiece version. T5 ids: pad 0, eos 1, unk 2, no bos; nmt_nfkc
    normalisation, dummy prefix and whitespace cleanup as in T5's own spiece.model.
    """
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_corpus()),
        model_writer=out,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        split_digits=False,
        byte_fallback=False,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


def write_t5_tokenizer(folder: str | Path) -> int:
    """Write `spiece.model`, `tokenizer_config.json`, `special_tokens_map.json` and
    `tokenizer.json` (`write_t5_tokenizer_json`).

    Returns the number of ids the tokenizer can emit: the spiece pieces (1000) plus the
    100 `<extra_id_N>` sentinels that transformers appends (ids 1000..1099, `<extra_id_0>`
    last), like google/t5-v1_1-xxl (32000 + 100). Text encoders built for this fixture
    need at least that many embedding rows.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_t5_spiece())
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    specials = {0: "<pad>", 1: "</s>", 2: "<unk>"}
    specials.update({T5_SPIECE_SIZE + T5_EXTRA_IDS - 1 - i: t for i, t in enumerate(extra)})
    added = {str(i): {**_special(t, False), "special": True} for i, t in sorted(specials.items())}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": True,
            "added_tokens_decoder": added,
            "additional_special_tokens": extra,
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": T5_EXTRA_IDS,
            "legacy": True,
            "model_max_length": 512,
            "pad_token": "<pad>",
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": extra,
            "eos_token": _special("</s>", False),
            "pad_token": _special("<pad>", False),
            "unk_token": _special("<unk>", False),
        },
    )
    write_t5_tokenizer_json(folder)
    return T5_SPIECE_SIZE + T5_EXTRA_IDS


def write_t5_tokenizer_json(folder: str | Path) -> None:
    """Add `tokenizer.json` (as the FLUX repos ship in `tokenizer_2/`) to a folder holding
    `spiece.model` + `tokenizer_config.json`: the HF `tokenizers` pipeline that mlx-edit
    builds from them (mlx_edit.editing.text), whose ids the tokenizer tests check against
    transformers' own conversion."""
    from mlx_edit.editing.text import T5Tokenizer

    folder = Path(folder)
    T5Tokenizer.from_folder(folder).tokenizer.save(str(folder / "tokenizer.json"))


QWEN3_BPE_SIZE = 600  # byte alphabet (256) + merges; the specials follow
# Qwen's control tokens (special) and the thinking tags (added, not special), in id order
QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN3_ADDED = ("<think>", "</think>")
# A Qwen3-style chat template (ours, not Qwen's text): system/user/assistant turns, the
# generation prompt, and the empty thinking block when enable_thinking is false.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{{- raise_exception('message content must be a string') }}{%- endif %}\n"
    "{{- '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}\n"
    "{%- endif %}\n"
)
_QWEN3_WORDS = (
    "a photo of the cat dog on red blue green sofa in front window with light soft warm "
    "make it replace remove add sky sunset winter snow painting style oil watercolor "
    "portrait woman man child smiling hat glasses street city night neon rain reflection "
    "mountain lake forest tree flowers garden table cup coffee book old wooden house door "
    "turn into change background color bright dark golden hour cinematic detailed sharp"
).split()
_QWEN3_EXTRA = ("café naïve Zürich São Paulo 東京 の 写真 猫 😀 🎨 — “quoted” 2048 3.14 "
                "don't it's we'll I'm they're\n\ttabs  spaces").split(" ")


def qwen3_corpus(num_sentences: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic short sentences (English words, some accents, CJK, emoji, digits,
    punctuation, newlines) for training the fixture BPE."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_sentences):
        words = rng.choices(_QWEN3_WORDS, k=rng.randint(3, 12))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_QWEN3_EXTRA))
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", "", "\n"]))
    return out


def write_qwen3_tokenizer(folder: str | Path) -> int:
    """Write FLUX.2 [klein]'s `tokenizer/` files for the fixture (module doc) to `folder`.

    Returns the number of ids the tokenizer can emit (`QWEN3_BPE_SIZE` plus the 5
    special/added tokens, `<|endoftext|>` = pad first): Qwen3 text encoders built for this
    fixture need at least that `vocab_size`. Torch-free (HF `tokenizers`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    from tokenizers.models import BPE

    from mlx_edit.editing.text_qwen3 import qwen2_pre_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=QWEN3_BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(qwen3_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in QWEN3_SPECIALS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN3_ADDED])
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {**_special(t, False), "special": t in QWEN3_SPECIALS}
             for t in (*QWEN3_SPECIALS, *QWEN3_ADDED)}
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 40960,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return tok.get_vocab_size()
