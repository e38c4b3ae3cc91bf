"""Toy world v2 as real ComfyUI objects (nodes/toyworld_v2.py), on an untrained world written at test time:
the Flux MODEL, the T5 CLIP and the AutoencoderKL VAE give what the world's own pure-torch paths give."""

import json

import numpy as np
import pytest
import torch

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_sampling
import nodes

from harness.executor import run_node
from harness.sampling import ksample
from toyworld.v2 import model, sample, scenes, train, weights

PROMPT = "a large red striped circle on the left"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory, comfy_dir):
    """An untrained v2 world: random weights (adaLN-Zero perturbed so every block matters), the VAE's latent
    statistics measured as the VAE stage exports them."""
    directory = tmp_path_factory.mktemp("toyworld_v2")
    torch.manual_seed(0)
    vae = model.build_vae(**model.VAE)
    statistics = train.latent_statistics(vae, 0, "cpu", 32)
    weights.save_module(directory / weights.FILES["vae"], weights.PREFIXES["vae"], "vae", model.VAE, vae,
                        {key: json.dumps(value) for key, value in statistics.items()})
    text_encoder = model.build_text_encoder(**model.TEXT_ENCODER)
    weights.save_module(directory / weights.FILES["text_encoder"], weights.PREFIXES["text_encoder"],
                        "text_encoder", model.TEXT_ENCODER, text_encoder)
    dit = model.build_dit(**model.WEAK_DIT)
    for parameter in dit.parameters():
        parameter.data.normal_(0, 0.05)
    weights.save_module(directory / weights.FILES["dit"], weights.PREFIXES["dit"], "dit", model.WEAK_DIT, dit)
    return directory


@pytest.fixture
def shipped(world_dir, monkeypatch):
    """The loader's shipped files pointed at ``world_dir``."""
    from guidance_kit.nodes import toyworld_v2
    from guidance_kit.nodes.contract import model_files

    monkeypatch.setitem(model_files.SHIPPED, "toyworld_v2",
                        {model_files.TOY_V2_DIT: world_dir / weights.FILES["dit"],
                         model_files.TOY_V2_DIT_WEAK: world_dir / weights.FILES["weak"]})
    monkeypatch.setattr(toyworld_v2, "weight_directory", lambda: world_dir)
    return model_files.SHIPPED["toyworld_v2"]


@pytest.fixture
def loaded(shipped):
    from guidance_kit.nodes.contract import model_files
    from guidance_kit.nodes.toyworld_v2 import ToyWorldV2Loader

    return run_node(ToyWorldV2Loader, model_files.TOY_V2_DIT)


def empty_latent(batch):
    from guidance_kit.nodes.toyworld_v2 import ToyWorldV2EmptyLatent

    return run_node(ToyWorldV2EmptyLatent, batch)[0]


def encode(clip, text):
    return run_node(nodes.CLIPTextEncode, clip, text)[0]


def test_the_model_is_comfyuis_flux_with_the_training_parametrisation(loaded, world_dir):
    patcher = loaded[0]
    assert isinstance(patcher.model, comfy.model_base.Flux)
    assert isinstance(patcher.model.diffusion_model, comfy.ldm.flux.model.Flux)
    sampling = patcher.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
    assert isinstance(sampling, comfy.model_sampling.CONST)
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(sampling.sigma(t), t)  # sigma = t, as the DiT was trained
    latent_format = patcher.get_model_object("latent_format")
    metadata = weights.load("vae", world_dir)[1]
    assert latent_format.latent_channels == 8
    assert latent_format.scale_factor == float(metadata["latent_scale"])
    assert latent_format.latent_rgb_factors == json.loads(metadata["latent_rgb_factors"])
    assert empty_latent(2)["samples"].shape == (2, 8, 16, 16)


def test_clip_text_encode_gives_the_world_encoders_outputs(loaded, world_dir):
    clip = loaded[1]
    text_encoder = weights.load("text_encoder", world_dir)[0]
    with torch.no_grad():
        context, pooled = model.encode_text(text_encoder, model.tokens([PROMPT]))
    conditioning = encode(clip, PROMPT)
    assert torch.equal(conditioning[0][0], context)
    assert torch.equal(conditioning[0][1]["pooled_output"], pooled)
    tokens = clip.tokenize(PROMPT)["t5"][0]
    assert [token for token, _ in tokens] == scenes.tokenize(PROMPT)


def test_prompt_weights_scale_a_token_against_the_empty_prompt(loaded):
    clip = loaded[1]
    plain, weighted, empty = (encode(clip, text)[0][0] for text in ("a red circle", "a (red:1.5) circle", ""))
    assert torch.equal(weighted[:, 0], plain[:, 0]) and torch.equal(weighted[:, 2:], plain[:, 2:])
    torch.testing.assert_close(weighted[:, 1], (plain[:, 1] - empty[:, 1]) * 1.5 + empty[:, 1])


def test_ksampler_reproduces_the_worlds_own_sampler(loaded, world_dir):
    """KSampler (euler, simple, cfg 4) with the empty prompt as negative equals toyworld.v2.sample's loop
    (Euler on linspace(1, 0) in the DiT's velocity, the same noise) up to float rounding."""
    patcher, clip, vae = loaded
    latent = ksample(patcher, encode(clip, PROMPT), encode(clip, ""), empty_latent(2), cfg=4.0, steps=4,
                     scheduler="simple", seed=3)
    images = run_node(nodes.VAEDecode, vae, {"samples": latent})[0]
    ours = sample.LatentWorld(world_dir).sample([PROMPT] * 2, cfg=4.0, steps=4, seed=3)
    difference = np.abs(images.numpy() * 255 - ours.astype(np.float32))
    assert difference.max() <= 1.0, difference.max()
    assert images.std() > 0.01  # a non-trivial image, so the comparison means something


def test_vae_nodes_encode_decode_and_tile(loaded, world_dir):
    vae = loaded[2]
    images = torch.rand(1, 64, 64, 3)
    latent = run_node(nodes.VAEEncode, vae, images)[0]
    assert latent["samples"].shape == (1, 8, 16, 16)
    autoencoder = weights.load("vae", world_dir)[0]
    with torch.no_grad():
        expected = model.encode_images(autoencoder, images.permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    decoded = run_node(nodes.VAEDecode, vae, latent)[0]
    with torch.no_grad():
        expected = (model.decode_latents(autoencoder, latent["samples"]).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(decoded, expected.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    large = {"samples": torch.randn(1, 8, 32, 32)}  # 128x128 pixels: several 64-pixel tiles
    tiled = run_node(nodes.VAEDecodeTiled, vae, large, 64, 16, 64, 8)[0]
    assert tiled.shape == (1, 128, 128, 3) and bool(torch.isfinite(tiled).all())


def test_latent_previews_use_the_fitted_rgb_factors(loaded):
    import latent_preview

    latent_format = loaded[0].get_model_object("latent_format")
    previewer = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors,
                                                   latent_format.latent_rgb_factors_bias)
    image = previewer.decode_latent_to_preview(torch.randn(1, 8, 16, 16))
    assert image.size == (16, 16)


def test_flux_block_replacements_run_through_the_model(loaded):
    patcher, clip = loaded[:2]
    positive, negative = encode(clip, PROMPT), encode(clip, "")
    reference = ksample(patcher, positive, negative, empty_latent(1), cfg=4.0, steps=2, scheduler="simple")
    calls = []

    def passthrough(args, extra):
        calls.append(args["img"].shape[0])
        return extra["original_block"](args)

    patched = patcher.clone()
    patched.set_model_patch_replace(passthrough, "dit", "double_block", 0)
    patched.set_model_patch_replace(passthrough, "dit", "single_block", 2)
    assert torch.equal(ksample(patched, positive, negative, empty_latent(1), cfg=4.0, steps=2, scheduler="simple"),
                       reference)
    assert calls == [2, 2] * 2  # cond and uncond in one batch, two blocks, two steps


def test_loader_errors_name_the_node_and_the_file(shipped, world_dir, monkeypatch):
    from guidance_kit.nodes.contract import model_files
    from guidance_kit.nodes.toyworld_v2 import ToyWorldV2Loader
    from toyworld import weights as v1_weights

    with pytest.raises(ValueError, match=r"^Load Toy World v2: .*dit_weak.safetensors does not exist: toy world v2 "
                                         r"is not trained yet"):
        run_node(ToyWorldV2Loader, model_files.TOY_V2_DIT_WEAK)
    monkeypatch.setitem(shipped, model_files.TOY_V2_DIT_WEAK, v1_weights.MAIN_WEIGHTS)
    with pytest.raises(ValueError, match=r"^Load Toy World v2: .*toy_dit.safetensors is not a toy world v2 "
                                         r"diffusion model"):
        run_node(ToyWorldV2Loader, model_files.TOY_V2_DIT_WEAK)
    monkeypatch.setitem(shipped, model_files.TOY_V2_DIT_WEAK, world_dir / weights.FILES["vae"])
    with pytest.raises(ValueError, match=r"^Load Toy World v2: .*vae.safetensors "):
        run_node(ToyWorldV2Loader, model_files.TOY_V2_DIT_WEAK)


def test_shipped_names_point_at_the_training_exports():
    from guidance_kit.nodes.contract import model_files

    shipped = model_files.SHIPPED["toyworld_v2"]
    assert shipped[model_files.TOY_V2_DIT] == weights.WEIGHTS_DIR / weights.FILES["dit"]
    assert shipped[model_files.TOY_V2_DIT_WEAK] == weights.WEIGHTS_DIR / weights.FILES["weak"]
