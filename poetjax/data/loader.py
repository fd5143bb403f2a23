"""The training hot path's data: numpy only (memmap reads), deterministic from a seed and a position.

Training batches (``BatchSampler``): the token stream of N tokens is cut into W = (N − S) // S windows of
S + 1 tokens (S = seq_len; neighbouring windows share one token, so every token is a target once per
epoch). Epoch e shifts the window grid by an offset o_e ∈ [0, S) and visits the windows in a random
order π_e, both drawn from ``np.random.default_rng([seed, e])``. Sequence i of the run is window
π_{i // W}[i mod W] of epoch i // W, and batch p holds sequences p·B … p·B + B − 1. A batch is therefore
a pure function of (seed, p): the position p is all a checkpoint needs to resume the exact stream.

Validation (``eval_windows``): the consecutive windows of the valid split in order, padded to whole
batches with a 0/1 weight per sequence so every window counts exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from poetjax.data.sources import DataError


class BatchSampler:
    """``batch(p)`` → int32 (B, S + 1) tokens of batch number ``p`` (see module doc)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        n = int(tokens.shape[0])
        self.num_windows = (n - seq_len) // seq_len
        if self.num_windows < 1:
            raise DataError(f"the train split has {n} tokens, too few for one sequence of seq_len={seq_len} "
                            f"(need at least {2 * seq_len})")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self._epoch = None
        self._order = None
        self._offset = 0

    def _epoch_plan(self, epoch: int):
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.seq_len))
            self._order = rng.permutation(self.num_windows)
            self._epoch = epoch
        return self._offset, self._order

    def starts(self, position: int, rows: slice | None = None) -> np.ndarray:
        """Token offsets of the sequences of batch ``position`` ((B,), or only those of ``rows``)."""
        picked = range(self.batch_size)[rows] if rows is not None else range(self.batch_size)
        out = np.empty(len(picked), np.int64)
        for n, j in enumerate(picked):
            i = position * self.batch_size + j
            offset, order = self._epoch_plan(i // self.num_windows)
            out[n] = offset + int(order[i % self.num_windows]) * self.seq_len
        return out

    def batch(self, position: int, rows: slice | None = None) -> np.ndarray:
        """int32 (B, S + 1) tokens of batch ``position``; with ``rows``, only those rows of it (what one
        host of a multi-host run reads: ``poetjax.distributed.global_batch``)."""
        ln = self.seq_len + 1
        seqs = [np.asarray(self.tokens[s:s + ln], np.int32) for s in self.starts(position, rows)]
        return np.stack(seqs) if seqs else np.zeros((0, ln), np.int32)

    def epoch(self, position: int) -> float:
        return position * self.batch_size / self.num_windows


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens int32 (B, S + 1), weights float32 (B,)) over consecutive valid windows (see module doc)."""
    n = int(tokens.shape[0])
    count = (n - 1) // seq_len
    if count < 1:
        raise DataError(f"the valid split has {n} tokens, too few for one sequence of seq_len={seq_len}")
    n_batches = -(-count // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    ln = seq_len + 1
    for b in range(n_batches):
        idx = range(b * batch_size, min((b + 1) * batch_size, count))
        out = np.zeros((batch_size, ln), np.int32)
        w = np.zeros((batch_size,), np.float32)
        for j, k in enumerate(idx):
            out[j] = tokens[k * seq_len:k * seq_len + ln]
            w[j] = 1.0
        yield out, w


def unigram_perplexity(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """exp of the valid split's mean negative log-likelihood under the train split's unigram
    distribution (add-one smoothed over the vocabulary): the bar any language model must clear."""
    counts = np.bincount(np.asarray(train, np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    return float(np.exp(-logp[np.asarray(valid, np.int64)].mean()))
