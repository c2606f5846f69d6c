"""Shared fixtures: the real config tree composed with CPU-sized overrides, a corpus the tests make,
and a helper that runs the real `effitrain` command in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# hypothesis keeps its files in ./.hypothesis unless told otherwise: not in the checkout (the fuzz tests use no
# example database; this is its other bookkeeping)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "effitrain-hypothesis"))

# pytest-xdist's loadfile hands whole files to the two workers; by default it orders them by their number of
# tests, which put the slow multi-process files late and left one worker alone at the end (the suite's wall time
# rose 747 -> 848 s at the same CPU time when test_estimate.py gained one test). With --no-loadscope-reorder
# (pyproject's addopts) they go out in collection order, which this makes slowest file first, from measured
# durations: tests/durations.json holds each test's seconds (setup + call + teardown) and a file's cost is the sum
# of its tests'. Files it does not know yet go first (new, so unmeasured; first is the safe place for a slow one).
# `python -m pytest -q --update-durations` rewrites it from that run: only when asked, so CI never edits the
# checkout and a run on another machine leaves the committed numbers alone; only a run that passed, so an
# aborted file's short times never land; a run narrowed by -k/-m/paths updates the tests it ran and keeps the
# others' (a whole unfiltered run replaces the file, dropping tests that no longer exist).
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser):
    parser.addoption("--update-durations", action="store_true",
                     help="after a passing run, write its per-test seconds into tests/durations.json (the order "
                          "xdist hands out files: slowest first)")


def read_durations(path: Path = DURATIONS) -> dict[str, float]:
    """nodeid -> seconds; empty when the file is missing or unreadable (every file is then 'unknown')."""
    try:
        tests = json.loads(path.read_text())["tests"]
        return {k: float(v) for k, v in tests.items()} if isinstance(tests, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def file_seconds(durations: dict[str, float]) -> dict[str, float]:
    """Per test file (its path relative to the repo root, as in node ids): the sum of its tests' seconds."""
    out: dict[str, float] = {}
    for nodeid, seconds in durations.items():
        file = nodeid.split("::", 1)[0]
        out[file] = out.get(file, 0.0) + seconds
    return out


def slowest_first(files: list[str], durations: dict[str, float]) -> list[str]:
    """Files in the order to hand them out: unknown ones first (in the given order), then slowest first."""
    seconds = file_seconds(durations)
    return sorted(files, key=lambda f: (f in seconds, -seconds.get(f, 0.0)))  # stable among equals


def pytest_collection_modifyitems(config, items):
    files = list(dict.fromkeys(item.nodeid.split("::", 1)[0] for item in items))
    rank = {f: i for i, f in enumerate(slowest_first(files, read_durations()))}
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable: a file's own order is kept


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    # on the controller this sees every worker's reports; setup + call + teardown of each test
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not config.getoption("update_durations") or hasattr(config, "workerinput") or exitstatus != 0:
        return
    whole = (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.getoption("keyword")
             and not config.getoption("markexpr"))
    tests = {} if whole else read_durations()
    tests |= {nodeid: round(seconds, 2) for nodeid, seconds in _measured.items()}
    tmp = DURATIONS.with_name(f"{DURATIONS.name}.{os.getpid()}.tmp")  # atomic: a reader never sees half of it
    tmp.write_text(json.dumps({"note": "seconds per test (setup + call + teardown), written by `python -m pytest -q "
                                       "--update-durations`; conftest.py orders files slowest first from it",
                               "tests": dict(sorted(tests.items()))}, indent=1) + "\n")
    os.replace(tmp, DURATIONS)


@pytest.fixture(scope="session", autouse=True)
def peak_cache(tmp_path_factory):
    """Measured peak FLOP/s cache in a tmp file, not ~/.cache (subprocess runs inherit the variable)."""
    from effitrain.base.flops import PEAK_CACHE_ENV

    path = tmp_path_factory.mktemp("peak") / "peak_flops.json"
    before = os.environ.get(PEAK_CACHE_ENV)
    os.environ[PEAK_CACHE_ENV] = str(path)
    yield path
    if before is None:
        del os.environ[PEAK_CACHE_ENV]
    else:
        os.environ[PEAK_CACHE_ENV] = before


@pytest.fixture(autouse=True)
def no_launch_mark(monkeypatch):
    """Tests that call cli.main in this process leave its launch-time mark in os.environ; remove it around each
    test, so no later in-process run (or CLI subprocess, which inherits it) counts its startup from that moment."""
    from effitrain.runs import LAUNCH_TIME_ENV

    monkeypatch.delenv(LAUNCH_TIME_ENV, raising=False)
    yield
    os.environ.pop(LAUNCH_TIME_ENV, None)


_SIGINT = signal.getsignal(signal.SIGINT)  # the worker's own Ctrl-C handling, as it started


@pytest.fixture(autouse=True)
def sigint_kept(request):
    """Ctrl-C is handled after each test as the worker started: a CLI subprocess that a later test starts inherits
    an ignored SIGINT (a whole-suite run had the Ctrl-C tests of tests/test_faults.py read exit 0 after a run trained
    in-process earlier in their worker left it SIG_IGN). Restored, and named in a warning, so a leak (a test's or its
    module fixture's) is found without failing the tests that did not make it."""
    import warnings

    yield
    now = signal.getsignal(signal.SIGINT)
    if now is not _SIGINT:
        signal.signal(signal.SIGINT, _SIGINT)
        warnings.warn(f"{request.node.nodeid} (or its fixtures) left SIGINT handled by {now!r}; restored",
                      stacklevel=2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session (built once per corpus, as in real use)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus the tests make: 40 stdlib modules copied as .txt files (~0.6 MB of real text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for src in sorted(root.glob("*.py"))[:40]:
        (out / f"{src.stem}.txt").write_text(src.read_text(encoding="utf-8", errors="replace"))
    return out


@pytest.fixture(scope="session")
def jsonl_corpus(corpus, tmp_path_factory) -> Path:
    """The same corpus as JSON lines, one {"text": ...} record per document."""
    path = tmp_path_factory.mktemp("jsonl") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in sorted(corpus.iterdir())))
    return path


def tiny_overrides(corpus: Path, cache_dir: Path, *extra: str) -> list[str]:
    """A tiny CPU run: 2-layer d=32 llama, vocab 512, 4 x 32-token sequences, 6 steps."""
    return ["data=text", f"data.paths=[{corpus}]", f"data.cache_dir={cache_dir}", "data.vocab_size=512",
            "data.seq_len=32", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
            "model.intermediate_size=64", "batch_size=4", "max_steps=6", "eval_every=3", "eval_batches=2",
            "logging.every=1", "logging.progress=false", *extra]


@pytest.fixture
def tiny(corpus, cache_dir):
    """tiny(*extra) -> the override list of a tiny CPU run."""
    return lambda *extra: tiny_overrides(corpus, cache_dir, *extra)


def compose(overrides: list[str]):
    """The real config tree composed with overrides (what `effitrain train` would run), typed per option."""
    from effitrain.compose import compose_one

    return compose_one(overrides)


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `effitrain` command as a user would (a real subprocess)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "effitrain.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def start_cli(cwd: Path, *args: str) -> subprocess.Popen:
    """`effitrain ARGS` started in its own session (a kill or a terminal's Ctrl-C reaches its whole process group,
    workers included), output to stdout.txt and stderr.txt in cwd."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=cwd, env=env,
                            stdout=(cwd / "stdout.txt").open("w"), stderr=(cwd / "stderr.txt").open("w"),
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """The child starts with Ctrl-C at its default, as from a terminal: a pytest-xdist worker may itself run with
    SIGINT ignored, which a child would inherit (and Python keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, proc: subprocess.Popen, cwd: Path, *, timeout: float = 300) -> None:
    """Poll (every 2 ms: tiny steps take ~10) until predicate() holds; the command must still be running."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, (proc.returncode, (cwd / "stderr.txt").read_text()[-3000:])
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """`effitrain ARGS` through cli.main in this process (the command's own code, no interpreter start): (exit code,
    what it wrote to stderr). For commands that stop before any launch: refusals, bad input."""
    from effitrain.cli import main

    capsys.readouterr()  # drop what earlier calls printed
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own exit on a bad option, as the command would exit
        code = e.code
    return code, capsys.readouterr().err


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run_dir(outputs: Path) -> Path:
    """The single run directory under outputs/<date>/."""
    dirs = [d for d in outputs.glob("*/*") if d.is_dir() and d.parent.name != "multirun"]
    assert len(dirs) == 1, dirs
    return dirs[0]


def losses(run_dir: Path) -> list[float]:
    """The per-step training losses of a run directory."""
    return [r["loss"] for r in read_metrics(run_dir)]


def assert_losses_close(a: list[float], b: list[float], *, steps: int, rtol: float, what: str = "") -> None:
    """Two runs' per-step losses: both `steps` long, every step within `rtol` relative."""
    assert len(a) == len(b) == steps, (len(a), len(b))
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    assert worst <= rtol, f"{what}: max relative loss difference {worst:.2e} > {rtol:g}\n{a}\n{b}"


def train_ok(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`effitrain train ARGS` in cwd, which must succeed."""
    result = run_cli("train", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return result


def make_hf_model_dir(overrides: list[str], out: Path, *, seed: int = 7) -> Path:
    """A local Hugging Face model directory (config, weights, the run's tokenizer.json) of the model `overrides`
    describe, freshly initialised: a stand-in for a pretrained model or a distillation teacher."""
    import shutil

    from effitrain.data.prepare import prepare_data
    from effitrain.model.build import build_model, init_weights

    cfg = compose(overrides)
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, vocab_size=data.tokens.vocab_size, max_seq_len=cfg.data.seq_len)
    init_weights(model, cfg=cfg.model, seed=seed)
    model.save_pretrained(out)
    shutil.copy(data.tokens.directory / "tokenizer.json", out / "tokenizer.json")
    return out
