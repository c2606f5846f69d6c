"""Fine-tuning data (data=chat, data=instruct, data=chat-stdlib): samples with a loss mask, packed into rows.

Reading: each option's builder (registered here, imported by data/corpus.py) gives `Records`: the files whose bytes
key the cache and a reader of `Record`s (a conversation, or a prompt and its completion), each named for errors
(`file:line`) and carrying the key the validation split hashes (data=chat-stdlib: its file, so no held-out answer
comes from a file the model trained on).

Rendering, with the model's own tokenizer (data.tokenizer, by default model.pretrained's tokenizer.json):
- chat: transformers' `apply_chat_template` (its sandboxed Jinja) on a PreTrainedTokenizerFast wrapping that
  tokenizer, with the template of its tokenizer_config.json (or data.chat_template). The answer spans are found by
  rendering the conversation prefix by prefix: assistant turn i spans from the end of render(messages[:i],
  add_generation_prompt=True) to the end of render(messages[:i+1]); the template must render each prefix as the
  start of the next (checked, one line naming the row when it does not). This works for any template, where
  `return_assistant_tokens_mask` needs `{% generation %}` markers few templates have. The whole conversation is
  then tokenized once and a token is trained on when it overlaps a span (a token that joins the prompt's last space
  to the answer's first word is the answer's), so the template's end-of-turn token
  (its EOS) is trained: the model learns to stop.
- instruct: data.template with {prompt} replaced, then the completion, then the tokenizer's EOS (its BOS first where
  its tokenizer_config.json adds one); the completion's tokens and the EOS are trained on.
data.train_on=all trains every token instead.

The tokenized samples are cached under cache_dir/sft/<key> (key: the files' bytes, the tokenizer and its config,
the rendering settings). Fitting them into data.seq_len (data.overflow), packing (data.packing) and the sampler are
cheap and done at each start, so changing them re-tokenizes nothing.

Rows: a sample of n tokens gives n-1 (input, label) positions, label -100 where it is not trained on. Packed
(data.packing=true), samples are laid into rows of seq_len positions in data order, next-fit, each row padded at
its end; unpacked, one sample per row. Positions restart at 0 for each sample and at each pad, and no attention
mask is passed: transformers (5.x, masking_utils.find_packed_sequence_indices) reads the restarts of position_ids
as packed sequences and builds the block-diagonal causal mask itself, for sdpa and eager (the models are built
with sdpa, on CPU and CUDA alike: no device-specific path), so a sample never attends to another. It does so only
when no KV cache is passed, and a model whose config says use_cache makes one: engine/loop.lm_loss passes
use_cache=False (without it the packed samples of this module's test see each other). Pads are labelled -100 and,
each its own sequence, attend only to themselves.

The sampler is the token-window sampler's (loader.WindowSampler) over rows: epochs over the rows, shuffled by
(seed, epoch), the rows of a global batch split across data-parallel ranks, the batch of any step a pure function
of it (exact resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effitrain.data import GROUP, DataError, chat_template, read_tokenizer, tokenizer_specials
from effitrain.data.corpus import _bucket
from effitrain.data.loader import Shard, WindowSampler
from effitrain.data.records import Record, Records

_CACHE_VERSION = 1  # bump when the rendering or the cache's layout changes
IGNORE = -100  # the label of a position no loss is taken on (cross_entropy's ignore_index)


# --- rendering ------------------------------------------------------------------------------------------------------


class _Renderer:
    """Record -> (token ids, trained mask) with the run's tokenizer (module docstring: Rendering)."""

    def __init__(self, cfg, tokenizer: Path):
        self.cfg, self.tok = cfg, read_tokenizer(tokenizer, what=f"data.tokenizer={tokenizer}")
        self.specials = tokenizer_specials(tokenizer, tok=self.tok)
        self.chat = cfg.source != "instruct"
        if self.chat:
            from transformers import PreTrainedTokenizerFast

            self.template = chat_template(tokenizer, given=cfg.chat_template)
            self.hf = PreTrainedTokenizerFast(tokenizer_object=self.tok, **_special_tokens(tokenizer))

    def text(self, record: Record) -> tuple[str, list[tuple[int, int]], list[int], list[int]]:
        """The sample's text, the character spans trained on, token ids put before and after it."""
        if not self.chat:
            prompt, completion = record.value
            head = self.cfg.template.replace("{prompt}", prompt)
            bos = [] if self.specials.bos_id is None else [self.specials.bos_id]
            return head + completion, [(len(head), len(head) + len(completion))], bos, [self.specials.eos_id]
        messages = record.value
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        full = self._render(record, messages, prompt=False)
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self._render(record, messages[:i], prompt=True)
            upto = self._render(record, messages[:i + 1], prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(f"{record.name}: the chat template does not render this conversation as the "
                                "concatenation of its prefixes (a template that rewrites earlier turns), so its "
                                "answers cannot be found; give data.chat_template or use data=instruct")
            spans.append((len(before), len(upto)))
        return full, spans, [], []

    def _render(self, record: Record, messages: list, *, prompt: bool) -> str:
        try:
            return self.hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                               add_generation_prompt=prompt)
        except Exception as e:  # jinja2's errors, and the template's own raise_exception: one line naming the row
            raise DataError(f"{record.name}: the chat template fails on it ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None

    def encode(self, records: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        rendered = [self.text(r) for r in records]
        encodings = self.tok.encode_batch([text for text, *_ in rendered], add_special_tokens=False)
        out = []
        for (_, spans, head, tail), enc in zip(rendered, encodings, strict=True):
            starts = np.asarray([start for start, _ in enc.offsets], dtype=np.int64).reshape(-1)
            ends = np.asarray([end for _, end in enc.offsets], dtype=np.int64).reshape(-1)
            trained = np.zeros(len(starts), dtype=bool)
            for a, b in spans:  # a token overlapping the answer is trained: " Paris" after "Answer:" is one token
                trained |= (ends > a) & (starts < b)
            ids = np.asarray([*head, *enc.ids, *tail], dtype=np.uint32)
            mask = np.concatenate([np.zeros(len(head), bool), trained, np.ones(len(tail), bool)])
            out.append((ids, np.ones_like(mask) if self.cfg.train_on == "all" else mask))
        return out


def _special_tokens(tokenizer: Path) -> dict:
    """bos/eos/pad of tokenizer_config.json, which templates read (`{{ bos_token }}`)."""
    config = tokenizer.parent / "tokenizer_config.json"
    found = json.loads(config.read_bytes()) if config.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = found.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


# --- the cache ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """A split's samples: ids[offsets[i]:offsets[i+1]] and its trained mask; names for errors."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    @classmethod
    def of(cls, pairs: list, names: list[str]) -> Samples:
        offsets = np.zeros(len(pairs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in pairs])
        ids = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.uint32)
        mask = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, bool)
        return cls(ids, mask, offsets, names)

    def save(self, path: Path) -> None:
        np.savez(path, ids=self.ids, mask=self.mask, offsets=self.offsets, names=np.asarray(self.names, dtype=str))

    @classmethod
    def load(cls, path: Path) -> Samples:
        with np.load(path) as f:
            return cls(f["ids"], f["mask"], f["offsets"], [str(n) for n in f["names"]])


def _key(cfg, records: Records, tokenizer: Path) -> str:
    """The cache key: the files' bytes, the tokenizer and the files beside it, the rendering settings."""
    h = hashlib.sha256()
    keys = {"version": _CACHE_VERSION, "reader": records.reader, "train_on": cfg.train_on,
            "val_fraction": cfg.val_fraction}
    keys |= {"template": cfg.template} if cfg.source == "instruct" else \
        {"chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt}
    h.update(json.dumps(keys, sort_keys=True).encode())
    for path in (tokenizer, *(tokenizer.parent / n for n in ("tokenizer_config.json", "chat_template.jinja",
                                                              "generation_config.json", "config.json"))):
        h.update(path.read_bytes() if path.is_file() else b"-")
    for path in records.files:
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _build(cfg, records: Records, tokenizer: Path, directory: Path) -> None:
    """Read and render every record into directory (train.npz, val.npz, meta.json last: marks completion)."""
    renderer = _Renderer(cfg, tokenizer)
    every = list(records.read())
    if not every:
        raise DataError(f"data={cfg.source}: no samples in {', '.join(str(p) for p in records.files[:3])}")
    val = [_bucket(r.split) < cfg.val_fraction for r in every]
    if not any(val) or all(val):  # too few split keys to split by hash: hold out the tail
        cut = len(every) - max(1, int(len(every) * cfg.val_fraction))
        val = [i >= cut for i in range(len(every))]
    encoded = renderer.encode(every)
    fingerprint = hashlib.sha256()
    for r in every:
        fingerprint.update(json.dumps([r.name, r.value]).encode())
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for part, want in (("train", False), ("val", True)):
            chosen = [i for i, v in enumerate(val) if v == want]
            Samples.of([encoded[i] for i in chosen], [every[i].name for i in chosen]).save(tmp / f"{part}.npz")
        shutil.copy(tokenizer, tmp / "tokenizer.json")
        meta = {"fingerprint": fingerprint.hexdigest(), "samples": len(every),
                "vocab_size": renderer.tok.get_vocab_size(), "eos_id": renderer.specials.eos_id,
                "pad_id": _pad_id(tokenizer, renderer)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, directory)
        except OSError:  # built meanwhile by another process: keep that one
            if not (directory / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pad_id(tokenizer: Path, renderer: _Renderer) -> int:
    """The tokenizer's pad token, else its EOS (pads are never attended to by real tokens nor trained on)."""
    pad = _special_tokens(tokenizer).get("pad_token")
    found = renderer.tok.token_to_id(pad) if pad else None
    return renderer.specials.eos_id if found is None else found


def prepare_sft(cfg) -> SftData:
    """The fine-tuning data of the `data` config (a fine-tuning option, its tokenizer set: data.run_data_config)."""
    if not cfg.tokenizer:
        raise DataError(f"data={cfg.source} needs the model's tokenizer: model.pretrained=DIR or data.tokenizer=PATH")
    tokenizer = Path(cfg.tokenizer).expanduser()
    records = GROUP.builder_of(cfg.source)(cfg)
    directory = Path(cfg.cache_dir).expanduser() / "sft" / _key(cfg, records, tokenizer)
    if not (directory / "meta.json").is_file():
        _build(cfg, records, tokenizer, directory)
    meta = json.loads((directory / "meta.json").read_text())
    return SftData(cfg=cfg, directory=directory, meta=meta, train=Samples.load(directory / "train.npz"),
                   val=Samples.load(directory / "val.npz"))


# --- rows and batches -----------------------------------------------------------------------------------------------


@dataclass
class SftBatch:
    """Rows of samples: inputs, labels (IGNORE where no loss is taken), positions (restarting per sample)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def to(self, device, non_blocking: bool = False) -> SftBatch:
        return SftBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.input_ids, self.labels,
                                                                            self.position_ids)))

    def pin_memory(self) -> SftBatch:
        return SftBatch(self.input_ids.pin_memory(), self.labels.pin_memory(), self.position_ids.pin_memory())

    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass(frozen=True)
class Fitted:
    """A split's samples fitted to seq_len (data.overflow) and laid into rows (data.packing)."""

    samples: Samples
    keep: list[tuple[int, int]]  # (sample index, positions it takes: its tokens - 1, truncated to seq_len)
    rows: list[list[int]]  # indices into keep
    counts: dict


def fit(samples: Samples, *, seq_len: int, overflow: str, packing: bool, what: str) -> Fitted:
    """Apply data.overflow to the samples longer than seq_len + 1 tokens, drop those that train nothing, and lay
    the rest into rows: next-fit in data order when packing, else one per row."""
    keep, counts = [], {"samples": len(samples), "dropped_overflow": 0, "truncated": 0, "dropped_no_answer": 0}
    for i in range(len(samples)):
        ids, mask = samples.get(i)
        n = len(ids) - 1
        if n > seq_len:
            if overflow == "refuse":
                raise DataError(f"{samples.names[i]}: {len(ids)} tokens, longer than data.seq_len + 1 = {seq_len + 1} "
                                "(data.overflow=refuse; drop or truncate it, or raise data.seq_len)")
            counts["dropped_overflow" if overflow == "drop" else "truncated"] += 1
            if overflow == "drop":
                continue
            n = seq_len
        if n < 1 or not mask[1:n + 1].any():
            counts["dropped_no_answer"] += 1
            continue
        keep.append((i, n))
    rows, used = [], seq_len
    for k, (_, n) in enumerate(keep):
        if packing and used + n <= seq_len:
            rows[-1].append(k)
            used += n
        else:
            rows.append([k])
            used = n
    trained = sum(int(samples.get(i)[1][1:n + 1].sum()) for i, n in keep)
    real = sum(n for _, n in keep)
    counts |= {"kept": len(keep), "rows": len(rows), "trained_tokens": trained, "context_tokens": real - trained,
               "pad_tokens": len(rows) * seq_len - real}
    if not rows:
        raise DataError(f"{what}: no sample fits data.seq_len={seq_len} with data.overflow={overflow} "
                        f"({counts['dropped_overflow']} too long, {counts['dropped_no_answer']} with no answer left)")
    return Fitted(samples, keep, rows, counts)


def make_batch(fitted: Fitted, rows: list[list[int]], *, seq_len: int, pad_id: int) -> SftBatch:
    """The rows as tensors: each sample's tokens[:-1] as inputs, its trained tokens[1:] as labels."""
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64)  # pads at 0: each its own sequence
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            i, n = fitted.keep[k]
            ids, mask = fitted.samples.get(i)
            ids = ids.astype(np.int64)
            inputs[r, at:at + n] = ids[:n]
            labels[r, at:at + n] = np.where(mask[1:n + 1], ids[1:n + 1], IGNORE)
            positions[r, at:at + n] = np.arange(n)
            at += n
    return SftBatch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(positions))


def window_rows(windows: torch.Tensor) -> SftBatch:
    """Text windows [B, seq_len+1] as rows beside fine-tuning samples (data=mix): every token trained, positions
    0..seq_len-1 (one sequence per row, as the window trains alone)."""
    inputs = windows[:, :-1]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs).contiguous()
    return SftBatch(inputs.contiguous(), windows[:, 1:].contiguous(), positions)


def cat_rows(batches: list[SftBatch]) -> SftBatch:
    return SftBatch(*(torch.cat([getattr(b, k) for b in batches]) for k in ("input_ids", "labels", "position_ids")))


class RowSampler(WindowSampler):
    """WindowSampler's epochs, shuffle and indexing over rows of samples instead of token windows."""

    def __init__(self, fitted: Fitted, *, seq_len: int, seed: int, pad_id: int):
        self.fitted, self.seq_len, self.seed, self.pad_id = fitted, seq_len, seed, pad_id
        self.num_windows = len(fitted.rows)
        self._epoch, self._perm = -1, None

    def windows(self, first: int, count: int) -> SftBatch:
        rows = [self.fitted.rows[self._index(g)] for g in range(first, first + count)]
        return make_batch(self.fitted, rows, seq_len=self.seq_len, pad_id=self.pad_id)


@dataclass
class SftData:
    """RunData's interface (data/mix.py) for fine-tuning samples."""

    cfg: object
    directory: Path
    meta: dict
    train: Samples
    val: Samples
    mixed: bool = False

    def __post_init__(self):
        self.weights = {self.cfg.name: 1.0}
        self._fitted = {}

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def train_tokens(self) -> int:
        return len(self.train.ids)

    @property
    def val_tokens(self) -> int:
        return len(self.val.ids)

    @property
    def num_documents(self) -> int:
        return self.meta["samples"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def fitted(self, part: str, seq_len: int) -> Fitted:
        if (part, seq_len) not in self._fitted:
            self._fitted[part, seq_len] = fit(self.train if part == "train" else self.val, seq_len=seq_len,
                                              overflow=self.cfg.overflow, packing=self.cfg.packing,
                                              what=f"data={self.cfg.source} ({part} split)")
        return self._fitted[part, seq_len]

    def sampler(self, *, seq_len: int, seed: int) -> RowSampler:
        return RowSampler(self.fitted("train", seq_len), seq_len=seq_len, seed=seed, pad_id=self.meta["pad_id"])

    def validation(self, **kwargs) -> dict[str, list]:
        """{the source's name: its validation batches} (the run's data, as RunData.validation)."""
        return {self.cfg.name: self.validation_set(**kwargs)}

    def validation_set(self, *, seq_len: int, batch_size: int, num_batches: int, shard: Shard) -> list[SftBatch]:
        """The first rows of the held-out samples, split evenly across ranks (as loader.validation_batches)."""
        fitted = self.fitted("val", seq_len)
        per_rank = min(num_batches * batch_size, len(fitted.rows) // shard.world)
        if per_rank == 0:
            raise DataError(f"the validation split has {len(fitted.rows)} rows of data.seq_len={seq_len}: fewer "
                            f"than one per rank ({shard.world}); raise data.val_fraction")
        mine = [fitted.rows[i] for i in range(per_rank * shard.world) if i % shard.world == shard.rank]
        return [make_batch(fitted, mine[k:k + batch_size], seq_len=seq_len, pad_id=self.meta["pad_id"])
                for k in range(0, len(mine), batch_size)]

    def evaluate(self, sets: dict[str, list], *, loss_of) -> dict:
        import math

        val_loss = loss_of(next(iter(sets.values())))
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def report(self) -> dict:
        """data_report.json: what was trained on and what was context, dropped, truncated, padding."""
        seq_len = self.cfg.seq_len
        return {"format": self.cfg.source, "train_on": self.cfg.train_on, "packing": self.cfg.packing,
                "overflow": self.cfg.overflow, "seq_len": seq_len,
                "train": self.fitted("train", seq_len).counts, "val": self.fitted("val", seq_len).counts}

    def env(self, sampler, *, samples: int, seq_len: int) -> dict:
        return {"data_fingerprint": self.fingerprint, "data_documents": self.num_documents,
                "train_tokens": self.train_tokens, "val_tokens": self.val_tokens, "vocab_size": self.vocab_size}
