"""The headline of an evaluation: the model on each real test set beside the input and the
classical baselines, and its margin over the strongest of them.

One table, built once from the suites' rows, shown by ``allinone run`` / ``tune`` / ``submit`` at
their end, by ``allinone eval`` and first on the report's page, so that every place reads the
same numbers the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from allinone.evaluate.suites import MODEL, Row

SUITE = "all-in-one"
SYNTHETIC = "synthetic"  # the name (or name prefix) of a task's own test split, not a real set
LABELS = {"tv": "TV", "nlm": "NLM", "dark_channel": "DCP"}  # short enough for 80 columns


@dataclass(frozen=True)
class Headline:
    """The model's row of one real test set, with what it is measured against."""

    task: str
    set: str
    images: int
    input_psnr: float
    psnr: float
    ssim: float
    baselines: dict[str, float] = field(default_factory=dict)  # classical method -> PSNR

    @property
    def rival(self) -> tuple[str, float]:
        """The strongest of the classical methods scored here and the input itself (a method
        that harms its input is no bar to clear)."""
        scores = {"input": self.input_psnr, **self.baselines}
        name = max(scores, key=scores.__getitem__)
        return LABELS.get(name, name), scores[name]

    @property
    def margin(self) -> float:
        return self.psnr - self.rival[1]


def is_real_set(row: Row) -> bool:
    return row.suite == SUITE and not row.set.startswith(SYNTHETIC)


def headline(rows: Iterable[Row]) -> list[Headline]:
    """The model's rows of the all-in-one suite on real test sets, in the order scored."""
    rows = [r for r in rows if is_real_set(r)]
    classical = {
        (r.task, r.set, r.method): r.psnr for r in rows if r.method not in (MODEL, "input")
    }
    return [
        Headline(
            r.task,
            r.set,
            r.images,
            r.input_psnr,
            r.psnr,
            r.ssim,
            {m: p for (t, s, m), p in classical.items() if (t, s) == (r.task, r.set)},
        )
        for r in rows
        if r.method == MODEL
    ]


def headline_table(lines: list[Headline]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings (PSNR in dB): set, images, input, model, each baseline scored
    anywhere in the table, and the margin over the strongest of them and the input."""
    methods = list(dict.fromkeys(m for line in lines for m in line.baselines))
    header = ["set", "images", "input", "model", *(LABELS.get(m, m) for m in methods), "margin"]
    body = [
        [
            line.set,
            str(line.images),
            f"{line.input_psnr:.2f}",
            f"{line.psnr:.2f}",
            *(f"{line.baselines[m]:.2f}" if m in line.baselines else "-" for m in methods),
            f"{line.margin:+.2f} vs {line.rival[0]}",
        ]
        for line in lines
    ]
    return header, body
