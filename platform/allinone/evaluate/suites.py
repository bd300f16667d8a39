"""Evaluation suites: all-in-one, zero-shot and few-shot, as one table of rows logged to MLflow.

* all-in-one: every trained task on its test sets: the standard benchmarks found under a data
  folder (CBSD68 at sigma 15/25/50, Rain100L, SOTS-outdoor, GoPro, LOL), else the task's
  synthetic test split.
* zero-shot: the unseen tasks (never trained on), on full images.
* few-shot: for each unseen task and each k, a copy of the model fine-tuned for N steps on k
  pairs, scored on other pairs of the task, beside the untouched model (zero-shot) and beside the
  same architecture trained the same steps on the same pairs from random weights (scratch): the
  gap to scratch is what multitask pre-training is worth.

The same functions serve ``allinone eval`` and the end of a curriculum (``eval:`` in the pipeline).
Classical baselines, optional, are scored by the same code on the same images as extra rows.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allinone.config import FewShotSection, TaskConfig, load_task
from allinone.data.stream import augment
from allinone.evaluate.baselines import BASELINES, baselines_for
from allinone.evaluate.grids import log_grid
from allinone.evaluate.scoring import Pair, Restorer, Sample, model_restorer, score_pairs
from allinone.evaluate.testsets import (
    Discovery,
    EvalSet,
    benchmark_sets,
    discover,
    standard_sets,
    synthetic_sets,
)

SUITES = ("all-in-one", "zero-shot", "few-shot")
SUITE_CHOICES = (*SUITES, "all")
MODEL = "model"  # the method name of the evaluated network's own rows


class EvalError(ValueError):
    """A request that cannot be evaluated (unknown task, too few pairs); one line for users."""


def default_tasks_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "tasks"


@dataclass(frozen=True)
class TaskEntry:
    config: TaskConfig
    path: Path  # the task YAML: relative paths inside it are relative to its folder


def load_catalog(tasks_dir: Path) -> dict[str, TaskEntry]:
    """Every task config in a folder, by name."""
    if not Path(tasks_dir).is_dir():
        raise EvalError(f"{tasks_dir}: tasks folder does not exist")
    catalog = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        config = load_task(path)
        catalog[config.name] = TaskEntry(config, path.resolve())
    return catalog


@dataclass
class EvalPlan:
    """What to evaluate and how; built by the CLI or from a pipeline's ``eval:`` block."""

    model: nn.Module
    trained: tuple[str, ...]  # tasks the model was trained on
    catalog: dict[str, TaskEntry]
    fresh: Callable[[], nn.Module] | None = None  # same architecture, random weights (scratch)
    data: Path | None = None  # standard test sets, found by their layouts
    seed: int = 0  # of synthetic degradations: the pipeline's, so splits equal its test shards
    max_images: int | None = None  # per test set
    tile: int | None = None
    baselines: bool = False
    few_shot: FewShotSection = field(default_factory=FewShotSection)
    unseen_tasks: tuple[str, ...] | None = None  # default: the catalog's tasks marked unseen
    shards: Callable[[str], Path | None] = lambda task: None  # built test split of a task
    say: Callable[[str], None] = lambda line: None

    def __post_init__(self) -> None:
        self.discovery = discover(self.data, standard_sets(self.configs())) if self.data else None

    def configs(self) -> dict[str, TaskConfig]:
        return {name: entry.config for name, entry in self.catalog.items()}

    def unseen(self) -> list[str]:
        if self.unseen_tasks is not None:
            return [n for n in self.unseen_tasks if n not in self.trained]
        return [n for n, e in self.catalog.items() if e.config.unseen and n not in self.trained]


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    suite: str
    task: str
    set: str
    method: str  # "model", a baseline's name, or zero-shot / few-shot / scratch
    images: int
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float
    input_psnr: float
    seconds: float = math.nan  # per image (rows logged before it was measured have none)
    k: int | None = None  # few-shot: pairs fine-tuned on
    steps: int | None = None


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, tuple[Sample, str]] = field(default_factory=dict)  # task -> grid, title
    notes: list[str] = field(default_factory=list)

    def add(self, other: Results) -> None:
        self.rows += other.rows
        self.notes += other.notes
        for task, sample in other.samples.items():
            self.samples.setdefault(task, sample)

    def averages(self) -> dict[str, float]:
        """Mean PSNR of the model's own rows per suite (few-shot: per k), over every set."""
        groups: dict[str, list[float]] = {}
        for row in self.rows:
            if row.method == MODEL:
                groups.setdefault(row.suite, []).append(row.psnr)
            elif row.method == "few-shot":
                groups.setdefault(f"few-shot-k{row.k}", []).append(row.psnr)
        return {name: float(np.mean(values)) for name, values in groups.items()}


# --------------------------------------------------------------------------- which tasks
def resolve_tasks(plan: EvalPlan, suite: str, requested: Sequence[str] | None) -> list[str]:
    """The tasks a suite evaluates: the trained ones (all-in-one) or the unseen ones, or the
    requested ones that belong to the suite; an unknown or misplaced task is an error."""
    for name in requested or ():
        if name not in plan.catalog and name not in plan.trained:
            raise EvalError(f"unknown task {name!r} (known: {', '.join(sorted(plan.catalog))})")
    if suite == "all-in-one":
        pool = list(plan.trained)
        wrong = "was not trained on by this model (trained: {})".format(", ".join(plan.trained))
    else:
        pool = plan.unseen() if requested is None else [t for t in plan.catalog]
        pool = [t for t in pool if t not in plan.trained]
        wrong = "is a trained task of this model; zero-/few-shot take unseen tasks"
    if requested is None:
        return pool
    for name in requested:
        if name not in pool:
            raise EvalError(f"task {name!r} {wrong}")
    return list(requested)


def split_tasks(plan: EvalPlan, requested: Sequence[str] | None) -> dict[str, list[str] | None]:
    """For suite ``all``: requested trained tasks go to all-in-one, the others to the shots."""
    if requested is None:
        return {suite: None for suite in SUITES}
    trained = [t for t in requested if t in plan.trained]
    other = [t for t in requested if t not in plan.trained]
    return {"all-in-one": trained, "zero-shot": other, "few-shot": other}


def sets_for(plan: EvalPlan, task: str) -> list[EvalSet]:
    """A task's real benchmarks under ``plan.data`` when found there, else its synthetic split."""
    entry = plan.catalog.get(task)
    if entry is None:
        raise EvalError(f"no task config for {task!r} (known: {', '.join(sorted(plan.catalog))})")
    found = plan.discovery.for_task(task) if plan.discovery else []
    if found:
        return [s for f in found for s in benchmark_sets(f, task, entry.config, plan.seed)]
    return synthetic_sets(task, entry.config, entry.path, plan.seed, plan.shards(task))


# --------------------------------------------------------------------------- suites
def all_in_one(plan: EvalPlan, tasks: Sequence[str] | None = None) -> Results:
    return _score_suite(plan, "all-in-one", resolve_tasks(plan, "all-in-one", tasks))


def zero_shot(plan: EvalPlan, tasks: Sequence[str] | None = None) -> Results:
    return _score_suite(plan, "zero-shot", resolve_tasks(plan, "zero-shot", tasks))


def _score_suite(plan: EvalPlan, suite: str, tasks: list[str]) -> Results:
    results = Results()
    if not tasks:
        results.notes.append(f"{suite}: no tasks to evaluate")
        return results
    for task in tasks:
        restore = model_restorer(plan.model, plan.tile, task)
        for test_set in sets_for(plan, task):
            plan.say(f"{suite}: {task} on {test_set.name}")
            pairs = list(test_set.pairs(plan.max_images))
            row, sample = _score(suite, test_set, MODEL, restore, pairs)
            results.rows.append(row)
            results.samples.setdefault(task, (sample, f"{task}: {test_set.name} ({suite})"))
            if plan.baselines:
                results.rows += _baseline_rows(suite, test_set, pairs)
    return results


def _score(
    suite: str, test_set: EvalSet, method: str, restore: Restorer, pairs: list[Pair], **extra
) -> tuple[Row, Sample]:
    origin = f"{test_set.task}/{test_set.name}"
    quality, sample = score_pairs(restore, pairs, test_set.crop_border, origin)
    return Row(suite, test_set.task, test_set.name, method, **vars(quality), **extra), sample


def _baseline_rows(suite: str, test_set: EvalSet, pairs: list[Pair]) -> list[Row]:
    return [
        _score(suite, test_set, name, BASELINES[name], pairs)[0]
        for name in baselines_for(test_set.task)
    ]


def few_shot(plan: EvalPlan, tasks: Sequence[str] | None = None) -> Results:
    """Per unseen task and k: zero-shot, fine-tuned and from-scratch rows on the same held-out
    pairs (the first test set's pairs after the first max(k))."""
    settings, results = plan.few_shot, Results()
    if plan.fresh is None:
        raise EvalError("few-shot needs the model's architecture to train one from scratch")
    for task in resolve_tasks(plan, "few-shot", tasks):
        test_set = sets_for(plan, task)[0]
        train, held_out = _split_pairs(plan, test_set, max(settings.k))
        zero, _ = _score(
            "few-shot",
            test_set,
            "zero-shot",
            model_restorer(plan.model, plan.tile, task),
            held_out,
            k=0,
            steps=0,
        )
        results.rows.append(zero)
        for k in settings.k:
            plan.say(f"few-shot: {task}, k={k}, {settings.steps} steps")
            for method, start in (("few-shot", plan.model), ("scratch", None)):
                tuned = fine_tune(start, plan.fresh, train[:k], settings, plan.seed)
                row, sample = _score(
                    "few-shot",
                    test_set,
                    method,
                    model_restorer(tuned, plan.tile, task),
                    held_out,
                    k=k,
                    steps=settings.steps,
                )
                results.rows.append(row)
                if method == "few-shot" and k == max(settings.k):
                    results.samples[task] = (sample, f"{task}: {test_set.name} (few-shot k={k})")
    return results


def _split_pairs(plan: EvalPlan, test_set: EvalSet, k: int) -> tuple[list[Pair], list[Pair]]:
    wanted = None if plan.max_images is None else k + plan.max_images
    pairs = list(test_set.pairs(wanted))
    if len(pairs) <= k:
        raise EvalError(
            f"few-shot on {test_set.task}/{test_set.name}: k={k} needs more than {k} pairs "
            f"(the set has {len(pairs)}): lower the largest k"
        )
    return pairs[:k], pairs[k:]


def fine_tune(
    start: nn.Module | None,
    fresh: Callable[[], nn.Module],
    pairs: list[Pair],
    settings: FewShotSection,
    seed: int,
) -> nn.Module:
    """A copy of ``start`` (or, given None, a freshly built model) trained on random crops of
    ``pairs`` with an L1 loss. Both arms see the same crops in the same order (same seed)."""
    with torch.random.fork_rng(devices=[]):  # seeded here without moving the caller's RNG
        torch.manual_seed(seed)
        model = copy.deepcopy(start) if start is not None else fresh()
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    rng = np.random.default_rng(seed)
    for _ in range(settings.steps):
        lq, gt = _crop_batch(pairs, settings.crop, settings.batch_size, rng)
        loss = F.l1_loss(model(lq.to(device)), gt.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def _crop_batch(pairs: list[Pair], crop: int, batch: int, rng: np.random.Generator):
    """``batch`` random crops drawn from the pairs, mirrored but never turned (the few shots may
    be rain), as (N, 3, c, c) tensors."""
    size = min(crop, *(min(gt.shape[:2]) for _, _, gt in pairs))
    lqs, gts = [], []
    for _ in range(batch):
        _, lq, gt = pairs[int(rng.integers(len(pairs)))]
        a, b = augment(lq, gt, size, rng, turns=False)
        lqs.append(a)
        gts.append(b)

    def stack(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))

    return stack(lqs), stack(gts)


RUNNERS = {"all-in-one": all_in_one, "zero-shot": zero_shot, "few-shot": few_shot}


def run_suites(
    plan: EvalPlan, suites: Sequence[str], tasks: Sequence[str] | None = None
) -> Results:
    """Run suites in order (``all`` = every suite); with ``tasks``, only those tasks."""
    wanted = [s for s in SUITES if s in suites or "all" in suites]
    unknown = sorted(set(suites) - set(SUITE_CHOICES))
    if unknown:
        raise EvalError(f"unknown suite {unknown[0]!r} (known: {', '.join(SUITE_CHOICES)})")
    per_suite = split_tasks(plan, tasks) if "all" in suites else dict.fromkeys(SUITES, tasks)
    results = Results()
    if plan.discovery is not None:
        results.notes.append(_discovery_note(plan.discovery))
    for suite in wanted:
        chosen = per_suite[suite]
        if chosen is not None and not chosen and "all" in suites:
            continue  # suite "all" with --tasks: nothing of this kind was asked for
        results.add(RUNNERS[suite](plan, chosen))
    return results


def _discovery_note(discovery: Discovery) -> str:
    found = ", ".join(f"{f.standard.name} ({f.layout})" for f in discovery.found)
    note = f"test sets found: {found}; protocol: {discovery.protocol()}"
    if discovery.ignored:
        note += f"; not test sets, ignored: {', '.join(discovery.ignored)}"
    return note


# --------------------------------------------------------------------------- reporting
COLUMNS = ("psnr", "ssim", "psnr_y", "ssim_y")


def to_markdown(results: Results) -> str:
    """The long table: one row per suite, task, set and method."""
    lines = [
        "| suite | task | set | method | k | images | PSNR | SSIM | PSNR-Y | SSIM-Y | input PSNR "
        "| s / image |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.rows:
        k = "" if r.k is None else str(r.k)
        values = " | ".join(
            f"{getattr(r, c):.4f}" if "ssim" in c else f"{getattr(r, c):.2f}"
            for c in (*COLUMNS, "input_psnr")
        )
        lines.append(
            f"| {r.suite} | {r.task} | {r.set} | {r.method} | {k} | {r.images} | {values} "
            f"| {r.seconds:.3f} |"
        )
    return "\n".join(lines) + "\n"


def few_shot_table(results: Results) -> list[tuple[str, str, int, int, float, float, float]]:
    """(task, set, k, steps, zero-shot, few-shot, scratch PSNR) per task and k."""
    zero = {(r.task, r.set): r.psnr for r in results.rows if r.method == "zero-shot"}
    tuned = {(r.task, r.set, r.k): r for r in results.rows if r.method == "few-shot"}
    scratch = {(r.task, r.set, r.k): r.psnr for r in results.rows if r.method == "scratch"}
    return [
        (
            task,
            name,
            k,
            row.steps or 0,
            zero.get((task, name), math.nan),
            row.psnr,
            scratch.get((task, name, k), math.nan),
        )
        for (task, name, k), row in tuned.items()
    ]


def metric_name(row: Row, column: str) -> str:
    method = row.method if row.k in (None, 0) else f"{row.method}-k{row.k}"
    return f"eval/{row.suite}/{row.task}/{row.set}/{method}/{column}"


def log_results(results: Results, grids: bool = True, run_id: str | None = None) -> None:
    """Metrics, the table (markdown and JSON) and one grid per task, to an MLflow run."""
    import mlflow

    metrics = {metric_name(r, c): getattr(r, c) for r in results.rows for c in COLUMNS}
    metrics |= {metric_name(r, "seconds"): r.seconds for r in results.rows if r.seconds >= 0}
    metrics |= {f"eval/{name}/average_psnr": v for name, v in results.averages().items()}
    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "results.md").write_text(to_markdown(results))
        (Path(folder) / "results.json").write_text(
            json.dumps(
                {"rows": [asdict(r) for r in results.rows], "notes": results.notes}, indent=2
            )
        )
        client.log_artifacts(run_id, folder, "eval")
    if grids:
        for task, (sample, title) in results.samples.items():
            log_grid(sample, task, title, run_id=run_id)


# --------------------------------------------------------------------------- in a curriculum
