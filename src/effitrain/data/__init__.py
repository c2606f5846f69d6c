"""The `data` group: corpus -> tokenizer -> token cache (memmap) -> resumable sharded sampler -> batches.

Schemas and checks here (no torch, so the CLI checks paths and a mix's sources at once); modules: corpus (the
builders: each source's files and documents, streamed; listing, fingerprint, split), tokens (BPE + streaming cache
build), progress, prepare (the entry point), loader (sampler, batches, prefetch), mix (data=mix: the run's data of
several sources by weight, its sampler and per-source validation).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from effitrain.errors import UsageError, explain
from effitrain.registry import Group

GROUP = Group("data", key="source", builders="effitrain.data.builders",
              standalone="a source is read and tokenized on the host; the device sees batch_size x seq_len tokens, "
                         "which the estimate counts from the run's keys")


@dataclass
class CleanConfig:
    """Document filters applied while the corpus streams (off by default); removals are counted in data_report.json."""

    enabled: bool = False
    exact_duplicates: bool = True  # drop a document whose normalised text (case, whitespace) was seen before
    min_chars: int = 50  # drop documents shorter than this, stripped
    max_non_text: float = 0.3  # drop documents where more than this share of characters is not text (letters,
    # digits, ASCII punctuation, whitespace): binary decoded as replacement characters, symbol soup
    max_line_chars: int = 1000  # drop documents with a longer line (minified or generated files)
    max_repeated_lines: float = 0.5  # drop documents where more than this share of non-blank lines repeats one
    near_dup_threshold: Optional[float] = None  # drop a document whose word-shingle Jaccard similarity to an earlier
    # kept one is at least this (MinHash LSH, datasketch; e.g. 0.8); None = off: it needs the `data` extra
    near_dup_num_perm: int = 128  # MinHash permutations: more estimate the similarity better, cost more time/memory
    near_dup_shingle_words: int = 5  # a shingle is this many consecutive words (lowercased, split on whitespace)


@dataclass
class DataBase:
    name: str = "stdlib"
    source: str = "stdlib"
    tokenizer: Optional[str] = None  # path to a tokenizer.json; None = train a BPE of vocab_size on the corpus
    vocab_size: int = 4096  # size of the BPE trained on the corpus
    tokenizer_sample_mb: float = 32.0  # the BPE trains on a deterministic sample of about this much training text
    seq_len: int = 128
    val_fraction: float = 0.05  # share of documents held out for validation
    cache_dir: str = "~/.cache/effitrain"
    prefetch: int = 2  # batches prepared ahead by a background thread; 0 = synchronous
    clean: CleanConfig = field(default_factory=CleanConfig)


@GROUP.option("stdlib")
@dataclass
class StdlibData(DataBase):
    source: str = "stdlib"  # this interpreter's standard-library sources + pydoc topics


@GROUP.option("text")
@dataclass
class TextData(DataBase):
    name: str = "text"
    source: str = "text"
    paths: List[str] = field(default_factory=list)  # files or directories (their *.txt, *.md, *.rst, *.py)


@GROUP.option("datasets")
@dataclass
class DatasetsData(DataBase):
    """Local tables through Hugging Face `datasets` (data/hf.py; the `data` extra, imported only to read)."""

    name: str = "datasets"
    source: str = "datasets"
    paths: List[str] = field(default_factory=list)  # .parquet/.arrow/.json/.jsonl/.csv files or directories of them
    field: str = "text"  # which column holds the document


@GROUP.option("jsonl")
@dataclass
class JsonlData(DataBase):
    name: str = "jsonl"
    source: str = "jsonl"
    paths: List[str] = field(default_factory=list)  # .jsonl/.json files or directories of them
    field: str = "text"  # which key of each record holds the document


@GROUP.option("mix")
@dataclass
class MixData(DataBase):
    name: str = "mix"
    source: str = "mix"
    # name -> {option: stdlib|text|jsonl|datasets|chat|instruct|chat-stdlib, weight: >= 0, that option's own keys
    # (paths, field, train_on...)}; the other keys here (vocab_size, seq_len, val_fraction, clean, ...) hold for
    # every source that has them
    sources: Dict[str, Any] = field(default_factory=dict)


# fine-tuning data (data/sft.py): samples, not a token stream; trained with the model's own tokenizer
SFT_SOURCES = ("chat", "instruct", "chat-stdlib")


@dataclass
class SftBase:
    """Fine-tuning samples: each rendered by the model's own tokenizer, its loss on the answers (data/sft.py). Not a
    DataBase: no BPE is trained and no document filter applies, so those keys do not exist here."""

    name: str = "chat"
    source: str = "chat"
    tokenizer: Optional[str] = None  # path to a tokenizer.json; None = model.pretrained's own (one is required)
    seq_len: int = 256  # tokens per row: a packed row holds several samples, an unpacked one one (padded)
    val_fraction: float = 0.05  # share of samples held out for validation (by a hash of their split key)
    cache_dir: str = "~/.cache/effitrain"
    prefetch: int = 2  # batches prepared ahead by a background thread; 0 = synchronous
    train_on: str = "answers"  # answers: loss on the assistant turns / completions (their EOS included); all
    packing: bool = True  # several samples per row, each attending only to itself (positions restart per sample)
    overflow: str = "drop"  # a sample longer than seq_len + 1 tokens: drop (counted), truncate, or refuse (names it)


@dataclass
class ChatBase(SftBase):
    chat_template: Optional[str] = None  # a Jinja chat template; None = the tokenizer's own (tokenizer_config.json)
    system_prompt: Optional[str] = None  # a system turn put first in every conversation that has none


@GROUP.option("chat")
@dataclass
class ChatData(ChatBase):
    name: str = "chat"
    source: str = "chat"
    paths: List[str] = field(default_factory=list)  # .jsonl/.json (or, with `datasets`, .parquet/.arrow/.csv) files
    field: str = "messages"  # the key holding the conversation: a list of {role, content}


@GROUP.option("instruct")
@dataclass
class InstructData(SftBase):
    name: str = "instruct"
    source: str = "instruct"
    paths: List[str] = field(default_factory=list)  # .jsonl/.json (or, with `datasets`, .parquet/.arrow/.csv) files
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    # the text before the completion; {prompt} is replaced by the prompt (no other braces are read)
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"


@GROUP.option("chat-stdlib")
@dataclass
class ChatStdlibData(ChatBase):
    """Embedded fine-tuning set: documented functions of this interpreter's standard library; the user turn a
    function's code without its docstring, the answer the docstring's first paragraph; held out by file."""

    name: str = "chat-stdlib"
    source: str = "chat-stdlib"


@GROUP.checks
def check(cfg) -> None:
    if cfg.source in SFT_SOURCES:
        check_sft(cfg)
        return
    if cfg.seq_len <= 0:
        raise UsageError(f"data.seq_len={cfg.seq_len} must be a positive integer")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError(f"data.val_fraction={cfg.val_fraction} must lie strictly between 0 and 1")
    if cfg.vocab_size < 260:
        raise UsageError(f"data.vocab_size={cfg.vocab_size} is too small: a byte-level BPE needs at least 260 "
                         "(256 bytes + merges)")
    _check_near_dup(cfg.clean)
    if cfg.source == "datasets":
        require_extra("datasets", what="data=datasets")
    c = cfg.clean
    if c.min_chars < 0 or c.max_line_chars <= 0 or not 0 <= c.max_non_text <= 1 or not 0 <= c.max_repeated_lines <= 1:
        raise UsageError("data.clean: min_chars >= 0, max_line_chars > 0, and max_non_text and max_repeated_lines "
                         f"between 0 and 1, please (got {c.min_chars}, {c.max_line_chars}, {c.max_non_text}, "
                         f"{c.max_repeated_lines})")
    if cfg.tokenizer_sample_mb <= 0:
        raise UsageError(f"data.tokenizer_sample_mb={cfg.tokenizer_sample_mb} must be positive")
    if cfg.source == "mix":
        check_sources(cfg)
    elif cfg.source != "stdlib":
        resolve_paths(source=cfg.source, paths=list(cfg.paths))
    check_cache_dir(cfg.cache_dir)
    if cfg.tokenizer:  # parsed now: a damaged one, or one with no EOS, is one line before any run directory exists
        tokenizer_specials(Path(cfg.tokenizer).expanduser(), what=f"data.tokenizer={cfg.tokenizer}")


def check_sft(cfg) -> None:
    """A fine-tuning option's own values (its tokenizer and template are checked against the run: check_sft_run)."""
    if cfg.seq_len <= 0:
        raise UsageError(f"data.seq_len={cfg.seq_len} must be a positive integer")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError(f"data.val_fraction={cfg.val_fraction} must lie strictly between 0 and 1")
    for key, allowed in (("train_on", ("answers", "all")), ("overflow", ("drop", "truncate", "refuse"))):
        if cfg[key] not in allowed:
            raise UsageError(f"data.{key}={cfg[key]!r} is not one of: {', '.join(allowed)}")
    if cfg.source == "instruct" and "{prompt}" not in cfg.template:
        raise UsageError(f"data.template={cfg.template!r} has no {{prompt}}: where does the prompt go?")
    if cfg.source != "chat-stdlib":
        tables = {f.suffix for f in resolve_paths(source=cfg.source, paths=list(cfg.paths))} - {".jsonl", ".json"}
        if tables:
            require_extra("datasets", what=f"data={cfg.source} reading {'/'.join(sorted(tables))} files")
    check_cache_dir(cfg.cache_dir)


def sample_sources(node) -> dict:
    """{name: config} of the fine-tuning sources of a `data` config: the option itself, or a mix's (none: text)."""
    if node.source in SFT_SOURCES:
        return {node.name: node}
    if node.source == "mix":
        return {name: sub for name, (_, sub) in source_configs(node).items() if sub.source in SFT_SOURCES}
    return {}


def run_chat_template(cfg) -> Optional[str]:
    """The chat template a run's conversations render with (None: no chat source); a mix's chat sources share one."""
    data = run_data_config(cfg)
    chats = [s for s in sample_sources(cfg.data).values() if s.source != "instruct"]
    if not chats or not data.tokenizer:
        return None
    path = Path(data.tokenizer).expanduser()
    templates = {chat_template(path, given=s.chat_template) for s in chats}
    if len(templates) > 1:
        raise UsageError("the chat sources of data=mix render with different chat templates, and a model carries one: "
                         "give them the same data.sources.<name>.chat_template")
    return templates.pop()


def check_sft_run(node, cfg) -> None:
    """Fine-tuning data (an option, or a mix with such sources) against the run: the model's tokenizer (and its chat
    template) exist, and the options that read a batch as a plain token window are not chosen with it."""
    samples = sample_sources(node)
    if not samples:
        return
    what = f"data={node.source}" if node.source != "mix" else \
        f"data=mix with fine-tuning sources ({', '.join(samples)})"
    data = run_data_config(cfg)
    if not data.tokenizer:
        raise UsageError(f"{what} trains with the model's own tokenizer: give model.pretrained=DIR (with its "
                         "tokenizer.json), checkpoint.resume_from=RUN (an effitrain run's) or data.tokenizer=PATH")
    path = Path(data.tokenizer).expanduser()
    tokenizer_specials(path, what=f"data.tokenizer={data.tokenizer}")
    run_chat_template(cfg)
    if "distill" in cfg.compression:
        raise UsageError(f"compression=distill reads plain token windows; {what} is not one yet")
    if cfg.parallel.strategy in ("tp", "fsdp-tp"):
        raise UsageError(f"{what} under parallel={cfg.parallel.strategy}: packed samples through "
                         "tensor/sequence parallelism are not tested yet; use parallel=ddp or fsdp")


def chat_template(tokenizer: Path, *, given: Optional[str]) -> str:
    """The chat template: data.chat_template if given, else the tokenizer's own (tokenizer_config.json's
    chat_template, or a chat_template.jinja beside it, as transformers saves it); one line when there is none."""
    import json

    if given:
        return given
    config = tokenizer.parent / "tokenizer_config.json"
    try:
        own = json.loads(config.read_bytes()).get("chat_template") if config.is_file() else None
    except (OSError, ValueError) as e:
        raise DataError(f"{config} is damaged ({e})") from None
    if isinstance(own, list):  # [{name, template}, ...]: the default one
        own = next((t.get("template") for t in own if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = tokenizer.parent / "chat_template.jinja"
    if not own and jinja.is_file():
        own = jinja.read_text(encoding="utf-8")
    if (not isinstance(own, str) or not own) and not config.is_file() and _is_own_bpe(tokenizer):
        own = OWN_CHAT_TEMPLATE  # effitrain's BPE (a run directory's): effitrain's own template for its tokens
    if not isinstance(own, str) or not own:
        raise DataError(f"the tokenizer {tokenizer} has no chat template (no chat_template in {config.name}, no "
                        "chat_template.jinja); give one: data.chat_template='{% for m in messages %}...'")
    return own


# the chat template of the BPE effitrain trains, which has none of its own: role headers in plain text, each answer
# ended by the tokenizer's <|endoftext|> (its EOS: the model learns to stop, and generation stops there)
OWN_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
                     "{% if m['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% else %}{{ '\\n' }}{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def _is_own_bpe(tokenizer: Path) -> bool:
    """A tokenizer.json of the BPE effitrain trains: its <|endoftext|> is a special token (read only when a chat
    template is missing; a damaged file says so where it is read for the data)."""
    try:
        return read_tokenizer(tokenizer).token_to_id(OWN_EOS) is not None
    except DataError:
        return False


def check_cache_dir(cache_dir: str) -> None:
    """data.cache_dir can hold a cache: its nearest existing directory takes a new entry (tried: a scratch directory
    made and removed, since os.access says yes to root even on /proc or a read-only mount). Found here, one line,
    before any run directory; not a traceback when the first worker builds the cache."""
    import errno
    import tempfile

    from effitrain.errors import io_failure

    path = Path(cache_dir).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"data.cache_dir={cache_dir}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".effitrain-probe-", dir=existing))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise io_failure(e, existing, doing=f"data.cache_dir={cache_dir}") from None
        raise DataError(f"data.cache_dir={cache_dir}: cannot make a cache in {existing} ({e.strerror}); give a "
                        "writable directory") from None


def read_tokenizer(path: Path, *, what: str | None = None):
    """The tokenizer of a tokenizer.json; a damaged or missing one is one DataError line naming it (the Rust
    library raises a bare Exception with only its parser's words), a disk that fails is an I/O failure."""
    from tokenizers import Tokenizer

    from effitrain.errors import first_line, io_failure

    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{what or path}: no such tokenizer.json file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{what or path}: not a readable tokenizer.json ({e.reason})") from None
    except OSError as e:
        raise io_failure(e, path, doing="reading the tokenizer") from None
    try:
        return Tokenizer.from_str(raw)
    except Exception as e:  # tokenizers raises plain Exception for every parse error
        where = f"{what}: {path}" if what else str(path)
        raise DataError(f"{where} is not a readable tokenizer.json ({first_line(e)})") from None


OWN_EOS = "<|endoftext|>"  # the separator of the BPE effitrain trains (data/tokens.py); never added to another
# what a given tokenizer.json brings beside it (a Hugging Face model directory's): the run directory keeps copies,
# and its export carries them (chat template, special tokens, the EOS ids generation stops at)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def run_data_config(cfg):
    """The run's `data` config: cfg.data, whose tokenizer is a model.pretrained checkpoint's own (its tokenizer.json,
    read with the tokenizer_config.json beside it) unless data.tokenizer names another; for fine-tuning data started
    from an effitrain run (checkpoint.resume_from=RUN), that run's tokenizer. Derived, not written into the config:
    the saved config, its hash and a resumed run all read the same.

    Args:
        cfg: the whole config (the `model` group's pretrained, checkpoint.resume_from and the `data` group).
    """
    import copy

    if cfg.data.tokenizer:
        return cfg.data
    if cfg.model.pretrained:
        own = Path(cfg.model.pretrained).expanduser() / "tokenizer.json"
    elif cfg.checkpoint.resume_from and sample_sources(cfg.data):
        own = _run_tokenizer(Path(cfg.checkpoint.resume_from).expanduser())
    else:
        return cfg.data
    if not own.is_file():  # a checkpoint without one: a BPE is trained (and refused if the embeddings are fewer)
        return cfg.data
    data = copy.deepcopy(cfg.data)
    data.tokenizer = str(own)
    return data


def _run_tokenizer(path: Path) -> Path:
    """The tokenizer.json of the run a checkpoint.resume_from names: a run directory, its checkpoints/ or a step-N
    inside it (a run directory carries the tokenizer it trained with)."""
    run = path.parent if path.name == "checkpoints" else path.parent.parent if path.parent.name == "checkpoints" \
        else path
    return run / "tokenizer.json"


def tokenizer_identity_files(tokenizer: Optional[str]) -> list[Path]:
    """The TOKENIZER_FILES beside a given data.tokenizer (none for the BPE effitrain trains)."""
    if not tokenizer:
        return []
    beside = Path(tokenizer).expanduser().parent
    return [beside / name for name in TOKENIZER_FILES if (beside / name).is_file()]


@dataclass(frozen=True)
class Specials:
    """The special tokens a tokenizer separates and starts documents with: its own, nothing is ever added."""

    eos: str
    eos_id: int
    bos_id: Optional[int]  # prepended to each document (tokenizer_config.json's add_bos_token), else None
    source: str  # where the EOS came from (for the log)


def tokenizer_specials(path: Path, *, what: str | None = None, tok=None,
                       model_eos_id: Optional[int] = None) -> Specials:
    """The EOS (and BOS) of the tokenizer.json at `path`, from the files beside it as transformers reads them: the
    eos_token of tokenizer_config.json, else the eos_token_id of generation_config.json or config.json, else
    effitrain's own `<|endoftext|>` (a BPE effitrain trained), else `model_eos_id` (an export's: its model
    config's, for a run directory, which keeps no config.json). BOS is prepended where tokenizer_config.json says
    `add_bos_token: true` and the tokenizer's own post-processor does not already add it. One DataError line when
    the tokenizer has no EOS (nothing is appended to a tokenizer effitrain did not train)."""
    import json

    what = what or str(path)
    tok = tok or read_tokenizer(path, what=what)
    beside = path.parent

    def read(name: str) -> dict:
        file = beside / name
        if not file.is_file():
            return {}
        try:
            parsed = json.loads(file.read_bytes())
        except (OSError, ValueError) as e:
            raise DataError(f"{what}: {file} is damaged ({e})") from None
        return parsed if isinstance(parsed, dict) else {}

    def content(token) -> Optional[str]:  # "<s>" or {"content": "<s>", ...} (AddedToken as transformers saves it)
        return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None

    def known(token: Optional[str], key: str) -> Optional[int]:
        if token is None:
            return None
        found = tok.token_to_id(token)
        if found is None:
            raise DataError(f"{what}: {key} {token!r} of {beside / 'tokenizer_config.json'} is not in the tokenizer")
        return found

    config = read("tokenizer_config.json")
    eos_id, source = known(content(config.get("eos_token")), "eos_token"), "tokenizer_config.json eos_token"
    for name in ("generation_config.json", "config.json"):
        if eos_id is None:
            ids = read(name).get("eos_token_id")
            ids = ids[0] if isinstance(ids, list) and ids else ids
            if isinstance(ids, int) and not isinstance(ids, bool) and 0 <= ids < tok.get_vocab_size():
                eos_id, source = ids, f"{name} eos_token_id"
    if eos_id is None and tok.token_to_id(OWN_EOS) is not None:
        eos_id, source = tok.token_to_id(OWN_EOS), "effitrain's own"
    if eos_id is None and isinstance(model_eos_id, int) and 0 <= model_eos_id < tok.get_vocab_size():
        eos_id, source = model_eos_id, "the model config's eos_token_id"
    if eos_id is None:
        raise DataError(f"{what}: the tokenizer has no EOS token to separate documents (no eos_token in "
                        f"{beside / 'tokenizer_config.json'}, no eos_token_id in generation_config.json or config.json "
                        "beside it, no <|endoftext|>); set eos_token in that tokenizer_config.json")
    bos_id = known(content(config.get("bos_token")), "bos_token") if config.get("add_bos_token") is True else None
    if bos_id is not None and tok.encode("a").ids[:1] == [bos_id]:  # its post-processor adds it already
        bos_id = None
    return Specials(eos=tok.id_to_token(eos_id), eos_id=eos_id, bos_id=bos_id, source=source)


for _kind in (*SFT_SOURCES, "mix"):
    GROUP.check_of(_kind)(check_sft_run)


def _check_near_dup(c) -> None:
    if c.near_dup_threshold is None:
        return
    if not c.enabled:
        raise UsageError(f"data.clean.near_dup_threshold={c.near_dup_threshold} has no effect without "
                         "data.clean.enabled=true")
    if not 0 < c.near_dup_threshold <= 1 or c.near_dup_num_perm < 16 or c.near_dup_shingle_words < 1:
        raise UsageError("data.clean: near_dup_threshold in (0, 1], near_dup_num_perm >= 16 and near_dup_shingle_words "
                         f">= 1, please (got {c.near_dup_threshold}, {c.near_dup_num_perm}, "
                         f"{c.near_dup_shingle_words})")
    require_extra("datasketch", what="data.clean.near_dup_threshold")


def require_extra(module: str, *, what: str) -> None:
    """A one-line UsageError when `module` (of the `data` extra) is not installed; found without importing it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the {module} package: pip install effitrain[data]")


class DataError(UsageError):
    """Bad data input: reported as one line, exit code 2."""


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
# data=datasets: the `datasets` builder of each suffix (the suffix names the format)
DATASETS_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def resolve_paths(*, source: str, paths: list[str]) -> list[Path]:
    """The files named by data.paths (directories expanded), checked to exist and hold data."""
    if not paths:
        raise DataError(f"data={source} needs data.paths=[file_or_dir,...]; none given")
    jsonl = {".jsonl", ".json"}
    tables = set(DATASETS_BUILDERS)  # .jsonl/.json read by effitrain, the others by `datasets`
    suffixes = {"jsonl": jsonl, "chat": tables, "instruct": tables, "datasets": tables}.get(source, TEXT_SUFFIXES)
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"data.paths: {raw} does not exist")
        found = _files_under(path, suffixes) if path.is_dir() else [path]
        if not found:
            raise DataError(f"data.paths: {raw} holds no {'/'.join(sorted(suffixes))} files")
        if source == "datasets" and path.suffix not in suffixes and not path.is_dir():
            raise DataError(f"data.paths: {raw}: data=datasets reads {'/'.join(sorted(suffixes))} files (the suffix "
                            "names the format)")
        files.extend(found)
    if not any(os.stat(f).st_size for f in files):  # stops at the first file with bytes
        raise DataError(f"data.paths: {', '.join(paths)} {'is' if len(paths) == 1 else 'are'} empty")
    return files


def _files_under(root: Path, suffixes: set[str]) -> list[Path]:
    """The regular files under root with one of the suffixes, in Path order (rglob's files, sorted), from one
    scandir per directory: DirEntry knows file from directory without a stat, so a cached run over 70,000 files
    lists them in a fraction of a second. Symlinked directories are not entered (as rglob does not)."""
    found, stack = [], [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif os.path.splitext(entry.name)[1] in suffixes and entry.is_file():
                    found.append(entry.path)
    return [Path(f) for f in sorted(found, key=lambda f: f.split(os.sep))]  # by parts, as Paths compare


# data=mix: the keys of the whole mix (every source's); a source has its option's others
SHARED_KEYS = [f.name for f in fields(DataBase) if f.name not in ("name", "source")]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a metric key (val_loss/<name>) and an override path segment


def source_configs(cfg) -> dict[str, tuple[float, object]]:
    """{name: (weight, the source's own data config)} of a data=mix config, sorted by name (the order of the
    sampler's blocks and the tokenizer's sample, whatever order the config lists them in). Bad input: UsageError.

    Args:
        cfg: the `data` config group (data=mix).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    sources = cfg.sources
    if not sources:
        raise UsageError("data=mix needs data.sources: name -> {option, weight, ...}, e.g. "
                         "data.sources.code={option:stdlib,weight:0.7} "
                         "data.sources.docs={option:text,weight:0.3,paths:[docs]}")
    shared = {key: cfg[key] for key in SHARED_KEYS}
    out = {}
    for name in sorted(sources, key=str):
        where, entry = f"data.sources.{name}", sources[name]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UsageError(f"data.sources: source name {name!r} must be letters, digits, - and _ (it names the "
                             "metric val_loss/<name>)")
        if not OmegaConf.is_dict(entry):
            raise UsageError(f"{where}={entry!r} must be a mapping {{option: ..., weight: ..., ...}}")
        option = entry.get("option")
        kinds = [kind for kind in GROUP.schemas if kind != "mix"]
        if option not in kinds:
            raise UsageError(f"{where}.option={option!r} is not one of: {', '.join(kinds)}")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise UsageError(f"{where}.weight={weight!r} must be a finite number >= 0 (its share of the training "
                             "windows is weight / the sum of the weights)")
        schema = GROUP.schemas[option]
        keys = [f.name for f in fields(schema)]
        own = [k for k in keys if k not in SHARED_KEYS and k not in ("name", "source")]
        for key in entry:
            if key not in ("option", "weight", *own):
                hint = f"; {key} is the whole mix's: set data.{key}" if key in SHARED_KEYS and key in keys else ""
                raise UsageError(f"unknown key {f'{where}.{key}'!r}: a {option} source has option, weight"
                                 f"{''.join(', ' + k for k in own)}{hint}")
        try:
            # a fine-tuning source takes the mix's keys it has (seq_len, tokenizer...; no BPE or cleaning keys)
            node = OmegaConf.merge(OmegaConf.structured(schema),
                                   {k: v for k, v in shared.items() if k in keys} | {"name": name} |
                                   {key: entry[key] for key in own if key in entry})
        except OmegaConfBaseException as e:
            e.full_key = f"{where}.{e.full_key}" if e.full_key else where
            raise UsageError(explain(e)) from None
        out[name] = (float(weight), node)
    if sum(weight for weight, _ in out.values()) <= 0:
        raise UsageError(f"data.sources: the weights sum to 0 ({', '.join(out)}); give at least one a weight > 0")
    return out


def check_sources(cfg) -> None:
    """data=mix: its sources (source_configs) and each source's own checks (paths exist and hold data)."""
    for name, (_, sub) in source_configs(cfg).items():
        try:
            check(sub)
        except UsageError as e:
            raise type(e)(f"data.sources.{name}: {e}") from None
