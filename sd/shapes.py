"""Captioned pictures of simple scenes, made on the fly: the data the shipped tiny model
learned from (scripts/train_tiny.py), and a reader that tells what a picture shows, to
check that generated pictures mean what their prompts say (tests/test_tiny.py).

A scene is one shape (circle, square, triangle) of a named colour and size at a named
position on a plain background of another colour: "a small red circle on the left, blue
background". Everything is reproducible from a seed; nothing is downloaded.
"""

from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels; the tiny model's 8x8 latents
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (40, 170, 60),
           "blue": (40, 80, 220), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
RADII = {"small": 7.0, "large": 12.0}  # of the circle; square and triangle are scaled to about its area
CENTRES = {"left": (20, 32), "right": (44, 32), "top": (32, 20), "bottom": (32, 44), "center": (32, 32)}  # (x, y)
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
JITTER = 3  # pixels the centre moves at random, so positions are regions, not points


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def caption(self) -> str:
        """The full description: "a small red circle on the left, blue background"."""
        return f"a {self.size} {self.colour} {self.shape} {PLACES[self.position]}, {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(str(rng.choice(SHAPES)), str(colour), str(background), str(rng.choice(list(RADII))),
                 str(rng.choice(list(CENTRES))))


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that may leave out the size, the position or the background (the model then
    learns to pick them itself, so "a red circle" is a prompt it knows) in one of two phrasings."""
    words = ["a"] + ([scene.size] if rng.random() < 0.5 else []) + [scene.colour, scene.shape]
    if rng.random() < 0.75:
        words.append(PLACES[scene.position])
    text = " ".join(words)
    if rng.random() < 0.75:
        text += f", {scene.background} background" if rng.random() < 0.5 else f" on a {scene.background} background"
    return text


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """(size, size, 3) uint8. Edges are anti-aliased by drawing at `supersample` times the size."""
    cx, cy = np.array(CENTRES[scene.position], dtype=np.float64) * size / SIZE
    cx, cy = (cx, cy) + rng.uniform(-JITTER, JITTER, size=2) * size / SIZE
    r = RADII[scene.size] * size / SIZE
    n = size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / supersample  # pixel-centre coordinates
    dx, dy = x - cx, y - cy
    if scene.shape == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif scene.shape == "square":
        half = r * np.sqrt(np.pi) / 2  # same area as the circle
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # equilateral, point up, centred on its centroid
        R = 1.4 * r  # circumradius; area 0.81 of the circle's, so a large one still fits at the top
        inside = (dy >= -R) & (dy <= R / 2) & (np.abs(dx) * np.sqrt(3) <= dy + R)
    alpha = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    fg, bg = np.array(COLOURS[scene.colour], dtype=np.float64), np.array(COLOURS[scene.background], np.float64)
    return np.round(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


def sample(seed: int, n: int, size: int = SIZE) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` pictures (n, size, size, 3) uint8 with random captions; the same seed gives the same data."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s, rng, size) for s in scenes])
    return images, [random_caption(s, rng) for s in scenes], scenes


# ---------------------------------------------------------------- reading a picture back

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest named colour of each (..., 3) pixel."""
    return np.argmin(((pixels[..., None, :].astype(np.float64) - PALETTE) ** 2).sum(-1), axis=-1)


def read_scene(image) -> dict:
    """What a picture shows, as the keys of a Scene: the background is the commonest named colour
    along the border; the shape's colour is the commonest named colour among the pixels far
    from the background, and the shape is the pixels of that colour; its position is the named
    centre nearest its centroid, and its kind follows from how much of its bounding box it
    fills (square 1, circle 0.79, triangle 0.5; split halfway). `size` is left out (it depends
    on the kind). None where there is no shape."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    names = list(COLOURS)
    background = names[np.bincount(nearest_colour(border), minlength=len(names)).argmax()]
    far = np.sqrt(((pixels - np.median(border, axis=0)) ** 2).sum(-1)) > 60
    nearest = nearest_colour(pixels)
    counts = np.bincount(nearest[far], minlength=len(names))
    counts[names.index(background)] = 0  # edge pixels blended with the background are not the shape's colour
    if counts.sum() < 8:
        return {"background": background, "colour": None, "position": None, "shape": None}
    colour = int(counts.argmax())
    ys, xs = np.nonzero(far & (nearest == colour))
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) * SIZE / np.array([w, h])
    position = min(CENTRES, key=lambda p: np.hypot(*(centroid - CENTRES[p])))
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    return {"background": background, "colour": names[colour], "position": position, "shape": shape}
