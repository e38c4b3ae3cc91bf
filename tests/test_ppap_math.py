"""PPAP's pure parts: LoRA adapters, the distillation loss, expert ranges and choice, the guidance conversion."""
import pytest
import torch
from torch import nn

from guidance_kit.samplers import lora, ppap
from guidance_kit.toyworld import scenes
from guidance_kit.toyworld.model import ToyClassifier


def toy_classifier(seed=0):
    torch.manual_seed(seed)
    return ToyClassifier(len(scenes.COLOURS), len(scenes.SHAPES), len(scenes.POSITIONS))


def test_fresh_lora_leaves_the_network_unchanged_and_trains_only_adapters_norms_biases():
    network = toy_classifier()
    x = torch.randn(2, 3, 32, 32)
    before = network(x)
    trainable = lora.add_lora(network, rank=4, alpha=4.0, exclude=("heads",))
    after = network(x)
    assert all(torch.allclose(before[h], after[h], atol=1e-6) for h in before)
    norms = {f"{name}.{p}" for name, m in network.named_modules() if isinstance(m, nn.GroupNorm)
             for p in ("weight", "bias")}
    adapters = {n for n in trainable if ".down." in n or ".up." in n}
    biases = {n for n in trainable if n.endswith("base.bias")}
    assert set(trainable) == norms | adapters | biases and norms and adapters and biases
    assert not any(n.startswith("heads") for n in trainable)
    assert not any(n.endswith("base.weight") for n in trainable)
    assert "features.1.weight" in trainable  # a GroupNorm's affine weight
    assert 0 < lora.trainable_fraction(network) < 0.05


def test_lora_conv_update_is_a_low_rank_conv_with_the_base_geometry():
    base = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    layer = lora.LoRALayer(base, rank=2, alpha=4.0)
    nn.init.normal_(layer.up.weight)
    x = torch.randn(1, 8, 10, 10)
    delta = layer(x) - base(x)
    down = nn.functional.conv2d(x, layer.down.weight, stride=2, padding=1)
    expected = 2.0 * nn.functional.conv2d(down, layer.up.weight)
    assert torch.allclose(delta, expected, atol=1e-5)


def test_with_parameters_applies_an_expert_without_touching_the_shared_network():
    network = toy_classifier()
    trainable = lora.add_lora(network, rank=2, alpha=2.0, exclude=("heads",))
    x = torch.randn(2, 3, 32, 32)
    plain = network(x)["colour"]
    expert = {name: torch.randn_like(network.get_parameter(name)) * 0.1 for name in trainable}
    changed = lora.with_parameters(network, expert, x)["colour"]
    assert not torch.allclose(plain, changed)
    assert torch.allclose(network(x)["colour"], plain)


def test_distillation_loss_is_the_kl_to_the_sharpened_teacher():
    teacher = {"a": torch.tensor([[2.0, 0.0, -1.0]]), "b": torch.tensor([[0.5, 0.1]])}
    sharpened = {h: torch.softmax(t / 0.25, -1) for h, t in teacher.items()}
    matched = {h: torch.log(p) for h, p in sharpened.items()}
    assert float(ppap.distillation_loss(matched, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = {"a": torch.zeros(1, 3), "b": torch.zeros(1, 2)}
    expected = sum(float((p * (p.log() - torch.log_softmax(student[h], -1))).sum()) for h, p in sharpened.items())
    assert float(ppap.distillation_loss(student, teacher)) == pytest.approx(expected, rel=1e-5)


def test_timestep_ranges_follow_the_paper_split():
    assert ppap.timestep_ranges(1000, 5) == [(0, 200), (200, 400), (400, 599), (599, 799), (799, 999)]
    assert ppap.timestep_ranges(1000, 1) == [(0, 999)]


def test_sigma_ranges_are_contiguous_from_zero_and_end_at_the_model_maximum():
    schedule = torch.arange(1, 1001, dtype=torch.float32) / 1000  # rectified flow, shift 1
    ranges = ppap.sigma_ranges(schedule, 5)
    ppap.check_ranges(ranges)
    assert float(ranges[0, 0]) == 0.0 and float(ranges[-1, 1]) == 1.0
    assert ranges[:, 1].tolist() == pytest.approx([0.201, 0.401, 0.6, 0.8, 1.0])


def test_choose_experts_sends_a_boundary_to_the_lower_expert_and_flags_uncovered_sigmas():
    ranges = torch.tensor([[0.0, 0.2], [0.2, 0.6], [0.6, 1.0]])
    sigma = torch.tensor([0.0, 0.1, 0.2, 0.2001, 0.6, 0.99, 1.0, 1.00001, 1.5])
    assert ppap.choose_experts(sigma, ranges).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, -1]


@pytest.mark.parametrize("bad", [[[0.1, 0.5], [0.5, 1.0]], [[0.0, 0.5], [0.6, 1.0]], [[0.0, 0.5], [0.5, 0.4]]])
def test_check_ranges_rejects_gaps_and_disorder(bad):
    with pytest.raises(ValueError):
        ppap.check_ranges(torch.tensor(bad))


def test_denoised_guidance_matches_tweedie_on_a_gaussian():
    """For x0 ~ N(μ_y, I) given y, the exact guided denoised E[x0 | x, y] equals D + σ_t²/α·∇ log p(y|x)."""
    torch.manual_seed(0)
    mu = torch.tensor([1.5, -0.5])
    for alpha, noise_std in [(1.0, 2.0), (0.6, 0.4)]:  # eps-style VE and a flow point
        x = torch.randn(4, 2)
        var = alpha ** 2 + noise_std ** 2
        # two classes with means ±μ: p(x|y) = N(±α μ, var I); prior over x0 = equal mixture
        def log_joint(x, sign):
            return -((x - sign * alpha * mu) ** 2).sum(-1) / (2 * var)
        xr = x.clone().requires_grad_(True)
        log_post = log_joint(xr, 1) - torch.logsumexp(torch.stack([log_joint(xr, 1), log_joint(xr, -1)]), 0)
        gradient, = torch.autograd.grad(log_post.sum(), xr)
        def posterior_mean(x, weights):
            # E[x0 | x, component] = m + α/var (x - α m) for x0 ~ N(m, I)
            return sum(w[:, None] * (sign * mu + alpha / var * (x - sign * alpha * mu))
                       for sign, w in zip((1, -1), weights))
        lp, lm = log_joint(x, 1), log_joint(x, -1)
        w_plus = torch.sigmoid(lp - lm)
        unconditional = posterior_mean(x, (w_plus, 1 - w_plus))
        conditional = posterior_mean(x, (torch.ones(4), torch.zeros(4)))
        shift = ppap.denoised_guidance(gradient, torch.full((4,), alpha), torch.full((4,), noise_std), scale=1.0)
        assert torch.allclose(unconditional + shift, conditional, atol=1e-5)


def test_denoised_guidance_caps_the_flow_factor_near_pure_noise():
    gradient = torch.ones(2, 3)
    shift = ppap.denoised_guidance(gradient, torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.5]), scale=2.0)
    assert shift[0].tolist() == pytest.approx([2.0 / ppap.MIN_SIGNAL] * 3)
    assert shift[1].tolist() == pytest.approx([2.0 * 0.25 / 0.5] * 3)


def test_guidance_gradient_uses_each_samples_expert_inside_inference_mode():
    network = toy_classifier()
    trainable = lora.add_lora(network, rank=2, alpha=2.0, exclude=("heads",))
    generator = torch.Generator().manual_seed(1)
    experts = [{name: network.get_parameter(name).detach() + 0.05 * k * torch.randn(network.get_parameter(name).shape,
                                                                                     generator=generator)
                for name in trainable} for k in range(2)]
    classifier = ppap.ExpertClassifier(network, experts, torch.tensor([[0.0, 0.5], [0.5, 1.0]]),
                                       {"colour": list(scenes.COLOURS)})
    with torch.inference_mode():
        x = torch.randn(3, 3, 32, 32)
        sigma = torch.tensor([0.2, 0.9, 0.5])
        gradient, probability, chosen = classifier.guidance_gradient(x, sigma, lambda x, s: x, "colour", 2)
    assert chosen.tolist() == [0, 1, 0]
    for row in range(3):
        xr = x[row:row + 1].clone().requires_grad_(True)
        log_prob = torch.log_softmax(classifier.logits(xr, int(chosen[row]))["colour"], -1)[0, 2]
        expected, = torch.autograd.grad(log_prob, xr)
        assert torch.allclose(gradient[row], expected[0], atol=1e-5)
        assert float(probability[row]) == pytest.approx(float(log_prob.detach().exp()), rel=1e-5)
    with pytest.raises(ValueError, match="above the experts' noise ranges"):
        classifier.guidance_gradient(x, torch.tensor([0.2, 1.2, 0.5]), lambda x, s: x, "colour", 2)
