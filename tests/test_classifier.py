"""The CLASSIFIER type: toy-file adapter, classifier bundles, zero-shot CLIP, pixels from latents."""

import numpy as np
import pytest
import torch

from guidance_kit.samplers.bundles import BundleError, save_bundle
from guidance_kit.samplers.classifier import (
    CLASSIFIER_FORMAT,
    Classifier,
    ZeroShotNetwork,
    load_classifier,
    parse_class_lines,
    save_classifier,
)
from guidance_kit.toyworld import scenes, weights
from harness import tiny_models
from harness.executor import run_node

WHERE = "test"


@pytest.fixture(scope="module")
def net(toy):
    """The toy world's classifier as Load Classifier gives it (loaded in the executor's inference mode)."""
    return toy.classifier


def rendered(count, seed=0):
    rng = np.random.default_rng(seed)
    scene_list = [scenes.sample_scene(rng, "single") for _ in range(count)]
    images = torch.tensor(np.stack([s.image for s in scene_list])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.spec["objects"][0] for s in scene_list]


def test_toy_classifier_names_every_head_and_classifies_clean_scenes(net):
    assert net.heads == {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "position": scenes.POSITIONS}
    assert net.phrase("position", net.class_index("position", "left", WHERE)) == "on the left"
    assert net.class_index("position", "on the left", WHERE) == scenes.POSITIONS.index("left")
    images, objects = rendered(48)
    with torch.no_grad():
        probabilities = net.probabilities(images)
    for head, names in net.heads.items():
        truth = torch.tensor([names.index(obj[head]) for obj in objects])
        assert (probabilities[head].argmax(-1) == truth).float().mean() > 0.95, head
        assert torch.allclose(probabilities[head].sum(-1), torch.ones(len(objects)))


def test_classifier_resizes_any_input_and_is_differentiable_under_inference_mode_off(net):
    images, _ = rendered(2)
    large = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest").requires_grad_(True)
    logits = net.logits(large)
    assert logits["colour"].shape == (2, len(scenes.COLOURS))
    logits["colour"][:, 0].sum().backward()
    assert large.grad is not None and large.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in net.network.parameters())


def test_unknown_head_or_class_names_the_caller(net):
    with pytest.raises(ValueError, match="GFCG Guider.*no head 'texture'"):
        net.class_index("texture", "red", "GFCG Guider")
    with pytest.raises(ValueError, match="'magenta' is not a class of head 'colour'"):
        net.class_index("colour", "magenta", WHERE)


def test_bundle_round_trip_keeps_logits_names_and_fingerprint(net, tmp_path):
    path = save_classifier(tmp_path / "toy.safetensors", net.network, "toyworld.ToyClassifier",
                           {h: list(n) for h, n in net.heads.items()}, input_size=(32, 32),
                           phrases={"position": list(net.phrases["position"])})
    loaded = load_classifier(path, WHERE)
    images, _ = rendered(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(images)["shape"], net.logits(images)["shape"], atol=1e-6)
    assert loaded.heads == net.heads and loaded.phrases == net.phrases
    assert loaded.fingerprint == load_classifier(path, WHERE).fingerprint != net.fingerprint


def test_bundle_checks_keys_shapes_and_class_counts(net, tmp_path):
    state = dict(net.network.state_dict())
    meta = {"architecture": "toyworld.ToyClassifier", "config": net.network.config, "input_size": [32, 32],
            "heads": {h: list(n) for h, n in net.heads.items()}}
    broken = {k: v for k, v in state.items() if k != "heads.shape.bias"}
    save_bundle(tmp_path / "missing.safetensors", broken, meta, CLASSIFIER_FORMAT)
    with pytest.raises(BundleError, match="Load Classifier.*missing heads.shape.bias"):
        load_classifier(tmp_path / "missing.safetensors", "Load Classifier")
    wrong_names = {**meta, "heads": {**meta["heads"], "colour": ["red", "blue"]}}
    save_bundle(tmp_path / "names.safetensors", state, wrong_names, CLASSIFIER_FORMAT)
    with pytest.raises(BundleError, match="do not match the class names"):
        load_classifier(tmp_path / "names.safetensors", WHERE)
    save_bundle(tmp_path / "arch.safetensors", state, {**meta, "architecture": "resnet"}, CLASSIFIER_FORMAT)
    with pytest.raises(BundleError, match="unknown classifier architecture 'resnet'"):
        load_classifier(tmp_path / "arch.safetensors", WHERE)
    with pytest.raises(BundleError, match="is not a guidance_kit.classifier/1 file"):
        load_classifier(weights.CLASSIFIER_WEIGHTS, WHERE)


def test_parse_class_lines():
    names, phrases = parse_class_lines("colour: red, light blue=pale blue\nshape: circle, square", WHERE)
    assert names == {"colour": ("red", "light blue"), "shape": ("circle", "square")}
    assert phrases["colour"] == ("red", "pale blue")
    assert parse_class_lines("cat, dog", WHERE)[0] == {"class": ("cat", "dog")}
    with pytest.raises(ValueError, match="at least two distinct"):
        parse_class_lines("colour: red", WHERE)


def test_zero_shot_network_is_scaled_cosine_similarity():
    encoder = torch.nn.Flatten()
    texts = {"class": torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])}
    network = ZeroShotNetwork(encoder, texts)
    logits = network(torch.tensor([[3.0, 4.0, 0.0]]).view(1, 3, 1, 1))["class"]
    assert torch.allclose(logits, torch.tensor([[60.0, 80.0]]))


@pytest.fixture(scope="module")
def tiny_clip_vision():
    return tiny_models.tiny_clip_vision(128)


def test_clip_zero_shot_matches_comfyui_encode_image(tiny_clip_vision):
    from guidance_kit.nodes.classifier import ClipZeroShotClassifier, encode_class_prompts
    from guidance_kit.nodes.toyworld import load_clip

    clip = load_clip(weights.MAIN_WEIGHTS)
    classifier = run_node(ClipZeroShotClassifier, tiny_clip_vision, clip, "colour: red, blue=deep blue\nshape: circle, "
                                                "square, triangle", "a {} circle", "auto")[0]
    assert classifier.heads == {"colour": ("red", "blue"), "shape": ("circle", "square", "triangle")}
    assert classifier.phrase("colour", 1) == "deep blue"
    pixels = torch.randint(0, 256, (2, 32, 32, 3)).float() / 255  # exact 8-bit values: ComfyUI's quantising is a no-op
    with torch.no_grad():
        logits = classifier.logits(pixels.movedim(-1, 1) * 2 - 1)
    image = torch.nn.functional.normalize(tiny_clip_vision.encode_image(pixels)["image_embeds"], dim=-1)
    text = torch.nn.functional.normalize(encode_class_prompts(clip, ["a red circle", "a deep blue circle"]), dim=-1)
    assert torch.allclose(logits["colour"], 100 * image @ text.T, atol=2e-2)
    assert logits["shape"].shape == (2, 3)


def test_clip_zero_shot_is_differentiable_through_comfyui_clip_vision(tiny_clip_vision):
    """PPAP backpropagates through the classifier: ComfyUI's CLIPLayer adds its residuals in place."""
    from guidance_kit.nodes.classifier import ClipZeroShotClassifier
    from guidance_kit.nodes.toyworld import load_clip
    from guidance_kit.samplers.ppap import student_network

    classifier = run_node(ClipZeroShotClassifier, tiny_clip_vision, load_clip(weights.MAIN_WEIGHTS), "red, blue",
                          "a {} circle", "auto")[0]
    with torch.inference_mode(False), torch.enable_grad():
        student = student_network(classifier, rank=2, alpha=2.0)  # what PPAP trains and guides with
        pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
        student(classifier.prepare(pixels * 2 - 1))["class"][:, 0].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()
    adapters = [parameter for name, parameter in student.named_parameters() if name.endswith("up.weight")]
    assert adapters and all(parameter.dtype == torch.float32 and parameter.grad is not None for parameter in adapters)


def test_clip_zero_shot_rejects_a_mismatched_text_encoder(tiny_clip_vision):
    from guidance_kit.nodes.classifier import ClipZeroShotClassifier

    class WideClip:
        def tokenize(self, text):
            return text

        def encode_from_tokens(self, tokens, return_pooled=False):
            return None, torch.ones(1, 64)

    with pytest.raises(ValueError, match="CLIP Zero-Shot Classifier 'clip'.*64 dimensions.*128"):
        run_node(ClipZeroShotClassifier, tiny_clip_vision, WideClip(), "a, b", "{}", "auto")
    with pytest.raises(ValueError, match="'template'"):
        run_node(ClipZeroShotClassifier, tiny_clip_vision, WideClip(), "a, b", "no slot", "auto")


def test_pixel_reader_per_latent_format(net, tiny_eps):
    from guidance_kit.nodes.classifier import LoadClassifier, pixel_reader
    from guidance_kit.nodes.toyworld import load_model

    toy_model = load_model(weights.MAIN_WEIGHTS)
    latent = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(pixel_reader(net, toy_model, WHERE)(latent), latent)
    sd_latent = torch.randn(2, 4, 8, 8)
    rgb = pixel_reader(net, tiny_eps.patcher, WHERE)(sd_latent)
    factors = torch.tensor(tiny_eps.patcher.model.latent_format.latent_rgb_factors)
    assert rgb.shape == (2, 3, 8, 8)
    assert torch.allclose(rgb, torch.einsum("bchw,cr->brhw", sd_latent, factors).clamp(-1, 1))
    with pytest.raises(ValueError, match="Load Classifier: pixel_source 'vae' needs the 'vae' input"):
        run_node(LoadClassifier, "toy_classifier.safetensors (toy world)", "vae")
    loaded = run_node(LoadClassifier, "toy_classifier.safetensors (toy world)", "latent_rgb")[0]
    assert isinstance(loaded, Classifier) and loaded.pixel_source == "latent_rgb"
    assert loaded.fingerprint == net.fingerprint


def test_vae_pixel_source_decodes_through_the_vae(net):
    from guidance_kit.nodes.classifier import pixel_reader
    from guidance_kit.nodes.toyworld import load_model, pixel_space_vae

    toy_model = load_model(weights.MAIN_WEIGHTS)
    via_vae = net.with_pixel_source("vae", pixel_space_vae())
    latent = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(pixel_reader(via_vae, toy_model, WHERE)(latent), latent, atol=1e-5)
