"""Reproducible training of the toy-world models (CPU, about 1 h 55 min on 2 cores at high CPU
priority: roughly 0.72 s per main step, 0.3 s per weak step, 0.16 s per classifier step).

Command (from the repository root; resumable, checkpoints and ``train.log`` in ``--work``)::

    python -m toyworld.train --stage all --seed 0

Stages (``--stage main|weak|classifier|all``, run in that order for ``all``):

* main: ToyDiT (width 128, depth 8) + ToyTextEncoder trained jointly, 2400 + 4000 + 2000 steps of
  batch 64 in three cosine cycles (``CYCLES``: warm restarts at peak lr x0.6 and x0.5; the v0
  weights were the first cycle alone, and shapes were still unlearned there).  The third cycle
  uses ``COMPOSITION_MIX``: more two-object scenes and "partial" captions (``scene_batch``).
* weak: ToyDiT (width 96, depth 4), 500 steps of batch 64, conditioned by the *saved main text encoder*,
  frozen, so it takes the same conditioning (the Autoguidance guide model).
* classifier: ToyClassifier on clean single-object scenes (light Gaussian pixel noise,
  std 0.05, as augmentation), 800 steps of batch 128; the "off-the-shelf" classifier.

Design decisions:

* Rectified flow as ComfyUI's CONST model type with ModelSamplingDiscreteFlow(shift=1,
  multiplier=1000): x0 = image*2-1, x_t = (1-sigma)*x0 + sigma*noise, timesteps = sigma*1000,
  target velocity = noise - x0, MSE loss. sigma ~ logit-normal(0, 1) (sigmoid of a standard
  normal, as SD3): it concentrates training on mid noise levels, where the prompt decides the
  image (a run with uniform sigma learned colours slower within this step budget).
* Prompt dropout 0.15: tokens replaced by the empty prompt (all PAD), the unconditional.
* Data: fresh scenes every step, 50% single / 30% relation / 20% mirror (main's third cycle:
  30 / 35 / 15 and 20% partial); batch ``step`` of a
  stage draws from ``np.random.default_rng([seed, stage_index, step])`` and its torch noise from a
  generator seeded the same way, so a resumed run sees exactly the data of an uninterrupted one.
* AdamW (lr 5e-4 for DiTs, 1e-3 for the classifier, weight decay 0.01); each cycle: linear
  warm-up over its first 5% of steps, cosine decay to 10% of its peak; gradient clipping at 1.0; EMA of the weights
  (decay min(0.999, (1+step)/(10+step))); the EMA weights are what gets saved.
* Checkpoints ``<work>/<stage>.ckpt.safetensors`` (model, EMA and AdamW state as tensors,
  step, cycles and config as JSON metadata) every 250 steps; no pickle anywhere. A checkpoint
  resumes under a schedule whose cycles extend its own (so a finished cycle can be continued).
* ``--stop-at N`` stops a stage at step N of its schedule (``--stage main --stop-at 0`` writes
  interim weights from the latest checkpoint while another process keeps training).
* Final weights (float16, see ``weights.py``) go to ``--out`` (default toyworld/weights/); the
  last line printed is a JSON object with each stage's final mean loss.
"""

import os

# OpenMP threads that spin while waiting collapse throughput on shared cores (10x measured);
# this must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import scenes, weights
from .model import ToyClassifier, ToyDiT, ToyTextEncoder

KIND_MIX = {"single": 0.5, "relation": 0.3, "mirror": 0.2}
# The main model's third cycle: more two-object scenes, and "partial" captions (see scene_batch).
COMPOSITION_MIX = {"single": 0.3, "relation": 0.35, "mirror": 0.15, "partial": 0.2}
MIXES = {"base": KIND_MIX, "composition": COMPOSITION_MIX}
PROMPT_DROPOUT = 0.15
CLASSIFIER_NOISE = 0.05
EMA_DECAY = 0.999
CHECKPOINT_EVERY = 250
STAGES = ("main", "weak", "classifier")
CYCLES = {"main": ((2400, 1.0), (4000, 0.6), (2000, 0.5, "composition")), "weak": ((500, 1.0),),
          "classifier": ((800, 1.0),)}
"""Per stage: (steps, peak-lr factor[, data mix name; default "base"]) of each cosine cycle."""
DEFAULT_BATCH = {"main": 64, "weak": 64, "classifier": 128}
LEARNING_RATE = {"main": 5e-4, "weak": 5e-4, "classifier": 1e-3}
MAIN_DIT = {"width": 128, "depth": 8, "heads": 4, "context_dim": 128}
WEAK_DIT = {"width": 96, "depth": 4, "heads": 4, "context_dim": 128}
TEXT_ENCODER = {"vocab_size": len(scenes.VOCAB), "dim": 128, "layers": 2, "heads": 4, "max_tokens": scenes.MAX_TOKENS}


def images_to_tensor(images):
    """uint8 [B,H,W,3] images -> float [B,3,H,W] in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_batch(rng, batch, kind_mix):
    """Scenes of the mix's kinds.  Kind "partial" is a two-object relation scene captioned with one
    of its objects only ("a red circle"): the grammar's single prompts always name size and
    position, so this caption form never competes with them; it teaches "an image containing a
    red circle", the per-object labels Composable Diffusion's CLEVR models were trained with
    (arXiv 2206.01714, Sec. 5), which is what composing concepts with AND needs."""
    kinds = rng.choice(list(kind_mix), size=batch, p=list(kind_mix.values()))
    batch_scenes = []
    for kind in kinds:
        if kind != "partial":
            batch_scenes.append(scenes.sample_scene(rng, kind))
            continue
        scene = scenes.sample_scene(rng, "relation")
        named = scene.spec["objects"][rng.integers(2)]
        batch_scenes.append(dataclasses.replace(scene, prompt=f"a {named['colour']} {named['shape']}"))
    return batch_scenes


def flow_matching_loss(dit, text_encoder, batch_scenes, generator):
    """Rectified-flow velocity MSE with prompt dropout (see module docstring)."""
    x0 = images_to_tensor([s.image for s in batch_scenes])
    tokens = torch.tensor([scenes.tokenize(s.prompt) for s in batch_scenes])
    size = len(batch_scenes)
    dropped = torch.rand(size, generator=generator) < PROMPT_DROPOUT
    tokens = tokens.masked_fill(dropped[:, None], scenes.TOKEN_ID[scenes.PAD])
    sigma = torch.sigmoid(torch.randn(size, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    return F.mse_loss(dit(x_t, sigma * 1000, text_encoder(tokens)), noise - x0)


def classifier_labels(specs):
    """{head: LongTensor} targets for single-object specs."""
    objects = [spec["objects"][0] for spec in specs]
    return {"colour": torch.tensor([scenes.COLOURS.index(o["colour"]) for o in objects]),
            "shape": torch.tensor([scenes.SHAPES.index(o["shape"]) for o in objects]),
            "position": torch.tensor([scenes.POSITIONS.index(o["position"]) for o in objects])}


def classifier_loss(classifier, batch_scenes, generator):
    images = images_to_tensor([s.image for s in batch_scenes])
    images = images + CLASSIFIER_NOISE * torch.randn(images.shape, generator=generator)
    logits = classifier(images)
    labels = classifier_labels([s.spec for s in batch_scenes])
    return sum(F.cross_entropy(logits[name], labels[name]) for name in logits)


def warmup_cosine(step: int, length: int, peak: float) -> float:
    """Learning rate at ``step`` of a ``length``-step cycle: linear warm-up over 5%, then cosine from ``peak``
    down to 0.1·peak."""
    warmup = max(1, length // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, length - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def ema_update(run, loss, checkpoint_every: int) -> None:
    """One optimiser step of a stage run (``optimizer``, ``params``, ``modules``, ``ema``, ``step``, ``lr(step)``,
    ``save()``): clipped gradients, an EMA of the weights, a checkpoint every ``checkpoint_every`` steps."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr(run.step)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    decay = min(EMA_DECAY, (1 + run.step) / (10 + run.step))
    with torch.no_grad():
        for prefix, module in run.modules.items():
            for ema_param, param in zip(run.ema[prefix].parameters(), module.parameters()):
                ema_param.lerp_(param, 1 - decay)
    run.step += 1
    if run.step % checkpoint_every == 0:
        run.save()


def log_line(stage: str, record: dict, log_file) -> None:
    """A JSON progress line on the console and appended to ``log_file``."""
    line = json.dumps({"stage": stage, **record})
    tqdm.write(line)
    with open(log_file, "a") as handle:
        handle.write(line + "\n")


def restore_run(run, tensors: dict, device=None) -> None:
    """A stage run's modules, EMA copies and AdamW state from its checkpoint tensors (``model.``, ``ema.``,
    ``optim.<index>.<name>``); optimiser state moved to ``device`` when given."""
    for kind, modules in (("model", run.modules), ("ema", run.ema)):
        for prefix, module in modules.items():
            start = f"{kind}.{prefix}."
            module.load_state_dict({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)})
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value if device is None else value.to(device)
    run.optimizer.load_state_dict({"state": state, "param_groups": run.optimizer.state_dict()["param_groups"]})


class StageRun:
    """Optimiser, EMA, schedule, logging and safetensors checkpoints of one training stage."""

    def __init__(self, name, modules, cycles, lr, work_dir):
        self.name, self.modules, self.cycles, self.peak_lr = name, modules, tuple(map(tuple, cycles)), lr
        self.steps = sum(cycle[0] for cycle in self.cycles)
        self.ema = {prefix: _frozen_copy(module) for prefix, module in modules.items()}
        self.params = [p for module in modules.values() for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        self.checkpoint = Path(work_dir) / f"{name}.ckpt.safetensors"
        self.log_file = Path(work_dir) / "train.log"
        self.step = 0
        if self.checkpoint.exists():
            self._load()

    def _cycle_at(self, step):
        """(cycle, step within it); steps past the schedule belong to the last cycle."""
        for cycle in self.cycles:
            if step < cycle[0] or cycle is self.cycles[-1]:
                return cycle, step
            step -= cycle[0]

    def mix_at(self, step):
        cycle, _ = self._cycle_at(step)
        return MIXES[cycle[2] if len(cycle) > 2 else "base"]

    def lr(self, step):
        (length, factor, *_), step = self._cycle_at(step)
        return warmup_cosine(step, length, self.peak_lr * factor)

    def update(self, loss):
        ema_update(self, loss, CHECKPOINT_EVERY)

    def log(self, record):
        log_line(self.name, record, self.log_file)

    def _tensors(self):
        tensors = {f"{kind}.{prefix}.{key}": value.detach().contiguous()
                   for kind, modules in (("model", self.modules), ("ema", self.ema))
                   for prefix, module in modules.items() for key, value in module.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{index}.{key}": torch.as_tensor(value) for key, value in state.items()})
        return tensors

    def save(self):
        configs = {prefix: module.config for prefix, module in self.modules.items()}
        temporary = self.checkpoint.with_suffix(".tmp")
        save_file(self._tensors(), str(temporary),
                  metadata={"step": str(self.step), "cycles": json.dumps(self.cycles), "config": json.dumps(configs)})
        temporary.replace(self.checkpoint)

    def _load(self):
        with safe_open(str(self.checkpoint), framework="pt") as handle:
            metadata = handle.metadata()
            configs = {prefix: module.config for prefix, module in self.modules.items()}
            saved = [tuple(cycle) for cycle in json.loads(metadata["cycles"])]
            if json.loads(metadata["config"]) != configs or list(self.cycles[:len(saved)]) != saved:
                raise ValueError(f"{self.checkpoint} belongs to a different configuration or schedule "
                                 f"(its cycles {saved}, this run's {list(self.cycles)})")
            tensors = {key: handle.get_tensor(key) for key in list(handle.keys())}
        restore_run(self, tensors)
        self.step = int(metadata["step"])


def _frozen_copy(module):
    copy = type(module)(**module.config)
    copy.load_state_dict(module.state_dict())
    return copy.requires_grad_(False)


def run_stage(run, loss_fn, seed, stage_index, batch, log_every, stop_at=None, kind_mix=None):
    """Train ``run`` to its step count (or to ``stop_at``); returns the mean loss of the last
    logging window, None if no step ran."""
    window, final_loss, started = [], None, time.time()
    end = run.steps if stop_at is None else min(run.steps, stop_at)
    progress = tqdm(range(run.step, end), desc=run.name, initial=run.step, total=run.steps)
    for step in progress:
        rng = np.random.default_rng([seed, stage_index, step])
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        loss = loss_fn(scene_batch(rng, batch, kind_mix or run.mix_at(step)), generator)
        run.update(loss)
        window.append(loss.item())
        if run.step % log_every == 0 or run.step == end:
            seconds = (time.time() - started) / (step + 1 - progress.initial)
            run.log({"step": run.step, "loss": float(np.mean(window)), "lr": run.lr(step), "s_per_step": seconds})
            final_loss, window = float(np.mean(window)), []
    if end > progress.initial and run.step % CHECKPOINT_EVERY:
        run.save()
    return final_loss


def train_main(args, cycles):
    dit, text_encoder = ToyDiT(**MAIN_DIT), ToyTextEncoder(**TEXT_ENCODER)
    run = StageRun("main", {"diffusion_model": dit, "text_encoder": text_encoder}, cycles, LEARNING_RATE["main"],
                   args.work)
    loss = run_stage(run, lambda batch, g: flow_matching_loss(dit, text_encoder, batch, g),
                     args.seed, 0, args.batch or DEFAULT_BATCH["main"], args.log_every, args.stop_at)
    weights.save_modules(Path(args.out) / weights.MAIN_WEIGHTS.name, run.ema,
                         {"steps": str(run.steps), "seed": str(args.seed)})
    return loss


def train_weak(args, cycles):
    _, text_encoder = weights.load_main(Path(args.out) / weights.MAIN_WEIGHTS.name)
    text_encoder.requires_grad_(False)
    dit = ToyDiT(**WEAK_DIT)
    run = StageRun("weak", {"diffusion_model": dit}, cycles, LEARNING_RATE["weak"], args.work)
    loss = run_stage(run, lambda batch, g: flow_matching_loss(dit, text_encoder, batch, g),
                     args.seed, 1, args.batch or DEFAULT_BATCH["weak"], args.log_every, args.stop_at)
    weights.save_modules(Path(args.out) / weights.WEAK_WEIGHTS.name, run.ema,
                         {"steps": str(run.steps), "seed": str(args.seed)})
    return loss


def train_classifier(args, cycles):
    classifier = ToyClassifier(len(scenes.COLOURS), len(scenes.SHAPES), len(scenes.POSITIONS))
    run = StageRun("classifier", {"classifier": classifier}, cycles, LEARNING_RATE["classifier"], args.work)
    loss = run_stage(run, lambda batch, g: classifier_loss(classifier, batch, g),
                     args.seed, 2, args.batch or DEFAULT_BATCH["classifier"], args.log_every, args.stop_at,
                     kind_mix={"single": 1.0})
    weights.save_modules(Path(args.out) / weights.CLASSIFIER_WEIGHTS.name, run.ema,
                         {"steps": str(run.steps), "seed": str(args.seed), "labels": json.dumps(
                             {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "position": scenes.POSITIONS})})
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--steps", type=int, help="one cycle of this many steps for every selected stage "
                        "(default: each stage's CYCLES)")
    parser.add_argument("--batch", type=int, help="batch size for every selected stage (default: per stage)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(weights.WEIGHTS_DIR), help="directory for the final weight files")
    parser.add_argument("--work", default=".toyworld-train", help="checkpoint and log directory")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--stop-at", type=int, help="train only up to this step of each selected stage's schedule "
                        "(resumable later) and write its weights from the checkpoint EMA; 0 exports the checkpoint")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    trainers = {"main": train_main, "weak": train_weak, "classifier": train_classifier}
    stages = STAGES if args.stage == "all" else (args.stage,)
    losses = {}
    for stage in stages:
        torch.manual_seed(args.seed * 1000 + STAGES.index(stage))
        losses[stage] = trainers[stage](args, ((args.steps, 1.0),) if args.steps else CYCLES[stage])
    print(json.dumps({"final_loss": losses, "out": args.out}))


if __name__ == "__main__":
    main()
