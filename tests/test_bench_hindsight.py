"""bench/ag_hindsight.py's per-image switch choices (pure Python; no model)."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))

import ag_hindsight  # noqa: E402


def test_stable_step_is_where_the_verdict_stops_changing():
    assert ag_hindsight.stable_step([False, True, False, True, True]) == 3
    assert ag_hindsight.stable_step([True, True, True]) == 0
    assert ag_hindsight.stable_step([True, True, False]) == 2  # fails with CFG: stable from the last index


def test_luckiest_step_is_the_first_pass_or_zero():
    assert ag_hindsight.luckiest_step([False, False, True, False]) == 2
    assert ag_hindsight.luckiest_step([False, False]) == 0


def test_choice_figures_map_indices_to_switch_steps():
    # a coarse grid (the --quick one): indices 0..2 are switch steps 0, 10, 20 of a 20-step run
    switch_steps = [0, 10, 20]
    verdicts = [[False, True, True], [True, True, True], [False, False, False]]
    chosen = [ag_hindsight.stable_step(v) for v in verdicts]
    figures = ag_hindsight.choice_figures(chosen, verdicts, switch_steps)
    assert chosen == [1, 0, 0]
    assert figures["mean_switch_step"] == round(10 / 3, 2)
    assert figures["rows_saved"] == round((10 + 20 + 20) / (2 * 20 * 3), 4)
    assert figures["pass"] == round(2 / 3, 4)
