"""Knowledge distillation: a frozen teacher's softened distribution as a second target.

loss = (1 - alpha) CE(student) + alpha T^2 KL(softmax(teacher / T) || softmax(student / T)). The LM loss already
holds CE, so the term added here is alpha (T^2 KL - CE), with that same CE (not a second cross entropy: one
log-softmax of vocab x tokens saved, not two). The teacher is a local Hugging Face model directory that
holds the run's tokenizer (checked), or an effitrain run directory (its latest checkpoint, exported once into
RUN_DIR/export/step-N by local rank 0 at the first step); it runs in eval mode under no_grad, inside the step's
autocast, in the run's parameter dtype, and under FSDP sharded like the student. Its forward FLOPs are reported apart
(`teacher_flops_per_step`, per device): the student's MFU stays the student's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from effitrain.base.converters import ModelConverter
from effitrain.compression.method import GROUP, LOSS, Cost
from effitrain.errors import UsageError
from effitrain.parallel import CONVERTED_MODULES
from effitrain.registry import Need


@GROUP.option("distill", order=LOSS)
@dataclass
class DistillConfig:
    name: str = "distill"
    kind: str = "distill"
    teacher: Optional[str] = None  # a local Hugging Face model directory with the run's tokenizer.json, or a run dir
    alpha: float = 0.5  # loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)
    temperature: float = 2.0


@GROUP.check_of("distill")
def check(node, cfg) -> None:
    if node.teacher is None:
        raise UsageError("compression=distill needs compression.distill.teacher=<local HF model directory or "
                         "effitrain run directory>")
    teacher = Path(node.teacher).expanduser()
    if not ((teacher / "config.json").is_file() or (teacher / ".hydra" / "config.yaml").is_file()):
        raise UsageError(f"compression.distill.teacher={node.teacher}: neither a Hugging Face model directory "
                         "(config.json) nor an effitrain run directory (.hydra/config.yaml)")
    if (teacher / "config.json").is_file():  # damaged or without weights: one line now, not a traceback at step 1
        from effitrain.model import check_hf_dir

        check_hf_dir(teacher, what=f"compression.distill.teacher={node.teacher}")
    if not 0 <= node.alpha <= 1:
        raise UsageError(f"compression.distill.alpha={node.alpha} must lie in [0, 1]")
    if node.temperature <= 0:
        raise UsageError(f"compression.distill.temperature={node.temperature} must be > 0")


GROUP.traits("distill", needs=(
    Need(CONVERTED_MODULES, "the teacher is placed like the student only for these layouts"),))


def check_tokenizer(teacher_dir: Path, run_tokenizer: Path | None) -> None:
    """The teacher must have been trained on the run's token ids: same vocabulary, same merges."""
    theirs = teacher_dir / "tokenizer.json"
    if not theirs.is_file():
        raise UsageError(f"compression.distill.teacher={teacher_dir} has no tokenizer.json: its tokens cannot be "
                         "checked against the run's (copy the tokenizer it was trained with there)")
    if run_tokenizer is None:
        return
    a, b = (_tokenizer_model(p) for p in (theirs, run_tokenizer))
    if a.get("vocab") != b.get("vocab") or a.get("merges") != b.get("merges"):
        raise UsageError(f"compression.distill.teacher={teacher_dir}: its tokenizer.json differs from the run's "
                         f"({run_tokenizer}); teacher and student must share a tokenizer (set data.tokenizer to "
                         "the teacher's tokenizer.json)")


def _tokenizer_model(path: Path) -> dict:
    """The "model" part (vocab, merges) of a tokenizer.json; a damaged one is one DataError line naming it."""
    from effitrain.data import DataError

    try:
        model = json.loads(path.read_bytes())["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if not isinstance(model, dict):
        raise DataError(f"{path} is not a readable tokenizer.json (its \"model\" is not an object)")
    return model


def _exported(run_dir: Path, ctx) -> Path:
    """A run directory's model as an HF directory (ctx.model_dir: exported once, later runs find it): local rank 0
    exports, the node's other ranks wait and read it."""
    from effitrain.base.distributed import barrier

    if ctx.world.local_rank == 0:
        ctx.model_dir(run_dir)
    barrier(ctx.world)
    return ctx.model_dir(run_dir)


class Distill(ModelConverter):
    def __init__(self, *, teacher: str, alpha: float, temperature: float, context):
        self.path, self.alpha, self.t, self.context = Path(teacher).expanduser(), alpha, temperature, context
        check_tokenizer(self.path, context.tokenizer)
        self.teacher = None
        self.flops_per_step = 0.0

    def _load(self):
        """Built at the first step, not at convert(): an export rebuilds the converters and needs no teacher."""
        from effitrain.base.flops import model_flops_per_token
        from effitrain.parallel import GROUP as PARALLEL
        from effitrain.parallel import SHARDS_PARAMS
        from effitrain.parallel.build import apply_parallel

        ctx = self.context
        if not (self.path / "config.json").is_file():
            self.path = _exported(self.path, ctx)
        teacher, sliced = _teacher(self.path, dtype=ctx.precision.param_dtype,
                                   shards=PARALLEL.provides(ctx.parallel, SHARDS_PARAMS))
        if teacher.get_input_embeddings().num_embeddings < ctx.vocab_size:
            raise UsageError(f"compression.distill.teacher has {teacher.get_input_embeddings().num_embeddings} "
                             f"embeddings; the run's tokenizer has {ctx.vocab_size} tokens")
        teacher.requires_grad_(False).eval()
        # forward only: a third of the 6N (+ attention) training FLOPs per token
        self.flops_per_step = model_flops_per_token(teacher, seq_len=ctx.seq_len) / 3 * ctx.tokens_per_step
        if PARALLEL.provides(ctx.parallel, SHARDS_PARAMS):
            return apply_parallel(teacher, cfg=ctx.parallel, job=ctx.job, precision=ctx.precision, init=sliced)
        return teacher.to(ctx.world.device)

    def loss_term(self, *, logits, batch, lm_loss):
        import torch
        import torch.nn.functional as F

        if self.teacher is None:
            self.teacher = self._load()
        s = F.log_softmax(logits.float() / self.t, dim=-1).flatten(0, 1)
        with torch.no_grad():  # no name holds the teacher's logits: freed once divided (one vocab x tokens less)
            t = F.log_softmax(self.teacher(input_ids=batch[:, :-1]).logits[..., :logits.shape[-1]].float() / self.t,
                              dim=-1).flatten(0, 1)
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
        return self.alpha * (self.t ** 2 * kl - lm_loss)

    def metrics(self) -> dict:
        return {"teacher_flops_per_step": self.flops_per_step}


def _teacher(path: Path, *, dtype, shards: bool):
    """The teacher in the run's parameter dtype: under a layout that shards, on the meta device with the SlicedLoad
    that fills each rank's shards once sharded (model/load.py); else, or where it cannot be sliced (said in the log),
    loaded whole."""
    from effitrain.model.build import architecture_on_meta, load_pretrained
    from effitrain.model.load import log, sliced_load

    what = f"compression.distill.teacher={path}"
    if shards:
        teacher = architecture_on_meta(path, what=what, dtype=dtype)
        sliced = sliced_load(teacher, path, what=what)
        if not isinstance(sliced, str):
            return teacher, sliced
        log.info(f"{what}: every rank loads the whole checkpoint ({sliced})")
    return load_pretrained(path, what=what, dtype=dtype), None


@GROUP.builder("distill")
def build(cfg, *, context) -> list[ModelConverter]:
    return [Distill(teacher=cfg.teacher, alpha=cfg.alpha, temperature=cfg.temperature, context=context)]


def _teacher_params(node, saved_params) -> int:
    """The teacher's parameters (its config.json, or a run directory's saved config: nothing loaded); 0 without."""
    return saved_params(Path(node.teacher).expanduser()) if node.teacher else 0


def _memory(node, inputs) -> dict[str, int]:
    if not inputs.read:
        return {}
    return {
        # beside the student's, sharded like it under FSDP
        "teacher_parameters": math.ceil(inputs.read / inputs.shard) * inputs.param_bytes,
        # kept for backward: the student's and the teacher's log-softmax at temperature T
        "distill_logits": 2 * inputs.vocab * inputs.tokens * 4,
        # while the KL is built (measured peak of a distill step, in its forward): the student's logits, and
        # kl_div's exp(t), t - s and their product
        "distill_loss_transients": 4 * inputs.vocab * inputs.tokens * 4}


def _moments(mem, inputs, step) -> dict[str, int]:
    """Building the KL: the cross entropy's saved log-softmax is there already."""
    if "distill_logits" not in mem:
        return {}
    ce_saved = 4 * inputs.vocab * inputs.tokens
    return {"distill loss": step.static + step.activations + ce_saved + mem["distill_logits"]
            + mem["distill_loss_transients"] + step.at_loss}


GROUP.cost("distill")(Cost(read=_teacher_params, memory=_memory, held=("teacher_parameters",),
                           backward=("distill_logits",), moments=_moments))
