"""Training data: read sources -> clean -> split by document -> tokenize -> pack.

The pipeline, one function per stage so each can be tested on its own.  Every stage
streams, so peak memory does not grow with the size of the corpus:

* :func:`iter_texts` yields the raw document strings of the sources the user named
  (text files, folders, CSV/TSV, JSON/JSONL, Parquet, a ``datasets`` directory, a hub
  dataset name) one at a time: a folder's files one by one, a table's rows batch by
  batch from its memory-mapped Arrow data.
* :func:`iter_clean` applies the cleaning options of :class:`DataConfig` to each text
  and drops empty and duplicate documents (remembering a fixed-size digest per
  document, not the document).
* :func:`prepare_data` writes the cleaned documents once to an Arrow file, then works
  from that memory-mapped file: :func:`split_indices` holds out whole documents for
  validation (so no validation text is ever seen, even in part, during training),
  and the documents are tokenised, joined with the EOS token and cut into
  fixed-size blocks (no padding anywhere).  The blocks are written once as Arrow
  files under a cache directory and memory-mapped from there, so a corpus larger
  than RAM still trains and a second run skips tokenisation.

Every problem the user can fix is raised as :class:`DataError` (a
:class:`StyletuneError`) with a one-line message.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .config import DataConfig
from .models import cache_root
from .errors import StyletuneError

if TYPE_CHECKING:  # `datasets` is imported lazily: it is slow to import.
    import datasets



def _datasets():
    """`datasets`, imported on first use, with its progress bars off (styletune reports progress itself)
    and its logger quiet: a file it cannot read is logged there *and* raised, and styletune reports
    the raised error as one line that says where the file is malformed."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


FORMAT_VERSION = 1
"""Bump when the cached layout or the packing changes, to invalidate old caches."""

TEXT_EXTENSIONS = {".txt", ".md", ".text"}
TABLE_EXTENSIONS = {".csv", ".tsv", ".json", ".jsonl", ".parquet"}
MIN_BLOCK_SIZE = 8
"""A training block shorter than this teaches the model next to nothing."""

_READ_BATCH = 1000
"""Rows per batch when reading a table or tokenising (bounds memory, not results)."""


class DataError(StyletuneError):
    """A problem with the training data, reported to the user as one line."""


# --------------------------------------------------------------------------- reading


def new_read_stats() -> dict:
    """The stats :func:`iter_texts` fills in: ``{"records", "empty_dropped", "filtered_out", "skipped_files"}``."""
    return {"records": 0, "empty_dropped": 0, "filtered_out": 0, "skipped_files": []}


def iter_texts(cfg: DataConfig, sources: list[str] | None = None, stats: dict | None = None) -> Iterator[str]:
    """Yield the raw document texts of every source, one at a time.

    ``sources`` defaults to ``cfg.sources``.  Nothing is held beyond the current text
    (a folder's files are read one by one, a table's rows batch by batch from its
    memory-mapped Arrow data).  ``stats`` (see :func:`new_read_stats`) is filled in as
    the texts go by: records yielded, empty/missing texts dropped, rows removed by
    ``cfg.filter``, and the ``(path, reason)`` of every file of a folder skipped as not
    text.  When the sources hold no text at all, the generator raises :class:`DataError`
    once it reaches their end.
    """
    sources = list(cfg.sources if sources is None else sources)
    if stats is None:
        stats = new_read_stats()
    else:
        for key, value in new_read_stats().items():
            stats.setdefault(key, value)
    if not sources:
        raise DataError("no training data given: name at least one file, folder or dataset")
    _check_encoding(cfg.encoding)
    filters = _parse_filters(cfg.filter)

    for source in sources:
        for value in _read_source(str(source), cfg, filters, stats):
            if _is_blank(value):
                stats["empty_dropped"] += 1
            else:
                stats["records"] += 1
                yield value if isinstance(value, str) else str(value)

    if not stats["records"]:
        raise DataError(f"no text found in {', '.join(map(str, sources))}: {_nothing_read_details(stats)}")


def _nothing_read_details(stats: dict) -> str:
    """Why a read produced no text, for the error message."""
    n_read = stats["records"] + stats["empty_dropped"] + stats["filtered_out"]
    parts = [f"{n_read} records read", f"{stats['empty_dropped']} empty"]
    if stats["filtered_out"]:
        parts.append(f"{stats['filtered_out']} removed by --filter")
    skipped = stats["skipped_files"]
    if skipped:
        path, reason = skipped[0]
        parts.append(f"{len(skipped)} files skipped (first: {path}: {reason})")
    return ", ".join(parts)


def _is_blank(value: Any) -> bool:
    """None, NaN (pandas' missing value) or a whitespace-only string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown encoding '{encoding}' (try utf-8, latin-1, cp1252 or utf-16)") from None


def _parse_filters(specs: list[str]) -> list[tuple[str, str]]:
    """``["author=Poe"]`` -> ``[("author", "Poe")]``; splits at the first '='."""
    filters = []
    for spec in specs or []:
        column, sep, value = spec.partition("=")
        if not sep or not column.strip():
            raise DataError(f"--filter '{spec}' is not of the form COLUMN=VALUE")
        filters.append((column.strip(), value))
    return filters


def _read_source(source: str, cfg: DataConfig, filters: list[tuple[str, str]], stats: dict) -> Iterator:
    """The raw text values (possibly None/NaN) of one source, one at a time, dispatched on its kind."""
    path = Path(source).expanduser()
    column = cfg.column or cfg.field or "text"  # --field is the JSON spelling of --column
    if path.is_dir():
        if _is_saved_dataset(path):
            yield from _table_texts(_load_saved_dataset(path, cfg.split), source, column, "column", filters, stats)
        else:
            yield from _read_folder(path, cfg, filters, stats)
        return

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            ds = _load_csv(path, source, cfg.encoding, sep="\t" if suffix == ".tsv" else ",")
            yield from _table_texts(ds, source, column, "column", filters, stats)
        elif suffix in (".json", ".jsonl"):
            ds = _load_json(path, source, cfg.encoding)
            yield from _table_texts(ds, source, cfg.field or cfg.column or "text", "field", filters, stats)
        elif suffix == ".parquet":
            ds = _load_with_datasets("from_parquet", path, source)
            yield from _table_texts(ds, source, column, "column", filters, stats)
        else:
            # .txt/.md/.text, and any other extension: the whole file is one document.
            _refuse_filters_on_text(filters, source)
            try:
                text = _decode_file(path, cfg.encoding)
            except _NotText as e:
                raise DataError(f"{source} {e.explanation}") from None
            yield text
        return

    if _looks_like_path(source):
        raise DataError(f"no such file or directory: {source}")
    yield from _table_texts(_load_hub_dataset(source, cfg), source, column, "column", filters, stats)


def _looks_like_path(source: str) -> bool:
    """Whether a missing source was meant as a local path rather than a hub name.

    Hub names are ``name`` or ``owner/name``; anything with a file extension we read,
    a leading ``.``, ``/`` or ``~``, or deeper nesting is taken as a path.
    """
    return (
        Path(source).suffix.lower() in TEXT_EXTENSIONS | TABLE_EXTENSIONS
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _refuse_filters_on_text(filters: list[tuple[str, str]], source: str) -> None:
    # Silently ignoring --filter would train on text the user meant to exclude.
    if filters:
        raise DataError(f"--filter needs a table (CSV, JSON, Parquet or a dataset), but {source} is plain text")


# ---- plain text files and folders


class _NotText(Exception):
    """A file that cannot be read as text in the requested encoding."""

    def __init__(self, reason: str, explanation: str):
        super().__init__(reason)
        self.reason = reason  # short, for the list of skipped files
        self.explanation = explanation  # follows the file name in an error message


def _decode_file(path: Path, encoding: str) -> str:
    """A whole file as text; raises :class:`_NotText` for binary or mis-encoded files."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    # A NUL never occurs in real text but starts almost every binary format.  Check
    # the bytes first, so that an image is reported as binary rather than as
    # mis-encoded; UTF-16/32 text is full of NUL bytes, so for those check the text.
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    if not wide and b"\x00" in data:
        raise _NotText("binary (contains NUL bytes)", _BINARY_EXPLANATION)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        reason = f"not valid {encoding} at byte {e.start}"
        raise _NotText(reason, f"is not valid {encoding} at byte {e.start}; {_encoding_hint(encoding)}") from None
    if wide and "\x00" in text:
        raise _NotText("binary (contains NUL bytes)", _BINARY_EXPLANATION)
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the text


_BINARY_EXPLANATION = "looks like a binary file (it contains NUL bytes), not text; if it is UTF-16 pass --encoding utf-16"


def _encoding_hint(encoding: str) -> str:
    if codecs.lookup(encoding).name == "iso8859-1":
        return "pass --encoding with the file's real encoding"
    return "pass --encoding latin-1 if that is its encoding"


def _read_folder(folder: Path, cfg: DataConfig, filters: list[tuple[str, str]], stats: dict) -> Iterator[str]:
    """Each text file under ``folder`` matching ``cfg.glob`` is one document, read when it is reached.

    Files that are not text are skipped with a warning and recorded in
    ``stats["skipped_files"]``: a folder of someone's writing often holds the odd
    image or PDF, and that should not stop training on the rest.
    """
    _refuse_filters_on_text(filters, str(folder))
    files = _folder_files(folder, cfg.glob)
    if not files:
        raise DataError(f"no files match --glob '{cfg.glob}' in {folder}")
    for file in files:
        try:
            text = _decode_file(file, cfg.encoding)
        except _NotText as e:
            warnings.warn(f"skipping {file}: {e.reason}", stacklevel=2)
            stats["skipped_files"].append((str(file), e.reason))
            continue
        yield text


def _folder_files(folder: Path, pattern: str) -> list[Path]:
    """Files under ``folder`` matching ``pattern``, sorted, hidden ones left out.

    A pattern without '/' (``*.txt``) matches at any depth, so the folder is always
    read recursively.  Hidden files and folders (``.git``, ``.DS_Store``) are never
    documents, so they are skipped quietly.
    """
    matches = folder.rglob(pattern) if "/" not in pattern else folder.glob(pattern)
    files = []
    for p in matches:
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            files.append(p)
    return sorted(files)


# ---- tables: CSV, JSON, Parquet, datasets directories, hub datasets


def _load_with_datasets(method: str, path: Path, source: str, **kwargs) -> "datasets.Dataset":
    """``Dataset.from_csv/from_json/from_parquet``, converted once to memory-mapped Arrow.

    The Arrow copy is kept in styletune's cache (not ~/.cache/huggingface), keyed by
    ``datasets`` on the file's path and modification time.
    """
    datasets = _datasets()

    loader = getattr(datasets.Dataset, method)
    try:
        return loader(str(path), cache_dir=str(cache_root() / "datasets"), **kwargs)
    except Exception as e:  # pandas/pyarrow/datasets raise many types; all mean "unreadable"
        encoding = kwargs.get("encoding")
        if encoding:
            offset = _first_undecodable_byte(path, encoding)
            if offset is not None:
                raise DataError(f"{source} is not valid {encoding} at byte {offset}; {_encoding_hint(encoding)}") from None
        where = _find_malformed(method, path, encoding or "utf-8", kwargs.get("sep", ","))
        raise DataError(f"could not read {source}: {where or _root_cause(e)}") from None


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception: ``datasets`` wraps the reader's own message
    ("Parquet magic bytes not found ...") in "An error occurred while generating the dataset"."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return _first_line(error)


def _find_malformed(method: str, path: Path, encoding: str, sep: str) -> str | None:
    """Where a CSV or JSON file that failed to load is malformed, as "line N: what is wrong there"
    (read again with Python's own parsers, which say where), or None if they find nothing."""
    import csv
    import json

    try:
        with open(path, encoding=encoding, newline="") as f:
            if method == "from_csv":
                reader = csv.reader(f, delimiter=sep, strict=True)
                width = None
                while True:
                    start = reader.line_num + 1
                    try:
                        row = next(reader)
                    except StopIteration:
                        return None
                    except csv.Error as e:
                        if "end of data" in str(e) or "EOF" in str(e):
                            return f"line {start}: a quoted field opened here is never closed (unterminated \")"
                        return f"line {start}: {e}"
                    if width is None:
                        width = len(row)
                    elif row and len(row) != width:
                        return f"line {start}: {len(row)} fields where the header has {width}"
            if method == "from_json":
                text_start = f.read(4096).lstrip()[:1]
                f.seek(0)
                if text_start == "[":
                    try:
                        json.load(f)
                    except json.JSONDecodeError as e:
                        return f"line {e.lineno}, column {e.colno}: {e.msg}"
                    return None
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as e:
                        return f"line {number}, column {e.colno}: {e.msg}"
                    if not isinstance(record, dict):
                        return f"line {number}: expected a JSON object, found {type(record).__name__}"
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _load_csv(path: Path, source: str, encoding: str, sep: str) -> "datasets.Dataset":
    """A CSV/TSV file with every column read as a string.

    Strings everywhere keep --filter predictable (a ``year`` column with a gap would
    otherwise become float, and ``year=1845`` would not match ``1845.0``), and keep
    texts that happen to look like numbers.  Only empty cells count as missing,
    so a text that is literally "NA" or "None" survives.
    """
    datasets = _datasets()

    header = _csv_header(path, source, encoding, sep)
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return _load_with_datasets("from_csv", path, source, features=features, sep=sep, encoding=encoding,
                               keep_default_na=False, na_values=[""])


def _csv_header(path: Path, source: str, encoding: str, sep: str) -> list[str]:
    import csv

    try:
        with open(path, encoding=encoding, newline="") as f:
            header = next(csv.reader(f, delimiter=sep), None)
    except UnicodeDecodeError:
        offset = _first_undecodable_byte(path, encoding)
        raise DataError(f"{source} is not valid {encoding} at byte {offset}; {_encoding_hint(encoding)}") from None
    if not header:
        raise DataError(f"{source} is empty (expected a header row naming the columns)")
    if len(set(header)) != len(header):
        raise DataError(f"{source} has duplicate column names in its header: {', '.join(header)}")
    return header


def _load_json(path: Path, source: str, encoding: str) -> "datasets.Dataset":
    """JSON lines, or a JSON list of objects (``datasets`` reads both)."""
    if path.stat().st_size == 0:
        raise DataError(f"{source} is empty")
    return _load_with_datasets("from_json", path, source, encoding=encoding)


def _first_undecodable_byte(path: Path, encoding: str, chunk_size: int = 1 << 20) -> int | None:
    """Byte offset of the first byte ``encoding`` cannot decode, or None; streams the file."""
    decoder = codecs.getincrementaldecoder(encoding)()
    consumed = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            pending = len(decoder.getstate()[0])  # bytes held back from the previous chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return consumed - pending + e.start
            consumed += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return consumed - len(decoder.getstate()[0]) + e.start
    return None


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is the output of ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _load_saved_dataset(path: Path, split: str | None) -> "datasets.Dataset":
    """A ``save_to_disk`` directory, with ``split`` (default ``train``) and its slicing applied.

    ``load_from_disk`` knows no split syntax, so ``train[:10%]`` is resolved with
    ``datasets.ReadInstruction`` (the same rules as ``load_dataset``) and applied with
    contiguous ``select``s, which stay memory-mapped.  A single saved Dataset answers
    to any split name.
    """
    datasets = _datasets()

    spec = split or "train"
    try:
        instruction = datasets.ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as e:
        raise DataError(f"bad --split '{spec}': {_first_line(e)}") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"could not load the dataset in {path}: {_first_line(e)}") from None

    if isinstance(loaded, datasets.DatasetDict):
        by_name = dict(loaded)
    else:
        by_name = {name: loaded for name in _split_names(spec)}
    for name in _split_names(spec):
        if name not in by_name:
            raise DataError(f"split '{name}' not found in {path}; splits are: {', '.join(by_name)}")

    try:
        ranges = instruction.to_absolute({name: len(ds) for name, ds in by_name.items()})
    except (ValueError, AssertionError) as e:
        raise DataError(f"bad --split '{spec}': {_first_line(e)}") from None
    parts = [by_name[r.splitname].select(range(r.from_, r.to)) for r in ranges]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _split_names(spec: str) -> list[str]:
    """``"train[:10%]+test"`` -> ``["train", "test"]``."""
    return [part.split("[")[0].strip() for part in spec.split("+")]


def _load_hub_dataset(name: str, cfg: DataConfig) -> "datasets.Dataset":
    """A dataset from the Hugging Face hub (or its local cache when offline)."""
    datasets = _datasets()

    try:
        return datasets.load_dataset(name, cfg.config, split=cfg.split or "train")
    except Exception as e:  # offline, not found, gated, bad config... all one line for the user
        raise DataError(
            f"dataset '{name}' could not be loaded (it is not a local file or folder either): {_first_line(e)}"
        ) from None


def _table_texts(ds: "datasets.Dataset", where: str, column: str, kind: str,
                 filters: list[tuple[str, str]], stats: dict) -> Iterator:
    """The values of ``column`` in the rows of ``ds`` that pass every filter, one at a time.

    Reads the memory-mapped table in batches of only the needed columns, so one batch
    is in memory at a time; nothing is written next to the user's data (unlike
    ``Dataset.filter``, which writes an indices file).
    """
    columns = list(ds.column_names)
    listing = f"{kind}s are: {', '.join(columns)}"
    for col, _ in filters:
        if col not in columns:
            raise DataError(f"--filter column '{col}' not found in {where}; {listing}")
    if column not in columns:
        raise DataError(f"{kind} '{column}' not found in {where}; {listing}")

    needed = list(dict.fromkeys([column] + [col for col, _ in filters]))
    for batch in ds.select_columns(needed).iter(batch_size=_READ_BATCH):
        for i, value in enumerate(batch[column]):
            if all(str(batch[col][i]) == want for col, want in filters):
                yield value
            else:
                stats["filtered_out"] += 1


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------- cleaning


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$\n?", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK", re.I | re.M)
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace except newline
_BLANK_LINES = re.compile(r"\n{3,}")


def new_clean_stats() -> dict:
    """The stats :func:`iter_clean` fills in: ``{"duplicates", "emptied"}``."""
    return {"duplicates": 0, "emptied": 0}


def iter_clean(texts: Iterable[str], cfg: DataConfig, stats: dict | None = None) -> Iterator[str]:
    """Apply the cleaning options of ``cfg`` to each text as it streams by, in a fixed order.

    Gutenberg stripping, NFC normalisation, control characters, whitespace, ASCII;
    then texts left empty are dropped and exact duplicates removed (the first copy is
    kept).  Duplicates are recognised by a 16-byte BLAKE2b digest of the cleaned text,
    so what is remembered per document is fixed-size whatever the document's length.
    ``stats`` (see :func:`new_clean_stats`) counts ``duplicates`` and ``emptied``.
    """
    if stats is None:
        stats = new_clean_stats()
    else:
        for key, value in new_clean_stats().items():
            stats.setdefault(key, value)
    seen: set[bytes] = set()
    for text in texts:
        text = clean_text(text, cfg)
        if not text.strip():
            stats["emptied"] += 1
            continue
        if cfg.dedupe:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in seen:
                stats["duplicates"] += 1
                continue
            seen.add(digest)
        yield text


def clean_text(text: str, cfg: DataConfig) -> str:
    """One text through the cleaning steps enabled in ``cfg``."""
    if cfg.strip_gutenberg:
        text = strip_gutenberg(text)
    if cfg.normalize:
        text = unicodedata.normalize("NFC", text)
    if cfg.strip_control:
        text = strip_control(text)
    if cfg.collapse_whitespace:
        text = collapse_whitespace(text)
    if cfg.ascii_only:
        text = text.encode("ascii", "ignore").decode("ascii")
        if cfg.collapse_whitespace:
            # Dropping "—" from "a — b" leaves two spaces; tidy up again.
            text = collapse_whitespace(text)
    return text


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (through the ``*** START OF ...`` line) and
    footer (from the ``*** END OF ...`` line on); texts without them are unchanged."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


@functools.cache
def _control_chars() -> dict[int, None]:
    """A ``str.translate`` table deleting every Cc/Cf character except newline and tab.

    Built once by scanning all of Unicode (~0.2 s): Cf is scattered over many blocks,
    and ``re`` has no ``\\p{Cc}``.
    """
    import sys

    return {
        cp: None
        for cp in range(sys.maxunicode + 1)
        if unicodedata.category(chr(cp)) in ("Cc", "Cf") and chr(cp) not in "\n\t"
    }


def strip_control(text: str) -> str:
    """Remove control and format characters, keeping newlines and tabs.

    Windows (CRLF) and old Mac (CR) line ends become newlines first: deleting the CR
    of a lone-CR file would join all its lines into one.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.translate(_control_chars())


def collapse_whitespace(text: str) -> str:
    """One space for each run of spaces/tabs in a line, lines trimmed, at most one
    blank line in a row, and no leading or trailing whitespace."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------- splitting


def split_documents(texts: list[str], val_fraction: float, min_val_docs: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole documents for validation; returns ``(train, val)``.

    ``max(min_val_docs, round(len(texts) * val_fraction))`` documents, chosen by a
    shuffle seeded with ``seed``, always leaving at least one for training; both
    lists keep the corpus order.  A single document is instead cut at a paragraph
    (or line, sentence, word) boundary near its end, so even a one-file corpus gets
    a validation set; ``val_fraction == 0`` means no validation set.
    """
    _check_split_options(val_fraction, min_val_docs)
    texts = list(texts)
    if len(texts) == 1 and val_fraction > 0:
        return _split_one_document(texts[0], val_fraction)
    train_idx, val_idx = split_indices(len(texts), val_fraction, min_val_docs, seed)
    return [texts[i] for i in train_idx], [texts[i] for i in val_idx]


def split_indices(n: int, val_fraction: float, min_val_docs: int, seed: int) -> tuple[list[int], list[int]]:
    """The document indices :func:`split_documents` puts in ``(train, val)``, both ascending.

    For ``n >= 2`` documents: ``min(max(min_val_docs, round(n * val_fraction)), n - 1)``
    held out, chosen by ``random.Random(seed).shuffle``.  For ``n <= 1`` or
    ``val_fraction == 0`` every index is training (cutting a lone document is the
    caller's business).
    """
    _check_split_options(val_fraction, min_val_docs)
    if val_fraction == 0 or n <= 1:
        return list(range(n)), []
    n_val = min(max(min_val_docs, round(n * val_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    del order
    held_out = set(val)
    return [i for i in range(n) if i not in held_out], val


def _check_split_options(val_fraction: float, min_val_docs: int) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    if min_val_docs < 0:
        raise DataError(f"--min-val-docs must be >= 0, got {min_val_docs}")


# Boundaries to cut a lone document at, best first.
_CUT_POINTS = [re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+")]


def _split_one_document(text: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """Cut one text so that about ``val_fraction`` of it, from the end, is validation.

    Takes the best kind of boundary that has a cut close enough to the target (the
    validation part at most twice the wanted size), else the nearest whitespace.
    """
    target = round(len(text) * (1 - val_fraction))
    window = max(1, len(text) - target)
    best = None
    for pattern in _CUT_POINTS:
        cuts = [m for m in pattern.finditer(text) if text[:m.start()].strip() and text[m.end():].strip()]
        if not cuts:
            continue
        nearest = min(cuts, key=lambda m: abs(m.start() - target))
        if best is None:
            best = nearest  # fallback: the best kind of boundary that exists at all
        if abs(nearest.start() - target) <= window:
            best = nearest
            break
    if best is None:
        return [text], []
    return [text[:best.start()].strip()], [text[best.end():].strip()]


# --------------------------------------------------------------------------- tokenising and packing


@dataclass
class PreparedData:
    """Tokenised, packed data ready for training.

    ``train`` has one column ``input_ids`` whose rows are exactly ``block_size`` token
    ids (torch format).  ``val`` is the same, or a single shorter block when the
    validation text has fewer tokens than a block, or None without validation text.
    """

    train: "datasets.Dataset"
    val: "datasets.Dataset | None"
    block_size: int
    summary: dict
    cache_key: str


def prepare_data(cfg: DataConfig, tokenizer, seed: int = 0, max_block_size: int | None = None,
                 cache_dir: str | Path | None = None) -> PreparedData:
    """Read, clean, split, tokenise and pack ``cfg``'s data, using the cache when it can.

    Each document is tokenised without special tokens and followed by EOS; the
    documents are concatenated and cut into blocks of ``cfg.block_size`` (the
    remainder is dropped).  When the training text is shorter than one block the
    block shrinks to the largest power of two that fits.  Results are cached under
    ``cache_dir/<key>`` (default ``cache_root()/"data"/<key>``).

    Every stage streams, so peak memory does not grow with the corpus: the sources
    are read and cleaned one text at a time and the cleaned documents written once to
    an Arrow file in a fresh temporary directory; the split, the cache key, the
    tokenisation and the packing then work on that memory-mapped file.
    """
    block_size = _check_block_size(cfg.block_size, max_block_size)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-text (EOS) token to separate documents with")

    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    work = Path(tempfile.mkdtemp(prefix=".tmp-docs-", dir=root))
    try:
        read_stats, clean_stats = new_read_stats(), new_clean_stats()
        docs, doc_stats = _write_docs(iter_clean(iter_texts(cfg, None, read_stats), cfg, clean_stats),
                                      work / "docs.arrow")
        if not doc_stats["docs"]:
            raise DataError(f"no text left after cleaning: all {read_stats['records']} records became empty")
        notes: list[str] = []
        shortest, longest = doc_stats["shortest"], doc_stats["longest"]
        records, characters = doc_stats["docs"], doc_stats["chars"]
        if cfg.val:
            val_read, val_clean = new_read_stats(), new_clean_stats()
            val, val_stats = _write_docs(iter_clean(iter_texts(cfg, [cfg.val], val_read), cfg, val_clean),
                                         work / "val-docs.arrow")
            train = docs
            read_stats = _add_stats(read_stats, val_read)
            clean_stats = _add_stats(clean_stats, val_clean)
            records += val_stats["docs"]
            characters += val_stats["chars"]
            if val_stats["docs"]:
                shortest, longest = min(shortest, val_stats["shortest"]), max(longest, val_stats["longest"])
        elif doc_stats["docs"] == 1 and cfg.val_fraction > 0:
            _check_split_options(cfg.val_fraction, cfg.min_val_docs)
            (train_text,), val_texts = _split_one_document(docs[0]["text"], cfg.val_fraction)
            train, _ = _write_docs([train_text], work / "train-docs.arrow")
            val = _write_docs(val_texts, work / "val-docs.arrow")[0] if val_texts else None
            characters = len(train_text) + sum(map(len, val_texts))
            if val_texts:
                notes.append(f"only one document: its last {len(val_texts[0]):,} characters are the validation set")
            else:
                notes.append("the only document could not be split, so there is no validation set")
        else:
            train_idx, val_idx = split_indices(len(docs), cfg.val_fraction, cfg.min_val_docs, seed)
            train = _select(docs, train_idx, work / "train-indices.arrow")
            val = _select(docs, val_idx, work / "val-indices.arrow") if val_idx else None
            del train_idx, val_idx
        train_docs, val_docs = len(train), len(val) if val is not None else 0

        key = _cache_key(train, val, tokenizer, block_size, eos)
        target = root / key
        meta = _read_cache_meta(target)
        cached = meta is not None
        if not cached:
            meta = _build_cache(target, train, val, tokenizer, eos, block_size)
        del docs, train, val
    finally:
        shutil.rmtree(work, ignore_errors=True)

    train_blocks = _open_blocks(target / "train.arrow")
    val_blocks = _open_blocks(target / "val.arrow") if meta["val_blocks"] else None
    summary = {
        "records": records,
        "characters": characters,
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "train_docs": train_docs,
        "val_docs": val_docs,
        "duplicates": clean_stats["duplicates"],
        "empty_dropped": read_stats["empty_dropped"] + clean_stats["emptied"],
        "filtered_out": read_stats["filtered_out"],
        "shortest_chars": shortest,
        "longest_chars": longest,
        "block_size": meta["block_size"],
        "train_blocks": meta["train_blocks"],
        "val_blocks": meta["val_blocks"],
        "skipped_files": read_stats["skipped_files"],
        "notes": notes + meta["notes"],
        "cached": cached,
    }
    return PreparedData(train=train_blocks, val=val_blocks, block_size=meta["block_size"], summary=summary,
                        cache_key=key)


_WRITE_BATCH_CHARS = 16 << 20
"""Characters of text buffered before a batch of documents is written (bounds memory, not results)."""


def _write_docs(texts: Iterable[str], path: Path) -> tuple["datasets.Dataset | None", dict]:
    """Write ``texts`` to an Arrow stream file as one ``text`` column and memory-map it back.

    Only one batch of texts is held at a time.  Returns the dataset (None without any
    text) and ``{"docs", "chars", "shortest", "longest"}`` (character counts).
    """
    import pyarrow as pa

    datasets = _datasets()
    schema = pa.schema([("text", pa.large_string())])
    stats = {"docs": 0, "chars": 0, "shortest": 0, "longest": 0}
    batch: list[str] = []
    batch_chars = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for text in texts:
            n = len(text)
            stats["shortest"] = n if not stats["docs"] else min(stats["shortest"], n)
            stats["longest"] = max(stats["longest"], n)
            stats["docs"] += 1
            stats["chars"] += n
            batch.append(text)
            batch_chars += n
            if len(batch) >= _READ_BATCH or batch_chars >= _WRITE_BATCH_CHARS:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
                batch, batch_chars = [], 0
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
    del batch
    return (datasets.Dataset.from_file(str(path)) if stats["docs"] else None), stats


def _select(docs: "datasets.Dataset", indices: list[int], path: Path) -> "datasets.Dataset":
    """The rows ``indices`` (ascending) of ``docs``, as a view: an indices file at ``path``, or a plain
    slice when they are contiguous.  The texts themselves are not copied."""
    if indices and indices[-1] - indices[0] + 1 == len(indices):
        return docs.select(range(indices[0], indices[-1] + 1))
    return docs.select(indices, indices_cache_file_name=str(path), new_fingerprint=path.stem)


def _iter_column(ds: "datasets.Dataset | None", column: str = "text") -> Iterator[str]:
    """The values of one string column, a batch at a time from the memory-mapped table."""
    if ds is None:
        return
    for batch in ds.with_format("arrow").iter(batch_size=_READ_BATCH):
        yield from batch.column(column).to_pylist()


def _check_block_size(block_size: int, max_block_size: int | None) -> int:
    if not isinstance(block_size, int) or block_size < 1:
        raise DataError(f"--block-size must be a positive integer, got {block_size}")
    if max_block_size is not None and block_size > max_block_size:
        raise DataError(f"--block-size {block_size} is larger than the model's context ({max_block_size} tokens)")
    return block_size


def _add_stats(a: dict, b: dict) -> dict:
    """Sum two stats dicts key by key (lists are concatenated)."""
    return {k: a[k] + b[k] for k in a}


def _fit_block_size(block_size: int, train_tokens: int) -> tuple[int, list[str]]:
    """The block size to use, shrunk to a power of two if the text is shorter than a block."""
    if train_tokens >= block_size:
        return block_size, []
    if train_tokens < MIN_BLOCK_SIZE:
        raise DataError(f"the training text has only {train_tokens} tokens; at least {MIN_BLOCK_SIZE} are needed")
    shrunk = 1 << (train_tokens.bit_length() - 1)  # largest power of two <= train_tokens
    return shrunk, [f"the training text has only {train_tokens:,} tokens, fewer than --block-size "
                    f"{block_size}; using blocks of {shrunk} tokens"]


def _cache_key(train: "datasets.Dataset", val: "datasets.Dataset | None", tokenizer, block_size: int,
               eos: int) -> str:
    """sha256 over everything the packed blocks depend on, streamed over the cleaned documents.

    The cleaned texts already reflect every reading, cleaning and split option (and
    the seed), so those need not be hashed separately.  Each piece is
    length-prefixed so that different inputs can never hash the same bytes.
    """
    h = hashlib.sha256()

    def add(piece: str) -> None:
        data = piece.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for piece in (f"styletune-data-v{FORMAT_VERSION}", type(tokenizer).__name__,
                  str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
                  _vocab_hash(tokenizer), str(block_size), str(eos), f"train {len(train)}"):
        add(piece)
    for text in _iter_column(train):
        add(text)
    add(f"val {len(val) if val is not None else 0}")
    for text in _iter_column(val):
        add(text)
    return h.hexdigest()


def _vocab_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_cache_meta(target: Path) -> dict | None:
    """The metadata of a complete cache entry at ``target``, or None (removing a bad one)."""
    try:
        meta = json.loads((target / "meta.json").read_text())
        if isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION and (target / "train.arrow").is_file():
            return meta
    except (OSError, ValueError):
        if not target.exists():
            return None
    # Unreadable or from another format version: rebuild it.
    shutil.rmtree(target, ignore_errors=True)
    return None


def _build_cache(target: Path, train: "datasets.Dataset", val: "datasets.Dataset | None", tokenizer, eos: int,
                 block_size: int) -> dict:
    """Tokenise and pack into a temporary directory, then move it to ``target`` atomically.

    Everything is written next to ``target`` (same file system) and renamed with
    ``os.replace``, so a run killed half-way leaves no half-written cache entry.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:16]}-", dir=target.parent))
    try:
        train_docs = _tokenize(train, tokenizer, eos, tmp / "train-docs.arrow")
        train_tokens = _count_tokens(train_docs)
        block_size, notes = _fit_block_size(block_size, train_tokens)
        train_blocks = _pack(train_docs, block_size, tmp / "train.arrow")

        val_tokens = val_blocks = 0
        if val is not None and len(val):
            val_docs = _tokenize(val, tokenizer, eos, tmp / "val-docs.arrow")
            val_tokens = _count_tokens(val_docs)
            # Fewer tokens than a block: one shorter block, so a tiny corpus still validates.
            val_blocks = _pack(val_docs, min(block_size, val_tokens), tmp / "val.arrow")
            del val_docs
        del train_docs
        for name in ("train-docs.arrow", "val-docs.arrow"):
            (tmp / name).unlink(missing_ok=True)

        meta = {"format": FORMAT_VERSION, "block_size": block_size, "train_tokens": train_tokens,
                "val_tokens": val_tokens, "train_blocks": train_blocks, "val_blocks": val_blocks, "notes": notes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another run with the same inputs finished first; its entry is identical.
            if _read_cache_meta(target) is None:
                raise
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temp_dirs(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete temporary directories that killed runs left behind (older than a day)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _tokenize(docs: "datasets.Dataset", tokenizer, eos: int, path: Path) -> "datasets.Dataset":
    """One row of token ids per document of ``docs`` (a ``text`` column, memory-mapped), EOS appended,
    written to ``path`` by a batched ``Dataset.map``."""
    datasets = _datasets()

    def encode(batch: dict) -> dict:
        # No special tokens: a BOS/EOS pair around each document would differ between
        # tokenizers; one EOS after each document is the only separator.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    return docs.map(
        encode,
        batched=True,
        batch_size=_READ_BATCH,
        remove_columns=["text"],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        cache_file_name=str(path),
        # The file lives in a fresh temp dir, so no fingerprint (which would hash the
        # tokenizer, slowly) is needed to tell it apart.
        new_fingerprint=path.stem,
        desc="Tokenizing",
    )


def _count_tokens(docs: "datasets.Dataset") -> int:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(docs.data.column("input_ids"))
    return int(pc.sum(lengths).as_py() or 0)


def _pack(docs: "datasets.Dataset", block_size: int, path: Path) -> int:
    """Concatenate the documents' ids and write them as rows of exactly ``block_size``.

    Like transformers' ``run_clm`` ``group_texts``, but the leftover of each batch is
    carried into the next instead of dropped, so the blocks are exactly the start of
    the full token stream; only the final remainder is dropped.  Rows are written
    straight to an Arrow stream file, one batch at a time, so memory stays bounded.
    Returns the number of blocks.
    """
    import numpy as np
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32(), block_size))])
    carry = np.empty(0, dtype=np.int32)
    n_blocks = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in docs.with_format("arrow").iter(batch_size=_READ_BATCH):
            flat = batch.column("input_ids").combine_chunks().flatten().to_numpy()
            stream = np.concatenate([carry, flat])
            n = len(stream) // block_size
            if n:
                ids = pa.FixedSizeListArray.from_arrays(pa.array(stream[: n * block_size]), block_size)
                writer.write_batch(pa.record_batch([ids], schema=schema))
                n_blocks += n
            carry = stream[n * block_size:]
    return n_blocks


def _open_blocks(path: Path) -> "datasets.Dataset":
    """A packed block file, memory-mapped, as torch tensors (int64 ids)."""
    datasets = _datasets()

    ds = datasets.Dataset.from_file(str(path))
    ds.set_format("torch", columns=["input_ids"])
    return ds


# --------------------------------------------------------------------------- reporting


def format_summary(summary: dict) -> str:
    """A few human-readable lines describing prepared data, for the CLI."""
    s = summary
    lines = [
        f"{s['records']:,} records, {s['characters']:,} characters, {s['tokens']:,} tokens "
        f"({s['train_tokens']:,} train / {s['val_tokens']:,} val)"
    ]
    dropped = []
    if s.get("duplicates"):
        dropped.append(_plural(s["duplicates"], "duplicate"))
    if s.get("empty_dropped"):
        dropped.append(_plural(s["empty_dropped"], "empty record"))
    if s.get("filtered_out"):
        dropped.append(f"{s['filtered_out']:,} filtered out")
    if dropped:
        lines.append(f"{_join_and(dropped)} dropped")
    lines.append(f"shortest {s['shortest_chars']:,} chars, longest {s['longest_chars']:,} chars")
    blocks = f"{_plural(s['train_blocks'], 'train block')} of {s['block_size']} tokens"
    if s.get("val_blocks"):
        blocks += f", {_plural(s['val_blocks'], 'validation block')}"
    else:
        blocks += ", no validation set"
    if s.get("cached"):
        blocks += " (from cache)"
    lines.append(blocks)
    skipped = s.get("skipped_files") or []
    if skipped:
        shown = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        lines.append(f"skipped {_plural(len(skipped), 'file')}: {shown}{more}")
    lines.extend(f"note: {note}" for note in s.get("notes", []))
    return "\n".join(lines)


def _join_and(items: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
