"""
Toy-world evaluation: stream long rollouts (120+ frames) from a student and score them with the world's own rules
(data/toyworld.py). The toy model's latents are the toy VAE's (--vae, data/toy/vae.safetensors: 16 x 4 x 4 per 16x16
frame, no temporal compression, so a video frame is a latent frame); each chunk is decoded as it is streamed. A
network on RGB frames (in_dim 3, no VAE) is scored on its latents directly.

    python eval.py --ckpt out/toy/redmd --text_encoder data/toy
    python eval.py --ckpt out/toy/redmd --sink_mode=static --num_frames=240 --out_png rollout.png --curve_png curve.png
    python eval.py --teacher out/toy/teacher --num_frames=12   # the bidirectional teacher, with its own sampler
    python eval.py --teacher out/toy/teacher --num_frames=12 --denoise 500 --denoise 950   # its one-step predictions
    python eval.py --ckpt out/toy/redmd --out_png cmp.png --png_teacher out/toy/teacher   # student, teacher, world
    python eval.py --ckpt out/toy/redmd --switch=true --sink_mode=static --out_png switch.png   # prompt switches
    python eval.py --ckpt out/abl/static_s0/redmd --runs out/abl/static_s1/redmd --sink_mode=static --out_json static.json
    python eval.py --compare ema.json --compare static.json --curve_png sinks.png   # saved results side by side

Metrics, each on one video [3, T, H, W] in [-1, 1] and its caption (higher is better except drift and copy):
- dynamics  mean |x_{t+1} - x_t| over pixels, channels and steps. 0: static video. World clips: ~0.05-0.15.
- fidelity  per frame, IoU of the asked colour's pixels with the asked 6x6 sprite at its best placement, counted
            only when no other shape's sprite fits better; mean over frames. 1: the asked object, intact, alone
            in its colour, in every frame. 0: no pixel of the asked colour (e.g. a wrong-colour video).
- drift     standard deviation (M - 1 normalised) of fidelity over M consecutive segments (paper Eq. 12; Eq. 13 is
            the mean over videos, which the CLI reports). 0: constant quality along the video.
- copy      similarity of the last quarter of the frames to the first chunk: mean over those frames of
            max(0, 1 - d / COPY_REF), d = the fraction of pixels that differ (by more than CHANGE_TOL, so flicker
            does not count) from the closest first-chunk frame, COPY_REF = the fraction a fully moved object changes.
            1: late frames repeat the first chunk; 0: every late frame differs from it by a moved object or more.
- alignment fraction of 2-frame windows in which the object moves as the caption says: the captioned direction,
            flipped at each bounce and turned by "turns", at the captioned speed (within x1.5, doubled after
            "speeds up"). 1: obeys the caption throughout; 0: never (a static video, the wrong direction or axis).
- camera    fraction of 2-frame windows in which the background stripes shift as the caption's pan says (1 px to
            the left per 2 frames for "pans right", right for "pans left", none without a pan).
The CLI also scores the world's own clips of the same captions ("world", the ceiling) and those clips frozen on
their first frame ("static", what a generator that never moves gets), and reports every metric per segment along the
rollout, for plotting quality against length.

Prompt switches (--switch=true; paper Fig. 7, and the sink ablation of Table 3): caption pairs (A, B) that differ at
least in colour and background (switch_pairs: A is the i-th evaluation caption, B a caption of another world seed
recoloured where it clashes), one rollout per pair and noise seed that streams A for the first K chunks and then B, the
prompt replaced between chunks as sample.py does it (cache.set_prompt, --recache optional; the chunks before the switch
are the plain evaluation's rollouts of the same captions, seeds and --batch_size). The switch frame is
T0 = K * chunk_frames; the n = T - T0 frames from T0 on are "after the switch", and C = chunk_frames. Per frame after
the switch: follow_B(t) = fidelity_per_frame to B, linger_A(t) = fidelity_per_frame to A, and background_match to
B's and to A's background (the fraction of the frame's gray pixels within BG_TOL of one of that background's two
stripe grays). Scores of one video:
- pre       mean fidelity to A over the frames before the switch, in [0, 1]: did the model draw A at all (a model that
            never did lingers 0 for free).
- latency   frames after the switch until B's object is found (follow_B >= PRESENT_IOU) in C consecutive frames
            (one chunk's worth): the first such window's start, in [0, n - C], or n when none. 0: B from the first
            frame after the switch; n: never. An object that shows A for N more frames and then B: N.
- follow    mean follow_B over the frames after the first post-switch chunk (frames T0 + C .. T - 1), in [0, 1]:
            how completely the video follows B once it had a chunk to turn. 1: B's object, intact, in every frame.
- linger    mean linger_A over all frames after the switch, in [0, 1]. 0 (ideal): A's object gone at the switch;
            1: A's object intact to the end.
- hold      frames after the switch until A's object is gone for good: 1 + the last post-switch frame in which it is
            found (linger_A >= PRESENT_IOU), 0 when it never is, n when it is still there at the end.
- bg_latency like latency, for the background: the first of C consecutive post-switch frames in which more than half
            of the gray pixels are on B's stripes, in [0, n - C], or n. It does not need an intact object, so it still
            times the switch of a student whose objects rarely reach PRESENT_IOU (then latency sits near n: read
            latency, follow and hold next to pre).
- bg_follow mean over frames T0 + C .. T - 1 of the share of gray pixels on B's background, in [0, 1]. 1: ideal.
- bg_linger mean over all frames after the switch of the share of gray pixels on A's background, in [0, 1]. 0: ideal.
Known answers (switch_clip, frozen_clip): the world's switch (A's clip to T0, then B's clip from its start) scores
pre 1, latency 0, follow 1, linger 0, hold 0, bg_latency 0, bg_follow 1, bg_linger 0 ("world" row); A's clip frozen on
its frame T0 - 1 scores pre 1, latency n, follow 0, linger 1, hold n, bg_latency n, bg_follow 0, bg_linger 1 ("frozen"
row), and so does A's clip carrying on; B shown N frames late (N <= n - C) has latency, hold and bg_latency N. The table
gives each row's mean over videos with a 95% percentile-bootstrap interval, and the model's per-chunk means after the
switch.
"""

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from config import cli, configure, opt, pick_device, pick_dtype, writable_dir
import dmd
import weights
from data import toyworld
from dmd import FlowMatch
from model import WanConfig
from weights import CheckpointError
from sink import MODES, SinkCache, rollout, settings_error, settings_mismatch

COLOR_TOL = 0.6  # a pixel has colour c when every channel is within this of c's (palettes are >= 1.6 apart)
NEUTRAL_TOL = 0.3  # a background pixel: channel spread (max - min) below this
PRESENT_IOU = 0.5  # the object is "found" in a frame when its sprite fits the colour mask this well
LAG = 2  # frames per motion window: slow objects move exactly 1 px per 2 frames
WALL = 1  # px: windows with the object this close to a wall on its axis of motion are not judged (bounces)
SPEED_TOL = 1.5  # measured speed within [v / 1.5, v * 1.5] of the captioned speed v
CHANGE_TOL = 0.3  # a pixel "changed" when a channel moved more than this (palette steps are >= 0.4; noise is not)
COPY_REF = 2 * 32 / 256  # changed-pixel fraction of a frame whose 6x6 object moved to a non-overlapping place
METRICS = ("dynamics", "fidelity", "drift", "copy", "alignment", "camera")
_GRAYS = sorted({g for pair in toyworld.BACKGROUNDS.values() for g in pair})  # every stripe gray of the world
BG_TOL = round(min(b - a for a, b in zip(_GRAYS, _GRAYS[1:])) / 2, 6)  # on a stripe gray: closer than this (0.2)
SWITCH_METRICS = ("pre", "latency", "follow", "linger", "hold", "bg_latency", "bg_follow", "bg_linger")
SWITCH_FRAMES = ("latency", "hold", "bg_latency")  # switch metrics counted in frames (the others are in [0, 1])


def asked(caption):
    """A caption string, a toyworld.Spec or a parse_caption dict -> the dict of asked attributes."""
    if isinstance(caption, str):
        return toyworld.parse_caption(caption)
    if isinstance(caption, toyworld.Spec):
        return toyworld.parse_caption(toyworld.caption(caption))
    return caption


# ----------------------------------------------------------------------------- finding the object


def color_mask(video, color):
    """[3, T, H, W] -> [T, H, W] bool: pixels of the palette colour `color`."""
    c = torch.tensor(toyworld.COLORS[color], dtype=video.dtype, device=video.device)[:, None, None, None]
    return (video - c).abs().amax(dim=0) < COLOR_TOL


def sprite_fits(mask):
    """IoU of every sprite at every placement inside the frame with the colour mask.
    mask [T, H, W] bool -> iou [T, n_shapes, H - 5, W - 5] (placement = the sprite's top-left corner),
    shapes in toyworld.SHAPES order. Union counts every pixel of the colour, so stray pieces lower it."""
    m = mask.float()[:, None]  # [T, 1, H, W]
    tpl = torch.stack([toyworld.TEMPLATES[s] for s in toyworld.SHAPES]).float()[:, None].to(m.device)  # [3, 1, 6, 6]
    inter = F.conv2d(m, tpl)  # [T, 3, H-5, W-5]
    union = m.sum(dim=(1, 2, 3))[:, None, None, None] + tpl.sum(dim=(1, 2, 3))[None, :, None, None] - inter
    return inter / union


def track(video, spec):
    """The asked object per frame: (frame_iou [T], position [T, 2] float (x, y) of the sprite's top-left,
    found [T] bool). frame_iou is the asked sprite's best IoU, or 0 when another shape fits better."""
    spec = asked(spec)
    iou = sprite_fits(color_mask(video.float(), spec["color"]))  # [T, 3, h, w]
    T, _, h, w = iou.shape
    k = toyworld.SHAPES.index(spec["shape"])
    best_per_shape = iou.flatten(2).amax(dim=2)  # [T, 3]
    own, where = iou[:, k].flatten(1).max(dim=1)  # [T], [T] flat placement index
    wins = own >= best_per_shape.amax(dim=1) - 1e-6  # no other shape fits better
    frame_iou = torch.where(wins, own, torch.zeros_like(own))
    pos = torch.stack([where % w, where // w], dim=1).float()  # [T, 2] (x, y)
    return frame_iou, pos, own >= PRESENT_IOU


# ----------------------------------------------------------------------------- the metrics


def dynamics(video):
    """Mean absolute frame-to-frame change over pixels, channels and steps, in [0, 2]. 0: a static video."""
    video = video.float()
    if video.shape[1] < 2:
        return 0.0
    return (video[:, 1:] - video[:, :-1]).abs().mean().item()


def fidelity_per_frame(video, caption):
    """[T] in [0, 1]: per frame, the asked sprite's IoU with the asked colour's pixels (0 if another shape fits
    better). 1: exactly the asked shape, intact, and nothing else of its colour; 0: the colour is absent."""
    return track(video, caption)[0]


def fidelity(video, caption):
    """Mean of fidelity_per_frame over frames, in [0, 1]. World clips score 1; a wrong-colour video 0."""
    return fidelity_per_frame(video, caption).mean().item()


def segments(T, segment_frames):
    """Consecutive whole segments of a T-frame video: list of (start, end); the remainder is dropped."""
    return [(s, s + segment_frames) for s in range(0, T - segment_frames + 1, segment_frames)]


def drift(video, caption, segment_frames=12):
    """Paper Eq. 12 with fidelity as the quality score: the standard deviation (M - 1 normalised) of per-segment
    fidelity over the M whole segments of `segment_frames` frames, in [0, ~0.7]. 0: constant quality (or M < 2)."""
    per_frame = fidelity_per_frame(video, caption)
    segs = segments(len(per_frame), segment_frames)
    if len(segs) < 2:  # fewer than two whole segments (e.g. a teacher's single frames): nothing to compare
        return 0.0
    return torch.stack([per_frame[a:b].mean() for a, b in segs]).std(unbiased=True).item()


def copy_score(video, chunk_frames=3):
    """First-frame copying, in [0, 1]: mean over the last quarter of the frames of max(0, 1 - d / COPY_REF), where d
    is the fraction of pixels whose colour differs by more than CHANGE_TOL (any channel) from the closest frame of
    the first chunk. 1: late frames repeat the first chunk (up to flicker below CHANGE_TOL); 0: each late frame
    differs from all of it at least as much as when the 6x6 object moves to a non-overlapping place (a 1 px step
    of the object alone gives ~0.8, any pan shift of the stripes ~0)."""
    video = video.float()
    T = video.shape[1]
    first = video[:, :chunk_frames]  # [3, C, H, W]
    late = video[:, max(chunk_frames, T - max(1, T // 4)) :]  # [3, L, H, W]
    if late.shape[1] == 0:
        return 1.0
    changed = (late[:, :, None] - first[:, None]).abs().amax(dim=0) > CHANGE_TOL  # [L, C, H, W]
    d = changed.float().mean(dim=(2, 3)).amin(dim=1)  # [L]: vs the closest first-chunk frame
    return (1 - d / COPY_REF).clamp(min=0).mean().item()


def motion_checks(video, caption):
    """Per window [t, t + LAG] (t = 0 .. T-1-LAG): 1.0 if the object moves as the caption says, 0.0 if not, nan if
    the window is not judged. Returns [T - LAG] float.

    The expected direction d follows the world's rules, driven by where the object is seen: it starts as the
    caption's, turns clockwise at frames 6, 12, ... for "turns", and whenever the object is within WALL px of a wall
    on d's axis it is set to point away from that wall (a bounce). Windows with the object that close to a wall on
    d's axis, or straddling a turn or the speed-up, are not judged (the exact bounce frame is not the model's to
    match). A turn taken next to a wall leaves the sign of the new direction open (did the bounce come first?): the
    next judgeable window in which the object moves along the new axis settles it and is not judged itself.
    A judged window passes when the object is found at both ends, moved along d by a positive amount at the
    captioned speed (within x SPEED_TOL), and less across d than along it. A missing object fails the window."""
    spec = asked(caption)
    _, pos, found = track(video, spec)
    pos, found = pos.cpu().numpy(), found.cpu().numpy()
    T, H, W = video.shape[1], video.shape[2], video.shape[3]
    hi = np.array([W - toyworld.SPRITE, H - toyworld.SPRITE])  # largest top-left x, y
    turns, speeds_up = spec["event"] == "turns", spec["event"] == "speeds up"

    def turn_at(t):
        return turns and t > 0 and t % toyworld.TURN_EVERY == 0

    def rule_change(t):  # does the velocity change at frame t
        return turn_at(t) or (speeds_up and t == toyworld.SPEEDUP_AT)

    def wall(t, d):  # -1 / +1: the object at frame t is within WALL px of the low / high wall on d's axis; 0: not
        k = 0 if d[0] != 0 else 1
        if not found[t]:
            return 0
        return -1 if pos[t, k] <= WALL else (1 if pos[t, k] >= hi[k] - WALL else 0)

    d = np.array(toyworld.DIRECTIONS[spec["direction"]], dtype=np.float64)  # expected direction from frame t on
    v = toyworld.SPEEDS[spec["speed"]]  # expected speed from frame t on
    open_sign = False  # a turn next to a wall left the sign of d undecided
    out = np.full(max(T - LAG, 0), np.nan)
    for t in range(T):
        # the state at frame t
        if turn_at(t):
            open_sign = wall(t, d) != 0
            d = np.array([-d[1], d[0]])  # clockwise on screen
        if speeds_up and t == toyworld.SPEEDUP_AT:
            v = 2 * v
        side = wall(t, d)
        if side != 0:
            k = 0 if d[0] != 0 else 1
            d[k] = -side * abs(d[k])  # point away from that wall
            open_sign = False
        # the window [t, t + LAG]
        if t >= T - LAG or any(rule_change(s) for s in range(t + 1, t + LAG)):
            continue
        if any(wall(s, d) != 0 for s in range(t, t + LAG + 1)):
            continue
        if not (found[t] and found[t + LAG]):
            out[t] = 0.0
            continue
        delta = pos[t + LAG] - pos[t]
        along = float(delta @ d)
        across = abs(float(delta @ np.array([-d[1], d[0]])))
        if open_sign:
            if along != 0 and across < abs(along):
                d, open_sign = d * np.sign(along), False  # settled by what happened
            continue
        rate = along / LAG
        out[t] = float(along > 0 and across < along and v / SPEED_TOL <= rate <= v * SPEED_TOL)
    return torch.from_numpy(out)


def alignment(video, caption):
    """Fraction of judged motion windows (see motion_checks) that obey the caption, in [0, 1]. 1: the object always
    moves the captioned way (bounces and turns honoured); 0: never, or no window could be judged (e.g. the object
    sits against a wall)."""
    c = motion_checks(video, caption)
    c = c[~c.isnan()]
    return c.mean().item() if len(c) else 0.0


def background_profile(video):
    """[3, T, H, W] -> [T, W]: the mean of each column's neutral (gray) pixels, nan where a column has none."""
    video = video.float()
    neutral = (video.amax(dim=0) - video.amin(dim=0)) < NEUTRAL_TOL  # [T, H, W]
    gray = video.mean(dim=0)  # [T, H, W]
    n = neutral.sum(dim=1)  # [T, W]
    return torch.where(n > 0, (gray * neutral).sum(dim=1) / n.clamp(min=1), torch.full_like(gray[:, 0], math.nan))


def camera_checks(video, caption, max_shift=2):
    """Per window [t, t + LAG]: 1.0 if the background's best-matching horizontal shift is the caption's pan (strictly
    better than every other shift in [-max_shift, max_shift]), else 0.0. Returns [T - LAG] float.
    "pans right" moves the stripes left: frame t + LAG at column x shows frame t's column x + 1."""
    spec = asked(caption)
    want = {"none": 0, "right": 1, "left": -1}[spec["pan"]] * round(toyworld.PAN_SPEED * LAG)
    prof = background_profile(video)  # [T, W]
    T, W = prof.shape
    if T <= LAG:
        return torch.zeros(0, dtype=torch.float64)
    errs = []
    for s in range(-max_shift, max_shift + 1):
        a = prof[LAG:, max(0, -s) : W - max(0, s)]  # [T-LAG, W-|s|]: column x of the later frame ...
        b = prof[:-LAG, max(0, s) : W + min(0, s)]  # ... against column x + s of the earlier one
        diff = (a - b).abs()
        ok = ~diff.isnan()
        n = ok.sum(dim=1)
        err = torch.where(n > 0, diff.nan_to_num(0).sum(dim=1) / n.clamp(min=1), torch.full_like(diff[:, 0], math.inf))
        errs.append(err)  # [T-LAG]
    errs = torch.stack(errs, dim=1)  # [T-LAG, 2 * max_shift + 1]
    j = want + max_shift
    others = torch.cat([errs[:, :j], errs[:, j + 1 :]], dim=1).amin(dim=1)
    return (errs[:, j] < others - 1e-6).double()


def camera(video, caption):
    """Fraction of windows whose background motion matches the caption's pan (or its absence), in [0, 1]. 1: always;
    0: never (also for a flat, textureless background, whose shift cannot be seen)."""
    c = camera_checks(video, caption)
    return c.mean().item() if len(c) else 0.0


def score(video, caption, segment_frames=12, chunk_frames=3):
    """Every metric of one video [3, T, H, W] against its caption: dict name -> float."""
    return dict(dynamics=dynamics(video), fidelity=fidelity(video, caption), drift=drift(video, caption, segment_frames),
                copy=copy_score(video, chunk_frames), alignment=alignment(video, caption), camera=camera(video, caption))


SPLITS = (("camera", "pan", ("none", "left", "right")), ("alignment", "event", ("none", "turns", "speeds up")),
          ("alignment", "speed", ("slowly", "fast")))  # (metric, caption attribute, its values) read by by_caption


def by_caption(scores, captions):
    """Where a model fails, by what its captions ask: for each (metric, attribute, values) in SPLITS, the metric's mean
    over the videos whose caption asks that value, e.g. "camera|pan=none" (nan when no caption asks it). A teacher
    that keeps the background still but never pans scores camera 1 for pan=none and 0 for left and right; the world's
    clips frozen on their first frame score exactly that. scores: score() dicts, one per video of captions[i]."""
    asks = [asked(c) for c in captions]
    out = {}
    for metric, attr, values in SPLITS:
        for value in values:
            xs = [s[metric] for s, a in zip(scores, asks) if a[attr] == value]
            out[f"{metric}|{attr}={value}"] = float(np.mean(xs)) if xs else math.nan
    return out


def per_segment(video, caption, segment_frames=12):
    """Metrics per segment along the video (for curves against rollout length): dict name -> list over segments of
    dynamics (steps ending in the segment), fidelity, alignment and camera (windows starting in the segment;
    nan when none is judged)."""
    video = video.float()
    step = (video[:, 1:] - video[:, :-1]).abs().mean(dim=(0, 2, 3))  # [T-1]: step t -> t+1
    fid = fidelity_per_frame(video, caption)
    mot, cam = motion_checks(video, caption), camera_checks(video, caption)

    def mean(x):
        x = x[~x.isnan()]
        return x.float().mean().item() if len(x) else math.nan

    out = {k: [] for k in ("dynamics", "fidelity", "alignment", "camera")}
    for a, b in segments(video.shape[1], segment_frames):
        out["dynamics"].append(mean(step[max(a - 1, 0) : b - 1]))
        out["fidelity"].append(mean(fid[a:b]))
        out["alignment"].append(mean(mot[a:b]))
        out["camera"].append(mean(cam[a:b]))
    return out


# ----------------------------------------------------------------------------- prompt switches


def switch_pairs(n, seed=1, size=16):
    """n caption pairs (A, B) as toyworld Specs, deterministic in the world seed: A is the i-th clip of world `seed`
    (the i-th evaluation caption), B the i-th clip of world seed + 1000 with its colour and background redrawn (from
    its own seeded stream) where they equal A's, so following B and lingering on A are told apart by colour and by
    background. The i-th pair does not depend on n."""
    pairs = []
    for i in range(n):
        a, b = toyworld.sample_spec(i, seed, size), toyworld.sample_spec(i, seed + 1000, size)
        rng = np.random.default_rng([seed, i, 1])
        if b.color == a.color:
            b.color = str(rng.choice([c for c in toyworld.COLORS if c != a.color]))
        if b.background == a.background:
            b.background = str(rng.choice([g for g in toyworld.BACKGROUNDS if g != a.background]))
        pairs.append((a, b))
    return pairs


def switch_clip(a, b, num_frames, switch_frame, size=16, late=0):
    """The world's answer to a switch from spec a to spec b at switch_frame: [3, T, S, S], a's clip up to frame
    switch_frame + late - 1, then b's clip from its first frame. late=0 is the ideal switch; late=N shows A for N
    more frames (switch latency N); late >= T - switch_frame never leaves A."""
    t = min(switch_frame + late, num_frames)
    return torch.cat([toyworld.render(a, t, size), toyworld.render(b, num_frames - t, size)], dim=1)


def frozen_clip(a, num_frames, switch_frame, size=16):
    """A generator that ignores the switch and stops: a's clip up to switch_frame - 1, then its last frame repeated.
    [3, T, S, S]."""
    video = toyworld.render(a, switch_frame, size)  # [3, T0, S, S]
    return torch.cat([video, video[:, -1:].expand(-1, num_frames - switch_frame, -1, -1)], dim=1)


def background_match(video, caption):
    """[T] in [0, 1]: per frame, the share of its gray pixels (channel spread < NEUTRAL_TOL) whose gray level is
    within BG_TOL of one of the caption's background's two stripe grays. 1: every gray pixel is on that background's
    stripes (the world's clips of it); 0: none is (another background, or no gray pixel at all)."""
    video = video.float()
    neutral = (video.amax(dim=0) - video.amin(dim=0)) < NEUTRAL_TOL  # [T, H, W]
    gray = video.mean(dim=0)  # [T, H, W]
    levels = torch.tensor(toyworld.BACKGROUNDS[asked(caption)["background"]], dtype=gray.dtype)  # [2]
    on = ((gray[..., None] - levels).abs() < BG_TOL).any(dim=-1) & neutral  # [T, H, W]
    return on.flatten(1).sum(dim=1) / neutral.flatten(1).sum(dim=1).clamp(min=1)


def switch_curves(video, a, b, switch_frame):
    """Per frame after the switch (frames switch_frame .. T - 1 of video [3, T, H, W]): dict of [n] float tensors
    follow (fidelity to b), linger (fidelity to a), bg_follow (background_match to b), bg_linger (to a)."""
    after = video[:, switch_frame:].float()  # [3, n, H, W]
    return dict(follow=fidelity_per_frame(after, b), linger=fidelity_per_frame(after, a),
                bg_follow=background_match(after, b), bg_linger=background_match(after, a))


def switch_score(video, a, b, switch_frame, chunk_frames=3):
    """The switch metrics of one video [3, T, H, W] that was asked for caption a, then b from switch_frame on (the
    module docstring defines them): dict name -> float, latency, hold and bg_latency in frames."""
    cur = switch_curves(video, a, b, switch_frame)
    C = chunk_frames

    def first_run(ok):  # ok [n] bool -> the first d with ok in frames d .. d + C - 1, else n
        runs = ok.unfold(0, C, 1).all(dim=1) if len(ok) >= C else ok[:0]  # [n - C + 1]
        return float(runs.nonzero()[0, 0].item() if runs.any() else len(ok))

    seen_a = (cur["linger"] >= PRESENT_IOU).nonzero()  # post-switch frames in which A's object is found
    return dict(pre=fidelity(video[:, :switch_frame], a) if switch_frame > 0 else math.nan,
                latency=first_run(cur["follow"] >= PRESENT_IOU), follow=cur["follow"][C:].mean().item(),
                linger=cur["linger"].mean().item(), hold=float(seen_a[-1, 0].item() + 1 if len(seen_a) else 0),
                bg_latency=first_run(cur["bg_follow"] > 0.5), bg_follow=cur["bg_follow"][C:].mean().item(),
                bg_linger=cur["bg_linger"].mean().item())


def interval(values, level=0.95, resamples=1000):
    """Mean of `values` and a percentile-bootstrap interval for it (seeded: the same values give the same interval):
    (mean, lo, hi)."""
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, len(x), size=(resamples, len(x)))  # [resamples, N]
    lo, hi = np.percentile(x[idx].mean(axis=1), [50 * (1 - level), 50 * (1 + level)])
    return float(x.mean()), float(lo), float(hi)


# two-sided 95% quantiles of Student's t for 1 .. 10 degrees of freedom (standard tables); beyond, the Cornish-Fisher
# expansion around the normal's 1.959964, which is within 1e-3 of the exact quantile there
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281)


def t975(df):
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def over_runs(rows):
    """Rows of several training runs (each: metric -> {"mean": ...}, e.g. evaluate()["model"]) -> metric -> {mean,
    lo, hi, runs}: the mean over runs of the per-run means and a 95% t-interval, mean ± t(n-1) s / sqrt(n) with the
    sample std s over runs (lo = hi = mean for one run). A metric that is nan in some run uses the others."""
    out = {}
    for m in rows[0]:
        x = np.array([r[m]["mean"] for r in rows], dtype=np.float64)
        x = x[~np.isnan(x)]
        if len(x) == 0:
            out[m] = dict(mean=math.nan, lo=math.nan, hi=math.nan, runs=[r[m]["mean"] for r in rows])
            continue
        half = t975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0
        out[m] = dict(mean=float(x.mean()), lo=float(x.mean() - half), hi=float(x.mean() + half),
                      runs=[r[m]["mean"] for r in rows])
    return out


def score_runs(first, cfg, te, run, dtype=None, device=None, log=print):
    """--runs: every --runs student scored by `run(model, te, cfg)` like `first` (the --ckpt result) -> (over_runs of
    the "model" rows, the model's curves averaged over all the runs: name -> per-segment (or per-chunk) list)."""
    from model import WanModel

    results = [first]
    for path in cfg.runs:
        log(f"scoring {path}")
        results.append(run(WanModel.from_pretrained(path, dtype=dtype, device=device, key=cfg.key or None), te, cfg))
    key = curve_key(first)
    return over_runs([r["model"] for r in results]), mean_curves([r[key]["model"] for r in results])


def curve_key(result):
    """Where a result keeps its curves: "chunks" (--switch: per chunk after the switch) or "segments" (plain)."""
    return "chunks" if "chunks" in result else "segments"


def mean_curves(curves):
    """Element-wise mean of several runs' curves (dicts name -> list of equal lengths), nan entries left out
    (nan where every run is nan)."""
    out = {}
    for k in curves[0]:
        x = np.array([c[k] for c in curves], dtype=np.float64)
        ok = ~np.isnan(x)
        out[k] = [float(x[ok[:, j], j].mean()) if ok[:, j].any() else math.nan for j in range(x.shape[1])]
    return out


def format_runs(agg):
    n = len(next(iter(agg.values()))["runs"])
    lines = ["", f"over {n} training runs (--ckpt and --runs): mean of the per-run means [95% t-interval over runs]"]
    for m, a in agg.items():
        lines.append(f"  {m:10s} {a['mean']:8.3f} [{a['lo']:.3f}, {a['hi']:.3f}]   runs: "
                     + " ".join("nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
                                for v in a["runs"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the CLI


@dataclass
class EvalConfig:
    ckpt: str = opt("data/toy/student.safetensors", "student checkpoint (a folder, .safetensors or .pt that "
                    "WanModel.from_pretrained reads), e.g. out/toy/redmd; default: the shipped toy student")
    key: str = opt("", "dict key of a training checkpoint (default: generator_ema, then generator)")
    text_encoder: str = opt("data/toy", "folder with tokenizer.json and text_encoder/ (written by data/prepare_toy.py)")
    vae: str = opt("data/toy/vae.safetensors", "the toy VAE (python vae.py train) that decodes a latent network's "
                                                "output; not read for a network on RGB frames (in_dim 3)")
    num_captions: int = opt(16, "captions to evaluate: toyworld.captions(num_captions, caption_seed) (--switch: "
                                "caption pairs, switch_pairs(num_captions, caption_seed))")
    caption_seed: int = opt(1, "world seed of the evaluation captions (data/toy/prompts.txt uses 0)")
    seeds: list[int] = opt(factory=lambda: [0], help="noise seeds; every caption is rolled out once per seed (repeat "
                                                     "the flag for several)")
    num_frames: int = opt(120, "video frames per rollout (the toy's latents are its frames: video frames = latent "
                               "frames), rounded up to whole chunks")
    height: int = opt(16, "frame height in pixels (= latent height for the toy); toy frames are square: = --width")
    width: int = opt(16, "frame width in pixels (= latent width for the toy); toy frames are square: = --height")
    batch_size: int = opt(16, "rollouts streamed together (the batch dim)")
    segment_frames: int = opt(12, "video frames per segment for drift and the per-segment curves")
    chunk_frames: int = opt(3, "latent frames per chunk")
    window_frames: int = opt(9, "attention window in latent frames, sink and current chunk included")
    sink_frames: int = opt(3, "sink frames (the first chunk becomes the sink)")
    sink_mode: str = opt("ema", f"cache mode: {' | '.join(MODES)} (paper Table 3)")
    alpha: float = opt(0.999, "EMA momentum of the sink (paper Eq. 4-5)")
    device: str = opt("auto", "cpu, cuda, mps, ... | auto (the current accelerator, else cpu)")
    dtype: str = opt("float32", "float32 | bfloat16 | float16")
    out_png: str = opt("", "write a grid of frames of the first rollouts here (rows: videos, model above its world "
                           "clip; columns: frames along the rollout)")
    png_videos: int = opt(4, "videos in --out_png")
    png_teacher: str = opt("", "--out_png: also sample this bidirectional teacher (a file, or a teacher-stage folder: "
                               "its EMA) on the same captions and first noise seed at its training length, and draw "
                               "it between the model and the world rows; every row then shows those first frames")
    png_frames: int = opt(20, "frames per video in --out_png, evenly spaced (--switch: consecutive, from the chunk "
                              "before the switch)")
    curve_png: str = opt("", "write dynamics (top) and fidelity (bottom) per segment against rollout length here "
                             "(red: model, gray: world clips; --switch: follow, linger and bg_follow per chunk after "
                             "the switch, blue: frozen)")
    switch: bool = opt(False, "prompt-switch evaluation instead (module docstring): stream caption A, switch to B at "
                              "--switch_chunk, score how fast and how completely B is followed and how long A lingers")
    switch_chunk: int = opt(-1, "--switch: the chunk that first streams under caption B (-1: the middle chunk, "
                                "num_chunks // 2); at least 1, and 2 chunks must follow it")
    runs: list[str] = opt(factory=list, help="more students trained with --ckpt's settings but other training seeds "
                                             "(repeat the flag): each is scored like --ckpt, and a last table gives "
                                             "every metric's mean over all the runs with a 95% t-interval over "
                                             "their means (an ablation row over training seeds)")
    out_json: str = opt("", "also write the result (the JSON line printed last) to this file, atomically: what "
                            "--compare reads")
    compare: list[str] = opt(factory=list, help="score nothing: tabulate result files written by --out_json (repeat the "
                                                "flag; all plain or all --switch results, of equal length) side by "
                                                "side, and with --curve_png draw every file's model curves (their mean "
                                                "over --runs where it has them) in one picture, one colour per file, "
                                                "labelled with the file's name")
    teacher: str = opt("", "score this bidirectional teacher instead of --ckpt (a file, or a teacher-stage folder: its "
                           "EMA): every video sampled at once by its own Euler sampler with CFG, not streamed (use its "
                           "training length, e.g. --num_frames=12)")
    euler_steps: int = opt(24, "--teacher: Euler steps")
    euler_shift: float = opt(3.0, "--teacher: sigma shift of the Euler grid")
    guidance: float = opt(2.0, "--teacher: CFG scale against the empty caption (the teacher's unconditional branch)")
    denoise: list[float] = opt(factory=list, help="--teacher: score its one-step predictions instead of its samples "
                                                  "(repeat the flag, e.g. --denoise 500 --denoise 950): the world's "
                                                  "clips of the evaluation captions noised to each timestep t, x0 = "
                                                  "x_t - sigma v with CFG --guidance, one row per t. What the teacher "
                                                  "reads from a noisy clip, beside what it makes from noise")
    recache: bool = opt(False, "--switch: also re-encode the window's frames under B at the switch (sample.py's "
                               "--recache, LongLive's recache)")


def check(cfg):
    """The one place eval.py checks its settings, before any model loads: numbers, the cache, the files and the
    output images. Relative default paths are found from any directory."""
    pick_dtype(cfg.dtype, pick_device(cfg.device))
    if cfg.compare:
        if cfg.out_png or cfg.out_json or cfg.runs:
            raise SystemExit("--compare draws and tabulates earlier results: only --curve_png goes with it")
        load_results(cfg.compare)  # every file readable and of one kind; nothing else is used
        check_outputs(cfg)
        return
    for name in ("num_captions", "num_frames", "height", "batch_size", "segment_frames", "png_videos", "png_frames"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name}={getattr(cfg, name)}: must be >= 1")
    if not cfg.seeds:
        raise SystemExit("--seeds: give at least one noise seed")
    if (err := settings_error(cfg)) is not None:  # first alone: the frame count below divides by chunk_frames
        raise SystemExit(err)
    frame_size(cfg)
    net = "teacher" if cfg.teacher else "ckpt"  # the network scored: --teacher replaces --ckpt
    if not cfg.ckpt and not cfg.teacher:
        raise SystemExit("--ckpt is empty: give a toy student, e.g. data/toy/student.safetensors or out/toy/redmd")
    here = os.path.dirname(os.path.abspath(__file__))  # relative defaults work from any directory
    for name in (net, "text_encoder", "vae"):
        path = getattr(cfg, name)
        if not os.path.exists(path) and os.path.exists(os.path.join(here, path)):
            setattr(cfg, name, os.path.join(here, path))
        if not os.path.exists(getattr(cfg, name)) and name != "vae":  # the VAE: checked below if it is needed
            raise SystemExit(f"--{name}={path}: no such file or folder")
    if cfg.runs and cfg.teacher:
        raise SystemExit("--runs: more students of --ckpt's settings; not with --teacher")
    for path in cfg.runs:
        network_header("runs", path, cfg.key)
    path = getattr(cfg, net)
    model_cfg = network_header(net, path, cfg.key)
    if model_cfg.in_dim != 3:  # a latent network: --vae decodes it, one latent frame per video frame
        from vae import VAEConfig

        try:
            vae_cfg = weights.vae(cfg.vae, VAEConfig)[1]
        except (CheckpointError, OSError) as err:
            raise SystemExit(f"--vae={cfg.vae}: {err}") from None
        if (vae_cfg.z_dim, vae_cfg.temporal_stride) != (model_cfg.in_dim, 1) or cfg.height % vae_cfg.spatial_stride:
            raise SystemExit(f"--{net}={path} has in_dim {model_cfg.in_dim}; --vae={cfg.vae} has z_dim "
                             f"{vae_cfg.z_dim}, temporal stride {vae_cfg.temporal_stride}, spatial stride "
                             f"{vae_cfg.spatial_stride}: eval.py needs a toy VAE of the network's channels, temporal "
                             f"stride 1, and --height a multiple of its spatial stride")
    frames = math.ceil(cfg.num_frames / cfg.chunk_frames) * cfg.chunk_frames
    if (err := settings_error(cfg, frames, model_cfg.rope_max_len)) is not None:
        raise SystemExit(err)
    if cfg.teacher and (cfg.switch or cfg.euler_steps < 1 or cfg.euler_shift <= 0):
        raise SystemExit("--teacher: needs --euler_steps >= 1 and --euler_shift > 0, and has no --switch (a "
                         "bidirectional teacher samples the whole video under one caption)")
    if cfg.denoise and (not cfg.teacher or any(not 0 < t <= 1000 for t in cfg.denoise) or cfg.out_png or cfg.runs):
        raise SystemExit(f"--denoise={cfg.denoise}: timesteps in (0, 1000], with --teacher, and no --out_png or --runs "
                         "(it scores one-step predictions of the world's clips, not videos)")
    if cfg.switch:
        switch_chunk(cfg)
        S = 0 if cfg.sink_mode == "none" else cfg.sink_frames
        ring = 0 if cfg.sink_mode == "full" else cfg.window_frames - S  # 'full' replays all its frames after the sink
        if cfg.recache and (S % cfg.chunk_frames or ring % cfg.chunk_frames):
            raise SystemExit(f"--recache replays whole chunks: the sink ({S} frames) and the window's frames after it "
                             f"({ring}) must be multiples of --chunk_frames={cfg.chunk_frames}")
    if cfg.png_teacher:
        if cfg.teacher or cfg.switch or not cfg.out_png:
            raise SystemExit("--png_teacher draws a teacher under a student's rollouts in --out_png: give --out_png, "
                             "and not with --teacher or --switch")
        teacher_cfg = network_header("png_teacher", cfg.png_teacher)
        if (teacher_cfg.in_dim, teacher_cfg.text_len) != (model_cfg.in_dim, model_cfg.text_len):
            raise SystemExit(f"--png_teacher={cfg.png_teacher}: in_dim {teacher_cfg.in_dim}, text_len "
                             f"{teacher_cfg.text_len}; the student has {model_cfg.in_dim}, {model_cfg.text_len}")
    check_outputs(cfg)


def check_outputs(cfg):
    """The output files: the right extension, in a folder that can be written (created if needed)."""
    for name in ("out_png", "curve_png", "out_json"):
        path = getattr(cfg, name)
        if path:
            ext = (".json",) if name == "out_json" else (".png", ".jpg", ".jpeg")
            if os.path.splitext(path)[1].lower() not in ext:
                raise SystemExit(f"--{name}={path}: a {' or '.join(ext)} file path")
            writable_dir(os.path.dirname(path) or ".", f"--{name}={path}")


def network_header(flag, path, key=""):
    """The WanConfig of the network file or folder --flag names, from its header (no tensor read); a missing or
    unreadable one is a one-line exit naming the flag."""
    if not os.path.exists(path):
        raise SystemExit(f"--{flag}={path}: no such file or folder")
    try:
        return weights.dit(path, WanConfig, key=key or None)[1]
    except (CheckpointError, OSError) as err:
        raise SystemExit(f"--{flag}={path}: {err}") from None


def switch_chunk(cfg):
    """--switch_chunk resolved (-1: the middle chunk) and checked: the chunk index K that first streams under B."""
    num_chunks = math.ceil(cfg.num_frames / cfg.chunk_frames)
    k = num_chunks // 2 if cfg.switch_chunk == -1 else cfg.switch_chunk
    if not 1 <= k <= num_chunks - 2:
        raise SystemExit(f"--switch_chunk={cfg.switch_chunk}: the switch needs a chunk of A before it and 2 chunks "
                         f"of B after it (follow skips the first), so 1 .. {num_chunks - 2} for "
                         f"--num_frames={cfg.num_frames} ({num_chunks} chunks of {cfg.chunk_frames}), or -1 for the middle")
    return k


@functools.lru_cache(maxsize=2)
def load_vae(path, device, dtype):
    from vae import WanVAE

    return WanVAE.from_pretrained(path, dtype=dtype, device=device).requires_grad_(False)


def pixel_decoder(model, cfg):
    """(side of a latent frame, a fresh stream decoder: latent chunks -> their pixel frames) for the network scored:
    --vae's for a latent network; for one on RGB frames (in_dim 3) its latents are the frames."""
    if model.cfg.in_dim == 3:
        return frame_size(cfg), lambda z: z
    p = next(model.parameters())
    vae = load_vae(cfg.vae, p.device, p.dtype)
    return frame_size(cfg) // vae.cfg.spatial_stride, vae.stream_decoder()


def frame_size(cfg):
    """The side of the toy world's square frames, in pixels (= latents): --height, which must equal --width."""
    if cfg.height != cfg.width:
        raise SystemExit(f"toy frames are square: --height {cfg.height} and --width {cfg.width} must be equal")
    return cfg.height


@torch.inference_mode()
def generate(model, text_encoder, prompts, cfg, seed, batch_index=0, switch_to=None):
    """Stream one batch of rollouts: prompts (list of B captions) -> videos [B, 3, T, S, S] float32 on the CPU,
    clamped to [-1, 1]. The noise comes from one generator seeded with (seed, batch_index). switch_to: B captions
    that replace `prompts` from chunk switch_chunk(cfg) on, the way sample.py switches (cache.set_prompt between
    chunks, with cfg.recache); the chunks before the switch are those of the rollout without it."""
    device = next(model.parameters()).device
    dtype = model.blocks[0].self_attn.k.weight.dtype
    s, decode = pixel_decoder(model, cfg)  # latent frames are s x s
    C = cfg.chunk_frames
    num_chunks = math.ceil(cfg.num_frames / C)
    context = text_encoder(prompts).to(device=device, dtype=dtype)  # [B, text_len, text_dim]
    cache = SinkCache.from_settings(model, cfg, len(prompts), s, s, num_frames=num_chunks * C)
    cache.set_prompt(model, context)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
    stream = rollout(model, cache, num_chunks, generator=gen)
    at = switch_chunk(cfg) if switch_to is not None else None
    chunks = []
    for k in range(num_chunks):
        if k == at:  # between chunks, as sample.py switches
            cache.set_prompt(model, text_encoder(switch_to).to(device=device, dtype=dtype), recache=cfg.recache)
        chunks.append(decode(next(stream)).float().cpu())  # [B, 3, C, S, S]
    return torch.cat(chunks, dim=2).clamp(-1, 1)  # [B, 3, T, S, S]


@torch.inference_mode()
def sample_teacher(model, text_encoder, prompts, cfg, seed, batch_index=0):
    """--teacher: the bidirectional teacher's videos of `prompts`, all frames denoised together by its own sampler
    (dmd.euler_sample: euler_steps Euler steps at shift euler_shift, CFG `guidance` against the empty caption,
    whose branch the teacher learned from dropped captions). Noise seeded with (seed, batch_index) as in generate.
    -> [B, 3, T, S, S] float32 on the CPU, clamped to [-1, 1]."""
    device = next(model.parameters()).device
    dtype = model.blocks[0].self_attn.k.weight.dtype
    s, decode = pixel_decoder(model, cfg)
    T = math.ceil(cfg.num_frames / cfg.chunk_frames) * cfg.chunk_frames
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
    x = torch.randn(len(prompts), model.cfg.in_dim, T, s, s, generator=gen, device=device)  # [B, C_lat, T, s, s]
    ts = FlowMatch(cfg.euler_shift).trajectory(cfg.euler_steps)
    ctx, uncond = (text_encoder(p).to(device=device, dtype=dtype) for p in (prompts, [""]))
    x, _ = dmd.euler_sample(model, x.to(dtype), ts, ctx, uncond, cfg.guidance)
    return decode(x).float().cpu().clamp(-1, 1)  # [B, 3, T, S, S]


@torch.no_grad()
def denoise(model, text_encoder, cfg, log=print):
    """--denoise: the world's clips of the evaluation captions (world_videos), coded to latents (--vae; RGB networks
    see the frames), noised to each t in cfg.denoise with noise seeded by each --seeds, and denoised in one step:
    x0 = x_t - sigma v, v = CFG(--guidance) of the conditional and empty-caption predictions. Each prediction is
    decoded and scored like a video. A perfect denoiser scores the world's row at every t; a teacher that can read
    motion off a noisy clip but not make it scores well here at the t where it fails from noise.
    -> dict t (str) -> {metric: mean over videos}, with the by_caption splits under "by_caption"."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    prompts = toyworld.captions(cfg.num_captions, cfg.caption_seed)
    world, _ = world_videos(cfg)  # [N, 3, T, S, S]
    vae = None if model.cfg.in_dim == 3 else load_vae(cfg.vae, device, dtype)  # read once: it codes and decodes
    if vae is None:
        x0 = world.to(device=device, dtype=torch.float32)
    else:
        x0 = vae.encode(world.to(device=device, dtype=dtype)).float()  # [N, C, T, h, w]
    ctx, uncond = (text_encoder(p).to(device=device, dtype=dtype) for p in (prompts, [""]))
    fm, out = FlowMatch(), {}  # sigma = t / 1000: t is the model's (already warped) timestep
    noise = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device) for seed in cfg.seeds]
    for t in cfg.denoise:
        scores, s = [], fm.sigma(float(t))
        for eps in noise:  # one draw per --seeds entry, the same at every t
            for b in range(0, len(prompts), cfg.batch_size):
                x, e, c = x0[b : b + cfg.batch_size], eps[b : b + cfg.batch_size], ctx[b : b + cfg.batch_size]
                B = len(x)
                xt = fm.add_noise(x, e, float(t))
                tt = torch.full((2 * B,), float(t), device=device)
                v = model(torch.cat([xt, xt]).to(dtype), tt, torch.cat([c, uncond.expand(B, -1, -1)])).float()
                x0_hat = xt - s * dmd.cfg(v[:B], v[B:], cfg.guidance)
                decode = (lambda z: z) if vae is None else vae.stream_decoder()  # a fresh one per batch of clips
                videos = decode(x0_hat.to(dtype)).float().cpu().clamp(-1, 1)  # [B, 3, T, S, S]
                scores += [score(vid, p, cfg.segment_frames, cfg.chunk_frames)
                           for vid, p in zip(videos, prompts[b : b + cfg.batch_size])]
        out[str(t)] = {m: float(np.mean([sc[m] for sc in scores])) for m in METRICS}
        out[str(t)]["by_caption"] = by_caption(scores, prompts * len(cfg.seeds))
        log(f"t {t:g}: scored {len(scores)} one-step predictions")
    return out


def format_denoise(result):
    splits = list(next(iter(result.values()))["by_caption"])
    w = max(len(k) for k in splits) + 2
    lines = ["one-step predictions of noised world clips (a perfect denoiser: 1 in every cell but dynamics, drift, "
             "copy)", f"{'t':>6s}" + "".join(f"{m:>10s}" for m in ("fidelity", "alignment", "camera"))
             + "".join(f"{k:>{w}s}" for k in splits)]
    for t, r in result.items():
        lines.append(f"{float(t):6g}" + "".join(f"{r[m]:>10.3f}" for m in ("fidelity", "alignment", "camera"))
                     + "".join(f"{r['by_caption'][k]:>{w}.3f}" for k in splits))
    return "\n".join(lines)


def world_videos(cfg):
    """The world's own clips of the evaluation captions, and the same clips frozen on their first frame:
    two tensors [N, 3, T, S, S]."""
    S, T = frame_size(cfg), math.ceil(cfg.num_frames / cfg.chunk_frames) * cfg.chunk_frames
    specs = [toyworld.sample_spec(i, cfg.caption_seed, S) for i in range(cfg.num_captions)]
    world = torch.stack([toyworld.render(s, T, S) for s in specs])
    return world, world[:, :, :1].expand_as(world).clone()


def summarize(videos, prompts, cfg):
    """Scores of many videos: (dict metric -> {mean, std}, dict metric -> per-segment means over videos,
    by_caption of their scores)."""
    scores = [score(v, p, cfg.segment_frames, cfg.chunk_frames) for v, p in zip(videos, prompts)]
    table = {m: dict(mean=float(np.mean([s[m] for s in scores])), std=float(np.std([s[m] for s in scores])))
             for m in METRICS}
    curves = [per_segment(v, p, cfg.segment_frames) for v, p in zip(videos, prompts)]
    seg = {k: [float(np.nanmean(col)) if not np.all(np.isnan(col)) else math.nan for col in zip(*(c[k] for c in curves))]
           for k in curves[0]}
    return table, seg, by_caption(scores, prompts)


def evaluate(model, text_encoder, cfg, log=print):
    """Roll out every evaluation caption x seed, score it, and compare with the world's clips. Returns a dict:
    model / world / static: metric -> {mean, std}; by_caption: model / world / static -> by_caption() of their
    scores; segments: frame_end and per-segment curves for each;
    videos: every rollout [N, 3, T, S, S], seed-major (caption i of the first seed is videos[i]; dropped from
    the JSON)."""
    prompts = toyworld.captions(cfg.num_captions, cfg.caption_seed)
    videos, names = [], []
    for seed in cfg.seeds:
        for b in range(0, len(prompts), cfg.batch_size):
            batch = prompts[b : b + cfg.batch_size]
            sample = sample_teacher if cfg.teacher else generate
            videos.append(sample(model, text_encoder, batch, cfg, seed, b // cfg.batch_size))
            names += batch
            log(f"seed {seed}: rolled out captions {b}..{b + len(batch) - 1} ({videos[-1].shape[2]} frames)")
    videos = torch.cat(videos)  # [N * seeds, 3, T, S, S]
    world, static = world_videos(cfg)
    result, curves = {"by_caption": {}}, {}
    for name, vids, caps in (("model", videos, names), ("world", world, prompts), ("static", static, prompts)):
        result[name], curves[name], result["by_caption"][name] = summarize(vids, caps, cfg)
    T = videos.shape[2]
    result["segments"] = dict(frame_end=[b for _, b in segments(T, cfg.segment_frames)], **curves)
    result["num_videos"] = len(videos)
    result["num_frames"] = T
    result["videos"] = videos
    return result


def evaluate_switch(model, text_encoder, cfg, log=print):
    """Roll out every caption pair x seed with the prompt switched from A to B at chunk switch_chunk(cfg), score the
    switch, and compare with the world's switch clips and A frozen at the switch. Returns a dict:
    model / world / frozen: metric -> {mean, lo, hi} (95% bootstrap interval over videos); chunks: the chunk ends in
    frames after the switch and each row's per-chunk means of follow, linger, bg_follow and bg_linger; pairs: the
    (A, B) captions; videos: every rollout [N, 3, T, S, S], seed-major (dropped from the JSON)."""
    S, C = frame_size(cfg), cfg.chunk_frames
    T = math.ceil(cfg.num_frames / C) * C
    T0 = switch_chunk(cfg) * C  # the first frame streamed under B
    pairs = switch_pairs(cfg.num_captions, cfg.caption_seed, S)
    caps = [(toyworld.caption(a), toyworld.caption(b)) for a, b in pairs]
    videos, asked_pairs = [], []
    for seed in cfg.seeds:
        for i in range(0, len(caps), cfg.batch_size):
            batch = caps[i : i + cfg.batch_size]
            videos.append(generate(model, text_encoder, [a for a, _ in batch], cfg, seed, i // cfg.batch_size,
                                   switch_to=[b for _, b in batch]))
            asked_pairs += batch
            log(f"seed {seed}: rolled out pairs {i}..{i + len(batch) - 1} ({T} frames, switch at frame {T0}"
                + (", recached" if cfg.recache else "") + ")")
    videos = torch.cat(videos)  # [N * seeds, 3, T, S, S]
    world = torch.stack([switch_clip(a, b, T, T0, S) for a, b in pairs])  # [N, 3, T, S, S]
    frozen = torch.stack([frozen_clip(a, T, T0, S) for a, _ in pairs])
    ends = list(range(C, T - T0 + 1, C))  # chunk ends, in frames after the switch
    result = dict(chunks=dict(frame_end=ends))
    for name, vids, cps in (("model", videos, asked_pairs), ("world", world, caps), ("frozen", frozen, caps)):
        scores = [switch_score(v, a, b, T0, C) for v, (a, b) in zip(vids, cps)]
        result[name] = {m: dict(zip(("mean", "lo", "hi"), interval([s[m] for s in scores]))) for m in SWITCH_METRICS}
        curves = [switch_curves(v, a, b, T0) for v, (a, b) in zip(vids, cps)]  # per video: name -> [n]
        result["chunks"][name] = {k: torch.stack([c[k] for c in curves]).view(len(curves), -1, C).mean(dim=(0, 2))
                                  .tolist() for k in curves[0]}
    result.update(num_videos=len(videos), num_frames=T, switch_frame=T0, pairs=caps, videos=videos)
    return result


def format_switch_table(result):
    T, T0, n = result["num_frames"], result["switch_frame"], result["num_frames"] - result["switch_frame"]
    lines = [f"{result['num_videos']} rollouts x {T} frames, caption A then B from frame {T0} on ({n} frames after the "
             f"switch); mean [95% bootstrap interval] over videos; latency, hold and bg_latency in frames (0 .. {n})",
             "  world: A's clip, then B's from its start; frozen: A's clip stopped at the switch"]
    for group in (SWITCH_METRICS[:5], SWITCH_METRICS[5:]):  # the object's metrics, then the background's
        lines.append(f"{'':8s}" + "".join(f"{m:>22s}" for m in group))
        for name in ("model", "world", "frozen"):
            cells = []
            for m in group:
                r, f = result[name][m], ".1f" if m in SWITCH_FRAMES else ".3f"
                cells.append(f"{r['mean']:{f}} [{r['lo']:{f}}, {r['hi']:{f}}]".rjust(22))
            lines.append(f"{name:8s}" + "".join(cells))
    ch = result["chunks"]
    lines.append("")
    lines.append("model per chunk after the switch (frames up to): " + " ".join(f"{f:>6d}" for f in ch["frame_end"]))
    for k in ("follow", "linger", "bg_follow", "bg_linger"):
        lines.append(f"  {k:46s}  " + " ".join(f"{x:6.3f}" for x in ch["model"][k]))
    return "\n".join(lines)


def format_table(result):
    lines = [f"{result['num_videos']} rollouts x {result['num_frames']} frames; mean ± std over videos "
             f"(world: the world's own clips of the same captions; static: those clips frozen on frame 0)",
             f"{'':8s}" + "".join(f"{m:>17s}" for m in METRICS)]
    for name in ("model", "world", "static"):
        lines.append(f"{name:8s}" + "".join(f"{result[name][m]['mean']:>9.3f} ± {result[name][m]['std']:<5.3f}"
                                            for m in METRICS))
    by = result["by_caption"]
    splits = list(by["model"])
    lines.append("")
    lines.append("by what the caption asks (mean over the videos that ask it):")
    w = max(len(k) for k in splits) + 2
    lines.append(f"{'':8s}" + "".join(f"{k:>{w}s}" for k in splits))
    for name in ("model", "world", "static"):
        lines.append(f"{name:8s}" + "".join(f"{by[name][k]:>{w}.3f}" for k in splits))
    seg = result["segments"]
    lines.append("")
    lines.append("model per segment (frames up to):  " + " ".join(f"{f:>6d}" for f in seg["frame_end"]))
    for k in ("dynamics", "fidelity", "alignment", "camera"):
        lines.append(f"  {k:32s}  " + " ".join(f"{x:6.3f}" for x in seg["model"][k]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- comparing saved results (--compare)

CURVES = {"segments": ("dynamics", "fidelity"), "chunks": ("follow", "linger", "bg_follow")}  # drawn by --compare
PALETTE = ((220, 30, 30), (30, 100, 220), (20, 150, 60), (230, 140, 0), (140, 50, 200), (0, 160, 170), (120, 80, 40),
           (235, 80, 170))  # one colour per --compare file; the world is gray


def load_results(paths):
    """--compare: result files written by --out_json -> [(label, result)], label = the file's name without .json,
    JSON nulls back to nan. Exits naming the file when one cannot be read or is not a result, or when the files mix
    plain and --switch results or curves of other lengths."""
    if len(paths) > len(PALETTE):
        raise SystemExit(f"--compare: at most {len(PALETTE)} files (one colour each), got {len(paths)}")
    items = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                r = json.load(fh, object_hook=_nan_back)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SystemExit(f"--compare={path}: cannot read a result from it ({err})") from None
        key = curve_key(r) if isinstance(r, dict) else "segments"
        names = CURVES[key]
        if not (isinstance(r, dict) and all(isinstance(r.get(k), dict) for k in ("model", "world", key))
                and isinstance(r[key].get("frame_end"), list)
                and all(isinstance(r[key].get(k), dict) and set(names) <= set(r[key][k]) for k in ("model", "world"))):
            raise SystemExit(f"--compare={path}: not a result written by eval.py --out_json (it needs the model and world "
                             f"rows and their {key} curves {', '.join(names)})")
        if items:
            first = items[0][1]
            if key != curve_key(first):
                kinds = {"chunks": "--switch", "segments": "plain"}
                raise SystemExit(f"--compare={path}: a {kinds[key]} result among {kinds[curve_key(first)]} ones "
                                 f"({paths[0]}): compare one kind")
            if r[key]["frame_end"] != first[key]["frame_end"]:
                raise SystemExit(f"--compare={path}: curves end at frames {r[key]['frame_end']}, {paths[0]}'s at "
                                 f"{first[key]['frame_end']}: compare results of the same --num_frames and "
                                 "--segment_frames")
        items.append((os.path.splitext(os.path.basename(path))[0], r))
    return items


def _nan_back(d):
    """JSON object hook: None (a nan written by no_nan) -> nan inside lists, so curves stay float lists."""
    return {k: [math.nan if x is None else x for x in v] if isinstance(v, list) else (math.nan if v is None else v)
            for k, v in d.items()}


def compare_table(items):
    """The --compare table: one row per file, each metric's mean over runs [95% t-interval] where the file has --runs,
    else its mean over videos; then the world's row of the first file."""
    metrics = SWITCH_METRICS if curve_key(items[0][1]) == "chunks" else METRICS
    width = max(12, *(len(label) + 2 for label, _ in items))
    lines = [f"{'':{width}s}" + "".join(f"{m:>22s}" for m in metrics)]
    for label, r in items + [("world", {"model": items[0][1]["world"]})]:
        cells = []
        for m in metrics:
            f = ".1f" if m in SWITCH_FRAMES else ".3f"
            if "over_runs" in r:
                a = r["over_runs"][m]
                cells.append(f"{a['mean']:{f}} [{a['lo']:{f}}, {a['hi']:{f}}]")
            else:
                cells.append(f"{r['model'][m]['mean']:{f}}")
        lines.append(f"{label:{width}s}" + "".join(c.rjust(22) for c in cells))
    runs = [len(next(iter(r["over_runs"].values()))["runs"]) if "over_runs" in r else 1 for _, r in items]
    lines.append(f"(training runs per row: {', '.join(map(str, runs))}; a row of one run gives its mean over videos)")
    return "\n".join(lines)


def compare_image(items):
    """The --compare picture: curve_image panels (plain: dynamics and fidelity per segment; --switch: follow, linger
    and bg_follow per chunk after the switch), the world in gray and each file's model curves (the mean over its runs
    where it has them) in a colour of its own, the panel names and a legend drawn in. -> uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw

    key = curve_key(items[0][1])
    names = CURVES[key]
    colors = {"world": (150, 150, 150), **{label: PALETTE[i] for i, (label, _) in enumerate(items)}}
    series = []
    for name in names:
        lines = {"world": items[0][1][key]["world"][name]}
        lines.update({label: r[key].get("over_runs", r[key]["model"])[name] for label, r in items})
        top = max([1e-3] + [y for ys in lines.values() for y in ys if not math.isnan(y)]) * 1.1
        series.append((name, lines, colors, top if name == "dynamics" else 1.0))
    plot = curve_image(items[0][1][key]["frame_end"], series)
    img = Image.new("RGB", (plot.shape[1], plot.shape[0] + 14 * len(colors) + 8), "white")
    img.paste(Image.fromarray(plot), (0, 0))
    draw = ImageDraw.Draw(img)
    panel = plot.shape[0] // len(names)
    for i, (name, *_, top) in enumerate(series):
        draw.text((22, i * panel + 2), f"{name} (0 .. {top:.3g})", fill=(0, 0, 0))
    for i, (label, color) in enumerate(colors.items()):
        y = plot.shape[0] + 4 + 14 * i
        draw.rectangle([16, y + 3, 32, y + 8], fill=color)
        draw.text((38, y), label, fill=(0, 0, 0))
    return np.asarray(img)


# ----------------------------------------------------------------------------- pictures (numpy rasters, no matplotlib)


def teacher_rows(videos, world, text_encoder, cfg, dtype=None, device=None):
    """--png_teacher: the first len(videos) evaluation captions as rows (model, teacher, world) per caption, each cut to
    the teacher's training length T (its checkpoint's num_frames, else 12): the teacher samples the whole clip at once
    with its own sampler (sample_teacher, first noise seed), reading the student's text encoder (check() made sure the
    two take the same text_len). videos, world [n, 3, >= T, S, S] -> list of 3n [3, T, S, S]."""
    from model import WanModel

    teacher = WanModel.from_pretrained(cfg.png_teacher, dtype=dtype, device=device)
    T = min(int((teacher.trained_with or {}).get("num_frames", 12)), videos.shape[2])
    taught = sample_teacher(teacher, text_encoder, toyworld.captions(len(videos), cfg.caption_seed),
                            replace(cfg, num_frames=T), cfg.seeds[0])  # whole chunks: at least T frames
    return [v[:, :T] for i in range(len(videos)) for v in (videos[i], taught[i], world[i])]


def frame_grid(videos, n_frames=20, scale=4):
    """videos [N, 3, T, S, S] -> uint8 image [h, w, 3]: one row per video, n_frames evenly spaced frames."""
    T = videos.shape[2]
    idx = torch.linspace(0, T - 1, min(n_frames, T)).round().long()
    return toyworld.strip([v[:, idx] for v in videos], scale=scale)


def _line(img, x0, y0, x1, y1, color, width=2):
    """Draw a straight line into img [H, W, 3] uint8 by dense sampling."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) * 2 + 2
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    for dx in range(width):
        for dy in range(width):
            ok = (xs + dx >= 0) & (xs + dx < img.shape[1]) & (ys + dy >= 0) & (ys + dy < img.shape[0])
            img[ys[ok] + dy, xs[ok] + dx] = color


def curve_image(frame_end, series, width=480, height=160, pad=16):
    """Stacked panels, one per metric: series is a list of (name, {label: values}, color per label, y_max).
    Axes in black with a tick per segment; lines in the given colours. Returns uint8 [H, W, 3]."""
    img = np.full((height * len(series), width, 3), 255, np.uint8)
    xmax = max(frame_end)
    for i, (_, lines, colors, ymax) in enumerate(series):
        top, bottom, left, right = i * height + pad, (i + 1) * height - pad, pad, width - pad
        _line(img, left, bottom, right, bottom, (0, 0, 0), 1)  # x axis
        _line(img, left, top, left, bottom, (0, 0, 0), 1)  # y axis
        _line(img, left - 4, top, left, top, (0, 0, 0), 1)  # y_max tick
        for f in frame_end:
            x = left + (right - left) * f / xmax
            _line(img, x, bottom, x, bottom + 4, (0, 0, 0), 1)

        def xy(f, y):
            return left + (right - left) * f / xmax, bottom - (bottom - top) * min(max(y / ymax, 0), 1)

        for label, ys in lines.items():
            pts = [xy(f, y) for f, y in zip(frame_end, ys) if not math.isnan(y)]
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                _line(img, x0, y0, x1, y1, colors[label])
    return img


def no_nan(x):
    """nan -> None, recursively, so the JSON line is strict JSON."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def emit(result, cfg):
    """The CLI's last step: the result with its config as one strict-JSON line on stdout, and in --out_json, written
    atomically (a temporary file, then a rename). Returns the result."""
    result["config"] = asdict(cfg)
    line = json.dumps(no_nan(result))
    print(line)
    if cfg.out_json:
        tmp = f"{cfg.out_json}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
        os.replace(tmp, cfg.out_json)
    return result


def main(argv=None):
    import imageio.v2 as imageio

    from model import WanModel
    from t5 import TextEncoder

    cfg = configure(EvalConfig(), argv, doc=__doc__)
    check(cfg)
    if cfg.compare:
        return main_compare(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        model = WanModel.from_pretrained(cfg.teacher or cfg.ckpt, dtype=dtype, device=device, key=cfg.key or None)
        te = TextEncoder.from_pretrained(cfg.text_encoder, dtype=dtype, device=device, text_len=model.cfg.text_len)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        raise SystemExit(f"loading failed: {err}") from None
    for line in settings_mismatch(model.trained_with, cfg):
        print(f"note: {line}")
    if cfg.switch:
        return main_switch(model, te, cfg, dtype, device)
    if cfg.denoise:
        result = {"denoise": denoise(model, te, cfg)}
        print(format_denoise(result["denoise"]))
        return emit(result, cfg)
    result = evaluate(model, te, cfg)
    print(format_table(result))
    videos = result.pop("videos")
    if cfg.runs:
        result["over_runs"], result["segments"]["over_runs"] = score_runs(
            result, cfg, te, lambda m, t, c: evaluate(m, t, c, log=lambda *a: None), dtype, device)
        print(format_runs(result["over_runs"]))
    if cfg.out_png:
        n = min(cfg.png_videos, cfg.num_captions)  # videos[i] is caption i under the first seed
        world, _ = world_videos(cfg)
        if cfg.png_teacher:  # model, teacher, world per caption, over the teacher's frames
            rows, names = teacher_rows(videos[:n], world[:n], te, cfg, dtype=dtype, device=device), "model, teacher, world"
            grid = toyworld.strip(rows)
        else:
            rows, names = [v for i in range(n) for v in (videos[i], world[i])], "model, world"
            grid = frame_grid(torch.stack(rows), cfg.png_frames)
        imageio.imwrite(cfg.out_png, grid)
        print(f"wrote {cfg.out_png}: rows = ({names}) for captions "
              + "; ".join(repr(c) for c in toyworld.captions(n, cfg.caption_seed)))
    if cfg.curve_png:
        seg = result["segments"]
        ymax = max(1e-3, *(y for k in ("model", "world") for y in seg[k]["dynamics"] if not math.isnan(y))) * 1.1
        colors = {"model": (220, 30, 30), "world": (150, 150, 150)}
        series = [("dynamics", {k: seg[k]["dynamics"] for k in ("world", "model")}, colors, ymax),
                  ("fidelity", {k: seg[k]["fidelity"] for k in ("world", "model")}, colors, 1.0)]
        imageio.imwrite(cfg.curve_png, curve_image(seg["frame_end"], series))
        print(f"wrote {cfg.curve_png}: top dynamics (0 .. {ymax:.3f}), bottom fidelity (0 .. 1) against frames "
              f"(ticks at {seg['frame_end'][0]}, {seg['frame_end'][1] if len(seg['frame_end']) > 1 else ''} ...); "
              f"red model, gray world")
    return emit(result, cfg)


def main_compare(cfg):
    """main() for --compare: the table of saved results, and with --curve_png their curves in one picture."""
    import imageio.v2 as imageio

    items = load_results(cfg.compare)
    print(compare_table(items))
    if cfg.curve_png:
        imageio.imwrite(cfg.curve_png, compare_image(items))
        print(f"wrote {cfg.curve_png}: " + ", ".join(label for label, _ in items) + " (legend at the bottom; gray: the "
              "world's clips)")
    return items


def main_switch(model, te, cfg, dtype=None, device=None):
    """main() for --switch=true: the switch table, the pictures and the JSON line."""
    import imageio.v2 as imageio

    result = evaluate_switch(model, te, cfg)
    print(format_switch_table(result))
    videos = result.pop("videos")
    if cfg.runs:
        result["over_runs"], result["chunks"]["over_runs"] = score_runs(
            result, cfg, te, lambda m, t, c: evaluate_switch(m, t, c, log=lambda *a: None), dtype, device)
        print(format_runs(result["over_runs"]))
    T, T0, C = result["num_frames"], result["switch_frame"], cfg.chunk_frames
    if cfg.out_png:  # consecutive frames around the switch, so the latency can be counted in columns
        n = min(cfg.png_videos, cfg.num_captions)  # videos[i] is pair i under the first seed
        pairs = switch_pairs(n, cfg.caption_seed, frame_size(cfg))
        world = [switch_clip(a, b, T, T0, frame_size(cfg)) for a, b in pairs]
        first = max(0, min(T0 - C, T - cfg.png_frames))
        last = min(T, first + cfg.png_frames)
        rows = torch.stack([v for i in range(n) for v in (videos[i], world[i])])[:, :, first:last]
        imageio.imwrite(cfg.out_png, frame_grid(rows, last - first))
        print(f"wrote {cfg.out_png}: rows = (model, world) per pair, frames {first}..{last - 1} (B from frame {T0}, "
              f"column {T0 - first}); pairs " + "; ".join(f"{a!r} -> {b!r}" for a, b in result["pairs"][:n]))
    if cfg.curve_png:
        ch = result["chunks"]
        colors = {"model": (220, 30, 30), "world": (150, 150, 150), "frozen": (40, 80, 220)}
        series = [(k, {r: ch[r][k] for r in ("world", "frozen", "model")}, colors, 1.0)
                  for k in ("follow", "linger", "bg_follow")]
        imageio.imwrite(cfg.curve_png, curve_image(ch["frame_end"], series))
        print(f"wrote {cfg.curve_png}: follow_B, linger_A and bg_follow (0 .. 1, top to bottom) per chunk against "
              f"frames after the switch; red model, gray world, blue frozen")
    return emit(result, cfg)


if __name__ == "__main__":
    cli(main)
