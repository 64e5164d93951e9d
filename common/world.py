"""The embedded "mini" world: seeded scenes of 1-3 shapes, their 64x64 images, and template text.

Everything here is pure numpy and deterministic in (seed, task, split, index), so every stage
regenerates exactly the same examples without storing a dataset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 205),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
# a 3x3 grid; cell names read as "at the <name>"
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
)
# properties a picture cannot show: statements about them are "maybe"
UNDRAWN = ("made of wood", "made of glass", "made of metal", "heavy", "warm", "moving", "new", "old")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    pos: int  # index into POSITIONS

    def phrase(self, with_size: bool = True) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    jitter: tuple[tuple[int, int], ...]  # pixel offsets, one per object


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    n = n_objects or rng.randint(1, 3)
    cells = rng.sample(range(9), n)
    objs = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c) for c in cells)
    jitter = tuple((rng.randint(-2, 2), rng.randint(-2, 2)) for _ in objs)
    return Scene(objs, jitter)


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> np.ndarray:
    """Draw the scene as an HxWx3 uint8 image on a dark, slightly noisy background."""
    rng = rng or random.Random(0)
    noise = np.random.default_rng(rng.randrange(2**31)).integers(0, 24, (size, size, 1), dtype=np.uint8)
    img = np.repeat(noise + 16, 3, axis=2)
    yy, xx = np.mgrid[0:size, 0:size]
    cell = size / 3
    for obj, (jx, jy) in zip(scene.objects, scene.jitter):
        cx = (obj.pos % 3 + 0.5) * cell + jx
        cy = (obj.pos // 3 + 0.5) * cell + jy
        r = cell * (0.46 if obj.size == "large" else 0.3)
        dx, dy = xx - cx, yy - cy
        if obj.shape == "circle":
            mask = dx**2 + dy**2 <= r**2
        elif obj.shape == "square":
            mask = (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
        elif obj.shape == "triangle":
            mask = (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
        else:  # cross
            mask = ((abs(dx) <= r * 0.3) & (abs(dy) <= r)) | ((abs(dy) <= r * 0.3) & (abs(dx) <= r))
        img[mask] = COLOURS[obj.colour]
    return img


# ---- text ---------------------------------------------------------------------------------


def describe(scene: Scene, rng: random.Random | None = None) -> str:
    """The detailed description (pre-training caption): count, then each object in reading order.

    With an rng the object order and connective vary (used for paraphrases)."""
    objs = sorted(scene.objects, key=lambda o: o.pos)  # reading order: the image determines the caption
    if rng is not None:
        rng.shuffle(objs)
    parts = [f"a {o.phrase()} at the {POSITIONS[o.pos]}" for o in objs]
    joiner = " and " if rng is None or rng.random() < 0.5 else " , "
    noun = "object" if len(objs) == 1 else "objects"
    return f"{NUMBERS[len(objs)]} {noun} : " + joiner.join(parts)


def short_caption(scene: Scene) -> str:
    """The downstream caption: objects left-to-right, top-to-bottom, without size or place."""
    return " and ".join(f"a {o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.pos))


def _has(scene: Scene, colour=None, shape=None, pos=None) -> bool:
    return any(
        (colour is None or o.colour == colour)
        and (shape is None or o.shape == shape)
        and (pos is None or o.pos == pos)
        for o in scene.objects
    )


def hypothesis(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A statement about the scene and its label: yes (entailed), no (contradicted), maybe (undecidable)."""
    label = rng.choice(("yes", "no", "maybe"))
    o = rng.choice(scene.objects)
    if label == "maybe":
        return f"the {o.colour} {o.shape} is {rng.choice(UNDRAWN)}", "maybe"
    kind = rng.choice(("colour_shape", "place", "count", "undrawn_absent"))
    if label == "yes":
        if kind == "place":
            return f"there is a {o.shape} at the {POSITIONS[o.pos]}", "yes"
        if kind == "count":
            n = len(scene.objects)
            return (
                f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} {'object' if n == 1 else 'objects'}",
                "yes",
            )
        return f"there is a {o.colour} {o.shape}", "yes"
    # "no": change one attribute until the statement is false
    if kind == "count":
        n = rng.choice([k for k in (1, 2, 3) if k != len(scene.objects)])
        return f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} {'object' if n == 1 else 'objects'}", "no"
    if kind == "place":
        pos = rng.choice([p for p in range(9) if not _has(scene, shape=o.shape, pos=p)])
        return f"there is a {o.shape} at the {POSITIONS[pos]}", "no"
    colour, shape = o.colour, o.shape
    while _has(scene, colour=colour, shape=shape):
        if rng.random() < 0.5:
            colour = rng.choice(list(COLOURS))
        else:
            shape = rng.choice(SHAPES)
    if kind == "undrawn_absent":  # an undrawn property of an absent object is still false
        return f"the {colour} {shape} is {rng.choice(UNDRAWN)}", "no"
    return f"there is a {colour} {shape}", "no"


def question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A VQA question about the scene and its one-word answer."""
    kind = rng.choice(("colour", "shape", "count", "exists"))
    o = rng.choice(scene.objects)
    unique_shape = sum(x.shape == o.shape for x in scene.objects) == 1
    if kind == "colour" and unique_shape:
        return f"what colour is the {o.shape} ?", o.colour
    if kind == "shape":
        return f"what shape is at the {POSITIONS[o.pos]} ?", o.shape
    if kind == "exists":
        colour, shape = (
            (o.colour, o.shape) if rng.random() < 0.5 else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        )
        return f"is there a {colour} {shape} ?", "yes" if _has(scene, colour, shape) else "no"
    return "how many objects are there ?", NUMBERS[len(scene.objects)]


def referring_expression(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """The shortest phrase that picks out one object, and that object's grid cell."""
    o = rng.choice(scene.objects)
    for expr, match in (
        (f"the {o.shape}", lambda x: x.shape == o.shape),
        (f"the {o.colour} {o.shape}", lambda x: (x.colour, x.shape) == (o.colour, o.shape)),
        (
            f"the {o.size} {o.colour} {o.shape}",
            lambda x: x == o or (x.colour, x.shape, x.size) == (o.colour, o.shape, o.size),
        ),
    ):
        if sum(map(match, scene.objects)) == 1:
            return expr, POSITIONS[o.pos]
    return f"the {o.size} {o.colour} {o.shape}", POSITIONS[o.pos]  # identical twins: either cell is right


def perturb(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one attribute of one object changed (a near-miss for paraphrase)."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    field = rng.choice(("shape", "colour", "size"))
    if field == "shape":
        o = Obj(rng.choice([s for s in SHAPES if s != o.shape]), o.colour, o.size, o.pos)
    elif field == "colour":
        o = Obj(o.shape, rng.choice([c for c in COLOURS if c != o.colour]), o.size, o.pos)
    else:
        o = Obj(o.shape, o.colour, "small" if o.size == "large" else "large", o.pos)
    objs[i] = o
    return Scene(tuple(objs), scene.jitter)


def mask_words(text: str, rng: random.Random, rate: float = 0.25) -> str:
    """BART-style infilling input: some words replaced by <mask>."""
    words = text.split()
    return " ".join("<mask>" if rng.random() < rate else w for w in words)
