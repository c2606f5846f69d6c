"""The shipped model: `effitrain export` (a checkpoint -> a Hugging Face model directory) and `effitrain sample`.

Export needs no GPU and no process group: DCP reads a checkpoint written by any number of ranks (FSDP/TP shards
included) into one process's full tensors. The model is rebuilt from the run's saved config on the CPU with the
run's compression converters (their parameter names are the checkpoint's), loaded, handed to each converter's
`export` (merge adapters, ...), and written in transformers' own layout: GPT-2 goes back to its fused Conv1D
`c_attn`. The directory is written as `<out>.tmp` and renamed when complete.

Quantized models: a QAT run (compression=[qat-int8|qat-int4]) is written with its block Linears quantized to the
bits it trained for; `--quantize int8|int4` quantizes a plain run's model after training (PTQ, the baseline QAT is
measured against) with the same torchao configs. Either loads in plain transformers + torchao.

    config.json  model.safetensors  generation_config.json  tokenizer.json  tokenizer_config.json
    special_tokens_map.json  effitrain.json (the run and step it came from)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from effitrain.errors import UsageError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
QUANTIZE = ("int8", "int4")
DEFAULT_SHARD_SIZE = "5GB"  # safetensors files of at most this size, with an index beyond one, as the Hub's models
DEFAULT_TOKENS = 64  # sample's continuation when --tokens is not given (fewer if the context is shorter)


def export_run(run_dir: Path, *, step: int | None = None, out: Path | None = None, dtype: str = "fp32",
               quantize: str | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE) -> Path:
    """Write RUN_DIR's checkpoint (the latest, or `step`) as a Hugging Face model directory; its path. A model
    larger than `max_shard_size` (e.g. "5GB", "200MB") is written as model-0000k-of-0000n.safetensors files and
    model.safetensors.index.json, as save_pretrained does."""
    import torch

    from effitrain.checkpoint.layout import read_manifest
    from effitrain.compression.qat import write_quantized
    from effitrain.data import tokenizer_specials

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE)}")
    if not re.fullmatch(r"[1-9][0-9]*(KB|MB|GB)", max_shard_size):
        raise UsageError(f"--max-shard-size {max_shard_size}: give a size such as 5GB, 500MB or 200KB")
    cfg, checkpoint, tokenizer = _run_parts(run_dir, step=step)
    manifest = read_manifest(checkpoint)
    out = out or run_dir / "export" / checkpoint.name
    if out.exists():
        raise UsageError(f"--out {out} exists; give a new directory (nothing was written)")
    model, converters = restore_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
    base = _quantization(cfg, converters, quantize)
    if base is not None and dtype != "fp32":
        raise UsageError(f"--dtype {dtype} with a quantized export: its unquantized parts stay fp32; drop --dtype")
    # a QAT run's Linears stay float here (their QAT-trained weights); write_quantized quantizes them on the way out
    model = _export(model, [c for c in converters.converters if base is None or not _is_qat(c)])
    hf = to_transformers(model).to(getattr(torch, DTYPES[dtype]))
    hf.config.use_cache = True  # training turns the KV cache off; generation wants it
    # the tokenizer's own EOS (a pretrained model's, from the tokenizer_config.json the run kept), and the model's own
    # generation_config.json where the run started from one
    eos_ids = hf.config.eos_token_id
    specials = tokenizer_specials(run_dir / "tokenizer.json", tok=tokenizer,
                                  model_eos_id=eos_ids[0] if isinstance(eos_ids, list) and eos_ids else eos_ids)
    _set_generation_config(hf, run_dir, eos_id=specials.eos_id)
    # a directory of this process's own (never `X.tmp` that someone may keep), removed again if the export fails
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        if base is None:
            hf.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        else:
            write_quantized(hf, tmp, base, max_shard_size=max_shard_size)
        _save_tokenizer(run_dir, tmp, max_length=cfg.data.seq_len, eos=specials.eos)
        (tmp / "effitrain.json").write_text(json.dumps({"run_dir": str(run_dir.resolve()), "step": manifest["step"],
                                                        "config_hash": manifest.get("config_hash"), "dtype": dtype,
                                                        "quantized": _quantized_name(cfg, quantize)}))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_dir(path: Path) -> Path:
    """A Hugging Face model directory for `path`: itself, or a run directory's latest checkpoint exported once into
    RUN_DIR/export/step-N (where `effitrain export` puts it) -- what eval and a distillation teacher load."""
    if (path / "config.json").is_file():
        return path
    if (path / ".hydra" / "config.yaml").is_file():
        _, checkpoint, _ = _run_parts(path, step=None)
        out = path / "export" / checkpoint.name
        if (out / "config.json").is_file():
            return out
        logging.getLogger("effitrain").warning(f"{path}: exporting {checkpoint.name} once into {out} (eval and "
                                               "distillation load the Hugging Face directory from there)")
        return export_run(path, out=out)
    raise UsageError(f"{path}: neither an HF model directory (config.json + tokenizer.json) nor a run directory")


def restore_model(cfg, checkpoint: Path, *, vocab_size: int):
    """(model, converters): effitrain's model of the run (CPU, unwrapped) converted by the run's compression methods
    (their modules carry the checkpoint's parameter names; precision's change none), with the checkpoint's weights."""
    from effitrain.base.converters import ConverterChain
    from effitrain.checkpoint.store import load_model_weights
    from effitrain.compression.build import Context, build_compression
    from effitrain.model.build import build_model

    model = build_model(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len)
    context = Context(seed=cfg.seed, vocab_size=vocab_size, seq_len=cfg.data.seq_len)
    converters = ConverterChain(build_compression(cfg.compression, context=context))
    model = converters.convert(model)
    load_model_weights(model, checkpoint)
    return model, converters


def load_trained_model(cfg, checkpoint: Path, *, vocab_size: int):
    """The run's model (CPU, fp32, unwrapped) with the checkpoint's weights, every converter exported."""
    model, converters = restore_model(cfg, checkpoint, vocab_size=vocab_size)
    return _export(model, converters.converters)


def _export(model, converters):
    import torch

    from effitrain.base.converters import ConverterChain

    return ConverterChain(converters).export(model).to(torch.float32).eval()


def _is_qat(converter) -> bool:
    from effitrain.compression.qat import QAT

    return isinstance(converter, QAT)


def _quantization(cfg, converters, quantize: str | None):
    """The torchao config the export quantizes with: a QAT run's own, `--quantize`'s for a plain run, or None."""
    from effitrain.compression.qat import base_config

    qat = [c for c in converters.converters if _is_qat(c)]
    if qat:
        trained_for = _quantized_name(cfg, None)
        if quantize is not None and f"qat-{quantize}" != trained_for:
            raise UsageError(f"--quantize {quantize}: this run trained with compression={trained_for}, so it exports "
                             f"as that; drop --quantize")
        return qat[0].base
    if quantize is None:
        return None
    return base_config("int8", weight_dtype="int8") if quantize == "int8" else base_config("int4")


def _quantized_name(cfg, quantize: str | None) -> str | None:
    """How the export is quantized: 'qat-int8'/'qat-int4' (the run's QAT option), 'ptq-int8'/'ptq-int4', or None."""
    names = [m.name for m in cfg.compression.values() if str(m.name).startswith("qat-")]
    return names[0] if names else (f"ptq-{quantize}" if quantize else None)


def to_transformers(model):
    """A plain transformers model of the same weights (GPT-2: Conv1D layout again)."""
    from transformers import AutoModelForCausalLM

    from effitrain.model.build import transformers_state_dict

    hf = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa")
    hf.load_state_dict(transformers_state_dict(model), strict=True)
    return hf.eval()


def sample_text(path: Path, prompt: str, *, chat: bool = False, tokens: int | None = None, temperature: float = 0.0,
                seed: int = 0) -> str:
    """The prompt and a continuation of it by the model of a run directory (its latest checkpoint) or of a
    Hugging Face directory: greedy at temperature 0, else sampled at that temperature.

    chat: `prompt` is a user message: it is formatted with the tokenizer's own chat template (tokenizer_config.json,
    rendered by transformers' sandboxed Jinja: nothing of the directory runs as code), generation stops at the
    tokenizer's EOS, and the answer alone is returned.
    """
    import torch

    from effitrain.data import tokenizer_specials
    from effitrain.model import check_hf_dir
    from effitrain.model.build import load_pretrained

    if (tokens is not None and tokens < 1) or temperature < 0:
        raise UsageError(f"--tokens {tokens} must be >= 1 and --temperature {temperature} >= 0")
    hf_dir = (path / "config.json").is_file()  # a Hugging Face directory (e.g. one effitrain export wrote)
    tokenizer = _tokenizer(path / "tokenizer.json") if hf_dir else None
    cfg, checkpoint, tokenizer = (None, None, tokenizer) if hf_dir else _run_parts(path, step=None)
    ids = _chat_ids(path, tokenizer, prompt) if chat else _prompt_ids(tokenizer, prompt)
    if hf_dir:
        config = check_hf_dir(path, what=str(path))
        tokens = _new_tokens(config, prompt=len(ids), tokens=tokens)  # before loading
        model = load_pretrained(path, what=str(path), dtype=torch.float32).eval()
    else:
        model = load_trained_model(cfg, checkpoint, vocab_size=tokenizer.get_vocab_size())
        config = model.config.to_dict()
        tokens = _new_tokens(config, prompt=len(ids), tokens=tokens)
    eos = config.get("eos_token_id")
    specials = tokenizer_specials(path / "tokenizer.json", tok=tokenizer,
                                  model_eos_id=eos[0] if isinstance(eos, list) and eos else eos)
    stop = {"eos_token_id": specials.eos_id} if chat else {}  # plain text continues as the model's config says
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                             pad_token_id=specials.eos_id, **stop)
    new = out[0, len(ids):].tolist()
    if chat:  # the answer, without the EOS that ended it
        return tokenizer.decode(new[:new.index(specials.eos_id)] if specials.eos_id in new else new)
    return tokenizer.decode(out[0].tolist())


def _chat_ids(path: Path, tokenizer, message: str) -> list[int]:
    """A user message formatted by the chat template of the tokenizer at `path` (HF dir or run dir), the assistant's
    turn opened: the token ids."""
    from transformers import PreTrainedTokenizerFast

    config, jinja = path / "tokenizer_config.json", path / "chat_template.jinja"
    # the template a chat fine-tuning rendered with (a run's, or its export's: transformers reads that file too)
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else \
        json.loads(config.read_bytes()).get("chat_template") if config.is_file() else None
    if not template:
        raise UsageError(f"--chat: the tokenizer of {path} has no chat template (no chat_template.jinja, no "
                         "chat_template in tokenizer_config.json); give a plain PROMPT instead")
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    text = tok.apply_chat_template([{"role": "user", "content": message}], chat_template=template, tokenize=False,
                                   add_generation_prompt=True)
    return _prompt_ids(tokenizer, text)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UsageError("the prompt is empty after tokenization; give some text")
    return ids


def _new_tokens(config: dict, *, prompt: int, tokens: int | None) -> int:
    """How many tokens to generate: --tokens, or by default DEFAULT_TOKENS cut to what fits the model's context.
    A --tokens past the context is refused, not clamped: past its trained positions a model's text is noise (GPT-2
    has no position embedding there at all), and a silently shorter answer would hide that it could not be met."""
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if context is None:  # a family without a fixed context: as asked
        return tokens or DEFAULT_TOKENS
    if prompt >= context:
        raise UsageError(f"the prompt is {prompt} tokens; the model's context is {context}: shorten the prompt")
    if tokens is None:
        return min(DEFAULT_TOKENS, context - prompt)
    if prompt + tokens > context:
        raise UsageError(f"--tokens {tokens} with a {prompt}-token prompt exceeds the model's context of {context} "
                         f"tokens; give --tokens {context - prompt} or fewer")
    return tokens


def _run_parts(run_dir: Path, *, step: int | None):
    """(config, checkpoint dir, tokenizer) of a run directory: checkpoint `step`, or the run's newest own checkpoint
    whose every checksum verifies (a newer one that does not is named in a warning)."""
    from effitrain.checkpoint.layout import CheckpointError, default_root, newest_verified, resolve
    from effitrain.received import load_run_config
    from effitrain.rundir import run_id

    # nothing is launched from here (the model is read from its checkpoint, which loads without running code): a
    # rendezvous or cache elsewhere in the config is never reached, so it needs no confirmation
    cfg = load_run_config(run_dir, allow_external=True)
    if cfg.checkpoint.kind == "off":
        raise UsageError(f"{run_dir} was trained with checkpoint=off: it saved no model to export")
    tokenizer = _tokenizer(run_dir / "tokenizer.json")  # the cheap check first: before any checkpoint is hashed
    root = default_root(run_dir, cfg.checkpoint.dir)
    if step is not None:
        return cfg, resolve(root, step=step), tokenizer
    checkpoint, passed = newest_verified(root, run_id(run_dir), deep=True)
    if checkpoint is None:
        raise CheckpointError(f"{passed[0]}; and no earlier checkpoint of this run in {root} verifies" if passed
                              else f"{root} holds no complete checkpoint (step-N/ with manifest.json)")
    if passed:
        logging.getLogger("effitrain").warning(f"{passed[0]}; using {checkpoint.name}, the newest checkpoint of "
                                               f"{run_dir} that verifies")
    return cfg, checkpoint, tokenizer


def _tokenizer(path: Path):
    from effitrain.data import read_tokenizer

    if not path.is_file():
        raise UsageError(f"{path.parent} has no tokenizer.json (runs save theirs at start)")
    return read_tokenizer(path)


def _set_generation_config(hf, run_dir: Path, *, eos_id: int) -> None:
    """The export's generation config: the one the run's tokenizer came with (a model.pretrained checkpoint's
    generation_config.json, kept in the run directory), else EOS/BOS/pad = the tokenizer's EOS."""
    from transformers import GenerationConfig

    if (run_dir / "generation_config.json").is_file():
        hf.generation_config = GenerationConfig.from_pretrained(run_dir, local_files_only=True)
        if hf.generation_config.eos_token_id is None:
            hf.generation_config.eos_token_id = eos_id
        hf.generation_config.use_cache = True
    else:
        hf.generation_config.update(eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id, use_cache=True)


def _save_tokenizer(run_dir: Path, out: Path, *, max_length: int, eos: str) -> None:
    """tokenizer.json + tokenizer_config.json (+ special tokens) as transformers' AutoTokenizer reads them: a given
    tokenizer's own files as they were (chat template, special tokens, BOS/EOS behaviour), byte for byte; for the BPE
    effitrain trained, a config naming its <|endoftext|> as EOS, BOS, unk and pad; and the chat template a chat
    fine-tuning rendered with (chat_template.jinja)."""
    from transformers import PreTrainedTokenizerFast

    if (run_dir / "tokenizer_config.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out / name)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(run_dir / "tokenizer.json"), eos_token=eos, bos_token=eos,
                                      unk_token=eos, pad_token=eos, model_max_length=max_length)
        tok.save_pretrained(out)
    if (run_dir / "chat_template.jinja").is_file():  # what a chat fine-tuning rendered with; AutoTokenizer reads it
        shutil.copyfile(run_dir / "chat_template.jinja", out / "chat_template.jinja")
