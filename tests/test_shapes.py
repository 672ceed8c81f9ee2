"""Tests for kandlab.shapes: the shapes world (dataset, grammar, layout) and ShapesBench."""

import itertools
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from kandlab import shapes as S

N = 2000  # images the scorer is checked on


@pytest.fixture(scope="module")
def batch():
    """2,000 dataset items at the default size: images (N, 3, 32, 32), captions, scenes."""
    data = S.ShapesDataset()
    start = time.perf_counter()
    items = [data[i] for i in range(N)]
    seconds = time.perf_counter() - start
    images = torch.stack([image for image, _ in items])
    captions = [text for _, text in items]
    return images, captions, [data.scene(i) for i in range(N)], seconds


# --- dataset -----------------------------------------------------------------


def test_items_are_deterministic_and_independent_of_order():
    a, b = S.ShapesDataset(seed=7), S.ShapesDataset(seed=7)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for (x1, c1), (x2, c2) in zip(forward, backward):
        assert c1 == c2
        assert torch.equal(x1, x2)
    assert torch.equal(a[-1][0], a[len(a) - 1][0])


def test_different_seeds_give_different_items():
    a, b = S.ShapesDataset(seed=0), S.ShapesDataset(seed=1)
    assert sum(a[i][1] != b[i][1] for i in range(20)) >= 15
    assert not any(torch.equal(a[i][0], b[i][0]) for i in range(20))


@pytest.mark.parametrize("size", [24, 32, 64])
def test_item_dtype_shape_and_values(size):
    data = S.ShapesDataset(size=size, length=50)
    palette = {tuple(np.array(rgb) / 127.5 - 1) for rgb in S.COLOURS.values()}
    palette.add((-1.0, -1.0, -1.0))
    for i in range(0, 50, 5):
        image, text = data[i]
        assert isinstance(text, str) and text
        assert image.dtype == torch.float32 and image.shape == (3, size, size)
        assert image.min() >= -1 and image.max() <= 1
        colours = {tuple(float(v) for v in px) for px in image.reshape(3, -1).T.tolist()}
        assert colours <= palette  # hard edges: only palette colours and black
        assert (image == -1).all(0).float().mean() > 0.3  # mostly black background


def test_scene_matches_item_caption_and_dataloader_collates():
    data = S.ShapesDataset(length=8)
    assert [S.caption(data.scene(i)) for i in range(8)] == [data[i][1] for i in range(8)]
    images, captions = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and len(captions) == 8


def test_dataset_options():
    simple = S.ShapesDataset(length=200, p_relation=0.0, max_count=1)
    scenes = [simple.scene(i) for i in range(200)]
    assert all(len(s.groups) == 1 and s.groups[0].count == 1 for s in scenes)
    always = S.ShapesDataset(length=50, p_relation=1.0)
    assert all(always.scene(i).relation is not None for i in range(50))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 16}, "image size must be an int >= 24"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"length": 0}, "length must be a positive int"),
        ({"p_relation": 1.5}, "p_relation is a probability"),
        ({"max_count": 4}, "max_count must be one of"),
    ],
)
def test_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.ShapesDataset(**kwargs)


def test_dataset_index_errors():
    data = S.ShapesDataset(length=5)
    with pytest.raises(IndexError, match="out of range"):
        data[5]
    with pytest.raises(TypeError, match="index must be an int"):
        data["0"]


def test_generation_and_scoring_are_fast(batch):
    images, captions, _, generate_seconds = batch
    start = time.perf_counter()
    S.score(images, captions)
    assert time.perf_counter() - start < 10
    assert generate_seconds < 5


# --- grammar -----------------------------------------------------------------


def test_caption_parse_round_trip(batch):
    _, captions, scenes, _ = batch
    for text, scene in zip(captions, scenes):
        assert S.parse_caption(text) == scene
        assert S.caption(S.parse_caption(text)) == text


def test_every_word_in_vocabulary_and_every_category_appears(batch):
    _, captions, scenes, _ = batch
    words = {w for text in captions for w in text.split()}
    assert words <= set(S.VOCABULARY)
    groups = [g for s in scenes for g in s.groups]
    assert {g.colour for g in groups} == set(S.COLOURS)
    assert {g.shape for g in groups} == set(S.SHAPES)
    assert {g.size for g in groups} == set(S.SIZES)
    assert {g.count for g in groups} == set(S.COUNTS)
    assert {s.relation for s in scenes} == set(S.RELATIONS) | {None}
    assert len(S.VOCABULARY) == len(set(S.VOCABULARY))


def test_parse_caption_examples():
    scene = S.parse_caption("Two RED circles  above a small blue square.")
    assert scene == S.Scene(
        (S.Group(2, "red", "circle", None), S.Group(1, "blue", "square", "small")), "above"
    )
    assert S.caption(scene) == "two red circles above a small blue square"
    scene = S.parse_caption("one large green triangle left of three cyan squares")
    assert scene.relation == "left of" and scene.groups[0].count == 1


@pytest.mark.parametrize(
    "text, match",
    [
        ("two purple circles", "unknown word 'purple'"),
        ("two red circle", "'two' needs 'circles', got 'circle'"),
        ("a red circles", "'a' needs 'circle', got 'circles'"),
        ("red circle", "expected a count"),
        ("two small circles", "expected a colour"),
        ("a red circle above a red square", "must have different colours"),
        ("a red circle left a blue square", "expected a relation"),
        ("a red circle above", "the caption ended"),
        ("a red circle above a blue square square", "unexpected words"),
        ("   ", "the caption is empty"),
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text, match):
    with pytest.raises(ValueError, match=match):
        S.parse_caption(text)


# --- layout --------------------------------------------------------------------


def _gap_between(a: S.Box, b: S.Box) -> int:
    """Empty pixels between two boxes along the axis where they are apart (<0: overlap)."""
    dx = max(a.x0, b.x0) - min(a.x0 + a.extent, b.x0 + b.extent)
    dy = max(a.y0, b.y0) - min(a.y0 + a.extent, b.y0 + b.extent)
    return max(dx, dy)


def test_layout_keeps_gaps_margins_and_relations_for_every_pair():
    rng = np.random.default_rng(0)
    for size in (24, 32):
        for _ in range(300):
            scene = S.random_scene(rng, p_relation=0.7)
            groups = S.place(scene, size, rng)
            boxes = [box for group in groups for box in group]
            assert [len(g) for g in groups] == [g.count for g in scene.groups]
            for box in boxes:
                assert box.x0 >= 1 and box.y0 >= 1
                assert box.x0 + box.extent <= size - 1 and box.y0 + box.extent <= size - 1
            for a, b in itertools.combinations(boxes, 2):
                assert _gap_between(a, b) >= 2
            if scene.relation is not None:
                axis = 0 if scene.relation in ("left of", "right of") else 1
                sign = 1 if scene.relation in ("left of", "above") else -1
                for a, b in itertools.product(*groups):
                    assert sign * (b.centre[axis] - a.centre[axis]) >= 5  # with a margin


def test_render_follows_the_scene_and_reports_impossible_layouts():
    image = S.render(S.parse_caption("three large cyan squares"), rng=3)
    cyan = (image[0] == -1) & (image[1] == 1) & (image[2] == 1)
    assert int(cyan.sum()) == 3 * 11 * 11
    assert torch.equal(image, S.render(S.parse_caption("three large cyan squares"), rng=3))
    with pytest.raises(ValueError, match="cannot fit"):
        S.render(S.parse_caption("three large red circles above three large blue squares"))


# --- ShapesBench -----------------------------------------------------------------


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, sigma, sigma)))


def test_scorer_accepts_the_dataset(batch):
    images, captions, _, _ = batch
    result = S.score(images, captions)
    assert set(result) == {"colour", "shape", "count", "position", "overall"}
    assert result["overall"] >= 0.98
    assert S.score(list(images[:10]), captions[:10])["overall"] >= 0.9  # list input


def test_scorer_is_robust_to_mild_blur_and_noise(batch):
    images, captions, _, _ = batch
    noise = 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    degraded = (_blur(images, 0.5) + noise).clamp(-1, 1)
    assert S.score(degraded, captions)["overall"] >= 0.9
    # blur eats triangle corners (their fill ratio looks like a circle's); the
    # bottom-heavy mass centre still gives them away
    assert S.score(_blur(images, 1.0), captions)["shape"] >= 0.9
    # a generated image that never reaches full brightness: read at half *its* maximum
    dimmed = (_blur(images, 0.5) + 1) * 0.6 - 1
    assert S.score(dimmed, captions)["overall"] >= 0.9


def test_scorer_is_near_chance_on_noise_and_shuffled_captions(batch):
    images, captions, _, _ = batch
    true = S.score(images, captions)
    noise = torch.randn((500, 3, 32, 32), generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert S.score(noise, captions[:500])["overall"] <= 0.05  # noise has many blobs: slow, so 500
    order = np.random.default_rng(0).permutation(len(captions))
    shuffled = S.score(images, [captions[i] for i in order])
    assert shuffled["overall"] <= 0.2
    assert shuffled["colour"] <= true["colour"] - 0.5


@pytest.mark.parametrize(
    "drawn, claimed, wrong",
    [
        ("two small red circles", "two small red squares", {"shape"}),
        ("two small red circles", "three small red circles", {"count"}),
        ("two small red circles", "two small blue circles", {"colour", "shape", "count"}),
        ("a red square above a blue triangle", "a red square below a blue triangle", {"position"}),
        ("a red square left of a blue circle", "a red square right of a blue circle", {"position"}),
        ("a large green triangle", "a large green circle", {"shape"}),
        ("a small red square left of a blue circle", "a small red square", {"colour"}),
        (
            "a small yellow square",
            "a small yellow square left of a red circle",
            {"colour", "shape", "count", "position"},  # the red group is missing
        ),
    ],
)
def test_each_category_catches_its_own_mistake(drawn, claimed, wrong):
    image = S.render(S.parse_caption(drawn), rng=0)
    [verdict] = S.score_per_image(image[None], [claimed])
    assert {key for key, ok in verdict.items() if not ok} == wrong | {"overall"}
    [right] = S.score_per_image(image[None], [drawn])
    assert all(right.values())


def test_count_confusion_puts_each_group_at_asked_against_drawn(batch):
    images, captions, _, _ = batch
    matrix = S.count_confusion(images[:200], captions[:200])
    groups = sum(len(S.parse_caption(c).groups) for c in captions[:200])
    assert matrix.shape == (3, S.MAX_DRAWN + 1) and matrix.sum() == groups
    assert np.trace(matrix[:, 1:]) >= 0.98 * groups  # the world itself draws what it says
    # two circles drawn, one asked: row 1 ("a"), column 2; three asked: row 3, column 2 (under-counted)
    two = S.render(S.parse_caption("two small red circles"), rng=0)[None]
    assert S.count_confusion(two, ["a small red circle"])[0, 2] == 1
    assert S.count_confusion(two, ["three small red circles"])[2, 2] == 1
    # the other group's colour is missing: column 0
    assert S.count_confusion(two, ["two red circles above a blue square"])[:, 0].tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="got 1 images but 2 captions"):
        S.count_confusion(two, ["a red circle"] * 2)
    shares = S.count_error_shares([[1, 3, 1, 0, 0], [0, 0, 2, 2, 0], [0, 0, 0, 1, 2]])  # 6 right, 5 over, 1 under
    assert shares == pytest.approx({"right": 6 / 12, "over": 5 / 12, "under": 1 / 12})


def test_position_counts_only_captions_with_a_relation():
    image = S.render(S.parse_caption("a red circle"), rng=0)
    result = S.score(image[None], ["a red circle"])
    assert result["overall"] == 1.0 and np.isnan(result["position"])
    assert S.score_per_image(image[None], ["a red circle"])[0]["position"] is True


def test_detect_finds_the_drawn_blobs():
    scene = S.parse_caption("two large magenta triangles below a small cyan square")
    image = S.render(scene, rng=5)
    blobs = S.detect(image)
    assert sorted((b.colour, b.shape) for b in blobs) == [
        ("cyan", "square"),
        ("magenta", "triangle"),
        ("magenta", "triangle"),
    ]


@pytest.mark.parametrize(
    "images, captions, error, match",
    [
        (torch.zeros(2, 3, 32, 32), ["a red circle"], ValueError, "got 2 images but 1 captions"),
        (torch.zeros(3, 32, 32), ["a red circle"], ValueError, r"for one image use images\[None\]"),
        (torch.zeros(1, 32, 32, 3), ["a red circle"], ValueError, "channels last"),
        (torch.zeros(1, 3, 16, 16), ["a red circle"], ValueError, "at least 24x24"),
        (torch.full((1, 3, 32, 32), 2.0), ["a red circle"], ValueError, "clamp"),
        (torch.full((1, 3, 32, 32), float("nan")), ["a red circle"], ValueError, r"\[-1, 1\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["a red circle"], ValueError, "uint8"),
        (np.zeros((1, 3, 32, 32), np.uint8), ["a red circle"], ValueError, "dtype uint8"),
        (torch.zeros(1, 3, 32, 32), ["a red blob"], ValueError, "caption 0: .*unknown word 'blob'"),
        (torch.zeros(1, 3, 32, 32), "a red circle", TypeError, "captions must be a list"),
        ("image.png", ["a red circle"], TypeError, "images must be a tensor"),
        (torch.zeros(0, 3, 32, 32), [], ValueError, "no images"),
    ],
)
def test_score_rejects_bad_inputs(images, captions, error, match):
    with pytest.raises(error, match=match):
        S.score(images, captions)


# --- figure --------------------------------------------------------------------


def test_sample_grid_shows_captioned_images():
    fig = S.sample_grid(n=6, seed=2)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 6
    first = S.ShapesDataset(seed=2)[0][1]
    assert titled[0].get_title().replace("\n", " ") == first
    with pytest.raises(ValueError, match="n must be an int"):
        S.sample_grid(n=0)


def test_plausibility_separates_dataset_images_from_noise_and_junk():
    shapes = S
    data = shapes.ShapesDataset(size=32, seed=5, length=300)
    images = torch.stack([data[i][0] for i in range(len(data))])
    assert shapes.plausibility(images) >= 0.99
    noise = torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert shapes.plausibility(noise) <= 0.05
    three_colours = images[:1].clone()
    three_colours[:, :, 26:31, 1:6] = torch.tensor([1.0, 1.0, -1.0])[:, None, None]  # extra yellow blob
    three_colours[:, :, 26:31, 26:31] = torch.tensor([-1.0, 1.0, 1.0])[:, None, None]  # extra cyan blob
    assert shapes.plausibility(three_colours) == 0.0
    with pytest.raises(ValueError):
        shapes.plausibility(torch.zeros(0, 3, 32, 32))


def test_unconditional_stats_on_dataset_images():
    data = S.ShapesDataset(size=32, seed=6, length=200)
    images = torch.stack([data[i][0] for i in range(len(data))])
    stats = S.unconditional_stats(images)
    assert stats["plausible"] >= 0.99 and stats["recognised"] >= 0.99
    assert 1.0 <= stats["colours"] <= 2.0 and 1.0 <= stats["blobs"] <= 6.0
    noise = torch.rand(50, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert S.unconditional_stats(noise)["plausible"] <= 0.05


def test_swap_relation_reverses_only_the_relation():
    assert S.swap_relation("two red circles above a blue square") == "two red circles below a blue square"
    assert S.swap_relation("a red circle right of a blue square") == "a red circle left of a blue square"
    assert S.swap_relation("three small green triangles") == "three small green triangles"
    with pytest.raises(ValueError, match="unknown word"):
        S.swap_relation("a red circel above a blue square")


def test_relation_shift_of_the_shapes_world_is_large_and_of_a_bag_of_words_zero():
    data = S.ShapesDataset(seed=5, length=64, p_relation=1.0)
    captions = [S.caption(data.scene(i)) for i in range(len(data))]
    as_written = [S.render(S.parse_caption(c), 32, i) for i, c in enumerate(captions)]
    swapped = [S.render(S.parse_caption(S.swap_relation(c)), 32, i) for i, c in enumerate(captions)]
    world = S.relation_shift(captions, as_written, swapped)
    assert world["pairs"] == 64 and world["px"] > 10, world  # every group goes where its caption says
    assert S.relation_shift(captions, swapped, as_written)["px"] == -world["px"]  # the wrong side: negative
    same = S.relation_shift(captions, as_written, as_written)  # a model deaf to the relation word
    assert same == {"px": 0.0, "pairs": 64}
    one_group = ["a red circle"]
    assert S.relation_shift(one_group, as_written[:1], as_written[:1]) == {"px": None, "pairs": 0}
    with pytest.raises(ValueError, match="one image of each kind per caption"):
        S.relation_shift(captions, as_written, swapped[:-1])
