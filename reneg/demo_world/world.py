"""A tiny procedural image-caption world for the ReNeg CPU demo.

Images are 32 x 32 RGB pictures of one to three coloured shapes on a plain or
textured background.  Everything is deterministic given a
``numpy.random.Generator`` (or an integer seed).

Part of the training data is *degraded* (blurred, noisy, smeared, washed out
or discoloured).  Most degraded samples keep the clean caption, so a model
trained on this data produces degraded images now and then even for clean
prompts; a smaller part names the degradation in its caption ("a blurry red
circle", "two red squares, noisy"), so that a handcrafted negative prompt
(:data:`HANDCRAFTED_NEGATIVE`) has something to push away from.

Only numpy and PIL are needed.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SS = 4  # supersampling factor for anti-aliased rendering
_BIG = SIZE * _SS

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 75, 225),
    "yellow": (240, 215, 35),
    "purple": (145, 50, 200),
    "orange": (245, 135, 25),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

PLAIN_BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
TEXTURED_BACKGROUNDS: Tuple[str, ...] = ("striped", "checkered")
BACKGROUNDS: Tuple[str, ...] = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS

# Only used for single shapes.
POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}

DEGRADATIONS: Tuple[str, ...] = ("blur", "noise", "smear", "washed", "discolour")
DEGRADATION_WORDS = {
    "blur": "blurry",
    "noise": "noisy",
    "smear": "smeared",
    "washed": "washed out",
    "discolour": "discoloured",
}

# Fraction of all training samples that are degraded, and the fraction of those
# whose caption names the degradation (a third each as "a blurry red circle",
# "a red circle, blurry" and "blurry").  With these values 30 % of all samples
# are degraded without saying so and 10 % name their degradation.
DEGRADED_FRACTION = 0.4
NAMED_FRACTION = 0.25
UNLABELLED_DEGRADED_FRACTION = DEGRADED_FRACTION * (1.0 - NAMED_FRACTION)

# Probabilities that a caption mentions the position (single shapes) / background.
P_POSITION_PHRASE = 0.6
P_BACKGROUND_PHRASE = 0.7

# The handcrafted negative prompt. Of a dozen candidates built from the degradation
# words, "smeared" is the one that raised the demo reward at every CFG scale tried
# (3, 5, 7.5) on two prompt/seed sets, a little (about +0.005 to +0.014). Lists of
# several words, like HANDCRAFTED_NEGATIVE_LONG, push colours and contrast off the
# world's distribution at this model's scale and lower the reward (about -0.09).
HANDCRAFTED_NEGATIVE = "smeared"
HANDCRAFTED_NEGATIVE_LONG = "blurry, noisy, smeared, washed out"

RngLike = Union[np.random.Generator, int, None]


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------- scenes


def sample_scene(rng: RngLike, **overrides: Any) -> Dict[str, Any]:
    """Draw a random scene description (a plain dict of python values).

    Keyword ``overrides`` force attributes (``shape``, ``colour``, ``count``,
    ``background``, ``position``, ``named_position``, ``named_background``).
    """
    rng = _rng(rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    count = int(rng.integers(1, 4))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    named_position = bool(rng.random() < P_POSITION_PHRASE)
    named_background = bool(rng.random() < P_BACKGROUND_PHRASE)
    shape = overrides.get("shape", shape)
    colour = overrides.get("colour", colour)
    count = int(overrides.get("count", count))
    background = overrides.get("background", background)
    position = overrides.get("position", position) if count == 1 else None
    named_position = bool(overrides.get("named_position", named_position)) and count == 1
    named_background = bool(overrides.get("named_background", named_background))

    # background texture parameters
    base = rng.integers(60, 200, size=3)
    other = np.clip(base + rng.choice([-1, 1]) * rng.integers(45, 70), 0, 255)
    tex: Dict[str, Any] = {
        "c1": [int(v) for v in base],
        "c2": [int(v) for v in other],
        "period": int(rng.integers(5, 8)),
        "orientation": int(rng.integers(3)),  # stripes: 0 horizontal, 1 vertical, 2 diagonal
    }

    # object placement (in 32 px units)
    radius_range = {1: (7.0, 10.0), 2: (5.0, 7.0), 3: (4.0, 5.5)}[count]
    objects: List[Dict[str, float]] = []
    tries = 0
    while len(objects) < count:
        tries += 1
        r = float(rng.uniform(*radius_range))
        lo, hi = r + 1.0, SIZE - r - 1.0
        if count == 1 and position is not None:
            mid_lo, mid_hi = SIZE / 2 - 2.0, SIZE / 2 + 2.0
            side_lo, side_hi = lo, lo + 3.0
            far_lo, far_hi = hi - 3.0, hi
            x = float(rng.uniform(mid_lo, mid_hi))
            y = float(rng.uniform(mid_lo, mid_hi))
            if position == "left":
                x = float(rng.uniform(side_lo, side_hi))
                y = float(rng.uniform(SIZE / 2 - 5, SIZE / 2 + 5))
            elif position == "right":
                x = float(rng.uniform(far_lo, far_hi))
                y = float(rng.uniform(SIZE / 2 - 5, SIZE / 2 + 5))
            elif position == "top":
                y = float(rng.uniform(side_lo, side_hi))
                x = float(rng.uniform(SIZE / 2 - 5, SIZE / 2 + 5))
            elif position == "bottom":
                y = float(rng.uniform(far_lo, far_hi))
                x = float(rng.uniform(SIZE / 2 - 5, SIZE / 2 + 5))
        else:
            x = float(rng.uniform(lo, hi))
            y = float(rng.uniform(lo, hi))
        ok = all(math.hypot(x - o["x"], y - o["y"]) > (r + o["r"]) * 1.05 for o in objects)
        if ok or tries > 200:
            objects.append({"x": x, "y": y, "r": r, "angle": float(rng.uniform(-0.3, 0.3))})
    jitter = [int(v) for v in rng.integers(-15, 16, size=3)]
    return {
        "shape": shape,
        "colour": colour,
        "count": count,
        "background": background,
        "position": position,
        "named_position": named_position,
        "named_background": named_background,
        "texture": tex,
        "objects": objects,
        "jitter": jitter,
    }


def _background(scene: Dict[str, Any]) -> np.ndarray:
    bg = scene["background"]
    if bg in PLAIN_BACKGROUNDS:
        img = np.empty((_BIG, _BIG, 3), np.float32)
        img[:] = PLAIN_BACKGROUNDS[bg]
        return img
    tex = scene["texture"]
    period = tex["period"] * _SS
    yy, xx = np.mgrid[0:_BIG, 0:_BIG]
    if bg == "striped":
        coord = [yy, xx, xx + yy][tex["orientation"]]
        mask = (coord // period) % 2 == 0
    else:  # checkered
        mask = ((xx // period) + (yy // period)) % 2 == 0
    img = np.where(mask[..., None], np.array(tex["c1"], np.float32), np.array(tex["c2"], np.float32))
    return img.astype(np.float32)


def render_scene(scene: Dict[str, Any]) -> np.ndarray:
    """Render a scene to a clean uint8 image of shape (32, 32, 3)."""
    canvas = Image.fromarray(np.clip(_background(scene), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[scene["colour"]], scene["jitter"]))
    for o in scene["objects"]:
        cx, cy, r, a = o["x"] * _SS, o["y"] * _SS, o["r"] * _SS, o["angle"]
        if scene["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif scene["shape"] == "square":
            h = r * 0.85
            pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
            ca, sa = math.cos(a), math.sin(a)
            draw.polygon([(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in pts], fill=colour)
        else:  # triangle, pointing up
            pts = [(0.0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]
            draw.polygon([(cx + px, cy + py) for px, py in pts], fill=colour)
    small = canvas.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- captions


def caption_for(scene: Dict[str, Any], degradation: Optional[str] = None, style: int = 0) -> str:
    """Caption of a scene; ``degradation`` names a degradation.

    Styles: 0 "a blurry red circle", 1 "a red circle, blurry", 2 "blurry" (the word alone).
    """
    if degradation is not None and style == 2:
        return DEGRADATION_WORDS[degradation]
    count = scene["count"]
    noun = scene["shape"] if count == 1 else PLURAL[scene["shape"]]
    words = [COUNT_WORDS[count]]
    if degradation is not None and style == 0:
        words.append(DEGRADATION_WORDS[degradation])
    words += [scene["colour"], noun]
    if count == 1 and scene["named_position"]:
        words.append(POSITION_PHRASES[scene["position"]])
    if scene["named_background"]:
        words.append("on a %s background" % scene["background"])
    text = " ".join(words)
    if degradation is not None and style == 1:
        text += ", " + DEGRADATION_WORDS[degradation]
    return text


# --------------------------------------------------------------------------- degradations


def _gauss_kernel(sigma: float) -> np.ndarray:
    rad = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-rad, rad + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _conv1d(img: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    rad = len(k) // 2
    pad = [(0, 0)] * img.ndim
    pad[axis] = (rad, rad)
    p = np.pad(img, pad, mode="reflect")
    out = np.zeros_like(img)
    n = img.shape[axis]
    for i, w in enumerate(k):
        sl = [slice(None)] * img.ndim
        sl[axis] = slice(i, i + n)
        out += w * p[tuple(sl)]
    return out


def sample_degradation_params(kind: str, rng: RngLike) -> Dict[str, Any]:
    rng = _rng(rng)
    if kind == "blur":
        return {"sigma": float(rng.uniform(1.0, 1.8))}
    if kind == "noise":
        return {"std": float(rng.uniform(0.12, 0.22)), "seed": int(rng.integers(2**31))}
    if kind == "smear":
        return {"angle": float(rng.uniform(0, math.pi)), "length": int(rng.integers(6, 11))}
    if kind == "washed":
        return {"contrast": float(rng.uniform(0.3, 0.45)), "level": float(rng.uniform(0.72, 0.85))}
    if kind == "discolour":
        perms = [(1, 2, 0), (2, 0, 1), (1, 0, 2), (2, 1, 0), (0, 2, 1)]
        return {"perm": list(perms[int(rng.integers(len(perms)))]), "mix": float(rng.uniform(0.8, 1.0))}
    raise ValueError("unknown degradation %r" % kind)


def apply_degradation(img: np.ndarray, kind: str, params: Dict[str, Any]) -> np.ndarray:
    """Degrade a uint8 HWC image; returns a new uint8 image."""
    x = img.astype(np.float32) / 255.0
    if kind == "blur":
        k = _gauss_kernel(params["sigma"])
        x = _conv1d(_conv1d(x, k, 0), k, 1)
    elif kind == "noise":
        g = np.random.default_rng(params["seed"])
        x = x + g.normal(0.0, params["std"], size=x.shape).astype(np.float32)
    elif kind == "smear":
        n = params["length"]
        dx, dy = math.cos(params["angle"]), math.sin(params["angle"])
        pad = n + 1
        p = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        acc = np.zeros_like(x)
        for i in range(n):
            s = i - (n - 1) / 2.0
            ox, oy = int(round(s * dx)), int(round(s * dy))
            acc += p[pad + oy : pad + oy + SIZE, pad + ox : pad + ox + SIZE]
        x = acc / n
    elif kind == "washed":
        grey = x.mean(axis=2, keepdims=True)
        x = 0.5 * x + 0.5 * grey  # partly desaturated
        x = params["level"] + (x - x.mean()) * params["contrast"]
    elif kind == "discolour":
        x = (1 - params["mix"]) * x + params["mix"] * x[..., params["perm"]]
    else:
        raise ValueError("unknown degradation %r" % kind)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def degrade(img: np.ndarray, kind: str, rng: RngLike) -> np.ndarray:
    """Apply degradation ``kind`` with random strength drawn from ``rng``."""
    return apply_degradation(img, kind, sample_degradation_params(kind, rng))


# --------------------------------------------------------------------------- samples


def make_sample(
    rng: RngLike,
    degraded_fraction: float = DEGRADED_FRACTION,
    named_fraction: float = NAMED_FRACTION,
) -> Tuple[np.ndarray, str, bool, Dict[str, Any]]:
    """One training sample: ``(image_uint8_HWC, caption, clean_flag, meta)``.

    ``meta`` holds the scene (``render_scene(meta["scene"])`` gives the clean image
    back), the degradation kind (or None), its parameters and whether the caption
    names it.
    """
    rng = _rng(rng)
    scene = sample_scene(rng)
    img = render_scene(scene)
    kind = None
    params: Dict[str, Any] = {}
    named = False
    style = 0
    if rng.random() < degraded_fraction:
        kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
        params = sample_degradation_params(kind, rng)
        img = apply_degradation(img, kind, params)
        named = bool(rng.random() < named_fraction)
        style = int(rng.integers(3))
    caption = caption_for(scene, kind if named else None, style)
    meta = {"scene": scene, "degradation": kind, "params": params, "named": named}
    return img, caption, kind is None, meta


def make_dataset(n: int, seed: int, **kw: Any) -> Tuple[np.ndarray, List[str], np.ndarray, List[Dict[str, Any]]]:
    """``n`` samples from one generator: images ``[n, 32, 32, 3]`` uint8, captions, clean flags, metas."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    caps: List[str] = []
    clean = np.empty(n, bool)
    metas: List[Dict[str, Any]] = []
    for i in range(n):
        imgs[i], c, clean[i], m = make_sample(rng, **kw)
        caps.append(c)
        metas.append(m)
    return imgs, caps, clean, metas


# --------------------------------------------------------------------------- prompts


def _clean_prompts(n: int, seed: int, unique: bool, exclude: Sequence[str] = ()) -> List[str]:
    rng = np.random.default_rng(seed)
    out: List[str] = []
    seen = set()
    barred = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * max(n, 1):
            raise ValueError(f"only {len(out)} of {n} prompts could be drawn outside the {len(barred)} excluded ones")
        cap = caption_for(sample_scene(rng))
        if cap in barred:
            continue
        if unique and cap in seen and tries < 100 * n:
            continue
        seen.add(cap)
        out.append(cap)
    return out


def train_prompts(n: int, seed: int = 0, exclude: Sequence[str] = ()) -> List[str]:
    """``n`` clean-style prompts (no degradation words) for training a negative, drawn with repeats from
    the world's captions (there are only about 860 distinct ones); a caption in ``exclude`` (the
    evaluation's held-out prompts) is never drawn, so that held-out prompts are ones training never saw."""
    return _clean_prompts(n, seed + 1_000_003, unique=False, exclude=exclude)


def heldout_prompts(n: int = 32, seed: int = 20240531) -> List[str]:
    """``n`` distinct clean-style prompts from a separate seed stream, for evaluation."""
    return _clean_prompts(n, seed, unique=True)


def vocabulary() -> List[str]:
    """Every word that can occur in a caption or in :data:`HANDCRAFTED_NEGATIVE`."""
    words = set((HANDCRAFTED_NEGATIVE + " " + HANDCRAFTED_NEGATIVE_LONG).replace(",", " , ").split())
    words.update(SHAPES)
    words.update(PLURAL.values())
    words.update(COLOURS)
    words.update(COUNT_WORDS.values())
    words.update(BACKGROUNDS)
    for p in POSITION_PHRASES.values():
        words.update(p.split())
    for d in DEGRADATION_WORDS.values():
        words.update(d.split())
    words.update(["on", "a", "background", ","])
    return sorted(words)


def to_grid(images: Sequence[np.ndarray], ncol: int = 8, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 HWC images into one uint8 image (nearest-neighbour upscaled)."""
    n = len(images)
    nrow = (n + ncol - 1) // ncol
    h, w = images[0].shape[:2]
    H, W = h * scale, w * scale
    out = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        big = np.repeat(np.repeat(im, scale, 0), scale, 1)
        out[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = big
    return out
