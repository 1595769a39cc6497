"""
Reward Forcing training: one process, or many with torchrun (DDP for small models, FSDP2 for 1.3B / 14B).

Two stages, one command each (paper §4 "Implementation details"), after an optional teacher for toy worlds:

  --stage=teacher  Bidirectional flow-matching pretraining of a small teacher on the toy world (data/toyworld.py);
                   the real recipe starts from Wan2.1 instead.

  --stage=ode    ODE initialisation. The bidirectional teacher samples ODE trajectories (48 Euler steps, shift 8,
                 CFG 6 against the negative prompt) into a shard folder; the causal student learns to jump from the
                 trajectory's points at its own 4 timesteps to the clean end point, all chunks in one chunk-causal
                 forward with a random timestep per chunk.
  --stage=redmd  Rewarded distribution matching (paper §3.3) on self-forcing rollouts through the EMA-Sink cache:
                 the critic (fake score) learns every iteration, the generator every `gen_every`, and each sample's
                 DMD gradient is weighted by exp(r / beta), r its (z-scored) reward.

    python train.py config/toy.py --stage=ode
    torchrun --standalone --nproc_per_node=8 train.py --stage=redmd --teacher=Wan2.1-T2V-1.3B \\
        --text_encoder=Wan2.1-T2V-1.3B --vae=Wan2.1-T2V-1.3B --prompts=prompts.txt --dist=fsdp
"""

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

import dmd
from config import configure, pick_device
from dmd import FlowMatch
from model import PRESETS, WanModel, save_safetensors
from sink import SinkCache, rollout


@dataclass
class TrainConfig:
    stage: str = field(default="redmd", metadata={"help": "teacher (toy pretraining), ode (ODE initialisation) or redmd (Re-DMD)"})
    out_dir: str = field(default="out", metadata={"help": "checkpoints, logs and ODE pairs go here"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/<stage>/latest"})
    # models
    model: str = field(default="tiny", metadata={"help": "WanModel preset for randomly initialised models (no --teacher)"})
    teacher: str = field(default="", metadata={"help": "bidirectional teacher checkpoint; empty: random init (tests)"})
    student: str = field(default="", metadata={"help": "student init; empty: the ODE stage's output if present, else the teacher"})
    critic: str = field(default="", metadata={"help": "fake score init; empty: the teacher (with a 14B teacher, give the 1.3B base)"})
    text_encoder: str = field(default="", metadata={"help": "Wan2.1 folder with umT5; empty: a tiny random encoder over the prompts' words"})
    vae: str = field(default="", metadata={"help": "Wan2.1 VAE for the reward's pixels; empty: the latents are the video"})
    prompts: str = field(default="", metadata={"help": "text file, one prompt per line"})
    negative_prompt: Optional[str] = field(default=None, metadata={"help": "for CFG; default: Wan's negative prompt"})
    # video and streaming
    num_frames: int = field(default=21, metadata={"help": "latent frames per rollout (paper: 21)"})
    height: int = field(default=60, metadata={"help": "latent height (480 px / 8)"})
    width: int = field(default=104, metadata={"help": "latent width (832 px / 8)"})
    chunk_frames: int = field(default=3, metadata={"help": "latent frames per chunk"})
    window_frames: int = field(default=9, metadata={"help": "attention window in latent frames, sink included"})
    sink_frames: int = field(default=3, metadata={"help": "sink size in latent frames"})
    sink_mode: str = field(default="ema", metadata={"help": "ema | static | none | full"})
    alpha: float = field(default=0.999, metadata={"help": "EMA-Sink momentum"})
    student_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250], metadata={"help": "student schedule before the shift (repeat the flag)"})
    student_shift: float = field(default=5.0, metadata={"help": "sigma shift of the student's schedule and of DMD's timesteps"})
    # teacher stage (toy world)
    teacher_shift: float = field(default=3.0, metadata={"help": "teacher pretraining: sigma shift of the sampled timesteps"})
    caption_dropout: float = field(default=0.1, metadata={"help": "teacher pretraining: share of empty captions (for CFG)"})
    lr_teacher: float = field(default=3e-4, metadata={"help": "teacher pretraining learning rate"})
    teacher_ema: float = field(default=0.999, metadata={"help": "teacher pretraining: EMA decay of the saved teacher"})
    # ODE stage
    ode_pairs: int = field(default=16000, metadata={"help": "teacher trajectories to sample (paper: 16k)"})
    ode_steps: int = field(default=48, metadata={"help": "teacher Euler steps"})
    ode_shift: float = field(default=8.0, metadata={"help": "teacher sigma shift"})
    ode_guidance: float = field(default=6.0, metadata={"help": "teacher CFG scale for the trajectories"})
    # Re-DMD
    gen_every: int = field(default=5, metadata={"help": "generator update every N iterations; the critic every one"})
    real_guidance: float = field(default=4.0, metadata={"help": "CFG of the real score (released code: cond + 3 (cond - uncond))"})
    dmd_t_min: float = field(default=20.0, metadata={"help": "smallest DMD / critic timestep"})
    dmd_t_max: float = field(default=980.0, metadata={"help": "largest DMD / critic timestep"})
    reward: str = field(default="motion", metadata={"help": "motion (weightless) | videoalign | none (plain DMD)"})
    reward_ckpt: str = field(default="", metadata={"help": "videoalign: merged safetensors (or model.pth)"})
    reward_tokenizer: str = field(default="", metadata={"help": "videoalign: tokenizer.json"})
    reward_template: str = field(default="", metadata={"help": "videoalign: prompt template file"})
    beta: float = field(default=0.5, metadata={"help": "Re-DMD temperature: weight exp(r / beta); inf = DMD"})
    reward_clip: Optional[float] = field(default=None, metadata={"help": "clamp r to [-c, c] before exp (none: off)"})
    reward_norm: bool = field(default=False, metadata={"help": "normalise the weights to mean 1 over the global batch"})
    # optimisation
    max_iters: int = field(default=600, metadata={"help": "iterations (paper: 600 for Re-DMD)"})
    batch_size: int = field(default=1, metadata={"help": "samples per rank per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr_gen: float = field(default=2e-6, metadata={"help": "generator (student) learning rate"})
    lr_critic: float = field(default=4e-7, metadata={"help": "critic (fake score) learning rate"})
    beta1: float = field(default=0.0, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"help": "gradient norm clip"})
    ema_decay: float = field(default=0.99, metadata={"help": "generator EMA decay"})
    ema_start: int = field(default=200, metadata={"help": "EMA tracks the generator exactly before this step"})
    # system
    dist: str = field(default="ddp", metadata={"help": "ddp or fsdp (FSDP2 fully_shard per block) under torchrun"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"help": "compute dtype under autocast: auto (bf16 on CUDA), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the models"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend (aot_eager: quick checks)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "gradient checkpointing of the bidirectional / chunk-causal forwards"})
    seed: int = field(default=0, metadata={"help": "all randomness derives from (seed, step, rank): resume is exact"})
    log_interval: int = field(default=1, metadata={"help": "iterations between log lines"})
    save_interval: int = field(default=100, metadata={"help": "iterations between checkpoints (and one at the end)"})
    keep_ckpts: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    wandb_project: str = field(default="", metadata={"help": "log to wandb too (only if installed)"})


# -----------------------------------------------------------------------------
# distributed plumbing

RANK, WORLD, DEVICE = 0, 1, torch.device("cpu")


def setup(cfg):
    global RANK, WORLD, DEVICE
    DEVICE = pick_device(cfg.device)
    if "RANK" in os.environ:  # torchrun: one process per device
        dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        if DEVICE.type == "cuda":
            DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if DEVICE.type == "cuda" else "float32"


def log(*a):
    if RANK == 0:
        print(*a, flush=True)


def all_mean(x):
    """Mean over ranks of a tensor (a copy)."""
    x = x.detach().float().clone()
    if WORLD > 1:
        dist.all_reduce(x)
        x /= WORLD
    return x


def rng(cfg, step, shared=False):
    """The generator for one step: a function of (seed, step, rank) only, so a resumed run draws the same numbers.
    shared=True: the same on every rank (decisions all ranks must agree on, such as the exit step)."""
    g = torch.Generator(device=DEVICE)
    g.manual_seed(cfg.seed * 1_000_003 + step * 1009 + (0 if shared else 7 * RANK + 1))
    return g


def as_float(t):
    """A scalar tensor (a DTensor under FSDP) as a Python float: for logging only, it syncs with the device."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, parameter by parameter (sharded alike under FSDP)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)


def autocast(cfg):
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=getattr(torch, cfg.dtype))


def wrap(model, cfg, trainable):
    """DDP for a trainable model (a frozen one stays replicated), or FSDP2 sharding per block for both."""
    if cfg.compile:
        model.compile(backend=cfg.compile_backend)
    if WORLD == 1:
        return model
    if cfg.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    if trainable:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)
    return model


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def grad_sync(model, on):
    """No gradient all-reduce on the micro-batches before the last one of an accumulated step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def full_state_dict(model, all_ranks=False):
    """Full (unsharded) CPU state dict; on rank 0 only unless all_ranks. Collective under torchrun."""
    if WORLD == 1:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))


def load_full_state_dict(model, sd):
    if WORLD == 1:
        unwrap(model).load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def optim_state(model, opt):
    if WORLD == 1:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optim_state(model, opt, sd):
    if WORLD == 1:
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# -----------------------------------------------------------------------------
# models, text, pixels, reward


def resolve(path, name):
    """A stage folder (out/toy/teacher) means its latest checkpoint's `name`.safetensors; anything else is as given."""
    if path and os.path.isdir(path) and os.path.exists(os.path.join(path, "latest")):
        return os.path.join(latest_checkpoint(path), f"{name}.safetensors")
    return path


def load_model(path, cfg, what):
    """A WanModel in fp32 on DEVICE: from a checkpoint, or randomly initialised from the preset (seeded: every rank
    builds the same weights)."""
    if path:
        log(f"{what}: {path}")
        return WanModel.from_pretrained(path, dtype=torch.float32, device=DEVICE)
    log(f"{what}: random {cfg.model} (no checkpoint given)")
    torch.manual_seed(cfg.seed)
    return WanModel(PRESETS[cfg.model]).to(DEVICE)


def read_prompts(cfg):
    if not cfg.prompts:
        raise SystemExit("--prompts is required: a text file with one prompt per line")
    try:
        with open(cfg.prompts, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
    except OSError as err:
        raise SystemExit(f"--prompts={cfg.prompts}: cannot read it ({err.strerror})") from None
    if not prompts:
        raise SystemExit(f"--prompts={cfg.prompts}: no prompts in the file")
    return prompts


def text_encoder(cfg, prompts, model_cfg):
    """prompts -> context (B, text_len, text_dim), no grad. umT5 from --text_encoder, or a tiny random encoder over
    the prompts' words (frozen random weights, the same on every rank) whose width matches the model's text_dim."""
    from t5 import NEGATIVE_PROMPT, T5Config, T5Encoder, TextEncoder, Tokenizer

    if cfg.negative_prompt is None:
        cfg.negative_prompt = NEGATIVE_PROMPT if cfg.text_encoder else "static blurry"
    if cfg.text_encoder:
        te = TextEncoder.from_pretrained(cfg.text_encoder, dtype=torch.bfloat16 if DEVICE.type == "cuda" else None,
                                         device=DEVICE, text_len=model_cfg.text_len)
    else:
        words = sorted({w for p in prompts + [cfg.negative_prompt] for w in p.split()})
        tok = Tokenizer.from_words(words, text_len=model_cfg.text_len)
        d = model_cfg.text_dim
        torch.manual_seed(cfg.seed + 1)
        t5cfg = T5Config(vocab=len(words) + 3, dim=d, dim_attn=d, dim_ffn=2 * d, num_heads=max(1, d // 8), num_layers=2,
                         text_len=model_cfg.text_len)
        te = TextEncoder(tok, T5Encoder(t5cfg).to(DEVICE))
    if te.tokenizer.text_len > model_cfg.text_len:
        raise SystemExit(f"text encoder pads to {te.tokenizer.text_len} rows but the model takes text_len={model_cfg.text_len}")
    return lambda ps: te(ps).float()


def pixel_decoder(cfg):
    """latents -> pixels in [-1, 1] for the reward, no grad: the Wan VAE, or the latents themselves (toy worlds)."""
    if not cfg.vae:
        return lambda x: x
    from vae import WanVAE

    vae = WanVAE.from_pretrained(cfg.vae, dtype=torch.bfloat16 if DEVICE.type == "cuda" else None, device=DEVICE)
    return lambda x: vae.decode(x.to(next(vae.parameters()).dtype)).float()


def reward_model(cfg):
    if cfg.reward == "motion":
        from reward import MotionReward

        return MotionReward()
    if cfg.reward == "videoalign":
        from reward import VideoAlignReward

        return VideoAlignReward.from_pretrained(cfg.reward_ckpt, cfg.reward_tokenizer, cfg.reward_template, device=DEVICE)
    if cfg.reward == "none":
        return None
    raise SystemExit(f"--reward must be motion, videoalign or none; got {cfg.reward!r}")


# -----------------------------------------------------------------------------
# checkpoints: a directory per step written under a temporary name and renamed, then a `latest` pointer


def save_checkpoint(cfg, stage_dir, step, models, opts, extra):
    """models: {name: model} written as original-layout safetensors (loadable by WanModel.from_pretrained);
    opts: {name: (model, optimizer)}; extra: per-rank picklable state (reward statistics)."""
    sds = {name: full_state_dict(m) for name, m in models.items()}  # collectives: every rank
    osds = {name: optim_state(m, o) for name, (m, o) in opts.items()}
    extras = [None] * WORLD
    if WORLD > 1:
        dist.all_gather_object(extras, extra)
    else:
        extras = [extra]
    if RANK == 0:
        final = os.path.join(stage_dir, f"step_{step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, sd in sds.items():
            save_safetensors(sd, os.path.join(tmp, f"{name}.safetensors"), unwrap(models[name]).cfg)
        torch.save({"step": step, "optim": osds, "extra": extras, "config": asdict(cfg)}, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(stage_dir, "latest.tmp"), "w") as fh:
            fh.write(os.path.basename(final))
        os.replace(os.path.join(stage_dir, "latest.tmp"), os.path.join(stage_dir, "latest"))
        old = sorted(d for d in os.listdir(stage_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        for d in old[: -cfg.keep_ckpts]:
            shutil.rmtree(os.path.join(stage_dir, d), ignore_errors=True)
        log(f"saved {final}")
    if WORLD > 1:
        dist.barrier()


def latest_checkpoint(stage_dir):
    try:
        with open(os.path.join(stage_dir, "latest")) as fh:
            return os.path.join(stage_dir, fh.read().strip())
    except OSError:
        return None


def load_checkpoint(path, models, opts):
    from safetensors.torch import load_file

    for name, m in models.items():
        load_full_state_dict(m, load_file(os.path.join(path, f"{name}.safetensors")))
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    for name, (m, o) in opts.items():
        load_optim_state(m, o, state["optim"][name])
    log(f"resumed from {path} (step {state['step']})")
    return state["step"], state["extra"][RANK] if RANK < len(state["extra"]) else None


def adamw(model, lr, cfg):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


class Logger:
    def __init__(self, cfg, stage_dir):
        self.path = os.path.join(stage_dir, "log.jsonl")
        self.wandb = None
        if RANK == 0 and cfg.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, config=asdict(cfg))
            except ImportError:
                log("wandb_project given but wandb is not installed: logging to log.jsonl only")

    def __call__(self, row):
        if RANK != 0:
            return
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])


def check_finite(name, value, step, stage_dir):
    """value: a loss already averaged over ranks, so every rank takes the same decision (one host sync per step)."""
    if not math.isfinite(value):
        last = latest_checkpoint(stage_dir)
        raise RuntimeError(f"{name} loss is {value} at step {step}: stopping. The last good checkpoint is "
                           f"{last or '(none written yet)'}; lower the learning rate or check the data, then --resume.")


# -----------------------------------------------------------------------------
# stage 0 (toy worlds): a bidirectional teacher by flow matching


def train_teacher(cfg, stage_dir):
    """Flow matching (x_t = (1 - s) x0 + s eps, target v = eps - x0) on clips of the procedural world, with a share
    of empty captions so the teacher can do classifier-free guidance. The saved teacher is the EMA."""
    from data import toyworld

    torch.manual_seed(cfg.seed)
    model = WanModel(PRESETS[cfg.model]).init_weights().to(DEVICE)
    if model.cfg.in_dim != 3:
        raise SystemExit(f"the toy world's latents are RGB frames: the {cfg.model} preset has in_dim={model.cfg.in_dim}")
    if cfg.height != cfg.width:
        raise SystemExit(f"toy world frames are square: height={cfg.height}, width={cfg.width}")
    encode = text_encoder(cfg, [" ".join(toyworld.WORDS), ""], model.cfg)  # the vocabulary, for a tiny random one
    model.grad_ckpt = cfg.grad_ckpt
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net, ema = wrap(model.train(), cfg, True), wrap(ema, cfg, False)
    opt = adamw(net, cfg.lr_teacher, cfg)
    models, opts = {"teacher": net, "teacher_ema": ema}, {"teacher": (net, opt)}
    start = 0
    if cfg.resume and latest_checkpoint(stage_dir):
        start, _ = load_checkpoint(latest_checkpoint(stage_dir), models, opts)
    logger = Logger(cfg, stage_dir)
    fm = FlowMatch(cfg.teacher_shift)
    for step in range(start + 1, cfg.max_iters + 1):
        t0 = time.perf_counter()
        g = rng(cfg, step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            idx = torch.randint(2**31 - 1, (cfg.batch_size,), generator=g, device=DEVICE).tolist()
            clips = [toyworld.clip(i, cfg.num_frames, cfg.height, seed=cfg.seed) for i in idx]
            x0 = torch.stack([c[0] for c in clips]).to(DEVICE)  # (B, 3, F, S, S) in [-1, 1]
            drop = torch.rand(len(idx), generator=g, device=DEVICE) < cfg.caption_dropout
            caps = ["" if d else c[1] for c, d in zip(clips, drop.tolist())]
            t = fm.sample_t(len(idx), g, DEVICE, 0.0, 1000.0)
            eps = torch.randn(x0.shape, generator=g, device=DEVICE)
            with grad_sync(net, micro == cfg.grad_accum - 1), autocast(cfg):
                loss = dmd.critic_loss(net(fm.add_noise(x0, eps, t), t, encode(caps)), eps, x0) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        loss_avg = all_mean(total).item()
        check_finite("teacher", loss_avg, step, stage_dir)
        opt.step()
        ema_update(ema, net, cfg.teacher_ema if step > 1 else 0.0)
        if step % cfg.log_interval == 0:
            logger({"step": step, "fm_loss": loss_avg, "grad_norm": as_float(gnorm),
                    "s_per_it": time.perf_counter() - t0})
        if step % cfg.save_interval == 0 or step == cfg.max_iters:
            save_checkpoint(cfg, stage_dir, step, models, opts, None)
    return ema


# -----------------------------------------------------------------------------
# stage 1: ODE pairs from the teacher, and the student's regression on them


@torch.no_grad()
def sample_ode_pairs(cfg, teacher, encode, prompts, folder):
    """Each rank samples the trajectories i = rank, rank + WORLD, ... and writes them as safetensors shards:
    lat (n, K+1, C, F, h, w) at the teacher steps nearest the student's K timesteps, plus the clean end;
    t (K+1,) the exact timesteps of those latents; the prompts in the metadata."""
    from safetensors.torch import save_file

    fm = FlowMatch(cfg.ode_shift)
    ts = fm.trajectory(cfg.ode_steps)  # 1000 ... 0
    student_t = FlowMatch(cfg.student_shift).timesteps(cfg.student_steps)
    keep = [min(range(len(ts)), key=lambda i: abs(ts[i] - st)) for st in student_t] + [len(ts) - 1]
    c = unwrap(teacher).cfg
    neg = encode([cfg.negative_prompt])
    mine = list(range(RANK, cfg.ode_pairs, WORLD))
    for s in range(0, len(mine), cfg.batch_size):
        idx = mine[s : s + cfg.batch_size]
        ps = [prompts[i % len(prompts)] for i in idx]
        B = len(idx)
        g = torch.Generator(device=DEVICE).manual_seed(cfg.seed * 1_000_003 + idx[0])
        x = torch.randn(B, c.in_dim, cfg.num_frames, cfg.height, cfg.width, generator=g, device=DEVICE)
        ctx = torch.cat([encode(ps), neg.expand(B, -1, -1)])  # cond and uncond in one batch
        kept = {}  # teacher step -> latent; two student timesteps may share a step on a coarse trajectory
        for i in range(len(ts)):
            if i in keep:
                kept[i] = x.clone()
            if i == len(ts) - 1:
                break
            with autocast(cfg):
                v = teacher(torch.cat([x, x]), torch.full((2 * B,), ts[i], device=DEVICE), ctx).float()
            v = dmd.cfg(v[:B], v[B:], cfg.ode_guidance)
            x = x + (fm.sigma(ts[i + 1]) - fm.sigma(ts[i])) * v  # Euler step of dx/ds = v
        lat = torch.stack([kept[i] for i in keep], dim=1).cpu()
        path = os.path.join(folder, f"shard_r{RANK:03d}_{s:07d}.safetensors")
        save_file({"lat": lat.contiguous(), "t": torch.tensor([ts[i] for i in keep])}, path + ".tmp",
                  metadata={"prompts": json.dumps(ps)})
        os.replace(path + ".tmp", path)
    log(f"ODE pairs: {cfg.ode_pairs} trajectories in {folder}, kept teacher steps {keep} (t = {[round(ts[i], 1) for i in keep]})")


class OdePairs:
    """All shards of a folder, read lazily one pair at a time."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.items = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), "pt") as fh:
                    prompts = json.loads(fh.metadata()["prompts"])
                    self.t = fh.get_tensor("t")
                self.items += [(os.path.join(folder, name), j, p) for j, p in enumerate(prompts)]
        if not self.items:
            raise SystemExit(f"{folder}: no ODE pair shards")

    def get(self, indices):
        from safetensors import safe_open

        lats, ps = [], []
        for i in indices:
            path, j, p = self.items[i]
            with safe_open(path, "pt") as fh:
                lats.append(fh.get_slice("lat")[j : j + 1])
            ps.append(p)
        return torch.cat(lats).to(DEVICE).float(), ps


def train_ode(cfg, stage_dir):
    prompts = read_prompts(cfg)
    teacher = load_model(cfg.teacher, cfg, "teacher").requires_grad_(False).eval()
    encode = text_encoder(cfg, prompts, teacher.cfg)
    # the causal student starts as the teacher (before wrap(): FSDP converts a module in place)
    student = load_model(cfg.student, cfg, "student") if cfg.student else copy.deepcopy(teacher)
    folder = os.path.join(stage_dir, "pairs")
    done = os.path.join(folder, "done.json")
    if not os.path.exists(done):  # sample once; a resumed run reuses the shards
        if RANK == 0:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        if WORLD > 1:
            dist.barrier()
        sample_ode_pairs(cfg, wrap(teacher, cfg, trainable=False), encode, prompts, folder)
        if WORLD > 1:
            dist.barrier()
        if RANK == 0:
            with open(done, "w") as fh:
                json.dump({"ode_pairs": cfg.ode_pairs}, fh)
    pairs = OdePairs(folder)
    K = len(pairs.t) - 1  # student timesteps; index K is the clean end point

    del teacher
    student.requires_grad_(True).train()
    student.grad_ckpt = cfg.grad_ckpt
    gen = wrap(student, cfg, trainable=True)
    opt = adamw(gen, cfg.lr_gen, cfg)
    start = 0
    if cfg.resume and latest_checkpoint(stage_dir):
        start, _ = load_checkpoint(latest_checkpoint(stage_dir), {"generator": gen}, {"generator": (gen, opt)})
    logger = Logger(cfg, stage_dir)
    fm = FlowMatch(cfg.student_shift)
    C = cfg.chunk_frames
    n_chunks = cfg.num_frames // C
    for step in range(start + 1, cfg.max_iters + 1):
        t0 = time.perf_counter()
        g = rng(cfg, step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        # the whole accumulated batch is drawn at once: batch 2 x accum 1 and batch 1 x accum 2 see the same pairs
        idx_all = torch.randint(len(pairs.items), (cfg.grad_accum, cfg.batch_size), generator=g, device=DEVICE)
        k_all = torch.randint(K, (cfg.grad_accum, cfg.batch_size, n_chunks), generator=g, device=DEVICE)
        for micro in range(cfg.grad_accum):
            lat, ps = pairs.get(idx_all[micro].tolist())  # (B, K+1, C, F, h, w)
            B = lat.shape[0]
            k = k_all[micro].repeat_interleave(C, dim=1)  # (B, F): one random student timestep per chunk
            x_t = torch.gather(lat, 1, k[:, None, None, :, None, None].expand(B, 1, *lat.shape[2:])).squeeze(1)
            t = pairs.t.to(DEVICE)[k]  # (B, F)
            with grad_sync(gen, micro == cfg.grad_accum - 1), autocast(cfg):
                v = gen(x_t, t, encode(ps), chunk_frames=C, window_frames=cfg.window_frames,
                        sink_frames=0 if cfg.sink_mode == "none" else cfg.sink_frames).float()
                x0 = x_t - fm.sigma(t)[:, None, :, None, None] * v
                loss = dmd.ode_loss(x0, lat[:, K]) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
        loss_avg = all_mean(total).item()
        check_finite("ODE", loss_avg, step, stage_dir)
        opt.step()
        if step % cfg.log_interval == 0:
            logger({"step": step, "ode_loss": loss_avg, "grad_norm": as_float(gnorm),
                    "s_per_it": time.perf_counter() - t0})
        if step % cfg.save_interval == 0 or step == cfg.max_iters:
            save_checkpoint(cfg, stage_dir, step, {"generator": gen}, {"generator": (gen, opt)}, None)
    return gen


# -----------------------------------------------------------------------------
# stage 2: Re-DMD


def train_redmd(cfg, stage_dir):
    prompts = read_prompts(cfg)
    teacher = load_model(cfg.teacher, cfg, "teacher (real score)").requires_grad_(False).eval()
    encode = text_encoder(cfg, prompts, teacher.cfg)
    decode = pixel_decoder(cfg)
    reward = reward_model(cfg)
    student_path = cfg.student
    ode_out = latest_checkpoint(os.path.join(cfg.out_dir, "ode"))
    if not student_path and ode_out:
        student_path = os.path.join(ode_out, "generator.safetensors")
    student = load_model(student_path, cfg, "student (generator)") if student_path else copy.deepcopy(teacher)
    critic = load_model(cfg.critic, cfg, "critic (fake score)") if cfg.critic else copy.deepcopy(teacher)
    critic.requires_grad_(True).train()  # the fake score starts as the teacher (or --critic)
    student.requires_grad_(True).train()
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    critic.grad_ckpt = cfg.grad_ckpt
    gen, crit, ema = wrap(student, cfg, True), wrap(critic, cfg, True), wrap(ema, cfg, False)
    real = wrap(teacher, cfg, False)
    opt_g, opt_c = adamw(gen, cfg.lr_gen, cfg), adamw(crit, cfg.lr_critic, cfg)
    models = {"generator": gen, "generator_ema": ema, "critic": crit}
    opts = {"generator": (gen, opt_g), "critic": (crit, opt_c)}
    start = 0
    if cfg.resume and latest_checkpoint(stage_dir):
        start, extra = load_checkpoint(latest_checkpoint(stage_dir), models, opts)
        if extra is not None and reward is not None:
            reward.load_state_dict(extra)
    logger = Logger(cfg, stage_dir)

    fm = FlowMatch(cfg.student_shift)
    C = cfg.chunk_frames
    n_chunks = cfg.num_frames // C
    neg = encode([cfg.negative_prompt])
    cache_dtype = torch.float32 if cfg.dtype == "float32" else getattr(torch, cfg.dtype)

    def generate(step, ctx, exit_step, g):
        """Self-forcing rollout through the same EMA-Sink cache as sampling -> (B, C, F, h, w)."""
        cache = SinkCache(unwrap(gen), ctx.shape[0], cfg.height, cfg.width, chunk_frames=C, window_frames=cfg.window_frames,
                          sink_frames=cfg.sink_frames, mode=cfg.sink_mode, alpha=cfg.alpha,
                          max_frames=cfg.num_frames if cfg.sink_mode == "full" else None, dtype=cache_dtype)
        with autocast(cfg):
            chunks = rollout(gen, cache, n_chunks, context=ctx, timesteps=fm.timesteps(cfg.student_steps),
                             exit_step=exit_step, generator=g)
            return torch.cat(list(chunks), dim=2)

    def x0_of(model, x_t, t, ctx):
        with autocast(cfg):
            return fm.x0_from_v(x_t, model(x_t, t, ctx).float(), t)

    for step in range(start + 1, cfg.max_iters + 1):
        t0 = time.perf_counter()
        g, g_shared = rng(cfg, step), rng(cfg, step, shared=True)
        row = {"step": step}

        # --- generator: Re-DMD (paper Eq. 11), every gen_every iterations -----------------------------------
        if step % cfg.gen_every == 0:
            opt_g.zero_grad(set_to_none=True)
            total, rewards, weights = 0.0, [], []
            for micro in range(cfg.grad_accum):
                ps = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=g, device=DEVICE).tolist()]
                ctx = encode(ps)
                B = ctx.shape[0]
                exit_step = int(torch.randint(len(cfg.student_steps), (1,), generator=g_shared, device=DEVICE))
                with grad_sync(gen, micro == cfg.grad_accum - 1):
                    x = generate(step, ctx, exit_step, g)  # with grad through each chunk's exit step
                    with torch.no_grad():
                        r = reward(decode(x.detach()), ps) if reward is not None else torch.zeros(B, device=DEVICE)
                        w = dmd.reward_weight(r.to(DEVICE).float(), cfg.beta, cfg.reward_clip)  # exp(r / beta)
                        t = fm.sample_t(B, g, DEVICE, cfg.dmd_t_min, cfg.dmd_t_max)
                        x_t = fm.add_noise(x.detach(), torch.randn(x.shape, generator=g, device=DEVICE), t)
                        x0_fake = x0_of(crit, x_t, t, ctx)  # fake score: conditional only
                        x0_c = x0_of(real, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ctx, neg.expand(B, -1, -1)]))
                        x0_real = dmd.cfg(x0_c[:B], x0_c[B:], cfg.real_guidance)  # real score with CFG
                    loss = dmd.dmd_loss(x, x0_real, x0_fake, w) / cfg.grad_accum
                    loss.backward()
                total += loss.detach()
                rewards.append(r.detach())
                weights.append(w)
            if cfg.reward_norm:  # gradient of sum_b w_b l_b / sum_b w_b over the global batch: one scalar rescale
                wsum = torch.stack([w.sum() for w in weights]).sum()
                n = torch.tensor(float(sum(w.numel() for w in weights)), device=DEVICE)
                if WORLD > 1:
                    dist.all_reduce(wsum)
                    dist.all_reduce(n)
                for p in gen.parameters():
                    if p.grad is not None:
                        p.grad.mul_(n / wsum)
            gnorm = torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
            row["gen_loss"] = all_mean(total).item()
            check_finite("generator", row["gen_loss"], step, stage_dir)
            opt_g.step()
            ema_update(ema, gen, cfg.ema_decay if step >= cfg.ema_start else 0.0)  # a plain copy before ema_start
            row["reward"] = all_mean(torch.cat(rewards).mean()).item()
            row["weight"] = all_mean(torch.cat(weights).mean()).item()
            row["gen_grad_norm"] = as_float(gnorm)

        # --- critic: flow matching on fresh generator samples, every iteration -------------------------------
        opt_c.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            ps = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=g, device=DEVICE).tolist()]
            ctx = encode(ps)
            B = ctx.shape[0]
            exit_step = int(torch.randint(len(cfg.student_steps), (1,), generator=g_shared, device=DEVICE))
            with torch.no_grad():
                x = generate(step, ctx, exit_step, g)
            t = fm.sample_t(B, g, DEVICE, cfg.dmd_t_min, cfg.dmd_t_max)
            eps = torch.randn(x.shape, generator=g, device=DEVICE)
            x_t = fm.add_noise(x, eps, t)
            with grad_sync(crit, micro == cfg.grad_accum - 1), autocast(cfg):
                loss = dmd.critic_loss(crit(x_t, t, ctx), eps, x) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(crit.parameters(), cfg.grad_clip)
        row["critic_loss"] = all_mean(total).item()
        check_finite("critic", row["critic_loss"], step, stage_dir)
        opt_c.step()
        row["critic_grad_norm"] = as_float(gnorm)
        row["s_per_it"] = time.perf_counter() - t0

        if step % cfg.log_interval == 0:
            logger(row)
        if step % cfg.save_interval == 0 or step == cfg.max_iters:
            save_checkpoint(cfg, stage_dir, step, models, opts, reward.state_dict() if reward is not None else None)
    return gen


# -----------------------------------------------------------------------------


def fingerprint(model):
    """One float per model from its full weights: equal on every rank when data parallelism is right."""
    sd = full_state_dict(model, all_ranks=True)
    return sum(float(v.double().sum()) + 1e-3 * float(v.double().abs().sum()) for v in sd.values())


def main(argv=None):
    cfg = configure(TrainConfig(), argv, doc=__doc__)
    if cfg.stage not in ("teacher", "ode", "redmd"):
        raise SystemExit(f"--stage must be teacher, ode or redmd, got {cfg.stage!r}")
    cfg.teacher = resolve(cfg.teacher, "teacher_ema")  # a teacher stage folder -> its EMA weights
    cfg.student = resolve(cfg.student, "generator")
    if cfg.num_frames % cfg.chunk_frames:
        raise SystemExit(f"num_frames={cfg.num_frames} must be a multiple of chunk_frames={cfg.chunk_frames}")
    setup(cfg)
    stage_dir = os.path.join(cfg.out_dir, cfg.stage)
    if RANK == 0:
        os.makedirs(stage_dir, exist_ok=True)
    if WORLD > 1:
        dist.barrier()
    log(f"{cfg.stage}: {WORLD} process(es) on {DEVICE}, {cfg.dtype}, {cfg.dist if WORLD > 1 else 'single'}")
    try:
        gen = {"teacher": train_teacher, "ode": train_ode, "redmd": train_redmd}[cfg.stage](cfg, stage_dir)
        fp = fingerprint(gen)
        print(f"rank {RANK} generator fingerprint {fp:.10e}", flush=True)
        if WORLD > 1:  # no rank tears gloo/nccl down while another still has work in flight
            dist.barrier()
    finally:
        if WORLD > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
