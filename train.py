"""
Reward Forcing training: a few-step causal student distilled from a bidirectional Wan2.1 teacher, then rewarded
distribution matching (Re-DMD, paper §3.3) through the EMA-Sink cache. One process, or many under torchrun (DDP for
small models, FSDP2 for 1.3B / 14B); processes, sharding, checkpoints and logs live in plumbing.py.

Three networks: the `student` (the few-step causal generator G), the `teacher` (the real score, frozen) and the
`critic` (the fake score, which follows the student's samples); plus `student_ema`, the student's EMA.

  --stage=teacher  Toy worlds only: flow-matching pretraining of a small bidirectional teacher on data/toyworld.py
                   (the real recipe starts from Wan2.1 instead).
  --stage=ode      ODE initialisation (paper §4). The teacher samples ODE trajectories (48 Euler steps, shift 8,
                   CFG 6 against the negative prompt, the grid passing exactly through the student's 4 timesteps)
                   into a shard folder; the student learns to jump from the trajectory's points at those timesteps
                   to the clean end point, all chunks in one block-causal forward (--ode_mask) with a random
                   timestep per chunk.
  --stage=redmd    Re-DMD. Every iteration a critic step: flow matching on fresh student rollouts. Every
                   `student_every` iterations first a student step: roll out through the EMA-Sink cache, score each
                   video with the reward r (default VideoAlign, whose files must be given), and weight its DMD
                   gradient by exp(r / beta) (paper Eq. 11).

Sizes are the video's: --num_frames pixel frames, --height / --width pixels. With Wan's VAE 1 + 4 (F - 1) frames and
8 x 8 pixels make one latent (81 x 480 x 832 -> 21 x 60 x 104); with the toy VAE (vae.py train) every frame and 4 x 4
pixels make one (12 x 16 x 16 -> 12 x 4 x 4); with no --vae the latents are the video.

Where this trainer departs from the released Reward Forcing trainer, on purpose:
  - One optimizer step per accumulated batch, gradients zeroed every step. The released trainer stepped the generator
    every 40 iterations, twice, and re-applied stale critic gradients.
  - Training streams through the sampling cache (window 9, EMA sink). The released trainer used a 21-frame cache that
    never evicted, so its EMA sink never ran in training.
  - Gradient across chunks (--cache_grad=through, the default) is the exact derivative: each chunk's t = 0 cache pass
    runs with grad and the EMA folds are differentiable. The released code passes a straight-through estimate instead
    (later chunks read the t = 0 K/V, their gradient lands on the exit step's K/V written in place); --cache_grad=none
    keeps the cached context constant (sink.py, README "Gradient through the cache").
  - ODE pairs exactly at the student's timesteps: the teacher's Euler grid passes through them. Self Forcing's ODE
    script (which Reward Forcing starts from) keeps points 0, 12, 24, 36 of a 48-step shift-8 trajectory, t = 1000,
    960, 888.9, 727.3, while its student samples at shift 5: t = 1000, 937.5, 833.3, 625.
  - Options beyond the paper, off by default: --reward_clip=c clamps r before exp(r / beta), whose weights are
    heavy-tailed for a z-scored r (E[exp(2 z)] = e^2); --reward_norm=true divides the gradient by the mean weight
    over the global batch; --beta=inf or --reward=none is plain DMD; --reward=toy is the toy world's learned reward,
    --reward=motion a weightless one.
Every random draw comes from (seed, step, rank), so --resume=true continues exactly; checkpoints are written
atomically (plumbing.py). A non-finite loss stops the run before the optimizer step and names the last good
checkpoint. With no --teacher / --text_encoder / --vae the networks are random tiny presets with a word-level tiny
umT5 (tests and toy runs).

    python train.py config/toy.py --stage=ode
    torchrun --standalone --nproc_per_node=8 train.py --stage=redmd --teacher=Wan2.1-T2V-1.3B \\
        --text_encoder=Wan2.1-T2V-1.3B --vae=Wan2.1-T2V-1.3B --prompts=prompts.txt --dist=fsdp \\
        --reward_ckpt=videoalign.safetensors --reward_tokenizer=tokenizer.json --reward_template=videoalign_template.txt
"""

import contextlib
import copy
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import dmd
import weights
from config import cli, configure, opt, pick_device, pick_dtype, read_prompt_file, writable_dir
from dmd import FlowMatch
from model import PRESETS, WanConfig, WanModel
from plumbing import Proc, StageDir, checkpoints, grad_sync, item, latest_checkpoint, resume_point, unwrap
from sink import GRADS, SinkCache, rollout, settings_error
from weights import VIDEOALIGN_WHERE, WAN_WHERE, CheckpointError


@dataclass
class TrainConfig:
    stage: str = opt("redmd", "teacher (toy pretraining), ode (ODE initialisation) or redmd (Re-DMD)")
    out_dir: str = opt("out", "checkpoints, logs and ODE pairs go to out_dir/<stage>/")
    resume: bool = opt(False, "continue from out_dir/<stage>/latest")
    # networks: a checkpoint file or folder, or a stage folder of this script (its latest checkpoint)
    model: str = opt("tiny", "WanModel preset of randomly initialised networks (no --teacher)")
    teacher: str = opt("", "bidirectional teacher (real score); a teacher-stage folder means its EMA; empty: random init")
    student: str = opt("", "student init; empty: the ODE stage's latest student (redmd) if any, else the teacher")
    critic: str = opt("", "critic (fake score) init; empty: the teacher (with a 14B teacher, give the 1.3B base)")
    text_encoder: str = opt("", "Wan2.1 folder with umT5; empty: a tiny random encoder over the prompts' words")
    vae: str = opt("", "VAE (Wan2.1's, or the toy world's from vae.py train): the teacher stage trains on its latents "
                       "of the world's clips, the reward sees decoded pixels; empty: the latents are the video")
    prompts: str = opt("", "text file, one prompt per line")
    negative_prompt: Optional[str] = opt(None, "for CFG; none: Wan's with --text_encoder, else 'static blurry'")
    # video and streaming
    num_frames: int = opt(81, "video frames per rollout, in pixel frames (81 = 21 latent frames with Wan's VAE)")
    height: int = opt(480, "video height in pixels (60 latent rows with Wan's VAE)")
    width: int = opt(832, "video width in pixels (104 latent columns with Wan's VAE)")
    chunk_frames: int = opt(3, "latent frames per chunk")
    window_frames: int = opt(9, "attention window in latent frames, sink and current chunk included")
    sink_frames: int = opt(3, "sink size in latent frames")
    sink_mode: str = opt("ema", "cache mode: ema | static | none | full (paper Table 3)")
    alpha: float = opt(0.999, "EMA momentum of the sink (paper Eq. 4-5)")
    cache_grad: str = opt("through", "gradient through the rollout's cache: through (exact: later chunks' losses reach "
                                     "earlier chunks via the K/V and sink folds they attend to) | none (cached context "
                                     "is constant; cheaper)")
    student_steps: list[int] = opt(factory=lambda: [1000, 750, 500, 250],
                                   help="student timesteps before the shift (repeat the flag)")
    student_shift: float = opt(5.0, "sigma shift of the student's schedule and of DMD's timesteps")
    # teacher stage (toy world)
    teacher_shift: float = opt(3.0, "teacher pretraining: sigma shift of the sampled timesteps")
    caption_dropout: float = opt(0.1, "teacher pretraining: share of empty captions (for CFG)")
    lr_teacher: float = opt(3e-4, "teacher pretraining learning rate")
    teacher_ema_decay: float = opt(0.999, "teacher pretraining: EMA decay of the saved teacher")
    init: str = opt("", "teacher pretraining: start from these weights instead of a random init (a file, or a "
                        "teacher-stage folder: its EMA), e.g. a teacher trained on shorter clips; the optimizer starts "
                        "fresh")
    # ODE stage
    ode_pairs: int = opt(16000, "teacher trajectories to sample (paper: 16k)")
    ode_steps: int = opt(48, "teacher Euler steps")
    ode_shift: float = opt(8.0, "teacher sigma shift")
    ode_guidance: float = opt(6.0, "teacher CFG scale for the trajectories")
    ode_mask: str = opt("causal", "student's attention in the ODE stage: causal (full block-causal: each chunk sees "
                                  "itself and every earlier frame, the paper) | window (the streaming window and sink "
                                  "at absolute RoPE positions)")
    # Re-DMD
    student_every: int = opt(5, "a student step every N iterations (paper: 5); a critic step every iteration")
    dmd_guidance: float = opt(4.0, "CFG scale of the teacher's real score (released code: cond + 3 (cond - uncond))")
    dmd_t_min: float = opt(20.0, "smallest DMD / critic timestep")
    dmd_t_max: float = opt(980.0, "largest DMD / critic timestep")
    reward: str = opt("videoalign", "videoalign (the paper's VideoAlign motion quality; needs the --reward_ files) | "
                                    "toy (the toy world's learned motion quality, reward.ToyMotionReward) | "
                                    "motion (weightless frame-difference reward) | none (plain DMD)")
    reward_ckpt: str = opt("", "videoalign: merged safetensors, or checkpoint-11352/model.pth; toy: the ToyMotionReward "
                               "file (empty: data/toy/reward.safetensors)")
    reward_tokenizer: str = opt("", "videoalign: tokenizer.json (the checkpoint's or Qwen2-VL-2B-Instruct's)")
    reward_template: str = opt("", "videoalign: VideoAlign's prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN, saved "
                                   "to a file")
    beta: float = opt(0.5, "Re-DMD temperature: weight exp(r / beta); inf = DMD")
    reward_clip: Optional[float] = opt(None, "clamp r to [-c, c] before exp (none: off)")
    reward_norm: bool = opt(False, "normalise the weights to mean 1 over the global batch")
    # optimisation
    max_iters: int = opt(600, "iterations (paper: 600 for Re-DMD)")
    batch_size: int = opt(1, "samples per rank per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr_student: float = opt(2e-6, "student (generator) learning rate")
    lr_critic: float = opt(4e-7, "critic (fake score) learning rate")
    beta1: float = opt(0.0, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_iters: int = opt(0, "linear learning-rate warm-up over the first N iterations (0: none)")
    decay_lr: bool = opt(False, "cosine learning-rate decay after the warm-up, to min_lr_frac x lr at max_iters")
    min_lr_frac: float = opt(0.1, "with --decay_lr: the final learning rate as a fraction of the initial one")
    grad_clip: float = opt(10.0, "gradient norm clip")
    ema_decay: float = opt(0.99, "student EMA decay")
    ema_start: int = opt(200, "the student EMA copies the student exactly before this step")
    # system
    dist: str = opt("ddp", "ddp or fsdp (FSDP2 fully_shard per block) under torchrun")
    device: str = opt("auto", "cpu, cuda, mps, ... | auto (the current accelerator, else cpu); torchrun: one per rank")
    dtype: str = opt("auto", "autocast dtype: float32 | bfloat16 | float16 | auto (bf16 on an accelerator, fp32 on CPU)")
    compile: bool = opt(False, "torch.compile the networks")
    compile_backend: str = opt("inductor", "torch.compile backend (aot_eager: quick checks)")
    grad_ckpt: bool = opt(False, "gradient checkpointing of every block: teacher pretraining, the ODE stage, the "
                                 "critic and the student's streaming rollout (exact: recomputation reads the cache "
                                 "the forward read)")
    seed: int = opt(0, "all randomness derives from (seed, step, rank): resume is exact")
    log_interval: int = opt(1, "iterations between log lines")
    save_interval: int = opt(100, "iterations between checkpoints (and one at the end)")
    keep_ckpts: int = opt(2, "checkpoints kept on disk")
    wandb_project: str = opt("", "log to wandb too (only if installed)")


# Checkpoint files keep the names sample.py, eval.py and model.py's loaders (and the shipped docs) read:
# generator.safetensors and generator_ema.safetensors hold the student and student_ema, critic.safetensors the
# critic, teacher.safetensors and teacher_ema.safetensors the teacher stage's teacher and its EMA.
REWARDS = ("videoalign", "toy", "motion", "none")
TOY_REWARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy", "reward.safetensors")
STAGE_FILES = {"teacher": ("teacher", "teacher_ema"), "ode": ("generator",), "redmd": ("generator", "generator_ema", "critic")}


class Latent(NamedTuple):
    """A rollout's latent size, derived in main from the pixel settings."""

    F: int  # frames
    h: int  # rows
    w: int  # columns


# -----------------------------------------------------------------------------
# every setting checked, before any model loads or process group starts


def stage_file(path, name):
    """A stage folder (out/toy/teacher) means its latest checkpoint's `name`.safetensors; anything else is as given."""
    if path and os.path.isdir(path) and latest_checkpoint(path):
        return os.path.join(latest_checkpoint(path), f"{name}.safetensors")
    return path


# what the ODE stage's pairs depend on: a folder of pairs sampled with other values is not reused
PAIR_SETTINGS = ("ode_pairs", "ode_steps", "ode_shift", "ode_guidance", "student_steps", "student_shift", "num_frames",
                 "height", "width", "seed", "prompts", "teacher", "negative_prompt")
# done.json's "grid": the teacher's Euler grid passes exactly through the student's timesteps. Pairs written before
# (no "grid" key) kept the nearest grid points instead (the real recipe: up to 9.6 off the student's t): refused.
PAIR_GRID = "exact"
ODE_MASKS = ("causal", "window")  # --ode_mask


def ode_attention(cfg):
    """The ODE stage's chunk-causal mask as WanModel.forward's window_frames / sink_frames (model.chunk_keys).
    causal: every chunk sees itself and all earlier frames (the paper; Self Forcing's ODE initialisation).
    window: the streaming cache's frames (sink + window; every earlier frame for --sink_mode=full), but at absolute
    RoPE positions, so a query sees its sink up to F - 1 frames away while streaming renumbers (README, Training)."""
    if cfg.ode_mask == "causal" or cfg.sink_mode == "full":
        return {"window_frames": None, "sink_frames": 0}
    return {"window_frames": cfg.window_frames, "sink_frames": 0 if cfg.sink_mode == "none" else cfg.sink_frames}


def resolve(cfg):
    """The one place train.py checks its settings: every value, file and folder, so a bad one exits with one line
    naming it before any model loads (and before torchrun's process group starts). Also resolves them once as the
    stages read them: dtype, negative prompt, networks' files, latent sizes. Returns (cfg, Latent)."""
    from t5 import NEGATIVE_PROMPT, Tokenizer
    from weights import wan_file

    def need(ok, msg):
        if not ok:
            raise SystemExit(msg)

    need(cfg.stage in ("teacher", "ode", "redmd"), f"--stage={cfg.stage}: takes teacher, ode or redmd")
    need(cfg.dist in ("ddp", "fsdp"), f"--dist={cfg.dist}: takes ddp or fsdp")
    need(cfg.cache_grad in GRADS, f"--cache_grad={cfg.cache_grad}: takes {' or '.join(GRADS)}")
    need(cfg.ode_mask in ODE_MASKS, f"--ode_mask={cfg.ode_mask}: takes causal (full block-causal, the paper) or "
                                    "window (the streaming window and sink)")
    dtype = str(pick_dtype(cfg.dtype, pick_device(cfg.device))).removeprefix("torch.")  # 'auto' -> a name
    need((err := settings_error(cfg)) is None, err)
    for name in ("max_iters", "batch_size", "grad_accum", "student_every", "save_interval", "log_interval",
                 "keep_ckpts", "ode_pairs", "ode_steps"):
        need(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
    need(cfg.warmup_iters >= 0, f"--warmup_iters={cfg.warmup_iters}: must be >= 0")
    for name in ("caption_dropout", "teacher_ema_decay", "ema_decay", "beta1", "beta2", "min_lr_frac"):
        need(0.0 <= getattr(cfg, name) <= 1.0, f"--{name}={getattr(cfg, name)}: must be in [0, 1]")
    for name in ("lr_teacher", "lr_student", "lr_critic", "grad_clip", "student_shift", "teacher_shift", "ode_shift"):
        need(getattr(cfg, name) > 0, f"--{name}={getattr(cfg, name)}: must be > 0")
    need(cfg.student_steps and all(0 < t <= 1000 for t in cfg.student_steps),
         f"--student_steps={cfg.student_steps}: one or more timesteps in (0, 1000], e.g. 1000 750 500 250")
    need(0 <= cfg.dmd_t_min < cfg.dmd_t_max <= 1000, f"--dmd_t_min={cfg.dmd_t_min} --dmd_t_max={cfg.dmd_t_max}: "
         "need 0 <= min < max <= 1000")
    need(cfg.beta > 0, f"--beta={cfg.beta}: the temperature is > 0 (inf: plain DMD)")
    need(cfg.reward in REWARDS, f"--reward={cfg.reward}: takes {', '.join(REWARDS)}")
    need(cfg.reward_clip is None or cfg.reward_clip > 0, f"--reward_clip={cfg.reward_clip}: > 0, or none")
    # the VAE's strides (from its file's header): F latent frames <-> 1 + ts (F - 1) video frames, ss x ss pixels per
    # latent (Wan's: 4 and 8; the toy's: 1 and 4); no VAE: the latents are the video
    ts, ss, z_dim = 1, 1, None
    if cfg.vae:
        from vae import VAEConfig

        need(os.path.exists(cfg.vae), f"--vae={cfg.vae}: no such file or folder (Wan2.1's VAE: {WAN_WHERE}; the toy "
                                      "world's: python vae.py train)")
        try:
            vae_cfg = weights.vae(cfg.vae, VAEConfig)[1]
        except (CheckpointError, OSError) as err:
            raise SystemExit(f"--vae={cfg.vae}: {err}") from None
        ts, ss, z_dim = vae_cfg.temporal_stride, vae_cfg.spatial_stride, vae_cfg.z_dim
    n, C = cfg.num_frames, cfg.chunk_frames
    vae = f" with this VAE (temporal stride {ts})" if cfg.vae and ts > 1 else ""
    need(n >= 1 and (n - 1) % ts == 0, f"--num_frames={n}: video frames must be 1 + {ts} k, k >= 0{vae}")
    F = 1 + (n - 1) // ts
    allowed = ", ".join(str(1 + ts * (k * C - 1)) for k in (1, 2, 3))
    need(F % C == 0, f"--num_frames={n}: {F} latent frames, not a multiple of --chunk_frames={C}; "
                     f"video frames must be one of {allowed}, ...")
    for name, px in (("height", cfg.height), ("width", cfg.width)):
        need(px >= 1 and px % ss == 0, f"--{name}={px}: pixels must be a positive multiple of {ss} (the VAE's stride)")

    # files and folders: each named setting must exist and be what it says
    teacher = stage_file(cfg.teacher, "teacher_ema")  # a teacher stage folder -> its EMA teacher
    student = stage_file(cfg.student, "generator")
    ode_ckpt = latest_checkpoint(os.path.join(cfg.out_dir, "ode"))
    if cfg.stage == "redmd" and not student and ode_ckpt:  # Re-DMD starts from the ODE stage's student
        student = os.path.join(ode_ckpt, "generator.safetensors")
    init = stage_file(cfg.init, "teacher_ema")
    need(not init or cfg.stage == "teacher", f"--init={cfg.init}: only --stage=teacher takes it (the ODE stage starts "
                                             "from --teacher or --student, Re-DMD from --student)")
    nets = {}  # each network's config, from its checkpoint's header (names and shapes, no tensor read)
    for name, path in (("teacher", teacher), ("student", student), ("critic", cfg.critic), ("init", init)):
        if path and (cfg.stage != "teacher") == (name != "init"):
            need(os.path.exists(path), f"--{name}={path}: no such file or folder")
            try:
                nets[name] = weights.dit(path, WanConfig)[1]
            except (CheckpointError, OSError) as err:
                raise SystemExit(f"--{name}={getattr(cfg, name)}: {err}") from None
    if "teacher" not in nets and "init" not in nets:
        need(cfg.model in PRESETS, f"--model={cfg.model}: takes one of {', '.join(PRESETS)}"
                                   + ("" if cfg.stage == "teacher" else " (or give --teacher)"))
    net = nets.get("teacher") or nets.get("init") or PRESETS[cfg.model]  # the network the sizes must fit
    need((err := settings_error(cfg, F, net.rope_max_len)) is None, err)
    _, ph, pw = net.patch_size
    need(cfg.height % (ss * ph) == 0 and cfg.width % (ss * pw) == 0,
         f"--height={cfg.height} --width={cfg.width}: pixels must be multiples of {ss * ph} x {ss * pw} "
         f"(the VAE's stride {ss} times the network's patch {ph} x {pw})")
    need(not cfg.vae or net.in_dim == z_dim, f"the network has in_dim={net.in_dim}; --vae={cfg.vae} gives {z_dim}-channel "
                                             "latents")
    if cfg.stage == "teacher":  # the toy world's clips
        need(cfg.vae or net.in_dim == 3, f"the network has in_dim={net.in_dim}; with no --vae the toy world's latents "
                                         "are its RGB frames (3 channels): --model=toy-pixels, or give --vae")
        need(cfg.height == cfg.width, f"toy world frames are square: --height={cfg.height}, --width={cfg.width}")
    words = None
    if cfg.text_encoder:
        te = Path(cfg.text_encoder)
        files = {part: wan_file(te, part) for part in ("tokenizer", "umT5 text encoder")}
        lost = [part for part, f in files.items() if f is None]
        need(te.is_dir() and not lost, f"--text_encoder={te}: {'missing ' + ' and '.join(lost) if te.is_dir() else 'no such folder'}"
                                       f" (a Wan2.1 folder: {WAN_WHERE})")
        words = Tokenizer(files["tokenizer"]).unknown_words  # a word-level (toy) vocabulary; umT5 knows every word
    prompts = []
    if cfg.stage != "teacher":
        need(cfg.prompts, "--prompts is required: a text file with one prompt per line")
        prompts = read_prompt_file(cfg.prompts)
        if words is not None:
            unknown = sorted({w for p in prompts for w in words(p)})
            need(not unknown, f"--prompts={cfg.prompts}: words outside the vocabulary of --text_encoder="
                              f"{cfg.text_encoder}: {', '.join(unknown[:10])}")
    reward_ckpt = cfg.reward_ckpt or (TOY_REWARD if cfg.reward == "toy" else "")  # the toy reward's shipped file
    if cfg.reward == "toy" and cfg.stage == "redmd":
        need(os.path.isfile(reward_ckpt), f"--reward=toy: {reward_ckpt}: no such file (train it once: python reward.py "
             "train)")
    if cfg.reward == "videoalign" and cfg.stage == "redmd":  # the default: no silent fallback to a toy reward
        lost = [f"--{name}" + (f"={path} (no such file)" if path else " (unset)")
                for name in ("reward_ckpt", "reward_tokenizer", "reward_template")
                if not (path := getattr(cfg, name)) or not os.path.exists(path)]
        need(not lost, f"--reward=videoalign (the default: the paper's VideoAlign motion-quality reward) needs "
                       f"{', '.join(lost)}. The checkpoint: {VIDEOALIGN_WHERE}; the tokenizer: its tokenizer.json "
                       "(or Qwen2-VL-2B-Instruct's); the template: prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN "
                       "from GitHub KlingAIResearch/VideoAlign, saved to a file. Or --reward=motion (the weightless "
                       "toy reward) or --reward=none (plain DMD)")

    # the output folder: writable now, and no earlier run's checkpoints overwritten or pruned
    writable_dir(cfg.out_dir, f"--out_dir={cfg.out_dir}")
    here = os.path.join(cfg.out_dir, cfg.stage)
    if not cfg.resume and (checkpoints(here) or os.path.exists(os.path.join(here, "latest"))):
        raise SystemExit(f"--out_dir={cfg.out_dir}: {here} already holds checkpoints of a run (latest: "
                         f"{os.path.basename(latest_checkpoint(here) or '?')}); continue it with --resume=true, or "
                         "give a new --out_dir")
    if cfg.resume:  # its files readable now; that they fit the networks is checked as they load
        resume_point(here, [f"{name}.safetensors" for name in STAGE_FILES[cfg.stage]], load=False)
    neg = cfg.negative_prompt
    if neg is None:  # Wan's long negative prompt is umT5's; a tiny encoder of a few rows gets a short one
        neg = NEGATIVE_PROMPT if cfg.text_encoder else "static blurry"
    cfg = replace(cfg, dtype=dtype, negative_prompt=neg, student=student, teacher=teacher, init=init,
                  reward_ckpt=reward_ckpt)
    done = os.path.join(here, "pairs", "done.json")
    if cfg.stage == "ode" and os.path.exists(done):  # pairs of an earlier run are reused if they are these settings'
        pairs = os.path.dirname(done)
        try:
            with open(done) as fh:
                made = json.load(fh)
        except (OSError, ValueError):
            made = None
        need(isinstance(made, dict), f"{done}: not a readable record of the ODE pairs' settings: delete {pairs} to "
                                     "sample new ones, or give a new --out_dir")
        need(made.get("grid") == PAIR_GRID, f"{pairs} holds ODE pairs of an older train.py, at the teacher steps "
             "nearest the student's timesteps (its done.json has no \"grid\": \"exact\"): delete that folder to "
             "sample new ones exactly at them, or give a new --out_dir")
        differ = [f"--{k}={made[k]} (now {getattr(cfg, k)})" for k in PAIR_SETTINGS if k in made and made[k] != getattr(cfg, k)]
        need(not differ, f"{pairs} holds ODE pairs sampled with {', '.join(differ)}: delete that folder to sample new "
                         "ones, or give a new --out_dir")
    return cfg, Latent(F, cfg.height // ss, cfg.width // ss)



# -----------------------------------------------------------------------------
# networks, text, pixels, reward


def load_net(path, what, cfg, proc):
    """A WanModel in fp32: from a checkpoint, or randomly initialised from the preset (seeded: every rank builds the
    same weights)."""
    if path:
        proc.print(f"{what}: {path}")
        return WanModel.from_pretrained(path, dtype=torch.float32, device=proc.device)
    proc.print(f"{what}: random {cfg.model} (no checkpoint given)")
    torch.manual_seed(cfg.seed)
    return WanModel(PRESETS[cfg.model]).to(proc.device)


def text_encoder(cfg, prompts, net_cfg, device):
    """prompts -> context (B, text_len, text_dim) fp32, no grad. umT5 from --text_encoder, or a tiny random encoder
    over the prompts' words as wide as the network's text_dim (seeded: the same on every rank)."""
    from t5 import TextEncoder, tiny_text_encoder

    if cfg.text_encoder:
        te = TextEncoder.from_pretrained(cfg.text_encoder, dtype=None if device.type == "cpu" else torch.bfloat16,
                                         device=device, text_len=net_cfg.text_len)
    else:
        words = sorted({w for p in prompts + [cfg.negative_prompt] for w in p.split()})
        te = tiny_text_encoder(words, net_cfg.text_dim, net_cfg.text_len, seed=cfg.seed + 1).to(device)
    if te.tokenizer.text_len > net_cfg.text_len:
        raise SystemExit(f"text encoder pads to {te.tokenizer.text_len} rows; the network takes {net_cfg.text_len}")
    return lambda ps: te(ps).float()


def load_vae(cfg, device):
    """--vae as a frozen WanVAE (bf16 on an accelerator), or None."""
    if not cfg.vae:
        return None
    from vae import WanVAE

    vae = WanVAE.from_pretrained(cfg.vae, dtype=None if device.type == "cpu" else torch.bfloat16, device=device)
    return vae.requires_grad_(False)


def pixel_decoder(cfg, device):
    """latents (B, C, F, h, w) -> pixels (B, 3, 1 + ts (F - 1), ss h, ss w) in [-1, 1] for the reward, no grad: the
    VAE (strides ts, ss: Wan's 4, 8; the toy's 1, 4), or the latents themselves (no --vae)."""
    vae = load_vae(cfg, device)
    if vae is None:
        return lambda x: x
    return lambda x: vae.decode(x.to(next(vae.parameters()).dtype)).float()


def reward_model(cfg, device):
    """pixels, prompts -> r (B,), no grad; None for --reward=none."""
    if cfg.reward == "motion":
        from reward import MotionReward

        return MotionReward()
    if cfg.reward == "toy":
        from reward import ToyMotionReward

        try:
            return ToyMotionReward.from_pretrained(cfg.reward_ckpt, device=device)
        except (FileNotFoundError, CheckpointError) as err:
            raise SystemExit(f"--reward=toy: {err}") from None
    if cfg.reward == "videoalign":
        from reward import VideoAlignReward

        return VideoAlignReward.from_pretrained(cfg.reward_ckpt, cfg.reward_tokenizer, cfg.reward_template, device=device)
    if cfg.reward == "none":
        return None
    raise SystemExit(f"--reward must be one of {', '.join(REWARDS)}; got {cfg.reward!r}")


# -----------------------------------------------------------------------------
# the pieces every stage shares


def autocast(cfg, device):
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))


def adamw(model, lr, cfg):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


def lr_scale(step, cfg):
    """The learning rate at `step` (1-based) as a fraction of the configured one: a linear warm-up over warmup_iters,
    then constant, or with --decay_lr a cosine from 1 down to min_lr_frac at max_iters (nanoGPT's schedule). A
    function of the step alone, so a resumed run continues on the same curve."""
    if step <= cfg.warmup_iters:
        return step / cfg.warmup_iters
    if not cfg.decay_lr:
        return 1.0
    p = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * p))


def optimizer_step(what, step, model, optimizer, loss, cfg, run):
    """The end of every update: clip the gradient, average the loss over ranks, stop on a non-finite loss (every rank
    sees the same mean, so all stop together, before the step), set the scheduled learning rate (lr_scale), step.
    loss: this rank's sum over micro-batches. Returns the mean loss and the gradient norm before clipping, as floats."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    loss = run.proc.mean(loss).item()
    if not math.isfinite(loss):
        raise RuntimeError(f"{what} loss is {loss} at step {step}: stopping. The last good checkpoint is "
                           f"{run.latest() or '(none written yet)'}; lower the learning rate or check the data, "
                           "then --resume.")
    lr = {"teacher": cfg.lr_teacher, "critic": cfg.lr_critic}.get(what, cfg.lr_student)  # ODE and student
    for group in optimizer.param_groups:  # from the settings, not the optimizer's saved state: --resume may change lr
        group["lr"] = lr * lr_scale(step, cfg)
    optimizer.step()
    return loss, item(norm)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, parameter by parameter (sharded alike under FSDP)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)


def draw(prompts, cfg, g, g_shared):
    """A micro-batch: batch_size prompts for this rank, and the exit step of its rollout, the same on every rank
    (FSDP gathers weights in every forward, so the ranks must run the same number of them)."""
    ps = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=g, device=g.device).tolist()]
    exit_step = int(torch.randint(len(cfg.student_steps), (1,), generator=g_shared, device=g.device))
    return ps, exit_step


# -----------------------------------------------------------------------------
# stage 0 (toy worlds): a bidirectional teacher by flow matching


def train_teacher(cfg, lat, proc):
    """Flow matching (x_t = (1 - s) x0 + s eps, target v = eps - x0) on clips of the procedural world, with a share
    of empty captions so the teacher can do classifier-free guidance. The saved teacher is the EMA."""
    from data import toyworld

    dev = proc.device
    torch.manual_seed(cfg.seed)
    teacher = load_net(cfg.init, "init", cfg, proc) if cfg.init else WanModel(PRESETS[cfg.model]).init_weights().to(dev)
    encode = text_encoder(cfg, [" ".join(toyworld.WORDS), ""], teacher.cfg, dev)  # the vocabulary, for a tiny one
    vae = load_vae(cfg, dev)  # the toy VAE: the teacher learns its latents; none: the RGB frames themselves
    teacher.grad_ckpt = cfg.grad_ckpt
    teacher_ema = copy.deepcopy(teacher).requires_grad_(False).eval()
    backend = cfg.compile_backend if cfg.compile else None
    teacher, teacher_ema = proc.wrap(teacher.train(), True, backend), proc.wrap(teacher_ema, False, backend)
    opt_teacher = adamw(teacher, cfg.lr_teacher, cfg)
    run = StageDir(proc, cfg)
    models, opts = {"teacher": teacher, "teacher_ema": teacher_ema}, {"teacher": (teacher, opt_teacher)}
    start, _ = run.start(models, opts)
    fm = FlowMatch(cfg.teacher_shift)
    for step in range(start + 1, cfg.max_iters + 1):
        t0 = time.perf_counter()
        g = proc.rng(cfg.seed, step)
        opt_teacher.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            idx = torch.randint(2**31 - 1, (cfg.batch_size,), generator=g, device=dev).tolist()
            clips = [toyworld.clip(i, cfg.num_frames, cfg.height, seed=cfg.seed) for i in idx]
            x0 = torch.stack([c[0] for c in clips]).to(dev)  # (B, 3, T, H, W) in [-1, 1]
            if vae is not None:
                with torch.no_grad():
                    x0 = vae.encode(x0.to(next(vae.parameters()).dtype)).float()  # (B, z_dim, F, h, w), unit variance
            drop = torch.rand(len(idx), generator=g, device=dev) < cfg.caption_dropout
            caps = ["" if d else c[1] for c, d in zip(clips, drop.tolist())]
            t = fm.sample_t(len(idx), g, dev, 0.0, 1000.0)  # (B,)
            eps = torch.randn(x0.shape, generator=g, device=dev)
            with grad_sync(teacher, micro == cfg.grad_accum - 1), autocast(cfg, dev):
                loss = dmd.flow_matching_loss(teacher(fm.add_noise(x0, eps, t), t, encode(caps)), eps, x0) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        loss, norm = optimizer_step("teacher", step, teacher, opt_teacher, loss_sum, cfg, run)
        ema_update(teacher_ema, teacher, cfg.teacher_ema_decay if step > 1 else 0.0)
        if step % cfg.log_interval == 0:
            run.log({"step": step, "fm_loss": loss, "grad_norm": norm, "lr": opt_teacher.param_groups[0]["lr"],
                     "s_per_it": time.perf_counter() - t0})
        if step % cfg.save_interval == 0 or step == cfg.max_iters:
            run.save(step, models, opts)
    return teacher_ema


# -----------------------------------------------------------------------------
# stage 1: ODE pairs from the teacher, and the student's regression on them


@torch.no_grad()
def sample_ode_pairs(cfg, lat, proc, teacher, encode, prompts, folder):
    """Each rank samples the trajectories i = rank, rank + world, ... and writes them as safetensors shards:
    lat (n, K+1, C, F, h, w) at the student's K timesteps, plus the clean end; t (K+1,) those timesteps and 0, the
    same float32 values the student's rollout uses; the prompts in the metadata."""
    from safetensors.torch import save_file

    dev = proc.device
    fm = FlowMatch(cfg.ode_shift)
    # the teacher's Euler grid passes exactly through the student's timesteps (dmd.FlowMatch.trajectory): the kept
    # latents sit at the t the student sees in its rollouts, not at the nearest of 48 shift-8 steps (up to 9.6 off)
    student_t = FlowMatch(cfg.student_shift).timesteps(cfg.student_steps)
    ts = fm.trajectory(cfg.ode_steps, through=student_t)  # 1000 ... 0
    keep = [ts.index(st) for st in student_t] + [len(ts) - 1]
    neg = encode([cfg.negative_prompt])  # (1, L, D)
    mine = list(range(proc.rank, cfg.ode_pairs, proc.world))
    for s in range(0, len(mine), cfg.batch_size):
        idx = mine[s : s + cfg.batch_size]
        ps = [prompts[i % len(prompts)] for i in idx]
        B = len(idx)
        g = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + idx[0])
        x = torch.randn(B, unwrap(teacher).cfg.in_dim, *lat, generator=g, device=dev)  # (B, C, F, h, w)
        with autocast(cfg, dev):
            _, kept = dmd.euler_sample(teacher, x, ts, encode(ps), neg, cfg.ode_guidance, keep)
        path = os.path.join(folder, f"shard_r{proc.rank:03d}_{s:07d}.safetensors")
        save_file({"lat": torch.stack([kept[i] for i in keep], dim=1).cpu().contiguous(),
                   "t": torch.tensor([ts[i] for i in keep])}, path + ".tmp", metadata={"prompts": json.dumps(ps)})
        os.replace(path + ".tmp", path)
    proc.print(f"ODE pairs: {cfg.ode_pairs} trajectories of {len(ts) - 1} Euler steps in {folder}, kept grid points "
               f"{keep} (t = {[round(ts[i], 1) for i in keep]})")


class OdePairs:
    """All shards of a folder, read lazily one pair at a time."""

    def __init__(self, folder, device):
        from safetensors import safe_open

        self.items, self.device = [], device
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), "pt") as fh:
                    prompts = json.loads(fh.metadata()["prompts"])
                    self.t = fh.get_tensor("t")
                self.items += [(os.path.join(folder, name), j, p) for j, p in enumerate(prompts)]
        if not self.items:
            raise SystemExit(f"{folder}: no ODE pair shards")

    def get(self, indices):
        """-> lat (B, K+1, C, F, h, w) fp32, prompts."""
        from safetensors import safe_open

        lats, ps = [], []
        for i in indices:
            path, j, p = self.items[i]
            with safe_open(path, "pt") as fh:
                lats.append(fh.get_slice("lat")[j : j + 1])
            ps.append(p)
        return torch.cat(lats).to(self.device).float(), ps


def train_ode(cfg, lat, proc):
    """The causal student regresses the teacher's ODE end points from the trajectories' points at its timesteps."""
    dev = proc.device
    prompts = read_prompt_file(cfg.prompts)
    teacher = load_net(cfg.teacher, "teacher", cfg, proc).requires_grad_(False).eval()
    encode = text_encoder(cfg, prompts, teacher.cfg, dev)
    student = load_net(cfg.student, "student", cfg, proc) if cfg.student else copy.deepcopy(teacher)
    backend = cfg.compile_backend if cfg.compile else None
    run = StageDir(proc, cfg)
    folder = os.path.join(run.path, "pairs")
    if not os.path.exists(os.path.join(folder, "done.json")):  # sample once; a resumed run reuses the shards
        if proc.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        proc.barrier()
        sample_ode_pairs(cfg, lat, proc, proc.wrap(teacher, False, backend), encode, prompts, folder)
        proc.barrier()
        if proc.rank == 0:
            with open(os.path.join(folder, "done.json"), "w") as fh:
                json.dump({k: getattr(cfg, k) for k in PAIR_SETTINGS} | {"grid": PAIR_GRID}, fh)
    pairs = OdePairs(folder, dev)
    K = len(pairs.t) - 1  # student timesteps; index K is the clean end point
    del teacher

    student.requires_grad_(True).train()
    student.grad_ckpt = cfg.grad_ckpt
    student = proc.wrap(student, True, backend)
    opt_student = adamw(student, cfg.lr_student, cfg)
    models, opts = {"generator": student}, {"generator": (student, opt_student)}
    start, _ = run.start(models, opts)
    fm = FlowMatch(cfg.student_shift)
    C = cfg.chunk_frames
    for step in range(start + 1, cfg.max_iters + 1):
        t0 = time.perf_counter()
        g = proc.rng(cfg.seed, step)
        opt_student.zero_grad(set_to_none=True)
        loss_sum = 0.0
        # the whole accumulated batch is drawn at once: batch 2 x accum 1 and batch 1 x accum 2 see the same pairs
        idx_all = torch.randint(len(pairs.items), (cfg.grad_accum, cfg.batch_size), generator=g, device=dev)
        k_all = torch.randint(K, (cfg.grad_accum, cfg.batch_size, lat.F // C), generator=g, device=dev)
        for micro in range(cfg.grad_accum):
            x, ps = pairs.get(idx_all[micro].tolist())  # (B, K+1, C, F, h, w)
            B = x.shape[0]
            k = k_all[micro].repeat_interleave(C, dim=1)  # (B, F): one random student timestep per chunk
            x_t = torch.gather(x, 1, k[:, None, None, :, None, None].expand(B, 1, *x.shape[2:])).squeeze(1)
            t = pairs.t.to(dev)[k]  # (B, F)
            with grad_sync(student, micro == cfg.grad_accum - 1), autocast(cfg, dev):
                v = student(x_t, t, encode(ps), chunk_frames=C, **ode_attention(cfg)).float()
                x0 = x_t - fm.sigma(t)[:, None, :, None, None] * v  # (B, C, F, h, w)
                loss = dmd.ode_loss(x0, x[:, K]) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        loss, norm = optimizer_step("ODE", step, student, opt_student, loss_sum, cfg, run)
        if step % cfg.log_interval == 0:
            run.log({"step": step, "ode_loss": loss, "grad_norm": norm, "lr": opt_student.param_groups[0]["lr"],
                     "s_per_it": time.perf_counter() - t0})
        if step % cfg.save_interval == 0 or step == cfg.max_iters:
            run.save(step, models, opts)
    return student


# -----------------------------------------------------------------------------
# stage 2: Re-DMD


def train_redmd(cfg, lat, proc):
    """Re-DMD (paper §3.3) on self-forcing rollouts of the student through the EMA-Sink cache."""
    dev = proc.device
    prompts = read_prompt_file(cfg.prompts)
    teacher = load_net(cfg.teacher, "teacher", cfg, proc).requires_grad_(False).eval()
    encode, decode, reward = text_encoder(cfg, prompts, teacher.cfg, dev), pixel_decoder(cfg, dev), reward_model(cfg, dev)
    student = load_net(cfg.student, "student", cfg, proc) if cfg.student else copy.deepcopy(teacher)
    critic = load_net(cfg.critic, "critic", cfg, proc) if cfg.critic else copy.deepcopy(teacher)
    critic.requires_grad_(True).train()
    student.requires_grad_(True).train()
    student_ema = copy.deepcopy(student).requires_grad_(False).eval()
    critic.grad_ckpt = student.grad_ckpt = cfg.grad_ckpt
    backend = cfg.compile_backend if cfg.compile else None  # wrap after every copy: FSDP converts a module in place
    student, critic = proc.wrap(student, True, backend), proc.wrap(critic, True, backend)
    student_ema, teacher = proc.wrap(student_ema, False, backend), proc.wrap(teacher, False, backend)
    opt_student, opt_critic = adamw(student, cfg.lr_student, cfg), adamw(critic, cfg.lr_critic, cfg)
    run = StageDir(proc, cfg)
    models = {"generator": student, "generator_ema": student_ema, "critic": critic}
    opts = {"generator": (student, opt_student), "critic": (critic, opt_critic)}
    start, reward_state = run.start(models, opts)
    if reward_state is not None and reward is not None:
        reward.load_state_dict(reward_state)

    fm = FlowMatch(cfg.student_shift)
    neg = encode([cfg.negative_prompt])  # (1, L, D)

    def generate(ctx, exit_step, g):
        """Self-forcing rollout through the sampling cache (EMA-Sink, paper §3.2) -> x (B, C, F, h, w). With grad:
        through each chunk's exit-step forward, and with --cache_grad=through also through the K/V later chunks
        read (each chunk's clean t = 0 pass and the sink's EMA folds); under torch.no_grad() a sampling cache."""
        grad = cfg.cache_grad if torch.is_grad_enabled() else None
        cache = SinkCache.from_settings(unwrap(student), cfg, ctx.shape[0], lat.h, lat.w, num_frames=lat.F,
                                        dtype=getattr(torch, cfg.dtype), grad=grad)
        with autocast(cfg, dev):
            chunks = rollout(student, cache, lat.F // cfg.chunk_frames, context=ctx,
                             timesteps=fm.timesteps(cfg.student_steps), exit_step=exit_step, generator=g)
            return torch.cat(list(chunks), dim=2)

    def x0_of(net, x_t, t, ctx):  # a flow-matching network's denoised estimate mu(x_t, t) = x_t - s v
        with autocast(cfg, dev):
            return fm.x0_from_v(x_t, net(x_t, t, ctx).float(), t)

    def student_step(step, g, g_shared):
        """Re-DMD, paper Eq. 11: each rollout's DMD gradient (s_real - s_fake, Eq. 1-2) weighted by exp(r / beta)."""
        opt_student.zero_grad(set_to_none=True)
        loss_sum, rs, ws = 0.0, [], []
        for micro in range(cfg.grad_accum):
            ps, exit_step = draw(prompts, cfg, g, g_shared)
            ctx = encode(ps)  # (B, L, D)
            B = ctx.shape[0]
            with grad_sync(student, micro == cfg.grad_accum - 1):
                x = generate(ctx, exit_step, g)  # (B, C, F, h, w)
                with torch.no_grad():
                    r = reward(decode(x), ps).to(dev).float() if reward is not None else torch.zeros(B, device=dev)
                    w = dmd.reward_weight(r, cfg.beta, cfg.reward_clip)  # (B,) exp(r / beta), Eq. 9-11
                    t = fm.sample_t(B, g, dev, cfg.dmd_t_min, cfg.dmd_t_max)  # (B,)
                    x_t = fm.add_noise(x, torch.randn(x.shape, generator=g, device=dev), t)  # Psi(G(eps), t)
                    x0_fake = x0_of(critic, x_t, t, ctx)  # fake score: the critic, conditional only
                    x0_cond, x0_uncond = x0_of(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                               torch.cat([ctx, neg.expand(B, -1, -1)])).chunk(2)
                    x0_real = dmd.cfg(x0_cond, x0_uncond, cfg.dmd_guidance)  # real score: the teacher with CFG
                loss = dmd.dmd_loss(x, x0_real, x0_fake, w) / cfg.grad_accum  # d loss / d x = w (x0_fake - x0_real) / norm
                loss.backward()
            loss_sum += loss.detach()
            rs.append(r)
            ws.append(w)
        w_mean = proc.mean(torch.cat(ws).mean()).item()  # over the global batch (every rank holds as many samples)
        if cfg.reward_norm:  # sum_b w_b l_b / sum_b w_b over the global batch: one scalar rescale of the gradient
            for p in student.parameters():
                if p.grad is not None:
                    p.grad.div_(w_mean)
        loss, norm = optimizer_step("student", step, student, opt_student, loss_sum, cfg, run)
        ema_update(student_ema, student, cfg.ema_decay if step >= cfg.ema_start else 0.0)  # a copy before ema_start
        return {"student_loss": loss, "reward": proc.mean(torch.cat(rs).mean()).item(), "weight": w_mean,
                "student_grad_norm": norm}

    def critic_step(step, g, g_shared):
        """The fake score follows the student: flow matching on fresh rollouts (no grad into the student)."""
        opt_critic.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            ps, exit_step = draw(prompts, cfg, g, g_shared)
            ctx = encode(ps)  # (B, L, D)
            with torch.no_grad():
                x = generate(ctx, exit_step, g)  # (B, C, F, h, w)
            t = fm.sample_t(x.shape[0], g, dev, cfg.dmd_t_min, cfg.dmd_t_max)
            eps = torch.randn(x.shape, generator=g, device=dev)
            x_t = fm.add_noise(x, eps, t)
            with grad_sync(critic, micro == cfg.grad_accum - 1), autocast(cfg, dev):
                loss = dmd.flow_matching_loss(critic(x_t, t, ctx), eps, x) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        loss, norm = optimizer_step("critic", step, critic, opt_critic, loss_sum, cfg, run)
        return {"critic_loss": loss, "critic_grad_norm": norm}

    for step in range(start + 1, cfg.max_iters + 1):
        t0 = time.perf_counter()
        g, g_shared = proc.rng(cfg.seed, step), proc.rng(cfg.seed, step, shared=True)
        row = {"step": step}
        if step % cfg.student_every == 0:  # the student every student_every iterations (paper: 5), the critic every one
            row |= student_step(step, g, g_shared)
        row |= critic_step(step, g, g_shared)
        row["s_per_it"] = time.perf_counter() - t0
        if step % cfg.log_interval == 0:
            run.log(row)
        if step % cfg.save_interval == 0 or step == cfg.max_iters:
            run.save(step, models, opts, reward.state_dict() if reward is not None else None)
    return student


# -----------------------------------------------------------------------------

STAGES = {"teacher": train_teacher, "ode": train_ode, "redmd": train_redmd}


def main(argv=None):
    """Train one stage; returns the trained network (the student; the teacher stage: the teacher's EMA), or None
    under torchrun when this call started the process group (it ends with the call)."""
    cfg, lat = resolve(configure(TrainConfig(), argv, doc=__doc__))
    proc = Proc.setup(cfg.device, cfg.dist)
    try:
        proc.print(f"{cfg.stage}: {proc.world} process(es) on {proc.device}, {cfg.dtype}, "
                   f"{cfg.dist if proc.world > 1 else 'single'}, latents {lat.F} x {lat.h} x {lat.w}")
        net = STAGES[cfg.stage](cfg, lat, proc)
        proc.barrier()  # no rank tears the process group down while another still has work in flight
        if proc.owner and proc.world > 1:  # the group ends below: free what holds its work first (a sharded network
            net = None  # freed after destroy_process_group aborted 2 of 30 gloo runs: "terminate called without an
            gc.collect()  # active exception"); the stage's closures form cycles, hence the collection
        return net
    finally:
        proc.close()


if __name__ == "__main__":
    cli(main)
