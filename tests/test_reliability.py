"""Reliability, in process on the real ComfyUI: the failures found by trying the nodes as a user would
(each test names the one it holds), determinism and no leaked state, the low-memory path, and bad
input (property-based, hypothesis profiles in conftest.py).

Technique nodes come from the contract table (``technique_table.TABLE``: a new row is covered here
too); the other nodes from every module's ``NODES`` (``pack_nodes``).
"""
import ast
import dataclasses
import json
import logging
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from technique_table import CFG, TABLE, _gfcg_options, guider_of, ids, toy_learned_ag_policy

import comfy.model_management
import folder_paths
import nodes
from comfy.patcher_extension import WrappersMP

from harness.executor import run_node
from harness.sampling import cfg_guider, ksample, sample_guider

FIGURES = {"sampling runs": 0, "inputs tried": 0}


def counted_sample(guider, latent_dict, **settings):
    """``harness.sampling.sample_guider``, counted in the figures."""
    FIGURES["sampling runs"] += 1
    return sample_guider(guider, latent_dict, **settings)


def named_set(display: str) -> set[str]:
    stem = display.removesuffix(" (Guidance Kit)")
    return {stem, stem.removesuffix(" Guider"), stem.removesuffix(" KSampler Patch"), stem.removesuffix(" Guidance")}


def named(node: str) -> str:
    """A regex matching an error that starts with ``node``'s name (or its technique's: the MODEL-patch
    and GUIDER twins of a technique share its checks)."""
    return "^(" + "|".join(sorted(map(re.escape, named_set(node)), key=len, reverse=True)) + r")( \(Guidance Kit\))?"


@pytest.fixture
def linear_ag_folder(tmp_path, monkeypatch):
    """models/linear_ag/ redirected to a temporary folder (inside a parent that must stay empty)."""
    folder = tmp_path / "models" / "linear_ag"
    folder.mkdir(parents=True)
    shipped = folder_paths.folder_names_and_paths["linear_ag"][0][1:]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "linear_ag", ([str(folder), *shipped], {".safetensors"}))
    return folder


def latent(batch):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return run_node(ToyWorldEmptyLatent, batch)[0]


def calibrate_node(toy, filename, **overrides):
    from guidance_kit.nodes.linear_ag import LinearAGCalibrate

    inputs = dict(model=toy.model, clip=toy.clip, prompts="a red circle\na blue square", negative_prompt="",
                  latent=latent(1), seed=0, steps=3, cfg=CFG, sampler_name="euler", scheduler="simple",
                  filename=filename) | overrides
    return run_node(LinearAGCalibrate, **inputs)[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def no_calibration_run(monkeypatch):
    """Fails the test if a calibration starts (the input error must come first)."""
    from guidance_kit.nodes import linear_ag

    def refuse(*args, **kwargs):
        raise AssertionError("the calibration ran before the bad input was rejected")
    monkeypatch.setattr(linear_ag, "calibrate", refuse)


# ---------------------------------------------------------------- failures found, each held by a test

@pytest.mark.parametrize("node", ["reference", "ag"])
def test_nan_cfg_on_a_guider_is_an_error_naming_it(toy, node):
    """Found: cfg NaN on the AG and Reference CFG guiders gave a black image reported as success."""
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider
    from guidance_kit.nodes.reference_guider import ReferenceCFGGuider

    for cfg in (math.nan, math.inf, -1.0, 1e30):
        if node == "reference":
            with pytest.raises(ValueError, match=r"^Reference CFG Guider: 'cfg'"):
                run_node(ReferenceCFGGuider, toy.model, toy.positive, toy.negative, cfg)
        else:
            with pytest.raises(ValueError, match=r"^Adaptive Guidance Guider: 'cfg'"):
                run_node(AdaptiveGuidanceGuider, toy.model, toy.positive, toy.negative, cfg, threshold=0.98,
                                               measure="auto", start_percent=0.0, end_percent=1.0)


def test_nan_cfg_calibration_is_refused_before_it_runs(toy, linear_ag_folder, no_calibration_run):
    """Found: LinearAG Calibrate with cfg NaN saved a calibration of NaN coefficients."""
    for cfg in (math.nan, math.inf, 1.0, 0.5):
        with pytest.raises(ValueError, match=r"^LinearAG Calibrate: 'cfg'"):
            calibrate_node(toy, "nan_cfg", cfg=cfg)
    assert files_under(linear_ag_folder.parent) == ["linear_ag"]


def test_composable_prompt_weights_are_capped_at_the_widget_range(toy):
    """Found: ':1e30' gave a black image although the weight widget stops at ±100."""
    from guidance_kit.nodes.composable import ComposablePrompt

    for text in ("a red circle :1e30", "a red circle AND NOT green :101", "a red circle :-100.5"):
        with pytest.raises(ValueError, match=r"^Composable Prompt 'text': .*\[-100, 100\]"):
            run_node(ComposablePrompt, toy.clip, text, 1.0)
    assert run_node(ComposablePrompt, toy.clip, "a red circle :100 AND NOT green :100", 1.0)[0]
    with pytest.raises(ValueError, match=r"^Composable Prompt: 'weight'"):
        run_node(ComposablePrompt, toy.clip, "a red circle", 1000.0)


def test_composable_concept_count_is_bounded_before_encoding(toy, monkeypatch):
    """Found: ~1,250 ANDs ran 2,502 model rows for 2 steps (184 s) with no warning; the bound is
    MAX_CONCEPTS, checked before any concept is encoded."""
    from guidance_kit.nodes.composable import ComposableConcept, ComposablePrompt
    from guidance_kit.samplers.composable import MAX_CONCEPTS

    encoded = []
    clip = toy.clip
    monkeypatch.setattr(clip, "encode_from_tokens_scheduled", lambda tokens: encoded.append(tokens) or [])
    for count in (MAX_CONCEPTS + 1, 1250):
        with pytest.raises(ValueError, match=rf"^Composable Prompt 'text': {count} concepts, at most {MAX_CONCEPTS}"):
            run_node(ComposablePrompt, clip, " AND ".join(["a red circle"] * count), 1.0)
    assert encoded == []
    monkeypatch.undo()
    assert len(run_node(ComposablePrompt, toy.clip, " AND ".join(["a red circle"] * MAX_CONCEPTS), 1.0)[0]) == 64
    composition = None
    for _ in range(MAX_CONCEPTS):
        composition = run_node(ComposableConcept, toy.positive, 1.0, composition)[0]
    with pytest.raises(ValueError, match=r"^Composable Concept: 'composition' already holds 64 concepts"):
        run_node(ComposableConcept, toy.positive, 1.0, composition)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _header_file(header: dict, body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


def bad_calibration_files(valid: bytes) -> dict[str, bytes]:
    """Calibration files as they reach users: damaged, foreign, or forged."""
    from guidance_kit.toyworld.weights import MAIN_WEIGHTS
    metadata = {"format": "guidance_kit.linear_ag/1", "cfg": "{not json"}
    return {
        "empty": b"",
        "truncated": valid[: len(valid) // 2],
        "truncated header": valid[:20],
        "random bytes": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
        "pickle": pickle.dumps({"coefficients": [1.0, 2.0]}),
        "header not json": (12).to_bytes(8, "little") + b"{not json!!}",
        "metadata not json": _header_file({"__metadata__": metadata}),
        "huge header length": (2 ** 62).to_bytes(8, "little") + b"{}",
        "foreign format (toy DiT)": MAIN_WEIGHTS.read_bytes(),
        "terms not a list": _header_file({"__metadata__": {"format": "guidance_kit.linear_ag/1", "terms": "5"}}),
    }


def test_bad_calibration_files_through_linear_ag_load_name_the_node_input_and_file(toy, linear_ag_folder):
    """Found: corrupt, truncated or random-bytes files surfaced raw safetensors messages without the
    file's name; metadata that is not JSON a bare JSONDecodeError."""
    from guidance_kit.nodes.linear_ag import LinearAGLoad

    good = linear_ag_folder / "good.safetensors"
    toy.calibration.save(good)
    for label, data in bad_calibration_files(good.read_bytes()).items():
        name = label.replace(" ", "_").replace("(", "").replace(")", "") + ".safetensors"
        _write(linear_ag_folder / name, data)
        with pytest.raises(ValueError, match=r"^LinearAG Load Calibration 'calibration'") as error:
            run_node(LinearAGLoad, name)
        assert name in str(error.value), (label, str(error.value))
        assert "Traceback" not in str(error.value) and len(str(error.value)) < 600, label
    assert torch.equal(run_node(LinearAGLoad, "good.safetensors")[0].coefficients, toy.calibration.coefficients)


@pytest.mark.parametrize("case", ["too long", "a directory", "the shipped name"])
def test_unusable_calibration_filename_fails_before_the_calibration_runs(toy, linear_ag_folder, no_calibration_run,
                                                                          case):
    """Found: an over-long name or an existing directory failed only after the whole calibration, with
    a raw OS error; calibrating under the shipped calibration's name silently shadowed it (refused)."""
    from guidance_kit.nodes.contract import model_files

    if case == "too long":
        filename = "x" * 250
    elif case == "a directory":
        filename = "folder"
        (linear_ag_folder / "folder.safetensors").mkdir()
    else:
        filename = Path(next(iter(model_files.SHIPPED["linear_ag"]))).stem
    before = files_under(linear_ag_folder.parent)
    with pytest.raises(ValueError, match=r"^LinearAG Calibrate: 'filename'"):
        calibrate_node(toy, filename)
    assert files_under(linear_ag_folder.parent) == before


PATH_LIKE_NAMES = ["../escape", "../../etc/x", "/tmp/absolute", "a/b", "a\\b", "..", ".hidden", "nul\0byte", "",
                   "  ", ".safetensors"]


def test_path_like_names_are_rejected_before_compute_and_nothing_is_written(toy, linear_ag_folder,
                                                                           no_calibration_run):
    """Held: path-like names rejected before compute, nothing written outside models/linear_ag/."""
    for filename in PATH_LIKE_NAMES:
        with pytest.raises(ValueError, match=r"^LinearAG Calibrate: 'filename'"):
            calibrate_node(toy, filename)
    assert files_under(linear_ag_folder.parent.parent) == ["models", "models/linear_ag"]


def test_a_symlink_at_the_save_path_is_replaced_not_followed(toy, linear_ag_folder, tmp_path):
    """Held: samplers/bundles.save_bundle writes a temporary file and os.replace-s the link itself."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    link = linear_ag_folder / "linked.safetensors"
    link.symlink_to(outside)
    calibrate_node(toy, "linked")
    assert outside.read_text() == "keep me"
    assert not link.is_symlink() and link.is_file()
    assert files_under(linear_ag_folder) == ["linked.safetensors"]  # no temporary file left


def test_calibration_used_at_another_cfg_warns(toy, caplog):
    """Found: a calibration made at cfg 4 used at cfg 8 gave no warning (cfg is in its metadata)."""
    from guidance_kit.nodes.contract.stats import stats_sink
    from guidance_kit.nodes.linear_ag import LinearAGGuider

    def run(cfg):
        guider = run_node(LinearAGGuider, toy.model, toy.positive, toy.negative, cfg, linear_ag=toy.calibration,
                                        true_every=2, guided_until=0.7)[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            counted_sample(guider, latent(1), steps=3, scheduler="simple")
        return [r.message for r in caplog.records], stats_sink(guider.model_patcher).last

    messages, _ = run(CFG)
    assert not any("calibration made at cfg" in m for m in messages)
    messages, last = run(2 * CFG)
    assert any(f"sampling at cfg {2 * CFG:g} with a calibration made at cfg {CFG:g}" in m for m in messages)
    assert any("calibration made at cfg" in text for _, text in last.events)


def test_nan_latent_is_an_error_naming_the_node_not_a_black_image(toy):
    for row in TABLE:
        nan = {"samples": latent(2)["samples"].clone()}
        nan["samples"][0, 0, 0, 0] = math.nan
        with pytest.raises(ValueError, match=named(row.node) + ": the sampler's 'latent_image' holds NaN"):
            counted_sample(guider_of(row, toy, toy.model), nan, steps=2, scheduler="simple")


def test_nan_cfg_is_an_error_naming_the_node_and_cfg_not_a_black_image(toy):
    """KSampler at cfg NaN over a pack patch sampled a black image "successfully" (and failed inside Run Stats)."""
    for row in TABLE:
        if not row.guider:
            with pytest.raises(ValueError, match=named(row.node) + ": the sampler's 'cfg' is nan"):
                ksample(row.build(toy, toy.model), row.positive(toy), toy.negative, latent(1),
                        cfg=math.nan, steps=2, scheduler="simple")


def test_a_mask_batch_that_does_not_fit_the_latent_is_an_error_naming_the_conditioning(toy):
    """A batch-2 mask with a batch-3 latent failed deep in sampling with ComfyUI's raw size error."""
    mask = torch.ones(2, 32, 32)
    masked = dataclasses.replace(toy, positive=[[t, {**o, "mask": mask}] for t, o in toy.positive],
                                 composition=[[t, {**o, "mask": mask}] for t, o in toy.composition])
    for row in TABLE:
        with pytest.raises(ValueError, match=named(row.node) + ": the 'positive' conditioning's mask has a batch "
                                                               "of 2, which does not divide the latent batch of 3"):
            counted_sample(guider_of(row, masked, toy.model), latent(3), steps=2, scheduler="simple")
    fitting = counted_sample(guider_of(TABLE[0], masked, toy.model), latent(4), steps=2, scheduler="simple")
    assert fitting.shape[0] == 4


def test_gfcg_warns_when_its_prompt_is_not_the_positive(toy, caplog):
    """GFCG's reference prompts are edits of its 'prompt'; a positive encoded from other words (blue where the
    prompt says red) used to pass without a word."""
    from guidance_kit.nodes.gfcg import GFCGModelPatch

    options = _gfcg_options(toy, weak=False)
    patched = run_node(GFCGModelPatch, toy.model, **options)[0]
    blue = run_node(nodes.CLIPTextEncode, toy.clip, "a blue circle on the left")[0]
    for positive, warned in ((toy.positive, False), (blue, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            counted_sample(cfg_guider(patched, positive, toy.negative, CFG), latent(1), steps=2, scheduler="simple")
        assert any("GFCG: 'prompt' is not the text of the positive conditioning" in r.message
                   for r in caplog.records) == warned


# ---------------------------------------------------------------- determinism, no leaked state, low memory

SETTINGS = [(3, "euler", "simple", 2), (4, "heun", "normal", 1), (3, "dpmpp_2s_ancestral", "karras", 3),
            (10, "euler", "simple", 1), (20, "euler", "simple", 1), (3, "euler", "simple", 2)]


def run_settings(guider, setting, seed=0):
    steps, sampler, scheduler, batch = setting
    return counted_sample(guider, latent(batch), steps=steps, sampler=sampler, scheduler=scheduler, seed=seed)


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_back_to_back_runs_equal_fresh_runs(toy, row):
    """One GUIDER (or patched MODEL) through step counts, samplers (single- and multi-evaluation,
    ancestral), schedulers and batch sizes back to back: every run bit-identical to a fresh one."""
    guider = guider_of(row, toy, toy.model)
    back_to_back = [run_settings(guider, setting) for setting in SETTINGS]
    for setting, got in zip(SETTINGS, back_to_back):
        assert torch.isfinite(got).all()
        assert torch.equal(got, run_settings(guider_of(row, toy, toy.model), setting)), setting
    assert torch.equal(back_to_back[0], back_to_back[-1])


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_separate_cond_and_uncond_calls_equal_the_batched_path(toy, row, monkeypatch):
    """Low memory: with (almost) no free memory ComfyUI evaluates every cond list in its own model
    call; every technique gives the batched result within float tolerance."""
    largest = []

    def count(executor, x, *args, **kwargs):
        largest.append(x.shape[0])
        return executor(x, *args, **kwargs)

    def run():
        model = toy.model.clone()
        model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test.count", count)
        largest.clear()
        samples = run_settings(guider_of(row, toy, model), (3, "euler", "simple", 2))
        return samples, max(largest)

    batched, batched_rows = run()
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (1, 1) if torch_free_too else 1)
    split, split_rows = run()
    if row.splits:
        assert batched_rows > 2 and split_rows == 2, "the low-memory path did not split the conds"
    else:
        assert batched_rows == split_rows == 2, "one main cond list per evaluation: nothing to split"
    # float32 reassociation, amplified by cfg x weights (Composable: up to 8e-5 on images in [-1, 1]);
    # cond and uncond swapped or mixed up would differ by O(0.1)
    torch.testing.assert_close(split, batched, rtol=1e-3, atol=2e-4)


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    print(f"\nreliability figures: {json.dumps(FIGURES)}")



# ---------------------------------------------------------------- bad input, property-based (every node)

# Ranges a node accepts beyond its widget's (the server's validation holds the widget range; a
# script calling the node directly may use the wider one).  Key: (node_id, input).
ACCEPTED_RANGE = {("GuidanceKitComposableGuider", "threshold"): (0.0, 1.0),
                  ("GuidanceKitComposableModelPatch", "threshold"): (0.0, 1.0),
                  ("GuidanceKitLinearAGCalibrate", "cfg"): (1.0, 100.0)}
# Valid values of the other inputs while one input is bad; by input type, then (node_id, input).
VALUE_OVERRIDES = {("GuidanceKitLinearAGCalibrate", "prompts"): "a red circle",
                   ("GuidanceKitLinearAGCalibrate", "steps"): 2}


def pack_node_classes():
    from guidance_kit.nodes import node_classes

    return node_classes()


def valid_inputs(schema, toy) -> dict:
    """Working values of every required input of a node (an unknown type fails, naming what to add)."""
    by_type = {"MODEL": toy.model, "CONDITIONING": toy.positive, "CLIP": toy.clip, "LATENT": latent(1),
               "GUIDANCE_KIT_LINEAR_AG": toy.calibration, "GUIDANCE_KIT_CLASSIFIER": toy.classifier,
               "GUIDANCE_KIT_DEEDIFF_HEADS": toy.heads, "VAE": toy.vae,
               "GUIDANCE_KIT_LEARNED_AG": toy_learned_ag_policy()}
    values = {}
    for spec in schema.inputs:
        if spec.optional:
            continue
        kind = spec.get_io_type()
        if (schema.node_id, spec.id) in VALUE_OVERRIDES:
            values[spec.id] = VALUE_OVERRIDES[schema.node_id, spec.id]
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            values[spec.id] = spec.default
        elif kind == "COMBO":
            values[spec.id] = spec.default if spec.default is not None else spec.options[0]
        elif kind in by_type:
            values[spec.id] = by_type[kind]
        else:
            pytest.fail(f"{schema.node_id}: no test value for input '{spec.id}' of type {kind}; add one to "
                        "valid_inputs in tests/test_reliability.py")
    return values


def numeric_inputs():
    """(node class, input spec) of every INT / FLOAT input of every pack node."""
    found = []
    for cls in pack_node_classes():
        schema = cls.define_schema()
        found += [(cls, spec) for spec in schema.inputs if spec.get_io_type() in ("INT", "FLOAT")]
    return found


NUMERIC = numeric_inputs()


def out_of_range(node_id: str, spec) -> st.SearchStrategy:
    """NaN, ±inf and finite values outside what the node accepts."""
    low, high = ACCEPTED_RANGE.get((node_id, spec.id), (spec.min, spec.max))
    if spec.get_io_type() == "INT":
        options = [st.integers(max_value=low - 1, min_value=low - 2 ** 70) if low is not None else None,
                   st.integers(min_value=high + 1, max_value=high + 2 ** 70) if high is not None else None]
    else:
        options = [st.sampled_from([math.nan, math.inf, -math.inf]),
                   st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False)
                   if low is not None else None,
                   st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False)
                   if high is not None else None]
    return st.one_of([option for option in options if option is not None])


@pytest.mark.parametrize("cls, spec", NUMERIC, ids=[f"{c.__name__}.{s.id}" for c, s in NUMERIC])
def test_every_numeric_input_rejects_bad_numbers_naming_node_and_input(toy, linear_ag_folder,
                                                                       no_calibration_run, cls, spec):
    schema = cls.define_schema()
    inputs = valid_inputs(schema, toy)

    @given(value=out_of_range(schema.node_id, spec))
    def check(value):
        FIGURES["inputs tried"] += 1
        with pytest.raises(ValueError, match=named(schema.display_name) + rf".*'{spec.id}'"):
            run_node(cls, **(inputs | {spec.id: value}))

    check()
    assert files_under(linear_ag_folder.parent) == ["linear_ag"]


SEPARATORS = st.sampled_from(["/", "\\", "\0", "/../", "\\..\\"])
BAD_NAMES = st.one_of(
    st.builds(lambda a, sep, b: a + sep + b, st.text(max_size=12), SEPARATORS, st.text(max_size=12)),
    st.builds(lambda a: "/" + a, st.text(max_size=20)),
    st.builds(lambda a: "../" + a, st.text(max_size=20)),
    st.builds(lambda a: "." + a, st.text(max_size=20)),
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Zs", "Cc"]), min_size=244, max_size=400),
)


@given(filename=BAD_NAMES)
def test_odd_calibration_filenames_are_rejected_before_compute(toy, linear_ag_folder, filename):
    """Path separators, '..', absolute, hidden and over-long names: an error naming 'filename' before
    any calibration, nothing written anywhere."""
    FIGURES["inputs tried"] += 1
    from guidance_kit.nodes import linear_ag

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_ag, "calibrate", lambda *a, **k: pytest.fail(f"calibrated for {filename!r}"))
        with pytest.raises(ValueError, match=r"^LinearAG Calibrate: 'filename'"):
            calibrate_node(toy, filename)
    assert files_under(linear_ag_folder.parent.parent) == ["models", "models/linear_ag"]


@given(name=st.one_of(BAD_NAMES, st.text(max_size=30)))
def test_odd_names_for_the_loaders_are_errors_naming_the_input(linear_ag_folder, name):
    """LinearAG Load and Load Toy World Model: a name that is not in their list is an error naming the
    node and input (never a file outside their folders: '/etc/passwd', '../weights.py')."""
    FIGURES["inputs tried"] += 1
    from guidance_kit.nodes.linear_ag import LinearAGLoad, calibration_files
    from guidance_kit.nodes.toyworld import ToyWorldLoader, weight_files

    if name not in calibration_files():
        with pytest.raises(ValueError, match=r"^LinearAG Load Calibration: 'calibration'"):
            run_node(LinearAGLoad, name)
    if name not in weight_files():
        with pytest.raises(ValueError, match=r"^Load Toy World Model: 'diffusion_model'"):
            run_node(ToyWorldLoader, name)


def test_loaders_refuse_paths_outside_their_folders():
    from guidance_kit.nodes.toyworld import ToyWorldLoader

    for name in ("/etc/passwd", "../weights.py", "../../README.md", "../calibrations/" + "x.safetensors"):
        with pytest.raises(ValueError, match=r"^Load Toy World Model: 'diffusion_model'"):
            run_node(ToyWorldLoader, name)


@pytest.fixture(scope="module")
def valid_calibration_bytes(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "valid.safetensors"
    toy.calibration.save(path)
    return path.read_bytes()


@given(data=st.data())
def test_damaged_calibration_files_load_or_fail_naming_node_input_and_file(toy, linear_ag_folder,
                                                                          valid_calibration_bytes, data):
    """Random truncations, byte flips and random bytes: LinearAG Load either reads a finite calibration
    or raises a ValueError naming the node, the input and the file; never anything else."""
    FIGURES["inputs tried"] += 1
    from guidance_kit.nodes.linear_ag import LinearAGLoad

    valid = valid_calibration_bytes
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "truncate":
        damaged = valid[:data.draw(st.integers(0, len(valid) - 1))]
    elif kind == "flip":
        damaged = bytearray(valid)
        for position in data.draw(st.lists(st.integers(0, len(valid) - 1), min_size=1, max_size=8)):
            damaged[position] ^= data.draw(st.integers(1, 255))
        damaged = bytes(damaged)
    else:
        damaged = data.draw(st.binary(max_size=2048))
    (linear_ag_folder / "damaged.safetensors").write_bytes(damaged)
    try:
        loaded = run_node(LinearAGLoad, "damaged.safetensors")[0]
    except ValueError as error:
        assert str(error).startswith("LinearAG Load Calibration 'calibration'") and "damaged.safetensors" in str(error)
        return
    assert all(torch.isfinite(t).all() for t in (loaded.coefficients, loaded.evaluation_sigmas, loaded.schedule))


PROMPT_WORDS = st.sampled_from(["a", "red", "circle", "AND", "NOT", ":", ":0.5", ":1e30", ":-3", "(red:1.2)", "\\AND",
                                "\\:", "  ", "square", ":nan", ":inf", "AND AND", "NOT NOT"])


@given(words=st.lists(PROMPT_WORDS, max_size=12), weight=st.floats(-150, 150))
def test_composable_prompt_text_gives_a_bounded_composition_or_an_error_naming_it(toy, words, weight):
    FIGURES["inputs tried"] += 1
    from guidance_kit.nodes.composable import ComposablePrompt, concept_groups
    from guidance_kit.samplers.composable import MAX_CONCEPTS, MAX_WEIGHT

    text = " ".join(words)
    try:
        composition = run_node(ComposablePrompt, toy.clip, text, weight)[0]
    except ValueError as error:
        assert str(error).startswith("Composable Prompt"), str(error)
        return
    groups = concept_groups([options for _, options in composition])
    assert 1 <= len(groups) <= MAX_CONCEPTS
    assert all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for w, _ in groups)


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_empty_conditioning_is_an_error_not_a_wrong_image(toy, row):
    """Empty positive or negative lists (no entries) gave out-of-range images on every node."""
    for positive, negative, name in (([], toy.negative, "positive|composition"), (toy.positive, [], "negative")):
        emptied = dataclasses.replace(toy, positive=positive, composition=positive if not positive else
                                      toy.composition, negative=negative)
        with pytest.raises(ValueError, match=named(row.node) + rf".*'({name})'.* (empty|no concepts)"):
            run_settings(guider_of(row, emptied, toy.model), (2, "euler", "simple", 1))


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_conditioning_batch_other_than_the_latent_batch_samples_like_comfyui(toy, row):
    """A batch-2 conditioning with a batch-3 latent: ComfyUI repeats conds to the latent's batch; every
    node gives a finite image of the latent's batch, and the reference equals stock CFG."""
    def doubled(conditioning):
        return [[torch.cat([tensor, 0.5 * tensor]), options] for tensor, options in conditioning]

    mismatched = dataclasses.replace(toy, positive=doubled(toy.positive), composition=doubled(toy.composition),
                                     negative=doubled(toy.negative))
    got = run_settings(guider_of(row, mismatched, toy.model), (3, "euler", "simple", 3))
    assert got.shape[0] == 3 and torch.isfinite(got).all() and float(got.abs().max()) < 10
    if row.plain_cfg:
        stock = cfg_guider(toy.model, mismatched.positive, mismatched.negative, CFG)
        assert torch.equal(got, run_settings(stock, (3, "euler", "simple", 3)))


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_every_model_family_samples_or_is_refused_naming_the_node(toy, tiny, row):
    """eps, SDXL (adm), v-prediction and flow MMDiT models: a finite image where the row samples, and the row's
    declared ``other_family_error`` naming the node elsewhere (inputs made for the toy model, e.g. a calibration,
    on another family); a row that refuses where it should sample, or samples where it should refuse, fails."""
    from guidance_kit.nodes.composable import mark_concept

    composition = mark_concept(tiny.positive, 1.0) + mark_concept(tiny.negative, -0.5)
    other = dataclasses.replace(toy, model=tiny.patcher, positive=tiny.positive, composition=composition,
                                negative=tiny.negative)
    if row.other_family_error is not None and tiny.family not in row.samples_on:
        with pytest.raises((ValueError, RuntimeError), match=named(row.node) + ":? " + row.other_family_error):
            counted_sample(guider_of(row, other, tiny.patcher), tiny.empty_latent(batch=2), steps=3)
        return
    got = counted_sample(guider_of(row, other, tiny.patcher), tiny.empty_latent(batch=2), steps=3)
    assert got.shape == (2, tiny.latent_channels, tiny.latent_size, tiny.latent_size) and torch.isfinite(got).all()


# Nodes that are not technique rows of the contract table, and the tests here that cover them.
NON_TECHNIQUE_NODES = {
    "GuidanceKitToyWorldLoader": "test_odd_names_for_the_loaders_are_errors_naming_the_input",
    "GuidanceKitToyWorldEmptyLatent": "test_toyworld_comfy::test_ksampler_and_custom_advanced_agree",
    "GuidanceKitComposableConcept": "test_composable_concept_count_is_bounded_before_encoding",
    "GuidanceKitComposablePrompt": "test_composable_prompt_text_gives_a_bounded_composition_or_an_error_naming_it",
    "GuidanceKitLinearAGCalibrate": "test_odd_calibration_filenames_are_rejected_before_compute",
    "GuidanceKitLinearAGLoad": "test_damaged_calibration_files_load_or_fail_naming_node_input_and_file",
    "GuidanceKitLearnedAGCalibrate": "test_learned_ag::test_calibrate_node_saves_the_file_and_reports_progress",
    "GuidanceKitLearnedAGLoad": "test_learned_ag::test_calibrate_node_saves_the_file_and_reports_progress",
    "GuidanceKitToyWorldV2Loader": "test_toyworld_v2_comfy::test_loader_errors_name_the_node_and_the_file",
    "GuidanceKitToyWorldV2EmptyLatent":
        "test_toyworld_v2_comfy::test_the_model_is_comfyuis_flux_with_the_training_parametrisation",
    "GuidanceKitLINASchedule": "test_lina::test_sampler_custom_runs_on_the_schedule_and_it_changes_the_image",
    "GuidanceKitLINARelationPrompt": "test_lina::test_relation_prompt_removes_the_given_words_or_the_top_ranked_ones",
    "GuidanceKitRunStats": "test_run_stats_without_a_technique_source_names_the_input",
    "GuidanceKitLoadClassifier": "test_classifier_loaders_refuse_bad_files_and_inputs_naming_them",
    "GuidanceKitClipZeroShotClassifier": "test_classifier_loaders_refuse_bad_files_and_inputs_naming_them",
    "GuidanceKitDeeDiffTrain":
        "test_training_nodes::test_each_training_node_trains_through_the_executor_and_writes_its_file",
    "GuidanceKitDeeDiffLoad": "test_deediff_load_refuses_names_outside_its_folders",
    "GuidanceKitPPAPTrainExperts":
        "test_training_nodes::test_each_training_node_trains_through_the_executor_and_writes_its_file",
}



def test_deediff_load_refuses_names_outside_its_folders():
    from guidance_kit.nodes.deediff import DeeDiffLoad

    assert run_node(DeeDiffLoad, "toy_dit_heads.safetensors")[0] is not None
    for name in ("../toy_dit_heads.safetensors", "/etc/passwd", "missing.safetensors", ""):
        with pytest.raises(ValueError, match=r"^DeeDiff Load Heads \(Guidance Kit\): 'heads' must be a file"):
            run_node(DeeDiffLoad, name)


def test_classifier_loaders_refuse_bad_files_and_inputs_naming_them(tmp_path, monkeypatch):
    """Load Classifier: a damaged or foreign file in models/classifiers/ names the node and the file;
    pixel source 'vae' without a VAE and CLIP Zero-Shot classes/template errors name the input."""
    import folder_paths

    from guidance_kit.nodes.classifier import ClipZeroShotClassifier, LoadClassifier

    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "classifiers", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("classifiers", None)
    with pytest.raises(ValueError, match=r"Load Classifier 'classifier' \(broken.safetensors\).*broken.safetensors"):
        run_node(LoadClassifier, "broken.safetensors", "auto")
    with pytest.raises(ValueError, match="Load Classifier: pixel_source 'vae' needs the 'vae' input"):
        run_node(LoadClassifier, "toy_classifier.safetensors (toy world)", "vae")
    with pytest.raises(ValueError, match="CLIP Zero-Shot Classifier 'classes'"):
        run_node(ClipZeroShotClassifier, None, None, "colour: red", "{}", "auto")
    with pytest.raises(ValueError, match="CLIP Zero-Shot Classifier 'template'"):
        run_node(ClipZeroShotClassifier, None, None, "red, blue", "no slot", "auto")


def reached_source(reference: str) -> str:
    """The source of the test ``[module::]name`` and of the module-level functions and tables it uses (three
    levels deep): where the node a test covers must be named."""
    module, _, name = reference.rpartition("::")
    tree = ast.parse((Path(__file__).parent / f"{module or Path(__file__).stem}.py").read_text())
    definitions = {target.id if isinstance(target, ast.Name) else None: node for node in tree.body
                   for target in ([node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                                  getattr(node, "targets", []))}
    definitions.update({node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))})
    reached, frontier = {}, {name}
    for _ in range(3):
        found = {n: definitions[n] for n in frontier if n in definitions and n not in reached}
        reached.update(found)
        frontier = {sub.id for node in found.values() for sub in ast.walk(node) if isinstance(sub, ast.Name)}
    assert name in reached, f"no test {reference}"
    return "\n".join(ast.unparse(node) for node in reached.values())


def test_every_pack_node_is_covered():
    """A node is a row of technique_table.TABLE (every table-driven test here runs on it) or is listed in
    NON_TECHNIQUE_NODES with a test that runs it (its class is named in that test or what the test uses);
    a new node that is neither fails here."""
    table = {row.node for row in TABLE}
    uncovered = []
    for cls in pack_node_classes():
        schema = cls.define_schema()
        if schema.node_id in NON_TECHNIQUE_NODES:
            assert cls.__name__ in reached_source(NON_TECHNIQUE_NODES[schema.node_id]), \
                f"{NON_TECHNIQUE_NODES[schema.node_id]} does not run {cls.__name__}"
        elif not named_set(schema.display_name) & table:
            uncovered.append(schema.display_name)
    assert not uncovered, f"add a row to technique_table.TABLE (or NON_TECHNIQUE_NODES) for {uncovered}"
    FIGURES["nodes covered"] = len(pack_node_classes())
    FIGURES["table rows"] = len(TABLE)


def test_run_stats_without_a_technique_source_names_the_input(toy):
    from guidance_kit.nodes.run_stats_node import RunStatsNode

    for source in (toy.model, cfg_guider(toy.model, toy.positive, toy.negative, CFG)):
        with pytest.raises(ValueError, match=r"^Run Stats: 'source' carries no Guidance Kit stats"):
            run_node(RunStatsNode, source, latent(1))


def test_damaged_toy_world_weight_files_are_errors_naming_the_input(tmp_path, monkeypatch):
    """Found: a truncated, random or non-finite weight file in models/toyworld/ gave raw safetensors
    errors (or NaN images)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from guidance_kit.nodes.toyworld import ToyWorldLoader
    from guidance_kit.toyworld.weights import CALIBRATIONS_DIR, MAIN_WEIGHTS

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "toyworld", ([str(tmp_path)], {".safetensors"}))
    valid = MAIN_WEIGHTS.read_bytes()
    tensors = load_file(str(MAIN_WEIGHTS))
    first = sorted(key for key in tensors if key.startswith("diffusion_model."))[0]
    tensors[first] = torch.full_like(tensors[first], math.nan)
    with safe_open(str(MAIN_WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    (tmp_path / "truncated.safetensors").write_bytes(valid[: len(valid) // 3])
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 16)
    shipped = next(CALIBRATIONS_DIR.glob("*.safetensors"))
    (tmp_path / "calibration.safetensors").write_bytes(shipped.read_bytes())  # a foreign safetensors file
    for name in ("nan.safetensors", "truncated.safetensors", "random.safetensors", "calibration.safetensors"):
        with pytest.raises(ValueError, match=r"^Load Toy World Model: 'diffusion_model': .*" + re.escape(name)):
            run_node(ToyWorldLoader, name)


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_a_save_interrupted_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, stage):
    """Every file the pack saves (calibrations, training checkpoints, trained heads) goes through
    save_bundle: an interrupt (KeyboardInterrupt, ComfyUI's interrupt exception) at any point of
    the write leaves the previous file as it was and no temporary file."""
    from guidance_kit.samplers import bundles

    path = tmp_path / "bundle.safetensors"
    bundles.save_bundle(path, {"a": torch.ones(4)}, {"step": 1}, "test/1")
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"write": (bundles.os, "fdopen"), "fsync": (bundles.os, "fsync"), "replace": (bundles.os, "replace")}
    monkeypatch.setattr(*target[stage], interrupted)
    with pytest.raises(KeyboardInterrupt):
        bundles.save_bundle(path, {"a": torch.zeros(4)}, {"step": 2}, "test/1")
    monkeypatch.undo()
    assert path.read_bytes() == before and files_under(tmp_path) == ["bundle.safetensors"]
