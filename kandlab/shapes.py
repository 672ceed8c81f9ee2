r"""The shapes world: a procedural captioned-shapes dataset and the ShapesBench scorer.

Every lesson trains tiny text-to-image models on small RGB pictures of coloured
shapes with a caption that describes them exactly::

    "two small red circles"
    "a large blue square above three small yellow triangles"

The world is unlimited (item ``i`` is drawn from a random generator seeded with
``(seed, i)``), needs no download, and because each caption is known, a generated
image can be *scored* automatically per category -- in the spirit of DrawBench
(Imagen, Saharia et al. 2022, §4.1), but judged by a small analytic detector
instead of human raters. That score is ShapesBench.

The file reads top to bottom:

1. vocabulary -- colours, shapes, sizes, counts, relations;
2. scenes -- the structured description of one picture, and the caption grammar
   (``caption`` / ``parse_caption``);
3. drawing -- ``random_scene``, ``place`` (non-overlapping layout) and ``render``;
4. ``ShapesDataset`` -- a ``torch.utils.data.Dataset`` of ``(image, caption)``;
5. ShapesBench -- ``detect`` (pixels -> coloured blobs) and ``score``;
6. ``sample_grid`` -- a figure of captioned samples for the lessons.

Design choices that keep the world learnable by a tiny model at 32x32 and
scorable from slightly blurry generated pixels:

* six maximally distinct saturated colours on a black background, so a pixel's
  colour is read by thresholding each channel against the pixel's brightest one;
* the groups of one picture always have different colours, so the detector can
  separate the groups by colour alone;
* objects never overlap and keep a gap of at least 2 px, so each object is one
  connected blob;
* shapes differ in how much of their bounding box they fill: square 1.0,
  circle :math:`\pi/4 \approx 0.79`, triangle 0.5;
* a relation is true for every pair: with "A above B" every object of A lies
  entirely above every object of B, separated by the gap.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------
# 1. Vocabulary
# ---------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    # the six corners of the RGB cube that are neither black nor white:
    # each channel is fully on or off, so blur or dimming never changes which
    # channels are "on" relative to the brightest one (see `detect`).
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 7, "large": 11}  # side of the bounding box, px at 32x32
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNTS: dict[int, str] = {1: "a", 2: "two", 3: "three"}  # the word `caption` writes

Colour = Literal["red", "green", "blue", "yellow", "magenta", "cyan"]
Shape = Literal["circle", "square", "triangle"]
Size = Literal["small", "large"]
Relation = Literal["left of", "right of", "above", "below"]

_COUNT_OF_WORD = {"a": 1, "one": 1, "two": 2, "three": 3}  # "one" is read, never written
_PLURAL = {shape: shape + "s" for shape in SHAPES}
_SHAPE_OF_WORD = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURAL.items()}}

VOCABULARY: list[str] = list(
    dict.fromkeys(
        [*_COUNT_OF_WORD, *SIZES, *COLOURS, *SHAPES, *_PLURAL.values()]
        + [word for relation in RELATIONS for word in relation.split()]
    )
)  # every word `parse_caption` accepts, in a fixed order

# Geometry, in pixels at 32x32; `_geometry` scales it to other image sizes.
_GAP = 2  # empty pixels between any two objects
_MARGIN = 1  # empty pixels between an object and the image border
_MIN_IMAGE_SIZE = 24  # below this a small triangle is ~5 px and no longer readable

# ---------------------------------------------------------------------------
# 2. Scenes and the caption grammar
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """``count`` objects with the same shape, colour and size.

    ``size`` may be ``None`` when a caption leaves it out ("two red circles");
    `render` then picks one.
    """

    count: int
    colour: Colour
    shape: Shape
    size: Size | None = None

    def __post_init__(self) -> None:
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {sorted(COUNTS)}, got {self.count!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose from {list(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {list(SHAPES)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {list(SIZES)} or None")


@dataclass(frozen=True)
class Scene:
    """What one picture shows: one group, or two groups and how the first sits
    relative to the second ("``groups[0]`` is ``relation`` ``groups[1]``")."""

    groups: tuple[Group, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 groups, got {len(self.groups)}")
        if (len(self.groups) == 2) != (self.relation is not None):
            raise ValueError("a relation is needed exactly when the scene has two groups")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; choose from {list(RELATIONS)}")
        if len(self.groups) == 2 and self.groups[0].colour == self.groups[1].colour:
            raise ValueError(
                f"both groups are {self.groups[0].colour}; the two groups of a scene must have "
                "different colours (the scorer tells the groups apart by colour)"
            )


def _group_words(group: Group) -> list[str]:
    size = [group.size] if group.size is not None else []
    noun = group.shape if group.count == 1 else _PLURAL[group.shape]
    return [COUNTS[group.count], *size, group.colour, noun]


def caption(scene: Scene) -> str:
    """The caption of a scene, e.g. ``"two small red circles above a large blue square"``.

    Grammar: ``group [relation group]`` with
    ``group = count [size] colour shape`` (plural noun when count > 1).
    """
    words = _group_words(scene.groups[0])
    if scene.relation is not None:
        words += [scene.relation, *_group_words(scene.groups[1])]
    return " ".join(words)


def _parse_group(tokens: list[str], i: int, text: str) -> tuple[Group, int]:
    """Read ``count [size] colour shape`` starting at ``tokens[i]``; return the group and
    the index after it."""

    def expect(kind: str, options: Sequence[str], j: int) -> str:
        got = tokens[j] if j < len(tokens) else None
        if got not in options:
            found = f"got {got!r}" if got is not None else "the caption ended"
            raise ValueError(
                f"caption {text!r}: expected {kind} ({', '.join(options)}) at word {j + 1}, {found}"
            )
        return got

    count_word = expect("a count", list(_COUNT_OF_WORD), i)
    i += 1
    size = None
    if i < len(tokens) and tokens[i] in SIZES:
        size, i = tokens[i], i + 1
    colour = expect("a colour" if size else "a size or colour", list(COLOURS), i)
    noun = expect("a shape", list(_SHAPE_OF_WORD), i + 1)
    count, shape = _COUNT_OF_WORD[count_word], _SHAPE_OF_WORD[noun]
    wanted = shape if count == 1 else _PLURAL[shape]
    if noun != wanted:
        raise ValueError(f"caption {text!r}: {count_word!r} needs {wanted!r}, got {noun!r}")
    return Group(count, colour, shape, size), i + 2


def parse_caption(text: str) -> Scene:
    """The inverse of `caption`: read a caption back into a `Scene`.

    Case, extra spaces and a final full stop are ignored; the size word is optional.
    Raises ``ValueError`` naming the first word outside `VOCABULARY`, or saying what
    the grammar expected where the caption went wrong.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}")
    tokens = text.lower().strip().rstrip(".").split()
    if not tokens:
        raise ValueError("the caption is empty; expected e.g. 'two small red circles'")
    for word in tokens:
        if word not in VOCABULARY:
            raise ValueError(
                f"caption {text!r}: unknown word {word!r}; the shapes world knows only "
                f"{', '.join(VOCABULARY)}"
            )
    first, i = _parse_group(tokens, 0, text)
    if i == len(tokens):
        return Scene((first,))
    relation = tokens[i] if tokens[i] in ("above", "below") else " ".join(tokens[i : i + 2])
    if relation not in RELATIONS:
        raise ValueError(
            f"caption {text!r}: expected a relation ({', '.join(RELATIONS)}) at word {i + 1}, "
            f"got {relation!r}"
        )
    second, j = _parse_group(tokens, i + len(relation.split()), text)
    if j != len(tokens):
        raise ValueError(f"caption {text!r}: unexpected words after the second group: {tokens[j:]}")
    return Scene((first, second), relation)  # Scene checks the two colours differ


# ---------------------------------------------------------------------------
# 3. Drawing: random scenes, layout, rendering
# ---------------------------------------------------------------------------


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator or a seed; ``None`` means seed 0 (seeds everywhere)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def random_scene(
    rng: np.random.Generator | int | None = None,
    p_relation: float = 0.5,
    max_count: int = 3,
) -> Scene:
    """Draw a scene: with probability ``p_relation`` two groups and a relation.
    ``rng`` is a numpy Generator or a seed (``None`` means seed 0).

    Every drawn scene can be laid out at any allowed image size: in a two-group
    scene a large group has at most two objects (three large objects in a row
    need 37 px, more than a 32 px image has).
    """
    if not 0.0 <= p_relation <= 1.0:
        raise ValueError(f"p_relation is a probability, got {p_relation}")
    if max_count not in COUNTS:
        raise ValueError(f"max_count must be one of {sorted(COUNTS)}, got {max_count}")
    rng = _as_rng(rng)
    n_groups = 2 if rng.random() < p_relation else 1
    colours = rng.choice(list(COLOURS), size=n_groups, replace=False)
    groups = []
    for colour in colours:
        size = str(rng.choice(list(SIZES)))
        top = min(max_count, 2) if (n_groups == 2 and size == "large") else max_count
        count = int(rng.integers(1, top + 1))
        groups.append(Group(count, str(colour), str(rng.choice(SHAPES)), size))
    relation = str(rng.choice(RELATIONS)) if n_groups == 2 else None
    return Scene(tuple(groups), relation)


@dataclass(frozen=True)
class Box:
    """One drawn object: its top-left pixel ``(x0, y0)`` and its side ``extent`` (px)."""

    shape: Shape
    colour: Colour
    x0: int
    y0: int
    extent: int

    @property
    def centre(self) -> tuple[float, float]:
        """``(x, y)`` of the bounding-box centre, in pixels from the top-left corner."""
        return self.x0 + self.extent / 2, self.y0 + self.extent / 2


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < _MIN_IMAGE_SIZE:
        raise ValueError(
            f"image size must be an int >= {_MIN_IMAGE_SIZE} (the course uses 32), got {size!r}"
        )


def _geometry(size: int) -> tuple[dict[str, int], int, int]:
    """Object extents, gap and border margin scaled from 32x32 to ``size``."""
    scale = size / 32
    extents = {name: round(px * scale) for name, px in SIZES.items()}
    return extents, max(_GAP, round(_GAP * scale)), max(_MARGIN, round(_MARGIN * scale))


def _place_group(
    count: int, extent: int, region: tuple[int, int, int, int], gap: int, rng: np.random.Generator
) -> list[tuple[int, int]] | None:
    """Top-left corners of ``count`` non-overlapping squares of side ``extent`` inside
    ``region = (x_lo, y_lo, x_hi, y_hi)`` (half-open), or None if 20 rounds fail.

    Rejection sampling, vectorised: draw 512 candidate layouts at once and keep
    the first in which every pair is apart by ``extent + gap`` along x or along y.
    """
    x_lo, y_lo, x_hi, y_hi = region
    if x_hi - x_lo < extent or y_hi - y_lo < extent:
        return None
    for _ in range(20):
        x0 = rng.integers(x_lo, x_hi - extent + 1, size=(512, count))  # (N, count)
        y0 = rng.integers(y_lo, y_hi - extent + 1, size=(512, count))  # (N, count)
        ok = np.ones(512, dtype=bool)
        for a in range(count):
            for b in range(a + 1, count):
                apart_x = np.abs(x0[:, a] - x0[:, b]) >= extent + gap
                apart_y = np.abs(y0[:, a] - y0[:, b]) >= extent + gap
                ok &= apart_x | apart_y
        if ok.any():
            k = int(np.argmax(ok))
            return [(int(x), int(y)) for x, y in zip(x0[k], y0[k])]
    return None


def place(
    scene: Scene, size: int = 32, rng: np.random.Generator | int | None = None
) -> list[list[Box]]:
    """Lay a scene out on a ``size`` x ``size`` canvas: one list of `Box` per group.

    A single group may go anywhere. With two groups the canvas is cut across the
    relation's axis at a random line; the group that comes first along the axis
    (A for "A left of B" / "A above B") fills the low side, the other the high
    side, with the gap between them -- so the relation holds for every pair.
    A missing size (``Group.size is None``) is drawn from ``rng`` (a numpy Generator
    or a seed; ``None`` means seed 0).
    """
    _check_size(size)
    rng = _as_rng(rng)
    extents, gap, margin = _geometry(size)
    sizes = [g.size if g.size is not None else str(rng.choice(list(SIZES))) for g in scene.groups]
    full = (margin, margin, size - margin, size - margin)
    if scene.relation is None:
        regions = [full]
    else:
        e_low, e_high = (extents[s] for s in sizes)
        if scene.relation in ("right of", "below"):  # groups[0] sits on the high side
            e_low, e_high = e_high, e_low
        # the cut s: low side [margin, s), high side [s + gap, size - margin)
        cut = int(rng.integers(margin + e_low, size - margin - gap - e_high + 1))
        low, high = list(full), list(full)
        axis = 0 if scene.relation in ("left of", "right of") else 1  # 0: x, 1: y
        low[axis + 2], high[axis] = cut, cut + gap
        regions = [tuple(low), tuple(high)]
        if scene.relation in ("right of", "below"):
            regions.reverse()
    boxes = []
    for group, size_name, region in zip(scene.groups, sizes, regions):
        corners = _place_group(group.count, extents[size_name], region, gap, rng)
        if corners is None:
            raise ValueError(
                f"cannot fit {caption(scene)!r} into a {size}x{size} image without overlaps; "
                "use fewer or smaller objects (a two-group scene holds at most two large "
                "objects per group)"
            )
        boxes.append([Box(group.shape, group.colour, x, y, extents[size_name]) for x, y in corners])
    return boxes


@lru_cache(maxsize=None)
def _shape_mask(shape: Shape, extent: int) -> np.ndarray:
    """Hard-edged (extent, extent) bool mask: a pixel is in when its centre is."""
    c = np.arange(extent) + 0.5  # pixel centres
    y, x = np.meshgrid(c, c, indexing="ij")  # (e, e) each
    half = extent / 2
    if shape == "square":
        mask = np.ones((extent, extent), dtype=bool)
    elif shape == "circle":
        mask = (x - half) ** 2 + (y - half) ** 2 <= half**2
    else:  # triangle pointing up: apex at the top centre, base along the bottom row
        mask = np.abs(x - half) <= y / 2
    mask.setflags(write=False)
    return mask


def render(
    scene: Scene, size: int = 32, rng: np.random.Generator | int | None = None
) -> torch.Tensor:
    """Draw a scene. Returns a float32 image ``(3, size, size)`` in [-1, 1], black = -1.

    The layout is random (see `place`); pass ``rng`` (a seed or a numpy Generator)
    to make it reproducible. ``rng=None`` means seed 0.
    """
    rng = _as_rng(rng)
    image = np.full((size, size, 3), -1.0, dtype=np.float32)  # (H, W, 3)
    for group in place(scene, size, rng):
        for box in group:
            rgb = np.array(COLOURS[box.colour], dtype=np.float32) / 127.5 - 1.0  # [0,255] -> [-1,1]
            patch = image[box.y0 : box.y0 + box.extent, box.x0 : box.x0 + box.extent]
            patch[_shape_mask(box.shape, box.extent)] = rgb
    return torch.from_numpy(image.transpose(2, 0, 1).copy())  # (3, H, W)


# ---------------------------------------------------------------------------
# 4. The dataset
# ---------------------------------------------------------------------------


class ShapesDataset(Dataset):
    """``(image, caption)`` pairs from the shapes world.

    Item ``i`` depends only on ``(seed, i)`` (a fresh ``numpy.random.default_rng([seed, i])``
    per item), so it is the same whatever order items are read in, in any process.

    Args:
        size: image side in pixels (>= 24; the course uses 32).
        seed: which world; different seeds give different items.
        length: how many items ``len()`` reports (the world itself is unlimited).
        p_relation: fraction of two-group captions ("... above ...").
        max_count: largest count drawn (1 gives only "a ..." groups, an easier world).

    Items: ``image`` float32 ``(3, size, size)`` in [-1, 1]; ``caption`` str.
    """

    def __init__(
        self,
        size: int = 32,
        seed: int = 0,
        length: int = 10_000,
        p_relation: float = 0.5,
        max_count: int = 3,
    ) -> None:
        _check_size(size)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        random_scene(np.random.default_rng(0), p_relation, max_count)  # validates both
        self.size, self.seed, self.length = int(size), int(seed), int(length)
        self.p_relation, self.max_count = p_relation, max_count

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesDataset of length {self.length}")
        return np.random.default_rng([self.seed, int(i) % self.length])

    def scene(self, i: int) -> Scene:
        """The structured description of item ``i`` (what its caption says)."""
        return random_scene(self._rng(i), self.p_relation, self.max_count)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        rng = self._rng(i)
        scene = random_scene(rng, self.p_relation, self.max_count)  # same draws as `scene(i)`
        return render(scene, self.size, rng), caption(scene)


@lru_cache(maxsize=8)
def _dataset_mean(size: int, n: int, seed: int) -> tuple[float, ...]:
    data = ShapesDataset(size=size, seed=seed, length=n)
    return tuple(torch.stack([data[i][0] for i in range(n)]).mean(dim=(0, 2, 3)).tolist())


def dataset_mean(size: int = 32, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Per-channel mean pixel value of ``n`` dataset images, shape ``(3, 1, 1)`` in [-1, 1].

    About -0.83 in every channel at 32×32: the pictures are mostly black background
    (-1). Samplers use it as ``start_mean`` (see `GaussianDiffusion.sample`).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_size(size)
    return torch.tensor(_dataset_mean(int(size), int(n), int(seed))).view(3, 1, 1)


# ---------------------------------------------------------------------------
# 5. ShapesBench: detect blobs, score captions
# ---------------------------------------------------------------------------

# channel pattern (r, g, b) -> colour name: bit 1 = red, 2 = green, 4 = blue
_COLOUR_OF_CODE = {
    int(r > 0) + 2 * int(g > 0) + 4 * int(b > 0): name for name, (r, g, b) in COLOURS.items()
}
_SQUARE_FILL, _CIRCLE_FILL = 0.87, 0.64  # fill ratio: square 1.0, circle pi/4 ~ 0.79
_TRIANGLE_OFFSET = 0.06  # a triangle's mass centre sits 1/6 of its height below the box centre
_MIN_BLOB_AREA = 8  # px at 32x32; smaller blobs are specks and ignored
_RELATION_MARGIN = 1.0  # px at 32x32 the group centres must be apart along the axis


@dataclass(frozen=True)
class Blob:
    """One connected region of one palette colour found by `detect`."""

    colour: Colour
    shape: Shape | Literal["unknown"]
    area: int  # pixels
    fill: float  # area / bounding-box area
    offset: float  # |mass centre - box centre| / box side, the larger of x and y
    centre: tuple[float, float]  # (x, y) mean pixel position
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open


def _classify_shape(
    fill: float, offset: float, height: int, width: int
) -> Shape | Literal["unknown"]:
    """Circles and squares are symmetric; a triangle is not: its mass centre lies 2/3
    of the way from apex to base, 1/6 of its height off the box centre. Blur eats
    a triangle's corners (its fill ratio creeps up towards a circle's) but keeps it
    bottom-heavy, so the offset is tested first. Then the fill ratio: a square
    fills its box (1.0), a circle pi/4 ~ 0.79 of it."""
    if max(height, width) > 1.5 * min(height, width):  # elongated: e.g. two merged objects
        return "unknown"
    if offset >= _TRIANGLE_OFFSET:
        return "triangle"
    if fill >= _SQUARE_FILL:
        return "square"
    return "circle" if fill >= _CIRCLE_FILL else "unknown"


def _colour_codes(images: np.ndarray) -> np.ndarray:
    """Per-pixel palette colour code, 0 for background. ``(B, 3, H, W)`` -> ``(B, H, W)``.

    A pixel's brightness is its brightest channel. It is foreground when it is
    brighter than half the image's brightest pixel ("half maximum"; the maximum is
    clipped to [0.5, 1], so on our black-background images the threshold is 0.5,
    and never below 0.25 on a dim one). Its colour is which channels are above
    half *of its own brightness* -- so a dimmed or blurred edge pixel
    (0.5, 0.5, 0) still reads as yellow. All three channels on (white / grey) is
    no palette colour and counts as background.
    """
    rgb = (images + 1.0) / 2.0  # (B, 3, H, W) in [0, 1]
    bright = rgb.max(axis=1)  # (B, H, W)
    half_max = 0.5 * np.clip(bright.max(axis=(1, 2)), 0.5, 1.0)  # (B,)
    on = rgb > 0.5 * bright[:, None]  # (B, 3, H, W)
    code = on[:, 0] * 1 + on[:, 1] * 2 + on[:, 2] * 4  # (B, H, W)
    code[(bright <= half_max[:, None, None]) | (code == 7)] = 0
    return code


def _blobs_from_codes(code: np.ndarray) -> list[Blob]:
    """Connected components (8-neighbour) per colour of one ``(H, W)`` code map."""
    H, W = code.shape
    min_area = _MIN_BLOB_AREA * H * W / 32**2
    blobs = []
    eight = np.ones((3, 3), dtype=bool)
    for value in np.unique(code):
        if value == 0 or value not in _COLOUR_OF_CODE:
            continue
        labels, n = ndimage.label(code == value, structure=eight)
        areas = np.bincount(labels.ravel(), minlength=n + 1)  # (n + 1,), [0] is background
        boxes = ndimage.find_objects(labels)  # bounding slices, boxes[k - 1] for label k
        for k in np.flatnonzero(areas[1:] >= min_area) + 1:  # skip specks without a Python loop
            box = boxes[k - 1]
            ys, xs = np.nonzero(labels[box] == k)
            h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
            fill = float(areas[k]) / (h * w)
            offset = max(abs(ys.mean() + 0.5 - h / 2) / h, abs(xs.mean() + 0.5 - w / 2) / w)
            blobs.append(
                Blob(
                    colour=_COLOUR_OF_CODE[int(value)],
                    shape=_classify_shape(fill, offset, h, w),
                    area=int(areas[k]),
                    fill=fill,
                    offset=float(offset),
                    centre=(box[1].start + xs.mean() + 0.5, box[0].start + ys.mean() + 0.5),
                    bbox=(box[1].start, box[0].start, box[1].stop, box[0].stop),
                )
            )
    return blobs


def _to_numpy(x) -> np.ndarray:
    """A tensor or array as a numpy array, keeping float vs integer dtypes apart."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _as_image_batch(images) -> np.ndarray | list[np.ndarray]:
    """Check images at the boundary; return a float32 ``(B, 3, H, W)`` array or a list
    of ``(3, H, W)`` arrays (images of different sizes)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        arr = _to_numpy(images)
        if arr.ndim == 3:
            raise ValueError(
                f"images has shape {tuple(arr.shape)}; expected a batch (B, 3, H, W) -- "
                "for one image use images[None]"
            )
        batch = [arr[i] for i in range(arr.shape[0])] if arr.ndim == 4 else [arr]
    elif isinstance(images, (list, tuple)):
        batch = [_to_numpy(im) for im in images]
    else:
        raise TypeError(
            f"images must be a tensor (B, 3, H, W) or a list of (3, H, W) images, "
            f"got {type(images).__name__}"
        )
    for i, im in enumerate(batch):
        if im.ndim != 3 or im.shape[0] != 3:
            last = im.shape[-1:] == (3,)
            hint = " (channels last? use images.permute(0, 3, 1, 2))" if last else ""
            raise ValueError(
                f"image {i} has shape {tuple(im.shape)}; expected (3, H, W) in a (B, 3, H, W) "
                f"batch{hint}"
            )
        if min(im.shape[1:]) < _MIN_IMAGE_SIZE:
            raise ValueError(
                f"image {i} is {im.shape[1]}x{im.shape[2]}; ShapesBench needs at least "
                f"{_MIN_IMAGE_SIZE}x{_MIN_IMAGE_SIZE} pixels"
            )
        if not np.issubdtype(im.dtype, np.floating):
            raise ValueError(
                f"image {i} has dtype {im.dtype}; expected floats in [-1, 1] "
                "(convert uint8 with x / 127.5 - 1)"
            )
        lo, hi = float(np.min(im)), float(np.max(im))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"image {i} has values in [{lo:.3g}, {hi:.3g}]; ShapesBench expects [-1, 1] "
                "(clamp generated images with x.clamp(-1, 1); convert [0, 1] images with 2x - 1)"
            )
    if len({im.shape for im in batch}) == 1:
        return np.stack(batch).astype(np.float32, copy=False)  # (B, 3, H, W)
    return [im.astype(np.float32, copy=False) for im in batch]


def detect(image: torch.Tensor | np.ndarray) -> list[Blob]:
    """The blobs ShapesBench sees in one image ``(3, H, W)`` in [-1, 1].

    Steps: read each pixel's palette colour (see `_colour_codes`), find the
    8-connected components of each colour, drop specks smaller than 8 px (at
    32x32), and classify each blob's shape (see `_classify_shape`): a mass centre
    >= 0.06 box sides off the box centre is a triangle; otherwise the fill ratio
    ``area / bounding-box area`` decides: >= 0.87 square, >= 0.64 circle, else
    "unknown"; a box more than 1.5x longer than wide is "unknown" too.
    """
    (arr,) = _as_image_batch([image])
    return _blobs_from_codes(_colour_codes(arr[None])[0])


def _relation_axis(relation: Relation) -> tuple[int, float]:
    """Where "A <relation> B" puts A: the axis (0: x, 1: y, image coordinates) and the sign
    that makes A's coordinate minus B's positive on the caption's side."""
    axis = 0 if relation in ("left of", "right of") else 1
    sign = -1.0 if relation in ("left of", "above") else 1.0  # left and up are smaller coordinates
    return axis, sign


def _judge(blobs: list[Blob], scene: Scene, size: int) -> dict[str, bool]:
    """Per-category verdicts for one image; see `score` for the definitions."""
    by_colour: dict[str, list[Blob]] = {}
    for blob in blobs:
        by_colour.setdefault(blob.colour, []).append(blob)
    colour = set(by_colour) == {g.colour for g in scene.groups}
    count = all(len(by_colour.get(g.colour, [])) == g.count for g in scene.groups)
    shape = all(
        bool(by_colour.get(g.colour)) and all(b.shape == g.shape for b in by_colour[g.colour])
        for g in scene.groups
    )
    position = True  # nothing to get wrong without a relation
    if scene.relation is not None:
        a, b = (by_colour.get(g.colour) for g in scene.groups)
        if not a or not b:
            position = False
        else:
            axis, sign = _relation_axis(scene.relation)
            centre_a = np.mean([blob.centre[axis] for blob in a])
            centre_b = np.mean([blob.centre[axis] for blob in b])
            margin = _RELATION_MARGIN * size / 32
            position = bool(sign * (centre_a - centre_b) > margin)  # a on the caption's side of b
    overall = colour and shape and count and position
    return {
        "colour": colour, "shape": shape, "count": count, "position": position, "overall": overall
    }


def _detections(images, captions: Sequence[str]) -> tuple[list[list[Blob]], list[Scene], list[int]]:
    """Check the inputs, parse the captions, detect every image's blobs.
    Returns the blobs, the scenes and the image widths (px) for ``_judge``."""
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
    batch = _as_image_batch(images)
    if len(batch) != len(captions):
        raise ValueError(
            f"got {len(batch)} images but {len(captions)} captions; pass one caption per image"
        )
    if len(batch) == 0:
        raise ValueError("no images to score")
    scenes = []
    for i, text in enumerate(captions):
        try:
            scenes.append(parse_caption(text))
        except (ValueError, TypeError) as err:
            raise type(err)(f"caption {i}: {err}") from None
    if isinstance(batch, np.ndarray):
        codes = _colour_codes(batch)  # (B, H, W), one vectorised pass
    else:
        codes = [_colour_codes(im[None])[0] for im in batch]
    return [_blobs_from_codes(code) for code in codes], scenes, [code.shape[-1] for code in codes]


def _verdicts(images, captions: Sequence[str]) -> tuple[list[dict[str, bool]], list[Scene]]:
    """Check the inputs, parse the captions, judge every image."""
    blobs, scenes, sizes = _detections(images, captions)
    return [_judge(*args) for args in zip(blobs, scenes, sizes)], scenes


def score_per_image(images, captions: Sequence[str]) -> list[dict[str, bool]]:
    """ShapesBench verdicts for each image: a list of dicts with keys ``colour``,
    ``shape``, ``count``, ``position``, ``overall`` (defined in `score`). For a caption
    without a relation ``position`` is True (nothing to get wrong)."""
    return _verdicts(images, captions)[0]


def score(images, captions: Sequence[str]) -> dict[str, float]:
    """ShapesBench: how well each image shows its caption, judged from pixels alone.

    Args:
        images: float tensor or array ``(B, 3, H, W)`` in [-1, 1], or a list of
            ``(3, H, W)`` images; H, W >= 24.
        captions: one caption per image, in the grammar of `parse_caption`.

    Returns accuracies in [0, 1], each the fraction of images judged correct
    (the detector is `detect`):

    * ``colour``: the set of palette colours with a blob (>= 8 px at 32x32) equals
      the set of colours in the caption -- every named colour present, no other;
    * ``shape``: every group's colour has at least one blob and all its blobs have
      the caption's shape;
    * ``count``: every group's colour has exactly the caption's number of blobs;
    * ``position``: both groups' colours are present and the mean blob centre of
      the first group lies on the caption's side of the second's by > 1 px (at
      32x32) along the relation's axis (x for left/right, y for above/below).
      Only captions with a relation count: it is the fraction over those, and
      ``nan`` when no caption has one;
    * ``overall``: the fraction of images with every applicable category correct.

    Size words are not scored.
    """
    verdicts, scenes = _verdicts(images, captions)
    result = {k: float(np.mean([v[k] for v in verdicts])) for k in ("colour", "shape", "count")}
    with_relation = [v["position"] for v, scene in zip(verdicts, scenes) if scene.relation]
    result["position"] = float(np.mean(with_relation)) if with_relation else float("nan")
    result["overall"] = float(np.mean([v["overall"] for v in verdicts]))
    return result


_OPPOSITE_WORD = {"above": "below", "below": "above", "left": "right", "right": "left"}


def swap_relation(text: str) -> str:
    """The caption with its relation reversed ("… above …" → "… below …", "left of" ↔ "right of");
    a one-group caption comes back unchanged."""
    parse_caption(text)  # a clear error for a caption outside the grammar
    return " ".join(_OPPOSITE_WORD.get(word, word) for word in text.split())


def relation_shift(captions: Sequence[str], images, swapped_images) -> dict[str, float | int | None]:
    """Does a picture follow its relation word? For each two-group caption, compare the image drawn
    for it with the one drawn for `swap_relation` of it (same noise, or same layout seed): how far
    does the first group's mean blob centre move, in px along the relation's axis, towards the
    side the caption puts it on?

    Returns ``{"px": mean move, "pairs": pairs where both images show the first group's colour}``
    (``px`` None when there is no such pair). A bag-of-words model scores ~0; the shapes world
    itself ~16 px at 32×32. One-group captions are skipped.
    """
    images, swapped_images = _as_image_batch(images), _as_image_batch(swapped_images)
    if not len(captions) == len(images) == len(swapped_images):
        raise ValueError(f"got {len(captions)} captions, {len(images)} images and {len(swapped_images)} swapped "
                         "images; pass one image of each kind per caption")
    shifts = []
    for text, as_written, swapped in zip(captions, images, swapped_images):
        scene = parse_caption(text)
        if scene.relation is None:
            continue
        axis, sign = _relation_axis(scene.relation)
        first = scene.groups[0].colour
        centres = [[b.centre[axis] for b in detect(im) if b.colour == first] for im in (as_written, swapped)]
        if all(centres):
            shifts.append(sign * (np.mean(centres[0]) - np.mean(centres[1])))
    return {"px": round(float(np.mean(shifts)), 2) if shifts else None, "pairs": len(shifts)}


MAX_DRAWN = 4  # `count_confusion`'s last column: 4 or more blobs


def count_confusion(images, captions: Sequence[str]) -> np.ndarray:
    """How many objects does a model draw when a caption asks for one, two or three?

    Every group of every caption is one trial: the count it asks for (a row, 1-3) against
    the number of blobs of its colour that `detect` finds (a column, 0 to ``MAX_DRAWN``,
    the last meaning ``MAX_DRAWN`` or more). Returns an int array ``(3, MAX_DRAWN + 1)``:
    ``m[k - 1, j]`` groups asked for k objects were drawn with j. The diagonal ``m[k - 1, k]``
    is ShapesBench's count verdict per group; the right of it is over-counting, the left
    under-counting (column 0: the group is missing).
    """
    blobs, scenes, _ = _detections(images, captions)  # the checks and the detector of `score`
    matrix = np.zeros((len(COUNTS), MAX_DRAWN + 1), dtype=np.int64)  # (3, 5)
    for found, scene in zip(blobs, scenes):
        drawn = [blob.colour for blob in found]
        for group in scene.groups:
            matrix[group.count - 1, min(drawn.count(group.colour), MAX_DRAWN)] += 1
    return matrix


def _majority_shape(blobs: list[Blob]) -> str | None:
    shapes_seen = [b.shape for b in blobs]
    return max(set(shapes_seen), key=shapes_seen.count) if shapes_seen else None


def binding_outcomes(images, captions: Sequence[str]) -> list[str | None]:
    """Attribute binding on two-group captions whose groups differ in shape ("a red circle left of a blue
    square"): for each image, ``"bound"`` when the most common shape among the blobs of each group's
    colour is that group's shape, ``"swapped"`` when it is the *other* group's (the colours and shapes are
    all there, but exchanged: a blue circle and a red square), ``"other"`` otherwise (a colour missing, a
    third shape, both groups the same shape). None for captions with one group or one shape for both.

    The swap is the failure that a pooled embedding invites: the same bag of words, the attributes
    attached to the wrong objects (lesson 08).
    """
    blobs, scenes, _ = _detections(images, captions)
    out: list[str | None] = []
    for found, scene in zip(blobs, scenes):
        if scene.relation is None or scene.groups[0].shape == scene.groups[1].shape:
            out.append(None)
            continue
        a, b = scene.groups
        drawn = [_majority_shape([x for x in found if x.colour == g.colour]) for g in (a, b)]
        out.append("bound" if drawn == [a.shape, b.shape] else "swapped" if drawn == [b.shape, a.shape] else "other")
    return out


def binding_rates(images, captions: Sequence[str]) -> dict[str, float | int]:
    """`binding_outcomes` summed up: the shares of ``bound``, ``swapped`` and ``other`` among the n images that
    have an outcome, the swap rate among the decided ones (bound or swapped), and standard errors."""
    outcomes = [o for o in binding_outcomes(images, captions) if o is not None]
    n = len(outcomes)
    if n == 0:
        raise ValueError("no caption has two groups of different shapes; binding needs e.g. "
                         "'a red circle left of a blue square'")
    share = {k: outcomes.count(k) / n for k in ("bound", "swapped", "other")}
    decided = outcomes.count("bound") + outcomes.count("swapped")
    swap_given = outcomes.count("swapped") / decided if decided else None
    return {**{k: round(v, 4) for k, v in share.items()}, "n": n,
            "swapped_se": round(math.sqrt(share["swapped"] * (1 - share["swapped"]) / n), 4),
            "swap_rate_decided": round(swap_given, 4) if decided else None, "decided": decided,
            "swap_rate_decided_se": round(math.sqrt(swap_given * (1 - swap_given) / decided), 4) if decided else None}


def count_error_shares(matrix) -> dict[str, float]:
    """The shares of all groups in a `count_confusion` matrix drawn with the right number of objects,
    too many (right of the diagonal) and too few (left of it, the missing ones included)."""
    m = np.asarray(matrix)  # (3, MAX_DRAWN + 1); row k - 1 asked for k objects, column j drew j
    asked, drawn = np.indices(m.shape)
    total = max(int(m.sum()), 1)
    return {"right": m[drawn == asked + 1].sum() / total, "over": m[drawn > asked + 1].sum() / total,
            "under": m[drawn < asked + 1].sum() / total}


# ---------------------------------------------------------------------------
# 6. A figure for the lessons
# ---------------------------------------------------------------------------


def sample_grid(n: int = 16, size: int = 32, seed: int = 0):
    """A matplotlib ``Figure`` of the first ``n`` items of ``ShapesDataset(size, seed)``,
    each titled with its caption."""
    from matplotlib.figure import Figure  # imported here: only lessons need matplotlib

    if not isinstance(n, (int, np.integer)) or not 1 <= n <= 256:
        raise ValueError(f"n must be an int between 1 and 256, got {n!r}")
    data = ShapesDataset(size=size, seed=seed, length=n)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(1.75 * cols, 2.15 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        image, text = data[k]
        ax.imshow((image.permute(1, 2, 0).numpy() + 1) / 2, interpolation="nearest")  # (H, W, 3)
        ax.set_title("\n".join(textwrap.wrap(text, 20)), fontsize=8, loc="center")  # 8 pt: readable at 72 dpi
    return fig


# ---------------------------------------------------------------------------
# 7. A score for unconditional samples
# ---------------------------------------------------------------------------


_MAX_STRAY_FRACTION = 0.1  # foreground pixels outside any blob (specks), as a share of all foreground


def plausible(blobs: list[Blob], foreground: int | None = None) -> bool:
    """Could these blobs be a shapes-world picture? 1–2 colours, each with 1–3 blobs
    of one recognised shape (what some caption of the grammar would draw), and —
    if the ``foreground`` pixel count is given — at most 10 % of it in specks."""
    if foreground is not None and foreground - sum(b.area for b in blobs) > _MAX_STRAY_FRACTION * foreground:
        return False
    by_colour: dict[str, list[Blob]] = {}
    for blob in blobs:
        by_colour.setdefault(blob.colour, []).append(blob)
    if not 1 <= len(by_colour) <= 2:
        return False
    return all(
        len(group) <= 3 and group[0].shape != "unknown" and len({b.shape for b in group}) == 1
        for group in by_colour.values()
    )


def plausibility(images) -> float:
    """ShapesBench for unconditional samples: the fraction of images that are
    :func:`plausible` (no caption needed). Dataset images score 1.0, noise 0."""
    batch = _as_image_batch(images)
    if len(batch) == 0:
        raise ValueError("no images to score")
    codes = _colour_codes(batch) if isinstance(batch, np.ndarray) else [_colour_codes(im[None])[0] for im in batch]
    return float(np.mean([plausible(_blobs_from_codes(code), int((code > 0).sum())) for code in codes]))


def unconditional_stats(images) -> dict[str, float]:
    """What an unconditional sampler draws, in numbers a dataset can be compared with:

    * ``plausible``: the :func:`plausibility` of the batch;
    * ``recognised``: the fraction of blobs whose shape is a circle, square or triangle;
    * ``blobs``: mean number of blobs per image (the dataset: 1–6);
    * ``colours``: mean number of distinct blob colours per image (the dataset: 1–2).
    """
    batch = _as_image_batch(images)
    if len(batch) == 0:
        raise ValueError("no images to score")
    codes = _colour_codes(batch) if isinstance(batch, np.ndarray) else [_colour_codes(im[None])[0] for im in batch]
    per_image = [(_blobs_from_codes(code), int((code > 0).sum())) for code in codes]
    all_blobs = [b for blobs, _ in per_image for b in blobs]
    return {
        "plausible": float(np.mean([plausible(blobs, fg) for blobs, fg in per_image])),
        "recognised": float(np.mean([b.shape != "unknown" for b in all_blobs])) if all_blobs else 0.0,
        "blobs": float(np.mean([len(blobs) for blobs, _ in per_image])),
        "colours": float(np.mean([len({b.colour for b in blobs}) for blobs, _ in per_image])),
    }


# ---------------------------------------------------------------------------
# 8. Diversity: how different are the samples of one prompt?
# ---------------------------------------------------------------------------


def diversity(images, groups: Sequence) -> float:
    r"""Mean pairwise per-pixel distance between samples of the same prompt.

    Args:
        images: float tensor or array ``(N, 3, H, W)`` in [-1, 1].
        groups: ``N`` hashable labels (e.g. the prompt of each image); images with
            the same label are samples of one prompt drawn with different seeds.
            Every group needs at least two images.

    For a group of k images mapped to [0, 1], the distance of a pair is the mean
    absolute difference over all pixels and channels,
    :math:`d(a, b) = \frac{1}{3HW}\sum |a - b|`; the group's diversity is the mean of
    d over its k(k-1)/2 pairs, and the result is the mean over groups (each prompt
    weighs the same). 0 = every seed gave the same picture; 1 = black vs white.

    Limits: it measures how much the *pixels* vary, not whether the variation is
    meaningful. A one-pixel shift of a shape counts as much as a change of colour
    of the same area, and a mostly black background keeps all values small, so
    compare numbers only between samplers of the same model and prompts. Real
    systems use perceptual or feature-space measures (LPIPS, recall, the Vendi score).
    """
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise TypeError(f"images must be a tensor or array (N, 3, H, W), got {type(images).__name__}")
    batch = _as_image_batch(images)  # the ShapesBench checks: (N, 3, H, W) floats in [-1, 1]
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list with one label per image, got {type(groups).__name__}")
    if len(groups) != len(batch):
        raise ValueError(f"got {len(batch)} images but {len(groups)} group labels; pass one label per image")
    members: dict = {}
    for i, label in enumerate(groups):
        members.setdefault(label, []).append(i)
    if not members:
        raise ValueError("no images given")
    lonely = [label for label, idx in members.items() if len(idx) < 2]
    if lonely:
        raise ValueError(
            f"group {lonely[0]!r} has only one image; diversity compares samples of the same prompt, so draw "
            "at least two per prompt (e.g. pipe(prompts, images_per_prompt=4))"
        )
    flat = (np.asarray(batch).reshape(len(batch), -1).astype(np.float64) + 1) / 2  # (N, 3HW) in [0, 1]
    per_group = []
    for idx in members.values():
        x = flat[idx]  # (k, 3HW)
        dist = np.abs(x[:, None, :] - x[None, :, :]).mean(axis=-1)  # (k, k), zero diagonal
        k = len(idx)
        per_group.append(dist.sum() / (k * (k - 1)))  # mean over ordered pairs = over unordered pairs
    return float(np.mean(per_group))
