"""The order pytest-xdist hands out test files: measured durations (tests/durations.json), slowest first."""

from __future__ import annotations

from conftest import DURATIONS, file_seconds, read_durations, slowest_first


def test_unknown_files_first_then_slowest_first():
    durations = {"tests/a.py::x": 1.0, "tests/a.py::y[1]": 5.0, "tests/b.py::z": 3.0, "tests/gone.py::w": 9.0}
    assert file_seconds(durations) == {"tests/a.py": 6.0, "tests/b.py": 3.0, "tests/gone.py": 9.0}
    files = ["tests/b.py", "tests/new.py", "tests/a.py", "tests/new2.py"]
    assert slowest_first(files, durations) == ["tests/new.py", "tests/new2.py", "tests/a.py", "tests/b.py"]


def test_the_committed_durations_are_readable(tmp_path):
    # read_durations falls back to {} (every file unknown, collection order) on a broken file: say so here instead
    assert DURATIONS.exists() and len(read_durations()) > 100
    assert all(seconds >= 0 for seconds in read_durations().values())
    (tmp_path / "broken.json").write_text("{not json")
    assert read_durations(tmp_path / "broken.json") == {}
