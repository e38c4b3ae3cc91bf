"""What one sampling run did, step by step: the record every technique reports through.

A ``RunStats`` is created fresh for each sampling run.  Each model evaluation (one call of the
guider, so a multi-evaluation sampler such as Heun opens two per step) appends an
``Evaluation`` holding the noise level, the model rows actually evaluated, the rows plain CFG
would have cost, and any technique signals (e.g. a cosine similarity).  Events mark decisions
(e.g. "switch to conditional only") at the evaluation where they happened.
"""
from dataclasses import dataclass, field


@dataclass
class Evaluation:
    """One model evaluation of a sampling run."""

    sigma: float
    rows: int = 0
    baseline_rows: int | None = None
    signals: dict = field(default_factory=dict)

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
        """Attach technique signals (floats, lists of floats) to the open evaluation."""
        self.current.signals.update(values)

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

    def summary(self) -> str:
        text = f"{self.technique}: {len(self.evaluations)} evaluations, {self.rows} model rows"
        if self.rows_saved:
            text += f", {self.rows_saved} of {self.baseline_rows} saved vs CFG"
        if self.events:
            step, label = self.events[0]
            text += f"; {label} at evaluation {step + 1}/{len(self.evaluations)}"
        return text
