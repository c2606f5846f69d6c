"""The records of the fine-tuning options (data=chat, data=instruct, data=chat-stdlib): their builders, registered
in the data group (registered through data/builders.py; no torch). data/sft.py renders and packs them.

A record is a conversation ([{role, content}, ...]) or a (prompt, completion) pair, named for errors (`file:line`)
and carrying the key the validation split hashes: a JSON line's own name, or, for data=chat-stdlib, its file, so no
held-out answer comes from a file the model trained on.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from effitrain.data import GROUP, DataError
from effitrain.data.corpus import _named_files, json_line, stdlib_corpus


@dataclass(frozen=True)
class Record:
    name: str  # where it came from, for errors: file:line, or stdlib file:line:function
    split: str  # what the validation split hashes
    value: object  # chat: [{role, content}, ...]; instruct: (prompt, completion)


@dataclass(frozen=True)
class Records:
    """A fine-tuning option's input: its files (their bytes key the cache) and a reader of its records."""

    files: list[Path]
    read: Callable[[], Iterator[Record]]
    reader: str  # how files become records (option and its keys)


@GROUP.builder("chat")
def chat_records(cfg) -> Records:
    files = _named_files(cfg.source, list(cfg.paths))
    return Records([f.path for f in files], lambda: _file_records(files, _messages(cfg.field),
                                                                  columns={cfg.field: "data.field"}),
                   reader=f"chat:{cfg.field}")


@GROUP.builder("instruct")
def instruct_records(cfg) -> Records:
    files = _named_files(cfg.source, list(cfg.paths))
    return Records([f.path for f in files],
                   lambda: _file_records(files, _pair(cfg.prompt_field, cfg.completion_field),
                                         columns={cfg.prompt_field: "data.prompt_field",
                                                  cfg.completion_field: "data.completion_field"}),
                   reader=f"instruct:{cfg.prompt_field}:{cfg.completion_field}")


@GROUP.builder("chat-stdlib")
def stdlib_records(cfg) -> Records:
    files = [f for f in stdlib_corpus(cfg).files if f.name.endswith(".py")]
    return Records([f.path for f in files], lambda: (r for f in files for r in _functions(f.name, f.path)),
                   reader="chat-stdlib")


def _file_records(files, parse, *, columns: dict[str, str]) -> Iterator[Record]:
    """The records of JSON-lines files (read here) and of parquet/arrow/csv files (through `datasets`, data/hf.py:
    only the `columns` the option reads), in file order."""
    for file in files:
        if file.path.suffix in (".jsonl", ".json"):
            yield from _jsonl_records([file], parse)
            continue
        from effitrain.data.hf import read_columns

        for row, values in read_columns(file.path, columns=columns):
            name = f"{file.name}:{row}"
            yield Record(name, name, parse(values, f"{file.path}: row {row}"))


def _jsonl_records(files, parse) -> Iterator[Record]:
    for file in files:
        try:
            lines = file.path.read_bytes().splitlines()
        except OSError as e:
            raise DataError(f"{file.path}: cannot read ({e.strerror or e})") from None
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            where = f"{file.path}:{lineno}"
            record = json_line(raw, where=where)
            if not isinstance(record, dict):
                raise DataError(f"{where}: not a JSON object")
            name = f"{file.name}:{lineno}"
            yield Record(name, name, parse(record, where))


def _messages(field: str):
    def parse(record: dict, where: str) -> list:
        turns = record.get(field)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: no list of turns under {field!r} (set data.field to the key holding "
                            "[{role, content}, ...])")
        for turn in turns:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                    and isinstance(turn.get("content"), str)):
                raise DataError(f"{where}: a turn of {field!r} is not {{role: str, content: str}}: {turn!r:.80}")
        if not any(turn["role"] == "assistant" for turn in turns):
            raise DataError(f"{where}: the conversation has no assistant turn: nothing to learn to say")
        return [{"role": t["role"], "content": t["content"]} for t in turns]
    return parse


def _pair(prompt: str, completion: str):
    def parse(record: dict, where: str) -> tuple:
        for key, what in ((prompt, "prompt_field"), (completion, "completion_field")):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: no text under {key!r} (set data.{what} to the key holding it)")
        return record[prompt], record[completion]
    return parse


_STDLIB_MAX_CODE = 500  # characters of a function's code (docstring removed): short samples fit small seq_lens
_STDLIB_ANSWER = (20, 240)  # characters of a docstring's first paragraph kept as an answer


def _functions(name: str, path: Path) -> Iterator[Record]:
    """A record per documented function of one stdlib file: user, its code without the docstring; assistant, the
    docstring's first paragraph on one line. Functions too long, or whose summary is too short or long, are
    skipped; a file that does not parse (a few are test data) gives none."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:  # documented, with code beside the docstring
            continue
        answer = " ".join(doc.split("\n\n")[0].split())
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        kept = [line for i, line in enumerate(lines[first - 1:node.end_lineno], first)
                if not node.body[0].lineno <= i <= node.body[0].end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip()
        if not _STDLIB_ANSWER[0] <= len(answer) <= _STDLIB_ANSWER[1] or len(code) > _STDLIB_MAX_CODE:
            continue
        question = f"Summarize what this function does in one sentence.\n\n{code}"
        yield Record(f"{name}:{node.lineno}:{node.name}", name,
                     [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
