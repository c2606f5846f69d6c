"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under configs/ fill these dataclasses; because each group is a typed, struct node,
a misspelt key or a value of the wrong type fails at composition, before any process starts.
All defaults live here or in the YAML files -- code reads fields, never `cfg.get(key, default)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore

GROUPS = ("model", "data", "precision", "parallel", "compression", "optimizer", "schedule", "launcher", "logging")


def config_dir() -> Path:
    """The config tree: inside the package for a wheel, ./configs for a source checkout."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def group_options(group: str) -> list[str]:
    """Names of the YAML options of one config group, sorted."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@dataclass
class ModelConfig:
    name: str = "tiny"
    family: str = "llama"  # llama | gpt2: which transformers config class builds it
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads
    intermediate_size: Optional[int] = None  # MLP width; None = the family's default
    tie_embeddings: bool = True  # share input embedding and LM head weights
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    pretrained: Optional[str] = None  # local HF checkpoint directory; never downloads


@dataclass
class DataConfig:
    name: str = "stdlib"
    source: str = "stdlib"  # stdlib | text | jsonl
    paths: List[str] = field(default_factory=list)  # files or directories (text/jsonl)
    field: str = "text"  # jsonl: which key holds the document
    tokenizer: Optional[str] = None  # path to a tokenizer.json; None = train a BPE on the corpus
    vocab_size: int = 4096  # size of the BPE trained on the corpus
    seq_len: int = 128
    val_fraction: float = 0.05  # share of documents held out for validation
    cache_dir: str = "~/.cache/effitrain"
    prefetch: int = 2  # batches prepared ahead by a background thread; 0 = synchronous


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    autocast_dtype: Optional[str] = None  # bfloat16 | float16: autocast compute dtype
    param_dtype: str = "float32"  # dtype the parameters are stored in
    reduce_dtype: str = "float32"  # dtype of gradient reduction (FSDP mixed precision)
    tf32: bool = False  # allow TF32 matmuls on CUDA
    loss_scaling: bool = False  # dynamic loss scaling (fp16)
    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    fp8_recipe: Optional[str] = None  # tensorwise | rowwise (torchao float8)
    fp8_min_features: int = 256  # linear layers smaller than this stay in high precision


@dataclass
class ParallelConfig:
    name: str = "single"
    strategy: str = "single"  # single | ddp | fsdp | hsdp | tp | fsdp-tp
    reshard_after_forward: bool = True  # FSDP: ZeRO-3 (True) or ZeRO-2 (False)
    offload: Optional[str] = None  # FSDP: cpu = keep parameters and optimizer state on the host
    dp_replicate: int = 1  # HSDP replicas
    dp_shard: int = -1  # FSDP shard degree; -1 = whatever the world size leaves
    tp: int = 1  # tensor-parallel degree
    sequence_parallel: bool = False
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2  # selective: checkpoint every k-th block
    compile: bool = False  # torch.compile each transformer block


@dataclass
class CompressionConfig:
    name: str = "none"
    method: str = "none"


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    kind: str = "adamw"  # adamw | adamw-8bit | sgd | adafactor | muon | zero1
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd, muon
    nesterov: bool = False  # sgd, muon
    implementation: str = "auto"  # auto (fused on CUDA, foreach on CPU) | fused | foreach | loop
    no_decay: List[str] = field(default_factory=lambda: ["bias", "norm", "embedding"])


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    kind: str = "cosine"  # cosine | constant | linear | wsd | inverse-sqrt
    warmup_steps: int = 10
    warmup_ratio: Optional[float] = None  # overrides warmup_steps when set
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2  # wsd: share of the post-warmup steps spent decaying
    decay_shape: str = "1-sqrt"  # wsd: linear | cosine | 1-sqrt (transformers' WSD decay types)


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1  # worker processes on this node (one per GPU)
    nnodes: int = 1
    node_rank: int = 0  # informational under c10d rendezvous (ranks are assigned there)
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # host:port of the rendezvous; None = a free local port (one node only)
    rdzv_id: str = "effitrain"  # job id shared by all nodes of one job
    max_restarts: int = 0  # restarts of the whole worker group after a failure
    monitor_interval: float = 0.5  # seconds between the agent's health checks of its workers
    start_method: str = "auto"  # auto | spawn | fork | forkserver: auto = forkserver on CPU, spawn with CUDA


@dataclass
class LoggingConfig:
    every: int = 10  # console metrics line every N steps (metrics.jsonl gets every step)
    progress: bool = True  # rich progress bar with ETA
    tensorboard: bool = False
    warmup_steps: int = 3  # first steps reported but left out of summary medians
    profile: bool = False
    profile_start_step: int = 5
    profile_steps: int = 3


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = "run"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 120
    batch_size: int = 16  # sequences per device per micro-step
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 = measure only
    eval_every: int = 40
    eval_batches: int = 8
    deterministic: bool = False  # torch.use_deterministic_algorithms
    cpu_keep_freed_memory: bool = True  # CPU: freed step memory stays in the heap (glibc), no page faults next step


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
