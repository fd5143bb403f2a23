"""Text sources: local files and folders (plain or ``.xz``), and TFDS datasets (optional import).

A source yields each split as a stream of text chunks (whole lines, about ``CHUNK_CHARS`` characters
each), so corpora larger than memory can be tokenized. Splits:

* a folder with ``train.*`` and ``valid.*`` (or ``validation.*``) files: those two files — the shipped
  Tiny Shakespeare (``train.txt``/``valid.txt``) and the Gutenberg format (``train.txt.xz``/``valid.txt.xz``);
* any other folder: every ``.txt``/``.text`` file (plain or ``.xz``) below it in sorted order, and a single
  file: its text; the last ``valid_fraction`` of the characters (cut at a line end) is the valid split;
* ``tfds:NAME[/CONFIG]``: the ``text`` feature of two TFDS splits, read with ``tfds.data_source`` (array_record,
  no TensorFlow needed). Only ``prepare`` touches TFDS; the training hot path reads numpy memmaps.
"""

from __future__ import annotations

import codecs
import hashlib
import lzma
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

CHUNK_CHARS = 1 << 20
TEXT_SUFFIXES = (".txt", ".txt.xz", ".text", ".text.xz")
ENCODING_ERRORS = ("strict", "replace")  # data.encoding_errors: Python's codec error handlers offered
TRAIN_NAMES = ("train",)
VALID_NAMES = ("valid", "validation", "val")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DataError(ValueError):
    """A missing, empty or unreadable data source; the message names it."""


@dataclass(frozen=True)
class TextSource:
    """One corpus: ``splits[name]()`` opens a fresh iterator of text chunks for that split."""

    description: str
    fingerprint: str                                   # content hash (files) or dataset identity (tfds)
    splits: dict[str, Callable[[], Iterator[str]]]


def resolve_path(path: str) -> str:
    """``path`` as given if it exists, else relative to the repository root (so ``python train.py`` finds
    the shipped corpus from any working directory); raises DataError naming both places."""
    if os.path.exists(path):
        return path
    alt = os.path.join(_REPO_ROOT, path)
    if not os.path.isabs(path) and os.path.exists(alt):
        return alt
    raise DataError(f"data source {path!r} does not exist (looked in the working directory and in the "
                    f"repository root); set data.source to a text file or folder")


def _open_text(path: str, errors: str = "strict"):
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def _first_bad_byte(path: str) -> tuple[int, int]:
    """(offset, value) of the first byte of ``path`` that is not valid UTF-8 (offsets into the decompressed
    text of a ``.xz`` file); the text decoder's own error only knows a position in its buffer."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with (lzma.open if path.endswith(".xz") else open)(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            held = dec.getstate()[0]  # bytes of a sequence cut by the previous block
            try:
                dec.decode(block)
            except UnicodeDecodeError as e:
                at = offset - len(held) + e.start
                return at, (held + block)[e.start]
            offset += len(block)
    held = dec.getstate()[0]
    return offset - len(held), held[0] if held else 0  # a sequence cut by the end of the file


def _group(pieces: Iterator[str], max_chars: int = 0) -> Iterator[str]:
    """Concatenate text pieces (lines, documents) into chunks of about CHUNK_CHARS characters, stopping
    after ``max_chars`` characters in total (0 = no limit)."""
    total = size = 0
    buf: list[str] = []
    for piece in pieces:
        if max_chars and total + len(piece) > max_chars:
            piece = piece[: max_chars - total]
        buf.append(piece)
        size += len(piece)
        total += len(piece)
        if size >= CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
        if max_chars and total >= max_chars:
            break
    if buf:
        yield "".join(buf)


def _lines(paths: list[str], errors: str = "strict") -> Iterator[str]:
    for p in paths:
        with _open_text(p, errors) as f:
            try:
                yield from f
            except UnicodeDecodeError:
                at, byte = _first_bad_byte(p)
                raise DataError(f"data file {p!r} is not UTF-8 text: byte 0x{byte:02x} at byte offset {at}"
                                f"{' of its decompressed text' if p.endswith('.xz') else ''}; fix the file, or set "
                                f"data.encoding_errors=replace to read undecodable bytes as U+FFFD") from None


def _file_chunks(paths: list[str], max_chars: int = 0, errors: str = "strict") -> Iterator[str]:
    """Whole lines from ``paths`` in order, grouped into chunks of about CHUNK_CHARS characters."""
    return _group(_lines(paths, errors), max_chars)


def hash_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _stem(name: str) -> str:
    for suf in sorted(TEXT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _text_files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(TEXT_SUFFIXES) and not f.startswith(".")]
    return out


def _split_tail(paths: list[str], valid_fraction: float, max_chars: int,
                errors: str = "strict") -> dict[str, Callable[[], Iterator[str]]]:
    """Train = the text before the cut, valid = after; the cut is the first line end after
    (1 − valid_fraction) of the characters."""
    total = sum(len(c) for c in _file_chunks(paths, max_chars, errors))
    target = int(total * (1.0 - valid_fraction))

    def split(which: str) -> Iterator[str]:
        seen = 0
        cut_done = False
        for chunk in _file_chunks(paths, max_chars, errors):
            if cut_done:
                if which == "valid":
                    yield chunk
                continue
            if seen + len(chunk) <= target:
                seen += len(chunk)
                if which == "train":
                    yield chunk
                continue
            nl = chunk.find("\n", target - seen)
            cut = len(chunk) if nl < 0 else nl + 1
            if which == "train":
                yield chunk[:cut]
            elif chunk[cut:]:
                yield chunk[cut:]
            cut_done = True

    return {"train": lambda: split("train"), "valid": lambda: split("valid")}


def local_source(path: str, valid_fraction: float = 0.1, max_chars: int = 0, errors: str = "strict") -> TextSource:
    """Text files; ``errors`` is the UTF-8 decoding's error handler (``ENCODING_ERRORS``)."""
    if errors not in ENCODING_ERRORS:
        raise DataError(f"data.encoding_errors must be one of {ENCODING_ERRORS}, got {errors!r}")
    # Part of the fingerprint, hence of the cache key, only when not the default: shards and checkpoints
    # prepared before the option existed (always strict) keep their key.
    tag = "" if errors == "strict" else f":errors={errors}"
    path = resolve_path(path)
    if os.path.isdir(path):
        files = _text_files(path)
        by_stem: dict[str, list[str]] = {}
        for f in files:
            if os.path.dirname(f) == path:
                by_stem.setdefault(_stem(os.path.basename(f)), []).append(f)
        train = next((by_stem[n] for n in TRAIN_NAMES if n in by_stem), None)
        valid = next((by_stem[n] for n in VALID_NAMES if n in by_stem), None)
        if train and valid:
            train, valid = sorted(train)[:1], sorted(valid)[:1]
            splits = {"train": lambda: _file_chunks(train, max_chars, errors),
                      "valid": lambda: _file_chunks(valid, max_chars, errors)}
            return TextSource(f"{path} (train/valid files)", hash_files(train + valid) + f":{max_chars}{tag}",
                              splits)
        if not files:
            raise DataError(f"data source folder {path!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        files = [path]
    fp = hash_files(files) + f":{valid_fraction}:{max_chars}{tag}"
    return TextSource(f"{path} ({len(files)} file(s), last {valid_fraction:.0%} held out)", fp,
                      _split_tail(files, valid_fraction, max_chars, errors))


def tfds_source(spec: str, data_dir: str = "", train_split: str = "train", valid_split: str = "validation",
                text_key: str = "text", max_chars: int = 0) -> TextSource:
    """``spec`` = "NAME[/CONFIG]" of a prepared TFDS dataset (e.g. "c4/en"), read without TensorFlow."""
    try:
        import tensorflow_datasets as tfds  # optional: only the prepare step of a tfds: source needs it
    except ImportError as e:
        raise DataError(f"data.source='tfds:{spec}' needs tensorflow-datasets (pip install -e '.[data]'); "
                        f"the training loop itself does not ({e})") from None
    if spec.split("/")[0] == "c4":
        try:  # c4's builder is not registered until its module is imported
            import tensorflow_datasets.text.c4  # noqa: F401
        except Exception:
            pass

    def open_split(split: str):
        try:
            return tfds.data_source(spec, split=split, data_dir=data_dir or None, download=False)
        except Exception as e:  # DatasetNotFoundError, missing files, missing Beam/TF for building
            raise DataError(
                f"could not open TFDS dataset {spec!r} split {split!r} (data_dir={data_dir or 'default'}): "
                f"{type(e).__name__}: {e}. The dataset must already be prepared in array_record format "
                f"under data.tfds_data_dir; it cannot be downloaded or built here (C4 needs Apache Beam and "
                f"the Common Crawl download).") from None

    def documents(split: str) -> Iterator[str]:
        ds = open_split(split)
        for i in range(len(ds)):
            ex = ds[i]
            if text_key not in ex:
                raise DataError(f"TFDS dataset {spec!r} has no feature {text_key!r}; features: {sorted(ex)}")
            text = ex[text_key]
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            yield text if text.endswith("\n") else text + "\n"

    def chunks(split: str) -> Iterator[str]:
        return _group(documents(split), max_chars)

    open_split(train_split)  # fail now, with the message above, rather than inside the tokenizer
    fp = hashlib.sha256(f"tfds:{spec}:{data_dir}:{train_split}:{valid_split}:{text_key}:{max_chars}".encode())
    return TextSource(f"tfds:{spec}", fp.hexdigest(),
                      {"train": lambda: chunks(train_split), "valid": lambda: chunks(valid_split)})


def open_source(source: str, *, valid_fraction: float = 0.1, max_chars: int = 0, tfds_data_dir: str = "",
                tfds_train_split: str = "train", tfds_valid_split: str = "validation",
                tfds_text_key: str = "text", encoding_errors: str = "strict") -> TextSource:
    if source.startswith("tfds:"):
        return tfds_source(source[len("tfds:"):], tfds_data_dir, tfds_train_split, tfds_valid_split,
                           tfds_text_key, max_chars)
    return local_source(source, valid_fraction, max_chars, encoding_errors)
