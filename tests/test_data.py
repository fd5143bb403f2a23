"""Data: prepare (sources, tokenizers, shards, cache), the memmap sampler, evaluation windows, errors."""

import lzma
import math
import os
import shutil
import sys
import types
from collections import Counter

import numpy as np
import pytest

from poetjax.data import (BatchSampler, DataError, eval_windows, open_source, prepare, token_dtype,
                          unigram_perplexity)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def shakespeare(data_cache):
    return prepare(SHAKESPEARE, vocab_size=512, cache_dir=data_cache, log=lambda s: None)


def test_shipped_corpus_shards_decode_back_to_the_text(shakespeare):
    meta = shakespeare.meta
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["tokenizer_kind"] == "tokenizers"
    for split, fname in (("train", "train.txt"), ("valid", "valid.txt")):
        toks = shakespeare.tokens(split)
        assert isinstance(toks, np.memmap) and toks.dtype == np.uint16 and int(toks.max()) < 512
        assert os.path.getsize(os.path.join(shakespeare.folder, f"{split}.bin")) == 2 * toks.size
        assert meta["splits"][split]["chars"] == len(_read(os.path.join(SHAKESPEARE, fname)))
    tok = shakespeare.tokenizer()
    # byte-level BPE is lossless: the shards are exactly the text
    assert tok.decode(shakespeare.tokens("valid")) == _read(os.path.join(SHAKESPEARE, "valid.txt"))
    assert tok.decode(shakespeare.tokens("train")) == _read(os.path.join(SHAKESPEARE, "train.txt"))
    assert shakespeare.tokens("train").size < 0.6 * meta["splits"]["train"]["chars"]  # merges were learned


def test_prepare_reuses_its_cache_and_keys_it_by_content(shakespeare, data_cache, tmp_path):
    logs = []
    again = prepare(SHAKESPEARE, vocab_size=512, cache_dir=data_cache, log=logs.append)
    assert again.folder == shakespeare.folder and logs == []  # nothing rebuilt
    copy = tmp_path / "copy"
    shutil.copytree(SHAKESPEARE, copy)
    same = prepare(str(copy), vocab_size=512, cache_dir=data_cache, log=logs.append)
    assert same.folder == shakespeare.folder and logs == []  # same content under another name: reused
    with open(copy / "valid.txt", "a") as f:
        f.write("One more line.\n")
    changed = prepare(str(copy), vocab_size=512, cache_dir=data_cache, log=logs.append)
    assert changed.folder != same.folder and logs  # new content, new shards
    assert not [d for d in os.listdir(data_cache) if ".tmp-" in d]  # no half-written folders


def test_gutenberg_format_folder_of_xz_files(tmp_path, data_cache):
    train = "".join(f"Chapter {i}. It was a dark and stormy night, said the {i}th narrator.\n" for i in range(400))
    valid = "The gift of the magi.\nOne dollar and eighty-seven cents.\n" * 20
    for name, text in (("train.txt.xz", train), ("valid.txt.xz", valid)):
        with lzma.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(text)
    (tmp_path / "README.md").write_text("not part of the corpus\n")
    (tmp_path / "BOOKS.tsv").write_text("split\tauthor\ttitle\n")
    data = prepare(str(tmp_path), vocab_size=300, cache_dir=data_cache, log=lambda s: None)
    tok = data.tokenizer()
    assert tok.decode(data.tokens("train")) == train and tok.decode(data.tokens("valid")) == valid


def test_folder_and_single_file_hold_out_the_tail(tmp_path):
    (tmp_path / "sub").mkdir()
    texts = {"a.txt": "alpha line one\nalpha line two\n" * 30, "b.txt.xz": "beta\n" * 50,
             "sub/c.txt": "gamma gamma\n" * 40}
    for name, text in texts.items():
        if name.endswith(".xz"):
            with lzma.open(tmp_path / name, "wt") as f:
                f.write(text)
        else:
            (tmp_path / name).write_text(text)
    (tmp_path / "notes.md").write_text("ignored\n")
    src = open_source(str(tmp_path), valid_fraction=0.2)
    train, valid = "".join(src.splits["train"]()), "".join(src.splits["valid"]())
    assert train + valid == "".join(texts[k] for k in sorted(texts))  # sorted walk: a, b, sub/c
    assert train.endswith("\n") and abs(len(valid) / (len(train) + len(valid)) - 0.2) < 0.02
    one = open_source(str(tmp_path / "a.txt"), valid_fraction=0.5)
    assert "".join(one.splits["train"]()) + "".join(one.splits["valid"]()) == texts["a.txt"]
    capped = open_source(str(tmp_path), valid_fraction=0.2, max_chars=500)  # data.max_chars
    assert "".join(capped.splits["train"]()) + "".join(capped.splits["valid"]()) == (train + valid)[:500]


def test_user_tokenizer_json_gives_the_same_shards(shakespeare, data_cache, tmp_path):
    user = tmp_path / "my_tokenizer.json"
    shutil.copyfile(os.path.join(shakespeare.folder, "tokenizer.json"), user)
    data = prepare(SHAKESPEARE, tokenizer=str(user), vocab_size=0, cache_dir=data_cache, log=lambda s: None)
    assert data.folder != shakespeare.folder
    np.testing.assert_array_equal(data.tokens("valid"), shakespeare.tokens("valid"))


def test_vocab_above_65536_is_stored_as_uint32(tmp_path, data_cache):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70000)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("w69999 w5 w65536\nw70 w65535\n" * 10)
    (corpus / "valid.txt").write_text("w66000 w1\n")
    data = prepare(str(corpus), tokenizer=str(tmp_path / "big.json"), vocab_size=0, cache_dir=data_cache,
                   log=lambda s: None)
    assert data.meta["dtype"] == "uint32" and data.vocab_size == 70000
    np.testing.assert_array_equal(data.tokens("train")[:5], [69999, 5, 65536, 70, 65535])
    np.testing.assert_array_equal(data.tokens("valid"), [66000, 1])
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_sentencepiece_model_needs_its_package(tmp_path, data_cache):
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed")
    (tmp_path / "sp.model").write_bytes(b"\x00")
    with pytest.raises(DataError, match="sentencepiece"):
        prepare(SHAKESPEARE, tokenizer=str(tmp_path / "sp.model"), vocab_size=0, cache_dir=data_cache)


def test_tfds_source_without_tensorflow_datasets(monkeypatch, data_cache):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as on the GPU box
    with pytest.raises(DataError, match="needs tensorflow-datasets"):
        prepare("tfds:c4/en", vocab_size=512, cache_dir=data_cache)


def test_tfds_source_reads_the_text_feature(monkeypatch, data_cache):
    docs = {"train": [{"text": f"document {i} about orthogonal matrices"} for i in range(300)],
            "validation": [{"text": b"a held out document"}] * 3}
    calls = []

    def data_source(name, split, data_dir=None, download=True):
        calls.append((name, split, data_dir, download))
        if name.startswith("c4"):
            raise FileNotFoundError("no prepared files")
        return docs[split]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    data = prepare("tfds:toy/v1", vocab_size=300, cache_dir=data_cache, tfds_data_dir="/somewhere", log=lambda s: None)
    assert data.tokenizer().decode(data.tokens("valid")) == "a held out document\n" * 3
    assert ("toy/v1", "train", "/somewhere", False) in calls  # read-only: never downloads
    with pytest.raises(DataError, match="cannot be downloaded or built here"):
        prepare("tfds:c4/en", vocab_size=300, cache_dir=data_cache)


def test_missing_and_empty_sources_are_clear_errors(tmp_path, data_cache):
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "nowhere"), vocab_size=300, cache_dir=data_cache)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the train split is empty"):
        prepare(str(tmp_path / "empty.txt"), vocab_size=300, cache_dir=data_cache)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.txt").write_text("some words\n" * 100)
    (tmp_path / "c" / "valid.txt").write_text("\n\n")
    with pytest.raises(DataError, match="the valid split is empty"):
        prepare(str(tmp_path / "c"), vocab_size=300, cache_dir=data_cache)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        prepare(str(tmp_path / "d"), vocab_size=300, cache_dir=data_cache)
    with pytest.raises(DataError, match="tokenizer file"):
        prepare(SHAKESPEARE, tokenizer=str(tmp_path / "none.json"), vocab_size=0, cache_dir=data_cache)
    with pytest.raises(DataError, match="too few for one sequence"):
        BatchSampler(np.arange(100), batch_size=2, seq_len=64, seed=0)
    with pytest.raises(DataError, match="too few for one sequence"):
        next(eval_windows(np.arange(30), 2, 64))


def test_non_utf8_bytes_are_named_with_their_offset_or_replaced(tmp_path, data_cache):
    # A 2-byte character across the decoder's 1 MiB read blocks is fine; the bad byte lies beyond them.
    good = ("xy" + "word é " * 200_000).encode()
    assert good[(1 << 20) - 1:(1 << 20) + 1] == "é".encode()
    bad_at = len(good) + len(b"lorem\n")
    data = good + b"lorem\n\xff" + b"ipsum\n" * 10
    (tmp_path / "plain.txt").write_bytes(data)
    with lzma.open(tmp_path / "packed.txt.xz", "wb") as f:
        f.write(data)
    for name, where in (("plain.txt", ""), ("packed.txt.xz", " of its decompressed text")):
        with pytest.raises(DataError) as e:  # while the source measures its text, before any tokenizing
            open_source(str(tmp_path / name))
        assert str(e.value) == (f"data file {str(tmp_path / name)!r} is not UTF-8 text: byte 0xff at byte offset "
                                f"{bad_at}{where}; fix the file, or set data.encoding_errors=replace to read "
                                f"undecodable bytes as U+FFFD")
    replaced = open_source(str(tmp_path / "plain.txt"), encoding_errors="replace")
    text = "".join(replaced.splits["train"]()) + "".join(replaced.splits["valid"]())
    assert text == data.decode("utf-8", "replace") and text.count("\ufffd") == 1
    # the option is part of the cache key: the same clean text prepared both ways gives two folders
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "a.txt").write_text("some clean words\n" * 300)
    strict = prepare(str(tmp_path / "clean"), vocab_size=300, cache_dir=data_cache, log=lambda s: None)
    other = prepare(str(tmp_path / "clean"), vocab_size=300, cache_dir=data_cache, encoding_errors="replace",
                    log=lambda s: None)
    assert strict.folder != other.folder


def test_uncreatable_data_cache_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "c.txt").write_text("some words\n" * 100)
    cache = str(tmp_path / "file" / "cache")
    with pytest.raises(DataError, match=rf"data.cache_dir={cache!r}: cannot create .* to prepare the token shards"):
        prepare(str(tmp_path / "c.txt"), vocab_size=300, cache_dir=cache)


def test_batch_sampler_is_a_function_of_seed_and_position():
    n, b, ln = 10_000, 4, 32
    tokens = np.arange(n)  # a token's value is its position, so each window shows where it came from
    s1, s2 = BatchSampler(tokens, b, ln, seed=3), BatchSampler(tokens, b, ln, seed=3)
    batches = [s1.batch(p) for p in range(0, 200)]
    np.testing.assert_array_equal(s2.batch(137), batches[137])  # random access = sequential
    assert batches[0].shape == (b, ln + 1) and batches[0].dtype == np.int32
    assert all(np.all(np.diff(x, axis=1) == 1) for x in batches)  # contiguous windows
    w = s1.num_windows
    assert w == (n - ln) // ln
    firsts = np.concatenate(batches)[:, 0]
    epoch0, epoch1 = firsts[:w], firsts[w:2 * w]
    assert len(set(epoch0.tolist())) == w and len(set(epoch1.tolist())) == w  # no repeats within an epoch
    assert len({x % ln for x in epoch0}) == 1 and len({x % ln for x in epoch1}) == 1  # one grid offset each
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(BatchSampler(tokens, b, ln, seed=4).batch(0), batches[0])
    assert int(firsts.max()) + ln < n


def test_eval_windows_count_every_window_once():
    n, ln, b = 1000, 16, 8
    seen = []
    for toks, w in eval_windows(np.arange(n), b, ln):
        assert toks.shape == (b, ln + 1)
        seen += [int(t[0]) for t, wi in zip(toks, w) if wi == 1.0]
        assert np.all(toks[w == 0.0] == 0)
    assert seen == [k * ln for k in range((n - 1) // ln)]
    assert len(list(eval_windows(np.arange(n), b, ln, max_batches=2))) == 2


def test_unigram_perplexity_matches_a_direct_count():
    rng = np.random.default_rng(0)
    train, valid, vocab = rng.integers(0, 20, 500), rng.integers(0, 25, 100), 30
    counts = Counter(train.tolist())
    total = len(train) + vocab
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in valid.tolist()) / len(valid)
    assert abs(unigram_perplexity(train, valid, vocab) - math.exp(nll)) < 1e-9 * math.exp(nll)
