"""Tokenizers: a byte-level BPE trained with the ``tokenizers`` library, or a user's tokenizer file.

Byte-level BPE (GPT-2 style): the text is split by the ByteLevel pre-tokenizer, every byte is in the
initial alphabet (so any UTF-8 text encodes, nothing maps to "unknown"), and merges are learned on the
train split only. A user may instead give a ``tokenizer.json`` (HF tokenizers) or a SentencePiece
``.model`` (needs the optional ``sentencepiece`` package).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from poetjax.data.sources import DataError, resolve_path

EOS = "<|endoftext|>"


class TextTokenizer:
    """Common interface: ``vocab_size``, ``encode_batch(texts)``, ``decode(ids)``, ``save(folder)``."""

    kind = "abstract"
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, folder: str) -> str:
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    kind = "tokenizers"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids))

    def save(self, folder):
        path = os.path.join(folder, "tokenizer.json")
        self.tok.save(path)
        return path


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        try:
            import sentencepiece as spm  # optional dependency
        except ImportError:
            raise DataError(f"data.tokenizer={path!r} is a SentencePiece model, which needs the sentencepiece "
                            f"package (pip install sentencepiece)") from None
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.get_piece_size())

    def encode_batch(self, texts):
        return self.sp.encode(list(texts))

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def save(self, folder):
        import shutil

        dest = os.path.join(folder, "tokenizer.model")
        shutil.copyfile(self.path, dest)
        return dest


def train_bpe(chunks: Iterator[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE with ``vocab_size`` entries (including the 256 bytes and ``<|endoftext|>``)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError("training a BPE needs the tokenizers package; or run `python train.py --prepare-only` "
                        "where it is installed and bring data.cache_dir along") from None

    if vocab_size < 257 + 1:
        raise DataError(f"a byte-level BPE needs vocab_size > 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(chunks, trainer=trainer)
    return HFTokenizer(tok)


def load_tokenizer(path: str) -> TextTokenizer:
    """A user-provided ``tokenizer.json`` or SentencePiece ``.model``."""
    try:
        path = resolve_path(path)
    except DataError:
        raise DataError(f"tokenizer file {path!r} does not exist (data.tokenizer takes 'bpe', a "
                        f"tokenizer.json or a SentencePiece .model)") from None
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"data.tokenizer={path!r} needs the tokenizers package") from None
        try:
            return HFTokenizer(Tokenizer.from_file(path))
        except Exception as e:
            raise DataError(f"could not read tokenizer {path!r}: {e}") from None
    raise DataError(f"unknown tokenizer file type {path!r}: expected a tokenizer.json or a SentencePiece .model")
