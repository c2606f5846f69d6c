"""Quantization-aware training with torchao: Linears fake-quantize their weights (and for int8, activations) in
training, so the weights learn to survive rounding; export converts them into real quantized tensors.

torchao 0.18: `quantize_(model, QATConfig(base, step="prepare"))` swaps each nn.Linear for a FakeQuantizedLinear
(parameter names unchanged; it works on the meta device, so the seeded init and FSDP see the same weights) and
`step="convert"` turns them into `base`'s quantized layout. Both bases used here prepare, train, convert and run on
the CPU; Int4WeightOnlyConfig's convert is not used since it needs a CUDA-only kernel package. The LM head (tied to
the embedding by default) and the embeddings stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import FAKE_QUANTIZES, GROUP, MASKS, WEIGHTS, Cost
from effitrain.errors import UsageError
from effitrain.parallel import CONVERTED_MODULES
from effitrain.precision import REPLACES_LINEARS
from effitrain.registry import Need


@dataclass
class QATBase:
    name: str = "qat-int8"
    kind: str = "qat_int8"
    start_step: int = 0  # optimizer steps trained in full precision before fake quantization starts


@GROUP.option("qat_int8", order=WEIGHTS)
@dataclass
class QATInt8(QATBase):
    weight_dtype: str = "int8"  # int8 (per output channel) or int4 (per group of group_size)
    group_size: int = 32  # used only by weight_dtype=int4


@GROUP.option("qat_int4", order=WEIGHTS + 1)
@dataclass
class QATInt4(QATBase):
    name: str = "qat-int4"
    kind: str = "qat_int4"
    group_size: int = 32  # int4 weight-only, one scale per group of input channels


def check(node, cfg) -> None:
    k = f"compression.{node.kind}"
    if node.group_size <= 0:
        raise UsageError(f"{k}.group_size={node.group_size} must be a positive integer")
    if node.start_step < 0:
        raise UsageError(f"{k}.start_step={node.start_step} must be >= 0")
    if "weight_dtype" in node and node.weight_dtype not in ("int8", "int4"):
        raise UsageError(f"{k}.weight_dtype={node.weight_dtype!r} is not one of: int8, int4")
    if node.start_step >= cfg.max_steps:
        raise UsageError(f"{k}.start_step={node.start_step} is not before max_steps={cfg.max_steps}: the run would "
                         "never fake-quantize")


_TRAITS = dict(provides=(FAKE_QUANTIZES,), needs=(
    Need(CONVERTED_MODULES, "the TP plans do not cover torchao's fake-quantized Linears"),
), excludes=(
    Need(FAKE_QUANTIZES, "a weight has one quantization"),
    Need(MASKS, "QAT's fake-quantizers and the masks fight over the same weights"),
    Need(REPLACES_LINEARS, "both replace the Linears: use precision=bf16 with QAT"),
))
for _kind in ("qat_int8", "qat_int4"):
    GROUP.check_of(_kind)(check)
    GROUP.traits(_kind, **_TRAITS)


def base_config(kind: str, *, weight_dtype: str = "int4", group_size: int = 32):
    """The torchao post-training config a QAT option (or `export --quantize`) targets."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if kind == "int8":  # int8 dynamic activations, int8 per-channel or int4 per-group weights
        granularity = PerAxis(0) if weight_dtype == "int8" else PerGroup(group_size)
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, weight_dtype),
                                                     weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def in_blocks(module, fqn: str) -> bool:
    """torchao's filter: the Linears of the transformer blocks (not the LM head)."""
    from torch import nn

    return isinstance(module, nn.Linear) and fqn != "lm_head" and not fqn.endswith(".lm_head")


def quantize(model, config):
    """Post-training quantization of the block Linears (the PTQ baseline, and QAT's convert)."""
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=in_blocks)
    return model


class QAT(ModelConverter):
    """Fake quantization from optimizer step `start_step` + 1 on (torchtune's fake_quant_after_n_steps): the first
    steps train in full precision, which the fake-quantized rest then adapts to rounding."""

    def __init__(self, base, *, start_step: int = 0):
        self.base, self.start_step, self.step = base, start_step, 0

    def convert(self, model):
        from torchao.quantization.qat import QATConfig

        model = quantize(model, QATConfig(self.base, step="prepare"))
        _fake_quant(model, self.step >= self.start_step)
        return model

    def post_optimizer_hook(self, model) -> None:
        self.step += 1
        if self.step == self.start_step:
            _fake_quant(model, True)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict, model) -> None:
        self.step = state["step"]
        _fake_quant(model, self.step >= self.start_step)

    def export(self, model):
        from torchao.quantization.qat import QATConfig

        return quantize(model, QATConfig(self.base, step="convert"))


def _fake_quant(model, on: bool) -> None:
    from torchao.quantization.qat.linear import FakeQuantizedLinear, enable_linear_fake_quant

    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear):
            enable_linear_fake_quant(module, enabled=on)


@GROUP.builder("qat_int8")
def build_int8(cfg, *, context) -> list[ModelConverter]:
    return [QAT(base_config("int8", weight_dtype=cfg.weight_dtype, group_size=cfg.group_size),
                start_step=cfg.start_step)]


@GROUP.builder("qat_int4")
def build_int4(cfg, *, context) -> list[ModelConverter]:
    return [QAT(base_config("int4", group_size=cfg.group_size), start_step=cfg.start_step)]


# nothing to count: the fake-quantized weight copies live one Linear at a time (each forward fake-quantizes its
# weight, uses it and drops it), well under the other items of a step, and the weights themselves stay as they are
GROUP.cost("qat_int8")(Cost())
GROUP.cost("qat_int4")(Cost())


def write_quantized(model, out, base, *, max_shard_size: str = "5GB") -> None:
    """`model` as a Hugging Face directory whose block Linears are quantized with `base` (QAT's export, or PTQ of a
    plain model), loadable by plain transformers + torchao (`AutoModelForCausalLM.from_pretrained(out)`).

    A model holding torchao tensors cannot go through save_pretrained by itself (transformers 5.24: "invalid python
    storage"); transformers writes them when it quantized the model itself through a TorchAoConfig. So the float
    weights (QAT-trained: the fake-quantized Linears keep their names) are written first, then loaded back with the
    same quantization and written again. The tokenizer is the caller's to copy.
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quant = TorchAoConfig(quant_type=base, modules_to_not_convert=["lm_head"])
        quantized = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, quantization_config=quant,
                                                         dtype=torch.float32)
    quantized.save_pretrained(out, max_shard_size=max_shard_size)
