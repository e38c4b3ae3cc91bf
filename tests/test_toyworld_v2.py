"""Toy world v2: generator and grammar, the exact oracle, the models (ComfyUI's own classes) and the
resumable training command (a handful of steps only)."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from toyworld.v2 import model, oracle, sample, scenes, train, weights

SCENES_PER_KIND = 300


@pytest.fixture(scope="module")
def generated():
    rng = np.random.default_rng(2024)
    return {kind: [scenes.sample_scene(rng, kind) for _ in range(SCENES_PER_KIND)] for kind in scenes.KINDS}


# ---------------------------------------------------------------- scenes and grammar

def test_prompts_parse_back_to_their_specs_and_tokenize_within_the_vocabulary():
    rng = np.random.default_rng(1)
    for kind in scenes.KINDS:
        for _ in range(200):
            spec = scenes.sample_spec(rng, kind)
            prompt = scenes.prompt_for(spec)
            assert scenes.parse_prompt(prompt) == spec
            ids = scenes.tokenize(prompt)
            assert len(ids) == scenes.MAX_TOKENS and scenes.TOKEN_ID[scenes.UNK] not in ids
            assert ids[len(prompt.split())] == scenes.TOKEN_ID[scenes.EOS]
    assert scenes.prompt_for(scenes.parse_prompt("an orange striped cross between a red square and a blue circle")) \
        == "an orange striped cross between a red square and a blue circle"


@pytest.mark.parametrize("sentence", ["a red circle", "a orange circle above a mirror",
                                      "a red circle left of a red square", "a large red circle on the floor",
                                      "a red circle on the moon", "a red plain circle on the floor",
                                      "a small red circle left of a blue square"])
def test_parse_prompt_rejects_sentences_outside_the_grammar(sentence):
    with pytest.raises(ValueError, match="outside the toy world v2 grammar"):
        scenes.parse_prompt(sentence)


def test_render_is_deterministic_and_anti_aliased():
    first, second = (scenes.sample_scene(np.random.default_rng(3), "single") for _ in range(2))
    assert first.prompt == second.prompt and np.array_equal(first.image, second.image)
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8
    circle = scenes.coverage("circle", 32.5, 32.5, 11.5)
    assert 0 < ((circle > 0) & (circle < 1)).sum() < 100  # a blended outline, not a staircase


def test_prompt_set_slices_are_fixed_disjoint_and_every_kind_fills_eight():
    slices = [scenes.prompt_set(index) for index in (scenes.DEV, scenes.VALIDATION, scenes.TRAINING)]
    assert slices[0] == scenes.prompt_set(0) == scenes.dev_prompts()
    prompts = [{prompt for prompt, _ in chosen} for chosen in slices]
    assert all(len(p) == sum(scenes.SLICE_SIZES.values()) for p in prompts)
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    for chosen in slices:
        for kind, count in scenes.SLICE_SIZES.items():
            assert sum(spec["kind"] == kind for _, spec in chosen) == count
        assert all(scenes.parse_prompt(prompt) == spec for prompt, spec in chosen)
    assert all(scenes.slice_count(kind) >= 8 for kind in scenes.KINDS)
    assert scenes.spec_count("implied") == len({scenes.prompt_for(scenes.sample_spec(np.random.default_rng(i),
                                                                                     "implied"))
                                                for i in range(20000)})
    with pytest.raises(ValueError, match="past the 25 full slices of implied"):
        scenes.prompt_set(scenes.slice_count("implied"))  # refused before any prompt of it is drawn


def test_alter_spec_changes_exactly_the_named_fact():
    rng = np.random.default_rng(5)
    for kind, facts in scenes.ALTERABLE.items():
        for fact in facts:
            for _ in range(20):
                spec = scenes.sample_spec(rng, kind)
                altered = scenes.alter_spec(spec, fact, rng)
                assert scenes.prompt_for(altered) != scenes.prompt_for(spec)
                assert scenes.parse_prompt(scenes.prompt_for(altered)) == altered
                if fact in ("colour", "shape", "texture"):
                    changed = [(a[fact] != b[fact]) for a, b in zip(spec["objects"], altered["objects"])]
                    assert sum(changed) == 1


# ---------------------------------------------------------------- oracle

@pytest.mark.parametrize("kind", scenes.KINDS)
def test_oracle_confirms_every_fact_of_generated_scenes(generated, kind):
    verdicts = [oracle.judge(scene.image, scene.spec) for scene in generated[kind]]
    assert set(verdicts[0]) == {*scenes.ALTERABLE[kind], "pass"} - {"binding"} | (
        {"implied"} if kind == "implied" else set())
    for fact in verdicts[0]:
        rate = np.mean([v[fact] for v in verdicts])
        assert rate >= 0.99, f"{kind}: fact {fact!r} confirmed only {rate:.3f} of the time"


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_oracle_rejects_prompts_with_one_fact_changed(generated, kind):
    rng = np.random.default_rng(11)
    for fact in scenes.ALTERABLE[kind]:
        passes = [oracle.judge(scene.image, scenes.alter_spec(scene.spec, fact, rng))["pass"]
                  for scene in generated[kind][:60]]
        assert np.mean(passes) <= 0.05, f"{kind}: {fact} changed still passes {np.mean(passes):.2f}"


def test_oracle_tells_support_from_a_gap():
    """The physical relation: "on" needs contact, "above" a visible gap, on the same two objects."""
    rng = np.random.default_rng(13)
    for relation, other in (("on", "above"), ("above", "on")):
        for _ in range(25):
            spec = {**scenes.sample_spec(rng, "relation"), "relation": relation}
            spec["objects"] = spec["objects"][:2]
            image = scenes.render(spec, rng)
            assert oracle.judge(image, spec)["relation"]
            assert not oracle.judge(image, {**spec, "relation": other})["relation"]


def test_oracle_rejects_swapped_prompts_and_noise(generated):
    rng = np.random.default_rng(7)
    for kind, pool in generated.items():
        pairs = [(a, b) for a, b in zip(pool[:100], pool[1:101]) if a.prompt != b.prompt]
        passes = [oracle.judge(a.image, b.spec)["pass"] for a, b in pairs]
        assert np.mean(passes) <= 0.05
        noise = [oracle.judge(rng.random((64, 64, 3), dtype=np.float32), s.spec)["pass"] for s in pool[:40]]
        assert not any(noise)


def test_oracle_tolerates_a_mild_blur(generated):
    """Model outputs are softer than the generator's: a 0.5 px Gaussian blur plus pixel noise keeps
    nearly every verdict (a 0.8 px blur washes the textures out; see docs/toyworld.md)."""
    rng = np.random.default_rng(3)
    for kind, pool in generated.items():
        blurred = [np.clip(ndimage.gaussian_filter(s.image.astype(np.float32), (0.5, 0.5, 0))
                           + rng.normal(0, 4, s.image.shape), 0, 255).astype(np.uint8) for s in pool[:60]]
        assert np.mean([oracle.judge(image, s.spec)["pass"] for image, s in zip(blurred, pool)]) >= 0.95


def test_oracle_accepts_float_images_and_names_the_main_object(generated):
    scene = generated["single"][0]
    as_float = torch.from_numpy(scene.image.astype(np.float32) / 255.0)
    assert oracle.judge(as_float, scene.spec) == oracle.judge(scene.image, scene.spec)
    assert oracle.judge_batch(torch.stack([as_float] * 2), [scene.spec] * 2)[1]["pass"]
    obj = scene.spec["objects"][0]
    assert oracle.main_object(scene.image) == (obj["colour"], obj["shape"])
    assert oracle.main_object(np.zeros((64, 64, 3), np.uint8) + np.array(scenes.BACKGROUND, np.uint8)) == (None, None)


# ---------------------------------------------------------------- models

def test_models_fit_the_weight_budget():
    sizes = {name: 2 * model.parameter_count(model.ARCHITECTURES[arch](**config)) / 1e6
             for name, arch, config in [("vae", "vae", model.VAE), ("text", "text_encoder", model.TEXT_ENCODER),
                                        ("dit", "dit", model.MAIN_DIT), ("weak", "dit", model.WEAK_DIT),
                                        ("classifier", "image_classifier", model.CLASSIFIER)]}
    assert sum(sizes.values()) <= 20.0, sizes  # of 25 MB, the rest for the artifacts later sessions re-make
    assert sizes["weak"] < sizes["dit"] / 4


def test_initialise_leaves_no_weight_uninitialised():
    """ComfyUI's operations skip initialisation: two builds under one seed must agree exactly."""
    for arch, config in [("vae", model.VAE), ("text_encoder", model.TEXT_ENCODER), ("dit", model.WEAK_DIT)]:
        builds = []
        for _ in range(2):
            torch.manual_seed(0)
            builds.append(model.ARCHITECTURES[arch](**config).state_dict())
        for key, value in builds[0].items():
            assert torch.equal(value, builds[1][key]), f"{arch}: {key} is not initialised"


@pytest.fixture(scope="module")
def small_world():
    torch.manual_seed(0)
    dit = model.build_dit(**model.WEAK_DIT)
    for parameter in dit.parameters():  # leave adaLN-Zero so that every block matters
        parameter.data.normal_(0, 0.05)
    text_encoder = model.build_text_encoder(**model.TEXT_ENCODER)
    with torch.no_grad():
        context, pooled = model.encode_text(text_encoder, model.tokens(["a red circle on the left", ""]))
    return dit, context, pooled, torch.randn(2, model.LATENT_CHANNELS, 16, 16), torch.tensor([0.3, 0.7])


def test_dit_is_comfyui_flux_and_honours_block_replacements(small_world):
    import comfy.ldm.flux.model

    dit, context, pooled, x, sigma = small_world
    assert isinstance(dit, comfy.ldm.flux.model.Flux)
    with torch.no_grad():
        plain = model.velocity(dit, x, sigma, context, pooled)
        calls = []

        def passthrough(args, extra):
            calls.append(args["transformer_options"]["block_index"])
            return extra["original_block"](args)

        options = {"patches_replace": {"dit": {("double_block", 0): passthrough, ("single_block", 2): passthrough}}}
        assert torch.equal(model.velocity(dit, x, sigma, context, pooled, options), plain)
        assert calls == [0, 2] and set(options) == {"patches_replace"}  # the caller's dict is not written to

        def skip(args, extra):
            return {"img": args["img"]}

        skip_first = {"patches_replace": {"dit": {("single_block", 0): skip}}}
        skipped = model.velocity(dit, x, sigma, context, pooled, skip_first)
        assert not torch.allclose(skipped, plain)


def test_trainable_forward_is_the_same_computation_and_differentiable(small_world):
    dit, context, pooled, x, sigma = small_world
    with pytest.raises(RuntimeError, match="inplace operation"):
        model.velocity(dit, x, sigma, context, pooled).square().mean().backward()
    dit.zero_grad()
    output = model.trainable(lambda *args: model.velocity(dit, *args))(x, sigma, context, pooled)
    torch.testing.assert_close(output, model.velocity(dit, x, sigma, context, pooled).detach())
    output.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dit.parameters())
    dit.zero_grad()


def test_text_encoder_is_contextual():
    torch.manual_seed(0)
    text_encoder = model.build_text_encoder(**model.TEXT_ENCODER)
    with torch.no_grad():
        red_circle, _ = model.encode_text(text_encoder, model.tokens(["a red circle left of a blue square"]))
        red_square, _ = model.encode_text(text_encoder, model.tokens(["a red square left of a blue square"]))
    assert not torch.allclose(red_circle[0, 1], red_square[0, 1])  # "red" depends on the noun it binds to


def test_vae_loads_as_a_comfyui_vae():
    import comfy.sd

    torch.manual_seed(0)
    vae = model.build_vae(**model.VAE)
    comfy_vae = comfy.sd.VAE(sd=vae.state_dict(), config={"params": model.VAE})
    comfy_vae.latent_channels, comfy_vae.downscale_ratio, comfy_vae.upscale_ratio = 8, 4, 4
    images = torch.rand(2, 64, 64, 3)
    latents = comfy_vae.encode(images)
    assert latents.shape == (2, 8, 16, 16)
    with torch.no_grad():
        ours = model.encode_images(vae, images.permute(0, 3, 1, 2) * 2 - 1)
        torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)
        decoded = comfy_vae.decode(latents)
        expected = (model.decode_latents(vae, ours).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(decoded, expected.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- training

def train_args(tmp, *extra):
    return ["--steps", "2", "--batch", "4", "--priority", "normal", "--threads", "1", "--statistics-scenes", "16",
            "--evaluation-scenes", "2", "--log-every", "1", "--work", str(tmp / "work"), "--out", str(tmp / "out"),
            *extra]


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """VAE and text encoder after two steps each (what the DiT stages load)."""
    tmp = tmp_path_factory.mktemp("train")
    for stage in ("vae", "text"):
        train.main(train_args(tmp, "--stage", stage))
    return tmp


def test_vae_and_text_stages_write_weights_with_latent_statistics(trained):
    vae, metadata = weights.load("vae", trained / "out")
    assert np.array(json.loads(metadata["latent_rgb_factors"])).shape == (8, 3)
    assert float(metadata["latent_scale"]) > 0 and metadata["steps"] == "2"
    text_encoder, _ = weights.load("text_encoder", trained / "out")
    assert model.encode_text(text_encoder, model.tokens([""]))[0].shape == (1, scenes.MAX_TOKENS, model.TEXT_WIDTH)
    log = [json.loads(line) for line in (trained / "work" / "train.log").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [("vae", 1), ("vae", 2), ("text", 1), ("text", 2)]
    assert all(np.isfinite(r["loss"]) for r in log)


@pytest.mark.parametrize("stage", ["dit", "weak"])
def test_dit_stages_train_on_the_frozen_vae_and_text_encoder(trained, stage, capsys):
    train.main(train_args(trained, "--stage", stage))
    result = last_json(capsys)["results"][stage]
    assert np.isfinite(result["loss"])
    dit, _ = weights.load(stage, trained / "out")
    assert dit.params.hidden_size == (model.MAIN_DIT if stage == "dit" else model.WEAK_DIT)["hidden_size"]
    world = sample.LatentWorld(trained / "out", weak=stage == "weak")
    images = world.sample(["a red circle on the left", "a blue cross above a mirror"], cfg=4.0, steps=2)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_dit_stage_needs_the_vae_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the vae stage first"):
        train.main(train_args(tmp_path, "--stage", "dit"))


def test_classifier_stage_reports_accuracy_per_attribute(tmp_path, capsys):
    train.main(train_args(tmp_path, "--stage", "classifier"))
    result = last_json(capsys)["results"]["classifier"]
    assert set(result["accuracy"]) == set(model.CLASSIFIER_LABELS)
    classifier, metadata = weights.load("classifier", tmp_path / "out")
    assert json.loads(metadata["labels"])["texture"] == list(scenes.TEXTURES)


def test_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    def ema_after(directory, *extra):
        train.main(train_args(directory, "--stage", "classifier", "--steps", "4", *extra))
        return weights.load("classifier", directory / "out")[0].state_dict()

    uninterrupted = ema_after(tmp_path / "a")
    ema_after(tmp_path / "b", "--stop-at", "2")
    resumed = ema_after(tmp_path / "b")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different configuration or schedule"):
        train.main(train_args(tmp_path / "b", "--stage", "classifier", "--steps", "5"))


def test_time_limit_stops_a_stage_and_the_same_command_resumes(tmp_path, capsys):
    command = train_args(tmp_path, "--stage", "classifier", "--steps", "3")
    train.main([*command, "--time-limit", "0"])
    stopped = last_json(capsys)
    assert not stopped["complete"] and stopped["results"]["classifier"]["step"] == 1
    assert weights.load("classifier", tmp_path / "out")[1]["steps"] == "1"  # interim weights exported
    train.main(command)
    finished = last_json(capsys)
    assert finished["complete"] and finished["results"]["classifier"]["step"] == 3


def test_training_batches_depend_only_on_seed_stage_and_step():
    batches = train.StepBatches(0, "dit", 6, train.DATA_MIX)
    first, again = batches[7], batches[7]
    assert torch.equal(first["images"], again["images"]) and torch.equal(first["tokens"], again["tokens"])
    assert not torch.equal(first["images"], batches[8]["images"])
    assert not torch.equal(first["tokens"], first["negative_tokens"])
    partial = train.caption_batch(np.random.default_rng(0), 32, {"partial": 1.0})
    for prompt, spec in zip(partial[1], partial[3]):
        named = scenes.parse_prompt(f"{prompt} on the floor")["objects"][0]
        assert named in spec["objects"]
