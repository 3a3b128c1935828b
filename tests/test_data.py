"""Tests for styletune.data: reading every format, cleaning, splitting, packing, caching."""

import json
import warnings

import pytest

from styletune.config import DataConfig
from styletune.data import (
    DataError,
    PreparedData,
    cache_root,
    format_summary,
    iter_clean,
    iter_texts,
    new_clean_stats,
    new_read_stats,
    prepare_data,
    split_documents,
    split_indices,
)
from styletune.errors import StyletuneError

# Every cleaning step off, so a test can switch on exactly the one it checks.
NO_CLEANING = dict(normalize=False, strip_control=False, collapse_whitespace=False, ascii_only=False,
                   strip_gutenberg=False, dedupe=False)

SENTENCES = [
    "Once upon a midnight dreary, while I pondered, weak and weary.",
    "The quick brown fox jumps over the lazy dog!",
    "Why did the chicken cross the road? To get to the other side.",
    "Over many a quaint and curious volume of forgotten lore.",
]


def make_docs(n, repeat=1):
    """n distinct documents built from the tokenizer's training sentences."""
    return [f"Document {i}. " + " ".join(SENTENCES[(i + j) % 4] for j in range(2 * repeat)) for i in range(n)]


def write_docs(folder, docs, suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        p = folder / f"doc{i:03d}{suffix}"
        p.write_text(doc, encoding="utf-8")
        paths.append(str(p))
    return paths


def read_all(cfg, sources=None):
    """Every text :func:`iter_texts` yields, and its stats (tests' inputs are tiny)."""
    stats = new_read_stats()
    return list(iter_texts(cfg, sources, stats)), stats


def clean_all(texts, cfg):
    stats = new_clean_stats()
    return list(iter_clean(texts, cfg, stats)), stats


def tokens_of(tokenizer, docs):
    """The reference token stream: each document without special tokens, then EOS."""
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


# --------------------------------------------------------------------------- reading: formats


def test_text_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("First file.\nSecond line.")
    (tmp_path / "b.md").write_text("# Title\n\nMarkdown body.")
    (tmp_path / "c.text").write_text("\ufeffThird, with a byte-order mark.")
    texts, stats = read_all(DataConfig(sources=[str(tmp_path / n) for n in ("a.txt", "b.md", "c.text")]))
    assert texts == ["First file.\nSecond line.", "# Title\n\nMarkdown body.", "Third, with a byte-order mark."]
    assert stats == {"records": 3, "empty_dropped": 0, "filtered_out": 0, "skipped_files": []}


def test_folder_is_read_recursively_with_glob_and_hidden_files_ignored(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("top level")
    (root / "sub" / "b.txt").write_text("nested")
    (root / "sub" / "deeper" / "c.txt").write_text("deeply nested")
    (root / "sub" / "notes.md").write_text("markdown notes")
    (root / ".git" / "HEAD.txt").write_text("not a document")
    (root / ".hidden.txt").write_text("not a document either")

    texts, _ = read_all(DataConfig(sources=[str(root)]))
    assert texts == ["top level", "nested", "deeply nested", "markdown notes"]  # sorted by path

    texts, _ = read_all(DataConfig(sources=[str(root)], glob="*.txt"))
    assert texts == ["top level", "nested", "deeply nested"]

    texts, _ = read_all(DataConfig(sources=[str(root)], glob="sub/*"))
    assert texts == ["nested", "markdown notes"]

    with pytest.raises(DataError, match=r"no files match --glob '\*.rst' in"):
        read_all(DataConfig(sources=[str(root)], glob="*.rst"))


def test_binary_files_in_a_folder_are_skipped_and_reported(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.txt").write_text("good text one")
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "c.txt").write_text("good text two")
    (root / "d.dat").write_bytes(b"abc\xff\xfe")
    with pytest.warns(UserWarning) as caught:
        texts, stats = read_all(DataConfig(sources=[str(root)]))
    assert [str(w.message) for w in caught] == [
        f"skipping {root / 'b.png'}: binary (contains NUL bytes)",
        f"skipping {root / 'd.dat'}: not valid utf-8 at byte 3",
    ]
    assert texts == ["good text one", "good text two"]
    assert stats["records"] == 2
    assert stats["skipped_files"] == [
        (str(root / "b.png"), "binary (contains NUL bytes)"),
        (str(root / "d.dat"), "not valid utf-8 at byte 3"),
    ]


def test_csv_default_column_and_named_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poe.csv").write_text(
        'title,text,body\nRaven,"Once upon, a midnight\ndreary",b1\nBells,Hear the sledges,b2\n0123,42,b3\n'
    )
    texts, stats = read_all(DataConfig(sources=["poe.csv"]))
    # Quoted commas and newlines survive; a number-like text stays the literal string.
    assert texts == ["Once upon, a midnight\ndreary", "Hear the sledges", "42"]
    assert stats["records"] == 3
    texts, _ = read_all(DataConfig(sources=["poe.csv"], column="body"))
    assert texts == ["b1", "b2", "b3"]


def test_csv_without_the_column_lists_the_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poe.csv").write_text("title,body\nRaven,Once upon a midnight\n")
    with pytest.raises(DataError) as err:
        read_all(DataConfig(sources=["poe.csv"]))
    assert str(err.value) == "column 'text' not found in poe.csv; columns are: title, body"
    with pytest.raises(DataError, match="column 'poem' not found in poe.csv; columns are: title, body"):
        read_all(DataConfig(sources=["poe.csv"], column="poem"))


def test_tsv(tmp_path):
    (tmp_path / "lines.tsv").write_text("id\ttext\n1\tfirst, with a comma\n2\tsecond\n")
    texts, _ = read_all(DataConfig(sources=[str(tmp_path / "lines.tsv")]))
    assert texts == ["first, with a comma", "second"]


def test_json_list_and_jsonl_with_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.json").write_text(json.dumps([{"text": "alpha", "n": 1}, {"text": "beta", "n": 2}]))
    texts, _ = read_all(DataConfig(sources=["list.json"]))
    assert texts == ["alpha", "beta"]

    (tmp_path / "lines.jsonl").write_text('{"body": "gamma", "id": 1}\n{"body": "delta", "id": 2}\n')
    texts, _ = read_all(DataConfig(sources=["lines.jsonl"], field="body"))
    assert texts == ["gamma", "delta"]

    # A .json file holding JSON lines is read too.
    (tmp_path / "lines.json").write_text('{"text": "epsilon"}\n{"text": "zeta"}\n')
    assert read_all(DataConfig(sources=["lines.json"]))[0] == ["epsilon", "zeta"]

    with pytest.raises(DataError) as err:
        read_all(DataConfig(sources=["lines.jsonl"]))
    assert str(err.value) == "field 'text' not found in lines.jsonl; fields are: body, id"


def test_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["one", "two", None], "body": ["x", "y", "z"]}).to_parquet(tmp_path / "d.parquet")
    texts, stats = read_all(DataConfig(sources=[str(tmp_path / "d.parquet")]))
    assert texts == ["one", "two"]
    assert stats["empty_dropped"] == 1
    texts, _ = read_all(DataConfig(sources=[str(tmp_path / "d.parquet")], column="body"))
    assert texts == ["x", "y", "z"]


def test_saved_dataset_with_split_slicing(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [f"row {i}" for i in range(10)]
    Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "single"))
    assert read_all(DataConfig(sources=[str(tmp_path / "single")]))[0] == rows
    assert read_all(DataConfig(sources=[str(tmp_path / "single")], split="train[:50%]"))[0] == rows[:5]
    assert read_all(DataConfig(sources=[str(tmp_path / "single")], split="train[-3:]"))[0] == rows[-3:]

    DatasetDict({
        "train": Dataset.from_dict({"content": rows}),
        "test": Dataset.from_dict({"content": ["held out a", "held out b"]}),
    }).save_to_disk(str(tmp_path / "dict"))
    cfg = DataConfig(sources=[str(tmp_path / "dict")], column="content")
    assert read_all(cfg)[0] == rows  # the train split by default
    cfg.split = "train[2:4]"
    assert read_all(cfg)[0] == ["row 2", "row 3"]
    cfg.split = "test"
    assert read_all(cfg)[0] == ["held out a", "held out b"]
    cfg.split = "validation"
    with pytest.raises(DataError, match="split 'validation' not found in .*dict; splits are: train, test"):
        read_all(cfg)
    cfg.split = "train[:x]"
    with pytest.raises(DataError, match=r"bad --split 'train\[:x\]'"):
        read_all(cfg)


def test_hub_name_unavailable_offline_is_a_one_line_error():
    with pytest.raises(StyletuneError) as err:
        read_all(DataConfig(sources=["nobody-here/no-such-dataset-xyz"]))
    message = str(err.value)
    assert message.startswith("dataset 'nobody-here/no-such-dataset-xyz' could not be loaded")
    assert "\n" not in message


def test_filter_keeps_matching_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "works.csv").write_text(
        "author,year,text\nPoe,1845,The Raven\nPoe,,Annabel Lee\nDickinson,1890,Hope is the thing\nPoe,1843,The Tell-Tale Heart\n"
    )
    texts, stats = read_all(DataConfig(sources=["works.csv"], filter=["author=Poe"]))
    assert texts == ["The Raven", "Annabel Lee", "The Tell-Tale Heart"]
    assert stats["filtered_out"] == 1
    # Several filters must all match; a year column with a gap still compares as written.
    texts, stats = read_all(DataConfig(sources=["works.csv"], filter=["author=Poe", "year=1845"]))
    assert texts == ["The Raven"]
    assert stats["filtered_out"] == 3

    with pytest.raises(DataError, match="--filter column 'genre' not found in works.csv; columns are: author, year, text"):
        read_all(DataConfig(sources=["works.csv"], filter=["genre=poem"]))
    with pytest.raises(DataError, match="--filter 'author' is not of the form COLUMN=VALUE"):
        read_all(DataConfig(sources=["works.csv"], filter=["author"]))
    with pytest.raises(DataError, match="no text found in works.csv: 4 records read, 0 empty, 4 removed by --filter"):
        read_all(DataConfig(sources=["works.csv"], filter=["author=Woolf"]))


def test_empty_and_missing_texts_are_dropped_and_counted(tmp_path):
    (tmp_path / "t.csv").write_text('id,text\n1,kept\n2,""\n3,   \n4,NA\n5,\n')
    (tmp_path / "t.jsonl").write_text('{"text": null}\n{"text": "also kept"}\n{"text": " \\n "}\n')
    texts, stats = read_all(DataConfig(sources=[str(tmp_path / "t.csv"), str(tmp_path / "t.jsonl")]))
    assert texts == ["kept", "NA", "also kept"]  # "NA" is text, not a missing value
    assert stats["records"] == 3
    assert stats["empty_dropped"] == 5


def test_texts_stream_one_at_a_time(tmp_path, monkeypatch):
    import styletune.data as data_module

    paths = write_docs(tmp_path / "c", ["one", "two", "three"])
    decoded = []
    real_decode = data_module._decode_file
    monkeypatch.setattr(data_module, "_decode_file", lambda path, enc: decoded.append(path.name) or real_decode(path, enc))
    stats = new_read_stats()
    texts = iter_texts(DataConfig(sources=[str(tmp_path / "c")]), stats=stats)
    assert next(texts) == "one" and decoded == ["doc000.txt"]  # the later files are not read yet
    assert stats["records"] == 1
    assert list(texts) == ["two", "three"] and stats["records"] == 3
    again = new_read_stats()
    assert list(iter_texts(DataConfig(sources=paths), stats=again)) == ["one", "two", "three"] and again == stats

    # A table streams too; an empty result is an error once the end is reached.
    (tmp_path / "t.csv").write_text("text\n" + "".join(f"row {i}\n" for i in range(5)))
    monkeypatch.setattr(data_module, "_READ_BATCH", 2)
    assert list(iter_texts(DataConfig(sources=[str(tmp_path / "t.csv")]))) == [f"row {i}" for i in range(5)]
    (tmp_path / "e.csv").write_text("id,text\n1,\n2,  \n")
    texts = iter_texts(DataConfig(sources=[str(tmp_path / "e.csv")]))
    with pytest.raises(DataError, match="no text found in .*e.csv: 2 records read, 2 empty"):
        next(texts)


# --------------------------------------------------------------------------- reading: bad input


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\n")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError) as err:
        read_all(DataConfig(sources=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]))
    assert str(err.value).endswith("b.txt: 2 records read, 2 empty")
    with pytest.raises(DataError, match="no training data given"):
        read_all(DataConfig(sources=[]))


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        read_all(DataConfig(sources=["missing.txt"]))
    assert str(err.value) == "no such file or directory: missing.txt"
    with pytest.raises(DataError, match="no such file or directory: ./corpus"):
        read_all(DataConfig(sources=["./corpus"]))


def test_non_utf8_text_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poe.txt").write_bytes("Quoth the raven: ".encode() + "café nevermore".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_all(DataConfig(sources=["poe.txt"]))
    assert str(err.value) == "poe.txt is not valid utf-8 at byte 20; pass --encoding latin-1 if that is its encoding"
    texts, _ = read_all(DataConfig(sources=["poe.txt"], encoding="latin-1"))
    assert texts == ["Quoth the raven: café nevermore"]
    with pytest.raises(DataError, match="unknown encoding 'klingon'"):
        read_all(DataConfig(sources=["poe.txt"], encoding="klingon"))


def test_non_utf8_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poe.csv").write_bytes("text\nfirst row\nna\xefve row\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"^poe.csv is not valid utf-8 at byte 17; pass --encoding latin-1"):
        read_all(DataConfig(sources=["poe.csv"]))
    texts, _ = read_all(DataConfig(sources=["poe.csv"], encoding="latin-1"))
    assert texts == ["first row", "naïve row"]


def test_binary_file_given_directly_is_an_error(tmp_path):
    (tmp_path / "image.txt").write_bytes(b"GIF89a\x00\x01")
    with pytest.raises(DataError, match="image.txt looks like a binary file"):
        read_all(DataConfig(sources=[str(tmp_path / "image.txt")]))


def test_filter_on_plain_text_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="--filter needs a table"):
        read_all(DataConfig(sources=[str(tmp_path / "a.txt")], filter=["author=Poe"]))


# --------------------------------------------------------------------------- cleaning


GUTENBERG = """The Project Gutenberg eBook of The Raven
This eBook is for the use of anyone anywhere.

*** START OF THE PROJECT GUTENBERG EBOOK THE RAVEN ***
Once upon a midnight dreary.

Quoth the Raven, "Nevermore."
*** END OF THE PROJECT GUTENBERG EBOOK THE RAVEN ***
Updated editions will replace the previous one.
"""


def test_strip_gutenberg():
    cfg = DataConfig(**{**NO_CLEANING, "strip_gutenberg": True})
    texts, _ = clean_all([GUTENBERG, "no markers here"], cfg)
    assert texts == ['Once upon a midnight dreary.\n\nQuoth the Raven, "Nevermore."\n', "no markers here"]
    # Off by default.
    texts, _ = clean_all([GUTENBERG], DataConfig())
    assert texts[0].startswith("The Project Gutenberg eBook")


def test_normalize_nfc():
    decomposed = "cafe\u0301"
    assert clean_all([decomposed], DataConfig(**{**NO_CLEANING, "normalize": True}))[0] == ["caf\u00e9"]
    assert clean_all([decomposed], DataConfig(**NO_CLEANING))[0] == [decomposed]


def test_strip_control_keeps_newlines_and_tabs():
    cfg = DataConfig(**{**NO_CLEANING, "strip_control": True})
    texts, _ = clean_all(["a\x07b\u200bc\x00d\r\ne\tf\rg\u00adh"], cfg)
    assert texts == ["abcd\ne\tf\ngh"]


def test_collapse_whitespace():
    cfg = DataConfig(**{**NO_CLEANING, "collapse_whitespace": True})
    texts, _ = clean_all(["  one   two\t\tthree  \n   four\n\n\n\n\nfive  \n\n"], cfg)
    assert texts == ["one two three\nfour\n\nfive"]


def test_ascii_only():
    cfg = DataConfig(**{**NO_CLEANING, "ascii_only": True})
    assert clean_all(["naïve café — ok"], cfg)[0] == ["nave caf  ok"]
    cfg.collapse_whitespace = True
    assert clean_all(["naïve café — ok"], cfg)[0] == ["nave caf ok"]


def test_dedupe_and_emptied_counts():
    texts = ["alpha", "beta", "alpha", " \x07 ", "alpha  ", "gamma", "beta"]
    cleaned, stats = clean_all(texts, DataConfig())
    # "alpha  " becomes "alpha" after whitespace collapsing, so it is a duplicate too.
    assert cleaned == ["alpha", "beta", "gamma"]
    assert stats == {"duplicates": 3, "emptied": 1}
    cleaned, stats = clean_all(texts, DataConfig(dedupe=False))
    assert cleaned == ["alpha", "beta", "alpha", "alpha", "gamma", "beta"]
    assert stats == {"duplicates": 0, "emptied": 1}


def test_cleaning_streams_and_the_list_wrapper_agrees():
    seen = []

    def source():
        for text in ["alpha", "alpha", "beta"]:
            seen.append(text)
            yield text

    stats = new_clean_stats()
    cleaned = iter_clean(source(), DataConfig(), stats)
    assert next(cleaned) == "alpha" and seen == ["alpha"]
    assert list(cleaned) == ["beta"] and stats == {"duplicates": 1, "emptied": 0}
    stats = new_clean_stats()
    assert list(iter_clean(["alpha", "alpha", " ", "beta"], DataConfig(), stats)) == ["alpha", "beta"]
    assert stats == {"duplicates": 1, "emptied": 1}


# --------------------------------------------------------------------------- splitting


def test_split_counts_and_determinism():
    docs = [f"doc {i}" for i in range(69)]
    train, val = split_documents(docs, 0.1, 1, seed=0)
    assert len(val) == 7 and len(train) == 62
    assert sorted(train + val) == sorted(docs)
    assert [d for d in docs if d in val] == val and [d for d in docs if d in train] == train  # corpus order kept
    assert split_documents(docs, 0.1, 1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, 1, seed=1)[1] != val

    assert [len(p) for p in split_documents(docs[:3], 0.1, 1, seed=0)] == [2, 1]
    assert [len(p) for p in split_documents(docs[:20], 0.1, 5, seed=0)] == [15, 5]
    assert [len(p) for p in split_documents(docs[:2], 0.1, 5, seed=0)] == [1, 1]  # always a train doc
    assert split_documents(docs[:5], 0.0, 3, seed=0) == (docs[:5], [])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(DataError, match="--val-fraction must be at least 0 and below 1"):
            split_documents(docs, bad, 1, seed=0)


def test_split_indices_are_the_split_of_split_documents():
    for n, fraction, min_val, seed in ((2, 0.1, 1, 0), (3, 0.5, 1, 4), (20, 0.1, 5, 1), (69, 0.1, 1, 0), (7, 0.0, 2, 0)):
        docs = [f"doc {i}" for i in range(n)]
        train_idx, val_idx = split_indices(n, fraction, min_val, seed)
        assert ([docs[i] for i in train_idx], [docs[i] for i in val_idx]) == split_documents(docs, fraction, min_val, seed)
        assert train_idx == sorted(train_idx) and val_idx == sorted(val_idx)
    assert split_indices(1, 0.1, 1, 0) == ([0], []) and split_indices(0, 0.1, 1, 0) == ([], [])
    with pytest.raises(DataError, match="--min-val-docs must be >= 0"):
        split_indices(5, 0.1, -1, 0)


def test_single_document_is_split_at_a_paragraph_near_the_end():
    paragraphs = [f"Paragraph {i}. " + SENTENCES[i % 4] for i in range(10)]
    train, val = split_documents(["\n\n".join(paragraphs)], 0.1, 1, seed=0)
    assert train == ["\n\n".join(paragraphs[:9])]
    assert val == [paragraphs[9]]
    # Without any paragraph or line break, a sentence boundary is used.
    train, val = split_documents([" ".join(SENTENCES)], 0.25, 1, seed=0)
    assert train == [" ".join(SENTENCES[:3])] and val == [SENTENCES[3]]
    # Nothing to cut at: no validation part.
    assert split_documents(["Unsplittable"], 0.1, 1, seed=0) == (["Unsplittable"], [])


# --------------------------------------------------------------------------- tokenising and packing


def test_packing_is_the_eos_joined_token_stream(tmp_path, tokenizer, monkeypatch):
    import styletune.data as data_module

    # Tiny batches, so that blocks spanning a batch boundary are exercised.
    monkeypatch.setattr(data_module, "_READ_BATCH", 2)
    docs = make_docs(12, repeat=2)
    cfg = DataConfig(sources=write_docs(tmp_path / "c", docs), block_size=16, val_fraction=0.25)
    data = prepare_data(cfg, tokenizer, seed=3)
    assert isinstance(data, PreparedData)
    train_docs, val_docs = split_documents(docs, 0.25, 1, seed=3)
    assert len(val_docs) == 3

    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ds = getattr(data, split)
        stream = tokens_of(tokenizer, split_docs)
        blocks = ds[:]["input_ids"]
        assert blocks.shape == (len(stream) // 16, 16)  # every row exactly block_size; remainder dropped
        assert blocks.flatten().tolist() == stream[: blocks.numel()]
        assert str(blocks.dtype) == "torch.int64"

    flat = data.train[:]["input_ids"].flatten().tolist()
    eos = tokenizer.eos_token_id
    # An EOS closes each document that lies within the blocks, and there is nothing else
    # (no padding): the first document's ids are followed straight by EOS, then the second's.
    first = tokenizer(train_docs[0], add_special_tokens=False)["input_ids"]
    second = tokenizer(train_docs[1], add_special_tokens=False)["input_ids"]
    assert flat[: len(first) + 1 + len(second) + 1] == first + [eos] + second + [eos]
    assert eos not in first and tokenizer.pad_token_id is None

    s = data.summary
    assert s["block_size"] == data.block_size == 16
    assert s["train_docs"] == 9 and s["val_docs"] == 3 and s["records"] == 12
    assert s["train_tokens"] == len(tokens_of(tokenizer, train_docs))
    assert s["val_tokens"] == len(tokens_of(tokenizer, val_docs))
    assert s["tokens"] == s["train_tokens"] + s["val_tokens"]
    assert s["train_blocks"] == len(data.train) and s["val_blocks"] == len(data.val)
    assert s["characters"] == sum(map(len, docs))
    assert s["shortest_chars"] == min(map(len, docs)) and s["longest_chars"] == max(map(len, docs))
    assert s["cached"] is False


def test_prepare_data_streams_through_an_arrow_file(tmp_path, tokenizer, monkeypatch):
    import datasets

    import styletune.data as data_module

    def in_memory(*args, **kwargs):
        raise AssertionError("the pipeline built a list or an in-memory dataset of every text")

    for name in ("split_documents",):
        monkeypatch.setattr(data_module, name, in_memory)
    monkeypatch.setattr(datasets.Dataset, "from_dict", in_memory)
    monkeypatch.setattr(data_module, "_READ_BATCH", 3)
    monkeypatch.setattr(data_module, "_WRITE_BATCH_CHARS", 100)
    docs = make_docs(20)
    folder = tmp_path / "c"
    write_docs(folder, docs + docs[:2] + ["  \x07 "])  # two duplicates and one emptied by cleaning
    cfg = DataConfig(sources=[str(folder)], block_size=16, val_fraction=0.2, min_val_docs=1)
    data = prepare_data(cfg, tokenizer, seed=5, cache_dir=tmp_path / "cache")
    train_docs, val_docs = split_documents(docs, 0.2, 1, 5)  # the function itself, imported before the patch
    assert data.train[:]["input_ids"].flatten().tolist() == tokens_of(tokenizer, train_docs)[: 16 * len(data.train)]
    assert data.val[:]["input_ids"].flatten().tolist() == tokens_of(tokenizer, val_docs)[: 16 * len(data.val)]
    s = data.summary
    assert (s["records"], s["train_docs"], s["val_docs"], s["duplicates"], s["empty_dropped"]) == (20, 16, 4, 2, 1)
    assert s["characters"] == sum(map(len, docs))
    assert (s["shortest_chars"], s["longest_chars"]) == (min(map(len, docs)), max(map(len, docs)))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [data.cache_key]  # no temporary files left


def test_small_corpus_shrinks_the_block_and_keeps_a_short_validation_block(tmp_path, tokenizer):
    docs = make_docs(3)
    cfg = DataConfig(sources=write_docs(tmp_path / "c", docs), block_size=256)
    data = prepare_data(cfg, tokenizer)
    train_docs, val_docs = split_documents(docs, 0.1, 1, seed=0)
    n_train = len(tokens_of(tokenizer, train_docs))
    n_val = len(tokens_of(tokenizer, val_docs))
    expected = 1 << (n_train.bit_length() - 1)
    assert 8 <= expected <= n_train < 256
    assert data.block_size == expected
    assert len(data.train) == n_train // expected and data.train[:]["input_ids"].shape[1] == expected
    assert any(f"only {n_train} tokens" in note and f"blocks of {expected}" in note for note in data.summary["notes"])
    # The validation text is shorter than a block: it is one shorter block, all of it.
    assert n_val < expected
    assert data.val[:]["input_ids"].tolist() == [tokens_of(tokenizer, val_docs)]


def test_tiny_corpus_is_an_error_with_the_token_count(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("Hi")
    n = len(tokens_of(tokenizer, ["Hi"]))
    assert n < 8
    with pytest.raises(DataError, match=f"the training text has only {n} tokens; at least 8 are needed"):
        prepare_data(DataConfig(sources=[str(tmp_path / "a.txt")], val_fraction=0), tokenizer)


def test_block_size_larger_than_the_model_context(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(" ".join(SENTENCES))
    cfg = DataConfig(sources=[str(tmp_path / "a.txt")], block_size=512)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tokenizer, max_block_size=128)
    assert str(err.value) == "--block-size 512 is larger than the model's context (128 tokens)"


def test_single_document_corpus_gets_a_validation_part(tmp_path, tokenizer):
    paragraphs = [f"Paragraph {i}. " + SENTENCES[i % 4] for i in range(10)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs))
    data = prepare_data(DataConfig(sources=[str(tmp_path / "book.txt")], block_size=64), tokenizer)
    assert data.val is not None
    assert data.val[:]["input_ids"].flatten().tolist() == tokens_of(tokenizer, [paragraphs[9]])
    assert data.summary["train_docs"] == 1 and data.summary["val_docs"] == 1
    assert any("only one document" in note for note in data.summary["notes"])


def test_explicit_validation_file(tmp_path, tokenizer):
    train_docs, val_docs = make_docs(6), ["A separate validation text. " + SENTENCES[0]]
    cfg = DataConfig(sources=write_docs(tmp_path / "train", train_docs), val=write_docs(tmp_path / "val", val_docs)[0],
                     block_size=16)
    data = prepare_data(cfg, tokenizer)
    assert data.summary["train_docs"] == 6 and data.summary["val_docs"] == 1
    assert data.val[:]["input_ids"].flatten().tolist() == tokens_of(tokenizer, val_docs)[: 16 * len(data.val)]
    assert data.train[:]["input_ids"].flatten().tolist() == tokens_of(tokenizer, train_docs)[: 16 * len(data.train)]


def test_no_validation_when_fraction_is_zero(tmp_path, tokenizer):
    cfg = DataConfig(sources=write_docs(tmp_path / "c", make_docs(5)), block_size=16, val_fraction=0)
    data = prepare_data(cfg, tokenizer)
    assert data.val is None
    assert data.summary["val_blocks"] == 0 and data.summary["val_tokens"] == 0


# --------------------------------------------------------------------------- caching


def test_second_call_loads_from_the_cache(tmp_path, tokenizer, monkeypatch):
    import styletune.data as data_module

    cfg = DataConfig(sources=write_docs(tmp_path / "c", make_docs(8)), block_size=16)
    first = prepare_data(cfg, tokenizer)
    entry = cache_root() / "data" / first.cache_key
    assert (entry / "meta.json").is_file() and (entry / "train.arrow").is_file()
    assert not list(entry.parent.glob(".tmp-*"))  # the temporary directory is gone
    mapped = [f["filename"] for f in first.train.cache_files]
    assert mapped == [str(entry / "train.arrow")]  # memory-mapped from the cache, not held in RAM

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(data_module, "_tokenize", no_tokenizing, raising=True)
    second = prepare_data(cfg, tokenizer)
    assert second.summary["cached"] is True and first.summary["cached"] is False
    assert second.cache_key == first.cache_key
    assert second.train[:]["input_ids"].tolist() == first.train[:]["input_ids"].tolist()
    assert second.val[:]["input_ids"].tolist() == first.val[:]["input_ids"].tolist()
    assert {k: v for k, v in second.summary.items() if k != "cached"} == \
        {k: v for k, v in first.summary.items() if k != "cached"}

    # Anything that changes the blocks changes the key (and so re-tokenises).
    cfg.block_size = 32
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_data(cfg, tokenizer)
    cfg.block_size = 16
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_data(cfg, tokenizer, seed=1)
    (tmp_path / "c" / "doc003.txt").write_text(make_docs(4)[3] + " One more word.")  # a text changes
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_data(cfg, tokenizer)


def test_explicit_cache_dir_and_cache_root(tmp_path, tokenizer, monkeypatch):
    cfg = DataConfig(sources=write_docs(tmp_path / "c", make_docs(4)), block_size=16)
    data = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "mycache")
    assert (tmp_path / "mycache" / data.cache_key / "meta.json").is_file()
    assert not (cache_root() / "data" / data.cache_key).exists()

    monkeypatch.setenv("STYLETUNE_CACHE", str(tmp_path / "st"))
    assert cache_root() == tmp_path / "st"
    monkeypatch.delenv("STYLETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "styletune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "styletune"


# --------------------------------------------------------------------------- summary


def test_format_summary():
    summary = {
        "records": 69, "characters": 2345678, "tokens": 512000, "train_tokens": 460800, "val_tokens": 51200,
        "train_docs": 62, "val_docs": 7, "duplicates": 3, "empty_dropped": 2, "filtered_out": 0,
        "shortest_chars": 120, "longest_chars": 98000, "block_size": 256, "train_blocks": 1800, "val_blocks": 200,
        "skipped_files": [("c/img.png", "binary (contains NUL bytes)")],
        "notes": ["something to know"], "cached": False,
    }
    assert format_summary(summary).splitlines() == [
        "69 records, 2,345,678 characters, 512,000 tokens (460,800 train / 51,200 val)",
        "3 duplicates and 2 empty records dropped",
        "shortest 120 chars, longest 98,000 chars",
        "1,800 train blocks of 256 tokens, 200 validation blocks",
        "skipped 1 file: c/img.png (binary (contains NUL bytes))",
        "note: something to know",
    ]


def test_format_summary_of_real_data(tmp_path, tokenizer):
    docs = make_docs(5) + [make_docs(1)[0], "   "]
    cfg = DataConfig(sources=write_docs(tmp_path / "c", docs), block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here deserves a warning
        data = prepare_data(cfg, tokenizer)
    text = format_summary(data.summary)
    assert text.startswith(f"5 records, {sum(map(len, docs[:5])):,} characters, {data.summary['tokens']:,} tokens")
    assert "1 duplicate and 1 empty record dropped" in text
    assert f"{data.summary['train_blocks']} train blocks of 16 tokens" in text
