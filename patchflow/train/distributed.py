"""Many processes through PyTorch's own engine: torchrun's environment, DDP or FSDP2, and sharded
checkpoints with torch.distributed.checkpoint (DCP) that resume on a different number of processes.

One process (no WORLD_SIZE, or 1) needs none of this and gets the plain model back.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, d: Dist, param_dtype: torch.dtype | None = None,
         frozen: bool = False) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every block, then the root). param_dtype (FSDP only): the dtype weights
    are gathered and computed in; the sharded master weights, gradients and AdamW states stay fp32. frozen (DDP):
    the parameters that do not train are left out of DDP's start-up broadcast (every process read the same base;
    an int8 base cannot be broadcast)."""
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if frozen:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [n for n, p in model.named_parameters() if not p.requires_grad])
        ids = [d.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise ValueError(f"train.parallel = \"fsdp\" needs FSDP2 (torch >= 2.6); this is torch "
                             f"{torch.__version__}: use \"ddp\" or upgrade torch") from None

        # inputs keep their dtype: timesteps (0..999) and the fp32 residual stream must not be rounded to bf16;
        # autocast still casts what each matmul needs
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in getattr(model, "blocks", ()):  # transformers shard per block; a codec's autoencoder as one
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    raise ValueError(f"unknown train.parallel {strategy!r}; choose 'ddp' or 'fsdp'")


@contextmanager
def grad_sync(model: nn.Module, sync: bool):
    """Forward and backward of one micro-batch; with sync=False its gradients only accumulate locally (DDP's
    no_sync, FSDP2's set_requires_gradient_sync), and the next synced backward reduces the sum once."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 shards in place


def mean(value: float, d: Dist, device: torch.device) -> float:
    """Average a float over all processes (losses: each rank holds the mean of its equal share)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / d.world


def total(t: torch.Tensor, d: Dist, device: torch.device) -> torch.Tensor:
    """Sum a tensor over all processes (a copy on t's device; float64 sums stay exact for counts)."""
    if d.world == 1:
        return t
    out = t.to(device)
    dist.all_reduce(out)
    return out.to(t.device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every process if `flag` is True on any, so all processes take the same branch."""
    if d.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(obj, d: Dist):
    """The main process's `obj` (picklable) on every process, so all of them take its decision."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(error: Exception | None, d: Dist) -> Exception | None:
    """A barrier that also spreads failures: this process's error, else the first other process's (an OSError
    keeps its errno, text and path, so every process reports the same message), else None."""
    if d.world == 1:
        return error
    errors: list = [None] * d.world
    dist.all_gather_object(errors, _portable(error, d.rank))
    dist.barrier()  # no process may leave and close the group while another still receives the gather (gloo aborts)
    return error if error is not None else next((e for e in errors if e is not None), None)


def _portable(error: Exception | None, rank: int) -> Exception | None:
    """A plain copy that pickles (exception subclasses with extra arguments may not)."""
    if error is None:
        return None
    if isinstance(error, OSError) and error.errno is not None:
        return OSError(error.errno, error.strerror, error.filename)
    return RuntimeError(f"process {rank}: {type(error).__name__}: {error}")


# ---- sharded checkpoints ---------------------------------------------------------------------------------
def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer as DCP shards: each process writes its own part (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(path)))
    except CheckpointException as e:  # every process gets it (DCP gathers failures): raise the first as itself
        rank = min(e.failures)
        raise _portable(e.failures[rank][0], rank) from None


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of save_sharded on any number of processes (DCP reshards). No pickled code runs: DCP's
    metadata file is read with an unpickler that only builds DCP's own metadata records."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=_safe_load_planner())
    except CheckpointException as e:  # DCP wraps each process's error; show the reason, not the wrapper
        reasons = {str(err).splitlines()[0] for err, _ in e.failures.values()} if hasattr(e, "failures") else {str(e)}
        raise ValueError(f"{path}: cannot load this sharded checkpoint: {'; '.join(sorted(reasons))}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor] | None:
    """Full CPU weights on the main process (None elsewhere); a collective when sharded."""
    if not sharded:
        return {k: v.detach().contiguous().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in sd.items()} if dist.get_rank() == 0 else None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata dataclasses and torch's dtype/size/layout values; anything else is refused."""

    _modules = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        if module in self._modules:
            obj = getattr(__import__(module, fromlist=[name]), name)
            if dataclasses.is_dataclass(obj) or isinstance(obj, type) and issubclass(obj, enum.Enum):
                return obj
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if (module, name) == ("torch.serialization", "_get_layout"):  # maps "torch.strided" to the layout
            from torch.serialization import _get_layout

            return _get_layout
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")):
            return getattr(__import__(module), name)
        raise ValueError(f"refusing to load {module}.{name} from sharded checkpoint metadata "
                         "(only torch.distributed.checkpoint's own records are allowed)")


def _safe_load_planner():
    """DCP's default planner unpickles non-tensor values (optimizer hyperparameters) with weights_only=False;
    this one reads them with weights_only=True, so a tampered shard cannot run code."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"refusing to load {read_item.dest_index.fqn} from a sharded checkpoint: it holds "
                                 f"objects other than tensors and plain values ({str(e).splitlines()[0]})") from None
            value = io.BytesIO()
            torch.save(loaded, value)  # hand the default planner a file that holds only safe objects
            value.seek(0)
            super().load_bytes(read_item, value)

    return Planner()


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: not a complete sharded checkpoint")
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def SafeFileSystemReader(path: str):  # noqa: N802 - reads like the DCP class it stands in for
    return _safe_reader_class()(path)
