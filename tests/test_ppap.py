"""PPAP in ComfyUI: data-free expert training (one process, resumed, torchrun), the shipped toy bundle steering
colour, the denoised conversion per model family, a latent family, and the errors naming node and input."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness.executor import run_node
from harness.sampling import ksample, sample_guider

REPO = Path(__file__).resolve().parent.parent
TINY_TRAINING = dict(experts=2, steps=3, batch_size=4)


def train_tiny(model, classifier, conditioning, latent, out, work=None, **settings):
    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.samplers.ppap import ExpertTraining

    return adapter.train_bundle(model, classifier, [conditioning], latent, out, images=8,
                                settings=ExpertTraining(**{**TINY_TRAINING, **settings}), steps=2, work_dir=work)


def empty_latent(batch):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return run_node(ToyWorldEmptyLatent, batch)[0]


def test_training_is_data_free_resumable_and_moves_only_the_adapters(toy, tmp_path, monkeypatch):
    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.samplers import ppap
    from guidance_kit.toyworld import scenes

    def forbidden(*args, **kwargs):
        raise AssertionError("PPAP training read the toy world's generator (labelled data)")
    for name in ("render", "sample_scene", "sample_spec", "all_specs", "dev_prompts", "validation_prompts"):
        monkeypatch.setattr(scenes, name, forbidden)
    model, empty, classifier = toy.model, toy.negative, toy.classifier
    out = tmp_path / "experts.safetensors"
    info = train_tiny(model, classifier, (empty, empty), empty_latent(4), out, tmp_path / "work")
    loaded, meta = ppap.load_experts(out, classifier, "test")
    assert len(loaded.experts) == 2 and meta["base_fingerprint"] == classifier.fingerprint
    assert loaded.ranges[:, 1].tolist() == pytest.approx([0.5, 1.0], abs=1e-3)
    assert 0 < info["trainable_fraction"] < 0.05
    network = loaded.network
    trainable = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    assert set(loaded.experts[1]) == trainable  # an expert stores exactly the trainable parameters

    def adapter_norm_or_bias(name):
        module = network.get_submodule(name.rpartition(".")[0])
        norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
        return ".up." in name or ".down." in name or name.endswith(".bias") or isinstance(module, norms)
    assert all(adapter_norm_or_bias(name) for name in trainable)  # no frozen base weight can move
    base = dict(network.named_parameters())
    moved = [name for name, value in loaded.experts[1].items() if not torch.equal(value, base[name])]
    assert any(".up." in name for name in moved)  # the adapters did move
    # resuming reads the pool and the finished checkpoints back: no sampling, identical bundle
    monkeypatch.setattr(adapter, "_pool_chunk", forbidden)
    again = tmp_path / "again.safetensors"
    train_tiny(model, classifier, (empty, empty), empty_latent(4), again, tmp_path / "work")
    first, second = ppap.load_experts(out, classifier, "t")[0], ppap.load_experts(again, classifier, "t")[0]
    assert all(torch.equal(first.experts[k][n], second.experts[k][n]) for k in range(2) for n in first.experts[k])


def _train_cli(out, work, launcher=(sys.executable,)):
    command = [*launcher, "scripts/train_ppap.py", "--toyworld", "--images", "8", "--batch", "4", "--sample-steps",
               "2", "--experts", "2", "--steps", "3", "--train-batch", "4", "--out", str(out), "--work", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_torchrun_two_processes_match_one_process(toy, tmp_path):
    """Tolerance: 1e-5 absolute on every expert tensor (the gradient all-reduce only reorders float sums)."""
    from guidance_kit.samplers import ppap

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    one = _train_cli(tmp_path / "one.safetensors", tmp_path / "w1")
    two = _train_cli(tmp_path / "two.safetensors", tmp_path / "w2", torchrun)
    assert one["final_losses"] == pytest.approx(two["final_losses"], rel=1e-5)
    classifier = toy.classifier
    a = ppap.load_experts(tmp_path / "one.safetensors", classifier, "t")[0]
    b = ppap.load_experts(tmp_path / "two.safetensors", classifier, "t")[0]
    assert max(float((a.experts[k][n] - b.experts[k][n]).abs().max()) for k in range(2) for n in a.experts[k]) < 1e-5
    assert not all(torch.equal(a.experts[1][n], dict(a.network.named_parameters())[n]) for n in a.experts[1])


def test_shipped_experts_steer_unconditional_samples_toward_a_colour(toy):
    """cfg 1 (unconditional) through KSampler with the PPAP patch: the oracle finds far more red main objects."""
    from guidance_kit.nodes.contract.stats import stats_sink
    from guidance_kit.nodes.ppap import TOY_EXPERTS, PPAPModelPatch
    from guidance_kit.nodes.toyworld import pixel_space_vae
    from guidance_kit.toyworld import oracle

    model, empty, classifier = toy.model, toy.negative, toy.classifier
    patched = run_node(PPAPModelPatch, model, classifier, TOY_EXPERTS, "colour: red", 30.0)[0]
    vae = pixel_space_vae()
    counts = {}
    for label, which in (("plain", model), ("ppap", patched)):
        samples = ksample(which, empty, empty, empty_latent(8), cfg=1.0, steps=12, scheduler="simple", seed=5)
        counts[label] = sum(oracle.main_object(image.numpy())[0] == "red" for image in vae.decode(samples).float())
    assert counts["ppap"] >= counts["plain"] + 4, counts
    run = stats_sink(patched).last
    assert {"expert", "gradient_norm", "target_probability"} <= run.evaluations[0].signals.keys()
    assert run.evaluations[0].signals["expert"] == [4.0] * 8 and run.evaluations[-1].signals["expert"] == [0.0] * 8
    assert [label for _, label in run.events][:2] == ["expert 4", "expert 3"]
    late = run.evaluations[-1].signals["target_probability"]
    assert sum(late) / len(late) > 0.5


def test_guidance_also_works_with_cfg_on(toy):
    from guidance_kit.nodes.ppap import TOY_EXPERTS, PPAPGuider

    model, empty, classifier = toy.model, toy.negative, toy.classifier
    probabilities = {}
    for scale in (0.0, 30.0):
        guider = run_node(PPAPGuider, model, empty, empty, 3.0, classifier, TOY_EXPERTS, "colour: blue", scale)[0]
        samples = sample_guider(guider, empty_latent(4), steps=10, scheduler="simple", seed=2)
        with torch.no_grad():
            probabilities[scale] = float(classifier.probabilities(samples)["colour"][:, 5].mean())
    assert probabilities[30.0] > probabilities[0.0] + 0.1, probabilities


def test_two_ppap_patches_both_guide(toy):
    """PPAP over PPAP is not a replacement (its hook is outside the slot and keeps no exclusive state): two
    targets guide together, each step adding both gradients."""
    from guidance_kit.nodes.ppap import TOY_EXPERTS, PPAPModelPatch

    def patched(model, target):
        return run_node(PPAPModelPatch, model, toy.classifier, TOY_EXPERTS, target, 30.0)[0]

    def run(model):
        return ksample(model, toy.negative, toy.negative, empty_latent(2), cfg=1.0, steps=4, scheduler="simple")

    red, circle = patched(toy.model, "colour: red"), patched(toy.model, "shape: circle")
    both = run(patched(red, "shape: circle"))
    assert not torch.equal(both, run(red)) and not torch.equal(both, run(circle))


EXPECTED_COEFFICIENTS = {"sd15_eps": lambda s: (torch.ones_like(s), s), "sdxl_adm": lambda s: (torch.ones_like(s), s),
                         "sd15_v": lambda s: (torch.ones_like(s), s), "sd3_flow": lambda s: (1 - s, s)}


def test_denoised_conversion_and_a_latent_family(tiny, toy):
    """Per family: α, σ_t as derived (eps/v: 1, σ; flow: 1−σ, σ); the post-CFG output is exactly
    D + s·σ_t²/max(α, MIN_SIGNAL)·g; naive guidance through the latent-RGB reader raises the target's probability."""
    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.nodes.contract import install
    from guidance_kit.samplers import ppap

    classifier = toy.classifier
    sigma = torch.tensor([0.3, 0.9])
    alpha, noise_std = adapter.forward_coefficients(tiny.patcher)(sigma)
    want_alpha, want_std = EXPECTED_COEFFICIENTS[tiny.family](sigma)
    assert torch.allclose(alpha, want_alpha) and torch.allclose(noise_std, want_std)

    technique = adapter.PPAPGuidance(tiny.patcher, classifier, ppap.naive_classifier(classifier), "colour", 0, 50.0)
    patched = install(tiny.patcher, technique)
    seen = []
    previous = patched.model_options["sampler_post_cfg_function"][-1]

    def spy(args):
        out = previous(args)
        seen.append((args, out))
        return out
    patched.model_options["sampler_post_cfg_function"][-1] = spy
    samples = {}
    for label, which in (("plain", tiny.patcher), ("ppap", patched)):
        samples[label] = ksample(which, tiny.positive, tiny.negative, tiny.empty_latent(2), cfg=1.0, steps=4, seed=1)
    args, out = seen[1]
    s = args["sigma"].flatten().expand(2)
    a, n = adapter.forward_coefficients(tiny.patcher)(s)
    g, _, _ = technique.experts.guidance_gradient(args["input"], s, technique.read, "colour", 0)
    assert torch.allclose(out, args["denoised"] + 50.0 * (n ** 2 / a.clamp(min=ppap.MIN_SIGNAL)).view(-1, 1, 1, 1) * g,
                          rtol=1e-4, atol=1e-5)
    read = adapter.noisy_pixels(tiny.patcher, classifier, "test")
    with torch.no_grad():
        final = {label: float(classifier.probabilities(read(tiny.patcher.model.process_latent_in(x), torch.zeros(2)))
                              ["colour"][:, 0].mean()) for label, x in samples.items()}
    assert final["ppap"] > final["plain"], final


def test_latent_family_trains_and_loads_experts(tiny_eps, toy, tmp_path):
    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.samplers import ppap

    classifier = toy.classifier
    out = tmp_path / "sd15.safetensors"
    train_tiny(tiny_eps.patcher, classifier, (tiny_eps.positive, tiny_eps.negative), tiny_eps.empty_latent(4), out)
    loaded, meta = ppap.load_experts(out, classifier, "test")
    assert meta["model"]["sampling"] == adapter.sampling_kind(tiny_eps.patcher) == "ModelSamplingDiscrete+EPS"
    sigma_max = float(tiny_eps.patcher.get_model_object("model_sampling").sigma_max)
    assert float(loaded.ranges[-1, 1]) == pytest.approx(sigma_max)


@pytest.fixture
def experts_folder(tmp_path, monkeypatch):
    import folder_paths

    from guidance_kit.nodes import ppap as adapter

    monkeypatch.setitem(folder_paths.folder_names_and_paths, adapter.FOLDER,
                        ([str(tmp_path)], folder_paths.folder_names_and_paths[adapter.FOLDER][1]))
    folder_paths.filename_list_cache.pop(adapter.FOLDER, None)
    yield tmp_path
    folder_paths.filename_list_cache.pop(adapter.FOLDER, None)


def test_errors_name_the_node_and_input(toy, tiny_eps, experts_folder):
    from guidance_kit.nodes.ppap import TOY_EXPERTS, PPAPGuider, PPAPModelPatch
    from guidance_kit.samplers import ppap
    from guidance_kit.samplers.classifier import load_classifier, save_classifier
    from guidance_kit.toyworld import weights

    model, empty, classifier = toy.model, toy.negative, toy.classifier
    shipped = weights.WEIGHTS_DIR / TOY_EXPERTS
    with pytest.raises(ValueError, match=r"PPAP 'target': 'mauve' is no class"):
        run_node(PPAPModelPatch, model, classifier, TOY_EXPERTS, "mauve", 7.5)
    with pytest.raises(ValueError, match=r"PPAP 'target'.*'pink' is not a class of head 'colour'"):
        run_node(PPAPModelPatch, model, classifier, TOY_EXPERTS, "colour: pink", 7.5)
    with pytest.raises(ValueError, match=r"PPAP: 'scale' must be a finite number"):
        run_node(PPAPModelPatch, model, classifier, TOY_EXPERTS, "colour: red", float("nan"))
    # another base classifier: same architecture, other weights
    other = classifier.network.__class__(**classifier.network.config)
    save_classifier(experts_folder / "other.safetensors", other, "toyworld.ToyClassifier", dict(classifier.heads),
                    input_size=(32, 32))
    with pytest.raises(ValueError, match=r"PPAP 'experts'.*trained for the classifier 'toy_classifier'"):
        run_node(PPAPModelPatch, model, load_classifier(experts_folder / "other.safetensors", "t"), TOY_EXPERTS,
                               "colour: red", 7.5)
    with pytest.raises(ValueError, match=r"PPAP 'experts'.*expects \(32, 32\) inputs.*\(16, 16\)"):
        run_node(PPAPModelPatch, model, replace(classifier, input_size=(16, 16)), TOY_EXPERTS, "colour: red", 7.5)
    with pytest.raises(ValueError, match=r"PPAP 'experts'.*trained on a ModelSamplingDiscreteFlow\+CONST"):
        run_node(PPAPModelPatch, tiny_eps.patcher, classifier, TOY_EXPERTS, "colour: red", 7.5)
    # noise ranges that stop below the schedule's first sigma: raised when sampling starts
    loaded, _ = ppap.load_experts(shipped, classifier, "t")
    short = loaded.ranges.clone()
    short[-1, 1] = 0.9
    ppap.save_experts(experts_folder / "short.safetensors", loaded.experts, short, classifier, rank=4, alpha=4.0,
                      info={"model": {"sampling": "ModelSamplingDiscreteFlow+CONST"}})
    guider = run_node(PPAPGuider, model, empty, empty, 1.0, classifier, "short.safetensors", "colour: red", 7.5)[0]
    with pytest.raises(ValueError, match=r"PPAP 'experts': the schedule starts at sigma 1 but the experts "
                                         r"cover sigma 0 to 0.9"):
        sample_guider(guider, empty_latent(1), steps=2, scheduler="simple")


def test_train_node_writes_a_loadable_bundle_with_a_progress_bar(toy, experts_folder, monkeypatch):
    import comfy.utils

    from guidance_kit.nodes.ppap import PPAPModelPatch, PPAPTrainExperts

    model, empty, classifier = toy.model, toy.negative, toy.classifier
    ticks = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        ticks.append((value, total)))
    name = run_node(PPAPTrainExperts, model, empty, empty, 1.0, classifier, empty_latent(4), 4, "euler", "simple", 2,
                                    1, 2, 4, 1e-3, 2, 0, "tiny")[0]
    assert name == "tiny.safetensors" and (experts_folder / name).is_file()
    assert ticks[-1] == (1 + 2, 1 + 2)  # one sampling batch + 1 expert x 2 steps
    patched = run_node(PPAPModelPatch, model, classifier, name, "shape: circle", 7.5)[0]
    guided = ksample(patched, empty, empty, empty_latent(2), cfg=1.0, steps=3, scheduler="simple")
    assert not torch.equal(guided, ksample(model, empty, empty, empty_latent(2), cfg=1.0, steps=3, scheduler="simple"))
