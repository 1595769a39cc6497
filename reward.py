"""
Rewards for Re-DMD (paper §3.3). The interface training uses:

    r = reward(pixels, prompts)   # pixels [B, 3, T, H, W] in [-1, 1], prompts: list of B str -> [B] fp32, no grad

Re-DMD weights each sample's DMD gradient by exp(r / beta), so r should be a z-score (mean 0, std 1 over typical
samples): beta = 1/2 then means a one-sigma better video counts e^2 = 7.4x more.

- MotionReward: weightless, no downloads. The mean magnitude of temporal change, z-scored with running statistics.
  Enough to run Re-DMD end to end and to favour dynamic videos in toy experiments.
- VideoAlignReward: the paper's reward, VideoAlign's motion quality (MQ) from its Qwen2-VL-2B reward model (the
  network is qwen2vl.py; here: the chat format, the prompt template and the score). r = (MQ - 1.1646) / 1.3811,
  VideoAlign's own normalisation (a checkpoint whose model_config.json states other statistics is refused);
  `.score()` also gives VQ and TA.

    python weights.py convert videoalign checkpoint-11352/model.pth videoalign.safetensors   # once, then load that

- ToyMotionReward: VideoAlign's motion-quality role in the toy world (data/toyworld.py), a learned ~20k-parameter
  judge of whether a clip moves like the world's: the sprite intact, moving smoothly, no flicker, no jumps, not
  frozen. It ignores the caption. Trained once on world clips against perturbed ones (a couple of minutes on a CPU),
  shipped as data/toy/reward.safetensors:

    python reward.py train [--out data/toy/reward.safetensors] [--steps 800]
"""

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from config import cli, opt, train_command
from data import toyworld
from qwen2vl import VideoAlignModel, preprocess_video


class MotionReward:
    """r = z-score of log(eps + mean_t |x_{t+1} - x_t|): how much the video moves, relative to what it has seen.

    Running statistics: until `1 / (1 - momentum)` samples have been seen they are the exact mean and variance of
    every sample so far (batches pooled by the law of total variance), after that an exponential moving average
    with that momentum, so the reward follows the generator as it changes. The std is floored at `min_std`: a first
    batch of two near-identical videos must not make the next batch's z-scores explode. The statistics are plain
    floats in state_dict(), so a resumed run continues exactly. The log makes the score scale-free."""

    def __init__(self, momentum=0.99, eps=1e-3, min_std=0.1):
        self.momentum, self.eps, self.min_std = momentum, eps, min_std
        self.mean, self.var, self.count = 0.0, 0.0, 0  # of the raw score, over the samples seen

    def raw(self, pixels):
        """pixels [B, C, T, H, W] in [-1, 1] -> [B] log mean absolute frame difference."""
        if pixels.dim() != 5 or pixels.shape[2] < 2:
            raise ValueError(f"MotionReward needs pixels [B, C, T >= 2, H, W]; got {tuple(pixels.shape)}")
        d = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().float().mean(dim=(1, 2, 3, 4))
        return torch.log(self.eps + d)

    @torch.no_grad()
    def __call__(self, pixels, prompts=None):
        s = self.raw(pixels)
        n = s.numel()
        m, v = s.mean().item(), s.var(unbiased=False).item()  # one host sync per training step, outside any model
        a = min(self.momentum, self.count / (self.count + n))  # pooled average first, then the EMA
        self.var = a * self.var + (1 - a) * v + a * (1 - a) * (self.mean - m) ** 2
        self.mean = a * self.mean + (1 - a) * m
        self.count += n
        return (s - self.mean) / max(self.var**0.5, self.min_std)

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, sd):
        self.mean, self.var, self.count = sd["mean"], sd["var"], sd["count"]


# -----------------------------------------------------------------------------
# VideoAlign's reward
#   - The reward tokens are not appended by code: they sit inside the prompt template (VideoAlign's
#     `DETAILED_PROMPT_WITH_SPECIAL_TOKEN`, template type "detailed_special"), one after each rating request. The head
#     is read at the three of them in order of position, which in that template is [VQ, MQ, TA].
#   - Scores are z-scored with VideoAlign's published statistics, MQ z = (MQ - 1.1646) / 1.3811. Its inference code
#     reads them from model_config.json's inference_config ("VQ_mean", "VQ_std", "MQ_mean", ...); when the file states
#     them, the loader checks them against these constants and refuses a difference (weights.check_norm): Re-DMD's
#     weights exp(r / beta) depend on the scale of r.

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
REWARD_NAMES = ("VQ", "MQ", "TA")
REWARD_NORM = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}  # raw -> (raw - mean) / std
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2-VL's chat template adds it when there is no system turn
TEMPLATE_PLACEHOLDERS = ("{text_prompt}", "{prompt}")  # VideoAlign's name first; the template holds exactly one


class QwenChat:
    """Qwen2-VL's chat format for one user turn holding a video then text, built by hand (its chat template with
    add_generation_prompt=True), tokenized with `tokenizers` from the checkpoint's tokenizer.json. A tokenizer without
    the reward tokens (Qwen2-VL-2B-Instruct's own) gets them added, as VideoAlign did; their ids are checked."""

    def __init__(self, tokenizer_json, cfg):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.fspath(tokenizer_json))
        missing = [t for t in REWARD_TOKENS if self.tok.token_to_id(t) is None]
        if missing:
            self.tok.add_special_tokens(missing)
        expect = {"<|video_pad|>": cfg.video_token_id, **dict(zip(REWARD_TOKENS, cfg.reward_token_ids))}
        for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", *expect):
            got = self.tok.token_to_id(t)
            if got is None or got != expect.get(t, got):
                raise ValueError(f"{tokenizer_json}: token {t} has id {got}, the model expects {expect.get(t, 'one')}; "
                                 "use the tokenizer.json of the VideoAlign checkpoint or of Qwen2-VL-2B-Instruct")
        self.video_id = cfg.video_token_id
        self.pad_id = self.tok.token_to_id("<|endoftext|>") or 0

    @staticmethod
    def text(user_text):
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|video_pad|><|vision_end|>{user_text}<|im_end|>\n<|im_start|>assistant\n")

    def encode(self, user_text, n_video_tokens):
        """-> list of ids, the one <|video_pad|> expanded to n_video_tokens (the merged vision tokens t*h/2*w/2).
        Special tokens are split out before the rest is tokenized, so expanding after is exact."""
        ids = self.tok.encode(self.text(user_text), add_special_tokens=False).ids
        i = ids.index(self.video_id)
        return ids[:i] + [self.video_id] * n_video_tokens + ids[i + 1 :]


def read_template(path):
    """The prompt template is part of the checkpoint's training contract: VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN
    text, read verbatim from a file the user provides. Refuse rather than score with another text."""
    how = ("save VideoAlign's template verbatim, from a clone of github.com/KlingAIResearch/VideoAlign: "
           "python -c \"import prompt_template as p; "
           "open('videoalign_template.txt', 'w').write(p.DETAILED_PROMPT_WITH_SPECIAL_TOKEN)\"")
    if path is None:
        raise ValueError(f"VideoAlign needs its prompt template file and none was given; {how}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such template file; {how}")
    with open(path, encoding="utf-8") as fh:
        return check_template(fh.read(), path, how)


def check_template(text, src="template", how=""):
    holders = [(p, text.count(p)) for p in TEMPLATE_PLACEHOLDERS if p in text]
    if len(holders) != 1 or holders[0][1] != 1:
        raise ValueError(f"{src}: needs exactly one prompt placeholder, {TEMPLATE_PLACEHOLDERS[0]} (or "
                         f"{TEMPLATE_PLACEHOLDERS[1]}); found {holders or 'none'}. {how}")
    at = [text.find(t) for t in REWARD_TOKENS]
    if any(text.count(t) != 1 for t in REWARD_TOKENS) or at != sorted(at):
        raise ValueError(f"{src}: needs each of {', '.join(REWARD_TOKENS)} exactly once and in that order (the reward "
                         f"head is read at them); is this VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN? {how}")
    return text


def fill_template(template, prompt):
    holder = next(p for p in TEMPLATE_PLACEHOLDERS if p in template)
    return template.replace(holder, prompt)


# ----------------------------------------------------------------------------- the reward callable


class VideoAlignReward:
    """r = reward(pixels [B, 3, T, H, W] in [-1, 1], prompts) -> [B] fp32 VideoAlign MQ z-score, no grad.

    fps: the frame rate of the videos given (Wan: 16), from which 2 fps are sampled as VideoAlign does."""

    def __init__(self, model, chat, template, fps=16):
        self.model, self.chat, self.fps = model, chat, fps
        self.template = check_template(template)

    @classmethod
    def from_pretrained(cls, ckpt_path, tokenizer_json, template_file, dtype=None, device=None, fps=16, lora_alpha=None):
        template = read_template(template_file)  # refuse before reading 5 GB of weights
        model = VideoAlignModel.from_pretrained(ckpt_path, dtype=dtype, device=device, lora_alpha=lora_alpha,
                                                norm=REWARD_NORM)
        return cls(model, QwenChat(tokenizer_json, model.cfg), template, fps=fps)

    def inputs(self, pixels, prompts):
        """-> (input_ids (B, L) right-padded, pixel_values (N, 3*tp*p*p), grid_thw (B, 3)) on the model's device."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"VideoAlignReward needs pixels [B, 3, T, H, W] in [-1, 1]; got {tuple(pixels.shape)}")
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {pixels.shape[0]} videos")
        cfg, p = self.model.cfg, next(self.model.parameters())
        pv, grids = zip(*(preprocess_video(v, self.fps, layout="cthw", patch=cfg.patch_size, tp=cfg.temporal_patch,
                                           merge=cfg.merge) for v in pixels))
        grid = torch.cat(grids)  # (B, 3) CPU
        ids = [self.chat.encode(fill_template(self.template, text), int(g.prod()) // cfg.merge**2)
               for text, g in zip(prompts, grid)]
        for text, row in zip(prompts, ids):
            if sum(row.count(i) for i in cfg.reward_token_ids) != 3:
                raise ValueError(f"prompt {text[:60]!r} changes the number of reward tokens; it must not contain them")
        L = max(map(len, ids))
        input_ids = torch.tensor([row + [self.chat.pad_id] * (L - len(row)) for row in ids], device=p.device)
        return input_ids, torch.cat(pv).to(p.device, p.dtype), grid

    @torch.no_grad()
    def score(self, pixels, prompts, normalize=False):
        """-> {"VQ", "MQ", "TA"}: [B] fp32 raw scores, or VideoAlign's z-scores with normalize=True."""
        raw = self.model(*self.inputs(pixels, prompts))  # (B, 3)
        out = {}
        for i, name in enumerate(REWARD_NAMES):
            mean, std = REWARD_NORM[name]
            out[name] = (raw[:, i] - mean) / std if normalize else raw[:, i]
        return out

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        return self.score(pixels, prompts, normalize=True)["MQ"]


# -----------------------------------------------------------------------------
# The toy world's motion-quality reward: VideoAlign's MQ role at toy scale
#   - A learned judge, not a measure: a tiny 3D conv net (frame pairs -> shape -> short tracks, then pooled over the
#     frame and over time: the typical, the worst and the quietest moment) scores whether a clip moves like the world
#     of data/toyworld.py: one intact sprite, moving smoothly, no flicker, no jumps, not frozen. It never reads the
#     caption (eval.py checks captions; a reward must not).
#   - Trained once (python reward.py train) with a binary cross-entropy on world clips against perturbed ones, each
#     perturbation at a random severity sev in [0, 1]. The target probability falls with the severity (world 0.97; a
#     perturbed clip 0.5 (1 - sev), at least 0.03; two defects the product), so the logit is graded: a barely
#     perturbed clip sits between the world and a broken one, and a clip with several defects below one with one,
#     instead of every defect saturating at one value.
#   - Fixed normalisation, as VideoAlign's: r = (logit - mean) / std, the statistics of the logit over a calibration
#     set (half held-out world clips, half perturbed at random severities) computed once at training time and stored
#     in the file's metadata.

TOY_WORLD_OFFSET = 1000  # training draws clips from toyworld world seed TOY_WORLD_OFFSET + seed; world 0 stays unseen
TOY_CALIB_WORLD = 999  # the calibration set's world seed (neither the training worlds nor the repo's world 0)
TOY_FAMILIES = ("flicker", "noise", "blur", "teleport", "frozen", "fragment", "vanish", "shuffle")
TOY_VIDEO_KINDS = ("flicker", "noise", "blur", "frozen", "shuffle")  # act on the pixels, not on the sprite's layers
TOY_FRAGMENTS = ("holes", "erode", "dilate", "smear", "mix", "split")  # the ways "fragment" breaks the sprite
TOY_KINDS = tuple((f, m) for f in TOY_FAMILIES for m in (TOY_FRAGMENTS if f == "fragment" else (None,)))
# how often each kind is drawn: a share per family, fragment's 3 shares split among its modes, and 2 for frozen (the
# still video Re-DMD exists to avoid, and the kind the net found hardest: a slow clip also has still frame pairs)
TOY_SHARES = {"fragment": 3 / len(TOY_FRAGMENTS), "frozen": 2}
TOY_KIND_P = np.array([TOY_SHARES.get(f, 1.0) for f, _ in TOY_KINDS])
TOY_KIND_P = TOY_KIND_P / TOY_KIND_P.sum()
TOY_COMPOUND = 0.3  # the share of negatives that get a second, pixel-level defect on top of the first
TOY_POS_NOISE = 0.05  # positives get Gaussian noise of std U(0, this): the score must not be a noise detector alone
TOY_REWARD_WHERE = "python reward.py train --out {path}"  # how the file is made (named in errors)


@dataclass
class ToyRewardConfig:
    width: int = 16  # channels of the first two layers (the last has 2 * width)
    sprite: int = toyworld.SPRITE  # px: the object's size, which sets the receptive field (it must see it whole)


class ToyMotionNet(nn.Module):
    """pixels (B, 3, T >= 2, H, W) in [-1, 1] -> logit (B,): does this move like the toy world? Any T >= 2, H, W."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.width
        # the last spatial conv is dilated so the receptive field 5 + 2 d spans the sprite grown by a pixel on every
        # side (a blob) and the background around that: whole-object size and shape are judged in one place
        d = max(1, math.ceil((cfg.sprite + 4 - 5) / 2))
        self.pair = nn.Conv3d(3, C, (2, 3, 3), padding=(0, 1, 1))  # each output sees frames t, t+1: motion, flicker
        self.shape = nn.Conv3d(C, C, (1, 3, 3), padding=(0, 1, 1))  # within a pair: edges, pieces, blobs
        self.track = nn.Conv3d(C, 2 * C, 3, padding=(0, d, d), dilation=(1, d, d))  # 3 pairs x the sprite: steadiness
        self.head = nn.Sequential(nn.Linear(8 * C, 2 * C), nn.SiLU(), nn.Linear(2 * C, 1))

    def forward(self, x):
        x = x.clamp(-1, 1)  # what a video file would hold; generator samples overshoot a little
        h = F.silu(self.pair(x))  # (B, C, T-1, H, W)
        h = F.silu(self.shape(h))  # (B, C, T-1, H, W)
        # the end pairs stand in for their missing neighbours in time (zeros would look like a still moment)
        h = F.pad(h, (0, 0, 0, 0, 1, 1), mode="replicate")  # (B, C, T+1, H, W)
        h = F.silu(self.track(h))  # (B, 2C, T-1, H, W)
        # per moment, the whole frame: its mean (noise, blur everywhere) and its max (the object, a jump, a gap)
        mean, peak = h.mean(dim=(3, 4)), h.amax(dim=(3, 4))  # (B, 2C, T-1) each
        # over time: typical, worst and quietest moment (a frozen stretch is a moment whose peak motion is missing)
        h = torch.cat([mean.mean(2), peak.mean(2), peak.amax(2), peak.amin(2)], dim=1)  # (B, 8C)
        return self.head(h).squeeze(1)  # (B,)


class ToyMotionReward:
    """r = reward(pixels [B, 3, T >= 2, H, W] in [-1, 1], prompts) -> [B] fp32 z-score, no grad; prompts are ignored.

    r = (logit - mean) / std with fixed constants from training time (the file's metadata), like VideoAlign's published
    MQ statistics, rather than MotionReward's running z-score: the same video gets the same r at step 1 and step 600
    and in every run, so Re-DMD's weights exp(r / beta) reward absolute motion quality, and a generator that is bad
    everywhere is not told its best sample is good. mean / std are over a calibration set of half world clips, half
    perturbed ones, so r ~ +1 for world-like motion and ~ -1 for a typical defect. The price: a poor generator's
    samples all sit low with a small spread (the shipped toy student's: r ~ -1.5 +- 0.2), so exp(r / beta) varies
    less between them than a running z-score would make it; a smaller beta sharpens it. state_dict() holds the two
    constants, so a resumed run checks that it scores with the same file."""

    def __init__(self, net, mean, std, src="ToyMotionReward"):
        self.net, self.mean, self.std, self.src = net.eval(), float(mean), float(std), str(src)

    @classmethod
    def from_pretrained(cls, path, device=None):
        """A file written by train_toy_reward; config and statistics from its metadata. Errors name the file."""
        path = os.fspath(path)
        make = TOY_REWARD_WHERE.format(path=path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such toy reward file; make it with: {make}")
        ckpt = weights.read(path)  # strict: every key and shape checked by weights.build below
        what = f"a ToyMotionReward (remake it with: {make})"
        if not {"config", "logit_mean", "logit_std"} <= set(ckpt.meta):
            raise weights.CheckpointError(f"{path}: no config, logit_mean or logit_std in its metadata: not {what}")
        cfg = weights.config_from_meta(ToyRewardConfig, ckpt.meta, path)
        net = weights.build(ToyMotionNet, cfg, ckpt, what, dtype=torch.float32, device=device)
        return cls(net, float(ckpt.meta["logit_mean"]), float(ckpt.meta["logit_std"]), src=path)

    @torch.no_grad()
    def __call__(self, pixels, prompts=None):
        if pixels.dim() != 5 or pixels.shape[1] != 3 or pixels.shape[2] < 2:
            raise ValueError(f"ToyMotionReward needs pixels [B, 3, T >= 2, H, W] in [-1, 1]; got {tuple(pixels.shape)}")
        p = next(self.net.parameters())
        with torch.autocast(p.device.type, enabled=False):  # ~20k parameters: fp32 always, whatever the caller's
            logit = self.net(pixels.to(p.device, p.dtype))  # (B,)
        return ((logit - self.mean) / self.std).float().to(pixels.device)

    def state_dict(self):
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, sd):
        if (sd.get("mean"), sd.get("std")) != (self.mean, self.std):
            raise ValueError(f"{self.src}: normalises with mean {self.mean}, std {self.std}, but the resumed run's "
                             f"reward state is {sd}: it scored with another toy reward file, or another reward")


# ----------------------------------------------------------------------------- world clips and how to break them


def world_layers(spec, start, T, size):
    """The layers of frames start .. start+T-1 of the world clip of `spec`: background (3, T, S, S), the sprite's
    top-left corners (T, 2) int (x, y), its bitmaps (T, s, s) float and its colour (3,)."""
    n = start + T
    bg = toyworld.background(spec, n, size)[:, start:]  # (3, T, S, S)
    pos = np.floor(toyworld.trajectory(spec, n, size)).astype(np.int64)[start:]  # (T, 2)
    masks = toyworld.TEMPLATES[spec.shape].float()[None].repeat(T, 1, 1)  # (T, s, s)
    return bg, pos, masks, torch.tensor(toyworld.COLORS[spec.color])


def place(masks, pos, size):
    """Sprite bitmaps (T, s, s) at corners pos (T, 2) -> coverage (T, S, S) in [0, 1] (parts off the frame dropped)."""
    T, s = masks.shape[0], masks.shape[-1]
    cover = torch.zeros(T, size + 2 * s, size + 2 * s)  # a margin of s on every side, cropped below
    for t, (x, y) in enumerate(pos):
        cover[t, y + s : y + 2 * s, x + s : x + 2 * s] = masks[t]
    return cover[:, s:-s, s:-s]


def compose(bg, cover, color):
    """bg (3, T, S, S), coverage (T, S, S), colour (3,) -> video (3, T, S, S): toyworld.render for a 0/1 coverage."""
    return bg * (1 - cover) + color[:, None, None, None] * cover


def gaussian_blur(x, sigma):
    """x (N, H, W) -> the same, blurred with a Gaussian of std sigma px (replicate padding)."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x[:, None], (r, r, r, r), mode="replicate")  # (N, 1, H + 2r, W + 2r)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


def toy_break_video(v, kind, sev, rng):
    """The perturbations that act on a whole video (3, T, H, W) -> the same shape; kind: one of TOY_VIDEO_KINDS."""
    _, T, H, W = v.shape
    if kind == "flicker":  # every frame its own brightness / colour offset, or its own burst of noise
        amp = 0.05 + 0.35 * sev
        if rng.random() < 0.5:
            return v + amp * torch.from_numpy(rng.standard_normal((3 if rng.random() < 0.5 else 1, T, 1, 1))).float()
        sig = amp * torch.from_numpy(rng.uniform(0, 2, (1, T, 1, 1))).float()
        return v + sig * torch.from_numpy(rng.standard_normal(v.shape)).float()
    if kind == "noise":  # a diffusion sample's leftover noise, heavier than any positive gets
        return v + (0.06 + 0.44 * sev) * torch.from_numpy(rng.standard_normal(v.shape)).float()
    if kind == "blur":  # the whole clip soft
        return gaussian_blur(v.reshape(3 * T, H, W), 0.5 + 0.7 * sev).view(3, T, H, W)
    if kind == "frozen":  # from frame k on nothing moves (k = 0: a still picture)
        k = round((1 - sev) * max(0, T - 3))
        return torch.cat([v[:, :k], v[:, k : k + 1].expand(-1, T - k, -1, -1)], dim=1)
    if kind == "shuffle":  # frames out of order: random swaps of frames that differ
        order = np.arange(T)
        for _ in range(1 + round(sev * max(0, T // 2 - 1))):
            for _ in range(50):
                i, j = rng.choice(T, size=2, replace=False)
                if not torch.equal(v[:, order[i]], v[:, order[j]]):
                    order[i], order[j] = order[j], order[i]
                    break
        return v[:, torch.from_numpy(order)]
    raise ValueError(f"video perturbation {kind!r}: one of {TOY_VIDEO_KINDS}")


def toy_perturbed(spec, kind, sev, rng, start, T, size, mode=None):
    """Frames start .. start+T-1 of the clip of `spec`, broken in the way `kind` (one of TOY_FAMILIES) at severity
    sev in [0, 1] (0: barely, 1: plainly): video (3, T, S, S). rng: a numpy Generator; mode: for "fragment", one of
    TOY_FRAGMENTS (default: a random one)."""
    bg, pos, masks, color = world_layers(spec, start, T, size)
    s, hi = masks.shape[-1], size - masks.shape[-1]
    video = lambda: compose(bg, place(masks, pos, size), color)  # noqa: E731
    some = lambda frac: np.flatnonzero(rng.random(T) < frac) if T > 1 else np.array([0])  # noqa: E731

    if kind in TOY_VIDEO_KINDS:
        return toy_break_video(video(), kind, sev, rng)
    if kind == "teleport":  # the sprite jumps to a random place (further than any world step) and goes on from there
        jump = math.ceil(2 * max(toyworld.SPEEDS.values())) + 1  # "speeds up" doubles the fastest speed
        n = 1 + round(sev * max(0, (T - 2) // 3))
        world = pos.copy()
        for t in sorted(rng.choice(np.arange(1, T), size=min(n, T - 1), replace=False)):
            for _ in range(50):
                new = rng.integers(0, hi + 1, size=2)
                if np.abs(new - pos[t]).max() >= jump:
                    break
            pos[t:] = np.clip(world[t:] + (new - world[t]), 0, hi)
        return video()
    if kind == "fragment":  # the sprite broken in some frames (all of them at sev = 1)
        mode = mode or TOY_FRAGMENTS[rng.integers(len(TOY_FRAGMENTS))]
        frames = some(0.3 + 0.7 * sev)
        if len(frames) == 0:
            frames = rng.integers(T, size=1)
        if mode == "holes":  # pixels missing
            frac = 0.15 + 0.35 * sev
            masks[frames] *= torch.from_numpy(rng.random((len(frames), s, s)) >= frac).float()
        elif mode == "erode":  # one px eaten from the outline
            outside = F.pad(masks[frames][:, None], (1, 1, 1, 1))  # (n, 1, s+2, s+2): the bitmap's border erodes too
            masks[frames] = -F.max_pool2d(-outside, 3, 1)[:, 0]
        elif mode == "dilate":  # a blob: one px grown on every side (4-neighbours)
            plus = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]]).view(1, 1, 3, 3)
            cover = place(masks, pos, size)
            cover[frames] = (F.conv2d(cover[frames][:, None], plus, padding=1)[:, 0] > 0).float()
            return compose(bg, cover, color)
        elif mode == "smear":  # soft edges, the colour bleeding out
            cover = place(masks, pos, size)
            cover[frames] = gaussian_blur(cover[frames], 0.6 + 0.8 * sev).clamp(0, 1)
            return compose(bg, cover, color)
        elif mode == "mix":  # another shape's bitmap in some frames, never all: the shape changes along the clip
            others = [toyworld.TEMPLATES[k].float() for k in toyworld.SHAPES if k != spec.shape]
            frames = frames[: max(1, T - max(1, T // 5))]
            for t in frames:
                masks[t] = others[rng.integers(len(others))]
        elif mode == "split":  # cut in two at a row or column, the pieces pulled apart
            cover = torch.zeros(len(frames), size, size)
            for i, t in enumerate(frames):
                cut, gap, axis = int(rng.integers(1, s)), int(rng.integers(1, 3)), int(rng.integers(2))
                a, b = masks[t].clone(), masks[t].clone()
                if axis == 0:
                    a[cut:], b[:cut] = 0, 0
                else:
                    a[:, cut:], b[:, :cut] = 0, 0
                shift = np.array([0, gap]) if axis == 0 else np.array([gap, 0])
                cover[i] = (place(a[None], pos[t : t + 1], size) + place(b[None], pos[t : t + 1] + shift, size))[0]
            full = place(masks, pos, size)
            full[frames] = cover.clamp(0, 1)
            return compose(bg, full, color)
        else:
            raise ValueError(f"fragment mode {mode!r}: one of {TOY_FRAGMENTS}")
        return video()
    if kind == "vanish":  # the sprite gone (or faded, when mild) in some frames
        n = 1 + round(sev * max(0, T - 2))
        masks[rng.choice(T, size=min(n, T), replace=False)] *= max(0.0, 0.5 - sev)
        return video()
    raise ValueError(f"perturbation {kind!r}: one of {TOY_FAMILIES}")


def toy_augment(video, rng):
    """What a world-like sample may look like: mild noise (std U(0, TOY_POS_NOISE)) and a gain / offset constant over
    time. Applied to positives and negatives alike, so neither mild noise nor a colour cast tells them apart."""
    gain, offset = 1 + 0.05 * rng.standard_normal(), 0.05 * rng.standard_normal()
    noise = rng.uniform(0, TOY_POS_NOISE) * torch.from_numpy(rng.standard_normal(video.shape)).float()
    return gain * video + offset + noise


def toy_target(sev):
    """The probability a clip with one defect of severity sev should get: 0.5 (barely) down to 0.03 (plainly)."""
    return max(0.03, 0.5 * (1 - sev))


def toy_batch(rng, n, world, first, T_max, size, T=None, kinds=TOY_KINDS, p=TOY_KIND_P):
    """n world clips (from index `first` of world seed `world`) and one perturbation of each, a random kind (family,
    fragment mode) and severity, all augmented: x (2n, 3, T, S, S), target probabilities (2n,), kinds (n,) as
    indices into `kinds`, drawn with probabilities p (TOY_KIND_P). A share TOY_COMPOUND of the negatives get a second
    defect (a pixel-level one) and the product of the two targets (at least 0.003): a sample with several defects, as
    a poor generator's are, scores below one with a single defect instead of all of them sitting at one floor.
    T: frames per clip (default a random window length in [max(2, T_max // 2), T_max])."""
    T = T or int(rng.integers(max(2, T_max // 2), T_max + 1))
    pos, neg, q, fam = [], [], [], []
    for i in range(n):
        spec = toyworld.sample_spec(first + i, world, size)
        start = int(rng.integers(0, T_max - T + 1))
        k, sev = int(rng.choice(len(kinds), p=p)), float(rng.random())
        pos.append(toy_augment(toyworld.render(spec, start + T, size)[:, start:], rng))  # frames start .. start+T-1
        v, qk = toy_perturbed(spec, kinds[k][0], sev, rng, start, T, size, mode=kinds[k][1]), toy_target(sev)
        if rng.random() < TOY_COMPOUND:
            sev2 = float(rng.random())
            v = toy_break_video(v, TOY_VIDEO_KINDS[rng.integers(len(TOY_VIDEO_KINDS))], sev2, rng)
            qk = max(0.003, qk * toy_target(sev2))
        neg.append(toy_augment(v, rng))
        q.append(qk)
        fam.append(k)
    x = torch.stack(pos + neg)  # (2n, 3, T, S, S)
    target = torch.tensor([0.97] * n + q)  # (2n,)
    return x, target, torch.tensor(fam)


# ----------------------------------------------------------------------------- training it


def train_toy_reward(out_path, steps=800, seed=0, size=16, num_frames=12, log=print, batch=32, lr=3e-3, calib=256):
    """Train a ToyMotionNet on world clips vs perturbed ones (BCE to the graded targets of toy_batch), calibrate it,
    and write it to out_path (safetensors, atomically; None: do not write). Deterministic for a seed on one thread.
    -> ToyMotionReward. batch: world clips per step (each also gives one negative); calib: calibration clips."""
    t0 = time.time()
    cfg = ToyRewardConfig()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        net = ToyMotionNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng([seed, 1])
    world = TOY_WORLD_OFFSET + seed
    warm = max(1, steps // 20)
    log(f"toy reward: {sum(p.numel() for p in net.parameters())} parameters, {steps} steps of {batch} world clips + "
        f"{batch} perturbed, {size}x{size}, up to {num_frames} frames, world seed {world}")
    every, ema = max(1, steps // 10), None
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup, then cosine to 10 %
            g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        x, q, _ = toy_batch(rng, batch, world, step * batch, num_frames, size)
        loss = F.binary_cross_entropy_with_logits(net(x), q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {ema:.4f}  {time.time() - t0:.0f}s")
    net.eval()
    # calibration: the logit over held-out world clips and their perturbations at random severities, T = num_frames
    with torch.no_grad():
        crng = np.random.default_rng([seed, 2])
        logits, fams = [], []
        for first in range(0, calib, 64):
            x, _, fam = toy_batch(crng, min(64, calib - first), TOY_CALIB_WORLD, first, num_frames, size, T=num_frames)
            logits.append(net(x))
            fams.append(fam)
        logit = torch.cat([torch.stack(l.chunk(2)) for l in logits], dim=1)  # (2 = world / perturbed, calib)
        fam = torch.cat(fams)
    mean, std = logit.mean().item(), logit.std().item()
    won = (logit[0] > logit[1]).float()
    log(f"calibrated: logit mean {mean:.3f} std {std:.3f}; world {logit[0].mean():.2f}, perturbed "
        f"{logit[1].mean():.2f}; world beats its perturbation in {won.mean():.1%} of clips ("
        + ", ".join(f"{f}{':' + m if m else ''} {won[fam == i].mean():.0%}" for i, (f, m) in enumerate(TOY_KINDS)
                    if (fam == i).any()) + ")")
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        meta = {"logit_mean": repr(mean), "logit_std": repr(std), "train": json.dumps(
            {"steps": steps, "seed": seed, "size": size, "num_frames": num_frames, "batch": batch, "lr": lr})}
        weights.save_safetensors(net, out_path, meta=meta)  # a temporary file renamed into place
        log(f"wrote {out_path} ({os.path.getsize(out_path) / 1024:.0f} kB) in {time.time() - t0:.0f}s")
    return ToyMotionReward(net, mean, std, src=out_path or "ToyMotionReward")


@dataclass
class ToyRewardTrainConfig:
    out: str = opt(os.path.join("data", "toy", "reward.safetensors"), "where the toy reward's weights go")
    steps: int = opt(800, "training steps (each: 32 world clips and 32 perturbed ones)")
    seed: int = opt(0, "initialisation and data seed (training clips come from toy world seed 1000 + seed)")
    size: int = opt(16, "frame height and width in pixels (the toy world's frames are square)")
    num_frames: int = opt(12, "video frames per training clip (windows of half to all of them are used)")


def main(argv=None):
    cfg = train_command(ToyRewardTrainConfig(), argv, __doc__, "reward.py")
    if cfg is None:
        return
    least = toyworld.SPRITE + toyworld.ROOM  # the world needs room for the sprite to head somewhere
    if cfg.steps < 1 or cfg.size < least or cfg.num_frames < 2:
        raise SystemExit(f"--steps={cfg.steps} --size={cfg.size} --num_frames={cfg.num_frames}: steps >= 1, size >= "
                         f"{least} px (the sprite and room to move), num_frames >= 2")
    torch.set_num_threads(1)  # tiny tensors; and on one thread every run writes the same weights, bit for bit
    train_toy_reward(cfg.out, steps=cfg.steps, seed=cfg.seed, size=cfg.size, num_frames=cfg.num_frames)


if __name__ == "__main__":
    cli(main)
