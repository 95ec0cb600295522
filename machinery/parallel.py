"""Data parallel DDPO over several processes, launched by torchrun:

    torchrun --nproc-per-node 2 train.py --reward jpeg

Every process holds the same policy and samples its share of each epoch (samples_per_epoch /
world size) with its own seed. The prompts and rewards of all processes are gathered, so the
per-prompt statistics (and the metrics) see the whole epoch, and every process computes the same
advantages and keeps the same tracker. Gradients are averaged across processes before each
optimiser step, so the weights stay identical everywhere. Only rank 0 writes the run folder.
Without torchrun (no WORLD_SIZE in the environment) every function here is the identity.
NCCL on CUDA, gloo on the CPU (the tests run 2 processes that way).
"""

import os

import torch
import torch.distributed as dist

from machinery.devices import world_size
from machinery.errors import fail

SEED_STRIDE = 1_000_003  # rank r draws from seed + r * SEED_STRIDE; rank 0 from --seed itself


def check_device(device):
    """Refuse in one line a device torch cannot use here: a kind this build of torch or this
    machine lacks, or an index past the devices found."""
    kind = torch.device(device)
    accelerator = torch.accelerator.current_accelerator()
    if kind.type != "cpu" and (accelerator is None or accelerator.type != kind.type):
        fail(
            f"--device {device}: torch cannot use {kind.type} here (a build of torch without it, "
            f"or no driver or device); use --device {accelerator.type if accelerator else 'cpu'}"
        )
    if (
        kind.type != "cpu"
        and kind.index is not None
        and kind.index >= torch.accelerator.device_count()
    ):
        fail(
            f"--device {device}: there is no {kind.type} device {kind.index} here "
            f"({torch.accelerator.device_count()} found, numbered from 0); use --device "
            f"{kind.type}:0"
        )


def setup(device):
    """(rank, world size, this process's device); joins the process group under torchrun. A device
    torch cannot use here is refused in one line (its form was checked before torch loaded)."""
    check_device(device)
    world = world_size()
    if world == 1:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, torch.device(device)


def gather(tensor):
    """All processes' tensors, concatenated along the first dimension in rank
    order (same shapes)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(items):
    """All processes' lists of picklable items, concatenated in rank order."""
    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def mean_over_processes(stats):
    """Each value of a dict of numbers, averaged over the processes (the epoch's
    training metrics)."""
    every = gather_objects([stats])
    return {key: sum(d[key] for d in every) / len(every) for key in stats}


def average_gradients(params):
    """Mean of each gradient over the processes: the gradient of the whole epoch's minibatch."""
    if not dist.is_initialized():
        return
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def any_process(flag):
    """True on every process when it is True on one (e.g. a Ctrl-C that reached only some)."""
    if not dist.is_initialized():
        return flag
    flag = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return bool(flag > 0)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
