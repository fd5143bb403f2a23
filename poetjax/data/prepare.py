"""``prepare``: text source → tokenizer → token shards (numpy memmap files) + ``meta.json``.

Cache layout (one folder per source content × tokenizer settings, under ``data.cache_dir``)::

    <name>-<key>/meta.json        format, source, tokenizer, vocab_size, dtype, tokens per split
                 tokenizer.json   the trained BPE (or a copy of the user's tokenizer file)
                 train.bin        uint16 tokens when vocab_size <= 65536, else uint32
                 valid.bin

The key hashes the source's content (or TFDS identity), the tokenizer choice and the vocab size (and
``data.encoding_errors`` when it is not ``strict``), so a changed corpus or setting never reuses stale
shards. A folder is built under a temporary name and renamed when complete: an interrupted prepare
leaves no half-written cache behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from poetjax.data.sources import DataError, TextSource, hash_files, open_source, resolve_path
from poetjax.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe

FORMAT_VERSION = 1
PIECE_CHARS = 1 << 14  # encode_batch pieces: small enough to spread over threads, cut at line ends


@dataclass(frozen=True)
class PreparedData:
    folder: str
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only memmap (no copy)."""
        info = self.meta["splits"][split]
        return np.memmap(os.path.join(self.folder, info["file"]), dtype=np.dtype(self.meta["dtype"]), mode="r",
                         shape=(int(info["tokens"]),))

    def tokenizer(self) -> TextTokenizer:
        return load_tokenizer(os.path.join(self.folder, self.meta["tokenizer_file"]))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _pieces(chunk: str) -> list[str]:
    """Cut a chunk at line ends into pieces of about PIECE_CHARS characters (for parallel encoding)."""
    out, start = [], 0
    while start < len(chunk):
        end = chunk.find("\n", start + PIECE_CHARS)
        end = len(chunk) if end < 0 else end + 1
        out.append(chunk[start:end])
        start = end
    return out


def _encode_split(chunks: Iterator[str], tok: TextTokenizer, dtype: np.dtype, path: str) -> tuple[int, int]:
    n_tokens = n_chars = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            n_chars += len(chunk)
            ids = [i for piece in tok.encode_batch(_pieces(chunk)) for i in piece]
            if ids and max(ids) >= tok.vocab_size:
                raise DataError(f"tokenizer produced id {max(ids)} >= its vocab_size {tok.vocab_size}")
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            n_tokens += arr.size
    return n_tokens, n_chars


def _slug(text: str) -> str:
    base = os.path.basename(os.path.normpath(text.split(" ")[0].replace("tfds:", "tfds-")))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base)[:40] or "data"


def _nonempty(split: Callable[[], Iterator[str]]) -> bool:
    return any(c.strip() for c in split())


def prepare(source: str, *, tokenizer: str = "bpe", vocab_size: int, cache_dir: str = "data/cache",
            valid_fraction: float = 0.1, max_chars: int = 0, tfds_data_dir: str = "",
            tfds_train_split: str = "train", tfds_valid_split: str = "validation", tfds_text_key: str = "text",
            encoding_errors: str = "strict", log: Callable[[str], None] = print) -> PreparedData:
    """Tokenize ``source`` into cached memmap shards (reused when already built); see the module doc."""
    src: TextSource = open_source(source, valid_fraction=valid_fraction, max_chars=max_chars,
                                  tfds_data_dir=tfds_data_dir, tfds_train_split=tfds_train_split,
                                  tfds_valid_split=tfds_valid_split, tfds_text_key=tfds_text_key,
                                  encoding_errors=encoding_errors)
    if tokenizer == "bpe":
        tok_id = f"bpe:{vocab_size}"
    else:
        try:
            tok_id = f"file:{hash_files([resolve_path(tokenizer)])}"
        except DataError:
            raise DataError(f"tokenizer file {tokenizer!r} does not exist (data.tokenizer takes 'bpe', a "
                            f"tokenizer.json or a SentencePiece .model)") from None
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, src.fingerprint, tok_id]).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"{_slug(source)}-{key}")
    # The key alone identifies the shards: a cache prepared elsewhere under another folder name also counts.
    for found in [folder] + sorted(glob.glob(os.path.join(cache_dir, f"*-{key}"))):
        if os.path.isfile(os.path.join(found, "meta.json")):
            with open(os.path.join(found, "meta.json")) as f:
                return PreparedData(found, json.load(f))
    meta_path = os.path.join(folder, "meta.json")

    for split in ("train", "valid"):
        if not _nonempty(src.splits[split]):
            raise DataError(f"data source {source!r}: the {split} split is empty (no text); check data.source"
                            + (" and data.max_chars" if max_chars else ""))
    t0 = time.time()
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only our own pid's leftover
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise DataError(f"data.cache_dir={cache_dir!r}: cannot create {tmp!r} to prepare the token shards "
                        f"({e.strerror}); choose a writable data.cache_dir") from None
    try:
        if tokenizer == "bpe":
            log(f"prepare: training a byte-level BPE (vocab {vocab_size}) on the train split of {src.description}")
            tok = train_bpe(src.splits["train"](), vocab_size)
        else:
            tok = load_tokenizer(tokenizer)
        tok_file = os.path.basename(tok.save(tmp))
        dtype = token_dtype(tok.vocab_size)
        splits = {}
        for split in ("train", "valid"):
            n_tok, n_chars = _encode_split(src.splits[split](), tok, dtype, os.path.join(tmp, f"{split}.bin"))
            splits[split] = {"file": f"{split}.bin", "tokens": n_tok, "chars": n_chars}
        meta = {"format": FORMAT_VERSION, "source": src.description, "fingerprint": src.fingerprint,
                "tokenizer": tokenizer, "tokenizer_kind": tok.kind, "tokenizer_file": tok_file,
                "vocab_size": tok.vocab_size, "dtype": dtype.name, "splits": splits}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same folder first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(meta_path) as f:
        meta = json.load(f)
    log(f"prepare: {meta['splits']['train']['tokens']:,} train / {meta['splits']['valid']['tokens']:,} valid tokens "
        f"({meta['dtype']}) in {time.time() - t0:.1f}s -> {folder}")
    return PreparedData(folder, meta)
