"""PPAP: plug-and-play classifier guidance through noise-range experts (Go et al., "Towards Practical
Plug-and-Play Diffusion Models", CVPR 2023, arXiv 2212.05973; official code riiid/PPAP).

An off-the-shelf classifier ``f`` (trained on clean images) gives poor gradients on noisy inputs.
PPAP trains N *experts*, each ``f`` plus LoRA adapters (``samplers/lora.py``; Sec. 4.2), on the
noise range it will guide in (Sec. 4.1: the diffusion timesteps split evenly, ``[0, T/N]``,
``[T/N, 2T/N]``, ...; a boundary goes to the lower expert), *data-free* (Sec. 4.3): clean samples
``x0`` come from the diffusion model itself, the teacher is ``f`` on ``x0``, the student sees the
noised ``x_t`` of the same sample, and the loss is the distillation KL of Eq. 6,

    L = KL( softmax(f(x0) / τ) ‖ softmax(f_k(x_t)) ),   τ = 0.25,

summed over the classifier's heads here.  Experts train one after another, each starting from the
previous one's weights.  Guidance (Sec. 3, Eq. 3) uses the expert whose range holds the current
noise level, per sample, with gradient scale ``s``:

    ∇ log p(x_t | y) = ∇ log p(x_t) + s · ∇_x log softmax(f_k(x_t))_y.

Noise levels here are the diffusion model's own ``sigma`` (ComfyUI's), so eps, v and flow models
are all covered: the model's forward process is ``x = α(σ)·x0 + σ_t(σ)·n`` (eps and v: α = 1,
σ_t = σ; rectified flow: α = 1 − σ, σ_t = σ), and what the classifier sees of ``x`` is the
caller's ``read_pixels(x, sigma)`` (images in [-1, 1] e.g. ComfyUI's ``calculate_input`` and the classifier's pixel
reader), the same map in training and in guidance.
"""
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bundles import BundleError, check_shapes, load_bundle, save_bundle
from .lora import add_lora, with_parameters
from .training import StepMemory, TrainSettings, grad_mode, step_generator, step_memory, train

TEACHER_TEMPERATURE = 0.25
DEFAULT_EXPERTS = 5
# Below this signal coefficient α the guided denoised prediction is capped (flow models at σ → 1).
MIN_SIGNAL = 0.05


def distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """PPAP Eq. 6 summed over heads: Σ_h mean_batch KL(softmax(teacher_h / τ) ‖ softmax(student_h))."""
    return sum(F.kl_div(F.log_softmax(student[head], dim=-1),
                        F.log_softmax(teacher[head].detach() / temperature, dim=-1), reduction="batchmean",
                        log_target=True)
               for head in teacher)


def timestep_ranges(num_timesteps: int, experts: int) -> list[tuple[int, int]]:
    """PPAP Sec. 4.1: the timesteps 0..T−1 split evenly into ``experts`` inclusive index ranges
    sharing their boundaries (``[0, 200], [200, 400], ..., [800, 999]`` for T = 1000, N = 5)."""
    if experts < 1 or experts > num_timesteps - 1:
        raise ValueError(f"experts must lie in 1..{num_timesteps - 1}, got {experts}")
    edges = [round(k * (num_timesteps - 1) / experts) for k in range(experts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def sigma_ranges(schedule_sigmas: torch.Tensor, experts: int) -> torch.Tensor:
    """[N, 2] (low, high) sigmas of the experts from the model's ascending per-timestep sigmas; the
    lowest range starts at 0 (a clean image belongs to the least-noisy expert)."""
    ranges = torch.tensor([[schedule_sigmas[low], schedule_sigmas[high]]
                           for low, high in timestep_ranges(len(schedule_sigmas), experts)], dtype=torch.float32)
    ranges[0, 0] = 0.0
    return ranges


def check_ranges(ranges: torch.Tensor) -> None:
    """Raise ValueError unless ``ranges`` [N, 2] are ascending and contiguous from 0 (only the top may be ∞)."""
    if ranges.ndim != 2 or ranges.shape[1] != 2 or not len(ranges):
        raise ValueError(f"noise ranges must be [N, 2], got {tuple(ranges.shape)}")
    if not bool(torch.isfinite(ranges[:, 0]).all()) or bool(ranges.isnan().any()) or float(ranges[0, 0]) != 0.0:
        raise ValueError("noise ranges must start at sigma 0, with finite bounds below the last")
    if not bool((ranges[:, 1] > ranges[:, 0]).all()) or not torch.equal(ranges[1:, 0], ranges[:-1, 1]):
        raise ValueError(f"noise ranges must be ascending and contiguous, got {ranges.tolist()}")


def choose_experts(sigma: torch.Tensor, ranges: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """Per-sample expert index: the first range whose upper bound ≥ σ (a boundary goes to the lower
    expert); ``-1`` where σ lies above the last range by more than ``tolerance`` (relative)."""
    upper = ranges[:, 1].to(sigma).contiguous()
    index = torch.searchsorted(upper, sigma.contiguous(), right=False)
    inside_last = sigma <= upper[-1] * (1 + tolerance)
    return torch.where(index < len(upper), index, torch.where(inside_last, len(upper) - 1, -1))


def sample_training_sigmas(schedule_sigmas: torch.Tensor, timestep_range: tuple[int, int], count: int,
                           generator: torch.Generator) -> torch.Tensor:
    """``count`` sigmas at timesteps drawn uniformly from the inclusive ``timestep_range`` (Sec. 4.3)."""
    low, high = timestep_range
    steps = torch.randint(low, high + 1, (count,), generator=generator)
    return schedule_sigmas[steps].float()


def forward_process(alpha: torch.Tensor, noise_std: torch.Tensor, x0: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """x = α·x0 + σ_t·n, α and σ_t per sample [B]."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return alpha.view(shape) * x0 + noise_std.view(shape) * noise


def denoised_guidance(gradient: torch.Tensor, alpha: torch.Tensor, noise_std: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """What classifier guidance adds to the denoised prediction: s·σ_t² / max(α, MIN_SIGNAL) · g.

    Derivation.  ComfyUI's model returns D(x, σ) ≈ E[x0 | x] for the forward process
    x = α·x0 + σ_t·n.  Tweedie's formula gives E[x0 | x] = (x + σ_t²·∇_x log p(x)) / α, so replacing
    the score by the guided score ∇ log p(x) + s·g, with g = ∇_x log p(y | x) (the classifier's
    log-probability of the target differentiated through ``read_pixels`` with respect to the
    sampler's own x), changes D by s·σ_t²/α·g.  In ε form the same change reads
    ε̂' = ε̂ − s·σ_t·g (PPAP's DDIM form ε̂ − √(1−ᾱ)·∇, since for eps and v models x = x_VP/√ᾱ,
    σ_t = σ, σ² = (1−ᾱ)/ᾱ and ∇_x = √ᾱ·∇_{x_VP}).  eps and v models (x = x0 + σ·n): ΔD = s·σ²·g;
    rectified flow (x = (1−σ)·x0 + σ·n): ΔD = s·σ²/(1−σ)·g, which diverges at σ = 1 where x holds
    no information on x0, hence the cap α ≥ MIN_SIGNAL (it only acts above σ = 0.95 there).
    ``gradient`` [B, ...]; ``alpha``, ``noise_std`` [B]."""
    shape = (-1,) + (1,) * (gradient.ndim - 1)
    factor = noise_std.to(gradient) ** 2 / alpha.to(gradient).clamp(min=MIN_SIGNAL)
    return scale * factor.view(shape) * gradient


@dataclass
class ExpertClassifier:
    """A classifier ``network`` (wrapped by ``lora.add_lora``) with one parameter set per noise range.

    ``experts[k]`` maps trainable parameter names to expert k's tensors (the rest of the network is
    the shared base); ``ranges`` [N, 2] are the sigma ranges; ``heads`` maps each output head to its
    class names; ``prepare`` turns images in [-1, 1] into the network's input (resize, normalise:
    ``Classifier.prepare``).  An empty parameter set is the base network itself (naive guidance with
    the off-the-shelf classifier is one empty expert over [0, ∞))."""

    network: nn.Module
    experts: list[dict[str, torch.Tensor]]
    ranges: torch.Tensor
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda images: images

    def __post_init__(self):
        check_ranges(self.ranges)
        if len(self.experts) != len(self.ranges):
            raise ValueError(f"{len(self.experts)} experts for {len(self.ranges)} noise ranges")

    def logits(self, images: torch.Tensor, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s logits per head for images in [-1, 1]."""
        return with_parameters(self.network, self.experts[expert], self.prepare(images))

    def guidance_gradient(self, x: torch.Tensor, sigma: torch.Tensor, read_pixels, head: str, target: int):
        """(g, p, k): per sample g = ∇_x log softmax(f_k(read_pixels(x, σ)))_target [B, ...], the
        target's probability p [B] and the expert index k [B] (ValueError for a σ outside every
        range).  Leaves ``torch.inference_mode`` (ComfyUI samples inside it) and works on clones."""
        experts = choose_experts(sigma, self.ranges)
        if bool((experts < 0).any()):
            raise ValueError(f"sigma {float(sigma.max()):.4g} lies above the experts' noise ranges "
                             f"(up to {float(self.ranges[-1, 1]):.4g})")
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            sigma = sigma.detach().clone()
            log_prob = torch.zeros(len(x), dtype=torch.float32, device=x.device)
            for expert in experts.unique().tolist():
                rows = (experts == expert).nonzero().flatten()
                logits = self.logits(read_pixels(x[rows], sigma[rows]), expert)[head].float()
                log_prob = log_prob.index_put((rows.to(x.device),),
                                              F.log_softmax(logits, dim=-1)[:, target].to(x.device))
            gradient, = torch.autograd.grad(log_prob.sum(), x)
        return gradient.detach(), log_prob.detach().exp(), experts


def guided_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor,
                    noise_std: torch.Tensor, classifier: ExpertClassifier, read_pixels, head: str, target: int,
                    scale: float):
    """(D + s·σ_t²/α·g, g, p, k) for ComfyUI's denoised prediction ``denoised`` at ``x`` and σ [B]
    (``denoised_guidance``, ``ExpertClassifier.guidance_gradient``)."""
    gradient, probability, experts = classifier.guidance_gradient(x, sigma, read_pixels, head, target)
    return denoised + denoised_guidance(gradient, alpha, noise_std, scale).to(denoised), gradient, probability, experts


def gradient_norms(gradient: torch.Tensor) -> list[float]:
    """Per-sample L2 norm of a gradient, as floats (the run record's signal)."""
    return gradient.flatten(1).norm(dim=1).tolist()


@dataclass(frozen=True)
class ExpertTraining:
    """Settings of ``train_experts`` (defaults: the toy world's bundle; the paper: rank 16, α 8, lr 1e-4)."""

    experts: int = DEFAULT_EXPERTS
    steps: int = 120            # per expert
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05  # the paper's AdamW weight decay
    rank: int = 4
    alpha: float = 4.0
    temperature: float = TEACHER_TEMPERATURE
    seed: int = 0

    def __post_init__(self):
        if self.experts < 1 or self.rank < 1 or not (self.alpha > 0 and self.temperature > 0):
            raise ValueError(f"ExpertTraining: experts and rank must be >= 1, alpha and temperature > 0 ({self})")


def expert_prefix(index: int) -> str:
    return f"expert{index}/"


def expert_loss(network: nn.Module, prepare, pool: torch.Tensor, teacher: dict[str, torch.Tensor], read_pixels,
                coefficients, schedule_sigmas: torch.Tensor, settings: ExpertTraining, index: int):
    """``loss_fn(step, rows)`` of expert ``index`` for ``training.train`` (arguments as in ``train_experts``):
    step s draws its global batch (pool rows, timesteps in the expert's range, noise) from
    ``training.step_generator(seed, s, index)``; the distillation loss over rows ``rows`` of it."""
    timestep_range = timestep_ranges(len(schedule_sigmas), settings.experts)[index]

    def loss_fn(step, rows):
        generator = step_generator(settings.seed, step, index)
        picks = torch.randint(len(pool), (settings.batch_size,), generator=generator)[rows]
        sigmas = sample_training_sigmas(schedule_sigmas, timestep_range, settings.batch_size, generator)[rows]
        noise = torch.randn((settings.batch_size, *pool.shape[1:]), generator=generator)[rows]
        device = next(network.parameters()).device
        x0, sigmas, noise = pool[picks].to(device), sigmas.to(device), noise.to(device)
        alpha, noise_std = coefficients(sigmas)
        student = network(prepare(read_pixels(forward_process(alpha, noise_std, x0, noise), sigmas)))
        return distillation_loss(student, {head: logits[picks].to(device) for head, logits in teacher.items()},
                                 settings.temperature)
    return loss_fn


def expert_step_memory(network: nn.Module, prepare, read_pixels, coefficients, schedule_sigmas: torch.Tensor,
                       settings: ExpertTraining, sample_shape: tuple, heads: dict[str, int]) -> StepMemory:
    """``training.step_memory`` of one expert's optimiser step, probed on a synthetic pool of one sample of
    ``sample_shape`` (model space) with zero teacher logits (``heads``: classes per head); the fixed bytes include
    the student network's own weights (a copy of the classifier's)."""
    pool = torch.zeros(1, *sample_shape)
    teacher = {head: torch.zeros(1, classes) for head, classes in heads.items()}

    def forward(rows):
        probe = replace(settings, batch_size=rows)
        return expert_loss(network, prepare, pool, teacher, read_pixels, coefficients, schedule_sigmas, probe,
                           settings.experts - 1)(0, slice(None))

    measured = step_memory({"student": network}, forward)
    base = sum(parameter.numel() * parameter.element_size() for parameter in network.parameters())
    return StepMemory(measured.per_row, measured.fixed + base)


def train_experts(network: nn.Module, prepare, pool: torch.Tensor, teacher: dict[str, torch.Tensor], read_pixels,
                  coefficients, schedule_sigmas: torch.Tensor, settings: ExpertTraining, *, identity: dict,
                  context=None, work_dir=None, on_step=None,
                  should_stop=None) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """PPAP Sec. 4.3: train ``settings.experts`` experts one after another on their timestep ranges.

    ``network``: the classifier wrapped by ``lora.add_lora`` (trainable = adapters, norms, biases), trained
    in place; ``prepare``: images in [-1, 1] -> its input; ``pool``: clean samples x0 of the diffusion model
    (model space) [P, ...]; ``teacher``: the off-the-shelf classifier's logits on them {head: [P, K]};
    ``read_pixels(x, σ)``: model-space noisy x -> images in [-1, 1]; ``coefficients(σ) -> (α, σ_t)`` of the
    model's forward process; ``schedule_sigmas``: the model's ascending sigma per timestep.  Step s of expert
    k draws its global batch from ``training.step_generator(seed, s, k)`` (``expert_loss``), so one process
    and N processes (``context``) see the same batches; expert k resumes from
    ``<work_dir>/expert<k>of<N>.ckpt.safetensors``.  ``on_step(expert, step, steps, loss)``; ``should_stop(step)``
    as in ``training.train``: a stopped expert checkpoints (with ``work_dir``) and only the experts finished
    before it are returned.
    Returns (per-expert trainable tensors, per-expert final loss)."""
    train_settings = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                   weight_decay=settings.weight_decay, seed=settings.seed)
    ranges = timestep_ranges(len(schedule_sigmas), settings.experts)
    names = [name for name, parameter in network.named_parameters() if parameter.requires_grad]
    experts, losses = [], []
    for index, timestep_range in enumerate(ranges):
        loss_fn = expert_loss(network, prepare, pool, teacher, read_pixels, coefficients, schedule_sigmas, settings,
                              index)
        checkpoint = Path(work_dir) / f"expert{index}of{settings.experts}.ckpt.safetensors" if work_dir else None
        result = train({"student": network}, loss_fn, train_settings, context, checkpoint=checkpoint,
                       identity={**identity, "expert": index, "timesteps": list(timestep_range),
                                 "training": asdict(settings)},
                       on_step=(lambda step, total, loss, index=index: on_step(index, step, total, loss))
                       if on_step else None, should_stop=should_stop)
        if not result.completed:
            break
        experts.append({name: network.get_parameter(name).detach().clone() for name in names})
        losses.append(result.final_loss)
    return experts, losses


BUNDLE_FORMAT = "guidance_kit.ppap_experts/1"
DEFAULT_EXCLUDE = ("heads",)


def student_network(classifier, rank: int, alpha: float, exclude=DEFAULT_EXCLUDE, seed: int = 0) -> nn.Module:
    """A copy of ``classifier.network`` with LoRA on its Conv2d/Linear layers (except ``exclude``: the output
    heads, as the paper leaves the ResNet's fc alone), adapters, norms and adapted biases trainable."""
    with grad_mode():
        network = copy.deepcopy(classifier.network).float()  # trained in float32 (AdamW's state underflows in half)
        add_lora(network, rank, alpha, tuple(exclude), seed)
    return network


def save_experts(path, experts: list[dict[str, torch.Tensor]], ranges: torch.Tensor, classifier, *, rank: int,
                 alpha: float, exclude=DEFAULT_EXCLUDE, info: dict | None = None):
    """One safetensors bundle: ``expert<k>/<parameter>`` per expert, ``ranges`` [N, 2] (model sigma), and
    metadata: the base classifier's fingerprint and label, heads (class names), input size, normalisation
    (mean, std on [0, 1] pixels), the LoRA settings and ``info`` (diffusion model, training facts)."""
    check_ranges(ranges)
    tensors = {f"{expert_prefix(k)}{name}": value.detach().float() for k, expert in enumerate(experts)
               for name, value in expert.items()}
    metadata = {"base_fingerprint": classifier.fingerprint, "base_label": classifier.label,
                "heads": {head: list(names) for head, names in classifier.heads.items()},
                "input_size": list(classifier.input_size), "mean": list(classifier.mean), "std": list(classifier.std),
                "lora": {"rank": rank, "alpha": alpha, "exclude": list(exclude)}, **(info or {})}
    return save_bundle(path, {**tensors, "ranges": ranges.float()}, metadata, BUNDLE_FORMAT)


def load_experts(path, classifier, where: str) -> tuple[ExpertClassifier, dict]:
    """(ExpertClassifier over ``classifier``, metadata) from a ``save_experts`` bundle; BundleError naming
    ``where`` for a bundle of another base classifier, input size, heads or normalisation, or bad tensors."""
    bundle = load_bundle(path, BUNDLE_FORMAT, where)
    meta = bundle.metadata
    if meta.get("base_fingerprint") != classifier.fingerprint:
        raise BundleError(f"{where}: {path} was trained for the classifier {meta.get('base_label')!r} "
                          f"({meta.get('base_fingerprint')}), not the connected {classifier.label!r} "
                          f"({classifier.fingerprint}); train experts for this classifier")
    if tuple(meta.get("input_size", ())) != tuple(classifier.input_size):
        raise BundleError(f"{where}: {path} expects {tuple(meta.get('input_size', ()))} inputs, the classifier "
                          f"takes {tuple(classifier.input_size)}")
    found = {head: tuple(names) for head, names in meta.get("heads", {}).items()}
    if found != dict(classifier.heads) or (tuple(meta.get("mean", ())), tuple(meta.get("std", ()))) != (
            tuple(classifier.mean), tuple(classifier.std)):
        raise BundleError(f"{where}: {path}: heads or normalisation differ from the classifier's ({found})")
    lora = meta["lora"]
    network = student_network(classifier, int(lora["rank"]), float(lora["alpha"]), tuple(lora["exclude"]))
    names = {name: tuple(parameter.shape) for name, parameter in network.named_parameters() if parameter.requires_grad}
    ranges = bundle.tensors["ranges"] if "ranges" in bundle.tensors else torch.zeros(0)
    count = len(ranges)
    check_shapes(bundle.tensors, {"ranges": (count, 2), **{f"{expert_prefix(k)}{name}": shape
                                                          for k in range(count) for name, shape in names.items()}},
                 f"{where}: {path}")
    try:
        check_ranges(ranges)
    except ValueError as error:
        raise BundleError(f"{where}: {path}: {error}") from None
    with torch.inference_mode(False):
        experts = [{name: bundle.tensors[f"{expert_prefix(k)}{name}"].clone() for name in names} for k in range(count)]
    return ExpertClassifier(network, experts, ranges, dict(classifier.heads), classifier.prepare), meta


def naive_classifier(classifier) -> ExpertClassifier:
    """The off-the-shelf classifier as one expert over every noise level (the paper's naive baseline)."""
    return ExpertClassifier(classifier.network, [{}], torch.tensor([[0.0, float("inf")]]), dict(classifier.heads),
                            classifier.prepare)
