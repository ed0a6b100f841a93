"""Tokenizers: round trips (Unicode, special tokens), unknown characters, save/load, BPE."""

import json
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
    with pytest.raises(ImportError, match=r"gpu-engine\[text\]"):
        BPETokenizer.train(["text"], vocab_size=300)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        BPETokenizer.from_file(Path("missing.json"))
