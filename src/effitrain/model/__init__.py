"""The `model` group: causal LMs from transformers configs (family llama or gpt2), built locally, no download.

Schemas and checks here (no torch); builders in `effitrain.model.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from effitrain.errors import UsageError
from effitrain.registry import Group

GROUP = Group("model", key="family", builders="effitrain.model.build")
PRETRAINED = "pretrained"  # trait: the model starts from a local checkpoint's trained weights
TP_PLAN = "tp_plan"  # trait: the family has a tensor-parallel plan for its blocks (parallel/build.py)


class ModelError(UsageError):
    """Bad model input: reported as one line, exit code 2."""


@dataclass
class ModelBase:
    name: str = "tiny"
    family: str = "llama"
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: Optional[int] = None  # MLP width; None = the family's default (4 x hidden_size)
    tie_embeddings: bool = True  # share input embedding and LM head weights
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    pretrained: Optional[str] = None  # local HF checkpoint directory; never downloads
    # model.pretrained under fsdp/hsdp/tp/fsdp-tp: each rank reads only its own shards of the safetensors files
    # (false: every rank loads the whole checkpoint first, as single and ddp do)
    load_shards: bool = True


@GROUP.option("llama")
@dataclass
class LlamaModel(ModelBase):
    family: str = "llama"
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads
    rope_theta: float = 10000.0


@GROUP.option("gpt2")
@dataclass
class GPT2Model(ModelBase):
    family: str = "gpt2"  # learned positions, GELU MLP, LayerNorm with biases


# transformers' tensor-parallel styles that parallel/build.py maps onto torch's DTensor styles; a family whose
# base_model_tp_plan uses another (MoE experts, packed projections...) has no plan here
TP_STYLES = ("colwise", "rowwise", "colwise_gather_output", "rowwise_split_input", "replicated_with_grad_allreduce")


def model_type(cfg) -> str:
    """What the model is: a model.pretrained checkpoint's config.json model_type, else the option's family."""
    if not cfg.pretrained:
        return cfg.family
    return pretrained_config(cfg)["model_type"]


def model_identity(cfg) -> dict:
    """What the model is, for the console and env.json: a model.pretrained checkpoint by its model_type,
    architectures and directory (not the config option's name), else effitrain's option and family."""
    if not cfg.pretrained:
        return {"name": cfg.name, "model_type": cfg.family, "architectures": None, "pretrained": None}
    path = Path(cfg.pretrained).expanduser()
    config = pretrained_config(cfg)
    architectures = config.get("architectures") or None
    name = f"{config['model_type']} ({architectures[0]})" if architectures else config["model_type"]
    return {"name": f"{name} from {path}", "model_type": config["model_type"], "architectures": architectures,
            "pretrained": str(path.resolve())}


def tp_plan_gap(cfg) -> str | None:
    """Why tensor parallelism cannot split the model's blocks, or None when a plan does."""
    config = pretrained_config(cfg) if cfg.pretrained else {}
    return tp_plan_gap_of(model_type(cfg), config)


def tp_plan_gap_of(kind: str, config: dict) -> str | None:
    """Why a model of transformers type `kind` (its config.json as a dict) has no tensor-parallel plan effitrain can
    apply, or None: transformers' own base_model_tp_plan of the family, each style one of TP_STYLES (gpt2: effitrain's
    plan of its linearised layout, transformers has none). A mixture-of-experts model is left to expert parallelism:
    the families' TP plans do not cover their experts."""
    if kind == "gpt2":
        return None
    if any(config.get(key) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        return (f"a {kind!r} model's experts are in no tensor-parallel plan (transformers' base_model_tp_plan covers "
                "its attention only; shard its experts with parallel.ep=N instead)")
    return _family_plan_gap(kind, "base_model_tp_plan", TP_STYLES)


def _family_plan_gap(kind: str, plan_name: str, styles: tuple[str, ...]) -> str | None:
    """Why transformers' per-family plan `plan_name` (base_model_tp_plan, base_model_ep_plan) of a `kind` model cannot
    be applied, or None: it exists and uses only `styles`, on decoder layers."""
    from transformers import CONFIG_MAPPING

    plan = getattr(CONFIG_MAPPING[kind], plan_name, None) if kind in CONFIG_MAPPING else None
    if not plan:
        return f"transformers has no {plan_name} for a {kind!r} model"
    odd = sorted({style for pattern, style in plan.items() if style not in styles
                  or not pattern.startswith("layers.*.")})
    if odd:
        return f"the {plan_name} of a {kind!r} model uses styles effitrain does not apply: {', '.join(odd)}"
    return None


# transformers' expert-parallel styles (base_model_ep_plan) that parallel/experts.py applies: experts tensors sharded on
# their expert dim, and the experts module reached through an all-to-all dispatch
EP_STYLES = ("grouped_gemm", "ep_dispatch_experts")


def num_experts(cfg) -> int:
    """Routed experts per mixture-of-experts layer of the model (0 for a dense model): a model.pretrained checkpoint's
    config.json, effitrain's own families are dense."""
    if not cfg.pretrained:
        return 0
    config = pretrained_config(cfg)
    return next((config[key] for key in ("num_experts", "num_local_experts", "n_routed_experts")
                 if isinstance(config.get(key), int) and config[key] > 0), 0)


def ep_plan_gap(cfg) -> str | None:
    """Why expert parallelism cannot shard the model's experts, or None: a mixture-of-experts model whose family's
    transformers base_model_ep_plan uses only EP_STYLES on its decoder layers."""
    kind = model_type(cfg)
    if not num_experts(cfg):
        return f"the model ({kind!r}) is dense: it has no experts to shard"
    gap = _family_plan_gap(kind, "base_model_ep_plan", EP_STYLES)
    if gap:
        return gap
    import importlib.util

    import transformers

    if importlib.util.find_spec("transformers.distributed.expert_parallel") is None:  # the dispatch effitrain runs
        return f"the installed transformers {transformers.__version__} has no transformers.distributed.expert_parallel"
    return None


# transformers families whose pipeline stages effitrain splits: each tested to compose back to the whole model's logits
# (tests/test_pipeline.py). A base_model_pp_plan alone is not enough: a family may act on the embeddings inside its base
# model's forward (granite's embedding multiplier), which every later stage would repeat.
PP_FAMILIES = ("llama", "qwen3", "mistral", "qwen2", "gemma", "gemma3_text", "phi3", "olmo2")


def pp_plan_gap(cfg) -> str | None:
    """Why pipeline parallelism cannot split the model into stages, or None: a dense model of a PP_FAMILIES family
    whose transformers base_model_pp_plan is an embedding, the blocks and a final norm (parallel/pipeline.py reads
    the stage boundaries from it)."""
    from transformers import CONFIG_MAPPING

    kind = model_type(cfg)
    if num_experts(cfg):
        return f"a mixture-of-experts model ({kind!r}) is not split into pipeline stages yet"
    plan = getattr(CONFIG_MAPPING[kind], "base_model_pp_plan", None) if kind in CONFIG_MAPPING else None
    if not plan:
        return f"transformers has no base_model_pp_plan for a {kind!r} model"
    if kind not in PP_FAMILIES or len(plan) != 3:
        return f"pipeline stages are built and tested for {', '.join(PP_FAMILIES)} models only, not {kind!r}"
    return None


def num_layers(cfg) -> tuple[str, int]:
    """The model's decoder blocks, named as the user would see them: model.num_layers, or a model.pretrained
    checkpoint's num_hidden_layers (0 where its config.json has none)."""
    if not cfg.pretrained:
        return "model.num_layers", cfg.num_layers
    config = pretrained_config(cfg)
    return "model.pretrained's num_hidden_layers", config.get("num_hidden_layers", 0)


def tied_embeddings(cfg) -> tuple[str, bool]:
    """Whether the LM head shares the input embedding's weight, named as the user would see it: model.tie_embeddings,
    or a model.pretrained checkpoint's tie_word_embeddings (its family's default where config.json has none)."""
    if not cfg.pretrained:
        return "model.tie_embeddings", cfg.tie_embeddings
    from transformers import CONFIG_MAPPING

    config = pretrained_config(cfg)
    kind = config["model_type"]
    default = getattr(CONFIG_MAPPING[kind](), "tie_word_embeddings", True) if kind in CONFIG_MAPPING else True
    return "model.pretrained's tie_word_embeddings", bool(config.get("tie_word_embeddings", default))


def _provides(cfg, _run) -> list[str]:
    return [*([TP_PLAN] if tp_plan_gap(cfg) is None else []), *([PRETRAINED] if cfg.pretrained else [])]


GROUP.traits("llama", provides=_provides)
GROUP.traits("gpt2", provides=_provides)


# what transformers' from_pretrained reads weights from (single file or sharded index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@GROUP.checks
def check(cfg) -> None:
    for key in ("hidden_size", "num_heads", "num_layers"):
        if cfg[key] <= 0:
            raise UsageError(f"model.{key}={cfg[key]} must be a positive integer")
    if cfg.intermediate_size is not None and cfg.intermediate_size <= 0:
        raise UsageError(f"model.intermediate_size={cfg.intermediate_size} must be a positive integer (or null: "
                         "the family's default, 4 x hidden_size)")
    if cfg.hidden_size % cfg.num_heads:
        raise UsageError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    if cfg.family == "llama" and cfg.num_kv_heads is not None and cfg.num_kv_heads < 0:
        raise UsageError(f"model.num_kv_heads={cfg.num_kv_heads} must be a positive integer (or null: num_heads)")
    if cfg.family == "llama" and cfg.num_kv_heads and cfg.num_heads % cfg.num_kv_heads:
        raise UsageError(f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads={cfg.num_kv_heads}")
    if cfg.pretrained:
        pretrained_config(cfg)


@GROUP.check_of("llama")
@GROUP.check_of("gpt2")
def check_pretrained_vocab(cfg, run) -> None:
    """A model.pretrained checkpoint has an embedding row for every token of the run's tokenizer (data.tokenizer: by
    default its own tokenizer.json, data.run_data_config): found here, one line before any worker starts."""
    from effitrain.data import read_tokenizer, run_data_config, tokenizer_specials

    tokenizer = run_data_config(run).tokenizer
    if not (cfg.pretrained and tokenizer):
        return
    what = f"data.tokenizer={tokenizer}" if run.data.tokenizer else f"the tokenizer of model.pretrained ({tokenizer})"
    tok = read_tokenizer(Path(tokenizer).expanduser(), what=what)
    tokenizer_specials(Path(tokenizer).expanduser(), what=what, tok=tok)  # its EOS: one line when it has none
    embeddings = pretrained_config(cfg).get("vocab_size")
    if isinstance(embeddings, int) and tok.get_vocab_size() > embeddings:
        fix = "give the model's own tokenizer" if run.data.tokenizer else \
            "set data.tokenizer to the tokenizer the model was trained with"
        raise ModelError(f"model.pretrained={cfg.pretrained} has {embeddings} embeddings but {what} has "
                         f"{tok.get_vocab_size()} tokens: {fix} (effitrain adds no token to it)")


def pretrained_config(cfg) -> dict:
    """The config.json of the `model` group's model.pretrained directory, checked (check_hf_dir)."""
    return check_hf_dir(Path(cfg.pretrained).expanduser(), what=f"model.pretrained={cfg.pretrained}")


def check_hf_dir(path: Path, *, what: str) -> dict:
    """A local Hugging Face model directory that from_pretrained can read: a config.json that parses and a weights
    file; its config. Checked here, before any process starts, so a damaged one is one line and no run directory."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{what}: no config.json there (give a local Hugging Face checkpoint dir)")
    try:
        parsed = json.loads(config.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{what}: {config} is damaged ({e})") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{what}: {config} has no model_type (not a transformers model config)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{what}: no weights file in {path} (expected one of: {', '.join(WEIGHT_FILES)})")
    return parsed


def attention_heads(cfg) -> dict[str, int]:
    """The model's query and key/value head counts, named as the user would set them: model.num_heads (and
    model.num_kv_heads), or a model.pretrained checkpoint's config.json keys."""
    if not cfg.pretrained:
        return {"model.num_heads": cfg.num_heads, "model.num_kv_heads": kv_heads(cfg)}
    config = pretrained_config(cfg)
    heads = config.get("num_attention_heads") or config.get("n_head")
    out = {"model.pretrained's num_attention_heads": heads,
           "model.pretrained's num_key_value_heads": config.get("num_key_value_heads") or heads}
    return {key: value for key, value in out.items() if isinstance(value, int)}


def kv_heads(cfg) -> int:
    """Key/value heads of the model (gpt2 has none of its own: every head has its k and v)."""
    return (cfg.num_kv_heads or cfg.num_heads) if cfg.family == "llama" else cfg.num_heads
