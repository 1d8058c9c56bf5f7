"""CLIP BPE and T5 Unigram tokenizers (mlx_edit.editing.text) against transformers on the same files.

The fixture files are the real CLIP-L BPE (from open-clip-torch's wheel) and a small T5
unigram model trained by scripts/tokenizer_files.py, which also writes the T5 `tokenizer.json`.
Both load paths are checked: `tokenizer.json` (ours, and one written by transformers'
`save_pretrained`) and the classic files (`vocab.json` + `merges.txt`, `spiece.model`).
transformers 5 has no slow (SentencePiece) T5 class: `T5Tokenizer` is `T5TokenizerFast`;
the legacy slow path (SentencePiece encode + eos) is checked on ordinary prompts by
`_sp_legacy_ids` below.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import json
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from mlx_edit.editing.text import ClipTokenizer, PromptTruncatedWarning, T5Tokenizer
from mlx_edit.weights.core import WeightLoadError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tokenizer_files  # noqa: E402

WORDS = (
    "a photo of cat dog sitting on the red couch portrait woman man wearing hat city street "
    "at night neon lights cinematic lighting highly detailed 8k oil painting watercolor sky "
    "mountains lake reflection golden hour sunset fog forest ancient castle dragon flying over "
    "sea waves beach sand close-up macro shot bokeh depth field studio background white"
).split()
FRAGMENTS = [
    "Café", "naïve", "Straße", "İstanbul", "ΟΔΟΣ", "Ελληνικά", "Москва", "ﬁne", "ＡＢＣ１２",
    "e\u0301", "e\u0301\u0301", "e\u0323\u0302", "Tiếng Việt", "Ångström", "crème brûlée",
    "一只猫坐在沙发上", "日本語のテキスト", "한국어 문장", "ｶﾞ", "שָׁלוֹם", "مَرْحَبًا", "हिन्दी",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "ℹ\ufe0f", "™\ufe0f", "1\ufe0f\u20e3",
    "!!!", "...", "?!", "—", "–", "«»", "“quoted”", "'", '"', "(", ")", "[x]", "{y}", "#tag",
    "@user", "a/b", "x_y", "50%", "$9.99", "3.14", "1,000", "2024-01-01", "½", "²", "٣", "Ⅻ",
    "①", "㎏", "…", "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "DON'T",
    "O'Neil", "rock'n'roll", "''s", "!'s", "aaaaaaa", "zzzz!!!!", "ǅ", "ß", "ﬀ",
    "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|STARTOFTEXT|>", "x<|endoftext|>!",
    "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_99>", "<extra_id_100>", "▁", "a▁b",
    "\x00", "\x07", "\x7f", "\u200b", "\ufeff", "\u0085", "\u2028", "\u00a0", "\u3000",
    "\u2003", "\x1c", "a\u1df6\u0334", "…\u0301", "\u200f\u036a", "\u0604Ｊ\u0745", "ຳ\u0748",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", "", "  ", "\n", "\t", "\r\n", " \n\t "]


def make_prompts(seed: int = 0) -> list[str]:
    """Deterministic prompts: specials cases, realistic, unicode mixes and long ones."""
    rng = random.Random(seed)
    prompts = ["", " ", "\n\t  ", "\u3000", "\u0085", "a", "A PHOTO OF A CAT"]
    for _ in range(300):  # prompt-like English, mixed case and punctuation
        words = rng.choices(WORDS, k=rng.randint(3, 25))
        words = [w.capitalize() if rng.random() < 0.15 else w for w in words]
        prompts.append(", ".join(" ".join(words[k : k + 4]) for k in range(0, len(words), 4)))
    for _ in range(700):  # unicode, numbers, contractions, specials, odd whitespace
        parts = [rng.choice(FRAGMENTS if rng.random() < 0.6 else WORDS) for _ in range(12)]
        prompts.append("".join(p + rng.choice(SEPARATORS) for p in parts[: rng.randint(1, 12)]))
    for n_words in (50, 60, 70, 80, 100, 120, 150, 200, 300, 400, 600, 900):  # CLIP/T5 limits
        prompts.append(" ".join(rng.choices(WORDS + FRAGMENTS[:40], k=n_words)))
    return prompts


PROMPTS = make_prompts()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """tokenizer/ (CLIP files), tokenizer_2/ (T5 files with tokenizer.json) and
    tokenizer_2_spiece/ (the same without tokenizer.json: the spiece.model path)."""
    root = tmp_path_factory.mktemp("tokenizers")
    tokenizer_files.write_clip_tokenizer(root / "tokenizer")
    tokenizer_files.write_t5_tokenizer(root / "tokenizer_2")
    shutil.copytree(root / "tokenizer_2", root / "tokenizer_2_spiece")
    (root / "tokenizer_2_spiece" / "tokenizer.json").unlink()
    return root


@pytest.fixture(scope="session")
def clip(tok_dir) -> ClipTokenizer:
    return ClipTokenizer.from_folder(tok_dir / "tokenizer")


@pytest.fixture(scope="session")
def t5(tok_dir) -> T5Tokenizer:
    return T5Tokenizer.from_folder(tok_dir / "tokenizer_2")


@pytest.fixture(scope="session")
def t5_spiece(tok_dir) -> T5Tokenizer:
    return T5Tokenizer.from_folder(tok_dir / "tokenizer_2_spiece")


@pytest.fixture(scope="session")
def hf_clip(tok_dir):
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(tok_dir / "tokenizer")


@pytest.fixture(scope="session", params=["T5TokenizerFast", "T5Tokenizer"])
def hf_t5(request, tok_dir):
    """transformers' own conversion of spiece.model (the folder without our tokenizer.json)."""
    import transformers

    return getattr(transformers, request.param).from_pretrained(tok_dir / "tokenizer_2_spiece")


@pytest.fixture(scope="session")
def hf_saved(tok_dir, hf_clip):
    """Folders holding only transformers' own `tokenizer.json` + `tokenizer_config.json`."""
    import transformers

    out = tok_dir / "hf_saved"
    hf_clip.save_pretrained(out / "tokenizer")
    t5 = transformers.T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2_spiece")
    t5.save_pretrained(out / "tokenizer_2")
    for sub in ("tokenizer", "tokenizer_2"):
        assert sorted(f.name for f in (out / sub).iterdir()) == [
            "tokenizer.json", "tokenizer_config.json"]
    return out


def _ours(tok, prompts, max_length):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok(prompts, max_length=max_length)


def _mismatches(ours: np.ndarray, ref: list[list[int]]) -> list[tuple[str, list, list]]:
    ref = np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.int32
    return [
        (PROMPTS[i], ours[i].tolist(), ref[i].tolist())
        for i in np.flatnonzero((ours != ref).any(1))
    ]


def test_fixture_files(tok_dir):
    clip_dir, t5_dir = tok_dir / "tokenizer", tok_dir / "tokenizer_2"
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407 and vocab["photo</w>"] < 49406
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    config = json.loads((t5_dir / "tokenizer_config.json").read_text())
    assert config["extra_ids"] == 100 and config["model_max_length"] == 512
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    assert sp.get_piece_size() == 1000 and sp.id_to_piece(1) == "</s>" and sp.bos_id() == -1
    assert (t5_dir / "tokenizer.json").is_file()
    for folder in (t5_dir, tok_dir / "tokenizer_2_spiece"):
        t5 = T5Tokenizer.from_folder(folder)
        assert t5.vocab_size == 1100 and (t5.pad_id, t5.eos_id) == (0, 1)
        ids = {t: t5.tokenizer.token_to_id(t) for t in ("<unk>", "<extra_id_0>", "<extra_id_99>")}
        assert ids == {"<unk>": 2, "<extra_id_0>": 1099, "<extra_id_99>": 1000}


def test_t5_fixture_training_is_deterministic(tok_dir, tmp_path):
    spiece = (tok_dir / "tokenizer_2" / "spiece.model").read_bytes()
    assert tokenizer_files.train_t5_spiece() == spiece
    shutil.copytree(tok_dir / "tokenizer_2_spiece", tmp_path / "t5")
    tokenizer_files.write_t5_tokenizer_json(tmp_path / "t5")
    written = (tok_dir / "tokenizer_2" / "tokenizer.json").read_bytes()
    assert (tmp_path / "t5" / "tokenizer.json").read_bytes() == written


def test_t5_tokenizer_json_and_spiece_paths_agree(t5, t5_spiece):
    assert t5.tokenizer is not t5_spiece.tokenizer
    assert np.array_equal(_ours(t5, PROMPTS, 512), _ours(t5_spiece, PROMPTS, 512))
    assert [t5.count_tokens(p) for p in PROMPTS] == [t5_spiece.count_tokens(p) for p in PROMPTS]


def test_clip_tokenizer_json_path(clip, tok_dir, tmp_path):
    """A CLIP folder with only tokenizer.json (as transformers 5 saves one) gives the same ids."""
    clip.tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = ClipTokenizer.from_folder(tmp_path)
    assert np.array_equal(_ours(from_json, PROMPTS, 77), _ours(clip, PROMPTS, 77))


@pytest.mark.parametrize("cls,files", [(ClipTokenizer, ("vocab.json", "merges.txt")),
                                       (T5Tokenizer, ("spiece.model",))])
def test_missing_tokenizer_files_are_one_line_errors(tmp_path, cls, files):
    with pytest.raises(WeightLoadError) as info:
        cls.from_folder(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "tokenizer.json" in message
    assert all(f in message for f in files)


@pytest.mark.parametrize("sub,name,cls,data", [
    ("tokenizer", "vocab.json", ClipTokenizer, b'{"a": 1'),
    ("tokenizer", "merges.txt", ClipTokenizer, b"#version: 0.2\nq z\n"),
    ("tokenizer_2_spiece", "spiece.model", T5Tokenizer, b"\x0a\xff\xff not a model"),
    ("tokenizer_2", "tokenizer.json", T5Tokenizer, b'{"version": "1.0", "model": 3}'),
    ("tokenizer_2", "tokenizer_config.json", T5Tokenizer, b"{not json"),
])
def test_damaged_tokenizer_files_are_one_line_errors(tok_dir, tmp_path, sub, name, cls, data):
    folder = tmp_path / sub
    shutil.copytree(tok_dir / sub, folder)
    (folder / name).write_bytes(data)
    with pytest.raises(WeightLoadError, match="cannot read the") as info:
        cls.from_folder(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


@pytest.mark.parity
def test_fixture_files_load_in_transformers(tok_dir, hf_clip, hf_t5):
    import transformers

    assert (hf_clip.bos_token_id, hf_clip.eos_token_id, hf_clip.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    assert len(hf_clip) == 49408 and hf_clip.model_max_length == 77
    by_files = transformers.CLIPTokenizer(
        str(tok_dir / "tokenizer" / "vocab.json"), str(tok_dir / "tokenizer" / "merges.txt")
    )
    assert (by_files.bos_token_id, by_files.eos_token_id) == (49406, 49407)
    assert by_files("a photo of a cat").input_ids == hf_clip("a photo of a cat").input_ids
    assert (hf_t5.pad_token_id, hf_t5.eos_token_id, hf_t5.unk_token_id) == (0, 1, 2)
    assert len(hf_t5) == 1100 and hf_t5.convert_tokens_to_ids("<extra_id_0>") == 1099
    assert hf_t5.bos_token_id is None


def test_prompt_set_covers_the_cases(clip, t5):
    assert len(PROMPTS) >= 1000 and PROMPTS == make_prompts()  # deterministic
    assert "" in PROMPTS and any("  " in p or "\t" in p for p in PROMPTS)
    assert any(ord(c) > 0x4E00 for p in PROMPTS for c in p)  # CJK
    assert any(ord(c) > 0x1F000 for p in PROMPTS for c in p)  # emoji
    assert sum(clip.count_tokens(p) > 77 for p in PROMPTS) >= 10
    assert sum(t5.count_tokens(p) > 512 for p in PROMPTS) >= 2


@pytest.mark.parity
@pytest.mark.parametrize("files", ["vocab+merges", "transformers tokenizer.json"])
def test_clip_ids_match_transformers(clip, hf_clip, hf_saved, files):
    ours = clip if files == "vocab+merges" else ClipTokenizer.from_folder(hf_saved / "tokenizer")
    ref = hf_clip(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert _mismatches(_ours(ours, PROMPTS, 77), ref) == []
    untruncated = hf_clip(PROMPTS).input_ids
    assert [ours.count_tokens(p) for p in PROMPTS] == [len(ids) for ids in untruncated]


@pytest.mark.parity
@pytest.mark.parametrize("files", ["tokenizer.json", "spiece.model", "transformers tokenizer.json"])
@pytest.mark.parametrize("max_length", [512, 48])
def test_t5_ids_match_transformers(t5, t5_spiece, hf_t5, hf_saved, files, max_length):
    ours = {"tokenizer.json": t5, "spiece.model": t5_spiece}.get(files) \
        or T5Tokenizer.from_folder(hf_saved / "tokenizer_2")
    ref = hf_t5(PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    assert _mismatches(_ours(ours, PROMPTS, max_length), ref) == []
    if max_length == 512:
        untruncated = hf_t5(PROMPTS).input_ids
        assert [ours.count_tokens(p) for p in PROMPTS] == [len(ids) for ids in untruncated]


def _sp_legacy_ids(sp, prompt: str, specials: dict[str, int]) -> list[int]:
    """transformers 4's slow T5Tokenizer (legacy=True): spm encode per special-split part."""
    import re

    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    parts = [p for p in re.split(pattern, prompt) if p]
    return [i for p in parts for i in ([specials[p]] if p in specials else sp.encode(p))] + [1]


@pytest.mark.parity
def test_t5_matches_sentencepiece_on_ordinary_prompts(t5, tok_dir):
    """The slow path differs from the fast one (which we follow) only on U+0085 and on marks
    stacked on a character the charsmap rewrites; elsewhere the ids are the same."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer_2" / "spiece.model"))
    ordinary = [
        p for p in PROMPTS if "\x85" not in p and not any(0x300 <= ord(c) < 0x370 for c in p)
    ]
    assert len(ordinary) > 600
    specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    specials.update({f"<extra_id_{k}>": 1099 - k for k in range(100)})
    assert [t5.encode(p) for p in ordinary] == [
        _sp_legacy_ids(sp, p, specials) for p in ordinary
    ]


@pytest.mark.parametrize("name,limit", [("clip", 77), ("t5", 512), ("t5", 20)])
def test_truncation_warns_with_dropped_count(request, name, limit):
    tok = request.getfixturevalue(name)
    prompt = " ".join(["photograph", "of", "mountains"] * 200)
    count = tok.count_tokens(prompt)
    assert count > limit
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = tok(prompt, max_length=limit)
    assert len(record) == 1
    w = record[0].message
    assert (w.encoder, w.dropped, w.limit) == (name.upper(), count - limit, limit)
    assert str(count - limit) in str(w) and str(limit) in str(w)
    assert ids.shape == (1, limit) and ids[0, -1] == tok.eos_id
    assert ids[0].tolist() == tok.encode(prompt)[: limit - 1] + [tok.eos_id]


@pytest.mark.parametrize("name", ["clip", "t5"])
def test_no_warning_when_prompt_fits_exactly(request, name):
    tok = request.getfixturevalue(name)
    prompt = " ".join(["photograph"] * 40)
    count = tok.count_tokens(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        ids = tok(prompt, max_length=count)
    assert ids[0].tolist() == tok.encode(prompt)


def test_t5_max_length_over_512_raises(t5):
    with pytest.raises(ValueError, match="512"):
        t5("a cat", max_length=513)
    assert t5("a cat", max_length=512).shape == (1, 512)


def test_too_short_max_length_raises(clip, t5):
    with pytest.raises(ValueError, match="max_length 0"):
        t5("a cat", max_length=0)
    with pytest.raises(ValueError, match="max_length 1"):
        clip("a cat", max_length=1)  # no room for bos and eos
    with pytest.warns(PromptTruncatedWarning):  # the smallest lengths: only the specials
        assert t5("a cat", max_length=1).tolist() == [[1]]
        assert clip("a", max_length=2).tolist() == [[49406, 49407]]


def test_batch_input(clip, t5):
    prompts = ["a cat", "", "A DOG on a couch, don't move!"]
    for tok, length, pad in ((clip, 77, 49407), (t5, 512, 0)):
        batch = tok(prompts, max_length=length)
        assert batch.shape == (3, length) and batch.dtype == np.int32
        assert np.array_equal(batch, np.concatenate([tok(p, max_length=length) for p in prompts]))
        assert batch[1, 1 if tok is clip else 0] == tok.eos_id and batch[1, -1] == pad
        assert tok([], max_length=length).shape == (0, length)
    assert clip("a cat")[0, :4].tolist() == [49406, 320, 2368, 49407]
