"""What one sampling run did, step by step: the record every technique reports through.

A ``RunStats`` is created fresh for each sampling run.  Each model evaluation (one call of the
guider, so a multi-evaluation sampler such as Heun opens two per step) appends an
``Evaluation`` holding the noise level, the model rows actually evaluated, the rows plain CFG
would have cost, and any technique signals (e.g. a cosine similarity).  Events mark decisions
(e.g. "switch to conditional only") at the evaluation where they happened.

Steps are read off the sampling schedule (``sigmas``): an evaluation at sigma_i belongs to step
i + 1, one between two schedule entries (a midpoint of a second-order sampler) to a fractional
position, so reports speak in the sampler's steps whatever the sampler.
"""
from dataclasses import dataclass, field
from itertools import pairwise


@dataclass
class Evaluation:
    """One model evaluation of a sampling run."""

    sigma: float
    rows: int = 0
    baseline_rows: int | None = None
    signals: dict = field(default_factory=dict)
    acted: list[str] = field(default_factory=list)  # the techniques that ran their step on this evaluation

    @property
    def rows_saved(self) -> int:
        return 0 if self.baseline_rows is None else self.baseline_rows - self.rows


@dataclass
class RunStats:
    """Per-evaluation record of one sampling run by one technique."""

    technique: str
    evaluations: list[Evaluation] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)

    def begin_evaluation(self, sigma: float) -> Evaluation:
        evaluation = Evaluation(sigma=float(sigma))
        self.evaluations.append(evaluation)
        return evaluation

    @property
    def current(self) -> Evaluation | None:
        return self.evaluations[-1] if self.evaluations else None

    def count_rows(self, rows: int, sigma: float) -> None:
        """Add model rows to the open evaluation (one is opened if a model is called outside any)."""
        evaluation = self.current or self.begin_evaluation(sigma)
        evaluation.rows += rows

    def signal(self, **values) -> None:
        """Attach technique signals (floats, lists of floats; tensors are stored as lists) to the
        open evaluation."""
        self.current.signals.update({name: value.tolist() if hasattr(value, "tolist") else value
                                     for name, value in values.items()})

    def act(self, technique: str) -> None:
        """Record that ``technique`` ran its step on the open evaluation (stacked techniques each record)."""
        if self.current is not None and technique not in self.current.acted:
            self.current.acted.append(technique)

    @property
    def techniques_acted(self) -> set[str]:
        return {name for evaluation in self.evaluations for name in evaluation.acted}

    def mark(self, label: str) -> None:
        """Record a decision at the open evaluation."""
        self.events.append((len(self.evaluations) - 1, label))

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.evaluations)

    @property
    def baseline_rows(self) -> int:
        return sum(e.rows if e.baseline_rows is None else e.baseline_rows for e in self.evaluations)

    @property
    def rows_saved(self) -> int:
        return self.baseline_rows - self.rows

    @property
    def steps(self) -> int:
        """Sampler steps of the schedule (the number of evaluations when no schedule was recorded)."""
        return len(self.sigmas) - 1 if len(self.sigmas) > 1 else len(self.evaluations)

    def position(self, index: int) -> float:
        """Where evaluation ``index`` lies in the schedule, in steps from the start: i at sigma_i,
        fractional between two schedule entries (the evaluation index without a schedule)."""
        sigma, sigmas = self.evaluations[index].sigma, self.sigmas
        if len(sigmas) < 2:
            return float(index)
        for i, (high, low) in enumerate(pairwise(sigmas)):
            if high >= sigma >= low:
                return float(i) if high == low else i + (high - sigma) / (high - low)
        return 0.0 if sigma > sigmas[0] else float(len(sigmas) - 1)

    def step_of(self, index: int) -> int:
        """The 1-based sampler step evaluation ``index`` belongs to."""
        return min(int(self.position(index)) + 1, self.steps)

    def summary(self) -> str:
        """One line for the UI, e.g. ``AG: 20 steps, 28 model rows, 12 of 40 saved vs CFG;
        cond only at step 9/20; also acting: PPAP`` (techniques stacked under this one)."""
        steps = self.steps
        text = f"{self.technique}: {steps} steps"
        if len(self.evaluations) != steps:
            text += f" ({len(self.evaluations)} model evaluations)"
        text += f", {self.rows} model rows"
        if self.rows_saved > 0:
            text += f", {self.rows_saved} of {self.baseline_rows} saved vs CFG"
        elif self.rows_saved < 0:
            text += f", {-self.rows_saved} more than CFG's {self.baseline_rows}"
        if self.events:
            index, label = self.events[0]
            text += f"; {label} at step {self.step_of(index)}/{steps}"
            if len(self.events) > 1:
                text += f" (+{len(self.events) - 1} more decisions)"
        stacked = [name for name in dict.fromkeys(n for e in self.evaluations for n in e.acted)
                   if name != self.technique]
        if stacked:
            text += f"; also acting: {', '.join(stacked)}"
        return text
