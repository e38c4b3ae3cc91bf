"""The toy world's generator, grammar and exact oracle (pure numpy, no ComfyUI, no model)."""

import json

import numpy as np
import pytest

from toyworld import oracle, scenes

SCENES_PER_KIND = 500


@pytest.fixture(scope="module")
def generated():
    rng = np.random.default_rng(1234)
    return {kind: [scenes.sample_scene(rng, kind) for _ in range(SCENES_PER_KIND)] for kind in scenes.KINDS}


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_oracle_confirms_every_fact_of_generated_scenes(generated, kind):
    verdicts = [oracle.judge(scene.image, scene.spec) for scene in generated[kind]]
    for fact in verdicts[0]:
        rate = np.mean([v[fact] for v in verdicts])
        assert rate >= 0.99, f"{kind}: fact {fact!r} confirmed only {rate:.3f} of the time"


def test_oracle_accepts_float_images_and_batches(generated):
    scene = generated["mirror"][0]
    as_float = scene.image.astype(np.float32) / 255.0
    assert oracle.judge(as_float, scene.spec) == oracle.judge(scene.image, scene.spec)
    assert oracle.judge_batch(np.stack([as_float] * 2), [scene.spec] * 2)[1]["pass"]


def test_oracle_rejects_uniform_noise():
    rng = np.random.default_rng(7)
    specs = [scenes.sample_spec(rng, kind) for kind in scenes.KINDS for _ in range(100)]
    passes = [oracle.judge(rng.random((32, 32, 3), dtype=np.float32), spec)["pass"] for spec in specs]
    assert np.mean(passes) <= 0.02


def _differs_in_colour_or_shape(spec_a, spec_b):
    return any((a["colour"], a["shape"]) != (b["colour"], b["shape"])
               for a, b in zip(spec_a["objects"], spec_b["objects"]))


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_oracle_rejects_swapped_prompts(generated, kind):
    pool = generated[kind]
    pairs = [(scene, other) for scene, other in zip(pool, pool[1:] + pool[:1])
             if _differs_in_colour_or_shape(scene.spec, other.spec)]
    assert len(pairs) > 300
    passes = [oracle.judge(scene.image, other.spec)["pass"] for scene, other in pairs[:300]]
    assert np.mean(passes) <= 0.05


def test_render_is_deterministic():
    first, second = (scenes.sample_scene(np.random.default_rng(3)) for _ in range(2))
    assert first.prompt == second.prompt and np.array_equal(first.image, second.image)
    assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_prompts_parse_back_to_their_specs(kind):
    for spec in scenes.all_specs(kind):
        prompt = scenes.prompt_for(spec)
        assert scenes.parse_prompt(prompt) == spec
        assert json.loads(json.dumps(spec)) == spec


def test_parse_prompt_rejects_sentences_outside_the_grammar():
    for prompt in ["a red circle", "a red circle left of a red square", "a huge red circle on the left", ""]:
        with pytest.raises(ValueError):
            scenes.parse_prompt(prompt)


def test_tokenize():
    tokens = scenes.tokenize("A large RED circle on the left zebra")
    assert len(tokens) == scenes.MAX_TOKENS
    assert tokens[:7] == [scenes.VOCAB.index(w) for w in ["a", "large", "red", "circle", "on", "the", "left"]]
    assert tokens[7] == scenes.VOCAB.index(scenes.UNK) and set(tokens[8:]) == {0}
    assert scenes.tokenize("") == [0] * scenes.MAX_TOKENS
    for prompt, _ in scenes.dev_prompts():
        assert scenes.VOCAB.index(scenes.UNK) not in scenes.tokenize(prompt)


def test_prompt_sets_are_fixed_disjoint_and_cover_every_kind():
    dev, validation = scenes.dev_prompts(), scenes.validation_prompts()
    assert dev == scenes.dev_prompts() and validation == scenes.validation_prompts()
    assert not {p for p, _ in dev} & {p for p, _ in validation}
    for prompt_set in (dev, validation):
        kinds = [spec["kind"] for _, spec in prompt_set]
        assert {k: kinds.count(k) for k in scenes.KINDS} == scenes.PROMPT_SET_SIZES
        assert all(scenes.parse_prompt(prompt) == spec for prompt, spec in prompt_set)


def test_main_object_names_the_largest_objects_colour_and_shape():
    rng = np.random.default_rng(3)
    for colour, shape in [("red", "circle"), ("cyan", "triangle"), ("purple", "square")]:
        spec = {"kind": "single", "objects": [{"colour": colour, "shape": shape, "size": "large", "position": "left"}]}
        assert oracle.main_object(scenes.render(spec, rng)) == (colour, shape)
    relation = {"kind": "relation", "objects": [{"colour": "blue", "shape": "square"},
                                                {"colour": "green", "shape": "circle"}], "relation": "left of"}
    image = scenes.render(relation, rng)
    assert oracle.main_object(image)[0] in ("blue", "green")
    assert oracle.main_object(np.zeros((32, 32, 3), np.uint8) + 14) == (None, None)
