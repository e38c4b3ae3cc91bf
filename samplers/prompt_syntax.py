"""The composable prompt syntax: ``a red circle AND a blue square :0.8 AND NOT green``.

Composable Diffusion (arXiv 2206.01714) composes concepts with signed weights; this is the syntax
people know from A1111 (``AND`` with a ``:weight`` suffix) plus ``NOT`` for a negated concept:

* Concepts are separated by the word ``AND`` in capitals, standing alone (whitespace or the ends of
  the text on both sides).  ``and`` in lower case and words that merely contain it (``BRAND``,
  ``SANDWICH``) are ordinary text.
* A concept may start with ``NOT`` (capitals, alone): its weight is negated.  ``NOT`` anywhere
  else is an error (most likely a forgotten ``AND``).
* A concept may end with ``:<number>``, its weight (``default_weight`` when absent).  The colon
  must be the first one outside brackets: colons inside ``( )`` or ``[ ]`` belong to the text
  encoder's emphasis syntax (``(red:1.2)``) and are left alone.
* Escapes: ``\\AND`` and ``\\NOT`` are the literal words, ``\\:`` a literal colon.  Other
  backslashes pass through untouched (so the encoder's own ``\\(`` ``\\)`` keep working).

Errors are ``PromptSyntaxError`` (a ``ValueError``) naming the 0-based character position.
"""
import math
import re
from dataclasses import dataclass

AND, NOT = "AND", "NOT"
_WORD = re.compile(r"\S+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_ESCAPE = re.compile(r"\\(AND|NOT|:)")
_OPENING, _CLOSING = "([", ")]"


@dataclass(frozen=True)
class PromptConcept:
    """One concept of a composable prompt: its text (escapes resolved), signed weight, and the
    position of its text in the source."""

    text: str
    weight: float
    position: int


class PromptSyntaxError(ValueError):
    def __init__(self, message: str, position: int):
        super().__init__(f"{message} at position {position}")
        self.position = position


def parse_composable_prompt(source: str, default_weight: float = 1.0) -> list[PromptConcept]:
    """The concepts of ``source`` in order; raises ``PromptSyntaxError`` on bad syntax."""
    if not math.isfinite(default_weight):
        raise ValueError(f"default weight must be a finite number, got {default_weight}")
    if not source.strip():
        raise PromptSyntaxError("no concepts: the prompt is empty", 0)
    spans, start = [], 0
    for word in _WORD.finditer(source):
        if word.group() == AND:
            spans.append((start, word.start(), word.start()))
            start = word.end()
    spans.append((start, len(source), None))
    concepts = []
    for index, (begin, end, separator) in enumerate(spans):
        if not source[begin:end].strip():
            at = separator if separator is not None else spans[index - 1][2]
            side = "before" if separator is not None else "after"
            raise PromptSyntaxError(f"empty concept {side} '{AND}'", at)
        concepts.append(_parse_concept(source, begin, end, default_weight))
    return concepts


def _parse_concept(source: str, begin: int, end: int, default_weight: float) -> PromptConcept:
    words = list(_WORD.finditer(source, begin, end))
    negated = words[0].group() == NOT
    if negated:
        if len(words) == 1:
            raise PromptSyntaxError(f"'{NOT}' without a concept", words[0].start())
        begin = words[0].end()
        words = words[1:]
    stray_not = next((w for w in words if w.group() == NOT), None)
    if stray_not is not None:
        raise PromptSyntaxError(f"'{NOT}' must start a concept (missing '{AND}'? write \\{NOT} for the word)",
                                stray_not.start())
    colon = _weight_colon(source, begin, end)
    weight = default_weight
    if colon is not None:
        suffix = source[colon + 1:end].strip()
        if not _NUMBER.fullmatch(suffix):
            raise PromptSyntaxError(f"expected a number after ':' (got {suffix!r}; write \\: for a literal colon)",
                                    colon)
        weight = float(suffix)
        if not math.isfinite(weight):
            raise PromptSyntaxError(f"weight {suffix} is not finite", colon)
        if negated and weight < 0:
            raise PromptSyntaxError(f"'{NOT}' with a negative weight (use one or the other)", colon)
        end = colon
    raw = source[begin:end]
    text = _ESCAPE.sub(r"\1", raw).strip()
    if not text:
        raise PromptSyntaxError("a weight without concept text", colon)
    position = begin + len(raw) - len(raw.lstrip())
    return PromptConcept(text, -weight if negated else weight, position)


def _weight_colon(source: str, begin: int, end: int) -> int | None:
    """Position of the first unescaped ':' outside brackets in source[begin:end], or None."""
    depth, index = 0, begin
    while index < end:
        char = source[index]
        if char == "\\":
            index += 2
            continue
        if char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth = max(depth - 1, 0)
        elif char == ":" and depth == 0:
            return index
        index += 1
    return None
