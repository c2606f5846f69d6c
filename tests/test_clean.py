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
from effitrain.errors import UsageError

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


def _prose(seed: int, words: int = 300) -> str:
    """Deterministic text of made-up words, ten to a line (a different seed: a different document)."""
    import random

    rng = random.Random(seed)
    made_up = [f"{rng.choice('bcdfglmnprst')}{rng.choice('aeiou')}{rng.choice('klmnrst')}{rng.randrange(99)}"
               for _ in range(words)]
    return "".join(" ".join(made_up[i:i + 10]) + "\n" for i in range(0, words, 10))


def _edited(text: str, every: int) -> str:
    """`text` with every `every`-th word replaced, its lines kept."""
    import re

    parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them at odd ones
    return "".join("CHANGED" if i % 2 == 0 and (i // 2 + 1) % every == 0 else p for i, p in enumerate(parts))


def test_near_duplicates_are_removed_by_their_jaccard_and_distinct_documents_stay():
    original = _prose(1)
    cleaner = Cleaner(CleanConfig(enabled=True, near_dup_threshold=0.8))
    assert cleaner.reason(Document("original", original)) is None
    assert cleaner.reason(Document("other", _prose(2))) is None  # a distinct document stays
    assert cleaner.reason(Document("few_words_changed", _edited(original, 50))) == "near_duplicate"  # 6 of 300
    assert cleaner.reason(Document("rewritten", _edited(original, 4))) is None  # every fourth word: no shingle left
    report = cleaner.report()
    assert report["removed"] == {"near_duplicate": 1} and report["kept"] == 3
    example, = report["examples"]["near_duplicate"]
    assert example["name"] == "few_words_changed" and example["similar_to"] == "original"
    assert 0.8 <= example["jaccard"] < 1
    strict = Cleaner(CleanConfig(enabled=True, near_dup_threshold=0.95))  # the threshold is the config's
    assert strict.reason(Document("original", original)) is None
    assert strict.reason(Document("few_words_changed", _edited(original, 50))) is None  # Jaccard 0.87
    again = Cleaner(CleanConfig(enabled=True, near_dup_threshold=0.8))  # deterministic: fixed permutations
    assert [again.reason(Document(n, t)) for n, t in [("original", original), ("few", _edited(original, 50))]] == [
        None, "near_duplicate"]


def test_near_duplicates_stream_into_the_report_and_their_settings_into_the_cache_key(corpus, tmp_path):
    import shutil

    from effitrain.data.tokens import settings_of

    work = shutil.copytree(corpus, tmp_path / "corpus")
    first = sorted(work.iterdir())[0]
    (work / "zz_edited_copy.txt").write_text(_edited(first.read_text(), 50))
    base = ["data=text", f"data.paths=[{work}]", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300",
            "data.clean.enabled=true"]
    exact = prepare_data(compose(base).data)
    near = prepare_data(compose([*base, "data.clean.near_dup_threshold=0.8"]).data)
    report = json.loads((near.tokens.directory / "data_report.json").read_text())
    assert near.tokens.directory != exact.tokens.directory and near.fingerprint == exact.fingerprint
    assert report["removed"].get("near_duplicate") == 1, report["removed"]
    assert report["examples"]["near_duplicate"][0] | {"text": ""} == {
        "name": "zz_edited_copy.txt", "similar_to": first.name, "text": "",
        "jaccard": report["examples"]["near_duplicate"][0]["jaccard"]}
    assert near.num_documents == exact.num_documents == report["kept"] + sum(report["removed"].values())
    settings = [settings_of(compose([*base, *extra]).data)["clean"] for extra in
                ([], ["data.clean.near_dup_threshold=0.8"], ["data.clean.near_dup_threshold=0.9"],
                 ["data.clean.near_dup_threshold=0.8", "data.clean.near_dup_num_perm=64"],
                 ["data.clean.near_dup_threshold=0.8", "data.clean.near_dup_shingle_words=3"])]
    assert len({json.dumps(s, sort_keys=True) for s in settings}) == 5
    assert "near_dup_threshold" not in settings[0]  # off: caches cleaned before near duplicates keep their keys


def test_near_duplicate_settings_are_checked(monkeypatch):
    import importlib.util

    from effitrain.data import StdlibData, check

    with pytest.raises(UsageError, match="has no effect without data.clean.enabled=true"):
        check(StdlibData(clean=CleanConfig(near_dup_threshold=0.8)))
    with pytest.raises(UsageError, match=r"near_dup_threshold in \(0, 1\]"):
        check(StdlibData(clean=CleanConfig(enabled=True, near_dup_threshold=1.5)))
    with pytest.raises(UsageError, match="too small .* raise near_dup_num_perm or lower the threshold"):
        Cleaner(CleanConfig(enabled=True, near_dup_threshold=0.99))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasketch" else
                        find_spec(name, *a))
    with pytest.raises(UsageError, match=r"^data.clean.near_dup_threshold needs the datasketch package: pip install "
                                         r"effitrain\[data\]$"):
        check(StdlibData(clean=CleanConfig(enabled=True, near_dup_threshold=0.8)))
