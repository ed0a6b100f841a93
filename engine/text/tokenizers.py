"""Tokenizers: text to integer ids and back.

Three kinds, one interface (``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``token_to_id``/``id_to_token`` for special tokens):

- :class:`ByteTokenizer`: the UTF-8 bytes of the text, ids 0-255, plus optional special tokens at
  fixed ids from 256 on. Needs no vocabulary and no training; any Unicode text round-trips.
- :class:`CharTokenizer`: one id per character seen in a corpus (``from_text``), with an unknown
  token for characters it never saw; saved and loaded as JSON.
- :class:`BPETokenizer`: byte-level BPE through Hugging Face's ``tokenizers`` library (the ``text``
  extra: ``pip install -e ".[text]"`` from a checkout), for real vocabularies.

Example:
    >>> tok = ByteTokenizer(special_tokens=["<pad>", "<bos>", "<eos>"])
    >>> ids = tok.encode("héllo", add_bos=True)
    >>> ids
    [257, 104, 195, 169, 108, 108, 111]
    >>> tok.decode(ids, skip_special_tokens=True)
    'héllo'
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from engine.errors import install_hint
from engine.io import open_regular_file, write_atomically
from engine.tensor import Tensor

# UTF-16 surrogates: a str may hold one alone (from errors="surrogateescape"), UTF-8 cannot
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_specials(where: str, special_tokens) -> list[str]:
    """The special tokens as a list of distinct non-empty strings (their order fixes their ids)."""
    if isinstance(special_tokens, str):
        raise TypeError(f"{where}: special_tokens must be a list of strings, got the string {special_tokens!r}")
    tokens = list(special_tokens)
    bad = [t for t in tokens if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"{where}: special tokens must be non-empty strings, got {bad!r}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{where}: special tokens repeat: {tokens!r}")
    return tokens


def _id_list(where: str, ids) -> list[int]:
    """``ids`` (a list, a 1-D array or Tensor of ints) as a list of Python ints."""
    if isinstance(ids, Tensor):
        ids = ids.numpy()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"{where}: expected a 1-D array of integer ids, got shape {ids.shape} dtype {ids.dtype}")
        return ids.tolist()
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{where}: ids must be ints, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    return out


def _check_id(where: str, i, vocab_size: int) -> int:
    """``i`` as a Python int if it is an id of a vocabulary of ``vocab_size``; else a clear error."""
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"{where}: an id is an int, got {i!r} ({type(i).__name__})")
    if not 0 <= i < vocab_size:
        raise ValueError(f"{where}: id {i} is outside the vocabulary of {vocab_size} tokens (0..{vocab_size - 1})")
    return int(i)


def _check_token(where: str, token) -> str:
    if not isinstance(token, str):
        raise TypeError(f"{where}: a token is a str, got {token!r} ({type(token).__name__})")
    return token


def _utf8(where: str, text) -> bytes:
    """``text`` as UTF-8; a lone surrogate (which UTF-8 cannot encode) is named with its position."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: the text holds a lone surrogate {text[exc.start]!r} at position {exc.start}, "
                         "which UTF-8 cannot encode (reading a file with errors='surrogateescape' makes one "
                         "of each undecodable byte); read it with errors='replace', or remove the surrogate") from None


def _read_text(where: str, path) -> str:
    """A regular file's UTF-8 text; a file that is not one is a ValueError naming it."""
    with open_regular_file(path, where, ValueError) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


class _SpecialTokens:
    """Special tokens at fixed ids ``first, first + 1, ...`` in the order given."""

    def _init_specials(self, where: str, special_tokens, first: int) -> None:
        self.special_tokens = _check_specials(where, special_tokens)
        self._special_ids = {token: first + k for k, token in enumerate(self.special_tokens)}

    def token_to_id(self, token: str) -> int | None:
        """The id of a token (the inverse of :meth:`id_to_token`), or None if the vocabulary has no such token."""
        token = _check_token(f"{type(self).__name__}.token_to_id", token)
        special = self._special_ids.get(token)
        return self._vocab_id(token) if special is None else special

    def _special_id(self, where: str, token: str) -> int:
        if token not in self._special_ids:
            raise ValueError(f"{where}: this tokenizer has no {token!r} token (special tokens: "
                             f"{self.special_tokens}); create it with special_tokens=[..., {token!r}]")
        return self._special_ids[token]

    @property
    def pad_id(self) -> int | None:
        """The id of ``<pad>``, or None."""
        return self._special_ids.get("<pad>")

    @property
    def bos_id(self) -> int | None:
        """The id of ``<bos>``, or None."""
        return self._special_ids.get("<bos>")

    @property
    def eos_id(self) -> int | None:
        """The id of ``<eos>``, or None."""
        return self._special_ids.get("<eos>")

    def _wrap(self, where: str, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids.insert(0, self._special_id(where, "<bos>"))
        if add_eos:
            ids.append(self._special_id(where, "<eos>"))
        return ids


class ByteTokenizer(_SpecialTokens):
    """UTF-8 bytes as tokens: ids 0-255 are the byte values, special tokens follow from 256.

    Special tokens are never produced by :meth:`encode` from the text itself (the string
    ``"<eos>"`` in a text is five bytes), so no input can forge one; add them with
    ``add_bos``/``add_eos`` or by id.

    Args:
        special_tokens: e.g. ``["<pad>", "<bos>", "<eos>"]``, given ids 256, 257, 258 in that order.
    """

    def __init__(self, special_tokens: Sequence[str] = ()):
        self._init_specials("ByteTokenizer", special_tokens, 256)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids, optionally between ``<bos>`` and ``<eos>``."""
        return self._wrap("ByteTokenizer.encode", list(_utf8("ByteTokenizer.encode", text)), add_bos, add_eos)

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text from ids. Special tokens are written as their strings unless skipped.

        A byte sequence that is not valid UTF-8 (a window cut mid-character, or a model's sample)
        becomes U+FFFD with ``errors="replace"``; ``errors="strict"`` raises instead.
        """
        ids = _id_list("ByteTokenizer.decode", ids)
        try:
            codecs.lookup_error(errors)  # else an unknown name fails only once some bytes are invalid
        except LookupError:
            raise LookupError(f"ByteTokenizer.decode: errors={errors!r} is not an error handler; use 'replace', "
                              "'strict', 'ignore' or 'backslashreplace'") from None
        names = {i: t for t, i in self._special_ids.items()}
        parts, run = [], bytearray()
        for position, i in enumerate(ids):
            if 0 <= i < 256:
                run.append(i)
            elif i in names:
                parts.append(run.decode("utf-8", errors))
                run = bytearray()
                if not skip_special_tokens:
                    parts.append(names[i])
            else:
                raise ValueError(f"ByteTokenizer.decode: id {i} at position {position} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        parts.append(run.decode("utf-8", errors))
        return "".join(parts)

    def id_to_token(self, i: int) -> str:
        """The token of an id: a special token's string, or the byte as a one-character latin-1 string."""
        i = _check_id("ByteTokenizer.id_to_token", i, self.vocab_size)
        return self.special_tokens[i - 256] if i >= 256 else bytes([i]).decode("latin-1")

    def _vocab_id(self, token: str) -> int | None:
        return ord(token) if len(token) == 1 and ord(token) < 256 else None

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


class CharTokenizer(_SpecialTokens):
    """One id per character: special tokens first (ids 0, 1, ...), then the characters in sorted order.

    Args:
        chars: the vocabulary's characters (distinct single characters).
        special_tokens: e.g. ``["<pad>", "<unk>"]``; they take the first ids.
        unk_token: the special token that stands for a character outside the vocabulary; ``None``
            makes such a character an error.

    Example:
        >>> tok = CharTokenizer.from_text("hello world")
        >>> tok.decode(tok.encode("hello"))
        'hello'
        >>> tok.encode("hi")  # 'i' was never seen: <unk>
        [4, 0]
    """

    def __init__(self, chars: Iterable[str], special_tokens: Sequence[str] = ("<unk>",),
                 unk_token: str | None = "<unk>"):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"CharTokenizer: the vocabulary holds single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the vocabulary's characters repeat")
        self._init_specials("CharTokenizer", special_tokens, 0)
        if unk_token is not None and unk_token not in self._special_ids:
            raise ValueError(f"CharTokenizer: unk_token {unk_token!r} is not among the special tokens "
                             f"{self.special_tokens}")
        self.chars, self.unk_token = chars, unk_token
        first = len(self.special_tokens)
        self._char_ids = {c: first + k for k, c in enumerate(chars)}
        self._id_names = {**{i: t for t, i in self._special_ids.items()}, **{i: c for c, i in self._char_ids.items()}}

    @classmethod
    def from_text(cls, text: str, special_tokens: Sequence[str] = ("<unk>",), unk_token: str | None = "<unk>",
                  min_count: int = 1) -> "CharTokenizer":
        """The vocabulary of ``text``: every character that occurs at least ``min_count`` times, sorted."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.from_text: expected str, got {type(text).__name__}")
        counts: dict[str, int] = {}
        for c in text:
            counts[c] = counts.get(c, 0) + 1
        return cls(sorted(c for c, n in counts.items() if n >= min_count), special_tokens, unk_token)

    @property
    def vocab_size(self) -> int:
        return len(self.special_tokens) + len(self.chars)

    @property
    def unk_id(self) -> int | None:
        return None if self.unk_token is None else self._special_ids[self.unk_token]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of the characters of ``text``; unknown characters become ``<unk>`` (or raise without one)."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode: expected str, got {type(text).__name__}")
        unk = self.unk_id
        ids = []
        for position, c in enumerate(text):
            i = self._char_ids.get(c, unk)
            if i is None:
                raise ValueError(f"CharTokenizer.encode: character {c!r} at position {position} is not in the "
                                 "vocabulary and this tokenizer has no unk_token; build it from a corpus that "
                                 "has it, or with unk_token='<unk>'")
            ids.append(i)
        return self._wrap("CharTokenizer.encode", ids, add_bos, add_eos)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text from ids; special tokens (``<unk>`` too) are written as their strings unless skipped."""
        out = []
        for position, i in enumerate(_id_list("CharTokenizer.decode", ids)):
            if i not in self._id_names:
                raise ValueError(f"CharTokenizer.decode: id {i} at position {position} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
            if not (skip_special_tokens and i < len(self.special_tokens)):
                out.append(self._id_names[i])
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        """The token of an id: a special token's string or a character."""
        return self._id_names[_check_id("CharTokenizer.id_to_token", i, self.vocab_size)]

    def _vocab_id(self, token: str) -> int | None:
        return self._char_ids.get(token)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (UTF-8); :meth:`load` reads it back.

        The file is replaced atomically (a reader sees the old vocabulary or the new one), and only
        once the new one is known to load back the same.
        """
        state = {"type": "CharTokenizer", "version": 1, "special_tokens": list(self.special_tokens),
                 "unk_token": self.unk_token, "chars": list(self.chars)}
        # readable UTF-8, with lone surrogates (which UTF-8 cannot hold) as JSON escapes
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(state, ensure_ascii=False))
        if json.loads(text) != state:  # e.g. a high and a low surrogate side by side load back as one character
            raise ValueError(f"CharTokenizer.save: this vocabulary would not load back the same from JSON (it holds "
                             f"surrogate pairs); {str(path)!r} is left as it was")
        write_atomically(path, lambda f: f.write(text.encode("utf-8")), op="CharTokenizer.save")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        """A tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a regular file, not UTF-8 JSON, or not a valid CharTokenizer
                (a key missing or of the wrong type, a repeated character ...); the message names
                the file and the problem.
        """
        where = "CharTokenizer.load"
        text = _read_text(where, path)
        try:
            state = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            problem = "nests too deeply" if isinstance(exc, RecursionError) else f"is not JSON ({exc})"
            raise ValueError(f"{where}: {str(path)!r} {problem}") from None
        chars, special_tokens, unk_token = _char_state(where, path, state)
        try:
            return cls(chars, special_tokens, unk_token)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {str(path)!r} holds an invalid vocabulary: {exc}") from None

    def __repr__(self) -> str:
        return (f"CharTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens}, "
                f"unk_token={self.unk_token!r})")


def _char_state(where: str, path, state) -> tuple:
    """The ``(chars, special_tokens, unk_token)`` of a CharTokenizer file's JSON, checked."""
    def fail(problem: str):
        raise ValueError(f"{where}: {str(path)!r} {problem} (write a vocabulary with CharTokenizer.save)")

    if not isinstance(state, dict) or state.get("type") != "CharTokenizer":
        fail("does not hold a CharTokenizer")
    version = state.get("version")
    if type(version) is not int or version != 1:
        fail(f"has version {version!r}; this engine reads version 1")
    missing = [key for key in ("chars", "special_tokens", "unk_token") if key not in state]
    if missing:
        fail(f"lacks the key(s) {missing}")
    for key in ("chars", "special_tokens"):
        if not isinstance(state[key], list) or not all(isinstance(item, str) for item in state[key]):
            fail(f"has {key!r} of the wrong type: a list of strings is expected")
    if state["unk_token"] is not None and not isinstance(state["unk_token"], str):
        fail(f"has 'unk_token' {state['unk_token']!r}: a string or null is expected")
    return state["chars"], state["special_tokens"], state["unk_token"]


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("BPETokenizer needs Hugging Face's `tokenizers` library, the optional `text` extra of "
                          f"this engine: {install_hint('text', 'tokenizers')}. ByteTokenizer and CharTokenizer "
                          "need nothing.") from exc
    return tokenizers


class BPETokenizer(_SpecialTokens):
    """Byte-level BPE (as GPT-2's) through Hugging Face's ``tokenizers``; decode(encode(s)) == s.

    The pre-tokenizer and decoder are ``ByteLevel`` (no prefix space), so any text is first mapped
    to bytes: there is no unknown token, and decoding restores the text exactly.

    Build one with :meth:`train` or :meth:`from_file`; ``self.tokenizer`` is the wrapped
    ``tokenizers.Tokenizer`` for anything else it offers.

    Example:
        >>> tok = BPETokenizer.train(["some text", "more text"], vocab_size=300,
        ...                          special_tokens=["<pad>", "<eos>"])   # doctest: +SKIP
        >>> tok.decode(tok.encode("text"))                                # doctest: +SKIP
        'text'
    """

    def __init__(self, tokenizer):
        tokenizers = _require_tokenizers()
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"BPETokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}; "
                            "use BPETokenizer.train or BPETokenizer.from_file")
        self.tokenizer = tokenizer
        specials = sorted((t for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=lambda t: tokenizer.token_to_id(t.content))
        self.special_tokens = [t.content for t in specials]
        self._special_ids = {t: tokenizer.token_to_id(t) for t in self.special_tokens}

    @classmethod
    def train(cls, texts_or_files, vocab_size: int, special_tokens: Sequence[str] = (),
              min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges from texts (``str`` items) and files (``pathlib.Path`` items).

        Special tokens get the first ids (0, 1, ...), in the order given; the 256 byte symbols follow.

        Args:
            texts_or_files: an iterable of strings (texts) and/or ``Path`` objects (UTF-8 files).
            vocab_size: the size of the final vocabulary (specials + 256 bytes + merges).
            special_tokens: e.g. ``["<pad>", "<bos>", "<eos>"]``.
            min_frequency: a pair must occur this often to be merged.
        """
        tokenizers = _require_tokenizers()
        specials = _check_specials("BPETokenizer.train", special_tokens)
        if isinstance(texts_or_files, (str, os.PathLike)):
            texts_or_files = [texts_or_files]
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(f"BPETokenizer.train: vocab_size must be an int >= 256 + {len(specials)} special "
                             f"tokens (the byte alphabet comes first), got {vocab_size!r}")
        byte_level = tokenizers.pre_tokenizers.ByteLevel
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                 special_tokens=specials, initial_alphabet=byte_level.alphabet(),
                                                 show_progress=False)
        tokenizer.train_from_iterator(_texts(texts_or_files), trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        """A tokenizer saved by :meth:`save` (or any ``tokenizers`` JSON file).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a regular file, not UTF-8, or not a tokenizer the library
                can read; the message names the file and the library's reason.
        """
        tokenizers = _require_tokenizers()
        where = "BPETokenizer.from_file"
        text = _read_text(where, path)
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception for every parse error
            raise ValueError(f"{where}: {str(path)!r} is not a tokenizers JSON file ({exc})") from None
        return cls(tokenizer)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as ``tokenizers`` JSON, replacing the file atomically."""
        text = self.tokenizer.to_str(pretty=True)
        write_atomically(path, lambda f: f.write(text.encode("utf-8")), op="BPETokenizer.save")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """The BPE ids of ``text`` (special-token strings in the text are matched as special tokens)."""
        _utf8("BPETokenizer.encode", text)  # the library's own error for a lone surrogate says "must be str"
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap("BPETokenizer.encode", list(ids), add_bos, add_eos)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text from ids."""
        ids = _id_list("BPETokenizer.decode", ids)
        bad = [(position, i) for position, i in enumerate(ids) if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"BPETokenizer.decode: id {bad[0][1]} at position {bad[0][0]} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The token of an id (byte-level symbols, as the library stores them)."""
        return self.tokenizer.id_to_token(_check_id("BPETokenizer.id_to_token", i, self.vocab_size))

    def _vocab_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


def _texts(items):
    for item in items:
        if isinstance(item, os.PathLike):
            yield _read_text("BPETokenizer.train", item)
        elif isinstance(item, str):
            _utf8("BPETokenizer.train", item)
            yield item
        else:
            raise TypeError(f"BPETokenizer.train: items must be str (a text) or pathlib.Path (a file), got "
                            f"{type(item).__name__}")
