"""data.clean: each filter removes what it should and keeps the rest, the report counts removals by reason with
examples, and cleaning is part of the cache key."""

from __future__ import annotations

import json

import pytest

from conftest import compose
from effitrain.data import CleanConfig
from effitrain.data.clean import Cleaner
from effitrain.data.corpus import Document
from effitrain.data.prepare import prepare_data

CODE = "def area(r):\n    # the area of a circle of radius r\n    return 3.14159 * r * r\n"


@pytest.mark.parametrize("text, reason", [
    ("x = 1\n", "too_short"),
    ("\ufffd\x00\x01" * 40 + CODE, "non_text"),
    (CODE + "data = [" + "1, " * 600 + "]\n", "long_line"),
    (CODE + "print('again and again')\n" * 30, "repeated_lines"),
])
def test_each_quality_filter(text, reason):
    cleaner = Cleaner(CleanConfig(enabled=True))
    assert cleaner.reason(Document("good", CODE)) is None
    assert cleaner.reason(Document("bad", text)) == reason
    assert cleaner.report()["removed"] == {reason: 1} and cleaner.report()["examples"][reason][0]["name"] == "bad"


def test_exact_duplicates_ignore_case_and_whitespace():
    cleaner = Cleaner(CleanConfig(enabled=True))
    assert cleaner.reason(Document("a", CODE)) is None
    assert cleaner.reason(Document("b", CODE.upper().replace("    ", "\t"))) == "exact_duplicate"
    assert cleaner.reason(Document("c", CODE + "# one more line\n")) is None
    keep_all = Cleaner(CleanConfig(enabled=True, exact_duplicates=False))
    assert keep_all.reason(Document("a", CODE)) is None and keep_all.reason(Document("b", CODE)) is None


def test_thresholds_are_the_configs():
    loose = Cleaner(CleanConfig(enabled=True, min_chars=0, max_line_chars=10_000, max_repeated_lines=1.0))
    assert loose.reason(Document("s", "x = 1\n")) is None
    assert loose.reason(Document("r", CODE + "print('again and again')\n" * 30)) is None


def test_cleaning_streams_into_the_report_and_the_cache_key(corpus, tmp_path):
    import shutil

    work = shutil.copytree(corpus, tmp_path / "corpus")
    first = sorted(work.iterdir())[0]
    (work / "copy_of_first.txt").write_text(first.read_text().upper())
    (work / "tiny.txt").write_text("x = 1\n")
    base = ["data=text", f"data.paths=[{work}]", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300"]
    plain = prepare_data(compose(base).data)
    cleaned = prepare_data(compose([*base, "data.clean.enabled=true"]).data)
    assert cleaned.tokens.directory != plain.tokens.directory and cleaned.fingerprint == plain.fingerprint
    report = json.loads((cleaned.tokens.directory / "data_report.json").read_text())
    assert report["removed"]["too_short"] == 1 and report["removed"]["exact_duplicate"] == 1
    assert report["documents"] == plain.num_documents == report["kept"] + sum(report["removed"].values())
    names = {e["name"] for reason in ("exact_duplicate", "too_short") for e in report["examples"][reason]}
    assert {"tiny.txt"} <= names and names & {first.name, "copy_of_first.txt"}
    assert len(cleaned.tokens.train) + len(cleaned.tokens.val) < len(plain.tokens.train) + len(plain.tokens.val)
    assert json.loads((plain.tokens.directory / "data_report.json").read_text())["enabled"] is False
