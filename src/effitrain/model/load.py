"""Load a model.pretrained checkpoint shard by shard (issue 23, item 5).

Under a layout that shards parameters (fsdp, hsdp, tp, fsdp-tp) or splits the model into pipeline stages (pp,
pp-fsdp: a rank keeps its stages' parameters only) the checkpoint's model is built on the meta device like a fresh
one; after sharding, `SlicedLoad` fills each parameter -- this rank's DTensor shard, or a whole
replicated tensor -- with only its own slice of the safetensors files, cast to the parameter's dtype. No rank ever
holds the whole model: its host memory while loading is its shards plus one tensor's slice in flight (each tensor is
read through its own safetensors handle, closed at once, so the memory-mapped pages it touched are let go).

What cannot be sliced is loaded whole on every rank, as single and ddp always do, and the run says why in one line:
a checkpoint with only pytorch_model.bin files, a checkpoint whose names or shapes are not the model's own
(transformers renames or merges them on load: old layouts, MoE experts), persistent buffers, and converters that read
the weights when they convert (LoRA). gpt2 is sliced too: its Conv1D weights ([in, out]) are read transposed into
the model's Linears and each of q, k, v from its columns of the fused c_attn.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effitrain.model import ModelError
from effitrain.model.build import QKV, build_model, canonical_name

log = logging.getLogger("effitrain")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class Source:
    """Where a model parameter's values lie in the checkpoint.

    Args:
        key: the checkpoint tensor's name.
        transposed: stored [in, out] (gpt2's Conv1D) for the model's [out, in] Linear.
        offset: the parameter's first row within the key's tensor, in the model's layout (q, k, v of gpt2's
            fused c_attn lie side by side in its columns).
        fused: the parameter is a part of the key's tensor (one of q, k, v), not all of it.
    """

    key: str
    transposed: bool = False
    offset: int = 0
    fused: bool = False


class Checkpoint:
    """The tensors of a local checkpoint's safetensors files, from their headers alone (no weight is read).

    Args:
        path: the model directory.
        what: how the user named it (`model.pretrained=DIR`), for error lines.
    """

    def __init__(self, path: Path, *, what: str):
        self.path, self.what = path, what
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in self._weight_files():
            for key, shape in _header_shapes(file, fail=self.fail).items():
                self.files[key], self.shapes[key] = file, shape

    @staticmethod
    def has_safetensors(path: Path) -> bool:
        return (path / INDEX).is_file() or (path / SINGLE).is_file()

    def _weight_files(self) -> list[Path]:
        if not (self.path / INDEX).is_file():
            return [self.path / SINGLE]
        try:
            names = sorted(set(json.loads((self.path / INDEX).read_bytes())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise self.fail(f"{INDEX} is damaged ({type(e).__name__}: {e})") from None
        missing = [n for n in names if not (self.path / n).is_file()]
        if missing:
            raise self.fail(f"{INDEX} names {missing[0]}, which is not there")
        return [self.path / n for n in names]

    def fail(self, why: str) -> ModelError:
        return ModelError(f"{self.what}: cannot load the model in {self.path} ({why})")

    def read_into(self, target: torch.Tensor, source: Source, region: tuple[slice, ...]) -> None:
        """Copy the checkpoint's values of `region` (in the model's layout) into `target`, casting to its dtype."""
        from safetensors import SafetensorError, safe_open

        if target.numel() == 0:  # an uneven split can leave a rank no rows
            return
        stored = _stored_region(region, source)
        try:
            # one handle per tensor: closing it unmaps the pages it touched, so they never add up to the whole file
            with safe_open(self.files[source.key], framework="pt") as f:
                piece = f.get_slice(source.key)[stored]
                target.copy_(piece.t() if source.transposed else piece)
                del piece
        except (SafetensorError, OSError, RuntimeError) as e:
            raise self.fail(f"{self.files[source.key].name}: {source.key}: {e}") from None


def _stored_region(region: tuple[slice, ...], source: Source) -> tuple[slice, ...]:
    """The region in the checkpoint's own layout: shifted by the source's offset, then reversed if transposed."""
    if not region:  # a 0-d parameter: nothing to shift
        return region
    first, *rest = region
    shifted = (slice(first.start + source.offset, first.stop + source.offset), *rest)
    return tuple(reversed(shifted)) if source.transposed else shifted


# safetensors' dtypes and their element sizes, to check a header against its file's size
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _header_shapes(file: Path, *, fail) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor shapes from its header; a file cut short or not safetensors is one line."""
    try:
        with file.open("rb") as f:
            size = file.stat().st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("its header runs past the end of the file")
            header = json.loads(f.read(length))
        shapes = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            shapes[key] = tuple(info["shape"])
            end = info["data_offsets"][1]
            if 8 + length + end > size:
                raise ValueError(f"cut short: {key} ends at byte {8 + length + end} of {size}")
            item = _ITEM_BYTES.get(info["dtype"])  # a dtype not listed here is left to safetensors to read
            if item is not None and end - info["data_offsets"][0] != item * _numel(shapes[key]):
                raise ValueError(f"{key}: its bytes do not match its shape and dtype {info['dtype']}")
        return shapes
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise fail(f"{file.name} is not a readable safetensors file: {e}") from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def sources(model: nn.Module) -> dict[str, Source]:
    """Each parameter's Source, by canonical name: the checkpoint's own name, or for a linearised gpt2 the Conv1D or
    fused c_attn it came from."""
    linearised = any(isinstance(m, QKV) for m in model.modules())  # gpt2 as build_model makes it (a teacher is not)
    return {canonical_name(name): _gpt2_source(name, p) if linearised else Source(canonical_name(name))
            for name, p in model.named_parameters()}


def _gpt2_source(name: str, param: nn.Parameter) -> Source:
    """linearise_gpt2's inverse for one parameter: q/k/v from the fused c_attn, Linears from Conv1Ds."""
    name = canonical_name(name)
    if ".attn.c_attn." in name:  # ...c_attn.q_proj.weight -> ...c_attn.weight, columns [i*d, (i+1)*d)
        prefix, proj, kind = name.rsplit(".", 2)
        i = ("q_proj", "k_proj", "v_proj").index(proj)
        return Source(f"{prefix}.{kind}", transposed=kind == "weight", offset=i * param.shape[0],
                      fused=True)
    conv1d = param.dim() == 2 and any(f".{m}.c_" in name for m in ("attn", "mlp"))
    return Source(name, transposed=conv1d)


def plan(model: nn.Module, checkpoint: Checkpoint) -> dict[str, Source] | str:
    """The Sources of a meta-device model's parameters in `checkpoint`, or why it cannot be sliced (then the model
    must be loaded whole, as transformers would: it renames, merges or initialises what does not match)."""
    persistent = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if persistent:
        return f"the model has persistent buffers ({sorted(persistent)[0]}, ...)"
    found = sources(model)
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    for name, source in found.items():
        if source.key not in checkpoint.shapes:
            return f"{source.key} is not in its safetensors files"
        if not _fits(tuple(params[name].shape), source, checkpoint.shapes[source.key]):
            return f"{source.key} has shape {list(checkpoint.shapes[source.key])}, the model's {name} " \
                   f"{list(params[name].shape)}"
    return found


def _fits(shape: tuple[int, ...], source: Source, stored: tuple[int, ...]) -> bool:
    """The parameter is the whole stored tensor, or (a fused one's part) lies inside it."""
    region = _stored_region(tuple(slice(0, s) for s in shape), source)
    if len(region) != len(stored):
        return False
    ends = tuple(r.stop for r in region)
    return all(e <= s for e, s in zip(ends, stored, strict=True)) if source.fused else ends == stored


class SlicedLoad:
    """The `init` of a sharded layout for a checkpoint: each parameter gets this rank's slice of its tensor.

    Args:
        checkpoint: the model directory's safetensors files.
        sources: plan()'s answer for the model as built (before converters; they keep the names).
    """

    def __init__(self, checkpoint: Checkpoint, sources: dict[str, Source]):
        self.checkpoint, self.sources = checkpoint, sources

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            source = self.sources.get(canonical_name(name))
            if source is None:  # a converter added or renamed it: the plan no longer describes this model
                raise ModelError(f"{self.checkpoint.what}: parameter {canonical_name(name)} of the converted model "
                                 "has no tensor in the checkpoint (set model.load_shards=false to load it whole)")
            local, region = _local_region(param)
            self.checkpoint.read_into(local, source, region)


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The tensor this rank holds of `param` and the region of the full parameter it covers."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param, tuple(slice(0, s) for s in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):  # a placement whose local block is not one region (should not happen)
        raise RuntimeError(f"local shard {tuple(local.shape)} is not the region {tuple(shape)} of its placements")
    return local, tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def build_pretrained(cfg, *, vocab_size: int, max_seq_len: int, converters) -> tuple[nn.Module, SlicedLoad | None]:
    """A model.pretrained model for a layout that shards its parameters: its architecture on the meta device and
    the SlicedLoad that fills it after sharding, or -- where it cannot be sliced -- the whole loaded model and None,
    with one line saying why.

    Args:
        cfg: the `model` config group (pretrained set).
        vocab_size, max_seq_len: as build_model takes them.
        converters: the run's ConverterChain (one that reads weights at convert needs them loaded).
    """
    path, what = Path(cfg.pretrained).expanduser(), f"model.pretrained={cfg.pretrained}"
    why = _why_whole(cfg, converters)
    if why is None:
        model = build_model(cfg, vocab_size=vocab_size, max_seq_len=max_seq_len, shards=True)
        sliced = sliced_load(model, path, what=what)
        if not isinstance(sliced, str):
            return model, sliced
        why = sliced
    log.info(f"{what}: every rank loads the whole checkpoint ({why})")
    return build_model(cfg, vocab_size=vocab_size, max_seq_len=max_seq_len), None


def sliced_load(model: nn.Module, path: Path, *, what: str) -> SlicedLoad | str:
    """The SlicedLoad of a meta-device model from the checkpoint in `path` (logged), or why there can be none."""
    if not Checkpoint.has_safetensors(path):
        return "its weights are pytorch_model.bin files, which cannot be read in slices"
    checkpoint = Checkpoint(path, what=what)
    found = plan(model, checkpoint)
    if isinstance(found, str):
        return found
    log.info(f"{what}: each rank reads its own shards of {len(set(checkpoint.files.values()))} safetensors file(s)")
    return SlicedLoad(checkpoint, found)


def _why_whole(cfg, converters) -> str | None:
    """Why the run's options rule slicing out, before anything is built; None when they do not."""
    if not cfg.load_shards:
        return "model.load_shards=false"
    readers = [type(c).__name__ for c in getattr(converters, "converters", [converters]) if c.reads_weights]
    if readers:
        return f"{readers[0]} converts the model from its real weights"
    return None
