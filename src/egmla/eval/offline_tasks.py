"""The offline lm-eval tasks: templates in src/egmla/eval/tasks/ rendered with this machine's paths.

Each template `include:`s lm-eval's own task YAML (same prompt, choices, metrics) and only points it at the
local arrow files (`dataset_path: arrow`, `dataset_kwargs.data_files`). lm-eval resolves a relative `include:`
against the YAML's own folder, and `datasets` resolves relative `data_files` against the current directory, so
neither can be made portable in a committed file; the templates hold two placeholders instead:

    @LM_EVAL_TASKS@   the installed lm_eval/tasks folder (found by import)
    @DATA@            the offline data root (data/eval by default)

`render_tasks(data_root, out_dir)` writes the filled-in YAMLs (absolute paths) to `out_dir`, the folder to give
lm-eval as `include_path` (TaskManager(include_path=..., include_defaults=False)). `make eval-data` renders them
to data/eval/tasks/; rendering again (cheap) follows a moved checkout or a new lm-eval install.

MMLU is a group like lm-eval's `mmlu`: mmlu_offline -> 4 category groups -> 57 subject tasks, rendered from
one category and one subject template; subjects and categories come from lm-eval's own mmlu/default YAMLs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "tasks"
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_INCLUDE = re.compile(r'^include:\s*"([^"]+)"', re.MULTILINE)


class TaskTemplateError(RuntimeError):
    """A one-line failure naming its fix."""


def lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise TaskTemplateError("lm-eval is not installed: pip install 'lm-eval[hf]'") from None
    return Path(lm_eval.tasks.__file__).resolve().parent


def _quoted(path: Path) -> str:
    """A path as the inside of a YAML double-quoted string (JSON escapes are valid YAML escapes)."""
    return json.dumps(str(path))[1:-1]


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if leftover := _PLACEHOLDER.search(text):
        raise TaskTemplateError(f"template {template} has an unknown placeholder {leftover.group()}")
    included = _INCLUDE.search(text)
    if included and not Path(included.group(1)).is_file():
        raise TaskTemplateError(
            f"{template.name} includes {included.group(1)}, which this lm-eval install lacks: "
            "install the lm-eval version pyproject.toml names"
        )
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


def render_tasks(data_root: Path, out_dir: Path) -> list[Path]:
    """Render every offline task YAML for the data under `data_root` into `out_dir`; returns the files written.

    The data is not read here: a missing split fails later, when lm-eval loads that task."""
    lm_eval_tasks = lm_eval_tasks_dir()
    base = {"LM_EVAL_TASKS": _quoted(lm_eval_tasks), "DATA": _quoted(Path(data_root).resolve())}
    out_dir = Path(out_dir)
    stale = [*out_dir.glob("*.yaml"), *out_dir.glob("mmlu/*.yaml")]
    for path in stale:
        path.unlink()  # a task removed from the templates must not linger in lm-eval's index
    written = []
    for template in sorted(TEMPLATES.glob("*.yaml")):
        written.append(out_dir / template.name)
        _write(written[-1], render(template, base))
    mmlu = TEMPLATES / "mmlu"
    written.append(out_dir / "mmlu" / "mmlu_offline.yaml")
    _write(written[-1], render(mmlu / "mmlu_offline.yaml", base))
    for category in MMLU_CATEGORIES:
        written.append(out_dir / "mmlu" / f"mmlu_{category}_offline.yaml")
        _write(written[-1], render(mmlu / "_category_offline.yaml", base | {"CATEGORY": category}))
    for subject, category in mmlu_subjects(lm_eval_tasks).items():
        written.append(out_dir / "mmlu" / f"mmlu_{subject}_offline.yaml")
        values = base | {"SUBJECT": subject, "CATEGORY": category}
        _write(written[-1], render(mmlu / "_subject_offline.yaml", values))
    return written
