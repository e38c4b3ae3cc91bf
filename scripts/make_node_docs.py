"""Write the in-app help pages: one ``web/docs/<node id>.md`` per registered node.

ComfyUI's frontend (1.32, bundled with ComfyUI 0.3.75) shows a custom node's help panel from
``/extensions/<pack>/docs/<node id>/<locale>.md``, else ``/extensions/<pack>/docs/<node id>.md``;
``/extensions/guidance_kit/`` serves ``web/`` (``WEB_DIRECTORY``).  A page is the node's overview
(kept here, by hand), its inputs and outputs with their tooltips (read from the schema, so a page
cannot drift from the node: ``tests/test_docs.py`` compares every page with what this script writes)
and a link to the technique's docs page.

    python scripts/make_node_docs.py
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

OUT = REPO / "web" / "docs"
DOCS_URL = "https://github.com/guidance-kit/comfyui-guidance-kit/blob/main/docs/"

# node id -> (overview, docs page).  The overview says when to use the node and what to connect.
OVERVIEW = {
    "GuidanceKitReferenceCFGGuider": (
        "Plain classifier-free guidance, identical to ComfyUI's CFGGuider, that records the model rows each "
        "step evaluates. Use it as the baseline next to a Guidance Kit technique, with the same noise, and "
        "read both with Run Stats.", "run_stats.md"),
    "GuidanceKitRunStats": (
        "Shows what the last sampling run of a Guidance Kit guider or patched model did: model rows per step "
        "against plain CFG, the noise level, the technique's own signals and its decisions. Connect the "
        "technique's GUIDER or MODEL to `source` and the sampler's output latent to `latent` (so it runs "
        "after the sampler).", "run_stats.md"),
    "GuidanceKitAdaptiveGuidanceGuider": (
        "Classifier-free guidance that stops evaluating the unconditional, sample by sample, once it agrees "
        "with the conditional (Adaptive Guidance, arXiv 2312.12487). Connect it to SamplerCustomAdvanced. "
        "Start at threshold 0.99: on the toy world that saves 23% of the model rows.", "adaptive_guidance.md"),
    "GuidanceKitAdaptiveGuidance": (
        "Adaptive Guidance as a MODEL patch, for KSampler or any CFG guider: the unconditional stops being "
        "evaluated once it agrees with the conditional. KSampler's cfg is the guidance scale.",
        "adaptive_guidance.md"),
    "GuidanceKitLinearAGCalibrate": (
        "Fits LinearAG's regression of the unconditional on full-CFG runs of this MODEL over your prompts and "
        "saves it to models/linear_ag/. Calibrate with the sampler, scheduler, steps and cfg you will sample "
        "with.", "adaptive_guidance.md"),
    "GuidanceKitLinearAGLoad": (
        "Loads a LinearAG calibration from models/linear_ag/ (the toy world's ships with the pack).",
        "adaptive_guidance.md"),
    "GuidanceKitLinearAGGuider": (
        "CFG whose unconditional is predicted by the calibrated regression on most steps (LinearAG, arXiv "
        "2312.12487), for SamplerCustomAdvanced. The paper's pattern: true CFG every 2nd step until half the "
        "run, then Adaptive Guidance.", "adaptive_guidance.md"),
    "GuidanceKitLinearAG": (
        "LinearAG as a MODEL patch for KSampler: the unconditional is regressed on most steps.",
        "adaptive_guidance.md"),
    "GuidanceKitLearnedAGCalibrate": (
        "Calibrates a per-sample switch policy for this MODEL, sampler, schedule and cfg: runs your prompts "
        "with full CFG, labels each sample's earliest switch step whose decoded image stays within `tolerance` "
        "of the CFG image, and fits a logistic policy on features that cost no extra model rows. Saved to "
        "models/learned_ag/.", "learned_ag.md"),
    "GuidanceKitLearnedAGLoad": (
        "Loads an Adaptive Guidance (learned) policy from models/learned_ag/.", "learned_ag.md"),
    "GuidanceKitLearnedAGGuider": (
        "Adaptive Guidance whose per-sample switch is decided by the calibrated policy: a sample stops "
        "evaluating the unconditional once p(safe) reaches `threshold`. A policy from another model is an "
        "error; another sampler, schedule or cfg gives a warning and plain CFG.", "learned_ag.md"),
    "GuidanceKitLearnedAG": (
        "Adaptive Guidance (learned) as a MODEL patch for KSampler.", "learned_ag.md"),
    "GuidanceKitComposableConcept": (
        "Adds one concept with its own signed weight to a composition (Composable Diffusion AND; a negative "
        "weight is NOT). Chain one per concept, then sample with the Composable Guider, or with KSampler "
        "after the Composable KSampler Patch.", "composable.md"),
    "GuidanceKitComposablePrompt": (
        "Encodes a composable prompt such as `a red circle AND a blue square :0.8 AND NOT green`: each "
        "concept separately, composed by its signed weight.", "composable.md"),
    "GuidanceKitComposableGuider": (
        "Samples a composition: unconditional + cfg × Σ weight_i × (concept_i − unconditional), all rows in "
        "one batched model call. For SamplerCustomAdvanced.", "composable.md"),
    "GuidanceKitComposableModelPatch": (
        "Lets a plain KSampler sample a composition wired as its positive; KSampler's cfg multiplies every "
        "concept weight.", "composable.md"),
    "GuidanceKitLoadClassifier": (
        "Loads the image classifier GFCG and PPAP read: a Guidance Kit classifier bundle from "
        "models/classifiers/ or the toy world's colour/shape/position classifier. On latent models, "
        "`pixel_source` says how a latent becomes pixels for it.", "gfcg.md"),
    "GuidanceKitClipZeroShotClassifier": (
        "Builds a classifier from the CLIP you already have: each class is a text prompt, one head per line "
        "(`colour: red, orange, blue=deep blue`).", "gfcg.md"),
    "GuidanceKitGFCGGuider": (
        "Gradient-free classifier guidance (arXiv 2411.15393) for SamplerCustomAdvanced: a classifier reads "
        "each sample's clean estimate, picks the class it is drifting to, and guidance pushes from that "
        "class's prediction toward the prompt's. Works on top of CFG, or of Autoguidance with `weak_model`.",
        "gfcg.md"),
    "GuidanceKitGFCG": (
        "GFCG as a MODEL patch for KSampler, on top of KSampler's CFG (or of Autoguidance with `weak_model`).",
        "gfcg.md"),
    "GuidanceKitAutoguidanceGuider": (
        "Guides the model with a weaker version of itself instead of the unconditional (Autoguidance, Karras "
        "et al. 2024). The weak model must be the same family and prediction type, not a copy of the main "
        "model.", "gfcg.md"),
    "GuidanceKitAutoguidance": (
        "Autoguidance as a MODEL patch for KSampler: the guide row becomes the weak model's conditional "
        "prediction, and KSampler's cfg is the weight w.", "gfcg.md"),
    "GuidanceKitPPAPGuider": (
        "Classifier guidance toward a class with noise-range experts of an off-the-shelf classifier (PPAP, "
        "arXiv 2212.05973), for SamplerCustomAdvanced. At cfg 1 it is unconditional generation steered by "
        "the classifier alone.", "ppap.md"),
    "GuidanceKitPPAP": (
        "PPAP as a MODEL patch for KSampler and any CFG guider: per sample, the expert whose noise range "
        "holds the current sigma guides toward `target`.", "ppap.md"),
    "GuidanceKitPPAPTrainExperts": (
        "Trains PPAP's experts for this MODEL and classifier without any labelled image: samples the model, "
        "labels the samples with the classifier and distils it into LoRA experts for noise ranges. Writes "
        "models/ppap/<filename>.safetensors.", "ppap.md"),
    "GuidanceKitDeeDiffTrain": (
        "Trains DeeDiff's uncertainty heads (one per transformer block) for this MODEL, data-free, on the "
        "inputs of full-CFG sampling runs over your prompts. Saved to models/deediff/; an interrupted run of "
        "the same settings resumes.", "deediff.md"),
    "GuidanceKitDeeDiffLoad": (
        "Loads DeeDiff heads from models/deediff/ (the toy world DiT's ship with the pack).", "deediff.md"),
    "GuidanceKitDeeDiff": (
        "DeeDiff early exit (arXiv 2309.17074) as a MODEL patch: after each transformer block, every model "
        "row whose predicted confidence reaches the threshold stops there. Supports the toy world DiT and "
        "SD3's MMDiT.", "deediff.md"),
    "GuidanceKitLINASchedule": (
        "A schedule for SamplerCustom / SamplerCustomAdvanced: the base scheduler's sigmas with round(share × "
        "steps) steps moved before `boundary`, where layout and relations are decided (a reconstruction "
        "after LINA, arXiv 2512.13290). Same step count, first and last sigma.", "lina.md"),
    "GuidanceKitLINARelationPrompt": (
        "Encodes the prompt with its relation words removed (the words you list, or found automatically by "
        "how far removing each moves the conditioning). Its `ablated` output feeds the LINA guiders and "
        "patches (after LINA).", "lina.md"),
    "GuidanceKitLINAGuider": (
        "CFG plus targeted prompt guidance toward the relation (prompt minus relation-ablated prompt) and a "
        "latent term restricted to the region the relation changes, in an early window, sampled on the "
        "causality-aware schedule. Settings by hand (after LINA).", "lina.md"),
    "GuidanceKitLINAModelPatch": (
        "The LINA guidance terms as a MODEL patch for KSampler (a patch cannot change the sigmas: use the "
        "LINA Schedule node or the guider for the schedule).", "lina.md"),
    "GuidanceKitLINAAutoGuider": (
        "The LINA guider with its settings (schedule share, strengths, window) predicted per prompt by a "
        "trained predictor. The toy world's predictor ships with the pack, as a placeholder until its "
        "benchmark has run.", "lina.md"),
    "GuidanceKitLINAAutoModelPatch": (
        "LINA (auto) as a MODEL patch for KSampler: strengths and window predicted per prompt.", "lina.md"),
    "GuidanceKitToyWorldLoader": (
        "The pack's embedded toy world: a small text-to-image DiT (flow matching, 32×32 pixels) with its "
        "text encoder and a pixel-space VAE, as a real MODEL, CLIP and VAE. Runs anywhere on CPU; every "
        "example workflow uses it.", "toyworld.md"),
    "GuidanceKitToyWorldEmptyLatent": (
        "The toy world's empty latent (3×32×32 per image).", "toyworld.md"),
    "GuidanceKitToyWorldV2Loader": (
        "Toy world v2: 64×64 latent scenes with a Flux-structured DiT, a VAE and a T5 text encoder. Its "
        "weights are not trained yet, so this loader has nothing to load until they ship.", "toyworld.md"),
    "GuidanceKitToyWorldV2EmptyLatent": (
        "The toy world v2's empty latent.", "toyworld.md"),
}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    if value is None:
        return ""
    return "(empty)" if value == "" else f"`{value}`"


def page(node) -> str:
    """The help page of one V3 node class."""
    schema = node.GET_SCHEMA()
    overview, docs_page = OVERVIEW[schema.node_id]
    lines = [f"# {schema.display_name}", "", overview, "", "## Inputs", ""]
    if schema.inputs:
        lines += ["| input | type | default | what it does |", "|---|---|---|---|"]
        for item in schema.inputs:
            kind = item.get_io_type() + (" (optional)" if item.optional else "")
            default = _default(getattr(item, "default", None))
            lines.append(f"| `{item.id}` | {kind} | {_cell(default)} | {_cell(item.tooltip or '')} |")
    else:
        lines.append("None.")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
    for item in schema.outputs:
        name = item.display_name or item.get_io_type()
        lines.append(f"| {_cell(name)} | {item.get_io_type()} | {_cell(item.tooltip or '')} |")
    lines += ["", f"More (method, settings, measured figures): [docs/{docs_page}]({DOCS_URL}{docs_page})", ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """``{file name: text}`` for every registered node (ComfyUI must be booted)."""
    from guidance_kit.nodes import node_classes

    return {f"{node.GET_SCHEMA().node_id}.md": page(node) for node in node_classes()}


def main() -> None:
    from harness.comfy_host import boot

    boot()
    OUT.mkdir(parents=True, exist_ok=True)
    written = pages()
    for name, text in written.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(written)} pages to {OUT.relative_to(REPO)}/")


if __name__ == "__main__":
    main()
