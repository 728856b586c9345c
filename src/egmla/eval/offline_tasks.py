"""The offline lm-eval tasks: portable task YAMLs, made concrete with this machine's paths when they are loaded.

Each template in src/egmla/eval/tasks/ `include:`s lm-eval's own task YAML (same prompt, choices, metrics) and
only points it at the local arrow files (`dataset_path: arrow`, `dataset_kwargs.data_files`). Neither path can be
written portably for lm-eval itself: it resolves a relative `include:` against the YAML's own folder (the
installed lm-eval lives elsewhere on every machine and in every environment) and `datasets` resolves relative
`data_files` against the current directory. So the task YAMLs keep two placeholders:

    @LM_EVAL_TASKS@   the installed lm_eval/tasks folder (found by import)
    @HERE@            the YAML's own folder: data paths are written relative to it ("@HERE@/../piqa/...")

`write_tasks(data_root, out_dir)` (`make eval-data`) writes them into `out_dir` (data/eval/tasks), with the
data paths relative, so the data folder can be moved or copied to another machine as it is.
`loadable_tasks(include_path)` (egmla-eval; `lm_eval --include_path` through lm_eval_plugin.py) renders a folder
holding such YAMLs into a temporary folder (removed at exit) with this process's lm-eval and the folder's current
location; that copy is what lm-eval's TaskManager indexes. A folder without placeholders (your own tasks) is used
as it is.

MMLU is a group like lm-eval's `mmlu`: mmlu_offline -> 4 category groups -> 57 subject tasks, written from
one category and one subject template; subjects and categories come from lm-eval's own mmlu/default YAMLs.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "tasks"
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")
LM_EVAL_TASKS = "@LM_EVAL_TASKS@"
HERE = "@HERE@"
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_HERE_PATH = re.compile(r'"@HERE@((?:/[^"\n]*)?)"')
_INCLUDE = re.compile(r'^include:\s*"([^"]+)"', re.MULTILINE)


class TaskTemplateError(RuntimeError):
    """A one-line failure naming its fix."""


def lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise TaskTemplateError("lm-eval is not installed: pip install 'lm-eval[hf]'") from None
    return Path(lm_eval.tasks.__file__).resolve().parent


def _quoted(path: Path | str) -> str:
    """A path as the inside of a YAML double-quoted string (JSON escapes are valid YAML escapes)."""
    return json.dumps(str(path))[1:-1]


# ---------------------------------------------------------------------------------------------------------------
# Writing the portable task YAMLs (make eval-data)


def fill(template: Path, values: dict[str, str]) -> str:
    """The template's text with `values` filled in; the portable placeholders stay."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if leftover := {p for p in _PLACEHOLDER.findall(text)} - {LM_EVAL_TASKS, HERE}:
        raise TaskTemplateError(f"template {template} has an unknown placeholder {sorted(leftover)[0]}")
    return text


def mmlu_subjects(lm_eval_tasks: Path) -> dict[str, str]:
    """subject -> category, from lm-eval's mmlu/default/mmlu_<subject>.yaml (`tag: mmlu_<category>_tasks`)."""
    subjects = {}
    for path in sorted((lm_eval_tasks / "mmlu" / "default").glob("mmlu_*.yaml")):
        tag = re.search(r'^"?tag"?:\s*"?mmlu_(\w+?)_tasks"?\s*$', path.read_text(), re.MULTILINE)
        if tag is None or tag.group(1) not in MMLU_CATEGORIES:
            raise TaskTemplateError(f"cannot read the MMLU category of {path}: unexpected lm-eval version")
        subjects[path.stem.removeprefix("mmlu_")] = tag.group(1)
    return subjects


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_tasks(data_root: Path, out_dir: Path) -> list[Path]:
    """Write every offline task YAML for the data under `data_root` into `out_dir`; returns the files written.

    Data paths are written relative to each YAML's folder (@HERE@/..), lm-eval's folder as @LM_EVAL_TASKS@:
    nothing in them names this machine. The data is not read here: a missing split fails when lm-eval loads
    that task, naming the file."""
    lm_eval_tasks = lm_eval_tasks_dir()
    out_dir = Path(out_dir)
    stale = [*out_dir.glob("*.yaml"), *out_dir.glob("mmlu/*.yaml")]
    for path in stale:
        path.unlink()  # a task removed from the templates must not linger in lm-eval's index

    def write(target: Path, template: Path, values: dict[str, str] | None = None) -> None:
        data = Path(os.path.relpath(Path(data_root).resolve(), out_dir.resolve() / target.parent))
        base = {"DATA": f"{HERE}/{_quoted(data.as_posix())}", "LM_EVAL_TASKS": LM_EVAL_TASKS}
        _write(out_dir / target, fill(template, base | (values or {})))
        written.append(out_dir / target)

    written: list[Path] = []
    for template in sorted(TEMPLATES.glob("*.yaml")):
        write(Path(template.name), template)
    mmlu = TEMPLATES / "mmlu"
    write(Path("mmlu/mmlu_offline.yaml"), mmlu / "mmlu_offline.yaml")
    for category in MMLU_CATEGORIES:
        write(Path(f"mmlu/mmlu_{category}_offline.yaml"), mmlu / "_category_offline.yaml", {"CATEGORY": category})
    for subject, category in mmlu_subjects(lm_eval_tasks).items():
        values = {"SUBJECT": subject, "CATEGORY": category}
        write(Path(f"mmlu/mmlu_{subject}_offline.yaml"), mmlu / "_subject_offline.yaml", values)
    return written


# ---------------------------------------------------------------------------------------------------------------
# Loading: the placeholders filled in for this process


def render(text: str, here: Path, lm_eval_tasks: Path) -> str:
    """A portable YAML's text with this machine's paths: @HERE@/rel -> the normalised absolute path."""
    text = _HERE_PATH.sub(lambda m: '"' + _quoted(os.path.normpath(str(here) + m.group(1))) + '"', text)
    return text.replace(HERE, _quoted(here)).replace(LM_EVAL_TASKS, _quoted(lm_eval_tasks))


def is_portable(folder: Path) -> bool:
    """Whether any task YAML below `folder` holds our placeholders (then it must be rendered to be loaded)."""
    return any(LM_EVAL_TASKS in text or HERE in text for text in map(Path.read_text, Path(folder).rglob("*.yaml")))


def loadable_tasks(include_path: str | Path) -> Path:
    """The folder to give lm-eval for `include_path`: itself, or, if it holds portable YAMLs, a rendered copy.

    The copy lives in a temporary folder removed when the process exits (lm-eval reads the YAMLs again when it
    builds a task, so it must outlive the TaskManager); other files (e.g. a task's utils.py) are copied as
    they are, so relative `include:`s and `!function`s between them keep working."""
    source = Path(include_path).resolve()
    if not is_portable(source):
        return source
    lm_eval_tasks = lm_eval_tasks_dir()
    target = Path(tempfile.mkdtemp(prefix="egmla-tasks-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        copy = target / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".yaml":
            copy.write_text(render(path.read_text(), path.parent, lm_eval_tasks))
        else:
            shutil.copyfile(path, copy)
    return target


DECLARATION = re.compile(r"^(task|group):\s*[\"']?([^\s\"']+)[\"']?\s*$", re.MULTILINE)


def declarations(folder: Path) -> list[tuple[str, str, Path]]:
    """(task or group, name, YAML) of every top-level `task:` or `group:` line in the YAMLs below `folder`, in
    path order, read as text: cheap, and works for YAMLs that may not load, before lm-eval indexes them."""
    return [
        (kind, name, path)
        for path in sorted(Path(folder).rglob("*.yaml"))
        for kind, name in DECLARATION.findall(path.read_text(errors="replace"))
    ]


def declaring_yamls(folder: Path, name: str) -> list[Path]:
    """The YAMLs below `folder` whose top-level `task:` or `group:` is `name`."""
    return sorted({path for _, declared, path in declarations(folder) if declared == name})


def load_error(path: Path) -> str | None:
    """Why lm-eval cannot read the task YAML at `path` (its includes resolved): 'Type: first line', or None."""
    from ..model.config import error_summary

    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader (its index skips what fails)

        load_yaml(path, resolve_func=False, recursive=True)
    except ImportError:
        included = _INCLUDE.search(path.read_text())
        if included and not (path.parent / included.group(1)).is_file():
            return f"FileNotFoundError: {path.parent / included.group(1)}"
        return None
    except Exception as exc:
        return error_summary(exc, limit=400)
    return None
