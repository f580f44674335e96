"""The caption grammar of the procedural engravings: scenes, captions, and the parser back.

A scene is six attributes, all plain strings (see ``ATTRIBUTES``):

    subject   ship | lighthouse | windmill | tower | house | tree | church | bridge
    setting   sea | hills | field | town
    sky       sun | moon | clouds | stars | none
    time      day | dusk | night
    position  left | center | right          (where the subject stands on the plate)
    birds     0 | 1 | 2 | 3

World rules (``is_valid_scene``): a ship is only on the sea, a lighthouse on the sea or the
hills, nothing else on the sea, a windmill not in a town; the sun only by day or at dusk; the
moon and the stars only at dusk or night. 2,880 scenes satisfy them.

Caption grammar (lower case; ``make_caption`` writes it, ``parse_caption`` reads it)::

    caption   := [TIME ", "] main ("," " " clause)*
    main      := OPENER " " SUBJECT " " (SETTING | POSITION)
    clause    := SETTING | POSITION | SKY [" " TIME] | TIME | BIRDS

    OPENER    := "an engraving of" | "an etching of" | "a print of"
    SUBJECT   := ship: "a ship" | "a sailing ship";  lighthouse: "a lighthouse";
                 windmill: "a windmill";  tower: "a tower" | "a stone tower";
                 house: "a house" | "a cottage";  tree: "a tree" | "an oak tree";
                 church: "a church" | "a chapel";  bridge: "a bridge" | "an arched bridge"
    SETTING   := sea: "on the sea" | "at sea";  hills: "on the hills" | "among the hills";
                 field: "in a field" | "in the fields";  town: "in a town" | "in the town"
    POSITION  := left: "on the left" | "to the left";  center: "in the center" | "in the middle";
                 right: "on the right" | "to the right"
    SKY       := sun: "under the sun" | "beneath the sun";
                 moon: "under a crescent moon" | "beneath a crescent moon";
                 clouds: "under clouds" | "beneath the clouds";
                 stars: "under the stars" | "beneath the stars"
    TIME      := day: "by day" | "in daylight";  dusk: "at dusk" | "at twilight";
                 night: "at night" | "by night"
    BIRDS     := 1: "with a bird" | "with one bird";  2: "with two birds" | "with a pair of birds";
                 3: "with three birds" | "with a flock of three birds"

Each attribute appears exactly once, except that sky "none" is the absence of a SKY phrase
and birds "0" the absence of a BIRDS phrase. Subject, setting, position and time are
required. Clause order after the main clause is free. Example:
"an engraving of a windmill on the hills, on the left, under a crescent moon at night, with
three birds". No phrase belongs to two attributes, so a caption has at most one reading;
``parse_caption`` returns None for any text that is not a caption of this grammar or whose
scene breaks a world rule. It forgives case, surrounding/double spaces, a space before a
comma (as a word-level tokenizer's decode writes it) and a final period. The longest caption
is 28 word and comma tokens, so bos + caption + eos fits the default 32 caption tokens.
"""

from __future__ import annotations

import random
import re

from model.tokenizer import canonical_caption

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "subject": ("ship", "lighthouse", "windmill", "tower", "house", "tree", "church", "bridge"),
    "setting": ("sea", "hills", "field", "town"),
    "sky": ("sun", "moon", "clouds", "stars", "none"),
    "time": ("day", "dusk", "night"),
    "position": ("left", "center", "right"),
    "birds": ("0", "1", "2", "3"),
}

# Which settings each subject may stand in, and which times each sky element allows.
SUBJECT_SETTINGS: dict[str, tuple[str, ...]] = {
    "ship": ("sea",),
    "lighthouse": ("sea", "hills"),
    "windmill": ("hills", "field"),
    "tower": ("hills", "field", "town"),
    "house": ("hills", "field", "town"),
    "tree": ("hills", "field", "town"),
    "church": ("hills", "field", "town"),
    "bridge": ("hills", "field", "town"),
}
SKY_TIMES: dict[str, tuple[str, ...]] = {
    "sun": ("day", "dusk"),
    "moon": ("dusk", "night"),
    "clouds": ("day", "dusk", "night"),
    "stars": ("dusk", "night"),
    "none": ("day", "dusk", "night"),
}

OPENERS: tuple[str, ...] = ("an engraving of", "an etching of", "a print of")

# attribute -> value -> its phrases. Values absent here ("none" sky, "0" birds) have no phrase.
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "subject": {
        "ship": ("a ship", "a sailing ship"),
        "lighthouse": ("a lighthouse",),
        "windmill": ("a windmill",),
        "tower": ("a tower", "a stone tower"),
        "house": ("a house", "a cottage"),
        "tree": ("a tree", "an oak tree"),
        "church": ("a church", "a chapel"),
        "bridge": ("a bridge", "an arched bridge"),
    },
    "setting": {
        "sea": ("on the sea", "at sea"),
        "hills": ("on the hills", "among the hills"),
        "field": ("in a field", "in the fields"),
        "town": ("in a town", "in the town"),
    },
    "position": {
        "left": ("on the left", "to the left"),
        "center": ("in the center", "in the middle"),
        "right": ("on the right", "to the right"),
    },
    "sky": {
        "sun": ("under the sun", "beneath the sun"),
        "moon": ("under a crescent moon", "beneath a crescent moon"),
        "clouds": ("under clouds", "beneath the clouds"),
        "stars": ("under the stars", "beneath the stars"),
    },
    "time": {
        "day": ("by day", "in daylight"),
        "dusk": ("at dusk", "at twilight"),
        "night": ("at night", "by night"),
    },
    "birds": {
        "1": ("with a bird", "with one bird"),
        "2": ("with two birds", "with a pair of birds"),
        "3": ("with three birds", "with a flock of three birds"),
    },
}
ABSENT: dict[str, str] = {"sky": "none", "birds": "0"}  # the value an absent phrase means
REQUIRED: tuple[str, ...] = ("subject", "setting", "position", "time")

# phrase -> (attribute, value); built once, and checked to be a function (no shared phrase).
_LOOKUP: dict[str, tuple[str, str]] = {}
for _attr, _values in PHRASES.items():
    for _value, _phrases in _values.items():
        for _p in _phrases:
            assert _p not in _LOOKUP, f"phrase {_p!r} is ambiguous"
            _LOOKUP[_p] = (_attr, _value)


def is_valid_scene(attrs: dict[str, str]) -> bool:
    """True when every attribute has a known value and the scene obeys the world rules."""
    if set(attrs) != set(ATTRIBUTES) or any(attrs[k] not in v for k, v in ATTRIBUTES.items()):
        return False
    return attrs["setting"] in SUBJECT_SETTINGS[attrs["subject"]] and attrs["time"] in SKY_TIMES[attrs["sky"]]


def all_scenes() -> list[dict[str, str]]:
    """Every valid scene, in a fixed order."""
    scenes = [{}]
    for name, values in ATTRIBUTES.items():
        scenes = [{**s, name: v} for s in scenes for v in values]
    return [s for s in scenes if is_valid_scene(s)]


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """A valid scene. Subject, sky, position and birds are uniform; setting and time are
    uniform among those the subject and sky allow, so every subject is equally common."""
    subject = rng.choice(ATTRIBUTES["subject"])
    sky = rng.choice(ATTRIBUTES["sky"])
    return {
        "subject": subject,
        "setting": rng.choice(SUBJECT_SETTINGS[subject]),
        "sky": sky,
        "time": rng.choice(SKY_TIMES[sky]),
        "position": rng.choice(ATTRIBUTES["position"]),
        "birds": rng.choice(ATTRIBUTES["birds"]),
    }


def make_caption(attrs: dict[str, str], rng: random.Random) -> str:
    """One caption of the grammar for a valid scene, with random synonyms and clause order."""
    if not is_valid_scene(attrs):
        raise ValueError(f"not a valid scene: {attrs}")

    def say(attr: str) -> str:
        return rng.choice(PHRASES[attr][attrs[attr]])

    # The main clause carries the setting or the position; the other one follows it.
    place = ["setting", "position"] if rng.random() < 0.7 else ["position", "setting"]
    main = f"{rng.choice(OPENERS)} {say('subject')} {say(place[0])}"
    clauses = [say(place[1])]
    time_where = rng.choice(("front", "sky", "end") if attrs["sky"] != "none" else ("front", "end"))
    if attrs["sky"] != "none":
        clauses.append(say("sky") + (f" {say('time')}" if time_where == "sky" else ""))
    if attrs["birds"] != "0":
        clauses.insert(rng.randrange(1, len(clauses) + 1), say("birds"))
    if time_where == "end":
        clauses.append(say("time"))
    caption = ", ".join([main, *clauses])
    return f"{say('time')}, {caption}" if time_where == "front" else caption


_OPENER_RE = re.compile("^(?:" + "|".join(map(re.escape, OPENERS)) + ") ")
_SUBJECT_RE = re.compile(
    "(" + "|".join(re.escape(p) for ps in PHRASES["subject"].values() for p in ps) + ") "
)


def parse_caption(text: str) -> dict[str, str] | None:
    """The scene a caption of the grammar describes, or None when ``text`` is not one."""
    clauses = canonical_caption(text).split(", ")
    found: dict[str, str] = {}

    def take(phrase: str) -> bool:
        hit = _LOOKUP.get(phrase)
        if hit is None or hit[0] in found or hit[0] == "subject":
            return False
        found[hit[0]] = hit[1]
        return True

    # An optional leading time clause, then the main clause: opener, subject, one phrase.
    if clauses and _LOOKUP.get(clauses[0], ("",))[0] == "time":
        take(clauses.pop(0))
    opener = _OPENER_RE.match(clauses[0]) if clauses else None
    subject = _SUBJECT_RE.match(clauses[0], opener.end()) if opener else None
    if subject is None:
        return None
    found["subject"] = _LOOKUP[subject.group(1)][1]
    first = clauses[0][subject.end() :]
    if _LOOKUP.get(first, ("",))[0] not in ("setting", "position") or not take(first):
        return None
    for clause in clauses[1:]:
        if take(clause):
            continue
        sky_time = _split_sky_time(clause)
        if sky_time is None or not (take(sky_time[0]) and take(sky_time[1])):
            return None
    if any(a not in found for a in REQUIRED):
        return None
    scene = {a: found.get(a, ABSENT.get(a, "")) for a in ATTRIBUTES}
    return scene if is_valid_scene(scene) else None


def _split_sky_time(clause: str) -> tuple[str, str] | None:
    """('under the sun', 'by day') for a SKY TIME clause, None otherwise."""
    for sky in (p for ps in PHRASES["sky"].values() for p in ps):
        rest = clause.removeprefix(sky + " ")
        if rest != clause and _LOOKUP.get(rest, ("",))[0] == "time":
            return sky, rest
    return None
