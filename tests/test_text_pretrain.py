"""Text pretraining of the tiny T5 (Imagen's frozen-encoder recipe): labels read off the grammar,
a parse that needs word order, and a training stage whose encoder stays frozen afterwards."""
import torch
from hypothesis import given, settings, strategies as st

from kandlab import shapes, text_pretrain as tp
from kandlab.t5 import T5Config, T5Encoder
from kandlab.tokenizer import ShapesTokenizer


def test_labels_of_a_two_group_caption():
    labels = tp.word_labels("two small red circles left of a blue square", 12)
    side, colour, count = labels["side"], labels["colour"], labels["count"]
    left, right = tp.FIELDS["side"].index("left"), tp.FIELDS["side"].index("right")
    red, blue = tp.FIELDS["colour"].index("red"), tp.FIELDS["colour"].index("blue")
    I = tp.IGNORE
    assert side == [left] * 4 + [I, I] + [right] * 3 + [I] * 3  # "left of", </s> and padding are ignored
    assert colour == [red] * 4 + [I, I] + [blue] * 3 + [I] * 3
    assert count[:4] == [1] * 4 and count[6:9] == [0] * 3  # class indices of counts 2 and 1
    assert labels["size"][:4] == [tp.FIELDS["size"].index("small")] * 4
    assert labels["size"][6:9] == [tp.FIELDS["size"].index("unsaid")] * 3  # "a blue square" says no size


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), i=st.integers(0, 999))
def test_every_labelled_word_carries_its_groups_attributes(seed, i):
    scene = shapes.ShapesDataset(seed=seed, length=1000).scene(i)
    text = shapes.caption(scene)
    labels = tp.word_labels(text, 16)
    words = text.split()
    relation_words = len(scene.relation.split()) if scene.relation else 0
    assert sum(y != tp.IGNORE for y in labels["colour"]) == len(words) - relation_words
    relation_word = {"above", "below", "left", "right", "of"}
    for position, y in enumerate(labels["colour"]):
        if y == tp.IGNORE:
            assert position >= len(words) or words[position] in relation_word
            continue
        group = scene.groups[1 if relation_word & set(words[:position]) else 0]  # after the relation: the second
        assert tp.FIELDS["colour"][y] == group.colour
        assert tp.FIELDS["count"][labels["count"][position]] == group.count
        assert tp.FIELDS["shape"][labels["shape"][position]] == group.shape
        assert tp.FIELDS["size"][labels["size"][position]] == (group.size or "unsaid")
    sides = {tp.FIELDS["side"][y] for y in labels["side"] if y != tp.IGNORE}
    assert sides == ({"anywhere"} if scene.relation is None else
                     {"above": {"top", "bottom"}, "below": {"top", "bottom"},
                      "left of": {"left", "right"}, "right of": {"left", "right"}}[scene.relation])


def test_a_cut_caption_keeps_the_labels_of_its_first_words():
    labels = tp.word_labels("a red circle above a blue square", 4)
    assert labels["side"] == [1, 1, 1, tp.IGNORE]


def _small_t5() -> T5Encoder:
    torch.manual_seed(0)
    config = T5Config(**{**T5Config.tiny(vocab_size=ShapesTokenizer.from_shapes().vocab_size).__dict__,
                         "d_model": 32, "d_ff": 64})
    return T5Encoder(config)


def test_pretraining_teaches_the_encoder_which_side_each_word_is_on():
    tok = ShapesTokenizer.from_shapes(max_length=16)
    data = shapes.ShapesDataset(seed=0, length=4000)
    captions = [shapes.caption(data.scene(i)) for i in range(len(data))]
    t5 = _small_t5()
    probe = tok(["a red circle above a blue square", "a red circle below a blue square"])
    with torch.no_grad():
        before = t5(probe["input_ids"], probe["attention_mask"])[:, 1]  # (2, D) the word "red"
    log = tp.pretrain(t5, captions, tok, tp.PretrainConfig(steps=400, batch_size=128, lr=2e-3, held_out=512), progress=False)
    # the side of a word depends on the relation word after it and on which group it is in: word order
    assert log["held_out_accuracy"]["side"] >= 0.95, log
    assert min(log["held_out_accuracy"].values()) >= 0.9, log
    with torch.no_grad():
        after = t5(probe["input_ids"], probe["attention_mask"])[:, 1]
    change = lambda e: ((e[0] - e[1]).norm() / e[0].norm()).item()  # noqa: E731
    assert change(after) > 2 * change(before) and change(after) > 0.3, (change(before), change(after))
    assert set(log) >= {"steps", "wall_time_seconds", "held_out_accuracy", "final_loss_mean_last_100"}
