"""
The toy world: endless, deterministic, captioned little videos that a laptop can learn (the shakespeare_char of
this repo). One coloured shape moves over a striped background; the caption says what it is and how it moves.

    a red circle moves left fast on a gray background
    a blue triangle moves up slowly and turns on a white background and the camera pans right

Grammar (every caption, in this order; [] is optional):

    a COLOR SHAPE moves DIRECTION SPEED [and turns | and speeds up] on a BACKGROUND background
      [and the camera pans left | and the camera pans right]

Rules (all in screen pixels, frames indexed from 0, S = frame size, the object is a 6x6 sprite):
- The object starts at an integer position (sampled at least ROOM = 3 px from the wall it heads for, so every
  clip first shows the captioned direction) and moves SPEED px/frame (slowly 0.5, fast 1.0) in DIRECTION.
  It bounces off the frame edges: a step that would leave the frame stops at the edge and reverses that
  velocity component, so the object touches the edge on the bounce frame and long videos keep moving.
- "turns": every TURN_EVERY frames (at frames 6, 12, 18, ...) the velocity turns 90 degrees clockwise on screen
  (right -> down -> left -> up -> right).
- "speeds up": at frame SPEEDUP_AT (6) the speed doubles, and stays doubled.
- The background is vertical stripes of two grays (period 6 px). "the camera pans right" moves the stripes
  left by PAN_SPEED px/frame (the camera moves right over a striped wall); "left" moves them right. The object's
  motion is given on screen, independent of the pan.
- The sprite is drawn at floor(position): pixels are exact palette colours, no anti-aliasing, so the object is
  always the same 6x6 bitmap. Video tensors are [3, T, S, S] RGB in [-1, 1].

`python data/toyworld.py [N] [FRAMES] [OUT.png|OUT.mp4]` writes N example clips (a PNG with a row of frames per clip,
or an mp4 with the clips side by side) and prints their captions.
"""

import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------- the vocabulary (final)

COLORS = {  # saturated RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
BACKGROUNDS = {  # two neutral grays per background: the stripes (every channel equal, far from every colour)
    "black": (-1.0, -0.6),
    "gray": (-0.2, 0.2),
    "white": (0.6, 1.0),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
SPEEDS = {"slowly": 0.5, "fast": 1.0}  # px per frame
EVENTS = ("none", "turns", "speeds up")
PANS = ("none", "left", "right")

SPRITE = 6  # the object's bitmap is SPRITE x SPRITE pixels
TURN_EVERY = 6  # "turns": the velocity turns clockwise at frames 6, 12, 18, ...
SPEEDUP_AT = 6  # "speeds up": the speed doubles at this frame
PAN_SPEED = 0.5  # px per frame of the background stripes when the camera pans
STRIPE = 6  # stripe period in px (half light, half dark)
ROOM = 3  # sampled starts leave at least this many px before the wall the object heads for

_TEMPLATES = {  # 1 = object pixel
    "square": ["######",
               "######",
               "######",
               "######",
               "######",
               "######"],
    "circle": ["..##..",  # a disc at 6 px: a diamond, so that it is far from the square (see SHAPE_IOU)
               ".####.",
               "######",
               "######",
               ".####.",
               "..##.."],
    "triangle": ["..##..",
                 "..##..",
                 ".####.",
                 ".####.",
                 "######",
                 "######"],
}
TEMPLATES = {k: torch.tensor([[c == "#" for c in row] for row in v], dtype=torch.bool) for k, v in _TEMPLATES.items()}
# Any two shapes overlap at IoU <= 2/3 (square-circle 24/36, square-triangle 24/36, circle-triangle 18/30): a model
# that draws the asked shape only roughly still fits it better than the others. (A circle with only its 4 corner
# pixels cut overlapped the square at 32/36 = 0.89, and a toy teacher's samples were scored as the wrong shape about
# half the time.)

WORDS = sorted({"a", "moves", "and", "turns", "speeds", "up", "on", "background", "the", "camera", "pans",
                *COLORS, *SHAPES, *BACKGROUNDS, *DIRECTIONS, *SPEEDS, *(p for p in PANS if p != "none")})


# ----------------------------------------------------------------------------- specs and captions


@dataclass
class Spec:
    color: str  # key of COLORS
    shape: str  # one of SHAPES
    background: str  # key of BACKGROUNDS
    direction: str  # key of DIRECTIONS: the initial direction of motion
    speed: str  # key of SPEEDS
    event: str = "none"  # one of EVENTS
    pan: str = "none"  # one of PANS
    x: int = 5  # initial top-left corner of the sprite, in px
    y: int = 5


def sample_spec(index, seed=0, size=16):
    """The index-th clip of the world `seed`: the same (seed, index) always gives the same spec."""
    rng = np.random.default_rng([seed, index])
    pick = lambda options, p=None: options[rng.choice(len(options), p=p)]  # noqa: E731
    spec = Spec(
        color=pick(list(COLORS)),
        shape=pick(SHAPES),
        background=pick(list(BACKGROUNDS)),
        direction=pick(list(DIRECTIONS)),
        speed=pick(list(SPEEDS)),
        event=pick(EVENTS, p=[0.5, 0.25, 0.25]),
        pan=pick(PANS, p=[0.5, 0.25, 0.25]),
    )
    # the start: anywhere, except that the object has ROOM px to go in its direction before the first bounce
    # (so every clip shows the captioned direction first)
    hi = size - SPRITE
    dx, dy = DIRECTIONS[spec.direction]
    spec.x, spec.y = (int(rng.integers(max(0, -d * ROOM), hi - max(0, d * ROOM) + 1)) for d in (dx, dy))
    return spec


def caption(spec):
    text = f"a {spec.color} {spec.shape} moves {spec.direction} {spec.speed}"
    if spec.event != "none":
        text += f" and {spec.event}"
    text += f" on a {spec.background} background"
    if spec.pan != "none":
        text += f" and the camera pans {spec.pan}"
    return text


_CAPTION_RE = re.compile(
    rf"a (?P<color>{'|'.join(COLORS)}) (?P<shape>{'|'.join(SHAPES)}) moves (?P<direction>{'|'.join(DIRECTIONS)}) "
    rf"(?P<speed>{'|'.join(SPEEDS)})(?: and (?P<event>turns|speeds up))? on a (?P<background>{'|'.join(BACKGROUNDS)}) "
    rf"background(?: and the camera pans (?P<pan>left|right))?"
)


def parse_caption(text):
    """Caption -> dict of the asked attributes (Spec's fields except the start position x, y)."""
    m = _CAPTION_RE.fullmatch(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"not a toy-world caption: {text!r}")
    d = m.groupdict()
    d["event"] = d["event"] or "none"
    d["pan"] = d["pan"] or "none"
    return d


def captions(n, seed=0):
    """The captions of clips 0 .. n-1 of world `seed`."""
    return [caption(sample_spec(i, seed)) for i in range(n)]


# ----------------------------------------------------------------------------- rendering


def trajectory(spec, num_frames, size=16):
    """The sprite's top-left corner per frame: float array [T, 2] (x, y), following the rules above."""
    lo, hi = 0.0, float(size - SPRITE)
    p = np.array([spec.x, spec.y], dtype=np.float64)
    v = np.array(DIRECTIONS[spec.direction], dtype=np.float64) * SPEEDS[spec.speed]
    out = np.zeros((num_frames, 2))
    for t in range(num_frames):
        out[t] = p
        # the velocity used from frame t to t + 1
        if spec.event == "turns" and t > 0 and t % TURN_EVERY == 0:
            v = np.array([-v[1], v[0]])  # clockwise on screen (y down): right -> down -> left -> up
        if spec.event == "speeds up" and t == SPEEDUP_AT:
            v = 2 * v
        p = p + v
        for k in range(2):  # bounce: stop at the edge, reverse that component
            if p[k] < lo or p[k] > hi:
                p[k] = min(max(p[k], lo), hi)
                v[k] = -v[k]
    return out


def background(spec, num_frames, size=16):
    """The striped background: [3, T, S, S] in [-1, 1]; panning shifts the stripes sideways."""
    dark, light = BACKGROUNDS[spec.background]
    sign = {"none": 0.0, "left": -1.0, "right": 1.0}[spec.pan]
    offset = np.floor(sign * PAN_SPEED * np.arange(num_frames))  # [T] world column at screen column 0
    col = (np.arange(size)[None, :] + offset[:, None]).astype(np.int64)  # [T, S] world column per screen column
    light_col = (col % STRIPE) < STRIPE // 2  # [T, S]
    gray = torch.from_numpy(np.where(light_col, light, dark)).float()  # [T, S]
    return gray[None, :, None, :].expand(3, num_frames, size, size).clone()  # [3, T, S, S]


def render(spec, num_frames, size=16):
    """The clip of `spec`: [3, T, S, S] float32 RGB in [-1, 1]. 120 frames take a few milliseconds."""
    video = background(spec, num_frames, size)  # [3, T, S, S]
    pos = np.floor(trajectory(spec, num_frames, size)).astype(np.int64)  # [T, 2]
    mask = TEMPLATES[spec.shape]  # [6, 6]
    color = torch.tensor(COLORS[spec.color])[:, None]  # [3, 1]
    for t, (x, y) in enumerate(pos):
        patch = video[:, t, y : y + SPRITE, x : x + SPRITE]  # [3, 6, 6] view
        patch[:, mask] = color
    return video


def clip(index, num_frames=12, size=16, seed=0):
    """(video [3, T, S, S], caption, spec) of clip `index` of world `seed`."""
    spec = sample_spec(index, seed, size)
    return render(spec, num_frames, size), caption(spec), spec


# ----------------------------------------------------------------------------- look at it


def to_uint8(video, scale=4):
    """[3, T, S, S] in [-1, 1] -> [T, S*scale, S*scale, 3] uint8 (nearest upscaling)."""
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, S, S]
    x = x.permute(1, 2, 3, 0)  # [T, S, S, 3]
    return x.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()


def strip(videos, scale=4, gap=2):
    """Several videos [3, T, S, S] -> one image: a row of frames per video, white gaps between frames."""
    rows = []
    for v in videos:
        frames = to_uint8(v, scale)  # [T, h, w, 3]
        T, h, w, _ = frames.shape
        row = np.full((h, T * (w + gap) - gap, 3), 255, np.uint8)
        for t in range(T):
            row[:, t * (w + gap) : t * (w + gap) + w] = frames[t]
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    out = np.full((len(rows) * (rows[0].shape[0] + gap) - gap, width, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        out[i * (r.shape[0] + gap) : i * (r.shape[0] + gap) + r.shape[0], : r.shape[1]] = r
    return out


if __name__ == "__main__":
    import imageio.v2 as imageio

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    frames = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    out = sys.argv[3] if len(sys.argv) > 3 else "toyworld.png"
    clips = [clip(i, frames) for i in range(n)]
    for i, (_, text, spec) in enumerate(clips):
        print(f"{i:3d}  {text}   (start x={spec.x} y={spec.y})")
    if out.endswith(".mp4"):  # the clips side by side, 8x upscaled, 4 fps
        grid = np.concatenate([to_uint8(v, 8) for v, _, _ in clips], axis=2)  # [T, h, n*w, 3]
        imageio.mimwrite(out, list(grid), fps=4, macro_block_size=1)
        print(f"wrote {out}: {n} clips side by side, {frames} frames")
    else:
        imageio.imwrite(out, strip([v for v, _, _ in clips]))
        print(f"wrote {out}: {n} clips x {frames} frames (one row per clip)")
