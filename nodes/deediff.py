"""DeeDiff in ComfyUI: train uncertainty heads for a MODEL, load them, and exit early block by block.

* Architectures (``architecture``): the toy world DiT (``("single_block", i)`` replacements, like Flux's
  single blocks) and the SD3 family's MMDiT (``("double_block", i)``).  Each gives its block count,
  hidden width, modulation-vector width, and its own output head as a function of image tokens, so
  every exit is read by the model's final layer.  Anything else (UNets, other DiTs) is a clear error.
* Training (``train_heads``), data-free: full-CFG sampling runs of the MODEL over a prompt list are
  recorded at the diffusion model's input (latent, sigma, and the model's processed conditioning,
  cond and uncond rows alike), so the heads learn on exactly the inputs sampling will give them.
  Optionally the runs start from given images (img2img at ``denoise``).  Each training step replays
  a batch of recorded rows through the frozen model, collects every block's image tokens, and fits
  the heads by the uncertainty loss (``samplers/deediff.py``, Eq. 6) with the model's own final
  prediction as the target.  The loop is the shared training core (``samplers/training.py``): one
  process by default, ``torchrun`` / ``accelerate launch`` with no code change, resumable checkpoints.
* Joint training (``train_joint``, the Train node's ``adapter_rank`` > 0): the paper's L_UAL + L_u with the
  backbone's blocks adapted by low-rank updates of their attention and MLP projections (``adapter_shapes``,
  ``samplers.lora.WeightDeltas``), plus self-distillation of the full-depth output onto the frozen model's
  (``samplers.deediff.joint_loss``).  Each step replays recorded rows through the model with the merged weights in
  place (``torch.func.functional_call``; the MODEL is never modified) against the frozen outputs computed once
  (``joint_data``).  The bundle is ``guidance_kit.deediff/2``: heads, adapters (``adapters.up.<i>`` /
  ``adapters.down.<i>``, weight names and shapes in the identity) and the model's identity.  DeeDiff Early Exit
  adds the adapters to the clone as ComfyUI LoRA weight patches (``adapter_patches``), so they leave with the
  clone; ``load_heads`` reads /1 (heads only) and /2.
* The exit patch (``DeeDiffTechnique``, installed through ``contract.install``): a block replacement
  on every block (wrapping any replacement already there) and an APPLY_MODEL wrapper that opens one
  ``ForwardExits`` per model call inside a sampling run.  Rows exit independently (cond and uncond
  rows of CFG too); exited rows are left out of later blocks' sub-batches.  Per evaluation the run
  record gets ``exit_depth`` (blocks run, per model row), ``blocks`` and ``full_blocks`` (block-rows
  evaluated and what the full model would have evaluated), and the run's first early exit is marked.
"""
import hashlib
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.patcher_extension import WrappersMP
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_api.latest import io

from ..samplers import deediff, training
from ..samplers.bundles import load_bundle
from ..samplers.lora import WeightDeltas
from ..toyworld.model import ToyDiT
from .contract import (
    Technique,
    check_number,
    check_numeric_inputs,
    current_run,
    encode_prompt,
    install,
    model_files,
    model_identity,
    model_input,
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

logger = logging.getLogger(__name__)
CATEGORY = "Guidance Kit/acceleration"
FOLDER = "deediff"
CHECKPOINT_SUBFOLDER = ".checkpoints"
FEATURE_CHUNK = 32  # recorded rows per frozen forward pass when collecting exit features
PROBE_TOKENS = 16  # image tokens of the heads' memory probe (their memory is linear in the tokens)
# Float32 values autograd keeps per token and unit of width in one transformer block (qkv 3, attention output 1,
# projection 1, MLP 4 + 4 (pre- and post-activation), norms and modulated inputs 4, residuals 2: 19, rounded up)
JOINT_SAVED_PER_TOKEN_WIDTH = 24
TRAIN_NODE = "DeeDiff Train Heads (Guidance Kit)"
LOAD_NODE = "DeeDiff Load Heads (Guidance Kit)"
PATCH_NODE = "DeeDiff Early Exit (Guidance Kit)"
DeeDiffHeads = io.Custom("GUIDANCE_KIT_DEEDIFF_HEADS")
SUPPORTED = "the toy world DiT and SD3-family MMDiT models"


@dataclass
class Architecture:
    """What DeeDiff needs to know of a diffusion transformer."""

    name: str
    block_kind: str
    blocks: int
    width: int
    vec_dim: int
    out_dim: int
    patch_size: int
    output_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (image tokens, vec) -> [B, N, out_dim]
    block_list: str  # the network's attribute holding its blocks ("blocks", "joint_blocks")
    # block i on a block-replacement argument dict without activation checkpointing (MMDiT's blocks checkpoint when
    # replaced, and a recomputation in backward would run outside the adapted weights); None: the original block
    uncheckpointed: Callable[[int, dict], dict] | None = None

    def image_tokens(self, x: torch.Tensor) -> int:
        """Image tokens of a latent batch [B, C, H, W] (padded to whole patches)."""
        return math.ceil(x.shape[-2] / self.patch_size) * math.ceil(x.shape[-1] / self.patch_size)

    def shape(self) -> dict:
        return {"architecture": self.name, "blocks": self.blocks, "width": self.width, "vec_dim": self.vec_dim,
                "out_dim": self.out_dim}


def architecture(model, where: str) -> Architecture:
    """The Architecture of a MODEL's diffusion network, or a ValueError naming ``where`` and what is supported."""
    network = model.model.diffusion_model
    if isinstance(network, ToyDiT):
        p = network.patch_size

        def toy_tokens(tokens, vec):
            return rearrange(network.head(tokens, vec), "b c (gh p) (gw q) -> b (gh gw) (c p q)", p=p, q=p)

        width = network.config["width"]
        return Architecture("toy_dit", "single_block", len(network.blocks), width, width,
                            network.in_channels * p * p, p, toy_tokens, "blocks")
    if isinstance(network, MMDiT):
        def mmdit_block(index, args):
            txt, img = network.joint_blocks[index](args["txt"], args["img"], c=args["vec"], use_checkpoint=False,
                                                   transformer_options=args["transformer_options"])
            return {"txt": txt, "img": img}

        width = network.final_layer.adaLN_modulation[1].in_features
        return Architecture("sd3_mmdit", "double_block", len(network.joint_blocks), width, width,
                            network.final_layer.linear.out_features, network.x_embedder.patch_size[0],
                            network.final_layer, "joint_blocks", mmdit_block)
    raise ValueError(f"{where}: 'model' is a {type(model.model).__name__} with a {type(network).__name__} network; "
                     f"DeeDiff exits after transformer blocks and supports {SUPPORTED} (a UNet has no blocks to "
                     "exit from)")


def adapter_shapes(model, arch: Architecture) -> dict[str, tuple[int, int]]:
    """``{weight name: shape}`` of the attention and MLP projections of every block (names under the diffusion
    network; the blocks' adaLN modulation layers are left out): what joint training adapts."""
    blocks = model.model.diffusion_model.get_submodule(arch.block_list)
    return {f"{arch.block_list}.{name}.weight": tuple(module.weight.shape) for name, module in blocks.named_modules()
            if isinstance(module, torch.nn.Linear) and "modulation" not in name}


@dataclass
class TrainedHeads:
    """Uncertainty heads, the backbone's low-rank adapters of joint training (None: heads only) and the identity
    of the model they were trained for."""

    heads: deediff.UncertaintyHeads
    identity: dict
    metadata: dict
    adapters: WeightDeltas | None = None

    def check(self, model, arch: Architecture, where: str) -> None:
        """ValueError naming ``where`` when these heads were made for another model or block count."""
        problems = [f"{key} {self.identity.get(key)!r} (heads) vs {value!r} (model)"
                    for key, value in arch.shape().items() if self.identity.get(key) != value]
        if not problems and self.identity.get("fingerprint") != model_identity(model):
            problems.append(f"weights {self.identity.get('fingerprint')} (heads) vs {model_identity(model)} "
                            "(model)")
        if problems:
            raise ValueError(f"{where}: 'heads' were trained for another model ({'; '.join(problems)}); train heads "
                             f"for this MODEL with {TRAIN_NODE}")


def load_heads(path, where: str) -> TrainedHeads:
    """Read a bundle written by ``train_heads`` (``guidance_kit.deediff/1``) or ``train_joint`` (``/2``: heads and
    adapters); format, keys, shapes and finiteness checked."""
    bundle = load_bundle(path, (deediff.FORMAT, deediff.JOINT_FORMAT), where)
    identity = bundle.metadata.get("identity", {})
    try:
        config = {key: int(identity[key]) for key in ("blocks", "width", "vec_dim", "out_dim", "hidden")}
        adapter = identity.get("adapters")
        if bundle.format == deediff.JOINT_FORMAT:
            adapter = {"shapes": {name: tuple(shape) for name, shape in adapter["shapes"].items()},
                       "rank": int(adapter["rank"]), "alpha": float(adapter["alpha"])}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{where}: {path} has no usable head or adapter configuration in its metadata") from None
    heads = deediff.UncertaintyHeads(**config)
    trainables = {"heads": heads}
    adapters = None
    if bundle.format == deediff.JOINT_FORMAT:
        adapters = trainables["adapters"] = WeightDeltas(adapter["shapes"], adapter["rank"], adapter["alpha"])
    metadata = training.load_trained(path, bundle.format, where, trainables)
    if adapters is not None:
        adapters.eval().requires_grad_(False)
    return TrainedHeads(heads.eval().requires_grad_(False), identity, metadata, adapters)


# ---------------------------------------------------------------- exits while sampling

class DeeDiffRun:
    """Per-run state: the heads on the sampling device, and whether the run's first exit has been marked."""

    def __init__(self, heads: deediff.UncertaintyHeads, threshold: float):
        self.heads, self.threshold = heads, threshold
        self.exited = False

    def heads_on(self, device) -> deediff.UncertaintyHeads:
        if next(self.heads.parameters()).device != torch.device(device):
            self.heads = self.heads.to(device)
        return self.heads


class DeeDiffTechnique(Technique):
    name = "DeeDiff"
    node = PATCH_NODE
    needs_uncond = False

    def __init__(self, trained: TrainedHeads, arch: Architecture, threshold: float):
        self.trained, self.arch, self.threshold = trained, arch, threshold
        self.weight_patches = adapter_patches(trained.adapters) if trained.adapters is not None else {}

    def start_run(self, guider, sigmas, sampler):
        return DeeDiffRun(self.trained.heads, self.threshold)

    def _block_patches(self, patched) -> dict:
        return patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})

    def patch(self, patched, key: str) -> None:
        """The adapters' weight patches (joint bundles), block replacements on every block (wrapping another
        pack's) and the per-call APPLY_MODEL wrapper."""
        if self.weight_patches:
            if any(getattr(entry[1], "deediff_adapter", False) for name in self.weight_patches
                   for entry in patched.patches.get(name, [])):
                raise ValueError(f"{PATCH_NODE}: the MODEL already carries the adapters of another {PATCH_NODE} "
                                 "under another pack's block patch; apply one DeeDiff Early Exit per model")
            patched.add_patches(self.weight_patches)
        forward_key = f"{key}.forward"
        existing = self._block_patches(patched)
        for index in range(self.arch.blocks):
            previous = existing.get((self.arch.block_kind, index))
            replacement = _exit_block(index, previous, forward_key)
            replacement.deediff_key, replacement.previous = key, previous
            patched.set_model_patch_replace(replacement, "dit", self.arch.block_kind, index)
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, key, _exits_per_call(self.arch, key, forward_key))

    def unpatch(self, patched, key: str) -> bool:
        """Unwrap the block replacements installed under ``key`` (when still outermost) and drop the wrapper."""
        existing = self._block_patches(patched)
        mine = [(block, existing.get(block)) for block in ((self.arch.block_kind, i) for i in range(self.arch.blocks))]
        if not all(getattr(replacement, "deediff_key", None) == key for _, replacement in mine):
            return False  # another pack's block patch sits over it: both stay
        for (kind, index), replacement in mine:
            if replacement.previous is None:
                del patched.model_options["transformer_options"]["patches_replace"]["dit"][(kind, index)]
            else:
                patched.set_model_patch_replace(replacement.previous, "dit", kind, index)
        patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, key)
        mine = {id(adapter) for adapter in self.weight_patches.values()}
        for name in self.weight_patches:
            patched.patches[name] = [entry for entry in patched.patches.get(name, []) if id(entry[1]) not in mine]
        patched.patches_uuid = uuid.uuid4()
        return True


def adapter_patches(adapters: WeightDeltas) -> dict:
    """ComfyUI weight patches (``ModelPatcher.add_patches``) adding each adapter's update to its weight: the
    host's LoRA patch, ``W + (alpha / rank) · up @ down``, the update joint training learnt."""
    patches = {}
    for name, (up, down) in adapters.factors().items():
        patches[f"diffusion_model.{name}"] = LoRAAdapter(set(), (up, down, adapters.alpha, None, None, None))
        patches[f"diffusion_model.{name}"].deediff_adapter = True
    return patches


def apply_adapters(model, trained: TrainedHeads):
    """A clone of ``model`` with the adapters of a joint bundle patched onto its weights (no exits): the adapted
    full model."""
    patched = model.clone()
    if trained.adapters is not None:
        patched.add_patches(adapter_patches(trained.adapters))
    return patched


def _exit_block(index: int, previous, forward_key: str):
    """Block replacement ``index``: DeeDiff's ``run_block`` around ``previous`` (another replacement) or the block.
    Called outside a sampling run, or on a batch other than the model call's (another pack sub-batching), it
    runs the block unchanged."""
    def replace(args, extra):
        original = extra["original_block"]
        chain = original if previous is None else (lambda sub: previous(sub, extra))
        forward = args.get("transformer_options", {}).get(forward_key)
        if forward is None or args["img"].shape[0] != forward[0].batch:
            return chain(args)
        exits, heads, threshold = forward
        return deediff.run_block(index, args, chain, heads, threshold, exits)
    return replace


def _exits_per_call(arch: Architecture, key: str, forward_key: str):
    """APPLY_MODEL wrapper: one ForwardExits per model call of a sampling run; its exits go to the run record."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        state: DeeDiffRun | None = run_state(transformer_options, key)
        if state is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        exits = deediff.ForwardExits(x.shape[0], arch.image_tokens(x), arch.blocks, device=x.device)
        options = {**transformer_options, forward_key: (exits, state.heads_on(x.device), state.threshold)}
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        run = current_run({"transformer_options": transformer_options})
        if run is not None and run.current is not None:
            run.act(DeeDiffTechnique.name)
            signals = run.current.signals
            run.signal(exit_depth=signals.get("exit_depth", []) + exits.blocks_run.tolist(),
                       blocks=signals.get("blocks", 0) + exits.block_rows,
                       full_blocks=signals.get("full_blocks", 0) + exits.full_block_rows)
            if not state.exited and exits.block_rows < exits.full_block_rows:
                state.exited = True
                run.mark(f"first early exit ({int((exits.blocks_run < arch.blocks).sum())} of {exits.batch} rows, "
                         f"earliest after block {int(exits.blocks_run.min())})")
        return out
    return wrapper


def patch_deediff(model, trained: TrainedHeads, threshold: float, node_id=None):
    """Clone ``model`` with DeeDiff's early exits (checks the heads against the model first)."""
    threshold = check_number(PATCH_NODE, "threshold", threshold, 0.0, 1.0)
    arch = architecture(model, PATCH_NODE)
    trained.check(model, arch, PATCH_NODE)
    return install(model, DeeDiffTechnique(trained, arch, threshold), node_id)


# ---------------------------------------------------------------- data-free training

@dataclass
class Recording:
    """Diffusion-model inputs of sampling runs, one row per model row: ``x``, ``sigma`` and the model's
    processed conditioning (``conds``: per-row tensors; ``constants``: everything else)."""

    x: torch.Tensor
    sigma: torch.Tensor
    conds: dict
    constants: dict

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return self.x[index], self.sigma[index], {**self.constants, **{k: v[index] for k, v in self.conds.items()}}


def record_model_inputs(model, positives: list, negative, latent: dict, *, seed: int, steps: int, cfg: float,
                        sampler_name: str, scheduler: str, denoise: float = 1.0, on_step=None,
                        after_first_run: Callable[[int], None] | None = None) -> Recording:
    """Sample every positive CONDITIONING with full CFG (the latent's batch, noise from ``seed + index`` modulo
    2**64) and record every diffusion-model call's inputs.  ComfyUI's interrupt is checked every step;
    ``after_first_run(rows)`` gets the model rows the first run recorded (e.g. to check memory again)."""
    calls = []
    recorder = model.clone()

    def record(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        if control is not None:
            raise ValueError(f"{TRAIN_NODE}: ControlNet conditioning is not supported for training heads")
        inputs = {"c_concat": c_concat, "c_crossattn": c_crossattn, **kwargs}
        calls.append((x.detach().cpu(), t.detach().cpu().expand(x.shape[0]).clone(),
                      {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    recorder.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "guidance_kit.deediff.record", record)
    for index, positive in enumerate(positives):
        stock_cfg_run(recorder, positive, negative, latent, seed=training.offset_seed(seed, index), steps=steps,
                      cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, on_step=on_step)
        if index == 0 and after_first_run is not None:
            after_first_run(sum(call[0].shape[0] for call in calls))
    return _stack_calls(calls)


def _stack_calls(calls) -> Recording:
    conds, constants = {}, {}
    for name, value in calls[0][2].items():
        if isinstance(value, torch.Tensor) and all(isinstance(c[2][name], torch.Tensor) and
                                                   c[2][name].shape[0] == c[0].shape[0] for c in calls):
            shapes = {tuple(c[2][name].shape[1:]) for c in calls}
            if len(shapes) > 1:
                raise ValueError(f"{TRAIN_NODE}: the prompts' conditioning '{name}' has different shapes "
                                 f"{sorted(shapes)}; use prompts that encode to the same length")
            conds[name] = torch.cat([c[2][name] for c in calls])
        else:
            constants[name] = value
    return Recording(torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]), conds, constants)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model's diffusion network (state names under the model) as tensors
    autograd can save and that get no gradient: the model's own, detached, or a copy of those made under
    ``torch.inference_mode`` (as ComfyUI loads models), which autograd refuses to save for backward."""
    network = model.model.diffusion_model
    with training.grad_mode():
        return {f"diffusion_model.{name}": value.detach().clone() if value.is_inference() else value.detach()
                for name, value in [*network.named_parameters(), *network.named_buffers()]}


class _Calling(torch.nn.Module):
    """``function(*args, **kwargs)`` as the forward of a module holding ``base`` (a ComfyUI model), so
    ``functional_call`` puts other tensors in place of ``base``'s while ``function`` runs."""

    def __init__(self, base, function):
        super().__init__()
        self.base, self.function = base, function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def _with_state(model, state: dict[str, torch.Tensor], function, *args, **kwargs):
    """``function(*args, **kwargs)`` with ``state`` (names under ``model.model``) in place of the model's tensors."""
    return torch.func.functional_call(_Calling(model.model, function), {f"base.{k}": v for k, v in state.items()},
                                      args, kwargs, strict=False)


def exit_predictions(model, arch: Architecture, hidden: list[torch.Tensor], vec: torch.Tensor,
                     state: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """g(h_i) of every block's image tokens through the model's own output head (float32): without gradients, or
    with ``state`` (``frozen_state``) in place of the model's tensors, differentiable."""
    def read():
        return [arch.output_tokens(h, vec).float() for h in hidden]
    if state is None:
        with torch.no_grad():
            return read()
    return _with_state(model, state, read)


def block_outputs(model, arch: Architecture, x, sigma, inputs: dict,
                  adapted: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(image tokens after every block, modulation vector) of one forward pass of the model: frozen and without
    gradients, or, with ``adapted`` (``{state name under the model, e.g. "diffusion_model.blocks.0.attn.qkv.weight":
    tensor}``, see ``frozen_state``), with those tensors in place of the model's and differentiable in them."""
    captured, vec = [], []
    tokens = arch.image_tokens(x)

    def recorder(args, extra):
        if adapted is not None and arch.uncheckpointed is not None:
            out = arch.uncheckpointed(len(captured), args)
        else:
            out = extra["original_block"](args)
        captured.append(out["img"][:, -tokens:])
        vec[:] = [args["vec"]]
        return out

    options = {"patches_replace": {"dit": {(arch.block_kind, i): recorder for i in range(arch.blocks)}}}
    device = model.load_device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if adapted is None:
        with torch.no_grad():
            model.model.apply_model(x.to(device), sigma.to(device), transformer_options=options, **inputs)
    else:
        _with_state(model, adapted, model.model.apply_model, x.to(device), sigma.to(device),
                    transformer_options=options, **inputs)
    return captured, vec[0]


@dataclass
class ExitFeatures:
    """What the heads train on, per recorded row: every exit's image tokens [R, E, N, W] (float16), the
    modulation vector [R, D], and every exit's pseudo uncertainty û_i against the model's final output
    (Eq. 5) [R, E, N, O] (float16).  The model is frozen, so these are computed once."""

    tokens: torch.Tensor
    vec: torch.Tensor
    pseudo: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def exit_features(model, arch: Architecture, recording: Recording, rows: int, *, chunk: int = FEATURE_CHUNK,
                  on_chunk=None) -> ExitFeatures:
    """ExitFeatures of ``rows`` recorded rows evenly spaced over the recording (all of them when fewer);
    ComfyUI's interrupt is checked before every chunk."""
    comfy.model_management.load_models_gpu([model])
    index = torch.linspace(0, len(recording) - 1, min(rows, len(recording))).round().long().unique()
    tokens, vecs, pseudo = [], [], []
    for part in index.split(chunk):
        check_interrupt()
        hidden, vec = block_outputs(model, arch, *recording.rows(part))
        predictions = exit_predictions(model, arch, hidden, vec)
        tokens.append(torch.stack(hidden[:-1], dim=1).half().cpu())
        vecs.append(vec.float().cpu())
        pseudo.append(torch.stack([deediff.pseudo_uncertainty(p, predictions[-1]) for p in predictions[:-1]],
                                  dim=1).half().cpu())
        if on_chunk is not None:
            on_chunk(part.numel())
    return ExitFeatures(torch.cat(tokens), torch.cat(vecs), torch.cat(pseudo))


def heads_loss(heads: deediff.UncertaintyHeads, features: ExitFeatures, settings: training.TrainSettings):
    """``loss_fn(step, rows)`` for ``training.train``: the uncertainty loss (Eq. 6) over rows ``rows`` of step
    ``step``'s global batch, drawn from ``step_generator(seed, step)`` over the feature rows."""
    def loss_fn(step: int, rows: slice) -> torch.Tensor:
        index = torch.randint(len(features), (settings.batch_size,), generator=training.step_generator(
            settings.seed, step))[rows]
        device = next(heads.parameters()).device
        tokens, vec = features.tokens[index].to(device), features.vec[index].to(device)
        uncertainties = [heads(i, tokens[:, i], vec) for i in range(heads.exits)]
        return deediff.uncertainty_loss(uncertainties, features.pseudo[index].to(device).unbind(dim=1))
    return loss_fn


def heads_step_memory(arch: Architecture, hidden: int, tokens: int) -> training.StepMemory:
    """``training.step_memory`` of one optimiser step of the heads over ``tokens`` image tokens, probed on one
    exit over ``PROBE_TOKENS`` tokens with synthetic features and scaled to every exit and token (the exits are
    alike and work token by token)."""
    probe_tokens = min(tokens, PROBE_TOKENS)
    with training.grad_mode():
        one_exit = deediff.UncertaintyHeads(2, arch.width, arch.vec_dim, arch.out_dim, hidden)

    def forward(rows):
        features = ExitFeatures(torch.zeros(rows, 1, probe_tokens, arch.width, dtype=torch.float16),
                                torch.zeros(rows, arch.vec_dim),
                                torch.zeros(rows, 1, probe_tokens, arch.out_dim, dtype=torch.float16))
        return heads_loss(one_exit, features, training.TrainSettings(steps=1, batch_size=rows))(0, slice(None))

    measured = training.step_memory({"heads": one_exit}, forward)
    exits = arch.blocks - 1
    return training.StepMemory(math.ceil(measured.per_row * exits * tokens / probe_tokens), measured.fixed * exits)


def feature_row_bytes(arch: Architecture, tokens: int) -> int:
    """Bytes of one ExitFeatures row: every exit's tokens and pseudo uncertainty (float16), the vector."""
    exits = arch.blocks - 1
    return tensor_bytes([exits, tokens, arch.width + arch.out_dim], torch.float16) + tensor_bytes([arch.vec_dim])


def memory_needs(model, arch: Architecture, latent: dict, negative, *, runs: int, rows_per_run: int,
                 training_rows: int, batch_size: int, hidden: int, joint: bool = False) -> list[Need]:
    """What DeeDiff Train Heads holds at its peak (``training_guard``): the recorded model inputs of ``runs``
    runs of ``rows_per_run`` model rows (twice while concatenated), the exit features (twice while
    concatenated), one chunk's block outputs, and one optimiser step measured on a probe of the heads."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    tokens = arch.image_tokens(samples)
    conditioning = sum(tensor.numel() * tensor.element_size() for entry in negative
                       for tensor in [entry[0], *entry[1].values()] if isinstance(tensor, torch.Tensor))
    recorded_row = tensor_bytes(samples.shape[1:]) + conditioning + tensor_bytes([1])
    rows = runs * rows_per_run
    kept = min(training_rows, rows)
    feature_row = feature_row_bytes(arch, tokens)
    chunk = min(FEATURE_CHUNK, kept)
    step = heads_step_memory(arch, hidden, tokens)
    prompts_need = Need("prompts", f"the model inputs of {runs} runs x {rows_per_run} rows ({size(recorded_row)} "
                                   "per row), twice while concatenated", 2 * rows * recorded_row)
    if joint:
        sequence = tokens + max(int(entry[0].shape[1]) for entry in negative)
        activations = JOINT_SAVED_PER_TOKEN_WIDTH * arch.blocks * sequence * arch.width * 4
        target_row = tensor_bytes([tokens, arch.out_dim])
        return [prompts_need,
                Need("training_rows", f"the kept model inputs and the frozen outputs of {kept} rows",
                     kept * (recorded_row + target_row)),
                Need("batch_size", f"one joint optimiser step of {batch_size} rows (every block's activations, "
                                   f"{size(activations)} per row)", batch_size * training.ACTIVATION_FACTOR *
                     activations, on_device=True)]
    return [
        prompts_need,
        Need("training_rows", f"exit features of {kept} rows ({size(feature_row)} each), twice while concatenated",
             2 * kept * feature_row),
        Need("training_rows", f"block outputs of a chunk of {chunk} rows",
             chunk * (arch.blocks * tokens * (arch.width + arch.out_dim) * 4 + feature_row), on_device=True),
        Need("batch_size", f"one optimiser step of {batch_size} rows ({size(step.per_row)} per row measured on the "
                           "heads, plus their features)", batch_size * (step.per_row + feature_row), on_device=True),
        Need("head_hidden", "the heads with their gradients and AdamW state", step.fixed, on_device=True),
    ]


def train_heads(model, features: ExitFeatures, settings: training.TrainSettings, path, *, hidden: int = 0,
                data: dict | None = None, checkpoint=None, context: training.DistributedContext | None = None,
                on_step=None, where: str = TRAIN_NODE) -> tuple[TrainedHeads, training.TrainResult]:
    """Train uncertainty heads for ``model`` on ``features`` with the shared training core; the main process
    saves them to ``path`` (with the model's identity, the block count and the training settings).  On
    ComfyUI's interrupt the run checkpoints, nothing is saved to ``path``, and the interrupt is raised."""
    arch = architecture(model, where)
    context = context or training.DistributedContext.from_environment(model.load_device)
    torch.manual_seed(settings.seed)
    with training.grad_mode():
        heads = deediff.UncertaintyHeads(arch.blocks, arch.width, arch.vec_dim, arch.out_dim, hidden).to(
            context.device)
    identity = {**arch.shape(), "hidden": hidden, "fingerprint": model_identity(model), "data": data or {}}
    result = training.train({"heads": heads}, heads_loss(heads, features, settings), settings, context,
                            identity=identity, checkpoint=checkpoint, checkpoint_every=max(1, settings.steps // 10),
                            on_step=on_step, should_stop=interrupt_requested)
    if not result.completed:
        raise_interrupt()
    if context.is_main:
        training.save_trained(path, {"heads": heads}, deediff.FORMAT, identity, settings, result)
    return TrainedHeads(heads.eval().requires_grad_(False), identity, {"steps": result.step}), result


@dataclass
class JointData:
    """What joint training replays: recorded model inputs (``rows`` of a Recording) and the frozen model's output
    tokens y on each [R, N, out_dim]."""

    recording: Recording
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def joint_data(model, arch: Architecture, recording: Recording, rows: int, *, chunk: int = FEATURE_CHUNK,
               on_chunk=None) -> JointData:
    """``rows`` recorded rows evenly spaced over the recording (all of them when fewer) with the frozen model's
    output on each; ComfyUI's interrupt is checked before every chunk."""
    comfy.model_management.load_models_gpu([model])
    index = torch.linspace(0, len(recording) - 1, min(rows, len(recording))).round().long().unique()
    targets = []
    for part in index.split(chunk):
        check_interrupt()
        hidden, vec = block_outputs(model, arch, *recording.rows(part))
        targets.append(exit_predictions(model, arch, hidden[-1:], vec)[0].cpu())
        if on_chunk is not None:
            on_chunk(part.numel())
    x, sigma, inputs = recording.rows(index)
    kept = Recording(x, sigma, {name: inputs[name] for name in recording.conds}, recording.constants)
    return JointData(kept, torch.cat(targets))


def adapted_state(state: dict[str, torch.Tensor], adapters: WeightDeltas) -> dict[str, torch.Tensor]:
    """``state`` (``frozen_state``) with the adapters' updates added to their weights (differentiable in them)."""
    targets = {name: state[f"diffusion_model.{name}"] for name in adapters.names}
    return {**state, **{f"diffusion_model.{name}": value for name, value in adapters.merged(targets).items()}}


def joint_loss(model, arch: Architecture, heads: deediff.UncertaintyHeads, adapters: WeightDeltas, data: JointData,
               settings: training.TrainSettings, distill_weight: float):
    """``loss_fn(step, rows)`` for ``training.train``: ``deediff.joint_loss`` (L_UAL + L_u + λ·self-distillation)
    of the adapted model over rows ``rows`` of step ``step``'s global batch, drawn from ``step_generator(seed,
    step)`` over the recorded rows."""
    state = frozen_state(model)

    def loss_fn(step: int, rows: slice) -> torch.Tensor:
        index = torch.randint(len(data), (settings.batch_size,), generator=training.step_generator(
            settings.seed, step))[rows]
        hidden, vec = block_outputs(model, arch, *data.recording.rows(index), adapted=adapted_state(state, adapters))
        predictions = exit_predictions(model, arch, hidden, vec, state)
        uncertainties = [heads(i, hidden[i], vec) for i in range(heads.exits)]
        return deediff.joint_loss(uncertainties, predictions, data.targets[index].to(vec.device), distill_weight)
    return loss_fn


def train_joint(model, data: JointData, settings: training.TrainSettings, path, *, rank: int, alpha: float,
                distill_weight: float, hidden: int = 0, info: dict | None = None, checkpoint=None,
                context: training.DistributedContext | None = None, on_step=None,
                where: str = TRAIN_NODE) -> tuple[TrainedHeads, training.TrainResult]:
    """Train heads and the backbone's low-rank adapters jointly for ``model`` (frozen; ``adapter_shapes``) on
    ``data`` with the shared training core; the main process saves a ``guidance_kit.deediff/2`` bundle to ``path``
    (heads, adapters, the model's identity, the adapter configuration, the training settings).  On ComfyUI's
    interrupt the run checkpoints, nothing is saved to ``path``, and the interrupt is raised."""
    arch = architecture(model, where)
    context = context or training.DistributedContext.from_environment(model.load_device)
    comfy.model_management.load_models_gpu([model])
    shapes = adapter_shapes(model, arch)
    torch.manual_seed(settings.seed)
    with training.grad_mode():
        heads = deediff.UncertaintyHeads(arch.blocks, arch.width, arch.vec_dim, arch.out_dim, hidden).to(
            context.device)
        adapters = WeightDeltas(shapes, rank, alpha, seed=settings.seed).to(context.device)
    identity = {**arch.shape(), "hidden": hidden, "fingerprint": model_identity(model), "data": info or {},
                "adapters": {"rank": rank, "alpha": alpha, "shapes": shapes}, "distill_weight": distill_weight}
    trainables = {"heads": heads, "adapters": adapters}
    result = training.train(trainables, joint_loss(model, arch, heads, adapters, data, settings, distill_weight),
                            settings, context, identity=identity, checkpoint=checkpoint,
                            checkpoint_every=max(1, settings.steps // 10), on_step=on_step,
                            should_stop=interrupt_requested)
    if not result.completed:
        raise_interrupt()
    if context.is_main:
        training.save_trained(path, trainables, deediff.JOINT_FORMAT, identity, settings, result)
    return TrainedHeads(heads.eval().requires_grad_(False), identity, {"steps": result.step},
                        adapters.eval().requires_grad_(False)), result


def prompts_fingerprint(prompts: list[str], negative: str) -> str:
    """Identity of a prompt list and negative prompt (a checkpoint resumes only for the same ones)."""
    return hashlib.sha256("\n".join([negative, *prompts]).encode()).hexdigest()[:16]


class DeeDiffTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitDeeDiffTrain",
            display_name=TRAIN_NODE,
            category=CATEGORY,
            description="Trains DeeDiff's uncertainty heads (one per transformer block) for this MODEL, data-free: "
                        "on the inputs of full-CFG sampling runs over the prompts. With adapter_rank > 0 it also "
                        "trains low-rank adapters of the blocks (the paper's joint training) so early blocks become "
                        "exits. Saved to models/deediff/; resumes an interrupted run of the same settings.",
            is_output_node=True,
            inputs=[
                model_input("The diffusion transformer to train heads for (it is not modified)."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts and the negative prompt."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Training prompts, one per line (a few dozen varied prompts)."),
                io.String.Input("negative_prompt", default="", multiline=True, tooltip="Negative prompt of the runs."),
                io.Latent.Input("latent", tooltip="Latent of the runs: its size and batch (images per prompt). "
                                                  "An encoded image batch with denoise < 1 starts from those images."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the sampling noise (seed + i for prompt i) and of the training batches."),
                io.Int.Input("sample_steps", default=20, min=1, max=200, tooltip="Steps of the recorded runs."),
                io.Float.Input("cfg", default=4.0, min=1.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the recorded runs (use the scale you will sample with)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple"),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1: runs start from noise. Below 1 they start from the latent's images."),
                io.Int.Input("train_steps", default=1000, min=1, max=1000000, tooltip="Optimiser steps."),
                io.Int.Input("training_rows", default=2048, min=1, max=1000000,
                             tooltip="Recorded model rows (evenly spaced over the runs) whose block outputs are kept "
                                     "for training (about 160 KB each on the toy model)."),
                io.Int.Input("batch_size", default=64, min=1, max=4096, tooltip="Rows per optimiser step."),
                io.Float.Input("learning_rate", default=3e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6),
                io.Int.Input("head_hidden", default=0, min=0, max=4096,
                             tooltip="0: the paper's linear head. Otherwise a hidden layer of this width."),
                io.String.Input("filename", default="deediff_heads",
                                tooltip="File name in models/deediff/ (.safetensors is added; overwritten)."),
                io.Int.Input("adapter_rank", default=0, min=0, max=256, optional=True,
                             tooltip="0: heads only (the MODEL as it is). Otherwise the paper's joint training: "
                                     "low-rank adapters of this rank on every block's attention and MLP projections "
                                     "are trained with the heads so that early blocks become usable exits (the "
                                     "adapters are saved with the heads and applied by DeeDiff Early Exit)."),
                io.Float.Input("distill_weight", default=1.0, min=0.0, max=100.0, step=0.1, round=0.001,
                               optional=True,
                               tooltip="Joint training: weight of the term keeping the adapted model's full-depth "
                                       "output on the original model's."),
            ],
            outputs=[DeeDiffHeads.Output(display_name="heads")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, prompts, negative_prompt, latent, seed, sample_steps, cfg, sampler_name, scheduler,
                denoise, train_steps, training_rows, batch_size, learning_rate, head_hidden,
                filename, adapter_rank=0, distill_weight=1.0) -> io.NodeOutput:
        check_numeric_inputs(cls, TRAIN_NODE, {"seed": seed, "sample_steps": sample_steps, "cfg": cfg,
                                               "denoise": denoise, "train_steps": train_steps,
                                               "training_rows": training_rows, "batch_size": batch_size,
                                               "learning_rate": learning_rate, "head_hidden": head_hidden,
                                               "adapter_rank": adapter_rank, "distill_weight": distill_weight})
        path = model_files.output_path(FOLDER, filename, TRAIN_NODE)
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{TRAIN_NODE}: 'prompts' is empty; give at least one prompt (one per line)")
        arch = architecture(model, TRAIN_NODE)
        check_number(TRAIN_NODE, "cfg", cfg, 1.0, 100.0)
        check_number(TRAIN_NODE, "learning_rate", learning_rate, 0.0, 1.0, low_open=True)
        check_number(TRAIN_NODE, "denoise", denoise, 0.0, 1.0, low_open=True)
        settings = training.TrainSettings(steps=train_steps, batch_size=batch_size, lr=learning_rate, seed=seed)
        negative = encode_prompt(clip, negative_prompt)
        images = int(latent["samples"].shape[0])

        def check(rows_per_run: int) -> None:
            check_memory(TRAIN_NODE, memory_needs(model, arch, latent, negative, runs=len(lines),
                                                  rows_per_run=rows_per_run, training_rows=training_rows,
                                                  batch_size=batch_size, hidden=head_hidden,
                                                  joint=adapter_rank > 0), model.load_device)

        check(sample_steps * images * (2 if cfg > 1 else 1))  # one model call per step: the fewest of any sampler
        log_work(TRAIN_NODE, f"{len(lines)} sampling runs of {sample_steps} steps at batch {images}, block outputs "
                             f"of up to {training_rows} rows, {train_steps} optimiser steps of {batch_size} rows")
        recorded_rows = min(training_rows, len(lines) * sample_steps * 2 * images)
        before_training = len(lines) * sample_steps + recorded_rows
        progress = comfy.utils.ProgressBar(before_training + train_steps, node_id=node_id_of(cls))
        data = {"prompts": len(lines), "prompts_fingerprint": prompts_fingerprint(lines, negative_prompt),
                "images": len(lines) * images, "rows": training_rows, "sampler": sampler_name,
                "scheduler": scheduler, "sample_steps": sample_steps, "cfg": cfg, "denoise": denoise,
                "negative_prompt": negative_prompt}
        positives = [encode_prompt(clip, line) for line in lines]
        recording = record_model_inputs(model, positives, negative, latent, seed=seed, steps=sample_steps, cfg=cfg,
                                        sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
                                        on_step=lambda: progress.update(1), after_first_run=check)
        features = (joint_data if adapter_rank else exit_features)(model, arch, recording, training_rows,
                                                                   on_chunk=progress.update)
        del recording  # training uses the kept rows only
        checkpoint = path.parent / CHECKPOINT_SUBFOLDER / path.name

        def on_step(step, total, loss):
            progress.update_absolute(before_training + step)

        if adapter_rank:
            trained, result = train_joint(model, features, settings, path, rank=adapter_rank, alpha=float(adapter_rank),
                                          distill_weight=distill_weight, hidden=head_hidden, info=data,
                                          checkpoint=checkpoint, on_step=on_step)
        else:
            trained, result = train_heads(model, features, settings, path, hidden=head_hidden, data=data,
                                          checkpoint=checkpoint, on_step=on_step)
        checkpoint.unlink(missing_ok=True)
        logger.info(f"DeeDiff: saved {path} ({result.step} steps, final loss {result.final_loss:.4g})")
        return io.NodeOutput(trained)


class DeeDiffLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitDeeDiffLoad",
            display_name=LOAD_NODE,
            category=CATEGORY,
            inputs=[io.Combo.Input("heads", options=model_files.choices(FOLDER),
                                   tooltip="Heads (and, from joint training, the model's adapters) written by DeeDiff "
                                           "Train Heads (models/deediff/), or the shipped toy bundles: "
                                           "toy_dit_heads (heads only), toy_dit_joint (heads + adapters).")],
            outputs=[DeeDiffHeads.Output(display_name="heads")],
        )

    @classmethod
    def execute(cls, heads) -> io.NodeOutput:
        return io.NodeOutput(load_heads(model_files.resolve(FOLDER, heads, LOAD_NODE, "heads"), f"{LOAD_NODE} 'heads'"))


class DeeDiffModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitDeeDiff",
            display_name=PATCH_NODE,
            category=CATEGORY,
            description="MODEL patch: after each transformer block, every model row whose predicted confidence "
                        "reaches the threshold stops there and the model's output head reads it (DeeDiff, "
                        "arXiv 2309.17074). Stacks with other patches (Adaptive Guidance, LinearAG, Composable).",
            inputs=[model_input("The diffusion transformer the heads were trained for (it is cloned, never "
                                "modified)."),
                    DeeDiffHeads.Input("heads", tooltip="From DeeDiff Train Heads or DeeDiff Load Heads."),
                    io.Float.Input("threshold", default=0.9, min=0.0, max=1.0, step=0.001, round=0.0001,
                                   tooltip="Confidence (1 - mean predicted uncertainty) at which a row exits. "
                                           "1.0 = never (the full model); lower exits earlier.")],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, heads, threshold) -> io.NodeOutput:
        return io.NodeOutput(patch_deediff(model, heads, threshold, node_id_of(cls)))


NODES = [DeeDiffTrain, DeeDiffLoad, DeeDiffModelPatch]
