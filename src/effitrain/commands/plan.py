"""`effitrain plan`: from a compute budget to a compute-optimal model size and token count (Chinchilla), the loss
to expect, and a ready `effitrain train` command; optionally with the inference the model will serve.

The scaling law is Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), training FLOPs C = 6ND:

- `approach1` (default): the compute-optimal frontier of their approaches 1 and 2, N and D both ~ C^0.5 at about
  20 tokens per parameter: N = sqrt(C / 120), D = 20 N. It reproduces the paper's table 3 of compute-optimal sizes
  within 10% (tests/test_plan.py; worst: 67B's tokens, -7%).
- `approach3`: the parametric fit L(N, D) = E + A / N^alpha + B / D^beta with E = 1.69, A = 406.4, B = 410.7,
  alpha = 0.34, beta = 0.28 (their eq. 10), minimised on 6ND = C in closed form: N = G (C/6)^(beta/(alpha+beta)),
  D = (C/6)^(alpha/(alpha+beta)) / G, G = (alpha A / (beta B))^(1/(alpha+beta)).

The expected loss is approach 3's L(N, D): nats per token on the paper's MassiveText data and tokenizer, a guide to
shape, not a promise for another corpus. With inference (`inference_tokens` T, Sardana et al. 2023, "Beyond
Chinchilla-Optimal"), the model that reaches the same loss with the least training + inference compute
6ND + 2NT is found on approach 3's L (as they do): smaller and trained longer than the compute-optimal one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from effitrain.errors import UsageError

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28  # Hoffmann et al. 2022, eq. 10 (approach 3)
TOKENS_PER_PARAM = 20  # approaches 1 and 2 (table 3)
FITS = ("approach1", "approach3")
MICRO_TOKENS = 16384  # tokens per device per micro-step in the suggested command (8 x 2048: fits a 1B model in bf16)


def loss(n: float, d: float) -> float:
    """Approach 3's parametric loss of N parameters trained on D tokens."""
    return E + A / n**ALPHA + B / d**BETA


def compute_optimal(c: float, *, fit: str = "approach1") -> tuple[float, float]:
    """(N, D) minimising the loss for C = 6ND training FLOPs under `fit`."""
    if fit == "approach1":
        n = math.sqrt(c / (6 * TOKENS_PER_PARAM))
        return n, TOKENS_PER_PARAM * n
    if fit == "approach3":
        g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
        n = g * (c / 6) ** (BETA / (ALPHA + BETA))
        return n, c / (6 * n)
    raise UsageError(f"--fit {fit!r} is not one of: {', '.join(FITS)}")


def tokens_for_loss(n: float, target: float) -> float:
    """Tokens D for which an N-parameter model reaches `target` under approach 3 (inf if it never does)."""
    gap = target - E - A / n**ALPHA
    return (B / gap) ** (1 / BETA) if gap > 0 else math.inf


def inference_optimal(c: float, inference_tokens: float, *, per_token: float = 2.0) -> tuple[float, float]:
    """(N, D) reaching the loss of approach 3's compute-optimal model for C with the least 6ND + kNT, k = `per_token`
    (2: the forward's FLOPs, Sardana et al. 2023; a measured serving cost gives its own), by a golden-section search
    on log N (the total is unimodal in N along the loss level)."""
    n0, d0 = compute_optimal(c, fit="approach3")
    target = loss(n0, d0)
    n_min = (A / (target - E)) ** (1 / ALPHA)  # below this size the loss is out of reach
    total = lambda log_n: 6 * math.exp(log_n) * tokens_for_loss(math.exp(log_n), target) + \
        per_token * math.exp(log_n) * inference_tokens  # noqa: E731
    lo, hi = math.log(n_min * (1 + 1e-9)), math.log(n0 * 1.000001)  # inference only ever shrinks the model
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if total(m1) < total(m2):
            hi = m2
        else:
            lo = m1
    n = math.exp((lo + hi) / 2)
    return n, tokens_for_loss(n, target)


def budget_flops(*, flops: float | None, gpus: int | None, gpu: str | None, hours: float | None, mfu: float,
                 dtype: str = "bfloat16") -> tuple[float, str]:
    """(C, how it was reached): given, or GPUs x datasheet peak x hours x MFU."""
    if flops is not None:
        if gpus or gpu or hours:
            raise UsageError("give either --flops C or --gpus N --gpu NAME --hours H, not both")
        return flops, "given (--flops)"
    if not (gpus and gpu and hours):
        raise UsageError("plan needs a budget: --flops C, or --gpus N --gpu NAME --hours H [--mfu 0.4]")
    from effitrain.base.flops import table_peak  # torch is imported with it: only on this path

    peak = table_peak(gpu.upper(), dtype)
    if peak is None:
        raise UsageError(f"--gpu {gpu}: no datasheet {dtype} peak (known: H200, H100, A100, L4, V100)")
    return gpus * peak * hours * 3600 * mfu, (f"{gpus} x {gpu.upper()} at {peak / 1e12:.1f} TFLOP/s ({dtype}) x "
                                            f"{hours:g} h x MFU {mfu:g}")


@dataclass
class ModelChoice:
    hidden_size: int
    num_layers: int
    num_heads: int
    params: int


def llama_params(d: int, layers: int, vocab: int) -> int:
    """Parameters of an effitrain llama (tied embeddings, MLP width 4d, no GQA)."""
    return vocab * d + layers * (16 * d * d + 2 * d) + d


def nearest_llama(n: float, *, vocab: int) -> ModelChoice:
    """The effitrain llama shape nearest N parameters: head dim 64 (32 for small widths), width/depth between 32
    and 128 (Kaplan et al. 2020 find the loss flat across that range), the closest count, then the aspect nearest 64."""
    best = None
    for layers in range(1, 129):
        for d in range(32, 16385, 32):
            aspect, head_dim = d / layers, 64 if d >= 512 else 32
            if not 16 <= aspect <= 128 or d % head_dim:
                continue
            count = llama_params(d, layers, vocab)
            key = (round(abs(math.log(count / n)), 2), abs(math.log(aspect / 64)))
            if best is None or key < best[0]:
                best = (key, ModelChoice(d, layers, d // head_dim, count))
    return best[1]


@dataclass
class Plan:
    budget_flops: float
    budget_source: str
    fit: str
    params: float
    tokens: float
    expected_loss: float
    model: dict
    vocab: int
    train_tokens: int
    seq_len: int
    batch_size: int
    grad_accum_steps: int
    max_steps: int
    gpus: int
    command: str
    inference: dict | None

    def as_dict(self) -> dict:
        return asdict(self)


def serving_basis(serve_cost: dict | None, *, mfu: float) -> dict:
    """What an inference token costs, in training-FLOP equivalents per parameter: 2 (the forward's FLOPs) assumed,
    or measured from a `serve-cost --out` JSON -- its first model's serving MFU (2N x decode tokens/s over the
    device's peak) against the training MFU: a token served at a tenth of training's MFU costs ten times its FLOPs
    of the training budget's device time. The measured MFU is taken to hold at every size (stated in the plan)."""
    if serve_cost is None:
        return {"per_token": 2.0, "basis": "assumed: 2N FLOPs per inference token (the forward), at training's MFU"}
    model = serve_cost["models"][0]
    per_token = 2.0 * mfu / model["serve_mfu"]
    return {"per_token": per_token, "basis": f"measured: {model['model']} served at MFU {model['serve_mfu']:.3g} "
            f"({model['decode_tokens_per_s_total']:.4g} tokens/s, {model['params']:,} parameters, "
            f"{serve_cost.get('device', '?')}) against training's {mfu:g}: {per_token:.3g}N FLOP-equivalents per "
            "token, the measured MFU taken to hold at every size", "serve_mfu": model["serve_mfu"]}


def make_plan(*, c: float, source: str, fit: str, vocab: int, seq_len: int, gpus: int,
              inference_tokens: float | None, serving: dict | None = None) -> Plan:
    """The plan for C FLOPs: N and D by `fit`, the nearest llama config, and the train command that spends it."""
    n, d = compute_optimal(c, fit=fit)
    choice = nearest_llama(n, vocab=vocab)
    # a global batch of ~1/2000 of the run (at least one sequence per device, at most 4M tokens), a power of two
    batch_tokens = min(max(d / 2000, seq_len * gpus), 2**22)
    global_seqs = max(gpus, 2 ** round(math.log2(batch_tokens / seq_len)))
    per_device = max(1, global_seqs // gpus)
    steps = max(1, round(d / (per_device * gpus * seq_len)))
    # micro-batches of at most MICRO_TOKENS per device; gradient accumulation makes up the rest of the batch
    micro = max(1, min(per_device, MICRO_TOKENS // seq_len))
    while per_device % micro:
        micro -= 1
    launch = "" if gpus == 1 else f" parallel=fsdp launcher.nproc_per_node={gpus}"
    command = (f"effitrain train model=tiny model.name=llama-{_si(choice.params)} "
               f"model.hidden_size={choice.hidden_size} model.num_layers={choice.num_layers} "
               f"model.num_heads={choice.num_heads} model.intermediate_size={4 * choice.hidden_size} "
               f"data.vocab_size={vocab} data.seq_len={seq_len} "
               f"batch_size={micro} grad_accum_steps={per_device // micro} max_steps={steps}{launch} precision=bf16")
    inference = None
    if inference_tokens is not None:
        serving = serving or serving_basis(None, mfu=0.4)
        k = serving["per_token"]
        n3, d3 = compute_optimal(c, fit="approach3")
        ni, di = inference_optimal(c, inference_tokens, per_token=k)
        row = lambda nn, dd: {"params": nn, "tokens": dd, "train_flops": 6 * nn * dd,  # noqa: E731
                              "inference_flops": k * nn * inference_tokens,
                              "total_flops": 6 * nn * dd + k * nn * inference_tokens, "loss": loss(nn, dd)}
        inference = {"inference_tokens": inference_tokens, "fit": "approach3", "serving": serving,
                     "compute_optimal": row(n3, d3), "inference_optimal": row(ni, di)}
    return Plan(budget_flops=c, budget_source=source, fit=fit, params=n, tokens=d, expected_loss=loss(n, d),
                model=asdict(choice), vocab=vocab, train_tokens=steps * per_device * gpus * seq_len, seq_len=seq_len,
                batch_size=micro, grad_accum_steps=per_device // micro, max_steps=steps, gpus=gpus, command=command,
                inference=inference)


def format_plan(p: Plan) -> str:
    fit = ("approach 1/2 (Hoffmann et al. 2022 table 3): N = sqrt(C/120), D = 20 N" if p.fit == "approach1" else
           f"approach 3 (Hoffmann et al. 2022 eq. 10): L = {E} + {A}/N^{ALPHA} + {B}/D^{BETA}, minimised on C = 6ND")
    m = p.model
    lines = [f"budget: {p.budget_flops:.3g} FLOPs ({p.budget_source})", f"fit: {fit}",
             f"compute-optimal: N = {_si(p.params)} parameters, D = {_si(p.tokens)} tokens "
             f"({p.tokens / p.params:.1f} tokens/parameter)",
             f"expected loss: {p.expected_loss:.3f} nats/token (approach 3's L(N, D), on the paper's data and "
             "tokenizer: a guide, not a promise for another corpus)",
             f"nearest effitrain llama: {m['num_layers']} layers x {m['hidden_size']} wide, {m['num_heads']} heads, "
             f"{_si(m['params'])} parameters (vocab {p.vocab})",
             f"run: {p.max_steps:,} steps x {p.batch_size} sequences x {p.grad_accum_steps} accumulation x {p.gpus} "
             f"devices x {p.seq_len} tokens = "
             f"{_si(p.train_tokens)} tokens", "", p.command,
             "(check it fits first: effitrain estimate <the same overrides>)"]
    if p.inference:
        i = p.inference
        k = i["serving"]["per_token"]
        lines += ["", f"with {_si(i['inference_tokens'])} inference tokens (Sardana et al. 2023; same loss, least "
                      f"6ND + {k:.3g}NT, on approach 3's L):", f"  inference cost {i['serving']['basis']}",
                  f"  {'choice':<20}{'N':>10}{'D':>10}{'train FLOPs':>14}{'inference FLOPs':>17}{'total FLOPs':>14}"]
        for name, key in (("compute-optimal", "compute_optimal"), ("inference-optimal", "inference_optimal")):
            r = i[key]
            lines.append(f"  {name:<20}{_si(r['params']):>10}{_si(r['tokens']):>10}{r['train_flops']:>14.3g}"
                         f"{r['inference_flops']:>17.3g}{r['total_flops']:>14.3g}")
        saved = 1 - i["inference_optimal"]["total_flops"] / i["compute_optimal"]["total_flops"]
        lines.append(f"  the inference-optimal model saves {saved:.1%} of total FLOPs at the same loss "
                     f"{i['compute_optimal']['loss']:.3f}")
    return "\n".join(lines)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
