"""DeeDiff's pure parts: the uncertainty heads, the losses, and the exit engine on a real ToyDiT (random weights)."""
import pytest
import torch

from guidance_kit.samplers import deediff
from guidance_kit.toyworld.model import ToyDiT


def small_dit(seed=0):
    torch.manual_seed(seed)
    network = ToyDiT(image_size=8, patch_size=2, width=32, depth=4, heads=2, context_dim=16, num_text_tokens=4)
    with torch.no_grad():  # adaLN-Zero starts as the identity; give every layer weights so blocks matter
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return network.eval()


def inputs(batch=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=generator)
    timesteps = torch.linspace(50, 950, batch)
    context = torch.randn(batch, 4, 16, generator=generator)
    return x, timesteps, context


def heads_for(network, bias_spread=4.0, seed=2):
    torch.manual_seed(seed)
    heads = deediff.UncertaintyHeads(len(network.blocks), 32, 32, 12)
    with torch.no_grad():  # confidence decided mostly by the modulation vector (so by timestep): rows differ
        for head in heads.heads:
            head.token.weight.mul_(0.1)
            head.time.weight.normal_(0, bias_spread / 32 ** 0.5)
    return heads


def exit_forward(network, heads, threshold, x, timesteps, context, previous=None):
    """ToyDiT forward with DeeDiff's replacement on every block, the way the ComfyUI patch installs it."""
    exits = deediff.ForwardExits(x.shape[0], network.num_patches, len(network.blocks))

    def replacement(index):
        def replace(args, extra):
            chain = extra["original_block"] if previous is None else (
                lambda sub: previous(sub, {"original_block": extra["original_block"]}))
            return deediff.run_block(index, args, chain, heads, threshold, exits)
        return replace

    options = {"patches_replace": {"dit": {("single_block", i): replacement(i) for i in range(len(network.blocks))}}}
    with torch.no_grad():
        return network(x, timesteps, context, transformer_options=options), exits


def reference(network, heads, threshold, x, timesteps, context):
    """Row by row: run blocks until the row's confidence reaches the threshold, then the output head."""
    outputs, depths = [], []
    with torch.no_grad():
        for row in range(x.shape[0]):
            h, vec = network.embed(x[row:row + 1], timesteps[row:row + 1], context[row:row + 1])
            depth = len(network.blocks)
            for i, block in enumerate(network.blocks):
                h = block(h, vec)
                if i < heads.exits and deediff.confidence(heads(i, h[:, -network.num_patches:], vec)) >= threshold:
                    depth = i + 1
                    break
            outputs.append(network.head(h, vec))
            depths.append(depth)
    return torch.cat(outputs), depths


def test_heads_are_timestep_aware_and_bounded():
    heads = deediff.UncertaintyHeads(4, 32, 32, 12)
    tokens = torch.randn(2, 16, 32)
    vec = torch.randn(2, 32)
    u = heads(0, tokens, vec)
    assert u.shape == (2, 16, 12) and bool(((u > 0) & (u < 1)).all())
    assert not torch.allclose(heads(0, tokens, vec), heads(0, tokens, vec + 1.0))
    assert heads.exits == 3
    with pytest.raises(ValueError, match="at least 2 blocks"):
        deediff.UncertaintyHeads(1, 32, 32, 12)


def test_uncertainty_loss_trains_heads_to_the_exit_error():
    """Eq. 5-6: a head fitted by L_u predicts high uncertainty where the exit's error is large."""
    torch.manual_seed(0)
    heads = deediff.UncertaintyHeads(2, 8, 4, 3)
    tokens = torch.randn(256, 5, 8)
    vec = torch.randn(256, 4)
    target = torch.zeros(256, 5, 3)
    prediction = tokens[..., :3] * (vec[:, :1, None] > 0)  # error only where vec[0] > 0
    optimiser = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(200):
        loss = deediff.uncertainty_loss([heads(0, tokens, vec)], [deediff.pseudo_uncertainty(prediction, target)])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        certainty = deediff.confidence(heads(0, tokens, vec))
    certain, uncertain = float(certainty[vec[:, 0] <= 0].mean()), float(certainty[vec[:, 0] > 0].mean())
    assert certain > 0.8 and uncertain < 0.65


def test_layerwise_loss_weights_exits_by_their_certainty():
    target = torch.zeros(1, 2, 1)
    predictions = [torch.ones(1, 2, 1), torch.full((1, 2, 1), 3.0)]  # squared errors 1 and 9
    certain_first = [torch.full((1, 2, 1), 0.25), torch.full((1, 2, 1), 0.75)]  # certainties 0.75, 0.25
    loss = deediff.layerwise_loss(certain_first, predictions, target)
    assert float(loss) == pytest.approx(0.75 * 1 + 0.25 * 9)
    assert float(deediff.pseudo_uncertainty(predictions[0], target).mean()) == pytest.approx(float(torch.tanh(
        torch.tensor(1.0))))


@pytest.mark.parametrize("threshold", [0.5, 0.55, 0.59])
def test_exit_engine_matches_row_by_row_exits_and_skips_their_blocks(threshold):
    network, (x, timesteps, context) = small_dit(), inputs()
    heads = heads_for(network)
    out, exits = exit_forward(network, heads, threshold, x, timesteps, context)
    expected, depths = reference(network, heads, threshold, x, timesteps, context)
    assert exits.blocks_run.tolist() == depths
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert exits.block_rows == sum(depths)
    assert len(set(depths)) > 1  # rows of different timesteps leave at different blocks


def test_threshold_one_is_the_full_model():
    network, (x, timesteps, context) = small_dit(), inputs()
    out, exits = exit_forward(network, heads_for(network), 1.0, x, timesteps, context)
    with torch.no_grad():
        torch.testing.assert_close(out, network(x, timesteps, context))
    assert exits.block_rows == exits.full_block_rows == 6 * 4


def test_exits_chain_another_block_patch():
    """Another pack's replacement still runs, on the rows still running only."""
    network, (x, timesteps, context) = small_dit(), inputs()
    seen = []

    def other(args, extra):
        seen.append(args["img"].shape[0])
        out = extra["original_block"](args)
        return {"img": out["img"] * 1.01}

    _, exits = exit_forward(network, heads_for(network), 0.55, x, timesteps, context, previous=other)
    assert seen == [int((exits.blocks_run > i).sum()) for i in range(4)] and seen[0] == 6 > seen[-1]


def test_joint_loss_is_ual_plus_uncertainty_plus_weighted_distillation():
    generator = torch.Generator().manual_seed(3)
    predictions = [torch.randn(4, 5, 6, generator=generator) for _ in range(4)]
    uncertainties = [torch.rand(4, 5, 6, generator=generator) for _ in range(3)]
    target = torch.randn(4, 5, 6, generator=generator)
    exits = predictions[:-1]
    pseudo = [deediff.pseudo_uncertainty(p, target) for p in exits]
    base = deediff.layerwise_loss(uncertainties, exits, target) + deediff.uncertainty_loss(uncertainties, pseudo)
    distill = (predictions[-1] - target).pow(2).mean()
    for weight in (0.0, 2.5):
        assert torch.allclose(deediff.joint_loss(uncertainties, predictions, target, weight), base + weight * distill)


def test_weight_deltas_start_at_zero_and_merge_the_low_rank_update():
    from guidance_kit.samplers.lora import WeightDeltas

    deltas = WeightDeltas({"a.weight": (6, 4), "b.weight": (3, 6)}, rank=2, alpha=4.0, seed=1)
    weights = {"a.weight": torch.randn(6, 4), "b.weight": torch.randn(3, 6)}
    assert all(torch.equal(merged, weights[name]) for name, merged in deltas.merged(weights).items())
    with torch.no_grad():
        for up in deltas.up:
            up.normal_()
    up, down = deltas.factors()["a.weight"]
    assert torch.allclose(deltas.merged(weights)["a.weight"], weights["a.weight"] + 2.0 * up @ down)
    assert deltas.names == ["a.weight", "b.weight"]
