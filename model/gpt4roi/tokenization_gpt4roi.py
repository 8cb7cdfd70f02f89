"""GPT4RoI tokenizer: SentencePiece plus six added tokens, with the slow-LLaMA splitting rules.

GPT4RoI was trained with the slow ``LlamaTokenizer`` of transformers 4.28/4.29. Around the added tokens
(``<bbox>``, ``<im_patch>``, ...) that tokenizer behaves in a way later versions no longer reproduce:

* the text is split on the added tokens and every remaining chunk is SentencePiece-encoded on its own,
  so every chunk gets SentencePiece's dummy prefix ``▁``;
* whitespace on both sides of an added token is stripped before encoding, so ``"region1 <bbox> doing"``
  becomes ``▁region 1 <bbox> ▁doing``;
* the SentencePiece control tokens ``<unk>``, ``<s>``, ``</s>`` written literally in the text are
  kept as single tokens but, unlike the added tokens, do not strip the whitespace around them.

This module reimplements exactly that on top of the ``sentencepiece`` library, so ids do not depend on
which transformers version is installed. ``tests/fixtures/tokenizer/golden_ids.json`` holds ids produced by
transformers 4.29.2 itself and pins the behaviour.

Only ``sentencepiece`` and the standard library are imported here: the tokenizer is usable in processes
that never load torch.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

__all__ = [
    "ADDED_TOKENS",
    "BBOX_TOKEN",
    "IMAGE_PATCH_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "POINT_TOKEN",
    "GPT4RoITokenizer",
    "TokenizerFormatError",
    "train_sentencepiece",
]

PAD_TOKEN = "[PAD]"
IMAGE_PATCH_TOKEN = "<im_patch>"
BBOX_TOKEN = "<bbox>"
POINT_TOKEN = "<point>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

#: The added tokens in id order: the i-th one has id ``V + i`` for a SentencePiece vocabulary of size V.
ADDED_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    IMAGE_PATCH_TOKEN,
    BBOX_TOKEN,
    POINT_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
UNK_PIECE, BOS_PIECE, EOS_PIECE = "<unk>", "<s>", "</s>"
# The LLaMA SentencePiece model reserves these three ids; everything downstream (the released config,
# generation's stop on EOS) assumes them.
_CONTROL_PIECES = {UNK_PIECE: UNK_ID, BOS_PIECE: BOS_ID, EOS_PIECE: EOS_ID}

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

DEFAULT_MODEL_MAX_LENGTH = 2048

_ADDED_TOKEN_PATTERN = re.compile("|".join(re.escape(t) for t in ADDED_TOKENS))


class TokenizerFormatError(ValueError):
    """A tokenizer directory or SentencePiece model does not have the GPT4RoI layout."""


class GPT4RoITokenizer:
    """SentencePiece tokenizer with GPT4RoI's six added tokens and slow-LLaMA splitting.

    Ids ``0 .. V-1`` are the SentencePiece pieces (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) and ``V .. V+5`` are
    :data:`ADDED_TOKENS`. For the LLaMA vocabulary (V = 32000) this gives ``<bbox>`` = 32002 and a total of
    32006 ids, the size of the released embedding matrix.
    """

    def __init__(self, sp_model_proto: bytes, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
        """Build a tokenizer from the serialized bytes of a SentencePiece model (a ``tokenizer.model``)."""
        self._sp_model_proto = bytes(sp_model_proto)
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.LoadFromSerializedProto(self._sp_model_proto)
        except (RuntimeError, OSError) as err:
            raise TokenizerFormatError(f"not a valid SentencePiece model: {err}") from err
        for piece, expected in _CONTROL_PIECES.items():
            actual = self.sp_model.piece_to_id(piece)
            if actual != expected or self.sp_model.id_to_piece(expected) != piece:
                raise TokenizerFormatError(
                    f"the SentencePiece model must have {piece!r} at id {expected} (LLaMA layout), "
                    f"found it at id {actual}"
                )
        self.sp_vocab_size: int = self.sp_model.get_piece_size()
        self.added_tokens: dict[str, int] = {
            token: self.sp_vocab_size + i for i, token in enumerate(ADDED_TOKENS)
        }
        self._added_by_id: dict[int, str] = {i: t for t, i in self.added_tokens.items()}
        self.model_max_length = int(model_max_length)
        # Longest first so that a token that is a prefix of another can never shadow it.
        alternatives = sorted([*ADDED_TOKENS, *_CONTROL_PIECES], key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    # ------------------------------------------------------------------ ids
    @property
    def unk_token_id(self) -> int:
        """Id of ``<unk>`` (0)."""
        return UNK_ID

    @property
    def bos_token_id(self) -> int:
        """Id of ``<s>`` (1), prepended by :meth:`encode`."""
        return BOS_ID

    @property
    def eos_token_id(self) -> int:
        """Id of ``</s>`` (2); generation stops on it."""
        return EOS_ID

    @property
    def pad_token_id(self) -> int:
        """Padding id: 0, as ``pad_token_id`` in the released ``config.json`` (not the ``[PAD]`` token)."""
        return UNK_ID

    @property
    def pad_added_token_id(self) -> int:
        """Id of the ``[PAD]`` added token (V)."""
        return self.added_tokens[PAD_TOKEN]

    @property
    def image_patch_token_id(self) -> int:
        """Id of ``<im_patch>``, one per image-feature slot."""
        return self.added_tokens[IMAGE_PATCH_TOKEN]

    @property
    def bbox_token_id(self) -> int:
        """Id of ``<bbox>``, one per region-feature slot."""
        return self.added_tokens[BBOX_TOKEN]

    @property
    def point_token_id(self) -> int:
        """Id of ``<point>`` (present in the vocabulary, unused by the model)."""
        return self.added_tokens[POINT_TOKEN]

    @property
    def im_start_token_id(self) -> int:
        """Id of ``<im_start>``, right before the image-feature slots."""
        return self.added_tokens[IM_START_TOKEN]

    @property
    def im_end_token_id(self) -> int:
        """Id of ``<im_end>``, right after the image-feature slots."""
        return self.added_tokens[IM_END_TOKEN]

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops: unk, bos, eos and ``[PAD]``."""
        return frozenset({UNK_ID, BOS_ID, EOS_ID, self.pad_added_token_id})

    def __len__(self) -> int:
        """Total number of ids: SentencePiece vocabulary plus the six added tokens."""
        return self.sp_vocab_size + len(ADDED_TOKENS)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Map a token (piece or added token) or a list of them to ids; unknown pieces map to ``<unk>``."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Map an id or a list of ids to tokens (SentencePiece pieces or added tokens)."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _token_to_id(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return int(self.sp_model.piece_to_id(token))

    def _id_to_token(self, index: int) -> str:
        if index in self._added_by_id:
            return self._added_by_id[index]
        if not 0 <= index < self.sp_vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary [0, {len(self)})")
        return self.sp_model.id_to_piece(index)

    # ------------------------------------------------------------- encoding
    def split_text(self, text: str) -> list[str]:
        """Split ``text`` like the slow tokenizer: added tokens kept whole, whitespace next to them stripped.

        Returns the non-empty parts in order; a part is either an added token, a literal control piece
        (``<s>``, ``</s>``, ``<unk>``, whose neighbours keep their whitespace) or a text chunk to be
        SentencePiece-encoded.
        """
        return [text[start:end] for start, end in self._split_spans(text)]

    def _split_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of :meth:`split_text`'s parts (text chunks already stripped)."""
        parts: list[list[int]] = []
        position = 0
        for match in self._split_pattern.finditer(text):
            parts.append([position, match.start()])
            parts.append([match.start(), match.end()])
            position = match.end()
        parts.append([position, len(text)])
        for index in range(1, len(parts), 2):
            if text[parts[index][0] : parts[index][1]] not in self.added_tokens:
                continue
            left, right = parts[index - 1], parts[index + 1]
            # str.rstrip/lstrip semantics (all Unicode whitespace), as the slow tokenizer did.
            chunk = text[left[0] : left[1]]
            left[1] = left[0] + len(chunk.rstrip())
            chunk = text[right[0] : right[1]]
            right[0] = right[1] - len(chunk.lstrip())
        return [(start, end) for start, end in parts if end > start]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Encode ``text`` to ids exactly as GPT4RoI's slow LLaMA tokenizer did (BOS first by default)."""
        return [token_id for token_id, _, _ in self.encode_with_offsets(text, add_bos=add_bos)]

    def encode_with_offsets(self, text: str, add_bos: bool = True) -> list[tuple[int, int, int]]:
        """Encode ``text`` and give each id the character span ``(start, end)`` of ``text`` it covers.

        A piece that starts with SentencePiece's ``▁`` covers the space before it; the ``▁`` that
        SentencePiece prefixes to every chunk covers nothing, so its span starts at the chunk start.
        Byte-fallback pieces of one character all carry that character's span. BOS has span ``(0, 0)``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        encoded: list[tuple[int, int, int]] = [(BOS_ID, 0, 0)] if add_bos else []
        for start, end in self._split_spans(text):
            part = text[start:end]
            special = self.added_tokens.get(part, _CONTROL_PIECES.get(part))
            if special is not None:
                encoded.append((special, start, end))
            else:
                encoded.extend(self._encode_chunk(part, start))
        return encoded

    def _encode_chunk(self, chunk: str, offset: int) -> list[tuple[int, int, int]]:
        # Pieces as strings, then piece_to_id: the path the slow tokenizer took (`_tokenize` +
        # `convert_tokens_to_ids`); an unknown surface string maps to <unk>.
        pieces: list[str] = self.sp_model.encode(chunk, out_type=str)
        surface = self._piece_surfaces(pieces)
        # The dummy prefix adds one space in front of the chunk; offsets are counted in that string.
        shifted = " " + chunk if self._adds_dummy_prefix(pieces, surface, chunk) else chunk
        if "".join(surface) != shifted:
            raise TokenizerFormatError(
                "cannot map SentencePiece pieces back to the input text; the tokenizer model must use the "
                "identity normalizer (as LLaMA's does)"
            )
        lead = len(shifted) - len(chunk)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for piece_surface in surface:
            if piece_surface:
                spans.append((cursor, cursor + len(piece_surface)))
                cursor += len(piece_surface)
            else:
                # A later byte piece of a multi-byte character covers that same character.
                spans.append(spans[-1] if spans else (cursor, cursor))
        return [
            (self._token_to_id(piece), offset + max(begin - lead, 0), offset + max(end - lead, 0))
            for piece, (begin, end) in zip(pieces, spans, strict=True)
        ]

    def _piece_surfaces(self, pieces: Sequence[str]) -> list[str]:
        """The text each piece stands for; a run of byte pieces gives its character to the first one."""
        surfaces: list[str] = []
        pending = bytearray()
        pending_index = -1
        for piece in pieces:
            byte = _byte_piece_value(piece)
            if byte is None:
                if pending:
                    surfaces[pending_index] = pending.decode("utf-8", errors="replace")
                    pending.clear()
                surfaces.append(piece.replace("▁", " "))
                continue
            if not pending:
                pending_index = len(surfaces)
            pending.append(byte)
            surfaces.append("")
            try:
                surfaces[pending_index] = pending.decode("utf-8")
                pending.clear()
            except UnicodeDecodeError:
                continue
        if pending:
            surfaces[pending_index] = pending.decode("utf-8", errors="replace")
        return surfaces

    def _adds_dummy_prefix(self, pieces: Sequence[str], surface: Sequence[str], chunk: str) -> bool:
        return len("".join(surface)) == len(chunk) + 1 and bool(pieces) and pieces[0].startswith("▁")

    def __call__(self, text: str, add_bos: bool = True) -> list[int]:
        """Same as :meth:`encode`."""
        return self.encode(text, add_bos=add_bos)

    # ------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Turn ids back into text the way the slow tokenizer did.

        SentencePiece runs are decoded as a whole (so the leading ``▁`` of a run disappears), added
        tokens are written as themselves, and the parts are joined with one space
        (``spaces_between_special_tokens=True`` in transformers 4.29). With ``skip_special_tokens``,
        ``<unk>``, ``<s>``, ``</s>`` and ``[PAD]`` are dropped; ``<bbox>`` and the image tokens stay.
        """
        ids = [int(i) for i in ids]
        skip = self.all_special_ids if skip_special_tokens else frozenset()
        parts: list[str] = []
        run: list[str] = []
        for token_id in ids:
            if token_id in skip:
                continue
            token = self._id_to_token(token_id)
            if token_id in self._added_by_id:
                if run:
                    parts.append(self._pieces_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self._pieces_to_string(run))
        return " ".join(parts)

    def _pieces_to_string(self, pieces: Sequence[str]) -> str:
        # LlamaTokenizer.convert_tokens_to_string of 4.29: control pieces are written literally, preceded by
        # a space unless they follow another one or open the sequence.
        out = ""
        current: list[str] = []
        previous_special = False
        for index, piece in enumerate(pieces):
            if piece in _CONTROL_PIECES:
                if not previous_special and index != 0:
                    out += " "
                out += self.sp_model.decode_pieces(current) + piece
                previous_special = True
                current = []
            else:
                current.append(piece)
                previous_special = False
        return out + self.sp_model.decode_pieces(current)

    def drop_partial_character(self, ids: Sequence[int]) -> list[int]:
        """`ids` without a trailing run of byte-fallback tokens that stops inside a UTF-8 character, as a
        generation cut off by its token budget can; decoded, such a tail would be a replacement character."""
        ids = [int(i) for i in ids]
        start = len(ids)
        while start > 0 and _byte_piece_value(self._id_to_token(ids[start - 1])) is not None:
            start -= 1
        tail = [_byte_piece_value(self._id_to_token(i)) for i in ids[start:]]
        return ids[:start + _complete_length(tail)]

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` applied to each sequence."""
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | Path) -> list[Path]:
        """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``added_tokens.json``; return the paths.

        ``added_tokens.json`` has the same form as the official release's, so older tools load it too.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_path = directory / MODEL_FILE
        model_path.write_bytes(self._sp_model_proto)
        config = {
            "tokenizer_class": type(self).__name__,
            "model_max_length": self.model_max_length,
            "sp_vocab_size": self.sp_vocab_size,
            "added_tokens": self.added_tokens,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "unk_token_id": self.unk_token_id,
            "pad_token_id": self.pad_token_id,
        }
        config_path = directory / CONFIG_FILE
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        added_path = directory / ADDED_TOKENS_FILE
        added_path.write_text(json.dumps(self.added_tokens, indent=2) + "\n", encoding="utf-8")
        return [model_path, config_path, added_path]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GPT4RoITokenizer:
        """Load a directory written by :meth:`save_pretrained` or by the official GPT4RoI release.

        The added tokens are never re-added: their ids are read from ``added_tokens.json`` (or, failing
        that, from ``tokenizer_config.json``) and must be exactly ``V .. V+5`` in the order of
        :data:`ADDED_TOKENS`; anything else raises :class:`TokenizerFormatError`, because the model's
        embedding rows are laid out by these ids.
        """
        directory = Path(directory)
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise TokenizerFormatError(
                f"{model_path} not found: a GPT4RoI tokenizer directory needs {MODEL_FILE}"
            )
        config = _read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
        model_max_length = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        # The official tokenizer_config.json may hold a huge sentinel for "unlimited".
        if not isinstance(model_max_length, int) or model_max_length > 10**9:
            model_max_length = DEFAULT_MODEL_MAX_LENGTH
        tokenizer = cls(model_path.read_bytes(), model_max_length=model_max_length)

        recorded: dict[str, dict] = {}
        if (directory / ADDED_TOKENS_FILE).is_file():
            recorded[ADDED_TOKENS_FILE] = _read_json(directory / ADDED_TOKENS_FILE)
        if isinstance(config.get("added_tokens"), dict):
            recorded[CONFIG_FILE] = config["added_tokens"]
        if not recorded:
            raise TokenizerFormatError(
                f"{directory} records no added tokens (neither {ADDED_TOKENS_FILE} nor 'added_tokens' in "
                f"{CONFIG_FILE}); refusing to invent their ids"
            )
        for source, mapping in recorded.items():
            if mapping != tokenizer.added_tokens:
                raise TokenizerFormatError(
                    f"{directory / source} has added tokens {mapping}, but a GPT4RoI tokenizer over this "
                    f"{tokenizer.sp_vocab_size}-piece SentencePiece model needs exactly "
                    f"{tokenizer.added_tokens}"
                )
        if (directory / SPECIAL_TOKENS_MAP_FILE).is_file():
            _check_special_tokens_map(_read_json(directory / SPECIAL_TOKENS_MAP_FILE), directory)
        return tokenizer


def _byte_piece_value(piece: str) -> int | None:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def _complete_length(values: Sequence[int | None]) -> int:
    """How many of these bytes form whole UTF-8 characters, counted from the start (a stray continuation
    byte counts as one: it is broken anyway, not cut off)."""
    position = 0
    while position < len(values):
        lead = values[position] or 0
        size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if position + size > len(values):
            return position
        position += size
    return position


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerFormatError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerFormatError(f"{path} must hold a JSON object")
    return data


def _check_special_tokens_map(mapping: dict, directory: Path) -> None:
    expected = {"bos_token": BOS_PIECE, "eos_token": EOS_PIECE, "unk_token": UNK_PIECE}
    for key, piece in expected.items():
        value = mapping.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if content is not None and content != piece:
            raise TokenizerFormatError(
                f"{directory / SPECIAL_TOKENS_MAP_FILE}: {key} is {content!r}, GPT4RoI needs {piece!r}"
            )


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> GPT4RoITokenizer:
    """Train a small LLaMA-style SentencePiece model in-process and wrap it as a GPT4RoI tokenizer.

    Settings follow LLaMA's ``tokenizer.model``: BPE, byte fallback, dummy prefix, identity normalization,
    no removal of extra whitespace, digits split one by one, ``<unk>``/``<s>``/``</s>`` at 0/1/2 and no
    SentencePiece pad piece. ``vocab_size`` counts SentencePiece pieces only (the 256 byte pieces and 3
    control pieces included); the tokenizer then has ``vocab_size + 6`` ids. Added tokens written in the
    texts are replaced by spaces before training. When ``out_dir`` is given the
    tokenizer is saved there with :meth:`GPT4RoITokenizer.save_pretrained`.
    """
    minimum = 256 + len(_CONTROL_PIECES) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 byte pieces + 3 control pieces + 1)")
    sentences: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str, got {type(text).__name__}")
        # Added tokens never reach SentencePiece (encode splits them off first), so pieces spent on
        # spelling them would be wasted.
        text = _ADDED_TOKEN_PATTERN.sub(" ", text)
        if text.strip():
            sentences.append(text)
    if not sentences:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            add_dummy_prefix=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            max_sentence_length=1 << 16,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size}: {err}. A vocabulary of this size "
            "must leave room for every distinct character of the texts (or use more varied texts)."
        ) from err
    tokenizer = GPT4RoITokenizer(buffer.getvalue(), model_max_length=model_max_length)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
