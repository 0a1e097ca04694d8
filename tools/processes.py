"""Many processes (`accelerate launch`): this run's process state, each process's share of the work, the gathering of
what they scored, and training's gradient average, so that N processes give what one gives."""
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce


def processes(device=None):
    """accelerate's PartialState: this run's one process, or one of `accelerate launch`'s. Processes on CPU
    (--device cpu, or no GPU) talk over gloo; on GPUs each takes its own device (accelerate sets it)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ \
            and not any(k in os.environ for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        print("warning: `accelerate launch --cpu --num_processes N` starts one process (accelerate starts N CPU "
              "processes only with --mpirun_hostfile); for N CPU processes use `accelerate launch --multi_gpu "
              "--num_processes N ... --device cpu`", file=sys.stderr)
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def my_share(groups):
    """This process's share of `groups`: every num_processes-th, dealt in turn (one process: all of them)."""
    state = PartialState()
    return groups[state.process_index::state.num_processes]


def gather(records):
    """Every process's records, in one list on every process (gather_object: no padding, so no duplicates)."""
    return gather_object(records)


def average_gradients(params):
    """Every process's gradients of the trained tensors replaced by their mean over the processes (accelerate's
    reduce), so that every process takes the same optimizer step."""
    grads = [p for p in params if p.grad is not None]              # the same tensors in every process
    for p, g in zip(grads, reduce([p.grad for p in grads], "mean")):
        p.grad = g
