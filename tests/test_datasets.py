"""data=datasets: local parquet/arrow/json/csv files through Hugging Face `datasets` give the documents and tokens
the equivalent JSONL gives; a missing column, a null text or an unreadable file is one line naming the file, nothing
cached (the CLI's one line and exit 2 for a DataError: tests/test_data_stream.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import compose
from effitrain.data import DataError, DatasetsData, JsonlData
from effitrain.data.corpus import load_documents
from effitrain.data.prepare import prepare_data
from effitrain.errors import UsageError


@pytest.fixture(scope="module")
def files(corpus, tmp_path_factory):
    """The first 20 documents of the corpus as docs.jsonl and as parquet, arrow and csv tables (a `title` column
    too), in one directory."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f.read_text() for f in sorted(corpus.iterdir())[:20]]
    table = pa.table({"title": [f"doc {i}" for i in range(len(texts))], "text": texts})
    root = tmp_path_factory.mktemp("tables")
    (root / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    pq.write_table(table, root / "docs.parquet", row_group_size=7)  # several row groups, read batch by batch
    with pa.OSFile(str(root / "docs.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    pd.DataFrame(table.to_pydict()).to_csv(root / "docs.csv", index=False)
    return root


def _data(source, path, cache, *extra):
    return compose([f"data={source}", f"data.paths=[{path}]", f"data.cache_dir={cache}", "data.vocab_size=300",
                    *extra]).data


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".arrow", ".csv"])
def test_each_format_reads_the_jsonl_documents(files, suffix):
    expect = load_documents(JsonlData(paths=[str(files / "docs.jsonl")]))
    docs = load_documents(DatasetsData(paths=[str(files / f"docs{suffix}")]))
    assert [d.text for d in docs] == [d.text for d in expect]
    assert [d.name for d in docs] == [f"docs{suffix}:{i}" for i in range(1, 21)]  # rows numbered as JSONL lines
    titles = load_documents(DatasetsData(paths=[str(files / f"docs{suffix}")], field="title"))
    assert titles[3].text == "doc 3"


def test_a_directory_gives_every_table_in_it(files):
    docs = load_documents(DatasetsData(paths=[str(files)]))
    assert len(docs) == 80 and [docs[i].name for i in (0, 20, 40, 60)] == [
        "docs.arrow:1", "docs.csv:1", "docs.jsonl:1", "docs.parquet:1"]


def test_a_file_name_with_glob_characters_is_that_file(files, tmp_path):
    """`datasets` takes data_files as glob patterns: `part[1]*.csv` unescaped would be part1-other.csv."""
    (tmp_path / "part[1]*.csv").write_text((files / "docs.csv").read_text())
    (tmp_path / "part1-other.csv").write_text("text\nsomething else\n")
    docs = load_documents(DatasetsData(paths=[str(tmp_path / "part[1]*.csv")]))
    assert len(docs) == 20 and docs[0].name == "part[1]*.csv:1"


def _documents(tokens, eos) -> list[tuple]:
    """The token cache's documents (train and validation), each as its ids up to EOS, sorted."""
    ids = np.concatenate([np.asarray(tokens.train), np.asarray(tokens.val)]).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eos:
            docs.append(tuple(ids[start:i]))
            start = i + 1
    return sorted(docs)


def test_parquet_json_and_csv_give_the_jsonl_tokens(files, tmp_path):
    jsonl = prepare_data(_data("jsonl", files / "docs.jsonl", tmp_path / "a"))
    same = prepare_data(_data("datasets", files / "docs.jsonl", tmp_path / "b"))  # JSON lines, read by `datasets`
    assert same.fingerprint == jsonl.fingerprint and same.tokens.directory.name == jsonl.tokens.directory.name
    assert np.array_equal(same.tokens.train, jsonl.tokens.train) and np.array_equal(same.tokens.val, jsonl.tokens.val)
    # other file names are other document names, so another split: the same tokenizer gives the same documents
    tokenizer = jsonl.tokens.directory / "tokenizer.json"
    expect = _documents(jsonl.tokens, jsonl.tokens.meta["eos_id"])
    for suffix in (".parquet", ".csv"):
        table = prepare_data(_data("datasets", files / f"docs{suffix}", tmp_path / "c", f"data.tokenizer={tokenizer}"))
        assert table.num_documents == 20 and _documents(table.tokens, table.tokens.meta["eos_id"]) == expect, suffix


def test_a_missing_column_names_the_file_and_its_columns_and_caches_nothing(files, tmp_path):
    with pytest.raises(DataError, match=r"docs\.parquet: no column 'body' \(its columns: title, text; set data\.field"):
        prepare_data(_data("datasets", files / "docs.parquet", tmp_path, "data.field=body"))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_null_text_names_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"text": ["a real document " * 10, None, "another one " * 10]}), path)
    with pytest.raises(DataError, match=r"holes\.parquet: row 2: 'text' is null"):
        load_documents(DatasetsData(paths=[str(path)]))


def test_an_unreadable_table_is_one_line_naming_it_and_caches_nothing(files, tmp_path, capfd):
    """`datasets` logs a failed read on stderr before raising it: silenced, so the user sees the one line only."""
    bad = tmp_path / "data" / "broken.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 not really a parquet file")
    (tmp_path / "data" / "good.csv").write_text((files / "docs.csv").read_text())
    capfd.readouterr()
    with pytest.raises(DataError, match=rf"^{bad}: cannot read as parquet \(.*not a parquet file"):
        prepare_data(_data("datasets", bad.parent, tmp_path / "cache"))
    assert capfd.readouterr().err == ""
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_paths_must_hold_tables_and_the_extra_must_be_installed(tmp_path, monkeypatch):
    import importlib.util

    from effitrain.data import check

    (tmp_path / "notes.txt").write_text("not a table")
    with pytest.raises(DataError, match=r"holds no \.arrow/\.csv/\.json/\.jsonl/\.parquet files"):
        check(DatasetsData(paths=[str(tmp_path)]))
    with pytest.raises(DataError, match=r"notes\.txt: data=datasets reads \.arrow/.* files \(the suffix names the"):
        check(DatasetsData(paths=[str(tmp_path / "notes.txt")]))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else
                        find_spec(name, *a))
    with pytest.raises(UsageError, match=r"^data=datasets needs the datasets package: pip install effitrain\[data\]$"):
        check(DatasetsData(paths=[str(tmp_path / "notes.txt")]))
