"""`effitrain serve-cost MODEL [MODEL...]`: what a trained, compressed or exported model costs to serve.

MODEL is a Hugging Face directory (what `effitrain export` writes: config.json, weights, tokenizer.json) or a run
directory (its newest verified checkpoint, loaded as `effitrain sample` loads it). For every batch size x prompt
length x generation length x KV cache (static, dynamic) x torch.compile setting it measures, after warm-up, over
`--repeats` greedy generations with the model's EOS suppressed (min_new_tokens = max_new_tokens, so every sequence
is exactly as long as asked):

  - time to first token (the prefill and the first token), median over repeats;
  - decode tokens/s per sequence and in total (batch x per sequence), median, with its coefficient of variation;
  - latency per output token, p50 and p95 over every gap between two tokens of every repeat;
  - end-to-end generated tokens/s (prefill included): what a price per hour is divided by;
  - weights bytes (parameters as stored: torchao's quantized tensors counted by their inner tensors), KV-cache
    bytes by formula (2 x layers x kv_heads x head_dim x tokens x batch x dtype bytes) and as measured on the
    cache generate returned, the process's peak RSS during the configuration, bytes of the weight files on disk.

Beside effitrain's settings, the peer: a plain transformers `generate` loop (dynamic cache, eager, no streamer) on
the same model and settings, timed end to end; the best setting's ratio to it is reported.

Tokens are timed with a streamer: generate hands it each new token as soon as it is chosen (`.cpu()` on it, which
is where a server would send it too). Only the CPU is measured so far: the CUDA path (device memory peaks, 2:4
kernels) has not been run, so `--device cuda` is refused rather than reported unverified.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from effitrain.errors import UsageError

USAGE = ("effitrain serve-cost MODEL [MODEL...] [--batch 1,4] [--prompt 32] [--gen 32] [--repeats 5] "
         "[--dtype fp32|bf16] [--quant none|int8|int4] [--cache static|dynamic|both] [--compile off|on|both] "
         "[--no-baseline] [--price-per-hour P] [--json] [--out FILE.json] [--plot FILE.png] [--device cpu]")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
QUANTS = ("none", "int8", "int4")
CHOICES = {"cache": ("static", "dynamic"), "compile": ("off", "on")}
SEED = 0  # the prompt tokens: the same random ids for every model and setting


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...] = (1,)
    prompts: tuple[int, ...] = (32,)
    gens: tuple[int, ...] = (32,)
    repeats: int = 5
    dtype: str | None = None  # None: as the model is stored (an export's config.json dtype; a run's fp32)
    quant: str = "none"
    caches: tuple[str, ...] = ("static", "dynamic")
    compiles: tuple[str, ...] = ("off",)  # compiling on a CPU costs minutes per shape: asked for, not default
    baseline: bool = True
    price_per_hour: float | None = None


def serve_cost_main(args: list[str]) -> int:
    paths, settings, opts = parse(args)
    check_settings(settings)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the table
    rows, models = [], []
    for path in paths:
        loaded = load_model(path, settings)
        models.append(loaded.info)
        for row in measure_model(loaded, settings):
            rows.append(row)
            if opts.get("json"):
                print(json.dumps(row), flush=True)
    summaries = with_serving_mfu(compare_rows(models, rows))
    if not opts.get("json"):
        print(format_tables(models, rows, summaries, settings))
    if "out" in opts:
        write_json(Path(opts["out"]), settings, rows, summaries)
    if "plot" in opts:
        plot(summaries, Path(opts["plot"]))
    return 0


def parse(args: list[str]) -> tuple[list[Path], Settings, dict]:
    """(models, settings, output options); every option known, every value checked (nothing silently ignored)."""
    flags = {"batch": _ints, "prompt": _ints, "gen": _ints, "repeats": int, "dtype": str, "quant": str, "cache": str,
             "compile": str, "price_per_hour": float, "out": str, "plot": str, "device": str}
    switches = {"json", "no_baseline"}
    values, paths, i = {}, [], 0
    while i < len(args):
        a = args[i]
        name = a[2:].replace("-", "_")
        if not a.startswith("--"):
            paths.append(Path(a).expanduser())
        elif name in switches:
            values[name] = True
        elif name not in flags:
            raise UsageError(f"unknown option {a}; usage: {USAGE}")
        elif i + 1 >= len(args):
            raise UsageError(f"{a} needs a value; usage: {USAGE}")
        else:
            try:
                values[name] = flags[name](args[i + 1])
            except ValueError:
                raise UsageError(f"{a} takes {'a number' if flags[name] is float else 'integers'}, not "
                                 f"{args[i + 1]!r}") from None
            i += 1
        i += 1
    if not paths:
        raise UsageError(f"serve-cost needs a model directory; usage: {USAGE}")
    if len({p.resolve() for p in paths}) < len(paths):  # the rows of a model are found by its path
        raise UsageError("a model directory is given twice; give each once")
    if "out" in values and not Path(values["out"]).expanduser().parent.is_dir():
        raise UsageError(f"--out {values['out']}: its directory does not exist (nothing was measured)")
    if values.pop("device", "cpu") != "cpu":
        raise UsageError("--device: serve-cost measures on the CPU only so far (its CUDA path -- device memory peaks, "
                         "2:4 kernels -- has not been run, so it is not reported); give --device cpu")
    settings = Settings(**{k: v for k, v in {
        "batches": values.get("batch"), "prompts": values.get("prompt"), "gens": values.get("gen"),
        "repeats": values.get("repeats"), "dtype": values.get("dtype"), "quant": values.get("quant"),
        "caches": _choice("cache", values.get("cache")), "compiles": _choice("compile", values.get("compile")),
        "price_per_hour": values.get("price_per_hour")}.items() if v is not None},
        baseline=not values.get("no_baseline", False))
    return paths, settings, {k: values[k] for k in ("json", "out", "plot") if k in values}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _choice(option: str, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if value == "both":
        return CHOICES[option]
    if value not in CHOICES[option]:
        raise UsageError(f"--{option} {value}: choose one of {', '.join(CHOICES[option])}, both")
    return (value,)


def check_settings(s: Settings) -> None:
    for name, values in (("--batch", s.batches), ("--prompt", s.prompts)):
        if not values or min(values) < 1:
            raise UsageError(f"{name} {','.join(map(str, values))}: every value must be >= 1")
    if not s.gens or min(s.gens) < 2:  # decode speed is measured between tokens: it needs two of them
        raise UsageError(f"--gen {','.join(map(str, s.gens))}: every value must be >= 2 (decode is timed between "
                         "generated tokens)")
    if s.repeats < 2:
        raise UsageError(f"--repeats {s.repeats}: give 2 or more (the spread over repeats is reported)")
    if s.dtype is not None and s.dtype not in DTYPES:
        raise UsageError(f"--dtype {s.dtype}: choose one of {', '.join(DTYPES)}")
    if s.quant not in QUANTS:
        raise UsageError(f"--quant {s.quant}: choose one of {', '.join(QUANTS)}")
    if s.price_per_hour is not None and not s.price_per_hour > 0:
        raise UsageError(f"--price-per-hour {s.price_per_hour}: give a positive price per device hour")
    if s.caches == ("dynamic",) and s.compiles == ("on",):
        raise UsageError("--compile on needs --cache static: transformers compiles generation only with a static "
                         "KV cache (a dynamic one changes shape every token)")


# ---------------------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    model: object
    vocab_size: int
    info: dict  # what the rows of this model repeat: name, source, params, bytes, quality


def load_model(path: Path, s: Settings) -> Loaded:
    """The model of an HF directory or a run directory, in the asked dtype, quantized if asked; the lengths and the
    quantization kernel checked before anything heavy is loaded."""
    if (path / "config.json").is_file():
        model, s, info = _load_hf(path, s)
    elif (path / ".hydra" / "config.yaml").is_file():
        model, s, info = _load_run(path, s)
    else:
        raise UsageError(f"{path}: neither a Hugging Face model directory (config.json + tokenizer.json) nor a run "
                         "directory (.hydra/config.yaml)")
    model.eval()
    model.generation_config.use_cache = True
    if s.quant != "none":
        model = quantize(model, s.quant)
        info["quantized"] = f"{s.quant} weight-only (at load)"
    params = sum(p.numel() for p in model.parameters())
    info = {"model": str(path), "params": params, "weights_bytes": weights_bytes(model), "dtype": s.dtype, **info}
    return Loaded(model, model.config.vocab_size, info)


def _load_hf(path: Path, s: Settings):
    import torch

    from effitrain.model import check_hf_dir
    from effitrain.model.build import load_pretrained

    config = check_hf_dir(path, what=str(path))
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"{path}: no tokenizer.json beside config.json (not an effitrain export)")
    prequantized = _prequantized(path, config, s)
    check_context(config, s, what=str(path))
    s = replace(s, dtype=s.dtype or _stored_dtype(config))
    dtype = getattr(torch, DTYPES[s.dtype])
    if s.quant != "none":
        check_kernel(s.quant, dtype=dtype)
    # a quantized export loads as written: torchao tensors, the rest fp32
    model = load_pretrained(path, what=str(path), dtype=torch.float32 if prequantized else dtype)
    quality, source = _export_quality(path, quantized=prequantized or s.quant != "none")
    return model, s, {"quality": quality, "quality_source": source, "disk_bytes": _disk_bytes(path),
                      "quantized": prequantized}


def _load_run(path: Path, s: Settings):
    """A run directory's newest verified checkpoint, as `effitrain sample` loads it."""
    import torch

    from effitrain.engine.export import _run_parts, load_trained_model

    s = replace(s, dtype=s.dtype or "fp32")  # a run's weights are fp32 whatever precision trained them
    dtype = getattr(torch, DTYPES[s.dtype])
    if s.quant != "none":
        check_kernel(s.quant, dtype=dtype)
    cfg, checkpoint, tokenizer = _run_parts(path, step=None)
    model = load_trained_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
    check_context(model.config.to_dict(), s, what=str(path))
    model = model.to(dtype)
    quality, source = _run_quality(path, int(checkpoint.name.split("-")[-1]), quantized=s.quant != "none")
    # a checkpoint is no serving format (optimizer state, shards): its bytes on disk are an export's
    return model, s, {"quality": quality, "quality_source": source, "disk_bytes": None, "quantized": None}


def _stored_dtype(config: dict) -> str:
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    names = {v: k for k, v in DTYPES.items()}
    if stored not in names:
        raise UsageError(f"the model is stored in {stored}; serve-cost measures {', '.join(DTYPES)}: give --dtype")
    return names[stored]


def check_context(config: dict, s: Settings, *, what: str) -> None:
    context = config.get("max_position_embeddings") or config.get("n_positions")
    longest = max(s.prompts) + max(s.gens)
    if context is not None and longest > context:
        raise UsageError(f"--prompt {max(s.prompts)} + --gen {max(s.gens)} = {longest} tokens exceeds {what}'s "
                         f"context of {context} tokens (max_position_embeddings)")


def _prequantized(path: Path, config: dict, s: Settings) -> str | None:
    """The quantization an export was written with ('ptq-int8', 'qat-int4', ...), or None; such a directory is
    measured as written."""
    if "quantization_config" not in config:
        return None
    if s.quant != "none" or s.dtype not in (None, "fp32"):
        raise UsageError(f"{path} is already quantized ({config['quantization_config'].get('quant_type', {})}): it is "
                         "measured as written (its unquantized parts fp32); drop --quant/--dtype")
    named = _read_json(path / "effitrain.json").get("quantized")
    return named or "torchao (config.json)"


def _quant_config(kind: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig()


def check_kernel(kind: str, *, dtype) -> None:
    """torchao weight-only `kind` tried on a small Linear before the model loads -- torchao 0.18 has no CPU kernel
    for Int4WeightOnlyConfig without the mslk package -- so a missing kernel is one line, not a traceback mid-run."""
    import torch
    from torchao.quantization import quantize_

    config = _quant_config(kind)
    probe = torch.nn.Sequential(torch.nn.Linear(128, 128)).to(dtype)
    try:
        quantize_(probe, config)
        with torch.no_grad():
            probe(torch.ones(1, 128, dtype=dtype))
    except (ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--quant {kind}: torchao's {type(config).__name__} has no kernel for {dtype} on the CPU "
                         f"here ({first}); an int4 export (effitrain export --quantize int4) is measured as "
                         "written") from None


def quantize(model, kind: str):
    """torchao weight-only quantization of the block Linears (not the LM head): Int8WeightOnlyConfig (int8 weights
    per channel, activations as they are) or Int4WeightOnlyConfig."""
    from torchao.quantization import quantize_

    from effitrain.compression.qat import in_blocks

    quantize_(model, _quant_config(kind), filter_fn=in_blocks)
    return model


def weights_bytes(model) -> int:
    """Bytes of the parameters as stored (each shared tensor once): a torchao tensor by its inner tensors (the
    int8 data and the scales), a plain one by its elements."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += _tensor_bytes(p)
    return total


def _tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Parameter", "Tensor"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    data = getattr(t, "data", t)
    if data is not t and hasattr(data, "__tensor_flatten__") and type(data).__name__ != "Tensor":
        return _tensor_bytes(data)  # an nn.Parameter wrapping a torchao tensor
    return t.numel() * t.element_size()


def kv_cache_bytes(config, *, batch: int, tokens: int, dtype_bytes: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes: what a cache of `tokens` positions holds."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * tokens * batch * dtype_bytes


def _disk_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors or .bin, shards included)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


def _read_json(path: Path) -> dict:
    from effitrain.runs import read_json

    value = read_json(path, default={})
    return value if isinstance(value, dict) else {}


def _export_quality(path: Path, *, quantized) -> tuple[float | None, str]:
    """The validation loss effitrain.json's run recorded at the exported step (unless the export was quantized
    after training, which changes it)."""
    record = _read_json(path / "effitrain.json")
    if not record.get("run_dir") or record.get("step") is None:
        return None, "none recorded (no effitrain.json naming a run)"
    if quantized and not str(quantized).startswith("qat-"):
        return None, "not measured: quantized after training (effitrain eval measures it)"
    return _run_quality(Path(record["run_dir"]), int(record["step"]), quantized=False)


def _run_quality(run_dir: Path, step: int, *, quantized: bool) -> tuple[float | None, str]:
    from effitrain.runs import read_records

    if quantized:
        return None, "not measured: quantized at load (effitrain eval measures it)"
    if not run_dir.is_dir():
        return None, f"none: the run {run_dir} is not here"
    losses = [r["val_loss"] for r in read_records(run_dir) if r.get("step") == step and "val_loss" in r]
    if not losses:
        return None, f"none: the run recorded no validation loss at step {step}"
    return losses[-1], f"val_loss of {run_dir.name} at step {step}"


# -------------------------------------------------------------------------------------------------------- measuring

class _Clock:
    """A generate streamer that notes when each token arrives: the first put is the prompt, then one per token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def configurations(s: Settings) -> list[dict]:
    """Every batch x prompt x gen x (cache, compile) to measure; compile only with the static cache."""
    pairs = [(c, k) for c in s.caches for k in s.compiles if not (k == "on" and c == "dynamic")]
    return [{"batch": b, "prompt": p, "gen": g, "cache": c, "compile": k}
            for b in s.batches for p in s.prompts for g in s.gens for c, k in pairs]


def measure_model(loaded: Loaded, s: Settings) -> list[dict]:
    """One row per configuration (and per batch x prompt x gen a 'plain generate' baseline row), model info in each."""
    rows = []
    for config in configurations(s):
        rows.append({**loaded.info, **config, **measure(loaded, config, s)})
    if s.baseline:
        for b in s.batches:
            for p in s.prompts:
                for g in s.gens:
                    base = {"batch": b, "prompt": p, "gen": g, "cache": "dynamic", "compile": "off"}
                    rows.append({**loaded.info, **base, "setting": "plain generate", **baseline(loaded, base, s)})
    return with_ratios(rows, s)


def _generate_kwargs(loaded: Loaded, c: dict) -> dict:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, loaded.vocab_size, (c["batch"], c["prompt"]), generator=generator)
    # greedy, and EOS suppressed until gen tokens exist (min_new_tokens): every sequence is exactly gen long
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": c["gen"],
              "min_new_tokens": c["gen"], "do_sample": False, "temperature": None, "top_k": None, "top_p": None,
              "pad_token_id": loaded.model.generation_config.pad_token_id or 0}
    return kwargs


def _run(loaded: Loaded, kwargs: dict, c: dict, *, clock=None, keep_cache: bool = False):
    import torch
    from transformers import CompileConfig

    extra = {}
    if c["cache"] == "static":
        extra["cache_implementation"] = "static"
    if c["compile"] == "on":
        # transformers compiles the decode step (with a static cache) on a GPU by itself; on a CPU only when the
        # compile config says all devices -- a class attribute of CompileConfig, not an argument (transformers 5.25)
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True
        extra["compile_config"] = compile_config
    else:
        extra["disable_compile"] = True
    with torch.no_grad():
        out = loaded.model.generate(**kwargs, **extra, streamer=clock, return_dict_in_generate=keep_cache)
    sequences = out.sequences if keep_cache else out
    expected = (c["batch"], c["prompt"] + c["gen"])
    if tuple(sequences.shape) != expected:  # the fixed length every number here assumes
        raise RuntimeError(f"generate returned {tuple(sequences.shape)}, expected {expected}")
    return out


def measure(loaded: Loaded, c: dict, s: Settings) -> dict:
    kwargs = _generate_kwargs(loaded, c)
    for _ in range(2 if c["compile"] == "on" else 1):  # warm-up (the compile, first-touch allocations): not counted
        _run(loaded, kwargs, c)
    rss_reset()
    ttft, decode, e2e, gaps = [], [], [], []
    for _ in range(s.repeats):
        clock = _Clock()
        start = time.perf_counter()
        out = _run(loaded, kwargs, c, clock=clock, keep_cache=True)
        end = time.perf_counter()
        tokens = clock.times[1:]  # times[0]: the prompt handed to the streamer
        ttft.append(tokens[0] - start)
        decode.append((len(tokens) - 1) / (tokens[-1] - tokens[0]))
        e2e.append(c["batch"] * c["gen"] / (end - start))
        gaps += [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
    # the cache is kept in the dtype activations run in: the embeddings' (never quantized)
    dtype_bytes = loaded.model.get_input_embeddings().weight.element_size()
    return summarize(ttft=ttft, decode=decode, e2e=e2e, gaps=gaps, batch=c["batch"]) | {
        "setting": f"{c['cache']} cache, compile {c['compile']}", "repeats": s.repeats,
        # both caches end holding prompt + gen - 1 positions: the last token is chosen but never fed back (the
        # static cache is sized to that by generate)
        "kv_cache_bytes": kv_cache_bytes(loaded.model.config, batch=c["batch"], tokens=c["prompt"] + c["gen"] - 1,
                                         dtype_bytes=dtype_bytes),
        "kv_cache_bytes_measured": cache_bytes(out.cache),
        "rss_peak_bytes": rss_peak()}


def baseline(loaded: Loaded, c: dict, s: Settings) -> dict:
    """The peer: plain `model.generate` (dynamic cache, eager, no streamer), timed end to end."""
    import torch

    kwargs = _generate_kwargs(loaded, c)
    with torch.no_grad():
        loaded.model.generate(**kwargs)  # warm-up
        times = []
        for _ in range(s.repeats):
            start = time.perf_counter()
            out = loaded.model.generate(**kwargs)
            times.append(time.perf_counter() - start)
    if tuple(out.shape) != (c["batch"], c["prompt"] + c["gen"]):
        raise RuntimeError(f"plain generate returned {tuple(out.shape)}")
    from effitrain.stats import cv

    e2e = [c["batch"] * c["gen"] / t for t in times]
    return {"e2e_tokens_per_s": statistics.median(e2e), "e2e_cv": cv(e2e), "repeats": s.repeats}


def summarize(*, ttft: list[float], decode: list[float], e2e: list[float], gaps: list[float], batch: int) -> dict:
    """Medians over repeats, the latency percentiles over every token gap, and the spread of each (the decode rate's
    also as a 95% interval of its mean)."""
    from effitrain.stats import cv, mean_interval, percentile

    per_seq = statistics.median(decode)
    p50, p95 = percentile(gaps, 50), percentile(gaps, 95)
    mean, half = mean_interval(decode)
    return {"ttft_s": statistics.median(ttft), "ttft_cv": cv(ttft),
            "decode_tokens_per_s_per_seq": per_seq, "decode_tokens_per_s_total": per_seq * batch,
            "decode_cv": cv(decode), "decode_per_seq_mean": mean, "decode_per_seq_ci95": half,
            "token_latency_p50_s": p50, "token_latency_p95_s": p95,
            "latency_p95_over_p50": p95 / p50, "e2e_tokens_per_s": statistics.median(e2e), "e2e_cv": cv(e2e)}


def cache_bytes(cache) -> int | None:
    """Bytes of the K and V tensors a transformers cache holds (its layers' keys and values)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    return sum(t.numel() * t.element_size() for layer in layers for t in (getattr(layer, "keys", None),
                                                                           getattr(layer, "values", None))
               if t is not None and hasattr(t, "numel"))


def rss_reset() -> None:
    """Start a new peak-RSS window: Linux resets VmHWM on `5` in /proc/self/clear_refs (nothing elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_peak() -> int | None:
    """The process's peak resident set since the last rss_reset (Linux VmHWM), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def with_ratios(rows: list[dict], s: Settings) -> list[dict]:
    """Cost per million generated tokens (price / end-to-end tokens per hour), and per batch x prompt x gen the best
    setting (by end-to-end tokens/s) and its ratio to the plain loop."""
    out = []
    for row in rows:
        row = dict(row)
        if s.price_per_hour is not None:
            row["usd_per_million_tokens"] = s.price_per_hour / (row["e2e_tokens_per_s"] * 3600) * 1e6
        out.append(row)
    for key in {(r["batch"], r["prompt"], r["gen"]) for r in out}:
        group = [r for r in out if (r["batch"], r["prompt"], r["gen"]) == key]
        ours = [r for r in group if r["setting"] != "plain generate"]
        plain = [r for r in group if r["setting"] == "plain generate"]
        best = max(ours, key=lambda r: r["e2e_tokens_per_s"])
        best["best"] = True
        if plain:
            for r in ours:
                r["vs_plain_generate"] = r["e2e_tokens_per_s"] / plain[0]["e2e_tokens_per_s"]
    return out


# ------------------------------------------------------------------------------------------------ comparing, output

def compare_rows(models: list[dict], rows: list[dict]) -> list[dict]:
    """Per model: its info and its best setting's decode tokens/s (over every configuration measured; every model
    is measured on the same grid), and whether it is on the Pareto front of quality (lower) vs decode tokens/s."""
    out = []
    for info in models:
        ours = [r for r in rows if r["model"] == info["model"] and r["setting"] != "plain generate"]
        best = max(ours, key=lambda r: r["decode_tokens_per_s_total"])
        out.append({**info, "decode_tokens_per_s_total": best["decode_tokens_per_s_total"],
                    "best_setting": f"batch {best['batch']}, {best['setting']}"})
    for row in out:
        row["pareto"] = row["quality"] is not None and not any(_dominates(o, row) for o in out if o is not row)
    return out


def with_serving_mfu(summaries: list[dict]) -> list[dict]:
    """Each model's serving MFU: model FLOPs served (2N per generated token, its best decode rate) over the CPU's
    peak FLOP/s for its dtype (effitrain's cached matmul probe, as training's MFU uses) -- what `effitrain plan
    --serve-cost` weighs inference tokens by."""
    import torch

    from effitrain.base.flops import peak_flops

    out = []
    for m in summaries:
        peak, source = peak_flops(torch.device("cpu"), dtype=DTYPES[m["dtype"]], autocast_dtype=None)
        served = 2 * m["params"] * m["decode_tokens_per_s_total"]
        out.append({**m, "serve_flops_per_s": served, "peak_flops": peak, "peak_flops_source": source,
                    "serve_mfu": served / peak})
    return out


def _dominates(a: dict, b: dict) -> bool:
    if a["quality"] is None:
        return False
    no_worse = a["quality"] <= b["quality"] and a["decode_tokens_per_s_total"] >= b["decode_tokens_per_s_total"]
    return no_worse and (a["quality"] < b["quality"] or a["decode_tokens_per_s_total"] > b["decode_tokens_per_s_total"])


def _mb(value) -> str:
    """Megabytes (10^6 bytes), with as many decimals as a tiny model's kilobytes need."""
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}" if value >= 1e5 else f"{value / 1e6:.4f}"


def format_tables(models: list[dict], rows: list[dict], summaries: list[dict], s: Settings) -> str:
    lines = []
    for info in models:
        lines += ["", f"{info['model']}: {info['params']:,} parameters, {info['dtype']}, quantized "
                      f"{info['quantized'] or 'no'}; weights {_mb(info['weights_bytes'])} MB in memory, "
                      f"{_mb(info['disk_bytes'])} MB on disk; quality {_fmt(info['quality'], '.4f')} "
                      f"({info['quality_source']})", ""]
        price = " | $/M tokens" if s.price_per_hour is not None else ""
        lines += ["| batch | prompt | gen | setting | TTFT ms | decode tok/s/seq | decode tok/s total | "
                  f"latency p50/p95 ms | decode CV | e2e tok/s | vs plain | KV MB | peak RSS MB{price} |",
                  "|" + " --- |" * (13 + bool(price))]
        for r in (r for r in rows if r["model"] == info["model"]):
            plain = r["setting"] == "plain generate"
            cells = [r["batch"], r["prompt"], r["gen"], r["setting"] + (" (best)" if r.get("best") else ""),
                     "-" if plain else f"{1e3 * r['ttft_s']:.1f}",
                     "-" if plain else f"{r['decode_tokens_per_s_per_seq']:.1f}",
                     "-" if plain else f"{r['decode_tokens_per_s_total']:.1f}",
                     "-" if plain else f"{1e3 * r['token_latency_p50_s']:.2f} / {1e3 * r['token_latency_p95_s']:.2f}",
                     "-" if plain else f"{r['decode_cv']:.3f}", f"{r['e2e_tokens_per_s']:.1f}",
                     _fmt(r.get("vs_plain_generate"), ".2f") + ("x" if r.get("vs_plain_generate") else ""),
                     "-" if plain else _mb(r["kv_cache_bytes"]), "-" if plain else _mb(r["rss_peak_bytes"])]
            if price:
                cells.append(f"{r['usd_per_million_tokens']:.3f}")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if "on" in s.compiles and "dynamic" in s.caches:
        lines += ["", "(compile on is measured with the static cache only: transformers compiles generation only with "
                      "it)"]
    if len(summaries) > 1:
        lines += ["", "comparison (decode tok/s: each model's best setting; * = Pareto front of quality vs decode "
                      "tok/s)", "", "| model | quality | disk MB | params | weights MB | decode tok/s | best setting |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in summaries:
            lines.append(f"| {'* ' if r['pareto'] else ''}{r['model']} | {_fmt(r['quality'], '.4f')} | "
                         f"{_mb(r['disk_bytes'])} | {r['params']:,} | {_mb(r['weights_bytes'])} | "
                         f"{r['decode_tokens_per_s_total']:.1f} | {r['best_setting']} |")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_json(path: Path, s: Settings, rows: list[dict], summaries: list[dict]) -> None:
    import platform

    import torch

    from effitrain.files import write_file

    body = {"device": "cpu", "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "settings": dict(s.__dict__),
            "rows": rows, "models": summaries}
    write_file(path, json.dumps(body, indent=1))


def plot(summaries: list[dict], path: Path) -> None:
    """Quality (validation loss, lower is better) against decode tokens/s, the Pareto front joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [r for r in summaries if r["quality"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in placed:
        ax.scatter(r["decode_tokens_per_s_total"], r["quality"], color="tab:red" if r["pareto"] else "tab:blue")
        ax.annotate(Path(r["model"]).name, (r["decode_tokens_per_s_total"], r["quality"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in placed if r["pareto"]), key=lambda r: r["decode_tokens_per_s_total"])
    ax.plot([r["decode_tokens_per_s_total"] for r in front], [r["quality"] for r in front], color="tab:red",
            label="Pareto front")
    missing = [Path(r["model"]).name for r in summaries if r["quality"] is None]
    ax.set_xlabel("decode tokens/s (best setting)")
    ax.set_ylabel("validation loss")
    ax.set_title("quality vs serving speed" + (f"\n(no quality: {', '.join(missing)})" if missing else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
