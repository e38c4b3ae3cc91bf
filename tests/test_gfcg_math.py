"""GFCG's reference rule and combine, Autoguidance's extrapolation (pure torch)."""
import torch

from guidance_kit.samplers.autoguidance import autoguide
from guidance_kit.samplers.gfcg import ReadingSchedule, choose_reference, guide, head_confusion


def test_reference_is_the_most_probable_other_class_and_confusion_ignores_the_rest():
    probabilities = torch.tensor([[0.5, 0.1, 0.4], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    reference, confusion = head_confusion(probabilities, target=0)
    assert reference.tolist() == [2, 2, 1]
    assert torch.allclose(confusion, torch.tensor([0.4 / 0.9, 0.8 / 0.9, 0.6 / 0.8]))


def test_scale_is_zero_when_confident_and_grows_with_confusion():
    colour = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9]])
    reference = choose_reference({"colour": colour}, {"colour": 0}, max_scale=4.0, confidence=0.9)
    assert torch.allclose(reference.scale, torch.tensor([0.0, 2.0, 4.0 * 0.9]))
    assert reference.active.tolist() == [False, True, True]
    assert reference.index.tolist() == [1, 1, 1]
    assert torch.equal(reference.target_probability["colour"], colour[:, 0])


def test_the_most_confused_head_supplies_the_reference():
    probabilities = {"colour": torch.tensor([[0.6, 0.4, 0.0], [0.99, 0.01, 0.0]]),
                     "shape": torch.tensor([[0.9, 0.1], [0.3, 0.7]])}
    reference = choose_reference(probabilities, {"colour": 0, "shape": 0}, max_scale=1.0, confidence=0.95)
    assert reference.head.tolist() == [0, 1]
    assert reference.index.tolist() == [1, 1]
    assert torch.allclose(reference.scale, torch.tensor([0.4, 0.7]))


def test_guide_moves_only_active_samples_along_the_contrast():
    base, positive, reference = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2), -torch.ones(2, 3, 2, 2)
    out = guide(base, positive, reference, torch.tensor([0.0, 1.5]))
    assert torch.equal(out[0], base[0]) and torch.allclose(out[1], torch.full((3, 2, 2), 3.0))


def test_reading_schedule_every_k_evaluations():
    schedule = ReadingSchedule(every=3)
    due = []
    for _ in range(7):
        due.append(schedule.due())
        schedule.last = object()
    assert due == [True, False, False, True, False, False, True]


def test_autoguide_extrapolates_from_the_weak_model():
    main, weak = torch.full((2, 1), 2.0), torch.full((2, 1), 1.0)
    assert torch.equal(autoguide(main, weak, 1.0), main) and torch.equal(autoguide(main, weak, 0.0), weak)
    assert torch.equal(autoguide(main, weak, torch.tensor([2.0, 3.0])), torch.tensor([[3.0], [4.0]]))
