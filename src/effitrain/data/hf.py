"""data=datasets: local parquet/arrow/json(l)/csv files read through Hugging Face `datasets`, streaming, one
document per row (its `data.field` column), named `<file>:<row>` (rows from 1, as JSONL lines are numbered).

Local files only: the hub is switched off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) before `datasets` is imported, and
each file is opened with `load_dataset(<builder>, data_files=[file], streaming=True)`, so rows come in batches and
nothing is converted or cached by `datasets` (its lock files go to a temporary directory, removed after the file).
A file that cannot be read, or lacks the column, is one line naming it (DataError).
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

from effitrain.data import DATASETS_BUILDERS, DataError, UsageError

_BATCH_ROWS = 1000  # rows per batch read: Arrow's columnar batches, a few MB of text for typical documents


def _datasets():
    # Set before the import (datasets reads them then) and on the modules (in case something imported them
    # earlier): effitrain never downloads, and a data path is never a hub dataset name.
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
        import huggingface_hub.constants
    except ImportError:
        raise UsageError("data=datasets needs the datasets package: pip install effitrain[data]") from None
    datasets.config.HF_DATASETS_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # it logs a failed read before raising it: one line only
    datasets.disable_progress_bars()
    return datasets


def read_rows(path: Path, *, name: str, field: str) -> Iterator[tuple[str, str]]:
    """(document name, text) of each row of the local file `path` (named `name` in the corpus), streamed in batches."""
    for row, values in read_columns(path, columns={field: "data.field"}):
        if values[field] is None:
            raise DataError(f"{path}: row {row}: {field!r} is null")
        yield f"{name}:{row}", str(values[field])


def read_columns(path: Path, *, columns: dict[str, str]) -> Iterator[tuple[int, dict]]:
    """(row number from 1, {column: value}) of each row of the local file `path`, streamed in batches; `columns` maps
    each column read to the key that names it (for the error when the file lacks it)."""
    builder = DATASETS_BUILDERS[path.suffix]
    datasets = _datasets()
    row = 0
    try:
        with tempfile.TemporaryDirectory(prefix="effitrain-datasets-") as scratch:
            # data_files are glob patterns: escaped, a name with [ ] * ? is that one file, not a pattern
            rows = datasets.load_dataset(builder, data_files=[glob.escape(str(path))], split="train",
                                         streaming=True, cache_dir=scratch)
            for batch in rows.iter(batch_size=_BATCH_ROWS):
                for column, key in columns.items():
                    if column not in batch:
                        raise DataError(f"{path}: no column {column!r} (its columns: {', '.join(batch)}; set "
                                        f"{key} to the column holding it)")
                for values in zip(*(batch[column] for column in columns), strict=True):
                    row += 1
                    yield row, dict(zip(columns, values, strict=True))
    except DataError:
        raise
    except Exception as e:  # Arrow, pandas, fsspec and datasets each raise their own kinds: one line naming the file
        where = f" after row {row}" if row else ""
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read as {builder}{where} ({message})") from None
