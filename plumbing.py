"""
The training plumbing: processes, sharding, checkpoints, logs. train.py holds the algorithm; this holds what every
multi-process trainer needs and the paper does not describe.

    proc = Proc.setup("auto", "ddp")       this process: rank 0 of 1, or one of torchrun's (a process group)
    net = proc.wrap(net, trainable=True)   DDP, FSDP2 fully_shard per block (dist="fsdp"), or as is (one process)
    with grad_sync(net, last): ...         gradients all-reduced on an accumulated step's last micro-batch only
    proc.mean(x), proc.rng(seed, step)     the mean over ranks; the random generator of (seed, step, rank)
    run = StageDir(proc, cfg)              out_dir/<stage>/: step_NNNNNN/ checkpoints, `latest`, log.jsonl (+ wandb)

One process is rank 0 of a world of 1: every helper works there, without a process group.
"""

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import pick_device
from weights import save_safetensors


@dataclass
class Proc:
    """This process: its rank among `world` processes, its device, and how models are sharded."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False  # FSDP2 for every model, else DDP for trainable ones
    owner: bool = False  # this Proc started the process group, so close() ends it

    @classmethod
    def setup(cls, device="auto", dist_mode="ddp"):
        """Under torchrun (RANK in the environment) join or start the process group, one device per local rank."""
        dev, torchrun = pick_device(device), "RANK" in os.environ
        if torchrun and dev.type != "cpu":
            dev = torch.device(dev.type, int(os.environ["LOCAL_RANK"]))
        if dev.type != "cpu":
            if dev.index is not None:
                torch.accelerator.set_device_index(dev.index)
            torch.set_float32_matmul_precision("high")  # TF32 matmuls where the device has them
        if not torchrun:
            return cls(device=dev)
        owner = not dist.is_initialized()  # a caller (a test) may have started the group to use it after training
        if owner:  # gloo for CPUs; an accelerator's own backend (NCCL, ...) from its device
            dist.init_process_group("gloo" if dev.type == "cpu" else None, device_id=None if dev.type == "cpu" else dev)
        return cls(dist.get_rank(), dist.get_world_size(), dev, dist_mode == "fsdp", owner)

    def print(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owner:
            dist.destroy_process_group()

    def mean(self, x):
        """Mean over ranks of a tensor, as a new fp32 tensor."""
        x = x.detach().float().clone()
        if self.world > 1:
            dist.all_reduce(x)
            x /= self.world
        return x

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        out = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(out, obj)
        return out

    def rng(self, seed, step, shared=False):
        """The generator of one step: a function of (seed, step, rank) only, so a resumed run draws the same numbers.
        shared=True: the same on every rank (decisions the ranks must agree on)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(seed * 1_000_003 + step * 1009 + (0 if shared else 7 * self.rank + 1))
        return g

    def wrap(self, model, trainable, compile_backend=None):
        """DDP for a trainable model (a frozen one stays a replica), or FSDP2 sharding per block for any; compiled
        first with `compile_backend` if given. Copy a model (deepcopy) before wrapping it: FSDP converts in place."""
        if compile_backend:
            model.compile(backend=compile_backend)
        if self.world == 1:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            return fully_shard(model)
        if trainable:
            return DDP(model, device_ids=None if self.device.type == "cpu" else [self.device.index])
        return model


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def _distributed():
    return dist.is_initialized() and dist.get_world_size() > 1


def grad_sync(model, on):
    """Context for one micro-batch's backward: no gradient all-reduce unless `on` (the last micro-batch)."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def item(t):
    """A scalar tensor (a DTensor under FSDP: a collective) as a Python float; syncs with the device."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


# full (unsharded) state dicts of models and optimizers, whatever the wrapping; collectives across ranks. Imported
# where used: torch.distributed.checkpoint is slow to import and single-process runs never need it.


def full_state_dict(model, all_ranks=False):
    """On the CPU; on rank 0 only (other ranks: empty) unless all_ranks."""
    if not _distributed():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))


def load_full_state_dict(model, sd):
    if not _distributed():
        return unwrap(model).load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def optim_state_dict(model, opt):
    if not _distributed():
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optim_state_dict(model, opt, sd):
    if not _distributed():
        return opt.load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# -----------------------------------------------------------------------------
# a stage's folder: checkpoints and logs


def latest_checkpoint(folder):
    """The checkpoint folder a stage folder's `latest` pointer names, or None."""
    try:
        with open(os.path.join(folder, "latest")) as fh:
            return os.path.join(folder, fh.read().strip())
    except OSError:
        return None


class StageDir:
    """out_dir/<stage>/ of a run. A checkpoint is a folder step_NNNNNN/ written as step_NNNNNN.tmp/ and renamed,
    then the `latest` pointer is replaced (both atomic) and all but the last `keep_ckpts` are deleted. Log rows go
    to stdout, log.jsonl and wandb (with --wandb_project, if installed), from rank 0.
    cfg: the run's settings (a dataclass with out_dir, stage, keep_ckpts, wandb_project), saved in every checkpoint."""

    def __init__(self, proc, cfg):
        self.proc, self.cfg = proc, cfg
        self.path = os.path.join(cfg.out_dir, cfg.stage)
        if proc.rank == 0:
            os.makedirs(self.path, exist_ok=True)
        proc.barrier()
        self.wandb = None
        if proc.rank == 0 and cfg.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, config=asdict(cfg))
            except ImportError:
                proc.print("wandb_project given but wandb is not installed: logging to log.jsonl only")

    def latest(self):
        return latest_checkpoint(self.path)

    def save(self, step, models, opts, extra=None):
        """models: {file name: model}, each written as an original-layout safetensors file (WanModel.from_pretrained
        loads it); opts: {name: (model, optimizer)}; extra: this rank's picklable state (reward statistics)."""
        sds = {name: full_state_dict(m) for name, m in models.items()}  # collectives: every rank takes part
        osds = {name: optim_state_dict(m, o) for name, (m, o) in opts.items()}
        extras = self.proc.gather(extra)
        if self.proc.rank == 0:
            final = os.path.join(self.path, f"step_{step:06d}")
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name, sd in sds.items():
                save_safetensors(sd, os.path.join(tmp, f"{name}.safetensors"), unwrap(models[name]).cfg)
            torch.save({"step": step, "optim": osds, "extra": extras, "config": asdict(self.cfg)},
                       os.path.join(tmp, "state.pt"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(self.path, "latest.tmp"), "w") as fh:
                fh.write(os.path.basename(final))
            os.replace(os.path.join(self.path, "latest.tmp"), os.path.join(self.path, "latest"))
            old = sorted(d for d in os.listdir(self.path) if d.startswith("step_") and not d.endswith(".tmp"))
            for d in old[: -self.cfg.keep_ckpts]:
                shutil.rmtree(os.path.join(self.path, d), ignore_errors=True)
            self.proc.print(f"saved {final}")
        self.proc.barrier()

    def resume(self, models, opts):
        """Load the latest checkpoint into models and optimizers (as save() names them) -> (its step, this rank's
        extra state), or (0, None) when there is none."""
        from safetensors.torch import load_file

        path = self.latest()
        if path is None:
            return 0, None
        for name, m in models.items():
            load_full_state_dict(m, load_file(os.path.join(path, f"{name}.safetensors")))
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        for name, (m, o) in opts.items():
            load_optim_state_dict(m, o, state["optim"][name])
        self.proc.print(f"resumed from {path} (step {state['step']})")
        extras = state["extra"]
        return state["step"], extras[self.proc.rank] if self.proc.rank < len(extras) else None

    def log(self, row):
        if self.proc.rank != 0:
            return
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        with open(os.path.join(self.path, "log.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
