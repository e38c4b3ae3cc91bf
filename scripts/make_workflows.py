"""Writes the shipped workflows: the real-model ones (``<family>_<technique>.json``: SD1.5, SDXL, SD3.5,
Flux with the stock loaders and the standard file names) built here, the toy ones (``toy_*.json``,
edited by hand) laid out again, and ``example_workflows/`` (the folder ComfyUI serves as the pack's
templates and the Comfy Registry packs) as a byte-for-byte copy of ``workflows/``.

    .venv/bin/python scripts/make_workflows.py          # rewrite workflows/ and example_workflows/

Needs the server's /object_info (each node's inputs and widget order), so it starts the real server
once (about 15 s).  ``tests/test_workflow_files.py`` checks the copy, the layout and the node types.
"""
import json
import shutil
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.workflow_api import _widget_names  # noqa: E402
from scripts.workflow_layout import arrange, enlarge_small_images, set_note  # noqa: E402

WORKFLOWS, EXAMPLES = REPO / "workflows", REPO / "example_workflows"
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# family -> stock files (standard names), image size and the sampler settings of its model card / ComfyUI example
FAMILIES = {
    "sd15": dict(label="SD1.5", checkpoint="v1-5-pruned-emaonly.safetensors", size=512, steps=20, cfg=7.0,
                 sampler="euler", scheduler="normal"),
    "sdxl": dict(label="SDXL", checkpoint="sd_xl_base_1.0.safetensors", size=1024, steps=25, cfg=7.0,
                 sampler="euler", scheduler="normal"),
    "sd35": dict(label="SD3.5", checkpoint="sd3.5_medium.safetensors", size=1024, steps=40, cfg=4.5,
                 sampler="euler", scheduler="sgm_uniform",
                 text_encoders=("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")),
    "flux": dict(label="Flux", diffusion_model="flux1-dev.safetensors", vae="ae.safetensors", size=1024, steps=20,
                 cfg=1.0, sampler="euler", scheduler="simple", guidance=3.5,
                 text_encoders=("clip_l.safetensors", "t5xxl_fp16.safetensors")),
}
PROMPT = "a photograph of a red fox sitting in a snowy forest, morning light, detailed fur"
NEGATIVE = "blurry, low quality, watermark"
COMPOSABLE = "a red fox in a snowy forest AND a wooden cabin AND NOT people"
CALIBRATION_PROMPTS = "\n".join(["a red fox in a snowy forest", "a bowl of ramen on a wooden table",
                                 "a lighthouse on a cliff at sunset", "a portrait of an old sailor"])
RELATION_PROMPT = "a red fox sitting to the left of a wooden cabin in a snowy forest"
RELATION_WORDS = "to the left of"
FUR_COLOURS = "colour: red, grey, white, black"  # GFCG's and PPAP's zero-shot classes; "red" is the prompt's phrase
PPAP_IMAGES = 64  # PPAP Train Experts' clean samples on a real model (the node's default 1024 is the toy world's)


class Builder:
    """A UI-format workflow (File > Save) built node by node from the server's /object_info."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes, self.links = [], []

    def node(self, node_type: str, title: str | None = None, **widgets) -> dict:
        definition = self.info[node_type]
        values = []
        for name, control in _widget_names(definition):
            spec = definition["input"]["required"].get(name) or definition["input"]["optional"][name]
            kind, *rest = spec
            options = rest[0] if rest else {}
            default = options.get("default", kind[0] if isinstance(kind, list) and kind else
                                  (options.get("options") or [None])[0])
            values.append(widgets.pop(name, default))
            if control:
                values.append("fixed")
        if widgets:
            raise ValueError(f"{node_type} has no widgets {sorted(widgets)}")
        inputs = []
        for section in ("required", "optional"):
            for name in definition["input_order"].get(section, []):
                kind = definition["input"][section][name][0]
                if not isinstance(kind, list) and kind not in WIDGET_KINDS:
                    inputs.append({"name": name, "type": kind, "link": None})
        outputs = [{"name": name, "type": kind, "links": []}
                   for name, kind in zip(definition["output_name"], definition["output"])]
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": [0, 0], "size": [360, 120], "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def connect(self, source: dict, output: int, target: dict, input_name: str) -> None:
        slot = next(i for i, entry in enumerate(target["inputs"]) if entry["name"] == input_name)
        link_id = len(self.links) + 1
        kind = source["outputs"][output]["type"]
        self.links.append([link_id, source["id"], output, target["id"], slot, kind])
        target["inputs"][slot]["link"] = link_id
        source["outputs"][output]["links"].append(link_id)

    def workflow(self, name: str) -> dict:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"guidance-kit/{name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def family_base(b: Builder, family: str, checkpoint: str | None = None, prompt: str = PROMPT) -> dict:
    """The family's stock loaders, prompts and empty latent: {model, clip, vae, positive, negative, latent} as
    (node, output) pairs."""
    spec = FAMILIES[family]
    if family == "flux":
        unet = b.node("UNETLoader", unet_name=spec["diffusion_model"])
        clip = b.node("DualCLIPLoader", clip_name1=spec["text_encoders"][0], clip_name2=spec["text_encoders"][1],
                      type="flux")
        vae = b.node("VAELoader", vae_name=spec["vae"])
        model_out, clip_out, vae_out = (unet, 0), (clip, 0), (vae, 0)
    else:
        ckpt = b.node("CheckpointLoaderSimple", ckpt_name=checkpoint or spec["checkpoint"])
        model_out, clip_out, vae_out = (ckpt, 0), (ckpt, 1), (ckpt, 2)
        if family == "sd35":
            names = spec["text_encoders"]
            clip = b.node("TripleCLIPLoader", clip_name1=names[0], clip_name2=names[1], clip_name3=names[2])
            clip_out = (clip, 0)
    positive = b.node("CLIPTextEncode", title="Positive prompt", text=prompt)
    negative = b.node("CLIPTextEncode", title="Negative prompt", text="" if family == "flux" else NEGATIVE)
    for encoder in (positive, negative):
        b.connect(*clip_out, encoder, "clip")
    positive_out = (positive, 0)
    if family == "flux":
        guidance = b.node("FluxGuidance", guidance=spec["guidance"])
        b.connect(positive, 0, guidance, "conditioning")
        positive_out = (guidance, 0)
    latent_type = "EmptyLatentImage" if family in ("sd15", "sdxl") else "EmptySD3LatentImage"
    latent = b.node(latent_type, width=spec["size"], height=spec["size"], batch_size=1)
    return dict(model=model_out, clip=clip_out, vae=vae_out, positive=positive_out, negative=(negative, 0),
                latent=(latent, 0))


def ksampler(b: Builder, family: str, base: dict, model: tuple, positive: tuple | None = None,
             cfg: float | None = None) -> dict:
    spec = FAMILIES[family]
    sampler = b.node("KSampler", seed=42, steps=spec["steps"], cfg=spec["cfg"] if cfg is None else cfg,
                     sampler_name=spec["sampler"], scheduler=spec["scheduler"])
    b.connect(*model, sampler, "model")
    b.connect(*(positive or base["positive"]), sampler, "positive")
    b.connect(*base["negative"], sampler, "negative")
    b.connect(*base["latent"], sampler, "latent_image")
    return sampler


def outputs(b: Builder, base: dict, samples: dict, name: str, stats_source: tuple | None = None) -> None:
    decode = b.node("VAEDecode")
    b.connect(samples, 0, decode, "samples")
    b.connect(*base["vae"], decode, "vae")
    save = b.node("SaveImage", filename_prefix=f"guidance_kit/{name}")
    b.connect(decode, 0, save, "images")
    if stats_source:
        stats = b.node("GuidanceKitRunStats")
        b.connect(*stats_source, stats, "source")
        b.connect(samples, 0, stats, "latent")
        plot = b.node("PreviewImage", title="Run statistics")
        b.connect(stats, 0, plot, "images")


def adaptive_guidance(b: Builder, family: str, name: str) -> None:
    base = family_base(b, family)
    patch = b.node("GuidanceKitAdaptiveGuidance")
    b.connect(*base["model"], patch, "model")
    outputs(b, base, ksampler(b, family, base, (patch, 0)), name, (patch, 0))


def composable(b: Builder, family: str, name: str) -> None:
    base = family_base(b, family)
    prompt = b.node("GuidanceKitComposablePrompt", text=COMPOSABLE)
    b.connect(*base["clip"], prompt, "clip")
    patch = b.node("GuidanceKitComposableModelPatch")
    b.connect(*base["model"], patch, "model")
    outputs(b, base, ksampler(b, family, base, (patch, 0), positive=(prompt, 0)), name, (patch, 0))


def custom_sampler(b: Builder, base: dict, guider: dict, sigmas: dict, sampler_name: str) -> dict:
    """SamplerCustomAdvanced with seed 42 over ``guider`` and ``sigmas``."""
    noise = b.node("RandomNoise", noise_seed=42)
    sampler_select = b.node("KSamplerSelect", sampler_name=sampler_name)
    sampler = b.node("SamplerCustomAdvanced")
    for source, input_name in ((noise, "noise"), (guider, "guider"), (sampler_select, "sampler"),
                               (sigmas, "sigmas")):
        b.connect(source, 0, sampler, input_name)
    b.connect(*base["latent"], sampler, "latent_image")
    return sampler


def connect_guider(b: Builder, base: dict, guider: dict) -> None:
    b.connect(*base["model"], guider, "model")
    b.connect(*base["positive"], guider, "positive")
    b.connect(*base["negative"], guider, "negative")


def lina_schedule(b: Builder, family: str, name: str) -> None:
    spec = FAMILIES[family]
    base = family_base(b, family)
    guider = b.node("GuidanceKitReferenceCFGGuider", cfg=spec["cfg"])
    connect_guider(b, base, guider)
    schedule = b.node("GuidanceKitLINASchedule", scheduler=spec["scheduler"], steps=spec["steps"])
    b.connect(*base["model"], schedule, "model")
    outputs(b, base, custom_sampler(b, base, guider, schedule, spec["sampler"]), name, (guider, 0))


def lina(b: Builder, family: str, name: str) -> None:
    spec = FAMILIES[family]
    base = family_base(b, family, prompt=RELATION_PROMPT)
    relation = b.node("GuidanceKitLINARelationPrompt", text=RELATION_PROMPT, words=RELATION_WORDS)
    b.connect(*base["clip"], relation, "clip")
    guider = b.node("GuidanceKitLINAGuider", cfg=spec["cfg"])
    connect_guider(b, base, guider)
    b.connect(relation, 0, guider, "ablated")
    scheduler = b.node("BasicScheduler", scheduler=spec["scheduler"], steps=spec["steps"])
    b.connect(*base["model"], scheduler, "model")
    outputs(b, base, custom_sampler(b, base, guider, scheduler, spec["sampler"]), name, (guider, 0))


def linear_ag(b: Builder, family: str, name: str) -> None:
    spec = FAMILIES[family]
    base = family_base(b, family)
    calibrate = b.node("GuidanceKitLinearAGCalibrate", prompts=CALIBRATION_PROMPTS, negative_prompt=NEGATIVE,
                       steps=spec["steps"], cfg=spec["cfg"], sampler_name=spec["sampler"],
                       scheduler=spec["scheduler"], filename=f"linear_ag_{family}")
    b.connect(*base["model"], calibrate, "model")
    b.connect(*base["clip"], calibrate, "clip")
    b.connect(*base["latent"], calibrate, "latent")
    patch = b.node("GuidanceKitLinearAG")
    b.connect(*base["model"], patch, "model")
    b.connect(calibrate, 0, patch, "linear_ag")
    outputs(b, base, ksampler(b, family, base, (patch, 0)), name, (patch, 0))


def autoguidance(b: Builder, family: str, name: str) -> None:
    base = family_base(b, family, checkpoint="sd3.5_large.safetensors")
    weak = b.node("CheckpointLoaderSimple", title="Weak model (same family, smaller)",
                  ckpt_name="sd3.5_medium.safetensors")
    patch = b.node("GuidanceKitAutoguidance")
    b.connect(*base["model"], patch, "model")
    b.connect(weak, 0, patch, "weak_model")
    outputs(b, base, ksampler(b, family, base, (patch, 0), cfg=2.0), name, (patch, 0))


def trained_then_patched(b: Builder, family: str, name: str, trainer: str, inputs: tuple[str, ...], patch_node: str,
                         patch_input: str, **widgets) -> None:
    """``trainer`` (fed the family's ``inputs``) on the calibration prompts, its output into ``patch_node``'s
    ``patch_input``, the patched MODEL into a KSampler."""
    base = family_base(b, family)
    trained = b.node(trainer, prompts=CALIBRATION_PROMPTS, negative_prompt=NEGATIVE, **widgets)
    for key in inputs:
        b.connect(*base[key], trained, key)
    patch = b.node(patch_node)
    b.connect(*base["model"], patch, "model")
    b.connect(trained, 0, patch, patch_input)
    outputs(b, base, ksampler(b, family, base, (patch, 0)), name, (patch, 0))


def learned_ag(b: Builder, family: str, name: str) -> None:
    spec = FAMILIES[family]
    trained_then_patched(b, family, name, "GuidanceKitLearnedAGCalibrate", ("model", "clip", "vae", "latent"),
                         "GuidanceKitLearnedAG", "policy", steps=spec["steps"], cfg=spec["cfg"],
                         sampler_name=spec["sampler"], scheduler=spec["scheduler"], filename=f"learned_ag_{family}")


def deediff(b: Builder, family: str, name: str) -> None:
    spec = FAMILIES[family]
    trained_then_patched(b, family, name, "GuidanceKitDeeDiffTrain", ("model", "clip", "latent"), "GuidanceKitDeeDiff",
                         "heads", sample_steps=spec["steps"], cfg=spec["cfg"], sampler_name=spec["sampler"],
                         scheduler=spec["scheduler"], filename=f"deediff_{family}")


def zero_shot_classifier(b: Builder, family: str, base: dict) -> dict:
    """CLIP vision of the family reading each sample's preview (latent_rgb) against the fur colours."""
    vision = b.node("CLIPVisionLoader", clip_name=CLIP_VISION[family])
    classifier = b.node("GuidanceKitClipZeroShotClassifier", classes=FUR_COLOURS, template="a photo of a {} fox",
                        pixel_source="latent_rgb")
    b.connect(vision, 0, classifier, "clip_vision")
    b.connect(*base["clip"], classifier, "clip")
    return classifier


def gfcg(b: Builder, family: str, name: str) -> None:
    base = family_base(b, family)
    classifier = zero_shot_classifier(b, family, base)
    patch = b.node("GuidanceKitGFCG", prompt=PROMPT, targets="colour=red")
    b.connect(*base["model"], patch, "model")
    b.connect(classifier, 0, patch, "classifier")
    b.connect(*base["clip"], patch, "clip")
    outputs(b, base, ksampler(b, family, base, (patch, 0)), name, (patch, 0))


def ppap_train(b: Builder, family: str, name: str) -> None:
    spec = FAMILIES[family]
    base = family_base(b, family)
    classifier = zero_shot_classifier(b, family, base)
    train = b.node("GuidanceKitPPAPTrainExperts", cfg=spec["cfg"], images=PPAP_IMAGES, sampler_name=spec["sampler"],
                   scheduler=spec["scheduler"], sample_steps=spec["steps"], filename=f"{family}_ppap_experts")
    for key in ("model", "positive", "negative", "latent"):
        b.connect(*base[key], train, key)
    b.connect(classifier, 0, train, "classifier")


def ppap(b: Builder, family: str, name: str) -> None:
    base = family_base(b, family)
    classifier = zero_shot_classifier(b, family, base)
    patch = b.node("GuidanceKitPPAP", experts=f"{family}_ppap_experts.safetensors", target="colour: red")
    b.connect(*base["model"], patch, "model")
    b.connect(classifier, 0, patch, "classifier")
    outputs(b, base, ksampler(b, family, base, (patch, 0)), name, (patch, 0))


CFG_FAMILIES = ("sd15", "sdxl", "sd35")  # Flux dev is guidance-distilled: cfg 1, no unconditional row to act on
CLIP_VISION = {"sdxl": "clip_vision_g.safetensors"}  # the CLIP vision model sharing the family's pooled text space
# Why a technique lacks a family: docs/workflows.md (the table of techniques and families).
TECHNIQUES = {
    "adaptive_guidance": (adaptive_guidance, CFG_FAMILIES),
    "learned_ag": (learned_ag, CFG_FAMILIES),
    "composable": (composable, CFG_FAMILIES),
    "linear_ag": (linear_ag, CFG_FAMILIES),
    "lina": (lina, CFG_FAMILIES),
    "lina_schedule": (lina_schedule, (*CFG_FAMILIES, "flux")),
    "autoguidance": (autoguidance, ("sd35",)),
    "gfcg": (gfcg, tuple(CLIP_VISION)),
    "deediff": (deediff, ("sd35",)),
    "ppap_train": (ppap_train, tuple(CLIP_VISION)),  # writes the experts file that <family>_ppap reads: run it first
    "ppap": (ppap, tuple(CLIP_VISION)),
}
COMMON_NOTE = ("\n\nFiles: {files}.\nSampling: {steps} steps, cfg {cfg}, {sampler}/{scheduler} (the model card's "
               "settings).")
RUN_STATS_NOTE = " Run Stats plots what the technique did each step and prints a one-line summary."
NOTES = {
    "adaptive_guidance": (
        "Adaptive Guidance on {label}: CFG that stops evaluating the negative prompt once it agrees with the "
        "positive, sample by sample. Expect the plain-CFG image with fewer model evaluations (Run Stats counts "
        "them). Inputs that matter: threshold (0.99 = close to CFG; lower saves more and drifts more), "
        "start/end_percent."),
    "composable": (
        "Composable Diffusion on {label}: the Composable Prompt splits the text at AND / AND NOT and weights "
        "each concept (':0.8' after a concept sets its weight); the KSampler Patch lets the plain KSampler "
        "sample the composition. Expect every AND concept in the image and the NOT concept kept out. Inputs that "
        "matter: the text, cfg (multiplies every weight), threshold."),
    "linear_ag": (
        "LinearAG on {label}: Calibrate runs full-CFG samplings of the prompts once (slow: prompts x steps x 2 "
        "model calls) and saves models/linear_ag/linear_ag_{family}.safetensors; then the patch predicts the "
        "negative prompt's output on most steps. Afterwards swap Calibrate for 'LinearAG Load Calibration'. "
        "Expect the CFG image at fewer model evaluations. Inputs that matter: true_every, guided_until, and the "
        "calibration's steps/cfg/sampler (must match the KSampler's)."),
    "lina_schedule": (
        "Causality-aware schedule (after LINA) on {label}: moves a share of the steps before the boundary, where "
        "layout and relations are decided. Expect the same prompt with relations (left of, on top of) followed "
        "more often. Inputs that matter: share, boundary, steps."),
    "learned_ag": (
        "Adaptive Guidance (learned) on {label}: Calibrate runs full-CFG samplings of the prompts once (slow: each "
        "prompt's run plus a conditional-only branch from every step, decoded) and saves "
        "models/learned_ag/learned_ag_{family}.safetensors; then the patch drops a sample's negative prompt once the "
        "policy predicts its image will not change. Afterwards swap Calibrate for 'Adaptive Guidance (learned) "
        "Load'. Expect fewer model evaluations than CFG with small image changes (on the toy world it saved 41% "
        "of rows at a cost in prompt adherence: docs/learned_ag.md). Inputs that matter: threshold (higher = "
        "safer), the calibration's tolerance, and its steps/cfg/sampler (must match the KSampler's)."),
    "lina": (
        "LINA guidance (after LINA) on {label}: Relation Prompt removes the relation words ('{words}') from the "
        "prompt; the LINA Guider adds early guidance along prompt minus that, on the causality-aware schedule. Keep "
        "the Relation Prompt's text equal to the positive prompt. The toy-world benchmark found no effect on "
        "relations and a loss on mirror prompts (docs/lina.md): compare with the same seed without it. Inputs that "
        "matter: words, prompt_strength, window, share."),
    "gfcg": (
        "GFCG on {label} with a zero-shot CLIP classifier: CLIP vision G reads each sample's preview (latent_rgb) "
        "against '{classes}'; when a sample drifts to another fur colour, guidance pushes from the prompt with "
        "that colour toward the prompt with 'red'. SDXL's pooled text output is CLIP-G's, the space of "
        "clip_vision_g. Expect the target colour held more often, at one extra model row for confused samples. "
        "Inputs that matter: classes and targets (the prompt must contain the target phrase), scale, confidence, "
        "start_percent."),
    "deediff": (
        "DeeDiff early exit on {label}: Train Heads records full-CFG runs of the prompts and trains one small "
        "uncertainty head per MMDiT block (slow; saved to models/deediff/deediff_{family}.safetensors; use a few "
        "dozen prompts), then Early Exit lets each row leave the network once its predicted confidence passes "
        "the threshold. Afterwards swap Train Heads for 'DeeDiff Load Heads'. Expect fewer blocks run (Run "
        "Stats) and image changes growing as the threshold falls (docs/deediff.md). Inputs that matter: "
        "threshold, train_steps, adapter_rank (joint training)."),
    "ppap_train": (
        "PPAP step 1 of 2 on {label}: run this workflow first, then {family}_ppap.json. Train Experts samples the "
        "model (images full samplings of sample_steps steps at cfg, {images} here: {images} x {steps} sampling steps, "
        "two model rows each at cfg > 1), labels the samples with the zero-shot CLIP classifier (CLIP vision G "
        "against '{classes}') and distils it into experts LoRA students, one per noise range (experts x "
        "steps_per_expert optimiser steps through CLIP vision G, 5 x 120 by default), saved as "
        "models/ppap/{family}_ppap_experts.safetensors. Slow (sampling dominates; the progress bar counts both "
        "phases) and nothing is shown until it ends. Not measured on a real {label} checkpoint: the defaults "
        "(experts, steps, rank, lr) are the toy world's (docs/ppap.md). Inputs that matter: images (more samples, "
        "better experts), the classes (PPAP's target must be one of them), experts, steps_per_expert, lora_rank; "
        "the prompt and cfg set what the experts see."),
    "ppap": (
        "PPAP step 2 of 2 on {label}: needs models/ppap/{family}_ppap_experts.safetensors, written by "
        "{family}_ppap_train.json (run that first; press R to refresh the experts list). PPAP Guidance steers each "
        "sample toward the target class ('colour: red', one of '{classes}') with the expert whose noise range "
        "holds the current sigma, backpropagating through CLIP vision G every step (slower and more memory than "
        "plain sampling). Use the same classifier settings as in training. Expect red fur more often than the "
        "same seed without it; 'none' as experts guides with the classifier itself (the naive baseline). Inputs "
        "that matter: experts, target, scale (30 was tuned on the toy world, not on {label}: try lower first)."),
    "autoguidance": (
        "Autoguidance on SD3.5: guides SD3.5 Large with the smaller SD3.5 Medium (same latent space and text "
        "encoders) instead of the negative prompt; KSampler's cfg is the guidance weight w (try 1.5 to 3). "
        "Expect CFG-like sharpening with less over-saturation; the negative prompt is not used."),
}
TOY_NOTES = {
    "toy_adaptive_guidance": "Adaptive Guidance on the toy world (32x32, CPU, seconds): top, the Guider with "
                             "SamplerCustomAdvanced; bottom, the MODEL patch with KSampler. Run Stats shows the "
                             "model rows saved per step. Inputs: threshold, start/end_percent.",
    "toy_autoguidance": "Autoguidance on the toy world: the shipped weak model (fewer training steps) guides the "
                        "main one; the second row adds GFCG on top. Inputs: cfg (the guidance weight w).",
    "toy_composable_nodes": "Composable Diffusion with explicit Concept nodes (AND with positive weights, NOT with "
                            "negative) and the Composable Guider. Expect every concept in the image.",
    "toy_composable_prompt": "Composable Diffusion from one prompt ('A AND B AND NOT C') with the KSampler patch.",
    "toy_deediff": "DeeDiff early exit with the shipped heads: rows leave the network once their predicted "
                   "confidence passes the threshold (Run Stats: layers run). Bottom: stacked with Adaptive Guidance.",
    "toy_gfcg": "GFCG: the toy classifier reads each sample's clean estimate and guidance pushes toward the target "
                "class (targets, e.g. 'colour=red'). Top: the guider; bottom: the KSampler patch.",
    "toy_learned_ag": "Adaptive Guidance (learned): Calibrate fits the switch policy on three prompts (full CFG, then "
                      "each switch step's decoded image against CFG's), then the Guider samples with it; Run Stats "
                      "plots p(safe) per sample. Inputs: tolerance, threshold.",
    "toy_lina": "LINA (auto, after LINA) on a relation prompt: Relation Prompt removes the relation words, the Auto "
                "Guider adds early guidance toward them with settings from the shipped predictor (a placeholder "
                "until bench/lina.py runs). Inputs: the relation words, cfg.",
    "toy_lina_schedule": "Causality-aware schedule (after LINA) against the base scheduler, same seed: compare the "
                         "two saved images. Inputs: share, boundary.",
    "toy_linear_ag": "LinearAG: Calibrate fits the regression on the toy world (seconds), then the Guider and the "
                     "KSampler patch use it. Inputs: true_every, guided_until.",
    "toy_linear_ag_shipped": "LinearAG with the shipped calibration of the toy world (no calibration run).",
    "toy_ppap": "PPAP: classifier guidance toward 'colour: red' with the shipped noise-range experts; the second "
                "KSampler is the same seed without it. Inputs: target, scale.",
    "toy_reference_cfg": "The baseline: plain CFG through the Reference CFG Guider, which records the run for "
                         "Run Stats. Compare every technique's counts against it.",
}


def real_workflows(object_info: dict) -> dict[str, dict]:
    made = {}
    for technique, (build, families) in TECHNIQUES.items():
        for family in families:
            name = f"{family}_{technique}"
            b = Builder(object_info)
            build(b, family, name)
            workflow = b.workflow(name)
            spec = FAMILIES[family]
            files = sorted({v for n in b.nodes if "Loader" in n["type"] for v in n["widgets_values"]
                            if str(v).endswith(".safetensors")})
            note = NOTES[technique].format(label=spec["label"], family=family, words=RELATION_WORDS,
                                           classes=FUR_COLOURS, images=PPAP_IMAGES, steps=spec["steps"]) + \
                COMMON_NOTE.format(files=", ".join(files), steps=spec["steps"], cfg=spec["cfg"],
                                   sampler=spec["sampler"], scheduler=spec["scheduler"])
            if any(node["type"] == "GuidanceKitRunStats" for node in b.nodes):
                note += RUN_STATS_NOTE
            set_note(workflow, note)
            arrange(workflow, object_info)
            made[name] = workflow
    return made


def toy_workflows(object_info: dict) -> dict[str, dict]:
    made = {}
    for path in sorted(WORKFLOWS.glob("toy_*.json")):
        workflow = json.loads(path.read_text())
        enlarge_small_images(workflow, image_width=32)
        set_note(workflow, TOY_NOTES[path.stem])
        arrange(workflow, object_info)
        made[path.stem] = workflow
    return made


def write(workflows: dict[str, dict]) -> None:
    EXAMPLES.mkdir(exist_ok=True)
    for name, workflow in workflows.items():
        path = WORKFLOWS / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(workflow, indent=2) + "\n")
        tmp.replace(path)
    for stale in EXAMPLES.glob("*.json"):
        if not (WORKFLOWS / stale.name).exists():
            stale.unlink()
    for path in WORKFLOWS.glob("*.json"):
        shutil.copyfile(path, EXAMPLES / path.name)


def main() -> None:
    """``--object-info FILE``: a saved /object_info instead of starting the server."""
    if "--object-info" in sys.argv:
        object_info = json.loads(Path(sys.argv[sys.argv.index("--object-info") + 1]).read_text())
    else:
        from harness.server import ComfyServer

        with ComfyServer() as server:
            object_info = server.get("/object_info")
    write({**toy_workflows(object_info), **real_workflows(object_info)})


if __name__ == "__main__":
    main()
