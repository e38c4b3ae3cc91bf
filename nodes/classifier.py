"""The CLASSIFIER type in ComfyUI (``GUIDANCE_KIT_CLASSIFIER``) and its loader nodes.

A CLASSIFIER is a ``samplers.classifier.Classifier``: a network over pixels with per-head class
names, read by GFCG (no gradients) and PPAP (gradients).  Sources: classifier bundles in
``models/classifiers/`` plus the toy world's shipped classifier, and zero-shot CLIP from the
user's own CLIP_VISION and CLIP.  ``pixel_reader`` turns a model's clean estimate (a latent in the
model's space) into the ``[-1, 1]`` pixels the classifier reads, by the classifier's pixel source.
"""
import torch

import comfy.model_management
from comfy_api.latest import io

from ..samplers.bundles import fingerprint
from ..samplers.classifier import (
    CLIP_MEAN,
    CLIP_STD,
    PIXEL_SOURCES,
    Classifier,
    ZeroShotNetwork,
    latent_rgb_decoder,
    load_classifier,
    parse_class_lines,
    toy_classifier,
)
from .contract import model_files

CATEGORY = "Guidance Kit/classifier"
FOLDER = "classifiers"
TOY_CHOICE = model_files.TOY_CLASSIFIER

ClassifierType = io.Custom("GUIDANCE_KIT_CLASSIFIER")

PIXEL_SOURCE_TOOLTIP = ("How a latent model's clean estimate becomes pixels for the classifier. auto: the latent "
                        "itself for a pixel-space model (the toy world), else latent_rgb. latent_rgb: the latent "
                        "format's preview RGB factors (a linear map, almost free, approximate colours). vae: a full "
                        "decode with the VAE input (exact, costs a decode per classified evaluation).")


def pixel_source_inputs() -> list:
    return [io.Combo.Input("pixel_source", options=list(PIXEL_SOURCES), default="auto", tooltip=PIXEL_SOURCE_TOOLTIP),
            io.Vae.Input("vae", optional=True, tooltip="The VAE for pixel_source 'vae'.")]


def with_pixel_source(classifier: Classifier, pixel_source: str, vae, where: str) -> Classifier:
    if pixel_source == "vae" and vae is None:
        raise ValueError(f"{where}: pixel_source 'vae' needs the 'vae' input connected")
    return classifier.with_pixel_source(pixel_source, vae if pixel_source == "vae" else None)


def _is_identity_rgb(latent_format) -> bool:
    factors = latent_format.latent_rgb_factors
    return (latent_format.latent_channels == 3 and factors is not None
            and torch.equal(torch.tensor(factors, dtype=torch.float32), torch.eye(3))
            and not latent_format.latent_rgb_factors_bias)


def pixel_reader(classifier: Classifier, model, where: str):
    """latent (model space, [B, C, H, W]) -> pixels [B, 3, H', W'] in [-1, 1], by ``classifier.pixel_source``
    for ``model``'s latent format; ValueError naming ``where`` when that format has no such path."""
    latent_format = model.get_model_object("latent_format")
    if latent_format.latent_dimensions != 2:
        raise ValueError(f"{where}: the classifier reads images; this model's latents are not 2-D images")
    source = classifier.pixel_source
    if source == "auto":
        if _is_identity_rgb(latent_format):
            return lambda latent: latent.clamp(-1, 1)
        source = "latent_rgb"
    if source == "latent_rgb":
        if latent_format.latent_rgb_factors is None or latent_format.latent_rgb_factors_reshape is not None:
            raise ValueError(f"{where}: this model's latent format has no RGB preview factors; "
                             f"use pixel_source 'vae' on the classifier")
        return latent_rgb_decoder(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias)
    vae = classifier.vae

    def decode(latent):
        images = vae.decode(latent_format.process_out(latent).to(vae.vae_dtype))
        return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1)[:, :3].to(latent.device).float() * 2 - 1
    return decode


class LoadClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLoadClassifier",
            display_name="Load Classifier (Guidance Kit)",
            category=CATEGORY,
            description="An image classifier for classifier-based guidance (GFCG, PPAP): a Guidance Kit classifier "
                        "bundle from models/classifiers/, or the toy world's shipped colour/shape/position "
                        "classifier. Keys, shapes and class names are checked on loading.",
            inputs=[io.Combo.Input("classifier", options=model_files.choices(FOLDER),
                                   tooltip="Classifier file (models/classifiers/*.safetensors, format "
                                           "guidance_kit.classifier/1), or the toy world's."),
                    *pixel_source_inputs()],
            outputs=[ClassifierType.Output(display_name="classifier")],
        )

    @classmethod
    def execute(cls, classifier, pixel_source, vae=None) -> io.NodeOutput:
        where = f"Load Classifier 'classifier' ({classifier})"
        path = model_files.resolve(FOLDER, classifier, "Load Classifier", "classifier")
        loaded = toy_classifier(path, where) if classifier == TOY_CHOICE else load_classifier(path, where)
        return io.NodeOutput(with_pixel_source(loaded, pixel_source, vae, "Load Classifier"))


class ClipVisionEmbedder(torch.nn.Module):
    """CLIP_VISION's projected image embedding of normalised pixels (loads the model to its device)."""

    def __init__(self, clip_vision):
        super().__init__()
        self.clip_vision = clip_vision
        self.vision = clip_vision.model

    def forward(self, pixels):
        comfy.model_management.load_model_gpu(self.clip_vision.patcher)
        hooks = []
        if torch.is_grad_enabled():  # ComfyUI's CLIPLayer adds residuals in place into the tensor its LayerNorms
            # saved for backward; each LayerNorm reads a copy instead, so gradients flow (PPAP)
            hooks = [module.register_forward_pre_hook(lambda _, args: (args[0].clone(), *args[1:]))
                     for name, module in self.vision.named_modules() if name.endswith(("layer_norm1", "layer_norm2"))]
        try:
            return self.vision(pixel_values=pixels.to(self.clip_vision.load_device).float(), intermediate_output=-2)[2]
        finally:
            for hook in hooks:
                hook.remove()


def encode_class_prompts(clip, prompts: list[str]) -> torch.Tensor:
    """Pooled (projected) text embeddings [len(prompts), D] from a ComfyUI CLIP."""
    return torch.cat([clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)[1].float()
                      for prompt in prompts])


class ClipZeroShotClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitClipZeroShotClassifier",
            display_name="CLIP Zero-Shot Classifier (Guidance Kit)",
            category=CATEGORY,
            description="A classifier from the CLIP you already have: each class is a text prompt, the logit is "
                        "100 x cosine(image embedding, text embedding) (CLIP zero-shot). Class prompts are "
                        "encoded once, here.",
            inputs=[io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model (image encoder)."),
                    io.Clip.Input("clip", tooltip="A CLIP text encoder whose pooled output shares the vision "
                                                  "model's embedding space (the CLIP-L/G paired with it)."),
                    io.String.Input("classes", multiline=True, default="colour: red, orange, blue, cyan",
                                    tooltip="One head per line: 'head: class, class=prompt phrase, ...'. The phrase "
                                            "(default the class name) fills the template and is what GFCG puts "
                                            "into your prompt for a reference class."),
                    io.String.Input("template", default="a photo of a {}",
                                    tooltip="Text prompt per class; {} is replaced by the class phrase."),
                    *pixel_source_inputs()],
            outputs=[ClassifierType.Output(display_name="classifier")],
        )

    @classmethod
    def execute(cls, clip_vision, clip, classes, template, pixel_source, vae=None) -> io.NodeOutput:
        where = "CLIP Zero-Shot Classifier"
        if "{}" not in template:
            raise ValueError(f"{where} 'template': put {{}} where the class phrase goes (got {template!r})")
        names, phrases = parse_class_lines(classes, f"{where} 'classes'")
        with torch.inference_mode(False), torch.no_grad():
            texts = {head: encode_class_prompts(clip, [template.format(p) for p in phrases[head]]) for head in names}
        embedder = ClipVisionEmbedder(clip_vision)
        size = clip_vision.image_size
        with torch.no_grad():
            width = embedder(torch.zeros(1, 3, size, size)).shape[-1]
        if any(text.shape[-1] != width for text in texts.values()):
            raise ValueError(f"{where} 'clip': its pooled text embedding has {next(iter(texts.values())).shape[-1]} "
                             f"dimensions, the CLIP vision embedding {width}: not a matching pair")
        network = ZeroShotNetwork(embedder, texts)
        identity = fingerprint({**{f"vision.{key}": value for key, value in clip_vision.model.state_dict().items()},
                                **{f"text.{head}": text for head, text in texts.items()}}, "clip_zero_shot")
        classifier = Classifier(network, names, (size, size), tuple(clip_vision.image_mean or CLIP_MEAN),
                                tuple(clip_vision.image_std or CLIP_STD), identity, "clip_zero_shot",
                                {head: phrases[head] for head in names})
        return io.NodeOutput(with_pixel_source(classifier, pixel_source, vae, where))


NODES = [LoadClassifier, ClipZeroShotClassifier]
