"""GPT4RoITokenizer reproduces the slow LLaMA tokenizer GPT4RoI was trained with.

Golden ids come from transformers 4.29.2 itself (`tests/fixtures/tokenizer/make_golden.py`), run on a small
LLaMA-style SentencePiece model trained by the project's own `train_sentencepiece`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from model.gpt4roi.tokenization_gpt4roi import (
    ADDED_TOKENS,
    GPT4RoITokenizer,
    TokenizerFormatError,
    train_sentencepiece,
)
from tests.support import FIXTURES

TOKENIZER_FIXTURES = FIXTURES / "tokenizer"
GOLDEN = json.loads((TOKENIZER_FIXTURES / "golden_ids.json").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]


@pytest.fixture(scope="module")
def tokenizer() -> GPT4RoITokenizer:
    return GPT4RoITokenizer((TOKENIZER_FIXTURES / "tokenizer.model").read_bytes())


def sp_ids(tokenizer: GPT4RoITokenizer, text: str) -> list[int]:
    """Plain SentencePiece ids of one chunk (with its dummy prefix)."""
    return list(tokenizer.sp_model.encode(text))


# ----------------------------------------------------------------- golden
def test_golden_file_was_made_by_the_old_slow_tokenizer():
    assert GOLDEN["transformers_version"] == "4.29.2"
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_encode_matches_transformers_4_29_slow_tokenizer(tokenizer, case):
    assert tokenizer.encode(case["text"]) == case["ids"]
    assert tokenizer.convert_ids_to_tokens(case["ids"]) == case["pieces"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_decode_matches_transformers_4_29_slow_tokenizer(tokenizer, case):
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=False) == case["decoded_keep_special"]


def test_golden_added_token_ids_are_the_ones_we_assign(tokenizer):
    assert tokenizer.added_tokens == GOLDEN["added_tokens"]
    assert tokenizer.sp_vocab_size == GOLDEN["sp_vocab_size"]


# ---------------------------------------------------------- vocabulary
def test_added_tokens_follow_the_sentencepiece_vocabulary_in_release_order(tokenizer):
    v = tokenizer.sp_vocab_size
    assert list(tokenizer.added_tokens) == ["[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>"]
    assert list(tokenizer.added_tokens.values()) == list(range(v, v + 6))
    assert len(tokenizer) == v + 6
    assert (tokenizer.image_patch_token_id, tokenizer.bbox_token_id, tokenizer.point_token_id) == (v + 1, v + 2, v + 3)
    assert (tokenizer.im_start_token_id, tokenizer.im_end_token_id) == (v + 4, v + 5)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS)) == list(range(v, v + 6))
    assert tokenizer.convert_ids_to_tokens(v + 2) == "<bbox>"


def test_ids_outside_the_vocabulary_are_rejected_when_decoding(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([1, len(tokenizer)])


# ---------------------------------------------------- whitespace handling
def test_spec_example_encodes_each_chunk_separately_with_its_own_dummy_prefix(tokenizer):
    ids = tokenizer.encode("region1 <bbox> doing")
    assert ids == [1, *sp_ids(tokenizer, "region1"), tokenizer.bbox_token_id, *sp_ids(tokenizer, "doing")]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[1:4] == ["▁region", "1", "<bbox>"]
    assert pieces[4].startswith("▁")


@pytest.mark.parametrize(
    "variant",
    ["a<bbox>b", "a <bbox> b", "a \t\n <bbox>\n\n   b", "a\u3000<bbox>\u00a0b"],
)
def test_whitespace_next_to_an_added_token_is_stripped(tokenizer, variant):
    assert tokenizer.encode(variant) == tokenizer.encode("a <bbox> b")


def test_whitespace_away_from_added_tokens_is_kept(tokenizer):
    assert tokenizer.encode("a  b <bbox>") != tokenizer.encode("a b <bbox>")
    assert tokenizer.encode("x\n### ") == [1, *sp_ids(tokenizer, "x\n### ")]


def test_bos_is_optional(tokenizer):
    assert tokenizer.encode("red circle", add_bos=False) == tokenizer.encode("red circle")[1:]
    assert tokenizer.encode("") == [1]


words = st.sampled_from(["red", "circle", "region1", "left", "of", "3.5", "é", "中", "###", "?", ","])
spaces = st.sampled_from(["", " ", "  ", "\n", "\t", " \n "])
added = st.sampled_from(ADDED_TOKENS)


@st.composite
def texts_with_added_tokens(draw) -> list[tuple[str, str]]:
    """Alternating (chunk, added token) parts, so whitespace can be inserted next to the added tokens."""
    n = draw(st.integers(min_value=1, max_value=5))
    chunks = [" ".join(draw(st.lists(words, max_size=4))) for _ in range(n + 1)]
    tokens = [draw(added) for _ in range(n)]
    return list(zip(chunks, [*tokens, ""], strict=True))


@settings(max_examples=150, deadline=None)
@given(parts=texts_with_added_tokens(), pad=st.lists(spaces, min_size=12, max_size=12))
def test_property_whitespace_around_added_tokens_never_changes_ids(tokenizer, parts, pad):
    plain = "".join(chunk + token for chunk, token in parts)
    padded = "".join(
        f"{chunk}{pad[i]}{token}{pad[i + 6]}" if token else chunk for i, (chunk, token) in enumerate(parts)
    )
    assert tokenizer.encode(padded) == tokenizer.encode(plain)


@settings(max_examples=150, deadline=None)
@given(parts=texts_with_added_tokens())
def test_property_encoding_interleaves_chunk_encodings_and_added_ids(tokenizer, parts):
    text = "".join(chunk + token for chunk, token in parts)
    expected = [1]
    for chunk, token in parts:
        if chunk.strip():
            expected += sp_ids(tokenizer, chunk.strip())
        if token:
            expected.append(tokenizer.added_tokens[token])
    assert tokenizer.encode(text) == expected


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abc xyz12é中😀\n#?")), max_size=40))
def test_property_plain_text_round_trips(tokenizer, text):
    text = text.lstrip(" ")  # SentencePiece's decode drops the one leading space its dummy prefix stands for
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_added_tokens_decode_as_themselves_with_single_spaces(tokenizer):
    text = "What is the color of region1 <bbox>?\n### "
    assert tokenizer.decode(tokenizer.encode(text)) == "What is the color of region1 <bbox> ?\n### "
    assert tokenizer.batch_decode([tokenizer.encode("red"), tokenizer.encode("<im_start><im_end>")]) == [
        "red",
        "<im_start> <im_end>",
    ]


def test_skip_special_tokens_drops_bos_eos_and_pad(tokenizer):
    ids = [1, *tokenizer.encode("red", add_bos=False), 2, tokenizer.pad_added_token_id]
    assert tokenizer.decode(ids) == "red"
    # transformers 4.29 wrote a space before a control piece that follows text, and kept the one after.
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s> red</s> [PAD]"


# ----------------------------------------------------------------- offsets
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_offsets_point_at_the_text_each_token_stands_for(tokenizer, case):
    text = case["text"]
    encoded = tokenizer.encode_with_offsets(text)
    assert [i for i, _, _ in encoded] == case["ids"]
    for token_id, start, end in encoded[1:]:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece in ADDED_TOKENS or piece in ("<s>", "</s>", "<unk>"):
            assert text[start:end] == piece
        elif not piece.startswith("<0x"):
            surface = piece.replace("▁", " ")
            # A chunk's first piece carries the dummy-prefix space, which is not in the text.
            assert text[start:end] in (surface, surface[1:])
    covered = [(s, e) for _, s, e in encoded[1:]]
    assert covered == sorted(covered)


# -------------------------------------------------------------- persistence
def test_save_and_load_round_trip(tokenizer, tmp_path):
    written = tokenizer.save_pretrained(tmp_path)
    assert {p.name for p in written} == {"tokenizer.model", "tokenizer_config.json", "added_tokens.json"}
    loaded = GPT4RoITokenizer.from_pretrained(tmp_path)
    assert loaded.added_tokens == tokenizer.added_tokens
    for case in CASES:
        assert loaded.encode(case["text"]) == case["ids"]


def test_loads_the_directory_written_by_transformers_4_29():
    loaded = GPT4RoITokenizer.from_pretrained(TOKENIZER_FIXTURES / "saved_by_transformers_4_29")
    for case in CASES:
        assert loaded.encode(case["text"]) == case["ids"]


def write_official_style_dir(directory: Path, added: dict[str, int]) -> None:
    """The four files of the official release's tokenizer, as its Hub repository lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOKENIZER_FIXTURES / "tokenizer.model", directory / "tokenizer.model")
    (directory / "added_tokens.json").write_text(json.dumps(added))
    (directory / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "eos_token": {"content": "</s>"},
                "pad_token": "[PAD]",
                "unk_token": {"content": "<unk>"},
            }
        )
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048, "pad_token": None})
    )


def test_loads_an_official_style_directory_without_re_adding_tokens(tokenizer, tmp_path):
    v = tokenizer.sp_vocab_size
    write_official_style_dir(tmp_path, {t: v + i for i, t in enumerate(ADDED_TOKENS)})
    loaded = GPT4RoITokenizer.from_pretrained(tmp_path)
    assert len(loaded) == v + 6
    assert loaded.encode("region1 <bbox> doing") == tokenizer.encode("region1 <bbox> doing")


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param({"<bbox>": 1}, id="bbox-moved"),
        pytest.param({"[PAD]": -1000}, id="pad-moved"),
    ],
)
def test_official_style_directory_with_wrong_ids_is_refused(tokenizer, tmp_path, shift):
    v = tokenizer.sp_vocab_size
    added = {t: v + i for i, t in enumerate(ADDED_TOKENS)}
    for token, delta in shift.items():
        added[token] += delta
    write_official_style_dir(tmp_path, added)
    with pytest.raises(TokenizerFormatError, match=r"added_tokens\.json .*needs exactly"):
        GPT4RoITokenizer.from_pretrained(tmp_path)


def test_official_style_directory_missing_a_token_is_refused(tokenizer, tmp_path):
    v = tokenizer.sp_vocab_size
    write_official_style_dir(tmp_path, {t: v + i for i, t in enumerate(ADDED_TOKENS[:5])})
    with pytest.raises(TokenizerFormatError, match="needs exactly"):
        GPT4RoITokenizer.from_pretrained(tmp_path)


def test_directory_without_any_record_of_added_tokens_is_refused(tmp_path):
    shutil.copy(TOKENIZER_FIXTURES / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerFormatError, match="refusing to invent"):
        GPT4RoITokenizer.from_pretrained(tmp_path)


def test_directory_without_a_model_file_is_refused(tmp_path):
    with pytest.raises(TokenizerFormatError, match=r"tokenizer\.model not found"):
        GPT4RoITokenizer.from_pretrained(tmp_path)


def test_special_tokens_map_with_a_foreign_bos_is_refused(tokenizer, tmp_path):
    v = tokenizer.sp_vocab_size
    write_official_style_dir(tmp_path, {t: v + i for i, t in enumerate(ADDED_TOKENS)})
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>"}))
    with pytest.raises(TokenizerFormatError, match="bos_token"):
        GPT4RoITokenizer.from_pretrained(tmp_path)


def test_sentencepiece_model_without_the_llama_control_ids_is_refused(tmp_path):
    model = tmp_path / "m"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red circle", "a blue square"] * 20),
        model_prefix=str(model),
        vocab_size=30,
        hard_vocab_limit=False,
        unk_id=3,
        bos_id=0,
        eos_id=1,
        pad_id=2,
        minloglevel=2,
    )
    with pytest.raises(TokenizerFormatError, match="'<unk>' at id 0"):
        GPT4RoITokenizer(Path(f"{model}.model").read_bytes())


def test_garbage_instead_of_a_model_is_refused():
    with pytest.raises(TokenizerFormatError, match="not a valid SentencePiece model"):
        GPT4RoITokenizer(b"definitely not a protobuf")


# ------------------------------------------------------------- training
TRAINING_TEXTS = [
    f"What is the {attribute} of region{k} <bbox>? A {color} {shape} at {x}, {y}."
    for k, attribute in enumerate(["color", "shape", "size"], start=1)
    for color in ["red", "green", "blue"]
    for shape in ["circle", "square"]
    for x, y in [(12, 340), (5, 7), (68, 9)]
]


def test_train_sentencepiece_makes_a_llama_style_tokenizer(tmp_path):
    tokenizer = train_sentencepiece(TRAINING_TEXTS, vocab_size=300, out_dir=tmp_path)
    assert tokenizer.sp_vocab_size == 300
    assert len(tokenizer) == 306
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("1234567890", add_bos=False))
    assert pieces == ["▁", *"1234567890"]  # digits always split one by one, as in LLaMA
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("é😀", add_bos=False))[-4:] == [
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
    ]  # byte fallback for characters never seen
    assert not any("bbox" in tokenizer.convert_ids_to_tokens(i) for i in range(tokenizer.sp_vocab_size))
    reloaded = GPT4RoITokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(TRAINING_TEXTS[0]) == tokenizer.encode(TRAINING_TEXTS[0])


def test_train_sentencepiece_explains_an_impossible_vocabulary_size():
    with pytest.raises(ValueError, match="at least 260"):
        train_sentencepiece(TRAINING_TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_sentencepiece(["", "<bbox>"], vocab_size=300)
    with pytest.raises(TypeError, match="must be str"):
        train_sentencepiece([b"bytes"], vocab_size=300)


def test_a_generation_cut_inside_a_character_loses_the_broken_bytes_not_the_text(tokenizer):
    ids = tokenizer.encode("a café ☕ cup")
    pieces = [tokenizer._id_to_token(i) for i in ids]
    first_byte = pieces.index("<0xE2>")
    for cut in (first_byte + 1, first_byte + 2):  # inside the three bytes of ☕
        kept = tokenizer.drop_partial_character(ids[:cut])
        assert kept == ids[:first_byte] and "\ufffd" not in tokenizer.decode(kept)
    whole = ids[:first_byte + 3]
    assert tokenizer.drop_partial_character(whole) == whole and tokenizer.decode(whole).endswith("☕")
    assert tokenizer.drop_partial_character(ids) == ids
