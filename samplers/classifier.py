"""Image classifiers over pixels: the CLASSIFIER type that GFCG and PPAP read clean estimates with.

A ``Classifier`` wraps a network mapping normalised pixels ``[B, 3, H, W]`` to per-head logits
(``{head: [B, classes]}``) with what a consumer needs to use it on any model's samples: the class
names (and prompt phrases) of every head, the input size, the normalisation, a weight fingerprint
and how a latent model's clean estimate becomes pixels.  Callers always hand it images in
``[-1, 1]`` at any size (the pixel-space convention of ComfyUI's VAE decode scaled by 2x-1); the
classifier resizes and normalises them itself.  It is plain autograd-capable torch: PPAP takes
gradients through ``logits``, GFCG calls ``probabilities`` under ``torch.no_grad``.

Sources:

* a pack classifier bundle (``CLASSIFIER_FORMAT``, written with ``samplers.bundles``): the network
  weights plus metadata ``architecture`` (a key of ``ARCHITECTURES``), ``config`` (its
  constructor arguments), ``heads`` (``{head: [class names]}`` in logit order), optional
  ``phrases`` (``{head: [prompt phrase per class]}``), ``input_size`` ``[H, W]``, ``mean`` and
  ``std`` (per channel, applied to pixels in ``[0, 1]``);
* the toy world's shipped ``toy_classifier.safetensors`` (``toy_classifier``): its own format
  (prefix ``classifier.``, metadata ``config``), read through the same checks, class names and
  phrases from ``toyworld.scenes``;
* zero-shot CLIP (``ZeroShotNetwork``): any image encoder to a joint embedding, scored by cosine
  similarity against per-head text embeddings of class prompts (the ComfyUI adapter builds it
  from CLIP_VISION and CLIP).
"""
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes

from ..toyworld import scenes
from ..toyworld.model import ToyClassifier
from .bundles import BundleError, _header_metadata, check_shapes, fingerprint, load_bundle, save_bundle

CLASSIFIER_FORMAT = "guidance_kit.classifier/1"
ARCHITECTURES: dict[str, type[torch.nn.Module]] = {"toyworld.ToyClassifier": ToyClassifier}
PIXEL_SOURCES = ("auto", "latent_rgb", "vae")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOY_PREFIX = "classifier."


@dataclass(frozen=True, eq=False)
class Classifier:
    """A network over normalised pixels with per-head class names.

    ``pixel_source`` says how a latent model's clean estimate becomes pixels: ``auto`` (the
    latent itself for a pixel-space model, else ``latent_rgb``), ``latent_rgb`` (the latent
    format's linear RGB factors, upsampled: cheap, approximate) or ``vae`` (a full VAE decode of
    ``vae``, an opaque decoder object the ComfyUI adapter resolves)."""

    network: torch.nn.Module
    heads: dict[str, tuple[str, ...]]
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    fingerprint: str = ""
    label: str = ""
    phrases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pixel_source: str = "auto"
    vae: object = None

    def __post_init__(self):
        if not self.heads or any(len(names) < 2 for names in self.heads.values()):
            raise ValueError(f"classifier {self.label!r}: every head needs at least two classes ({self.heads})")
        for head, names in self.phrases.items():
            if head not in self.heads or len(names) != len(self.heads[head]):
                raise ValueError(f"classifier {self.label!r}: phrases of {head!r} do not match its classes")
        if self.pixel_source not in PIXEL_SOURCES:
            raise ValueError(f"classifier {self.label!r}: pixel source {self.pixel_source!r} not in {PIXEL_SOURCES}")

    def with_pixel_source(self, pixel_source: str, vae=None) -> "Classifier":
        """The same classifier reading latents through ``pixel_source`` (see the class docstring)."""
        return replace(self, pixel_source=pixel_source, vae=vae)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> the network's input: resized (bilinear, antialiased) and normalised."""
        parameter = next(self.network.parameters(), None)
        if parameter is not None:
            images = images.to(device=parameter.device)
        if tuple(images.shape[-2:]) != tuple(self.input_size):  # in float: no antialiased half resize on CPU
            images = F.interpolate(images.float(), size=tuple(self.input_size), mode="bilinear", antialias=True,
                                   align_corners=False)
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        normalised = ((images + 1) / 2 - mean) / std
        return normalised if parameter is None else normalised.to(parameter.dtype)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head logits {head: [B, classes]} of images [B, 3, H, W] in [-1, 1] (differentiable)."""
        out = self.network(self.prepare(images))
        return {head: out[head].float() for head in self.heads}

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head class probabilities {head: [B, classes]} of images in [-1, 1]."""
        return {head: logits.softmax(dim=-1) for head, logits in self.logits(images).items()}

    def class_index(self, head: str, name: str, where: str) -> int:
        """Index of class ``name`` (or its phrase) in ``head``; ValueError naming ``where`` otherwise."""
        if head not in self.heads:
            raise ValueError(f"{where}: classifier {self.label!r} has no head {head!r} "
                             f"(heads: {', '.join(self.heads)})")
        for names in (self.heads[head], self.phrases.get(head, ())):
            if name in names:
                return names.index(name)
        raise ValueError(f"{where}: {name!r} is not a class of head {head!r} ({', '.join(self.heads[head])})")

    def phrase(self, head: str, index: int) -> str:
        """The prompt phrase of class ``index`` of ``head`` (its name unless phrases were given)."""
        return (self.phrases.get(head) or self.heads[head])[index]


def _frozen(network: torch.nn.Module) -> torch.nn.Module:
    """Inference mode for the network (eval; parameters need no gradient, inputs still can)."""
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def _build(architecture: str, config: dict, state: dict[str, torch.Tensor], where: str, path) -> torch.nn.Module:
    if architecture not in ARCHITECTURES:
        raise BundleError(f"{where}: {path}: unknown classifier architecture {architecture!r} "
                          f"(known: {', '.join(ARCHITECTURES)})")
    try:
        network = ARCHITECTURES[architecture](**config)
    except TypeError as error:
        raise BundleError(f"{where}: {path}: config does not fit {architecture}: {error}") from None
    expected = network.state_dict()
    check_shapes(state, {key: tuple(value.shape) for key, value in expected.items()}, f"{where}: {path}")
    network.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()})
    return _frozen(network)


def _check_heads(heads: dict, network: torch.nn.Module, input_size, where: str, path) -> None:
    """Run one blank image through the network: its heads and class counts must be ``heads``'."""
    with torch.no_grad():
        out = network(torch.zeros(1, 3, *input_size))
    found = {head: tuple(out[head].shape[1:]) for head in out} if isinstance(out, dict) else {}
    wanted = {head: (len(names),) for head, names in heads.items()}
    if any(found.get(head) != shape for head, shape in wanted.items()):
        raise BundleError(f"{where}: {path}: network heads {found} do not match the class names {wanted}")


def load_classifier(path, where: str) -> Classifier:
    """A ``Classifier`` from a pack classifier bundle (``CLASSIFIER_FORMAT``), fully checked."""
    with torch.inference_mode(False):
        bundle = load_bundle(path, CLASSIFIER_FORMAT, where)
        meta = bundle.metadata
        missing = [key for key in ("architecture", "config", "heads", "input_size") if key not in meta]
        if missing:
            raise BundleError(f"{where}: {path}: metadata lacks {missing}")
        network = _build(meta["architecture"], meta["config"], bundle.tensors, where, path)
        heads = {head: tuple(names) for head, names in meta["heads"].items()}
        input_size = tuple(int(v) for v in meta["input_size"])
        _check_heads(heads, network, input_size, where, path)
        try:
            return Classifier(network, heads, input_size, tuple(meta.get("mean", (0.5,) * 3)),
                              tuple(meta.get("std", (0.5,) * 3)), fingerprint(bundle.tensors, Path(path).stem),
                              Path(path).stem, {head: tuple(p) for head, p in meta.get("phrases", {}).items()})
        except ValueError as error:
            raise BundleError(f"{where}: {path}: {error}") from None


def save_classifier(path, network: torch.nn.Module, architecture: str, heads: dict, *, input_size, phrases=None,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Path:
    """Write ``network`` (an ``ARCHITECTURES[architecture]`` with a ``config`` attribute) as a classifier bundle."""
    metadata = {"architecture": architecture, "config": network.config, "heads": heads,
                "input_size": list(input_size), "mean": list(mean), "std": list(std), "phrases": phrases or {}}
    return save_bundle(path, network.state_dict(), metadata, CLASSIFIER_FORMAT)


def toy_classifier(path, where: str) -> Classifier:
    """The toy world's ``toy_classifier.safetensors`` (its own weight format) as a ``Classifier``:
    keys and shapes checked against ``ToyClassifier``, heads colour/shape/position named from
    ``toyworld.scenes`` (position phrases such as "on the left"), images in [-1, 1] at 32x32."""
    with torch.inference_mode(False):
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise BundleError(f"{where}: cannot read {path}: {error.strerror or error}") from None
        try:
            config = json.loads(_header_metadata(data, where, path).get("config", "{}"))["classifier"]
            tensors = load_safetensors_bytes(data)
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"{where}: {path} is not a toy-world classifier file ({error})") from None
        state = {key[len(TOY_PREFIX):]: value for key, value in tensors.items() if key.startswith(TOY_PREFIX)}
        bad = [key for key, value in state.items() if not bool(torch.isfinite(value.float()).all())]
        if bad:
            raise BundleError(f"{where}: {path} holds non-finite values in {sorted(bad)}")
        network = _build("toyworld.ToyClassifier", config, state, where, path)
    heads = {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "position": scenes.POSITIONS}
    size = (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    _check_heads(heads, network, size, where, path)
    phrases = {"position": tuple(scenes.POSITION_PHRASE[p] for p in scenes.POSITIONS)}
    return Classifier(network, heads, size, fingerprint=fingerprint(state, "toy_classifier"), label="toy_classifier",
                      phrases=phrases)


class ZeroShotNetwork(torch.nn.Module):
    """Zero-shot classification (CLIP, Radford et al. 2021, Sec. 3.1.2): logits of head h are
    ``scale · cos(E_image(x), E_text(prompt_{h,k}))`` over its class prompts k.

    ``image_encoder``: normalised pixels [B, 3, H, W] -> image embeddings [B, D];
    ``text_embeddings``: {head: [classes, D]} (already encoded once); ``scale``: CLIP's logit scale (100)."""

    def __init__(self, image_encoder: Callable[[torch.Tensor], torch.Tensor], text_embeddings: dict[str, torch.Tensor],
                 scale: float = 100.0):
        super().__init__()
        self.image_encoder = image_encoder
        self.heads = list(text_embeddings)
        for index, head in enumerate(self.heads):
            self.register_buffer(f"text_{index}", F.normalize(text_embeddings[head].float(), dim=-1))
        self.scale = scale

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        image = F.normalize(self.image_encoder(pixels).float(), dim=-1)
        return {head: self.scale * image @ getattr(self, f"text_{index}").to(image.device).T
                for index, head in enumerate(self.heads)}


def parse_class_lines(text: str, where: str) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Class lists from text, one head per line: ``head: name, name=phrase, ...`` (``head:`` may be
    left out on a single line: head ``class``).  Returns (names, phrases) per head."""
    names, phrases = {}, {}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        head, _, rest = line.rpartition(":") if ":" in line else ("class", "", line)
        head = head.strip() or "class"
        entries = [entry.strip() for entry in rest.split(",") if entry.strip()]
        pairs = [(entry.partition("=")[0].strip(), (entry.partition("=")[2] or entry.partition("=")[0]).strip())
                 for entry in entries]
        if head in names:
            raise ValueError(f"{where}: head {head!r} is listed twice")
        if len(pairs) < 2 or len({name for name, _ in pairs}) != len(pairs):
            raise ValueError(f"{where}: head {head!r} needs at least two distinct classes (got {rest.strip()!r})")
        names[head] = tuple(name for name, _ in pairs)
        phrases[head] = tuple(phrase for _, phrase in pairs)
    if not names:
        raise ValueError(f"{where}: no classes given (one head per line: 'colour: red, orange, blue')")
    return names, phrases


def latent_rgb_decoder(factors, bias=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cheap latent -> pixels: the latent format's linear RGB factors ([channels, 3], applied to the
    model-space latent as ComfyUI's previews do) plus bias, clamped to [-1, 1], at latent resolution
    (``Classifier.prepare`` resizes).  Differentiable, also when made under ``torch.inference_mode``."""
    with torch.inference_mode(False):
        matrix = torch.tensor(factors, dtype=torch.float32)
        offset = torch.zeros(3) if bias is None else torch.tensor(bias, dtype=torch.float32)

    def decode(latent: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("bchw,cr->brhw", latent.float(), matrix.to(latent.device))
        return (rgb + offset.to(latent.device).view(1, 3, 1, 1)).clamp(-1, 1)
    return decode
