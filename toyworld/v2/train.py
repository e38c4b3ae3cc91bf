"""Reproducible training of the toy world v2 models: one command, resumable, on CPU or CUDA unchanged.

    python -m toyworld.v2.train --stage all [--seed 0] [--device auto] [--out toyworld/v2/weights]

Stages (``--stage vae|text|dit|weak|classifier|all``; "all" runs them in this order):

* vae: the AutoencoderKL on fresh scenes; L1 reconstruction plus KL at weight 1e-6 (SD's), the
  latent sampled with the run's own generator.  Afterwards the latent shift and scale (mean and
  1/std over 2048 fixed scenes, as Flux's latent format) and the latent RGB factors (least squares
  from normalised latents to 4x4-pooled pixels) go into the VAE file's metadata.
* text: the T5 encoder, contrastively (CLIP's symmetric cross-entropy) against a small image
  encoder, with one hard negative caption per image (``scenes.alter_spec``: one fact changed, or
  two objects' colours swapped) so word order and binding matter.  The image encoder and the
  projection stay in the checkpoint only.
* dit / weak: the Flux DiT on normalised VAE latents (VAE and text encoder frozen), rectified flow
  (``model.flow_matching_loss``, logit-normal sigma) with prompt dropout 0.1 to the empty prompt,
  the unconditional of every sampler; the weak model (Autoguidance) is the smaller configuration,
  trained for a quarter of the steps.
* classifier: the pixel classifier on clean single-object scenes (Gaussian pixel noise 0.05 as
  augmentation), cross-entropy summed over its five heads.

Everything else:

* data: fresh scenes every step, ``DATA_MIX`` of kinds ("partial": a two-object scene captioned
  with one of its objects, the per-object captions Composable Diffusion's models were trained
  with); the batch of step s of a stage comes from ``np.random.default_rng([seed, stage, s])``
  and its torch noise from a CPU generator seeded from it, so a resumed run, a run with data
  workers and a CUDA run see exactly the data of an uninterrupted CPU run;
* AdamW (weight decay 0.01), linear warm-up over 5% of the steps then cosine decay to 10% of the
  peak, gradient clipping at 1.0, EMA of the weights (decay min(0.999, (1+s)/(10+s))); the EMA
  weights are what gets saved;
* checkpoints ``<work>/<stage>.ckpt.safetensors`` (model, EMA and AdamW state, step, schedule and
  configuration as metadata) every ``CHECKPOINT_EVERY`` steps and at the end, written atomically;
  a checkpoint of another schedule or configuration is refused; ``train.log`` in ``--work`` holds
  one JSON line per ``--log-every`` steps (loss, learning rate, seconds per step);
* ``--time-limit S`` stops the running stage after S seconds of the command (checkpointed, interim
  weights exported) and runs no later stage; the same command resumes (a machine lent for ten
  minutes at a time finishes the schedule over several calls);
* ``--priority auto`` raises the priority (nice -10 for the process and its autogroup, when
  permitted) on the CPU and leaves it on CUDA; the CPU run uses every core;
* final weights: float16 files in ``--out`` (``weights.FILES``); the last line printed is a JSON
  object with each stage's final loss and its evaluation (VAE: oracle pass rates of
  reconstructions; classifier: accuracy per head on fresh clean scenes).
"""

import os

# OpenMP threads that spin while waiting collapse throughput on shared cores (10x measured in v1);
# this must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from ..train import ema_update, log_line, restore_run, warmup_cosine
from . import model, oracle, scenes, weights

STAGES = ("vae", "text", "dit", "weak", "classifier")


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    lr: float


SCHEDULES = {"vae": Schedule(4000, 64, 2e-4), "text": Schedule(3000, 256, 5e-4), "dit": Schedule(10000, 256, 3e-4),
             "weak": Schedule(2500, 256, 3e-4), "classifier": Schedule(2000, 128, 1e-3)}
"""Per stage: steps, batch size and peak learning rate (scripts/train_toyworld_v2.sh and
docs/toyworld.md give the reasons and the time these take)."""
DATA_MIX = {"single": 0.35, "relation": 0.35, "implied": 0.2, "partial": 0.1}
CLASSIFIER_MIX = {"single": 1.0}
PROMPT_DROPOUT = 0.1
KL_WEIGHT = 1e-6
CLASSIFIER_NOISE = 0.05
WEIGHT_DECAY = 0.01
CHECKPOINT_EVERY = 500
HIGH_PRIORITY_NICE = -10


# ---------------------------------------------------------------- data

def caption_batch(rng, batch, mix):
    """(images uint8 [B, 64, 64, 3], prompts, hard-negative prompts, specs) of fresh scenes."""
    images, prompts, negatives, specs = [], [], [], []
    for kind in rng.choice(list(mix), size=batch, p=list(mix.values())):
        scene = scenes.sample_scene(rng, "relation" if kind == "partial" else kind)
        fact = scenes.ALTERABLE[scene.spec["kind"]][int(rng.integers(len(scenes.ALTERABLE[scene.spec["kind"]])))]
        if kind == "partial":
            named = int(rng.integers(len(scene.spec["objects"])))
            fact = ("colour", "shape", "texture")[int(rng.integers(3))]
            altered = scenes.alter_spec(scene.spec, fact, rng, target=named)
            prompts.append(scenes.object_phrase(scene.spec["objects"][named]))
            negatives.append(scenes.object_phrase(altered["objects"][named]))
        else:
            prompts.append(scene.prompt)
            negatives.append(scenes.prompt_for(scenes.alter_spec(scene.spec, fact, rng)))
        images.append(scene.image)
        specs.append(scene.spec)
    return np.stack(images), prompts, negatives, specs


def classifier_labels(specs):
    """{head: LongTensor [B]} of single-object specs."""
    return {head: torch.tensor([labels.index(spec["objects"][0][head]) for spec in specs])
            for head, labels in model.CLASSIFIER_LABELS.items()}


class StepBatches(torch.utils.data.Dataset):
    """Batch number ``step`` of a stage, rebuilt from (seed, stage, step) alone: any worker, any order."""

    def __init__(self, seed, stage, batch, mix):
        self.seed, self.stage_index, self.batch, self.mix = seed, STAGES.index(stage), batch, mix

    def __getitem__(self, step):
        rng = np.random.default_rng([self.seed, self.stage_index, step])
        images, prompts, negatives, specs = caption_batch(rng, self.batch, self.mix)
        item = {"images": torch.from_numpy(images), "tokens": model.tokens(prompts),
                "negative_tokens": model.tokens(negatives), "noise_seed": int(rng.integers(2 ** 62))}
        if self.mix == CLASSIFIER_MIX:
            item["labels"] = classifier_labels(specs)
        return item


def pixels(images, device):
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] on ``device``."""
    return images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- one stage's optimiser, EMA and checkpoints

class StageRun:
    """Modules (prefix -> (architecture, config)) of one stage with their EMA copies, AdamW, the
    warm-up + cosine schedule, logging and resumable safetensors checkpoints."""

    def __init__(self, name, architectures, schedule, work_dir, device):
        self.name, self.architectures, self.schedule, self.device = name, architectures, schedule, device
        self.modules = {prefix: model.ARCHITECTURES[arch](**config).to(device).train()
                        for prefix, (arch, config) in architectures.items()}
        self.ema = {prefix: model.ARCHITECTURES[arch](**config).to(device).eval().requires_grad_(False)
                    for prefix, (arch, config) in architectures.items()}
        for prefix, module in self.modules.items():
            self.ema[prefix].load_state_dict(module.state_dict())
        self.params = [p for module in self.modules.values() for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=schedule.lr, weight_decay=WEIGHT_DECAY)
        self.checkpoint = Path(work_dir) / f"{name}.ckpt.safetensors"
        self.log_file = Path(work_dir) / "train.log"
        self.step = 0
        if self.checkpoint.exists():
            self._load()

    def identity(self):
        return {"architectures": json.dumps(self.architectures, sort_keys=True),
                "schedule": json.dumps([self.schedule.steps, self.schedule.batch, self.schedule.lr])}

    def lr(self, step):
        return warmup_cosine(step, self.schedule.steps, self.schedule.lr)

    def update(self, loss):
        ema_update(self, loss, CHECKPOINT_EVERY)

    def log(self, record):
        log_line(self.name, record, self.log_file)

    def save(self):
        tensors = {f"{kind}.{prefix}.{key}": value.detach().to("cpu").contiguous()
                   for kind, modules in (("model", self.modules), ("ema", self.ema))
                   for prefix, module in modules.items() for key, value in module.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{index}.{key}": torch.as_tensor(value).to("cpu") for key, value in state.items()})
        weights.save_atomically(tensors, self.checkpoint, {"step": str(self.step), **self.identity()})

    def _load(self):
        with safe_open(str(self.checkpoint), framework="pt") as handle:
            metadata = handle.metadata()
            if {key: metadata.get(key) for key in self.identity()} != self.identity():
                raise ValueError(f"{self.checkpoint} belongs to a different configuration or schedule "
                                 f"(its schedule {metadata.get('schedule')}, this run's {self.identity()['schedule']});"
                                 " move it away to start this stage afresh")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        restore_run(self, tensors, self.device)
        self.step = int(metadata["step"])


def run_stage(run, loss_fn, args, mix):
    """Train ``run`` to its step count (or ``--stop-at``, or until ``--time-limit`` has passed since the
    command started); returns the mean loss of the last logging window (None when no step ran)."""
    end = run.schedule.steps if args.stop_at is None else min(run.schedule.steps, args.stop_at)
    if run.step >= end:
        return None
    loader = torch.utils.data.DataLoader(StepBatches(args.seed, run.name, run.schedule.batch, mix), batch_size=None,
                                         sampler=range(run.step, end), num_workers=args.workers,
                                         persistent_workers=False, prefetch_factor=4 if args.workers else None)
    window, final_loss, started, first = [], None, time.time(), run.step
    for item in tqdm(loader, desc=run.name, initial=run.step, total=run.schedule.steps, mininterval=5):
        generator = torch.Generator().manual_seed(item["noise_seed"])
        loss = loss_fn(item, generator)
        run.update(loss)
        window.append(loss.item())
        if run.step % args.log_every == 0 or run.step == end:
            seconds = (time.time() - started) / (run.step - first)
            final_loss = float(np.mean(window))
            run.log({"step": run.step, "loss": final_loss, "lr": run.lr(run.step - 1), "s_per_step": seconds})
            window = []
        if args.deadline is not None and time.time() > args.deadline:
            break
    if run.step % CHECKPOINT_EVERY:
        run.save()
    return final_loss


# ---------------------------------------------------------------- stages

def load_frozen(name, args):
    path = Path(args.out) / weights.FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"this stage needs {path}: run the {name} stage first (--stage all runs every stage)")
    module, metadata = weights.load(name, args.out)
    return module.to(args.device).requires_grad_(False), metadata


def vae_loss(vae, images, generator):
    moments = vae.quant_conv(vae.encoder(images))
    mean, log_variance = moments.chunk(2, dim=1)
    log_variance = log_variance.clamp(-30.0, 20.0)
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    latents = mean + (0.5 * log_variance).exp() * noise
    kl = 0.5 * (mean.square() + log_variance.exp() - 1.0 - log_variance).sum(dim=(1, 2, 3)).mean()
    return F.l1_loss(model.decode_latents(vae, latents), images) + KL_WEIGHT * kl


@torch.no_grad()
def latent_statistics(vae, seed, device, count):
    """{latent_shift, latent_scale, latent_rgb_factors, latent_rgb_factors_bias} over ``count`` fixed
    scenes (normalised latent = (latent - shift) * scale; RGB preview = normalised latent @ factors + bias)."""
    rng = np.random.default_rng([seed, len(STAGES), 0])
    latents, previews = [], []
    for start in range(0, count, 256):
        images = pixels(torch.from_numpy(caption_batch(rng, min(256, count - start), DATA_MIX)[0]), device)
        latents.append(model.encode_images(vae, images).cpu())
        previews.append(F.avg_pool2d(images, model.LATENT_DOWNSCALE).cpu())
    latents, previews = torch.cat(latents), torch.cat(previews)
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    features = ((latents - shift) * scale).permute(0, 2, 3, 1).reshape(-1, model.LATENT_CHANNELS)
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    solution = torch.linalg.lstsq(design, previews.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return {"latent_shift": shift, "latent_scale": scale,
            "latent_rgb_factors": [[round(v, 5) for v in row] for row in solution[:-1].tolist()],
            "latent_rgb_factors_bias": [round(v, 5) for v in solution[-1].tolist()]}


@torch.no_grad()
def reconstruction_pass(vae, seed, device, count):
    """{kind: oracle pass rate} of VAE reconstructions of ``count`` fresh scenes of each kind."""
    rates = {}
    for index, kind in enumerate(scenes.KINDS):
        rng = np.random.default_rng([seed, len(STAGES) + 1, index])
        batch = [scenes.sample_scene(rng, kind) for _ in range(count)]
        images = pixels(torch.from_numpy(np.stack([s.image for s in batch])), device)
        decoded = model.decode_latents(vae, model.encode_images(vae, images))
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        rates[kind] = float(np.mean([oracle.judge(image, s.spec)["pass"] for image, s in zip(decoded, batch)]))
    return rates


def train_vae(args, schedule):
    run = StageRun("vae", {"vae": ("vae", model.VAE)}, schedule, args.work, args.device)
    vae = run.modules["vae"]
    loss = run_stage(run, lambda item, g: vae_loss(vae, pixels(item["images"], args.device), g), args, DATA_MIX)
    ema = run.ema["vae"]
    statistics = latent_statistics(ema, args.seed, args.device, args.statistics_scenes)
    save(args, "vae", "vae", model.VAE, ema, run, {key: json.dumps(value) for key, value in statistics.items()})
    return {"loss": loss, "step": run.step, "reconstruction_pass": reconstruction_pass(ema, args.seed, args.device,
                                                                                     args.evaluation_scenes)}


def contrastive_loss(text_encoder, projection, image_encoder, item, device):
    texts = torch.cat([item["tokens"], item["negative_tokens"]]).to(device)
    _, pooled = model.trainable(lambda ids: model.encode_text(text_encoder, ids))(texts)
    text_embedding = projection(pooled)
    image_embedding = image_encoder(pixels(item["images"], device))["embedding"]
    logits = model.contrastive_logits(image_embedding, text_embedding, projection.logit_scale)
    batch = len(item["images"])
    same = (item["tokens"][:, None, :] == texts.cpu()[None, :, :]).all(-1).float().to(device)  # duplicate captions
    image_to_text = F.cross_entropy(logits, same / same.sum(1, keepdim=True))
    positives = same[:, :batch]
    text_to_image = F.cross_entropy(logits[:, :batch].T, positives.T / positives.T.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def train_text(args, schedule):
    run = StageRun("text", {"text_encoder": ("text_encoder", model.TEXT_ENCODER),
                            "text_projection": ("text_projection", model.TEXT_PROJECTION),
                            "image_encoder": ("image_classifier", model.IMAGE_ENCODER)},
                   schedule, args.work, args.device)
    modules = run.modules
    loss = run_stage(run, lambda item, g: contrastive_loss(modules["text_encoder"], modules["text_projection"],
                                                           modules["image_encoder"], item, args.device), args, DATA_MIX)
    save(args, "text_encoder", "text_encoder", model.TEXT_ENCODER, run.ema["text_encoder"], run)
    return {"loss": loss, "step": run.step}


def dit_loss(dit, vae, vae_metadata, text_encoder, item, generator, device):
    with torch.no_grad():
        shift, scale = float(vae_metadata["latent_shift"]), float(vae_metadata["latent_scale"])
        x0 = (model.encode_images(vae, pixels(item["images"], device)) - shift) * scale
        dropped = torch.rand(len(x0), generator=generator) < PROMPT_DROPOUT
        token_ids = torch.where(dropped[:, None], model.tokens([""]), item["tokens"])
        context, pooled = model.encode_text(text_encoder, token_ids.to(device))
    return model.flow_matching_loss(dit, x0, context, pooled, generator)


def train_dit(args, schedule, name="dit", config=model.MAIN_DIT):
    vae, vae_metadata = load_frozen("vae", args)
    text_encoder, _ = load_frozen("text_encoder", args)
    run = StageRun(name, {"diffusion_model": ("dit", config)}, schedule, args.work, args.device)
    dit = run.modules["diffusion_model"]
    loss = run_stage(run, lambda item, g: dit_loss(dit, vae, vae_metadata, text_encoder, item, g, args.device),
                     args, DATA_MIX)
    save(args, name, "dit", config, run.ema["diffusion_model"], run)
    return {"loss": loss, "step": run.step}


def train_weak(args, schedule):
    return train_dit(args, schedule, "weak", model.WEAK_DIT)


def classifier_loss(classifier, item, generator, device):
    images = pixels(item["images"], device)
    images = images + CLASSIFIER_NOISE * torch.randn(images.shape, generator=generator).to(device)
    logits = classifier(images)
    return sum(F.cross_entropy(logits[head], item["labels"][head].to(device)) for head in logits)


@torch.no_grad()
def classifier_accuracy(classifier, seed, device, count):
    """{head: accuracy} on ``count`` fresh clean single-object scenes."""
    item = StepBatches(seed, "classifier", count, CLASSIFIER_MIX)[2 ** 40]  # far past any training step
    logits = classifier(pixels(item["images"], device))
    return {head: float((logits[head].argmax(-1).cpu() == item["labels"][head]).float().mean()) for head in logits}


def train_classifier(args, schedule):
    run = StageRun("classifier", {"classifier": ("image_classifier", model.CLASSIFIER)}, schedule, args.work,
                   args.device)
    classifier = run.modules["classifier"]
    loss = run_stage(run, lambda item, g: classifier_loss(classifier, item, g, args.device), args, CLASSIFIER_MIX)
    save(args, "classifier", "image_classifier", model.CLASSIFIER, run.ema["classifier"], run,
         {"labels": json.dumps(model.CLASSIFIER_LABELS)})
    return {"loss": loss, "step": run.step, "accuracy": classifier_accuracy(
        run.ema["classifier"], args.seed, args.device, args.evaluation_scenes * len(scenes.KINDS))}


def save(args, name, architecture, config, module, run, metadata=None):
    weights.save_module(Path(args.out) / weights.FILES[name], weights.PREFIXES[name], architecture, config, module,
                        {"steps": str(run.step), "schedule": run.identity()["schedule"], "seed": str(args.seed),
                         **(metadata or {})})


TRAINERS = {"vae": train_vae, "text": train_text, "dit": train_dit, "weak": train_weak,
            "classifier": train_classifier}


# ---------------------------------------------------------------- command line

def raise_priority(device, priority):
    """For ``high`` (``auto``: on the CPU) nice -10 for this process and for its autogroup (Linux gives
    every terminal session an equal CPU share whatever a process's nice value says), each when
    permitted; returns the process's niceness in effect."""
    if priority == "high" or (priority == "auto" and device.type == "cpu"):
        try:
            os.nice(HIGH_PRIORITY_NICE - os.nice(0))
        except PermissionError:
            tqdm.write("train: not permitted to raise the process priority; running at the current one")
        try:
            Path("/proc/self/autogroup").write_text(f"{HIGH_PRIORITY_NICE}\n")
        except OSError:
            pass  # no autogroups (or not permitted): the process priority is what there is
    return os.nice(0)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--steps", type=int, help="steps of every selected stage (default: SCHEDULES)")
    parser.add_argument("--batch", type=int, help="batch size of every selected stage (default: SCHEDULES)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, help="data workers (default: none on the CPU, up to 12 on CUDA)")
    parser.add_argument("--priority", choices=("auto", "high", "normal"), default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    parser.add_argument("--statistics-scenes", type=int, default=2048, help="scenes for the VAE's latent statistics")
    parser.add_argument("--evaluation-scenes", type=int, default=64,
                        help="scenes per kind for the VAE reconstruction check (x3 for the classifier's accuracy)")
    parser.add_argument("--out", default=str(weights.WEIGHTS_DIR), help="directory of the final weight files")
    parser.add_argument("--work", default=".toyworld-train-v2", help="checkpoint and log directory")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--stop-at", type=int, help="train each selected stage only up to this step (resumable) "
                        "and export its weights from the checkpoint's EMA")
    parser.add_argument("--time-limit", type=float, help="seconds: stop the stage running then (checkpointed, its "
                        "interim weights exported) and run no later stage; the same command resumes")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "workers", "threads", "log_every", "stop_at", "statistics_scenes",
                 "evaluation_scenes", "time_limit"):
        value, least = getattr(args, name), 0 if name in ("workers", "stop_at", "time_limit") else 1
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.deadline = None if args.time_limit is None else time.time() + args.time_limit
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else "cpu" if args.device == "auto" else args.device)
    if args.workers is None:
        args.workers = 0 if args.device.type == "cpu" else min(12, max(0, (os.cpu_count() or 1) - 2))
    niceness = raise_priority(args.device, args.priority)
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results, complete = {}, True
    for stage in STAGES if args.stage == "all" else (args.stage,):
        torch.manual_seed(args.seed * 1000 + STAGES.index(stage))
        default = SCHEDULES[stage]
        schedule = Schedule(args.steps or default.steps, args.batch or default.batch, default.lr)
        results[stage] = TRAINERS[stage](args, schedule)
        if results[stage]["step"] < (schedule.steps if args.stop_at is None else min(schedule.steps, args.stop_at)):
            complete = False  # out of time: later stages would train on this stage's interim weights
            break
    sys.stdout.write(json.dumps({"results": results, "complete": complete, "out": args.out,
                                 "device": str(args.device), "nice": niceness}) + "\n")


if __name__ == "__main__":
    main()
