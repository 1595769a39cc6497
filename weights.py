"""
Checkpoint layouts: everything this repository knows about how weights are stored, in one place.

The networks (model.py, t5.py, vae.py, qwen2vl.py) name their modules after the official checkpoints, so loading
those is a strict copy, and each network's `from_pretrained` is a few lines that call into here. This module holds
what the networks should not:
  - one reader: safetensors (sharded or not) and torch pickles (`torch.load(weights_only=True, mmap=True)`), with
    tensors read one at a time as they are loaded, so an 11 GB text encoder is never held twice;
  - one renaming mechanism (`rename`: shared prefixes stripped, then every (regex, replacement) row of a table
    applied in order) and every table: Diffusers <-> Wan for the DiT and the VAE, Hugging Face <-> Wan for umT5,
    newer transformers <-> VideoAlign's for Qwen2-VL;
  - the PEFT LoRA merge of VideoAlign's reward model;
  - one strict key/shape check with one error format, and the sizes each checkpoint implies;
  - the conversion command:

    python weights.py convert dit rewardforcing.pt rewardforcing.safetensors --dtype=bfloat16
    python weights.py convert videoalign VideoReward/checkpoint-11352/model.pth videoalign.safetensors
"""

import dataclasses
import json
import math
import os
import re
import sys
import typing
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the network it is loaded into (every loader raises it)."""


# -----------------------------------------------------------------------------
# where the official files are (named in error messages)

DIT_WHERE = ("a Wan2.1 DiT checkpoint: a folder of Wan-AI/Wan2.1-T2V-1.3B (or -Diffusers), or a .safetensors / .pt "
             "file such as rewardforcing.pt (JaydenLu666/Reward-Forcing-T2V-1.3B)")
WAN_WHERE = "Hugging Face repos Wan-AI/Wan2.1-T2V-1.3B (Wan layout) or Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
VIDEOALIGN_WHERE = ("Hugging Face KlingTeam/VideoReward (formerly KwaiVGI/VideoReward; code: GitHub "
                    "KlingAIResearch/VideoAlign): checkpoint-11352/model.pth, with model_config.json in the folder "
                    "above it")
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE_FILE = "Wan2.1_VAE.pth"
# what a Wan2.1-T2V folder holds beside the DiT, each as its candidate paths in order of preference (Diffusers
# layout, then the original one)
WAN_FOLDER = {
    "tokenizer": ("tokenizer/tokenizer.json", "google/umt5-xxl/tokenizer.json", "tokenizer.json"),
    "umT5 text encoder": ("text_encoder", WAN_T5_FILE),
    "VAE": ("vae", WAN_VAE_FILE),
}


def wan_file(folder, part):
    """Where a part of a Wan2.1 folder (a key of WAN_FOLDER) is: the first of its candidate paths that exists, or None."""
    return next((Path(folder) / c for c in WAN_FOLDER[part] if (Path(folder) / c).exists()), None)

# -----------------------------------------------------------------------------
# rename tables: (regex on a stored name, replacement), every row applied in order by `rename`

# DiT: diffusers WanTransformer3DModel -> Wan2.1 (shapes are identical)
DIT_DIFFUSERS = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"^blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"^blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"^blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"^blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # the affine LN before cross-attention
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]
# prefixes stripped when every key carries them: ComfyUI repacks, Self / Reward Forcing generators, compiled or DDP
DIT_PREFIXES = ["model.diffusion_model.", "model.", "_orig_mod.", "module."]
# a training checkpoint (.pt) keeps the generator under one of these keys; the first found wins
DIT_PICKLE_KEYS = ["generator_ema", "generator", "model", "state_dict"]
# files of a train.py checkpoint folder, in order of preference when no key is given
DIT_FOLDER_FILES = ["generator_ema", "generator", "teacher_ema", "teacher"]

# umT5: Hugging Face UMT5EncoderModel (Diffusers text_encoder/) -> Wan's models_t5_umt5-xxl-enc-bf16.pth
T5_HF = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.embed_tokens\.weight$", "token_embedding.weight"),  # tied to shared.weight: one is kept
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]


def vae_diffusers(num_res_blocks):
    """VAE: diffusers AutoencoderKLWan -> Wan2.1_VAE.pth. Block-internal names go first (a resnet's conv1/conv2 must
    not meet the renamed top-level conv1/conv2). The decoder's flat index is (num_res_blocks + 2) * stage + r:
    num_res_blocks + 1 resnets, then the upsampler."""
    n = num_res_blocks + 2
    return [
        (r"\.norm1\.gamma$", ".residual.0.gamma"),
        (r"\.conv1\.(weight|bias)$", r".residual.2.\1"),
        (r"\.norm2\.gamma$", ".residual.3.gamma"),
        (r"\.conv2\.(weight|bias)$", r".residual.6.\1"),
        (r"\.conv_shortcut\.", ".shortcut."),
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.upsamples.{n * int(m[1]) + int(m[2])}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{n * int(m[1]) + n - 1}."),
    ]


VAE_DIFFUSERS_KEY = re.compile(r"^((encoder|decoder)\.(conv_in|mid_block|down_blocks|up_blocks|norm_out|conv_out)|"
                               r"(post_)?quant_conv)\.")  # a key only the Diffusers layout has

# Qwen2-VL (VideoAlign's reward model): stored under PEFT's wrapper; VideoAlign saved with transformers' older
# layout, which is ours as is; transformers >= 4.52 nests the language model and the vision tower one level deeper
QWEN_PREFIXES = ["base_model.model.", "module."]
QWEN_NEWER = [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")]
QWEN_DROP = r"^lm_head\.|inv_freq$"  # the LM head (a clone of the embedding, unused by the reward); buffers
LORA_KEY = re.compile(r"^(.*)\.lora_(A|B|embedding_A|embedding_B)\.([^.]+?)(\.weight)?$")
LORA_ALPHA = 128  # VideoAlign's training config (r 64, alpha 128); model_config.json, when present, says so itself
# rm_head widths VideoAlign's forward reads at its three reward tokens: 1 = one score per token (the release), 3 = token
# i's output i, the diagonal (its training script's --output_dim 3). Other widths give it 3 * N numbers it never names.
VIDEOALIGN_WIDTHS = (1, 3)
# model_config.json's inference_config holds the score statistics as "<VQ|MQ|TA>_mean" / "_std"; the built-in
# constants are the published values to 4 decimals, so a value that rounds to them is the same normalisation
NORM_TOLERANCE = 5e-5

# -----------------------------------------------------------------------------
# the reader


class Tensors:
    """The tensors of one checkpoint (one or several files) by name, each read when it is popped.
    Also remembers each tensor's stored name, so errors name what is in the file."""

    def __init__(self, src, meta=None):
        self.src, self.meta = str(src), meta or {}
        self.entries = {}  # our name -> (stored name, shape, read())

    def add(self, name, shape, read, stored=None):
        self.entries[name] = (stored or name, tuple(shape), read)

    @classmethod
    def of(cls, sd, src, meta=None):
        t = cls(src, meta)
        for k, v in sd.items():
            t.add(k, v.shape, lambda v=v: v)
        return t

    def shapes(self):
        return {k: e[1] for k, e in self.entries.items()}

    def stored(self, name):
        return self.entries[name][0]

    def pop(self, name):
        return self.entries.pop(name)[2]()

    def materialise(self):
        return {k: self.pop(k) for k in list(self.entries)}

    def drop(self, pattern):
        """Forget every tensor whose (our) name matches the regex `pattern`."""
        self.entries = {k: e for k, e in self.entries.items() if not re.search(pattern, k)}
        return self

    def rename(self, table=(), prefixes=(), tied=()):
        """Strip each of `prefixes` that every name carries (in order), then apply every row of `table` in order.
        Two stored names may land on one of ours only if it is listed in `tied` (tied copies: one is kept)."""
        names = list(self.entries)
        for p in prefixes:
            if names and all(k.startswith(p) for k in names):
                names = [k[len(p):] for k in names]
        out = {}
        for old, k in zip(list(self.entries), names):
            for pat, rep in table:
                k = re.sub(pat, rep, k)
            if k in out and k not in tied:
                raise CheckpointError(f"{self.src}: {out[k][0]!r} and {self.entries[old][0]!r} both map to {k!r}; "
                                      "a mix of two layouts?")
            out.setdefault(k, self.entries[old])
        self.entries = out
        return self


def read(path, pickle_keys=(), key=None):
    """One checkpoint file -> Tensors. A .safetensors file is read lazily (its metadata kept); anything else is a
    torch pickle read with weights_only=True and mmap: a flat {name: tensor} dict, or one nested under `key` (or the
    first of `pickle_keys` holding a dict). Non-tensor entries are ignored."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            fh = safe_open(path, framework="pt", device="cpu")
            t = Tensors(path, fh.metadata() or {})
            for k in fh.keys():
                t.add(k, fh.get_slice(k).get_shape(), lambda k=k: fh.get_tensor(k))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        return t
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a torch checkpoint or safetensors file ({err})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(f"{path}: no dict under key {key!r}; top-level keys are {sorted(obj)[:10]}")
        obj = obj[key]
    else:
        obj = next((obj[k] for k in pickle_keys if isinstance(obj.get(k), dict)), obj)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (top-level keys: {sorted(obj)[:10]})")
    return Tensors.of(sd, path)


def read_all(files, src):
    """Several shards -> one Tensors."""
    out = Tensors(src)
    for f in files:
        t = read(f)
        out.entries.update(t.entries)
        out.meta.update(t.meta)
    return out


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from err


def trained_with(ckpt):
    """The train.py settings a checkpoint was trained with (a dict, from the metadata StageDir.save writes), or None
    (files from elsewhere: the released weights, conversions)."""
    try:
        return json.loads(ckpt.meta["train_config"]) if "train_config" in ckpt.meta else None
    except ValueError:
        return None


def config_from_meta(cls, meta, src):
    """A config dataclass written by save_safetensors into a file's metadata, or None."""
    if "config" not in meta:
        return None
    try:
        kw = json.loads(meta["config"])
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if hints[k] is tuple else v for k, v in kw.items() if k in names})
    except Exception as err:
        raise CheckpointError(f"{src}: unreadable config in the safetensors metadata ({err})") from err


# -----------------------------------------------------------------------------
# the strict check and the strict copy


def check(ckpt, module, what):
    """Strict key and shape check of `ckpt` against `module` (built on the meta device: no memory). One
    CheckpointError, one line: the file, the network, then the missing, unexpected and mis-shaped names (first 5 of
    each, with counts; stored names, with ours in brackets where they differ)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = ckpt.shapes()

    def name(k):
        s = ckpt.stored(k)
        return s if s == k else f"{s} [{k}]"

    missing = [k for k in want if k not in have]
    unexpected = [name(k) for k in have if k not in want]
    wrong = [f"{name(k)}: {have[k]} != expected {want[k]}" for k in want if k in have and have[k] != want[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {title}: " + ", ".join(v[:5]) + (", ..." if len(v) > 5 else "")
                 for title, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if v]
        raise CheckpointError(f"{ckpt.src}: does not match {what}; " + "; ".join(parts))


def build(cls, cfg, ckpt, what, dtype=None, device=None):
    """cls(cfg) on the meta device, checked strictly against ckpt, then filled with assign=True, one tensor read
    and converted at a time (no second copy of the weights). dtype: None (as stored), a dtype for every float
    tensor, or a function (name, tensor) -> dtype."""
    with torch.device("meta"):
        model = cls(cfg)
    check(ckpt, model, what)
    state = {}
    for k in list(ckpt.entries):
        t = ckpt.pop(k)
        dt = dtype(k, t) if callable(dtype) else dtype
        state[k] = t.to(device=device, dtype=dt if dt is not None and t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_safetensors(model_or_sd, path, cfg=None, meta=None):
    """Write one safetensors file, our module names, with `cfg` (a dataclass) and the strings of `meta` in its
    metadata; atomically (a temporary file renamed into place), so an interrupted write never leaves a truncated
    checkpoint."""
    from safetensors.torch import save_file

    if isinstance(model_or_sd, torch.nn.Module):
        cfg, sd = getattr(model_or_sd, "cfg", cfg), model_or_sd.state_dict()
    else:
        sd = model_or_sd
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    meta = {"format": "pt", **(meta or {})}
    if cfg is not None:
        meta["config"] = json.dumps(dataclasses.asdict(cfg))
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)


def layer_count(names, prefix):
    """1 + the largest N of names `prefix.N.` (0 when there is none)."""
    idx = {int(m.group(1)) for k in names if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def need(shapes, k, src, what):
    if k not in shapes:
        raise CheckpointError(f"{src}: missing key {k!r}, needed to infer the model size; is this {what}?")
    return shapes[k]


# -----------------------------------------------------------------------------
# the Wan2.1 DiT (model.py)


def dit(path, cls, key=None, num_heads=None):
    """Any accepted DiT checkpoint -> (Tensors with Wan names, cls config). Accepted:
      - a folder with diffusion_pytorch_model.safetensors (+ config.json): the original Wan2.1 layout
      - a Diffusers folder (or its transformer/ subfolder), sharded with an index json
      - a .safetensors file (original or Diffusers names; its config in the metadata if we wrote it)
      - a .pt / .pth torch pickle: flat, or the generator under 'generator_ema' / 'generator' (or `key`)
      - a train.py checkpoint folder (or a stage folder, through its `latest` pointer): generator_ema.safetensors by
        default, `key` picks another file (generator, critic, teacher_ema, ...)
    with 'model.' / 'model.diffusion_model.' prefixes stripped."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or directory. Expected {DIT_WHERE}")
    cfg_json = None
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "latest")):  # a train.py stage folder: its latest checkpoint
            p = os.path.join(p, Path(p, "latest").read_text().strip())
        if os.path.isdir(os.path.join(p, "transformer")):
            p = os.path.join(p, "transformer")
        names = os.listdir(p)
        if "config.json" in names:
            cfg_json = read_json(os.path.join(p, "config.json"))
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if index:
            shards = sorted(set(read_json(os.path.join(p, index[0]))["weight_map"].values()))
            ckpt = read_all([os.path.join(p, s) for s in shards], p)
        else:
            files = sorted(n for n in names if n.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{p}: no .safetensors weights found (expected diffusion_pytorch_model"
                                      ".safetensors, or a sharded set with *.safetensors.index.json)")
            # one file per model, never a merge of unrelated files; a training checkpoint holds several: `key` picks
            wanted = [f"{k}.safetensors" for k in ([key] if key else ["diffusion_pytorch_model"] + DIT_FOLDER_FILES)]
            chosen = next((f for f in wanted if f in files), files[0] if len(files) == 1 and not key else None)
            if chosen is None:
                raise CheckpointError(f"{p}: holds {files}; pass key= with the one to load (e.g. key='generator_ema')")
            ckpt = read(os.path.join(p, chosen))
            ckpt.src = p
    else:
        ckpt = read(p, DIT_PICKLE_KEYS, key)
    ckpt.rename(prefixes=DIT_PREFIXES)
    if any(k.startswith("condition_embedder.") for k in ckpt.entries):
        ckpt.rename(DIT_DIFFUSERS)
    if cfg_json is None and "config" in ckpt.meta:  # written by save_safetensors
        cfg_json = json.loads(ckpt.meta["config"])
    return ckpt, dit_config(cls, ckpt.shapes(), cfg_json, ckpt.src, num_heads)


def dit_config(cls, shapes, cfg_json, src, num_heads=None):
    """The config from config.json (original or Diffusers keys, or ours) where present, every size the tensors
    determine inferred from them and checked against the json. The original Wan2.1 config.json omits patch_size,
    text_dim, qk_norm and cross_attn_norm."""
    what = "a Wan2.1 DiT checkpoint"
    pe = need(shapes, "patch_embedding.weight", src, what)  # (dim, in_dim, pt, ph, pw)
    inferred = dict(
        dim=pe[0], in_dim=pe[1], patch_size=tuple(pe[2:]),
        text_dim=need(shapes, "text_embedding.0.weight", src, what)[1],
        freq_dim=need(shapes, "time_embedding.0.weight", src, what)[1],
        ffn_dim=need(shapes, "blocks.0.ffn.0.weight", src, what)[0],
        num_layers=layer_count(shapes, "blocks"),
        out_dim=need(shapes, "head.head.weight", src, what)[0] // math.prod(pe[2:]),
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )
    given = {}
    if cfg_json:
        j = cfg_json
        if "num_attention_heads" in j:  # diffusers
            given = dict(
                dim=j.get("num_attention_heads", 0) * j.get("attention_head_dim", 0), num_heads=j.get("num_attention_heads"),
                ffn_dim=j.get("ffn_dim"), num_layers=j.get("num_layers"), freq_dim=j.get("freq_dim"),
                text_dim=j.get("text_dim"), in_dim=j.get("in_channels"), out_dim=j.get("out_channels"),
                patch_size=tuple(j["patch_size"]) if "patch_size" in j else None, eps=j.get("eps"),
                qk_norm=bool(j["qk_norm"]) if "qk_norm" in j else None, cross_attn_norm=j.get("cross_attn_norm"),
                rope_max_len=j.get("rope_max_seq_len"),
            )
        else:  # the original Wan config.json, or ours
            names = {f.name for f in dataclasses.fields(cls)}
            given = {k: (tuple(v) if k == "patch_size" else v) for k, v in j.items() if k in names}
        given = {k: v for k, v in given.items() if v is not None}
    for k, v in inferred.items():
        if k in given and given[k] != v:
            raise CheckpointError(f"{src}: config says {k}={given[k]} but the tensors give {k}={v}")
    kw = {**given, **inferred}
    if num_heads is not None:
        kw["num_heads"] = num_heads
    kw.setdefault("num_heads", kw["dim"] // 128)  # no config: every Wan2.1 model has 128-channel heads
    if kw["num_heads"] < 1 or kw["dim"] % kw["num_heads"]:
        raise CheckpointError(f"{src}: cannot split dim {kw['dim']} into {kw['num_heads']} heads; the checkpoint has "
                              "no config, so pass num_heads= (Wan2.1 uses 128 channels per head)")
    return cls(**kw)


# -----------------------------------------------------------------------------
# umT5 (t5.py)


def t5(path, cls):
    """A Diffusers text_encoder/ folder (config.json + model*.safetensors, maybe sharded), Wan's
    models_t5_umt5-xxl-enc-bf16.pth, or a folder holding either -> (Tensors with Wan names, cls config)."""
    p = Path(path)
    expected = (f"a Diffusers text_encoder/ folder (config.json + model*.safetensors), Wan's {WAN_T5_FILE}, or a "
                f"folder holding either; download them from {WAN_WHERE}")
    if not p.exists():
        raise FileNotFoundError(f"T5 checkpoint path {p} does not exist; expected {expected}")
    cfg_path = None
    if p.is_file():
        files = [p]
        cfg_path = p.parent / "config.json" if p.suffix == ".safetensors" and (p.parent / "config.json").is_file() else None
    elif (p / "text_encoder").is_dir():  # a Diffusers root folder
        return t5(p / "text_encoder", cls)
    else:
        cfg_path = p / "config.json" if (p / "config.json").is_file() else None
        index = p / "model.safetensors.index.json"
        if index.is_file():
            files = [p / s for s in sorted(set(read_json(index).get("weight_map", {}).values()))]
            if not files:
                raise CheckpointError(f"{index} lists no weight files")
        elif (p / "model.safetensors").is_file():
            files = [p / "model.safetensors"]
        else:
            files = [p / WAN_T5_FILE] if (p / WAN_T5_FILE).is_file() else sorted(p.glob("*t5*.pth"))
            if len(files) != 1:
                raise FileNotFoundError(f"no T5 checkpoint found in folder {p}; expected {expected}")
    src = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    ckpt = read_all(files, src).rename(T5_HF, tied=("token_embedding.weight",))
    cfg = config_from_meta(cls, ckpt.meta, src)  # a file `convert` wrote
    if cfg is not None:
        return ckpt, cfg
    if cfg_path is not None:  # Hugging Face UMT5 config.json
        j = read_json(cfg_path)
        lost = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers") if k not in j]
        if lost:
            raise CheckpointError(f"{cfg_path}: not a UMT5 config, missing fields {lost}")
        return ckpt, cls(vocab=j["vocab_size"], dim=j["d_model"], dim_attn=j["d_kv"] * j["num_heads"], dim_ffn=j["d_ff"],
                         num_heads=j["num_heads"], num_layers=j["num_layers"],
                         num_buckets=j.get("relative_attention_num_buckets", 32),
                         max_distance=j.get("relative_attention_max_distance", 128), eps=j.get("layer_norm_epsilon", 1e-6))
    s, what = ckpt.shapes(), "a umT5 encoder"
    vocab, dim = need(s, "token_embedding.weight", src, what)
    num_buckets, num_heads = need(s, "blocks.0.pos_embedding.embedding.weight", src, what)
    return ckpt, cls(vocab=vocab, dim=dim, dim_attn=need(s, "blocks.0.attn.q.weight", src, what)[0],
                     dim_ffn=need(s, "blocks.0.ffn.fc1.weight", src, what)[0], num_heads=num_heads,
                     num_layers=layer_count(s, "blocks"), num_buckets=num_buckets)


# -----------------------------------------------------------------------------
# the Wan VAE (vae.py)


def vae(path, cls):
    """Wan2.1_VAE.pth, a Diffusers vae/ folder (config.json + diffusion_pytorch_model.safetensors), a .safetensors
    file, or a folder holding one of these -> (Tensors with Wan names, cls config)."""
    p = Path(path)
    expected = (f"{WAN_VAE_FILE}, a Diffusers vae/ folder (config.json + diffusion_pytorch_model.safetensors), a "
                f".safetensors file, or a folder containing one of these; get them from {WAN_WHERE}")
    if not p.exists():
        raise FileNotFoundError(f"Wan VAE checkpoint path {p} does not exist; expected {expected}")
    if p.is_file():
        if p.suffix not in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
            raise CheckpointError(f"{p}: not a checkpoint file; expected {expected}")
        file = p
    else:
        for folder in (p, p / "vae"):  # a Wan root folder, a Diffusers root, or a vae/ folder itself
            file = folder / WAN_VAE_FILE if (folder / WAN_VAE_FILE).is_file() else vae_safetensors(folder)
            if file is not None:
                break
        if file is None:
            raise FileNotFoundError(f"no Wan VAE checkpoint found in folder {p}; expected {expected}")
    cfg_path = vae_config_beside(file) if file.suffix == ".safetensors" else None
    ckpt = read(file, pickle_keys=("state_dict",))
    if any(VAE_DIFFUSERS_KEY.match(k) for k in ckpt.entries):
        resnets = layer_count(ckpt.entries, "decoder.up_blocks.0.resnets")
        ckpt.rename(vae_diffusers(num_res_blocks=max(resnets - 1, 0)))
    if cfg_path is not None:
        return ckpt, vae_config_from_json(cls, cfg_path)
    return ckpt, config_from_meta(cls, ckpt.meta, ckpt.src) or vae_config_from_shapes(cls, ckpt.shapes(), ckpt.src)


def vae_safetensors(folder):
    """folder's diffusion_pytorch_model.safetensors if it is a VAE's, else None. A Wan root folder also holds the DiT's
    file of that name: it counts only beside a VAE config.json, or with no config.json at all."""
    st = folder / "diffusion_pytorch_model.safetensors"
    if st.is_file() and (vae_config_beside(st) is not None or not (folder / "config.json").exists()):
        return st
    return None


def vae_config_beside(file):
    """The Diffusers AutoencoderKLWan config.json next to `file`, or None."""
    cfg = file.parent / "config.json"
    if not cfg.is_file():
        return None
    d = read_json(cfg)
    is_vae = isinstance(d, dict) and (d.get("_class_name") == "AutoencoderKLWan" or {"base_dim", "z_dim"} <= d.keys())
    return cfg if is_vae else None


def vae_config_from_json(cls, cfg_path):
    d = read_json(cfg_path)
    if d.get("is_residual") or d.get("attn_scales") or d.get("patch_size") not in (None, 1) or \
            d.get("decoder_base_dim") not in (None, d.get("base_dim")):  # fmt: skip
        raise CheckpointError(f"{cfg_path}: not a Wan2.1 VAE config (is_residual / attn_scales / patch_size / "
                              "decoder_base_dim are not supported; Wan2.2's VAE is a different model)")
    default = cls()
    return cls(base_dim=d.get("base_dim", default.base_dim), z_dim=d.get("z_dim", default.z_dim),
               dim_mult=d.get("dim_mult", default.dim_mult), num_res_blocks=d.get("num_res_blocks", default.num_res_blocks),
               temporal_downsample=d.get("temperal_downsample", default.temporal_downsample),  # [sic] in Diffusers
               latents_mean=d.get("latents_mean", default.latents_mean),
               latents_std=d.get("latents_std", default.latents_std))


def vae_config_from_shapes(cls, shapes, src):
    """Channels from the convs, stages from encoder.downsamples.* (residual blocks, each stage closed by a
    downsample; a time_conv marks a temporal one)."""
    base_dim = need(shapes, "encoder.conv1.weight", src, "a Wan2.1 VAE")[0]
    z_dim = need(shapes, "conv2.weight", src, "a Wan2.1 VAE")[0]
    idx = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    stage_dims, res_counts, temporal, count, out_dim = [], [], [], 0, None
    for i in idx:
        pre = f"encoder.downsamples.{i}."
        if pre + "residual.2.weight" in shapes:  # a residual block: its output channels
            count, out_dim = count + 1, shapes[pre + "residual.2.weight"][0]
        elif pre + "resample.1.weight" in shapes and out_dim is not None:  # a downsample closes a stage
            stage_dims.append(out_dim)
            res_counts.append(count)
            temporal.append(pre + "time_conv.weight" in shapes)
            count = 0
        else:
            raise CheckpointError(f"{src}: cannot tell what encoder.downsamples.{i} is (no residual.2 or resample.1 weight)")
    if not idx or count == 0 or len(set(res_counts + [count])) != 1:
        raise CheckpointError(f"{src}: cannot infer the encoder stages from encoder.downsamples.* (blocks per stage: "
                              f"{res_counts + [count]})")
    stage_dims.append(out_dim)
    if any(d % base_dim for d in stage_dims):
        raise CheckpointError(f"{src}: stage widths {stage_dims} are not multiples of base_dim {base_dim}")
    if z_dim != len(cls().latents_mean):
        raise CheckpointError(f"{src}: z_dim={z_dim}, so the Wan2.1 latent mean/std do not apply and the checkpoint "
                              "holds none; pass cfg=VAEConfig(...)")
    return cls(base_dim=base_dim, z_dim=z_dim, dim_mult=[d // base_dim for d in stage_dims], num_res_blocks=count,
               temporal_downsample=temporal)


# -----------------------------------------------------------------------------
# VideoAlign's reward model: Qwen2-VL-2B + LoRA + rm_head (qwen2vl.py)


def merge_lora(sd, alpha, src, use_rslora=False, rank=None, dtype=None):
    """PEFT LoRA -> plain weights: X.base_layer.{weight,bias} + X.lora_A.<adapter>.weight (r, in) +
    X.lora_B.<adapter>.weight (out, r) -> X.weight = W + s (B A), s = alpha / r (alpha / sqrt(r) with rsLoRA). The sum
    is computed in fp32 and cast once, to `dtype` (the dtype the model is being loaded in) or, when None, to W's stored
    dtype: casting to W's dtype first (bf16 in VideoAlign's pickle) and to the model's dtype after would round the
    merged weight to bf16 even for an fp32 model. An embedding LoRA (lora_embedding_A (r, vocab), _B (dim, r)) adds
    s (B A)^T. PEFT's modules_to_save copies replace their originals. rank: the r the config states, checked
    against A."""
    out, lora, adapters = {}, {}, set()
    for k, v in sd.items():
        m = LORA_KEY.match(k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
            adapters.add(m.group(3))
        elif ".original_module." not in k:
            out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", k.replace(".base_layer.", "."))] = v
    if len(adapters) > 1:
        raise CheckpointError(f"{src}: holds several LoRA adapters {sorted(adapters)}; expected one")
    for base, ab in lora.items():
        kind = "embedding_" if "embedding_A" in ab or "embedding_B" in ab else ""
        if set(ab) != {kind + "A", kind + "B"} or f"{base}.weight" not in out:
            raise CheckpointError(f"{src}: incomplete LoRA for {base!r}: has {sorted(ab)}, base weight "
                                  f"{'present' if f'{base}.weight' in out else 'missing'}")
        A, B = ab[kind + "A"].float(), ab[kind + "B"].float()  # (r, in), (out, r)
        r = A.shape[0]
        if rank is not None and r != rank:
            raise CheckpointError(f"{src}: LoRA of {base!r} has rank {r} but model_config.json says lora_r={rank}")
        delta = (alpha / (math.sqrt(r) if use_rslora else r)) * (B @ A)
        W = out[f"{base}.weight"]
        out[f"{base}.weight"] = (W.float() + (delta.T if kind else delta)).to(dtype or W.dtype)
    return out


def videoalign_json(ckpt_file):
    """VideoAlign's model_config.json for a checkpoint file -> (its path, its contents), or (None, {}). VideoAlign
    writes it into its output folder, the one holding checkpoint-NNNN/; looked for beside the file, then one up."""
    d = os.path.dirname(os.path.abspath(ckpt_file))
    for folder in (d, os.path.dirname(d)):
        f = os.path.join(folder, "model_config.json")
        if os.path.isfile(f):
            js = read_json(f)
            if not isinstance(js, dict):
                raise CheckpointError(f"{f}: expected a JSON object (VideoAlign's model_config.json), got "
                                      f"{type(js).__name__}")
            return f, js
    return None, {}


def json_section(js, name, src):
    """One section of model_config.json as a dict ({} when absent or null)."""
    sec = js.get(name) or {}
    if not isinstance(sec, dict):
        raise CheckpointError(f"{src}: {name} should be a JSON object, got {sec!r}")
    return sec


def check_norm(src, js, norm):
    """model_config.json's inference_config against the statistics the reward z-scores with (`norm`: name -> (mean,
    std)). A key the file states must agree: another normalisation would silently rescale r and so change Re-DMD's
    weights exp(r / beta). A key it does not state leaves the built-in value."""
    stated = json_section(js, "inference_config", src)
    for name, pair in norm.items():
        for key, want in zip((f"{name}_mean", f"{name}_std"), pair):
            if key not in stated:
                continue
            got = stated[key]
            if isinstance(got, bool) or not isinstance(got, (int, float)) or abs(got - want) > NORM_TOLERANCE:
                raise CheckpointError(f"{src}: inference_config {key} = {got!r} but the reward normalises with {key} = "
                                      f"{want} (reward.REWARD_NORM); another normalisation changes Re-DMD's weights "
                                      "exp(r / beta), so this checkpoint is refused")


def reward_width(shapes, src, js, json_src):
    """rm_head's output width, from the tensor, checked against model_config.json's model_config.output_dim (the
    width VideoAlign built the head with) and against the widths its forward can read. None without an rm_head
    (the strict check then names it as missing)."""
    if "rm_head.weight" not in shapes:
        return None
    width = shapes["rm_head.weight"][0]
    model_cfg = json_section(js, "model_config", json_src)
    stated = model_cfg.get("output_dim")
    if stated is not None and stated != width:
        raise CheckpointError(f"{json_src}: model_config.output_dim = {stated!r} but {src} has an rm_head of width "
                              f"{width} (rm_head.weight {shapes['rm_head.weight']}); the two files do not belong "
                              "together")
    if model_cfg.get("use_special_tokens") is False:  # then VideoAlign pools the last or mean token instead
        raise CheckpointError(f"{json_src}: model_config.use_special_tokens = false; the reward reads the head at "
                              "<|VQ_reward|> <|MQ_reward|> <|TA_reward|>, which only a model trained with them has")
    if width not in VIDEOALIGN_WIDTHS:
        raise CheckpointError(f"{src}: rm_head.weight {shapes['rm_head.weight']} has width {width}; VideoAlign reads "
                              "width 1 (one score per reward token) or 3 (output i at reward token i)")
    return width


def videoalign(path, cls, default_cfg, cfg=None, lora_alpha=None, dtype=None, norm=None):
    """VideoAlign's checkpoint -> (Tensors with our names, LoRA merged, lm_head dropped; cls config). Accepted: the
    official torch pickle `model.pth` (PEFT-wrapped), its checkpoint-NNNN/ folder, VideoAlign's root folder (latest
    checkpoint-NNNN/), or a .safetensors written by `convert` (its config in the metadata). What the files say is
    read, not assumed:
      - LoRA alpha: `lora_alpha`, else model_config.json's peft_lora_config.lora_alpha, else 128 (also its lora_r,
        checked against the tensors, and use_rslora);
      - the rm_head width (cfg.reward_dim): rm_head.weight's shape, checked against model_config.output_dim;
      - norm (name -> (mean, std), the statistics the caller z-scores with): checked against the file's
        inference_config before any tensor is read; None skips the check (raw scores only).
    dtype: the dtype the model will be loaded in; the LoRA merge is cast to it once (see merge_lora). cfg: sizes
    for a file that does not state them (default `default_cfg`, Qwen2-VL-2B). The key layout (PEFT's
    `base_model.model.` prefix, `.base_layer.`, `lora_A/B.default`) follows the PEFT version VideoAlign trained
    with; the real model.pth was not available here.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        steps = sorted((d for d in os.listdir(p) if re.fullmatch(r"checkpoint-\d+", d)), key=lambda d: int(d[11:]))
        for cand in [os.path.join(p, "model.pth")] + ([os.path.join(p, steps[-1], "model.pth")] if steps else []):
            if os.path.isfile(cand):
                p = cand
                break
        else:
            raise CheckpointError(f"{p}: no model.pth here or in a checkpoint-NNNN/ folder (expected {VIDEOALIGN_WHERE})")
    elif not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: no such file or directory. Expected the VideoAlign reward model: "
                                f"{VIDEOALIGN_WHERE}, or the .safetensors that `python weights.py convert` wrote from it")
    json_src, js = videoalign_json(p)
    if norm is not None:
        check_norm(json_src, js, norm)  # before reading gigabytes
    lcfg = json_section(js, "peft_lora_config", json_src)
    ckpt = read(p)
    cfg = cfg or config_from_meta(cls, ckpt.meta, p) or default_cfg
    alpha = lora_alpha if lora_alpha is not None else lcfg.get("lora_alpha", LORA_ALPHA)
    sd = merge_lora(ckpt.materialise(), alpha, p, use_rslora=bool(lcfg.get("use_rslora", False)),
                    rank=lcfg.get("lora_r"), dtype=dtype)
    out = Tensors.of(sd, p, ckpt.meta).rename(QWEN_NEWER, QWEN_PREFIXES).drop(QWEN_DROP)
    width = reward_width(out.shapes(), p, js, json_src)
    if width is not None:
        cfg = dataclasses.replace(cfg, reward_dim=width)
    return out, cfg


# -----------------------------------------------------------------------------
# the conversion command


def convert(kind, src, dst, key=None, dtype=None, lora_alpha=None, config=None):
    """Any accepted checkpoint of a network -> one safetensors file in our (= the official) layout with its config
    in the metadata, checked strictly first, written atomically. Returns the config."""
    if kind == "dit":
        from model import WanModel

        model = WanModel.from_pretrained(src, dtype=dtype, key=key)
    elif kind == "videoalign":
        from qwen2vl import VideoAlignModel
        from reward import REWARD_NORM

        # the normalisation is checked here too: the safetensors written carries no inference_config, so a
        # checkpoint whose statistics differ from the reward's must be refused before it is converted
        model = VideoAlignModel.from_pretrained(src, dtype=dtype, lora_alpha=lora_alpha, config=config,
                                                norm=REWARD_NORM)
    elif kind == "vae":
        from vae import WanVAE

        model = WanVAE.from_pretrained(src, dtype=dtype)
    elif kind == "t5":
        from t5 import T5Encoder

        model = T5Encoder.from_pretrained(src, dtype=dtype)
    else:
        raise ValueError(f"kind must be dit, vae, t5 or videoalign, got {kind!r}")
    save_safetensors(model.state_dict(), dst, model.cfg)
    return model.cfg


def main(argv):
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, like every other setting error (argparse prints usage + message)
            raise SystemExit(f"{self.prog}: {message} (--help lists the options)")

    p = Parser(prog="python weights.py", allow_abbrev=False, description="Checkpoint tools. `convert` writes any "
                                "accepted checkpoint of a network as one safetensors file in the official layout (our "
                                "module names), with its config in the metadata: the fast, pickle-free load path.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    c = sub.add_parser("convert", allow_abbrev=False, help="convert a checkpoint to one safetensors file",
                       description="dit: a Wan2.1 DiT (original or Diffusers folder, safetensors, Self / Reward Forcing "
                       ".pt such as rewardforcing.pt); vae: Wan2.1_VAE.pth or a Diffusers vae/; t5: Wan's umT5 .pth or "
                       "a Diffusers text_encoder/; videoalign: VideoAlign's checkpoint-11352/model.pth (LoRA merged; "
                       "LoRA alpha, rm_head width and score statistics read from model_config.json above it).")
    c.add_argument("kind", choices=["dit", "vae", "t5", "videoalign"], help="which network the checkpoint holds")
    c.add_argument("src", help="checkpoint file or folder, e.g. rewardforcing.pt or Wan2.1-T2V-1.3B/")
    c.add_argument("dst", help="output .safetensors path (written atomically)")
    c.add_argument("--key", default=None, help="dit: which dict of a training checkpoint (default: generator_ema, "
                   "then generator)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: keep; the DiT's time path and modulation stay float32; "
                   "videoalign: the LoRA merge is done in float32 and cast once, to this dtype or the stored one)")
    c.add_argument("--lora_alpha", "--lora-alpha", type=float, default=None,
                   help=f"videoalign: LoRA alpha (default: model_config.json beside the checkpoint, else {LORA_ALPHA})")
    c.add_argument("--config", default=None, help="videoalign: size preset of a checkpoint that does not state its "
                   "sizes (default: qwen2-vl-2b; 'tiny' for tests)")
    a = p.parse_args(argv)
    if not a.dst.endswith(".safetensors"):
        raise SystemExit(f"convert: dst {a.dst!r} must end in .safetensors")
    if os.path.isdir(a.dst):
        raise SystemExit(f"convert: dst {a.dst!r} is a folder; give a file path ending in .safetensors")
    if not os.path.exists(a.src):
        raise SystemExit(f"convert: src {a.src!r}: no such file or folder")
    from config import writable_dir

    writable_dir(os.path.dirname(os.path.abspath(a.dst)), f"convert: dst {a.dst!r}")  # before reading gigabytes
    try:
        cfg = convert(a.kind, a.src, a.dst, key=a.key, dtype=getattr(torch, a.dtype) if a.dtype else None,
                      lora_alpha=a.lora_alpha, config=a.config)
    except (CheckpointError, ValueError, OSError) as err:
        raise SystemExit(f"convert: {err}") from None
    print(f"wrote {a.dst}: {cfg}")


if __name__ == "__main__":
    from config import cli

    cli(lambda: main(sys.argv[1:]))
