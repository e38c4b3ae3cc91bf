"""PPAP in ComfyUI: train noise-range experts for a CLASSIFIER on a MODEL's own samples, load them, and guide
sampling toward a class with them (samplers/ppap.py has the math).

* Training (*PPAP Train Experts* node, ``scripts/train_ppap.py``): clean samples of the MODEL (stock
  CFGGuider; an empty prompt at cfg 1 is unconditional generation), the classifier's logits on them as the
  teacher, then ``samplers.ppap.train_experts`` through the shared training core.  Noise levels are the
  MODEL's sigmas: the forward process x = α·x0 + σ_t·n is read off ``model_sampling.noise_scaling`` and
  the classifier sees ``calculate_input(σ, x)`` through the classifier's pixel reader
  (``nodes.classifier.pixel_reader``: the latent itself for pixel-space models, the latent format's RGB
  factors, or a VAE decode), in training and in guidance alike.  Bundles go to ``models/ppap/``.
* Guidance (*PPAP Guider* / *PPAP Guidance* MODEL patch): a post-CFG step adding s·σ_t²/α·∇ log p(y|x) to the
  denoised prediction with each sample's expert.  Latent models: the gradient flows through the same pixel
  reader (``latent_rgb`` is cheap; ``vae`` backpropagates through a full decode every evaluation).
"""
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..samplers import ppap
from ..samplers.bundles import load_bundle, save_bundle
from ..samplers.lora import trainable_fraction
from ..samplers.training import DistributedContext, offset_seed
from .classifier import ClassifierType, pixel_reader
from .contract import (
    Technique,
    TwinSpec,
    check_number,
    check_numeric_inputs,
    current_run,
    guider_and_patch,
    guider_inputs,
    install,
    model_files,
    model_identity,
    node_id_of,
    run_state,
    stock_cfg_run,
)
from .contract.training_guard import (
    Need,
    check_interrupt,
    check_memory,
    interrupt_requested,
    log_work,
    raise_interrupt,
    size,
    tensor_bytes,
)

FOLDER = "ppap"
POOL_FORMAT = "guidance_kit.ppap_pool/1"
TOY_EXPERTS = model_files.TOY_EXPERTS
TRAIN_NODE = "PPAP Train Experts"
TEACHER_CHUNK = 256


def sampling_kind(model) -> str:
    """The model's noise parametrisation, e.g. ``ModelSamplingDiscreteFlow+CONST`` (ranges only transfer within one)."""
    sampling = type(model.get_model_object("model_sampling"))
    return "+".join(base.__name__ for base in sampling.__bases__) if sampling.__name__ == "ModelSampling" \
        else sampling.__name__


def forward_coefficients(model):
    """σ [B] -> (α, σ_t) [B] of the model's forward process x = α·x0 + σ_t·n (from ``noise_scaling``)."""
    sampling = model.get_model_object("model_sampling")

    def coefficients(sigma):
        sigma = sigma.float().flatten()
        zeros, ones = torch.zeros(len(sigma), 1, device=sigma.device), torch.ones(len(sigma), 1, device=sigma.device)
        alpha = sampling.noise_scaling(sigma, zeros.clone(), ones.clone()).flatten()
        noise_std = sampling.noise_scaling(sigma, ones.clone(), zeros.clone()).flatten()
        return alpha, noise_std
    return coefficients


def noisy_pixels(model, classifier, where: str):
    """(x, σ) -> images in [-1, 1]: the classifier's pixel reader on ``calculate_input(σ, x)``."""
    sampling = model.get_model_object("model_sampling")
    reader = pixel_reader(classifier, model, where)
    return lambda x, sigma: reader(sampling.calculate_input(sigma.to(x.device), x))


def schedule_sigmas(model, where: str) -> torch.Tensor:
    """The model's ascending sigma per training timestep (``model_sampling.sigmas``)."""
    sigmas = getattr(model.get_model_object("model_sampling"), "sigmas", None)
    if sigmas is None or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"{where}: this model's sampling has no discrete timestep table to split into experts")
    return sigmas.detach().float().cpu().sort().values


def _pool_chunk(model, conditioning, latent, *, seed, steps, cfg, sampler_name, scheduler):
    """Clean samples (model space) of one batch: a stock full-CFG run (``stock_cfg_run``)."""
    positive, negative = conditioning
    samples = stock_cfg_run(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                            sampler_name=sampler_name, scheduler=scheduler)
    return model.model.process_latent_in(samples).float().cpu()


def generate_pool(model, conditionings: list, latent: dict, images: int, *, seed: int, steps: int, cfg: float,
                  sampler_name: str, scheduler: str, identity: dict, context: DistributedContext, work_dir=None,
                  on_chunk=None) -> torch.Tensor:
    """``images`` clean samples of ``model`` in batches of the latent's size, batch i from conditioning
    i mod len and noise seed ``seed + i`` (modulo 2**64).  With ``work_dir`` each batch is a file (resumable; under
    torchrun rank r makes batches r, r + W, ..., then every rank reads all)."""
    batch = latent["samples"].shape[0]
    chunks = math.ceil(images / batch)
    out = [None] * chunks
    for index in range(chunks):
        path = Path(work_dir) / f"pool{index:05d}.safetensors" if work_dir is not None else None
        if index % context.world_size == context.rank and (path is None or not path.exists()):
            samples = _pool_chunk(model, conditionings[index % len(conditionings)], latent,
                                  seed=offset_seed(seed, index),
                                  steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler)
            if path is not None:
                save_bundle(path, {"samples": samples}, {"identity": identity, "index": index}, POOL_FORMAT)
            out[index] = samples
        if on_chunk is not None and context.is_main:
            on_chunk(index + 1, chunks)
    context.barrier()
    for index in range(chunks):
        if out[index] is None:
            path = Path(work_dir) / f"pool{index:05d}.safetensors"
            bundle = load_bundle(path, POOL_FORMAT, "PPAP training pool")
            if bundle.metadata.get("identity") != identity:
                raise ValueError(f"PPAP training pool: {path} belongs to another training run (delete the work folder)")
            out[index] = bundle.tensors["samples"]
    return torch.cat(out)[:images]


def memory_needs(model, classifier, latent: dict, network, read, schedule: torch.Tensor, *, images: int,
                 settings: ppap.ExpertTraining) -> list[Need]:
    """What ``train_bundle`` will hold at its peak (``training_guard``): the pool and teacher logits, one
    optimiser step measured on a probe of ``network``, and the student with its training state."""
    sample_shape = tuple(comfy.sample.fix_empty_latent_channels(model, latent["samples"]).shape[1:])
    sample = tensor_bytes(sample_shape)
    classes = sum(len(names) for names in classifier.heads.values())
    step = ppap.expert_step_memory(network, classifier.prepare, read, forward_coefficients(model), schedule, settings,
                                   sample_shape, {head: len(names) for head, names in classifier.heads.items()})
    rows = settings.batch_size
    return [
        Need("images", f"the pool of {images} samples ({size(sample)} each) and teacher logits, twice while "
                       "concatenated", 2 * images * (sample + tensor_bytes([classes]))),
        Need("batch_size", f"one optimiser step of {rows} rows ({size(step.per_row)} per row measured on the "
                           "student, plus the noised samples)", rows * (step.per_row + 3 * sample), on_device=True),
        Need("lora_rank", "the student network with its gradients and AdamW state", step.fixed, on_device=True),
    ]


def train_bundle(model, classifier, conditionings: list, latent: dict, out_path, *, images: int,
                 settings: ppap.ExpertTraining, steps: int = 20, cfg: float = 1.0, sampler_name: str = "euler",
                 scheduler: str = "simple", work_dir=None, context: DistributedContext | None = None,
                 where: str = "PPAP training", on_progress=None) -> dict:
    """Generate the pool, label it with the classifier, train the experts, save the bundle (main rank).

    Before any compute the memory it needs is checked (``memory_needs``; a ValueError naming ``where`` and the
    input) and the work logged; every phase stops on ComfyUI's interrupt (sampling steps, teacher chunks,
    optimiser steps).  ``on_progress(phase, done, total)`` with phase "samples" or "expert k". Returns the
    bundle's info."""
    context = context or DistributedContext()
    network = ppap.student_network(classifier, settings.rank, settings.alpha, seed=settings.seed)
    read = noisy_pixels(model, classifier, where)
    schedule = schedule_sigmas(model, where)
    check_memory(where, memory_needs(model, classifier, latent, network, read, schedule, images=images,
                                     settings=settings), context.device)
    batch = latent["samples"].shape[0]
    log_work(where, f"{math.ceil(images / batch)} sampling runs of {steps} steps at batch {batch}, {images} samples "
                    f"labelled, {settings.experts} experts x {settings.steps} optimiser steps of "
                    f"{settings.batch_size} rows")
    identity = {"model": model_identity(model),
                "sampling": sampling_kind(model), "classifier": classifier.fingerprint, "images": images,
                "seed": settings.seed, "steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler,
                "prompts": len(conditionings)}
    started = time.perf_counter()
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    pool = generate_pool(model, conditionings, latent, images, seed=settings.seed, steps=steps, cfg=cfg,
                         sampler_name=sampler_name, scheduler=scheduler, identity=identity, context=context,
                         work_dir=work_dir, on_chunk=(lambda done, total: on_progress("samples", done, total))
                         if on_progress else None)
    sampled = time.perf_counter()
    teacher = {head: [] for head in classifier.heads}
    with torch.no_grad():
        for part in pool.split(TEACHER_CHUNK):
            check_interrupt()
            for head, logits in classifier.logits(read(part, torch.zeros(len(part)))).items():
                teacher[head].append(logits.cpu())
    teacher = {head: torch.cat(parts) for head, parts in teacher.items()}
    experts, losses = ppap.train_experts(
        network, classifier.prepare, pool, teacher, read, forward_coefficients(model), schedule, settings,
        identity=identity, context=context, work_dir=work_dir, should_stop=interrupt_requested,
        on_step=(lambda k, step, total, loss: on_progress(f"expert {k}", step, total)) if on_progress else None)
    if len(experts) < settings.experts:
        raise_interrupt()
    info = {"model": identity, "trainable_fraction": trainable_fraction(network), "final_losses": losses,
            "sample_seconds": sampled - started, "train_seconds": time.perf_counter() - sampled}
    if context.is_main:
        ppap.save_experts(out_path, experts, ppap.sigma_ranges(schedule, settings.experts), classifier,
                          rank=settings.rank, alpha=settings.alpha, info={**info, "training": asdict(settings)})
    context.barrier()
    return info


# ---------------------------------------------------------------- loading

NAIVE_CHOICE = "none (off-the-shelf classifier on noisy inputs)"


def expert_files() -> list[str]:
    """The naive choice, the shipped toy-world experts, then ``models/ppap/`` (``model_files.choices``)."""
    return [NAIVE_CHOICE, *model_files.choices(FOLDER)]


def load_for(model, classifier, experts: str, where: str) -> ppap.ExpertClassifier:
    """The experts file ``experts`` (or the naive choice) for ``classifier`` on ``model``; ValueError naming
    ``where`` for a bundle of another classifier, input size or noise parametrisation."""
    if experts == NAIVE_CHOICE:
        return ppap.naive_classifier(classifier)
    path = model_files.resolve(FOLDER, experts, where, "experts")
    loaded, meta = ppap.load_experts(path, classifier, f"{where} 'experts'")
    trained_for = meta.get("model", {}).get("sampling")
    if trained_for != sampling_kind(model):
        raise ValueError(f"{where} 'experts': {experts} was trained on a {trained_for} model; this model samples as "
                         f"{sampling_kind(model)}, so its noise ranges mean something else")
    return loaded


def parse_target(classifier, target: str, where: str) -> tuple[str, int]:
    """``"head: class"`` (or a class name found in exactly one head) -> (head, class index)."""
    head, _, name = target.rpartition(":")
    head, name = head.strip(), name.strip()
    if not head:
        heads = [h for h in classifier.heads if name in classifier.heads[h] or name in classifier.phrases.get(h, ())]
        if len(heads) != 1:
            options = "; ".join(f"{h}: {', '.join(names)}" for h, names in classifier.heads.items())
            raise ValueError(f"{where} 'target': {name!r} is {'in several heads' if heads else 'no class'} of the "
                             f"classifier; write 'head: class' ({options})")
        head = heads[0]
    return head, classifier.class_index(head, name, f"{where} 'target'")


# ---------------------------------------------------------------- guidance

class PPAPGuidance(Technique):
    """A post-CFG step: D ← D + s·σ_t²/α·∇_x log p_k(y | x) with each sample's expert k (``samplers.ppap``).
    Works with CFG on or off (at cfg 1 the unconditional generation is steered by the classifier alone)."""

    name = "PPAP"
    node = "PPAP"

    def __init__(self, model, classifier, experts: ppap.ExpertClassifier, head: str, target: int, scale: float):
        self.experts, self.head, self.target, self.scale = experts, head, target, scale
        self.read = noisy_pixels(model, classifier, self.node)
        self.coefficients = forward_coefficients(model)

    def start_run(self, guider, sigmas, sampler):
        top, covered = float(sigmas.max()), float(self.experts.ranges[-1, 1])
        if top > covered * (1 + 1e-4):
            raise ValueError(f"{self.node} 'experts': the schedule starts at sigma {top:.4g} but the experts cover "
                             f"sigma 0 to {covered:.4g}; train them on this model (or lower denoise/sigma_max)")
        return ExpertsInUse()

    def guide(self, args: dict) -> torch.Tensor:
        x, denoised = args["input"], args["denoised"]
        sigma = args["sigma"].flatten().to(x.device)
        sigma = sigma.expand(len(x)) if len(sigma) == 1 else sigma
        alpha, noise_std = self.coefficients(sigma)
        guided, gradient, probability, experts = ppap.guided_denoised(
            denoised, x, sigma, alpha, noise_std, self.experts, self.read, self.head, self.target, self.scale)
        run = current_run(args["model_options"])
        in_run = run_state(args["model_options"], self.key)
        if run is not None and run.current is not None:
            run.act(self.name)
            run.signal(expert=experts.float(), gradient_norm=ppap.gradient_norms(gradient),
                       target_probability=probability)
            in_use = sorted(set(experts.tolist()))
            if in_run is not None and in_use != in_run.experts:
                in_run.experts = in_use
                run.mark(f"expert {'/'.join(map(str, in_use))}")
        return guided

    def patch(self, patched, key):
        self.key = key
        patched.set_model_sampler_post_cfg_function(lambda args: self.guide(args))


@dataclass
class ExpertsInUse:
    """Per-run state: the experts of the last guided evaluation (a change is marked on the run)."""

    experts: list = field(default_factory=list)


def patch_ppap(model, node_id=None, *, classifier, experts, target, scale):
    """A clone of ``model`` guided toward ``target`` by the experts (checked before sampling)."""
    where = PPAPGuidance.node
    scale = check_number(where, "scale", scale, 0.0, 10000.0)
    if classifier is None:
        raise ValueError(f"{where} 'classifier': connect a CLASSIFIER (Load Classifier)")
    loaded = load_for(model, classifier, experts, where)
    head, index = parse_target(classifier, target, where)
    return install(model, PPAPGuidance(model, classifier, loaded, head, index, scale), node_id)

CATEGORY = "Guidance Kit/PPAP"
SCALE_TOOLTIP = ("Gradient scale s of classifier guidance: the denoised prediction moves by s·σ_t²/α·∇log p(target|x). "
                 "0 turns guidance off. 30 was best for every student on the toy world's dev seeds (bench/ppap.py; "
                 "the paper uses 7.5).")
DEFAULT_SCALE = 30.0


def _options_inputs() -> list:
    return [
        ClassifierType.Input("classifier", tooltip="The off-the-shelf classifier the experts were trained from "
                                                   "(Load Classifier); its pixel source turns latents into pixels."),
        io.Combo.Input("experts", options=expert_files(), default=TOY_EXPERTS,
                       tooltip="Expert bundle from models/ppap/ (PPAP Train Experts), trained for this classifier "
                               "and this model's noise parametrisation; 'none' guides with the classifier itself "
                               "(the naive baseline)."),
        io.String.Input("target", default="colour: red",
                        tooltip="Class to steer toward, 'head: class' (e.g. 'shape: triangle'); a class name alone "
                                "works when only one head has it."),
        io.Float.Input("scale", default=DEFAULT_SCALE, min=0.0, max=10000.0, step=0.5, round=0.01,
                       tooltip=SCALE_TOOLTIP),
    ]


PPAPGuider, PPAPModelPatch = guider_and_patch(TwinSpec(
    name="PPAP", category=CATEGORY, options=_options_inputs, patch=patch_ppap,
    guider_id="GuidanceKitPPAPGuider", guider_display="PPAP Guider (Guidance Kit)",
    guider_description="Classifier guidance toward a class with noise-range experts of an off-the-shelf classifier "
                       "(PPAP, arXiv 2212.05973), on top of CFG; cfg 1 = unconditional generation steered by the "
                       "classifier alone. For SamplerCustomAdvanced.",
    guider_inputs=lambda: guider_inputs(cfg_default=1.0),
    patch_id="GuidanceKitPPAP", patch_display="PPAP Guidance (Guidance Kit)",
    patch_description="MODEL patch for KSampler and any CFG guider: classifier guidance toward a class with the "
                      "expert whose noise range holds the current sigma, per sample (PPAP, arXiv 2212.05973).",
))


class PPAPTrainExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        defaults = ppap.ExpertTraining()
        return io.Schema(
            node_id="GuidanceKitPPAPTrainExperts",
            display_name=f"{TRAIN_NODE} (Guidance Kit)",
            category=CATEGORY,
            description="Data-free training of PPAP experts: samples the MODEL (positive/negative at cfg; an empty "
                        "prompt at cfg 1 is unconditional generation), labels them with the classifier, and distils "
                        "it into LoRA experts for noise ranges of this model. Writes models/ppap/<filename>.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model whose samples and noise levels they learn."),
                io.Conditioning.Input("positive", tooltip="Prompt of the generated samples (empty = unconditional)."),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
                ClassifierType.Input("classifier", tooltip="The off-the-shelf classifier (the teacher)."),
                io.Latent.Input("latent", tooltip="Empty latent: sampling batch and image size."),
                io.Int.Input("images", default=1024, min=1, max=1_000_000, tooltip="Clean samples to generate."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple"),
                io.Int.Input("sample_steps", default=20, min=1, max=1000),
                io.Int.Input("experts", default=defaults.experts, min=1, max=100,
                             tooltip="Noise ranges: the model's timesteps split evenly."),
                io.Int.Input("steps_per_expert", default=defaults.steps, min=1, max=1_000_000),
                io.Int.Input("batch_size", default=defaults.batch_size, min=1, max=65536),
                io.Float.Input("learning_rate", default=defaults.lr, min=1e-7, max=1.0, step=1e-5, round=1e-7),
                io.Int.Input("lora_rank", default=defaults.rank, min=1, max=256),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff),
                io.String.Input("filename", default="ppap_experts",
                                tooltip="Name of the bundle in models/ppap/ (.safetensors is added)."),
            ],
            outputs=[io.String.Output(display_name="experts_file")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, classifier, latent, images, sampler_name, scheduler,
                sample_steps, experts, steps_per_expert, batch_size, learning_rate, lora_rank, seed,
                filename) -> io.NodeOutput:
        check_numeric_inputs(cls, TRAIN_NODE, {"cfg": cfg, "images": images, "sample_steps": sample_steps,
                                               "experts": experts, "steps_per_expert": steps_per_expert,
                                               "batch_size": batch_size, "learning_rate": learning_rate,
                                               "lora_rank": lora_rank, "seed": seed})
        out = model_files.output_path(FOLDER, filename, TRAIN_NODE)
        check_number(TRAIN_NODE, "cfg", cfg, 0.0, 100.0)
        check_number(TRAIN_NODE, "learning_rate", learning_rate, 0.0, 1.0, low_open=True)
        settings = ppap.ExpertTraining(experts=experts, steps=steps_per_expert, batch_size=batch_size,
                                       lr=learning_rate, rank=lora_rank, alpha=float(lora_rank), seed=seed)
        chunks = math.ceil(images / latent["samples"].shape[0])
        progress = comfy.utils.ProgressBar(chunks + experts * steps_per_expert, node_id=node_id_of(cls))
        offsets = {"samples": 0, **{f"expert {k}": chunks + k * steps_per_expert for k in range(experts)}}
        train_bundle(model, classifier, [(positive, negative)], latent, out, images=images, settings=settings,
                     steps=sample_steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, where=TRAIN_NODE,
                     on_progress=lambda phase, done, total: progress.update_absolute(offsets[phase] + done))
        return io.NodeOutput(out.name)


NODES = [PPAPGuider, PPAPModelPatch, PPAPTrainExperts]
