"""The composable prompt syntax: AND, NOT, :weight, escapes, and errors that name the position."""
import pytest

from guidance_kit.samplers.prompt_syntax import PromptConcept, PromptSyntaxError, parse_composable_prompt


def parsed(text, default_weight=1.0):
    return [(c.text, c.weight) for c in parse_composable_prompt(text, default_weight)]


def test_concepts_weights_and_not():
    assert parsed("a red circle AND a blue square :0.8 AND NOT green") == [
        ("a red circle", 1.0), ("a blue square", 0.8), ("green", -1.0)]
    assert parsed("NOT red :2.5 AND a square") == [("red", -2.5), ("a square", 1.0)]
    assert parsed("a :-0.5 AND b:+3 AND c:.25 AND d:1e-1") == [("a", -0.5), ("b", 3.0), ("c", 0.25), ("d", 0.1)]


def test_default_weight_applies_to_unweighted_concepts_and_is_negated_by_not():
    assert parsed("a AND b :2 AND NOT c", default_weight=7.5) == [("a", 7.5), ("b", 2.0), ("c", -7.5)]


def test_whitespace_is_free():
    assert parsed("  a red circle\n\tAND   a blue   square  :  0.8 \nAND\nNOT   green  ") == [
        ("a red circle", 1.0), ("a blue   square", 0.8), ("green", -1.0)]


def test_positions_point_at_each_concept_text():
    source = "a red circle AND NOT  green :2"
    concepts = parse_composable_prompt(source)
    assert concepts == [PromptConcept("a red circle", 1.0, 0), PromptConcept("green", -2.0, 22)]
    assert source[concepts[1].position:].startswith("green")


def test_and_only_as_a_capitalised_standalone_word():
    assert parsed("a cat and a dog") == [("a cat and a dog", 1.0)]
    assert parsed("SANDWICH AND BRAND ANDROID") == [("SANDWICH", 1.0), ("BRAND ANDROID", 1.0)]


def test_escapes_make_keywords_and_colons_literal():
    assert parsed(r"rock \AND roll AND a sign \NOT here") == [("rock AND roll", 1.0), ("a sign NOT here", 1.0)]
    assert parsed(r"time\: noon :0.5") == [("time: noon", 0.5)]
    assert parsed(r"ANDRE\AND AND x") == [("ANDREAND", 1.0), ("x", 1.0)]


def test_emphasis_colons_and_other_escapes_go_to_the_encoder():
    assert parsed(r"a (red:1.2) circle [big:small:0.5] \(literal\) :0.7") == [
        (r"a (red:1.2) circle [big:small:0.5] \(literal\)", 0.7)]


@pytest.mark.parametrize("source, position, words", [
    ("", 0, "empty"),
    ("   ", 0, "empty"),
    ("a AND AND b", 6, "empty concept before 'AND'"),
    ("AND b", 0, "empty concept before 'AND'"),
    ("a red circle AND ", 13, "empty concept after 'AND'"),
    ("a AND NOT", 6, "'NOT' without a concept"),
    ("a AND NOT NOT b", 10, "'NOT' must start a concept"),
    ("a red circle NOT blue", 13, "'NOT' must start a concept"),
    ("a :0.8x", 2, "expected a number after ':'"),
    ("photo: a cat", 5, "expected a number after ':'"),
    ("a AND b : ", 8, "expected a number after ':'"),
    ("a AND :0.5", 6, "a weight without concept text"),
    ("NOT b :-1", 6, "'NOT' with a negative weight"),
])
def test_bad_syntax_names_the_position(source, position, words):
    with pytest.raises(PromptSyntaxError) as error:
        parse_composable_prompt(source)
    assert error.value.position == position
    assert words in str(error.value) and f"at position {position}" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_non_finite_weights_are_rejected():
    with pytest.raises(ValueError):
        parse_composable_prompt("a", default_weight=float("nan"))
    with pytest.raises(PromptSyntaxError, match="not finite"):
        parse_composable_prompt("a :1e999")
