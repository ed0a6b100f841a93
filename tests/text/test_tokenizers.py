"""Tokenizers: round trips (Unicode, special tokens), unknown characters, save/load, BPE."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.text import BPETokenizer, ByteTokenizer, CharTokenizer

TEXTS = ["", "hello world", "héllo wörld ñ", "日本語のテキスト", "emoji 🎉🐍 and ZWJ 👩‍💻",
         "tabs\tand\nnewlines\r\n",
         "\x00 nul and \U0010ffff max code point", "<eos> typed as text"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = ByteTokenizer(special_tokens=["<pad>", "<bos>", "<eos>"])
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # the ids are the UTF-8 bytes, nothing else
    assert all(0 <= i < 256 for i in ids)  # "<eos>" in a text is bytes, never the special id
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped[0] == 257 and wrapped[-1] == 258 and wrapped[1:-1] == ids
    assert tok.decode(wrapped, skip_special_tokens=True) == text
    assert tok.decode(wrapped) == "<bos>" + text + "<eos>"


def test_byte_tokenizer_special_ids_are_fixed_and_checked():
    tok = ByteTokenizer(special_tokens=["<pad>", "<bos>", "<eos>"])
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.token_to_id("<unk>") is None
    assert ByteTokenizer().vocab_size == 256 and ByteTokenizer().pad_id is None
    with pytest.raises(ValueError, match="no '<bos>' token"):
        ByteTokenizer().encode("x", add_bos=True)
    with pytest.raises(ValueError, match="id 259 at position 1 is outside the vocabulary"):
        tok.decode([104, 259])
    with pytest.raises(ValueError, match="repeat"):
        ByteTokenizer(special_tokens=["<pad>", "<pad>"])
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(b"bytes")
    # ids as an array or Tensor decode too (a model's output)
    assert tok.decode(np.array([104, 105])) == tok.decode(engine.tensor([104, 105])) == "hi"


def test_byte_tokenizer_decodes_a_cut_character_with_a_replacement():
    tok = ByteTokenizer()
    cut = tok.encode("é")[:1]  # half of a two-byte character, as a window boundary makes it
    assert tok.decode(cut) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(cut, errors="strict")


def test_char_tokenizer_vocabulary_unknowns_and_specials():
    tok = CharTokenizer.from_text("abcab ä", special_tokens=["<pad>", "<unk>"])
    assert tok.chars == [" ", "a", "b", "c", "ä"] and tok.vocab_size == 7
    assert (tok.pad_id, tok.unk_id) == (0, 1)
    assert tok.decode(tok.encode("cab ä")) == "cab ä"
    ids = tok.encode("abz")  # 'z' was never seen
    assert ids == [3, 4, 1]
    assert tok.decode(ids) == "ab<unk>" and tok.decode(ids, skip_special_tokens=True) == "ab"
    strict = CharTokenizer.from_text("ab", special_tokens=[], unk_token=None)
    with pytest.raises(ValueError, match="character 'z' at position 1 is not in the vocabulary"):
        strict.encode("az")
    with pytest.raises(ValueError, match="unk_token '<unk>' is not among the special tokens"):
        CharTokenizer("ab", special_tokens=["<pad>"])
    assert CharTokenizer.from_text("aab", min_count=2).chars == ["a"]


def test_char_tokenizer_save_load_round_trip(tmp_path):
    tok = CharTokenizer.from_text("日本語 and ascii 🎉", special_tokens=["<pad>", "<unk>", "<eos>"])
    path = tmp_path / "chars.json"
    tok.save(path)
    loaded = CharTokenizer.load(path)
    assert loaded.chars == tok.chars and loaded.special_tokens == tok.special_tokens
    assert loaded.encode("語 🎉?", add_eos=True) == tok.encode("語 🎉?", add_eos=True)
    path.write_text(json.dumps({"type": "Other"}))
    with pytest.raises(ValueError, match="does not hold a CharTokenizer"):
        CharTokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        CharTokenizer.load(path)


def test_bpe_tokenizer_trains_round_trips_and_saves(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = ["the quick brown fox jumps over the lazy dog " * 20, "def function(x):\n    return x + 1\n" * 20]
    file = tmp_path / "corpus.txt"
    file.write_text("héllo wörld " * 30, encoding="utf-8")
    tok = BPETokenizer.train(corpus + [file], vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"])
    assert tok.special_tokens == ["<pad>", "<bos>", "<eos>"] and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 300  # the 256 byte symbols, the specials, and merges
    for text in TEXTS + ["the quick brown fox"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # merges learnt: a frequent word is fewer tokens than bytes
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
    ids = tok.encode("the fox", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids, skip_special_tokens=True) == "the fox"
    tok.save(tmp_path / "bpe.json")
    loaded = BPETokenizer.from_file(tmp_path / "bpe.json")
    assert loaded.encode("the lazy dog 🎉") == tok.encode("the lazy dog 🎉")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        BPETokenizer.train(corpus, vocab_size=100)


def test_bpe_without_the_library_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[text\]".*pip install tokenizers'):
        BPETokenizer.train(["text"], vocab_size=300)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        BPETokenizer.from_file(Path("missing.json"))


def _bpe():
    pytest.importorskip("tokenizers")
    return BPETokenizer.train(["hello world " * 20], vocab_size=270, special_tokens=["<pad>"])


def _all_tokenizers():
    return [ByteTokenizer(special_tokens=["<pad>"]), CharTokenizer.from_text("hello world"), _bpe()]


def test_char_save_keeps_a_lone_surrogate_and_never_truncates(tmp_path):
    path = tmp_path / "chars.json"
    path.write_text("the previous vocabulary")
    tok = CharTokenizer.from_text("ab\ud800")  # text read with errors="surrogateescape" holds such characters
    tok.save(path)  # it used to truncate the file to 0 bytes, then raise UnicodeEncodeError
    assert CharTokenizer.load(path).chars == ["a", "b", "\ud800"]
    assert "\\ud800" in path.read_text(encoding="utf-8") and "a" in path.read_text(encoding="utf-8")
    # a vocabulary JSON cannot give back (a surrogate pair inside one token) is refused before the file is touched
    before = path.read_bytes()
    with pytest.raises(ValueError, match="would not load back the same.*left as it was"):
        CharTokenizer("ab", special_tokens=["<\ud83c\udf89>"], unk_token=None).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["chars.json"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saves_are_atomic_and_write_through_symlinks(tmp_path, kind, monkeypatch):
    tok = CharTokenizer.from_text("hello") if kind == "char" else _bpe()
    load = CharTokenizer.load if kind == "char" else BPETokenizer.from_file
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    tok.save(tmp_path / "link.json")  # the link's target gets the vocabulary, as torch.save writes it
    assert (tmp_path / "link.json").is_symlink() and load(tmp_path / "real.json").vocab_size == tok.vocab_size
    # a write that fails part-way leaves the old file whole and no temporary file behind
    import engine.io

    def failing(path, write, op):
        def half_then_fail(f):
            f.write(b"{\"partial")
            raise OSError("disk full")
        return engine.io.write_atomically(path, half_then_fail, op)

    monkeypatch.setattr("engine.text.tokenizers.write_atomically", failing)
    before = (tmp_path / "real.json").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        tok.save(tmp_path / "real.json")
    assert (tmp_path / "real.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


@pytest.mark.parametrize("content, problem", [
    ('{"type": "CharTokenizer", "version": 1}', r"lacks the key\(s\) \['chars', 'special_tokens', 'unk_token'\]"),
    ("[" * 100_000, "nests too deeply"),
    ("{not json", "is not JSON"),
    ('{"type": "Other"}', "does not hold a CharTokenizer"),
    ('{"type": "CharTokenizer", "version": true, "chars": [], "special_tokens": [], "unk_token": null}',
     "has version True"),
    ('{"type": "CharTokenizer", "version": 1, "chars": "ab", "special_tokens": [], "unk_token": null}',
     "has 'chars' of the wrong type"),
    ('{"type": "CharTokenizer", "version": 1, "chars": ["a"], "special_tokens": [], "unk_token": 3}',
     "has 'unk_token' 3"),
    ('{"type": "CharTokenizer", "version": 1, "chars": ["a", "a"], "special_tokens": [], "unk_token": null}',
     "holds an invalid vocabulary: .*repeat"),
])
def test_char_load_names_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"CharTokenizer.load: '{re.escape(str(path))}' {problem}"):
        CharTokenizer.load(path)


def test_loading_bad_files_names_them(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match=r"latin1.json' is not UTF-8 text \(byte 0"):
        CharTokenizer.load(tmp_path / "latin1.json")
    with pytest.raises(ValueError, match="is a directory, not a regular file"):
        CharTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="CharTokenizer.load: no such file .*missing.json"):
        CharTokenizer.load(tmp_path / "missing.json")
    pytest.importorskip("tokenizers")
    for content, reason in (("{", "EOF while parsing"), ("{}", "Model missing"), ("[" * 100_000, "")):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(ValueError, match=f"BPETokenizer.from_file: .*bad.json' is not a tokenizers JSON file "
                                             f"\\(.*{reason}"):
            BPETokenizer.from_file(tmp_path / "bad.json")  # the library raises a bare Exception
    with pytest.raises(FileNotFoundError, match="BPETokenizer.from_file: no such file"):
        BPETokenizer.from_file(tmp_path / "missing.json")


def test_id_to_token_and_token_to_id_check_their_argument():
    for tok in _all_tokenizers():
        name, n = type(tok).__name__, tok.vocab_size
        for bad in (-1, n, 2**70):  # BPE's library raised OverflowError for -1
            with pytest.raises(ValueError, match=f"{name}.id_to_token: id {bad} is outside the vocabulary of {n} "
                                                 f"tokens \\(0..{n - 1}\\)"):
                tok.id_to_token(bad)
        for bad in (1.0, True, "1", None):  # 1.0 used to find id 1 in a dict
            with pytest.raises(TypeError, match=f"{name}.id_to_token: an id is an int"):
                tok.id_to_token(bad)
        with pytest.raises(TypeError, match=f"{name}.token_to_id: a token is a str, got 5"):
            tok.token_to_id(5)
        # the two are inverses over the whole vocabulary, special tokens included
        for i in (0, n // 2, n - 1, np.int64(n - 1)):
            assert tok.token_to_id(tok.id_to_token(i)) == i
        assert tok.token_to_id("<no such token>") is None
        assert tok.token_to_id("<pad>") == tok.pad_id


@pytest.mark.parametrize("make", [lambda: ByteTokenizer(), _bpe])
def test_unencodable_text_names_the_lone_surrogate(make):
    tok = make()
    name = type(tok).__name__
    with pytest.raises(ValueError, match=rf"{name}.encode: the text holds a lone surrogate '\\ud800' at position 1"):
        tok.encode("a\ud800b")  # BPE's library said "TextInputSequence must be str"
    with pytest.raises(TypeError, match=f"{name}.encode: expected str, got bytes"):
        tok.encode(b"abc")
    # CharTokenizer needs no UTF-8: a lone surrogate is a character like any other
    chars = CharTokenizer.from_text("a\ud800")
    assert chars.decode(chars.encode("\ud800a")) == "\ud800a"


def test_bpe_train_names_unencodable_texts_and_files(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match=r"BPETokenizer.train: the text holds a lone surrogate '\\udc80' at position 2"):
        BPETokenizer.train(["ok", "ab\udc80"], vocab_size=300)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"BPETokenizer.train: .*latin1.txt' is not UTF-8 text \(byte 3"):
        BPETokenizer.train([tmp_path / "latin1.txt"], vocab_size=300)


def test_byte_decode_checks_the_error_handler_name():
    with pytest.raises(LookupError, match="errors='bogus' is not an error handler"):
        ByteTokenizer().decode([104, 105], errors="bogus")  # valid bytes: the name was never looked up
    assert ByteTokenizer().decode([0xE9], errors="ignore") == ""
