"""Data: ``prepare`` turns text into cached token shards; the hot path reads them as numpy memmaps.

Nothing here imports TensorFlow, TFDS, grain or sentencepiece at module level: those are optional and
only the prepare step of a source that needs them imports them.
"""

from poetjax.data.loader import BatchSampler, eval_windows, unigram_perplexity
from poetjax.data.prepare import PreparedData, prepare, token_dtype
from poetjax.data.sources import DataError, open_source
from poetjax.data.tokenizer import load_tokenizer, train_bpe

__all__ = ["BatchSampler", "DataError", "PreparedData", "eval_windows", "load_tokenizer", "open_source",
           "prepare", "token_dtype", "train_bpe", "unigram_perplexity"]


def prepare_from_config(data_cfg, model_vocab_size: int, log=print) -> PreparedData:
    """``prepare`` with the fields of a ``DataConfig`` (vocab_size 0 → the model's vocab size)."""
    return prepare(data_cfg.source, tokenizer=data_cfg.tokenizer, vocab_size=data_cfg.vocab_size or model_vocab_size,
                   cache_dir=data_cfg.cache_dir, valid_fraction=data_cfg.valid_fraction,
                   max_chars=data_cfg.max_chars, tfds_data_dir=data_cfg.tfds_data_dir,
                   tfds_train_split=data_cfg.tfds_train_split, tfds_valid_split=data_cfg.tfds_valid_split,
                   tfds_text_key=data_cfg.tfds_text_key, encoding_errors=data_cfg.encoding_errors, log=log)
