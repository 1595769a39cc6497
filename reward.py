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
"""

import os

import torch

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
