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
import math
import os
import re
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
            n, local = torch.accelerator.device_count(), int(os.environ["LOCAL_RANK"])
            if local >= n:
                raise SystemExit(f"torchrun started local rank {local}, but this machine has {n} {dev.type} device(s): "
                                 f"give --nproc_per_node={n} or fewer")
            dev = torch.device(dev.type, local)
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


def _sharded(model):
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 parameters are DTensors


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
    """sd: the full state dict, read on every rank. A replica (one process, DDP, frozen) loads it as is; FSDP shards
    it. (set_model_state_dict's broadcast path loads a DDP wrapper's unprefixed keys into the wrapper and fails.)"""
    if not _distributed() or not _sharded(model):
        return unwrap(model).load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def optim_state_dict(model, opt):
    if not _distributed():
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optim_state_dict(model, opt, sd):
    """sd: as optim_state_dict wrote it (parameter names as keys when distributed), read on every rank."""
    if not _distributed():
        return opt.load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# a stage's folder: checkpoints and logs


def latest_checkpoint(folder):
    """The checkpoint folder a stage folder's `latest` pointer names, or None."""
    try:
        with open(os.path.join(folder, "latest")) as fh:
            return os.path.join(folder, fh.read().strip())
    except OSError:
        return None


def checkpoints(folder):
    """The complete checkpoints of a stage folder, oldest first: [(step, path)] (a step_NNNNNN/ folder exists only
    once every file in it is written)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted((int(m.group(1)), os.path.join(folder, n)) for n in names if (m := re.fullmatch(r"step_(\d+)", n)))


def unusable(folder, path, f, err):
    """The one line for a checkpoint file f (of checkpoint folder `path` in stage folder `folder`) that cannot be
    resumed from: the file, why, and how to resume from the checkpoint before it."""
    from weights import CheckpointError

    why = str(err).removeprefix(f + ": ") if isinstance(err, CheckpointError) else \
        f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"  # safetensors and torch have their own types
    found = checkpoints(folder)
    cur = next((s for s, p in found if p == path), math.inf)
    before = [p for s, p in found if s < cur]
    hint = (f"resume from the one before with `echo {os.path.basename(before[-1])} > {os.path.join(folder, 'latest')}`"
            if before else "no earlier checkpoint is left")
    return f"{f}: cannot resume from it ({why}); {hint}"


def resume_point(folder, names, load=True):
    """The checkpoint a --resume=true run in stage folder `folder` continues from, and its files read: (path,
    {file: state dict}) for the safetensors `names` and state.pt, or (None, {}) when there is none. `latest` names
    it; if `latest` is missing or names nothing (a kill between a checkpoint's rename and the pointer's), the
    newest complete one. A file that cannot be read exits with one line (see unusable). load=False reads only
    headers and maps state.pt (a check before any model loads)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = latest_checkpoint(folder)
    if path is None or not os.path.isdir(path):
        found = checkpoints(folder)
        if not found:
            return None, {}
        path = found[-1][1]
    files = {}
    for f in [os.path.join(path, n) for n in names] + [os.path.join(path, "state.pt")]:
        try:
            if f.endswith(".safetensors"):
                if load:
                    files[f] = load_file(f)
                else:
                    with safe_open(f, "pt"):
                        pass
            else:
                files[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=not load)
                if not all(k in files[f] for k in ("step", "optim", "extra")):
                    raise ValueError(f"holds {sorted(files[f])}, not a train.py state (step, optim, extra)")
        except Exception as err:
            raise SystemExit(unusable(folder, path, f, err)) from None
    return path, files


class StageDir:
    """out_dir/<stage>/ of a run. A checkpoint is a folder step_NNNNNN/ written as step_NNNNNN.tmp/ and renamed,
    then the `latest` pointer is replaced (both atomic), then checkpoints older than the newest `keep_ckpts` are
    deleted. A kill at any moment leaves `latest` naming a complete checkpoint. Log rows go to stdout, log.jsonl and
    wandb (with --wandb_project, if installed), from rank 0.
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
        loads it) with the run's settings in its metadata; opts: {name: (model, optimizer)}; extra: this rank's
        picklable state (reward statistics)."""
        sds = {name: full_state_dict(m) for name, m in models.items()}  # collectives: every rank takes part
        osds = {name: optim_state_dict(m, o) for name, (m, o) in opts.items()}
        extras = self.proc.gather(extra)
        if self.proc.rank == 0:
            for name in os.listdir(self.path):  # what an interrupted save left behind
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
            final = os.path.join(self.path, f"step_{step:06d}")
            tmp = final + ".tmp"
            os.makedirs(tmp)
            meta = {"train_config": json.dumps(asdict(self.cfg))}  # sample.py / eval.py compare their settings with it
            for name, sd in sds.items():
                save_safetensors(sd, os.path.join(tmp, f"{name}.safetensors"), unwrap(models[name]).cfg, meta)
            torch.save({"step": step, "optim": osds, "extra": extras, "config": asdict(self.cfg)},
                       os.path.join(tmp, "state.pt"))
            if os.path.exists(final):  # only after a rewound resume; `latest` never names it
                shutil.rmtree(final)
            os.replace(tmp, final)
            with open(os.path.join(self.path, "latest.tmp"), "w") as fh:
                fh.write(os.path.basename(final))
            os.replace(os.path.join(self.path, "latest.tmp"), os.path.join(self.path, "latest"))
            older = [p for s, p in checkpoints(self.path) if s <= step]  # by step number, this one last
            for p in older[: -max(1, self.cfg.keep_ckpts)]:
                shutil.rmtree(p, ignore_errors=True)
            self.proc.print(f"saved {final}")
        self.proc.barrier()

    def start(self, models, opts):
        """The run's first step: with cfg.resume, load the latest checkpoint into models and optimizers (as save()
        names them) -> (its step, this rank's extra state); else, or when there is none, (0, None). Log rows after
        that step (written by a run killed before its next checkpoint) are dropped, so the log reads as one run.
        A checkpoint that cannot be read, or that does not fit these networks, exits with one line naming the file
        and the checkpoint before it."""
        step, extra = self._resume(models, opts) if self.cfg.resume else (0, None)
        log = os.path.join(self.path, "log.jsonl")
        if self.proc.rank == 0 and os.path.exists(log):
            with open(log) as fh:
                rows = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
            with open(log + ".tmp", "w") as fh:
                fh.writelines(rows)
            os.replace(log + ".tmp", log)
        self.proc.barrier()
        return step, extra

    def _resume(self, models, opts):
        from weights import Tensors, check

        path, files = resume_point(self.path, [f"{name}.safetensors" for name in models])
        if path is None:
            self.proc.print(f"--resume=true: no checkpoint in {self.path} yet, starting at step 1")
            return 0, None
        if path != self.latest():
            self.proc.print(f"{os.path.join(self.path, 'latest')} names {self.latest() or 'nothing'}: resuming from "
                            f"the newest complete checkpoint, {path}")
        for name, m in models.items():  # another network's checkpoint (other --model, other sizes) stops here
            f = os.path.join(path, f"{name}.safetensors")
            try:
                check(Tensors.of(files[f], f), unwrap(m), f"the {name} network these settings build")
            except Exception as err:
                raise SystemExit(unusable(self.path, path, f, err)) from None
        state = files[os.path.join(path, "state.pt")]
        for name, m in models.items():
            load_full_state_dict(m, files[os.path.join(path, f"{name}.safetensors")])
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
