"""The caption grammar: sampling, captions, and the parser that inverts them."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.grammar import (
    ATTRIBUTES,
    PHRASES,
    all_scenes,
    is_valid_scene,
    make_caption,
    parse_caption,
    sample_attributes,
)

SCENES = all_scenes()


def test_parser_inverts_captions_over_many_seeds() -> None:
    seen = set()
    for seed in range(5000):
        rng = random.Random(seed)
        attrs = sample_attributes(rng)
        caption = make_caption(attrs, rng)
        assert parse_caption(caption) == attrs, caption
        seen.add(caption)
    assert len(seen) > 4000  # phrasing variety, not one caption per scene


def test_every_scene_parses_back_under_several_phrasings() -> None:
    assert len(SCENES) >= 500
    rng = random.Random(0)
    for attrs in SCENES:
        for _ in range(3):
            assert parse_caption(make_caption(attrs, rng)) == attrs


def test_sampling_covers_every_value_and_obeys_world_rules() -> None:
    rng = random.Random(1)
    scenes = [sample_attributes(rng) for _ in range(3000)]
    assert all(is_valid_scene(s) for s in scenes)
    for name, values in ATTRIBUTES.items():
        assert {s[name] for s in scenes} == set(values), name
    assert all(s["setting"] == "sea" for s in scenes if s["subject"] == "ship")
    assert not any(s["sky"] == "sun" and s["time"] == "night" for s in scenes)
    assert not any(s["sky"] == "stars" and s["time"] == "day" for s in scenes)


def test_phrases_are_unique_across_attributes() -> None:
    phrases = [p for values in PHRASES.values() for ps in values.values() for p in ps]
    assert len(phrases) == len(set(phrases))


def test_absent_clauses_mean_no_birds_and_no_sky() -> None:
    attrs = parse_caption("an engraving of a windmill on the hills, on the left, at night")
    assert attrs == {
        "subject": "windmill", "setting": "hills", "sky": "none",
        "time": "night", "position": "left", "birds": "0",
    }  # fmt: skip


def test_parser_forgives_case_spacing_and_final_period() -> None:
    expected = parse_caption("an engraving of a ship on the sea, on the left, under the sun at dusk")
    assert expected is not None
    for text in (
        "An Engraving of a ship on the sea , on the left , under the sun at dusk.",
        "  an engraving of a ship  on the sea,on the left, under the sun at dusk ",
    ):
        assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "an engraving",
        "an engraving of a ship",  # no setting, position, time
        "an engraving of a ship on the sea, on the left",  # no time
        "an engraving of a ship on the sea, on the left, at night, at night",  # time twice
        "an engraving of a ship on the sea, on the left, on the right, at night",  # position twice
        "an engraving of a dragon on the sea, on the left, at night",  # unknown subject
        "an engraving of a ship in a town, on the left, by day",  # ship not on the sea
        "an engraving of a tree on the hills, on the left, under the sun at night",  # sun at night
        "an engraving of a tree on the hills, on the left, under the stars by day",  # stars by day
        "an engraving of a tree on the hills, on the left, with four birds, by day",
        "a ship on the sea, on the left, by day",  # no opener
        "an engraving of a tree on the hills on the left, by day",  # two phrases in one clause
        "an engraving of an engraving of a tree on the hills, on the left, by day",
        "an engraving of a tree on the hills, on the left, by day and more",
    ],
)
def test_parser_rejects_text_outside_the_grammar(text: str) -> None:
    assert parse_caption(text) is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdefghilmnorstuvwy ,.")), max_size=80))
def test_parser_never_raises_and_returns_only_valid_scenes(text: str) -> None:
    attrs = parse_caption(text)
    assert attrs is None or is_valid_scene(attrs)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 12))
def test_dropping_a_clause_never_keeps_the_same_reading(seed: int, which: int) -> None:
    rng = random.Random(seed)
    attrs = sample_attributes(rng)
    clauses = make_caption(attrs, rng).split(", ")
    del clauses[which % len(clauses)]
    assert parse_caption(", ".join(clauses)) != attrs


def test_make_caption_rejects_invalid_scene() -> None:
    bad = {**SCENES[0], "subject": "dragon"}
    with pytest.raises(ValueError, match="not a valid scene"):
        make_caption(bad, random.Random(0))


def test_captions_survive_the_caption_tokenizer() -> None:
    from model.tokenizer import CaptionTokenizer

    rng = random.Random(3)
    pairs = [(a, make_caption(a, rng)) for a in (sample_attributes(rng) for _ in range(300))]
    tok = CaptionTokenizer.train([c for _, c in pairs])
    decoded = tok.decode(tok.encode([c for _, c in pairs], 32))
    assert [parse_caption(d) for d in decoded] == [a for a, _ in pairs]
