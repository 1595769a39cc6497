"""
Streaming text-to-video with the Reward Forcing student: prompts -> umT5 -> EMA-Sink streaming DiT, chunk by chunk
-> streaming VAE decode -> mp4, written while the next chunk is generated. Memory does not grow with the video length.

    python sample.py                                              # the shipped toy student: a toy video in seconds
    python sample.py --ckpt rewardforcing.pt --wan Wan2.1-T2V-1.3B --prompt "A cat surfs a wave" --num_frames 240
    python sample.py --ckpt rewardforcing.pt --wan Wan2.1-T2V-1.3B \\
        --prompt "0:An empty glass on a rustic wooden table" --prompt "5:Dark coffee streams into the empty glass"
    python sample.py --ckpt ... --wan ... --interactive=true      # type a new prompt + Enter while it streams
    python sample.py --ckpt ... --wan ... --prompts prompts.txt   # one video per line: out_000.mp4, out_001.mp4, ...
    python sample.py --live                                       # watch and steer it in a browser (live.py)

A prompt "SECONDS:text" starts at that time (paper Fig. 7): it takes effect at the first chunk that starts at or after
it (chunk k starts at pixel frame 1 + 4(3k - 1), i.e. 0, 9, 21, 33, ... at 16 fps). A prompt without a time starts at
0 s; one whose first word ends in ':' is read as a time (write "0:Note: ..." for a prompt that starts that way). A switch replaces the
cross-attention K/V; --recache=true also re-encodes the window's frames under the new prompt (LongLive's recache).
Weights: --ckpt is the student (rewardforcing.pt from JaydenLu666/Reward-Forcing-T2V-1.3B, or its safetensors made by
`python weights.py convert dit`), --wan the Wan2.1-T2V-1.3B folder (text encoder, tokenizer, VAE); see README 'Weights'.
With neither, the default is the toy student shipped in data/toy/ (student.safetensors, trained on CPU by the recipe
in README 'Toy world'): 16x16 frames of the toy world, shown 8x larger. A toy student of your own (train.py
config/toy.py) needs only --ckpt: it takes the toy text encoder and the toy VAE (data/toy/vae.safetensors; a toy
network on RGB frames, in_dim 3, none).
Every setting, file and output path is checked before any model loads; a bad one exits with one line (status 2).
Booleans take a value: --compile=true, --recache=true, --interactive=true.
"""

import dataclasses
import gc
import itertools
import math
import os
import queue
import re
import resource
import sys
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import torch

from config import cli, configure, opt, pick_device, pick_dtype, read_prompt_file, writable_dir
from model import PRESETS, WanConfig, WanModel
from sink import MODES, SinkCache, rollout, settings_error, settings_mismatch
import weights
from weights import CheckpointError

STUDENT_WHERE = ("rewardforcing.pt from https://huggingface.co/JaydenLu666/Reward-Forcing-T2V-1.3B "
                 "(optionally `python weights.py convert dit rewardforcing.pt rewardforcing.safetensors --dtype=bfloat16`)")
WAN_WHERE = ("the Wan2.1-T2V-1.3B folder from https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B "
             "(or https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
# the paper's interactive example (Fig. 7)
DEFAULT_SCHEDULE = ["0:An empty glass on a rustic wooden table", "5:Dark coffee streams into the empty glass"]
TOY_DIR = Path(__file__).resolve().parent / "data" / "toy"  # the toy world's text encoder and trained student
TOY_STUDENT = TOY_DIR / "student.safetensors"
TOY_VAE = TOY_DIR / "vae.safetensors"  # python vae.py train
TOY_TEXT_DIM = PRESETS["toy"].text_dim  # the toy text encoder's width (64, data/prepare_toy.py); umT5's is 4096
TOY_SCHEDULE = ["0:a red circle moves right fast on a gray background",
                "4:a blue triangle moves down slowly on a white background and the camera pans left"]


@dataclass
class SampleConfig:
    prompt: list[str] = opt(factory=list, help="a prompt, or 'SECONDS:prompt' to start it at that time; repeat for a "
                            "schedule of prompt switches (default: a toy pair for the toy student; with --ckpt the "
                            "paper's Fig. 7 pair, glass at 0 s, coffee at 5 s)")
    prompts: str = opt("", "a text file, one prompt per line: one video each, OUT_000.mp4, OUT_001.mp4, ... "
                           "(blank and # lines skipped)")
    num_frames: int = opt(0, "video frames per video, at --fps (Wan's VAE: 81 video frames = 21 latent frames; the "
                             "toy student: video frames = latent frames); the last chunk is cut to fit (0: 160; with "
                             "--live, no end: it streams until Ctrl-C)")
    out: str = opt("out.mp4", "output mp4 path (with --live, '' writes none; a restart from the page writes "
                              "OUT_001.mp4, OUT_002.mp4, ...)")
    ckpt: str = opt("", "student checkpoint: rewardforcing.pt, its .safetensors, or any layout model.py loads "
                        "(no --ckpt and no --wan: the toy student, data/toy/student.safetensors)")
    key: str = opt("", "dict key of a training checkpoint (default: generator_ema, then generator)")
    wan: str = opt("", "Wan2.1-T2V-1.3B folder (original or Diffusers layout): umT5 encoder, tokenizer.json, VAE")
    height: int = opt(0, "video height in pixels, a multiple of 16 (0: 480; the toy student: a multiple of 4, 0: 16)")
    width: int = opt(0, "video width in pixels, a multiple of 16 (0: 832; the toy student: a multiple of 4, 0: 16)")
    upscale: int = opt(0, "enlarge every frame this many times in the mp4, nearest neighbour, for viewing "
                          "(0: 8 for the toy student's 16x16 frames, else 1)")
    fps: int = opt(16, "frame rate of the mp4 and of the prompt start times (Wan: 16)")
    seed: int = opt(0, "seed of the noise (the same for every video of --prompts)")
    dtype: str = opt("auto", "float32 | bfloat16 | float16 | auto (bf16 on an accelerator, fp32 on CPU)")
    device: str = opt("auto", "cpu, cuda, cuda:1, mps, ... | auto (the current accelerator, else cpu)")
    compile: bool = opt(False, "torch.compile the DiT (fullgraph; one graph per window fill level, then none)")
    compile_backend: str = opt("inductor", "torch.compile backend (aot_eager checks the graphs without code "
                                           "generation)")
    chunk_frames: int = opt(3, "latent frames per chunk (the student was trained with 3)")
    window_frames: int = opt(9, "attention window in latent frames, sink and current chunk included")
    sink_frames: int = opt(3, "sink frames (the first chunk becomes the sink)")
    alpha: float = opt(0.999, "EMA momentum of the sink (paper Eq. 4-5)")
    sink_mode: str = opt("ema", f"cache mode: {' | '.join(MODES)} (paper Table 3)")
    recache: bool = opt(False, "on a prompt switch also re-encode the window's frames under the new prompt")
    interactive: bool = opt(False, "read new prompts from stdin while streaming; each line takes effect at the "
                                   "next chunk")
    live: bool = opt(False, "serve a local web page that shows the stream as it is generated, at --fps, and takes "
                            "prompts (at the next chunk), pause, restart with a new seed and the recache switch")
    host: str = opt("127.0.0.1", "--live: the address to serve on (any other than 127.0.0.1 can be reached from "
                                 "other machines, and is warned about)")
    port: int = opt(8000, "--live: the port (0: any free one; the URL is printed)")
    live_ahead: int = opt(0, "--live: frames the generator may run ahead of the page (0: two chunks' frames); the "
                             "page's buffer and a prompt's delay are about this long")
    warmup_chunks: int = opt(-1, "chunks left out of the FPS numbers (-1: until the window is full, when every "
                                 "compiled graph exists)")
    quality: int = opt(8, "mp4 quality 0-10 (imageio-ffmpeg, libx264)")


# ----------------------------------------------------------------------------- small helpers


def sync(device):
    """Wait for the device's queued work: only for measurements (the hot loop has no other sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


def rss_mb():
    """Resident set size of this process in MB (Linux /proc; the peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB on Linux


def peak_memory(device):
    if device.type == "cuda":
        return f"peak device memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB allocated, "\
               f"peak process RSS {peak_rss_mb():.0f} MB"
    return f"peak process RSS {peak_rss_mb():.0f} MB"


def pixel_frames(latent_frames, temporal_stride=4):
    """Pixel frames the causal VAE gives for this many latent frames: 1 + 4(F - 1)."""
    return 0 if latent_frames <= 0 else 1 + temporal_stride * (latent_frames - 1)


def chunk_start_frame(k, chunk_frames=3, temporal_stride=4):
    """First pixel frame of chunk k = the pixel frames of chunks 0..k-1 (0, 9, 21, 33, ... for 3-frame chunks)."""
    return pixel_frames(k * chunk_frames, temporal_stride)


def chunks_for(num_frames, chunk_frames=3, temporal_stride=4):
    """Chunks needed for at least num_frames pixel frames."""
    latent = math.ceil((num_frames - 1) / temporal_stride) + 1
    return math.ceil(latent / chunk_frames)


def chunk_at(seconds, fps, chunk_frames=3, temporal_stride=4):
    """The chunk a prompt starting at `seconds` takes effect at: the first chunk starting at or after that time."""
    frame = round(seconds * fps)
    k = 0
    while chunk_start_frame(k, chunk_frames, temporal_stride) < frame:
        k += 1
    return k


def parse_schedule(entries):
    """['0:text', '5:other', 'plain'] -> sorted [(seconds, text)]. A prompt without 'SECONDS:' starts at 0; a first
    word ending in ':' must be a time (a number >= 0), so '5 :x', 'x:foo' or '-1:foo' are errors, not prompts."""
    out = []
    for e in entries:
        head, colon, rest = e.partition(":")
        if colon and head.strip() and len(head.split()) == 1:  # "SECONDS:text"
            try:
                sec = float(head)
            except ValueError:
                raise SystemExit(f"--prompt={e!r}: {head.strip()!r} is not a start time in seconds; write "
                                 f"'SECONDS:prompt', or '0:{e.strip()}' for a prompt that starts this way") from None
            if not (math.isfinite(sec) and sec >= 0):
                raise SystemExit(f"--prompt={e!r}: the start time {head.strip()} s must be a number >= 0")
            text = rest.strip()
        else:
            sec, text = 0.0, e.strip()
            if re.fullmatch(r"[-+]?\d+(\.\d*)?", text):
                raise SystemExit(f"--prompt={e!r}: a start time with no prompt; write '{text}:prompt'")
        if not text:
            raise SystemExit(f"--prompt={e!r}: empty prompt")
        out.append((sec, text))
    out.sort(key=lambda p: p[0])
    if not out:
        raise SystemExit("no prompt given")
    if out[0][0] != 0:
        raise SystemExit(f"the first prompt starts at {out[0][0]:g} s: one must start at 0 ('0:text', or no time)")
    starts = [s for s, _ in out]
    if len(set(starts)) != len(starts):
        raise SystemExit(f"two prompts start at the same time ({starts}); give each its own 'SECONDS:'")
    return out


# ----------------------------------------------------------------------------- the mp4 writer


class Mp4Stream:
    """Appends frames to an mp4 from a background thread, so encoding overlaps the next chunk's generation.
    The queue holds at most 2 chunks: a slow disk slows the stream down instead of growing memory."""

    def __init__(self, path, fps, quality=8):
        import imageio.v2 as imageio

        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # macro_block_size 1: keep the size as is (ours are multiples of 16 anyway; libx264 needs even sizes)
        self.writer = imageio.get_writer(str(path), fps=fps, codec="libx264", quality=quality, macro_block_size=1,
                                         pixelformat="yuv420p", ffmpeg_log_level="error")  # ffmpeg prints only errors
        self.q = queue.Queue(maxsize=2)
        self.frames, self.error = 0, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain, so put() never blocks on a dead writer
            try:
                for frame in item:
                    self.writer.append_data(frame)
                    self.frames += 1
            except Exception as err:  # reported by put() / close() in the main thread
                self.error = err

    def put(self, frames):
        """frames: uint8 numpy [f, H, W, 3]."""
        self._raise()
        self.q.put(frames)

    def close(self):
        self.q.put(None)
        self.thread.join()
        try:
            self.writer.close()
        except Exception as err:  # ffmpeg gone (disk full, folder removed): its error is in self.error or here
            self.error = self.error or err
        self._raise()

    def _raise(self):
        if self.error is not None:
            first = (str(self.error).strip().splitlines() or [type(self.error).__name__])[0]
            if "Broken pipe" in first:  # ffmpeg exited; it wrote its reason to stderr (disk full, folder gone, ...)
                first = "ffmpeg stopped (its reason is printed above)"
            raise SystemExit(f"writing {self.path} failed after {self.frames} frames: {first}")


def to_uint8(frames):
    """[1, 3, f, H, W] in [-1, 1] -> numpy uint8 [f, H, W, 3]. The .cpu() waits for the chunk: the pixels must
    reach the host to be written (the one per-chunk sync of the stream)."""
    x = ((frames[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def upscaled(pixels, upscale):
    """uint8 [f, H, W, 3] -> [f, H * upscale, W * upscale, 3], nearest neighbour (the toy's 16x16 frames in the mp4)."""
    return pixels.repeat(upscale, axis=1).repeat(upscale, axis=2) if upscale > 1 else pixels


# ----------------------------------------------------------------------------- weights


class PixelFrames(torch.nn.Module):
    """The "VAE" of a toy network on RGB frames (in_dim 3): its latents are the frames (temporal, spatial stride 1)."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(temporal_stride=1, spatial_stride=1, z_dim=3)

    def stream_decoder(self):
        return lambda z: z.float().clamp(-1, 1)


def load_toy(ckpt, device, dtype):
    """A toy student (the embedded default: the one trained on data/toyworld.py by README 'Toy world'), the toy
    world's text encoder, and the toy VAE (for a network on RGB frames, the frames themselves)."""
    from t5 import TextEncoder
    from vae import WanVAE

    model = WanModel.from_pretrained(ckpt, dtype=dtype, device=device)
    te = TextEncoder.from_pretrained(TOY_DIR, dtype=dtype, device=device, text_len=model.cfg.text_len)
    vae = PixelFrames() if model.cfg.in_dim == 3 else WanVAE.from_pretrained(TOY_VAE, dtype=dtype, device=device)
    return model, te, vae


def toy_stride(model_cfg):
    """The spatial stride of a toy student's VAE, checked against its channels from the file's header: 1 for a
    network on RGB frames, else the toy VAE's (which must add no frames: one latent frame per video frame)."""
    from vae import VAEConfig

    if model_cfg.in_dim == 3:
        return 1
    try:
        vae_cfg = weights.vae(TOY_VAE, VAEConfig)[1]
    except (CheckpointError, OSError) as err:
        raise SystemExit(f"the toy VAE: {err} (python vae.py train writes it)") from None
    if (vae_cfg.z_dim, vae_cfg.temporal_stride) != (model_cfg.in_dim, 1):
        raise SystemExit(f"{TOY_VAE}: z_dim {vae_cfg.z_dim}, temporal stride {vae_cfg.temporal_stride}; the toy "
                         f"student needs {model_cfg.in_dim} channels and temporal stride 1")
    return vae_cfg.spatial_stride


def check_weights(cfg):
    """Which student this is, from its checkpoint's header (no tensor read): 'toy' (the toy text width: no --wan) or
    'wan' (a Wan2.1 student, with the --wan folder). Fails early, naming every missing file and where to get it.
    Returns (kind, the student's WanConfig, the train.py settings it records or None)."""
    if not cfg.ckpt and not cfg.wan:
        if not TOY_STUDENT.exists():
            raise SystemExit(f"no --ckpt / --wan given and no toy student at {TOY_STUDENT}: train one (README 'Toy "
                             "world'), or pass --ckpt rewardforcing.pt and --wan Wan2.1-T2V-1.3B/ (README 'Weights')")
        cfg.ckpt = str(TOY_STUDENT)
    if not cfg.ckpt:
        raise SystemExit(f"--wan is given but not --ckpt: the student checkpoint is {STUDENT_WHERE}")
    if not os.path.exists(cfg.ckpt):
        raise SystemExit(f"--ckpt={cfg.ckpt}: no such file. The student checkpoint is {STUDENT_WHERE}")
    if cfg.wan:
        wan = Path(cfg.wan)
        if not wan.is_dir():
            raise SystemExit(f"--wan={cfg.wan}: no such folder. It is {WAN_WHERE}")
        missing = [f"{what} ({' or '.join(names)})" for what, names in weights.WAN_FOLDER.items()
                   if weights.wan_file(wan, what) is None]
        if missing:
            raise SystemExit(f"--wan={cfg.wan}: missing {'; '.join(missing)}. Get them from {WAN_WHERE}")
    try:
        ckpt, model_cfg = weights.dit(cfg.ckpt, WanConfig, key=cfg.key or None)
    except (CheckpointError, OSError) as err:
        raise SystemExit(f"loading the student DiT failed: {err}; expected {STUDENT_WHERE}") from None
    kind = "toy" if model_cfg.text_dim == TOY_TEXT_DIM else "wan"  # the toy text encoder's width: a toy-world student
    if kind == "toy" and cfg.wan:
        raise SystemExit(f"--ckpt={cfg.ckpt} is a toy-world student (text_dim {TOY_TEXT_DIM}): it takes no --wan")
    if kind == "wan" and not cfg.wan:
        raise SystemExit(f"--ckpt is given but not --wan: the text encoder, tokenizer and VAE come from {WAN_WHERE}")
    return kind, model_cfg, weights.trained_with(ckpt)


def load_real(cfg, device, dtype):
    from t5 import TextEncoder
    from vae import WanVAE

    step = "student DiT"
    try:
        model = WanModel.from_pretrained(cfg.ckpt, dtype=dtype, device=device, key=cfg.key or None)
        step = "text encoder"
        te = TextEncoder.from_pretrained(cfg.wan, dtype=dtype, device=device, text_len=model.cfg.text_len)
        step = "VAE"
        vae = WanVAE.from_pretrained(cfg.wan, dtype=dtype, device=device)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        where = STUDENT_WHERE if step == "student DiT" else WAN_WHERE
        raise SystemExit(f"loading the {step} failed: {err}; expected {where}") from None
    if te.encoder.cfg.dim != model.cfg.text_dim:
        raise SystemExit(f"the text encoder's width {te.encoder.cfg.dim} != the DiT's text_dim {model.cfg.text_dim}")
    if vae.cfg.z_dim != model.cfg.in_dim:
        raise SystemExit(f"the VAE's z_dim {vae.cfg.z_dim} != the DiT's in_dim {model.cfg.in_dim}")
    return model, te, vae


# ----------------------------------------------------------------------------- streaming one video


def stdin_lines():
    """A queue filled with the stripped non-empty lines of stdin by a daemon thread (interactive prompts)."""
    q = queue.Queue()

    def read():
        for line in sys.stdin:
            if line.strip():
                q.put(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return q


def encode_schedule(te, schedule, device, dtype):
    """[(seconds, text)] -> [(seconds, text, context [1, text_len, dim] on the device)]."""
    with torch.inference_mode():
        return [(sec, text, te([text]).to(device=device, dtype=dtype)) for sec, text in schedule]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stream_video(cfg, model, vae, prompts, out, *, dit=None, te=None, new_prompts=None, on_chunk=None, live=None,
                 log=print):
    """Generate one video chunk by chunk and append its frames to `out` (None: no file) as they are decoded.

    prompts: [(seconds, text, context)] sorted by time, the first at 0 (see encode_schedule). new_prompts: a queue
    of prompt texts taking effect at the next chunk (interactive; needs the text encoder te). on_chunk(k, cache, x0,
    frames): called after chunk k (tests). live: a live.Live page that is shown every chunk's frames, whose prompts
    come in through new_prompts, and which may end the video early (a restart). cfg.num_frames 0: no end.
    Returns a dict of numbers for report()."""
    from tqdm import tqdm

    dit = model if dit is None else dit
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    C, ts, ss = cfg.chunk_frames, vae.cfg.temporal_stride, vae.cfg.spatial_stride
    H, W = cfg.height, cfg.width
    ph, pw = model.cfg.patch_size[1:]
    assert H % (ss * ph) == 0 and W % (ss * pw) == 0 and H > 0 and W > 0, "check(cfg) first: sizes are whole patches"
    num_chunks = chunks_for(cfg.num_frames, C, ts) if cfg.num_frames else None  # None: until stopped (--live)
    warmup = cfg.warmup_chunks if cfg.warmup_chunks >= 0 else (1 if cfg.sink_mode == "full" else -(-cfg.window_frames // C))

    # a prompt starting at time s replaces the cross-attention K/V before the first chunk starting at or after s
    switches = {}
    for sec, text, ctx in prompts:
        k = chunk_at(sec, cfg.fps, C, ts)
        if num_chunks is not None and k >= num_chunks:
            log(f"note: prompt {text!r} starts at {sec:g} s, after the video ends ({cfg.num_frames / cfg.fps:.2f} s)")
            continue
        if k in switches:
            log(f"note: prompt {switches[k][0]!r} is replaced by {text!r} before it is shown (both at chunk {k})")
        switches[k] = (text, ctx)
    if len(switches) > 1:
        for k in sorted(switches):
            f0 = chunk_start_frame(k, C, ts)
            log(f"  chunk {k:3d} (frame {f0}, {f0 / cfg.fps:.2f} s): {switches[k][0]!r}")

    stats = dict(chunks=0, frames=0, dit_s=0.0, vae_s=0.0, wall_s=0.0, measured_frames=0, switches=[],
                 first_chunk_s=None, prompt=switches[0][0])
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    writer = Mp4Stream(out, cfg.fps, cfg.quality) if out else None
    t_start = time.perf_counter()
    t_measure = None
    interrupted = False
    with torch.inference_mode():
        cache = SinkCache.from_settings(model, cfg, 1, H // ss, W // ss, num_frames=(num_chunks or 0) * C)
        cache.set_prompt(dit, switches[0][1])
        chunks = rollout(dit, cache, num_chunks or sys.maxsize, generator=generator)
        dec = vae.stream_decoder()
        bar = tqdm(range(num_chunks) if num_chunks else itertools.count(), total=num_chunks, desc="chunks",
                   unit="chunk", dynamic_ncols=True, file=sys.stderr)
        try:
            for k in bar:
                if live is not None and live.stop_requested():  # a restart from the page, or the server closed
                    break
                if k == warmup or (k == 0 and num_chunks is not None and warmup >= num_chunks):
                    sync(device)  # measurement boundary: the warm-up's queued work is not ours
                    t_measure = time.perf_counter()
                    m_start = k
                new = switches[k] if k > 0 and k in switches else None
                while new_prompts is not None and not new_prompts.empty():  # the latest line wins
                    line = new_prompts.get()
                    if unknown := toy_words(te.tokenizer, [line]):  # a word-level (toy) vocabulary; umT5 knows all
                        bar.write(f"ignored {line!r}: {unknown}")
                        continue
                    new = encode_schedule(te, [(0.0, line)], device, dtype)[0][1:]
                if new is not None:
                    recache = live.recache if live is not None else cfg.recache  # the page's switch, or the flag
                    recached = recache and cache.frames > cache.S  # nothing to re-encode before the ring fills
                    cache.set_prompt(dit, new[1], recache=recache)
                    stats["switches"].append((k, new[0]))
                    stats["prompt"] = new[0]
                    if live is not None:
                        live.switched(k, new[0])
                    bar.write(f"chunk {k}: prompt -> {new[0]!r}" + (" (window recached)" if recached else ""))
                t0 = time.perf_counter()
                x0 = next(chunks)
                sync(device)  # measurement: DiT time alone
                t1 = time.perf_counter()
                frames = dec(x0.to(next(vae.parameters(), p).dtype))
                sync(device)  # measurement: VAE time alone
                t2 = time.perf_counter()
                pixels = to_uint8(frames)  # [f, H, W, 3]
                n = pixels.shape[0]
                keep = min(n, cfg.num_frames - stats["frames"]) if cfg.num_frames else n
                if writer is not None:
                    writer.put(upscaled(pixels[:keep], cfg.upscale))
                if live is not None:  # waits while the page is `ahead` frames behind (paused, or slower)
                    live.push(k, stats["prompt"], pixels[:keep])
                stats["frames"] += keep
                stats["chunks"] += 1
                if k == 0:
                    stats["first_chunk_s"] = time.perf_counter() - t_start
                if t_measure is not None:
                    stats["dit_s"] += t1 - t0
                    stats["vae_s"] += t2 - t1
                    stats["measured_frames"] += n
                if on_chunk is not None:
                    on_chunk(k, cache, x0, frames)
        except KeyboardInterrupt:
            interrupted = True
            bar.write(f"interrupted after {stats['chunks']} chunks" + (f": closing {out}" if out else ""))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    t_end = time.perf_counter()
    if t_measure is not None:
        stats["wall_s"] = t_end - t_measure
    stats.update(warmup=m_start if t_measure is not None else None, num_chunks=num_chunks, interrupted=interrupted,
                 cache_mb=cache.nbytes() / 2**20, written=writer.frames if writer is not None else 0)
    return stats


def report(stats, cfg, out, device, log=print):
    fr = stats["measured_frames"]
    secs = stats["frames"] / cfg.fps
    shown = f" shown {cfg.upscale}x larger" if cfg.upscale > 1 else ""
    what = f"wrote {out}: {stats['written']} frames" if out else f"streamed {stats['frames']} frames (no mp4)"
    log(f"{what} ({secs:.2f} s at {cfg.fps} fps), {cfg.width}x{cfg.height}{shown}, {stats['chunks']} chunks")
    if fr:
        excl = (f"{stats['warmup']} warm-up chunk{'s' * (stats['warmup'] > 1)} excluded" if stats["warmup"] else
                "video too short to leave out a warm-up: includes compile / first-call costs")
        log(f"speed ({excl}; FPS = pixel frames / seconds): DiT alone {fr / stats['dit_s']:.1f} FPS, "
            f"VAE decode alone {fr / stats['vae_s']:.1f} FPS, end to end {fr / stats['wall_s']:.1f} FPS; "
            f"first chunk after {stats['first_chunk_s']:.2f} s")
    log(f"memory: {peak_memory(device)}; KV cache {stats['cache_mb']:.1f} MB (fixed size)")


# ----------------------------------------------------------------------------- main


def out_name(out, i):
    p = Path(out)
    return str(p.with_name(f"{p.stem}_{i:03d}{p.suffix or '.mp4'}"))


def check(cfg):
    """The one place sample.py checks its settings, every one before any model loads: numbers, the cache, the
    prompts (their grammar, and words the toy vocabulary lacks), the weights (from their headers) and the output
    path. Fills the automatic sizes in cfg; returns (kind 'toy' | 'wan', jobs [(schedule, out path)])."""
    pick_dtype(cfg.dtype, pick_device(cfg.device))
    for name, low in (("num_frames", 0), ("fps", 1), ("upscale", 0), ("height", 0), ("width", 0), ("warmup_chunks", -1),
                      ("live_ahead", 0)):
        if getattr(cfg, name) < low:
            raise SystemExit(f"--{name}={getattr(cfg, name)}: must be >= {low}")
    if not 0 <= cfg.quality <= 10:
        raise SystemExit(f"--quality={cfg.quality}: takes 0 .. 10")
    if (err := settings_error(cfg)) is not None:  # first alone: the frame count below divides by chunk_frames
        raise SystemExit(err)
    if cfg.prompt and cfg.prompts:
        raise SystemExit("give either --prompt (one video, maybe with switches) or --prompts FILE (one video per line)")
    if cfg.live:
        if cfg.prompts or cfg.interactive:
            raise SystemExit("--live streams one video that the page steers: not with --prompts or --interactive")
        if not 0 <= cfg.port <= 65535:
            raise SystemExit(f"--port={cfg.port}: takes 0 .. 65535 (0: any free port)")
        if cfg.num_frames == 0 and cfg.sink_mode == "full":
            raise SystemExit("--live with no --num_frames streams without end, which --sink_mode=full (every frame "
                             "kept) cannot: give --num_frames or another --sink_mode")
    elif cfg.num_frames == 0:
        cfg.num_frames = 160
    kind, model_cfg, trained = check_weights(cfg)
    frames = (chunks_for(cfg.num_frames, cfg.chunk_frames, 1 if kind == "toy" else 4) * cfg.chunk_frames
              if cfg.num_frames else cfg.window_frames)  # no end (--live): only the window must fit the RoPE table
    if (err := settings_error(cfg, frames, model_cfg.rope_max_len)) is not None:
        raise SystemExit(err)

    # sizes: multiples of the VAE's stride times the DiT's patch
    stride = toy_stride(model_cfg) if kind == "toy" else 8
    default = (16, 16) if kind == "toy" else (480, 832)
    cfg.height, cfg.width = cfg.height or default[0], cfg.width or default[1]
    cfg.upscale = cfg.upscale or (8 if kind == "toy" else 1)
    for name, px, p in (("height", cfg.height, model_cfg.patch_size[1]), ("width", cfg.width, model_cfg.patch_size[2])):
        if px % (stride * p):
            raise SystemExit(f"--{name}={px}: must be a multiple of {stride * p} (the VAE's stride {stride} times the "
                             f"DiT's patch {p})")

    # prompts: the schedule's grammar, or the file; the toy's word-level vocabulary must hold every word
    if cfg.prompts:
        jobs = [([(0.0, p)], out_name(cfg.out, i)) for i, p in enumerate(read_prompt_file(cfg.prompts))]
    else:
        jobs = [(parse_schedule(cfg.prompt or (TOY_SCHEDULE if kind == "toy" else DEFAULT_SCHEDULE)), cfg.out)]
    if kind == "toy":
        from t5 import Tokenizer

        unknown = toy_words(Tokenizer(TOY_DIR / "tokenizer.json"), [text for sched, _ in jobs for _, text in sched])
        if unknown:
            raise SystemExit(unknown)

    # the output: an mp4 path whose folder can be written now, not after the first chunk ('' with --live: none)
    if cfg.out or not cfg.live:
        out = Path(cfg.out)
        if out.suffix.lower() not in (".mp4", ".mkv", ".mov"):
            raise SystemExit(f"--out={cfg.out}: an .mp4 file path (.mkv and .mov work too)")
        if out.is_dir():
            raise SystemExit(f"--out={cfg.out}: is a folder; give a file path such as {out / 'out.mp4'}")
        writable_dir(str(out.parent), f"--out={cfg.out}")
        try:
            import imageio_ffmpeg  # noqa: F401  (imageio's mp4 writer)
        except ImportError:
            raise SystemExit("writing mp4 needs imageio-ffmpeg: pip install imageio-ffmpeg") from None
    for line in settings_mismatch(trained, cfg):
        print(f"note: {line}")
    return kind, jobs


def toy_words(tokenizer, texts):
    """A one-line complaint naming the words of `texts` the toy vocabulary lacks, or ''."""
    unknown = sorted({w for t in texts for w in tokenizer.unknown_words(t)})
    if not unknown:
        return ""
    return (f"the toy world's vocabulary has no {', '.join(repr(w) for w in unknown[:8])}: its captions use the words "
            f"of data/toyworld.py (e.g. {TOY_SCHEDULE[0].partition(':')[2]!r})")


def main(argv=None):
    cfg = configure(SampleConfig(), argv, doc=__doc__)
    kind, jobs = check(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if kind == "toy":
        if Path(cfg.ckpt) == TOY_STUDENT:
            print(f"sample.py: no --ckpt / --wan given, so this streams the embedded default: the toy student "
                  f"({TOY_STUDENT.relative_to(TOY_DIR.parent.parent)}, trained on CPU by the recipe in README 'Toy "
                  "world') on the toy world's captions, 16x16 frames shown 8x larger. For real videos pass --ckpt "
                  "rewardforcing.pt and --wan Wan2.1-T2V-1.3B/ (README 'Weights').")
        model, te, vae = load_toy(cfg.ckpt, device, dtype)
    else:
        t0 = time.perf_counter()
        model, te, vae = load_real(cfg, device, dtype)
        print(f"loaded the student, umT5 and the VAE in {time.perf_counter() - t0:.1f} s ({dtype}, {device})")

    dit = model
    if cfg.compile:
        dit = torch.compile(model, fullgraph=True, backend=cfg.compile_backend)
    if cfg.live:
        return run_live(cfg, model, te, vae, dit, jobs[0][0])

    new_prompts = None
    if cfg.interactive:
        new_prompts = stdin_lines()
        print("interactive: type a prompt and press Enter; it takes effect at the next chunk")
    for i, (schedule, out) in enumerate(jobs):
        if len(jobs) > 1:
            print(f"[{i + 1}/{len(jobs)}] {out}: {schedule[0][1]!r}")
        prompts = encode_schedule(te, schedule, device, dtype)
        if i == len(jobs) - 1 and new_prompts is None:  # umT5-XXL is 11 GB in bf16: let it go before streaming
            te = None
            free_memory(device)
        stats = stream_video(cfg, model, vae, prompts, out, dit=dit, te=te, new_prompts=new_prompts)
        report(stats, cfg, out, device)
        if stats["interrupted"]:
            raise SystemExit(130)


def run_live(cfg, model, te, vae, dit, schedule, live=None, log=print):
    """--live: serve the page (live.py) and stream into it at --fps, one video after another: a restart from the
    page ends the current one (its mp4 closed) and starts the next from the new seed, with the prompt the last one
    had reached, into OUT_001.mp4, OUT_002.mp4, ... A finished video waits for a restart. Ctrl-C closes the mp4 and
    exits with 130. live: an already served live.Live (tests); by default one is served on --host:--port."""
    from live import Live, host_warning

    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    if live is None:
        per_chunk = cfg.chunk_frames * vae.cfg.temporal_stride  # pixel frames of a chunk after the first
        live = Live(cfg.fps, cfg.live_ahead or 2 * per_chunk, lambda text: toy_words(te.tokenizer, [text]),
                    seed=cfg.seed, recache=cfg.recache)
        if warning := host_warning(cfg.host):
            log(warning)
        try:
            url = live.serve(cfg.host, cfg.port)
        except OSError as err:
            live.close()
            raise SystemExit(f"--host={cfg.host} --port={cfg.port}: cannot serve there ({err.strerror or err})") from None
        log(f"live: open {url} in a browser (Ctrl-C stops)")
        sys.stdout.flush()  # a script reading our output sees the URL now
    run, out = dataclasses.replace(cfg), cfg.out
    try:
        while True:
            live.start_video(run.seed)
            stats = stream_video(run, model, vae, encode_schedule(te, schedule, device, dtype), out, dit=dit, te=te,
                                 new_prompts=live.prompts, live=live, log=log)
            report(stats, run, out, device, log=log)
            if stats["interrupted"]:
                raise SystemExit(130)
            if not live.stop_requested():  # the last frame: wait for a restart
                live.end_video()
                try:
                    if live.wait_restart() is None:
                        return
                except KeyboardInterrupt:
                    raise SystemExit(130) from None
            if live.closed:
                return
            run.seed = live.begin_restart()
            out = out_name(cfg.out, live.video) if cfg.out else ""
            schedule = [(0.0, stats["prompt"])]
            log(f"restart: video {live.video}, seed {run.seed}, {stats['prompt']!r}" + (f" -> {out}" if out else ""))
    finally:
        live.close()


if __name__ == "__main__":
    cli(main)
