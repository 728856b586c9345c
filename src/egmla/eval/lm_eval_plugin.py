"""Make `lm_eval --model egmla ...` work with lm-eval's own command, which has no plugin mechanism.

lm-eval 0.4.x finds models in its registry only: `lm_eval.models` fills it with lazy "module:Class" names when
it is first imported (and `get_model()` imports it on first use). Third-party models must be registered by
code that runs in the same process before the lookup. Three ways are offered here:

1. An import hook, installed at interpreter start-up by a one-line `.pth` file in site-packages
   (`egmla_lm_eval.pth`, put there by `make setup`, or `python -m egmla.eval.lm_eval_plugin install`). The
   hook waits for `lm_eval.models` to be imported, then adds the lazy name "egmla" -> "egmla.eval.lm:EgmlaLM"
   beside lm-eval's own. Nothing heavy runs at start-up: the .pth line imports only `importlib.machinery` and
   loads this file by path (not through the `egmla` package, which imports torch and hydra); this file imports
   only `sys`; the hook costs two string comparisons per import (once both triggers have fired it stays in
   sys.meta_path, inert: removing a finder while Python iterates that list could skip the next one). Measured:
   ~1 ms added to a 10 ms `python -c pass`. Our model module (and torch) is imported only when lm-eval is asked
   for "egmla".
2. `egmla-lm-eval ARGS...` (`main()` below): registers, then runs lm-eval's CLI with the same arguments. Works
   without the `.pth` file (e.g. when site-packages is read-only).
3. In Python, `import egmla.eval.lm` registers the class itself (the `@register_model("egmla")` decorator).

The hook (and `egmla-lm-eval`) also lets lm-eval read `make eval-data`'s offline tasks: those YAMLs are portable
(placeholders for lm-eval's folder and their own; see offline_tasks.py), which lm-eval cannot load as they are.
Once `lm_eval.tasks` is imported, `TaskManager` gives lm-eval a rendered copy of each `include_path` folder that
holds such YAMLs (what egmla-eval does), so `lm_eval --tasks piqa_offline --include_path data/eval/tasks` works;
other folders pass through unchanged.

Keep this module free of imports from egmla or lm_eval at module level: the `.pth` line executes it in every
Python process of the environment.
"""

import sys

MODEL_NAME = "egmla"
MODEL_TARGET = "egmla.eval.lm:EgmlaLM"  # a lazy placeholder: lm-eval imports it on first lookup
TRIGGER = "lm_eval.models"  # the module whose import fills lm-eval's model registry
TASKS_TRIGGER = "lm_eval.tasks"  # the package that defines (or re-exports) lm-eval's TaskManager
PTH_NAME = "egmla_lm_eval.pth"
# The .pth file's one line (also committed beside this file): find the egmla package without importing it, load
# this file by path, call install(). Each step is guarded, so a removed egmla leaves Python start-up untouched.
PTH_LINE = (
    'import os, sys, importlib.machinery as m; s = m.PathFinder.find_spec("egmla"); '
    "f = s and s.submodule_search_locations and "
    'os.path.join(list(s.submodule_search_locations)[0], "eval", "lm_eval_plugin.py"); '
    'l = f and os.path.isfile(f) and m.SourceFileLoader("_egmla_lm_eval_plugin", f); '
    "p = l and type(sys)(l.name); p and (l.exec_module(p), p.install())\n"
)


def register() -> None:
    """Register "egmla" in lm-eval's model registry (idempotent), next to lm-eval's own models.

    lm-eval's `get_model()` imports `lm_eval.models` only while the registry is empty; importing it here first
    keeps its models ("hf", ...) available once ours makes the registry non-empty.
    """
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def render_include_paths() -> None:
    """Make lm-eval's `TaskManager(include_path=...)` load portable task YAMLs (idempotent): each include_path
    folder holding them becomes a rendered copy (offline_tasks.loadable_tasks); anything else is passed on."""
    from lm_eval.tasks import TaskManager

    original = TaskManager.__init__
    if getattr(original, "egmla_renders", False):
        return

    def __init__(self, *args, **kwargs):
        if len(args) >= 2:  # (verbosity, include_path, ...)
            args = (args[0], _loadable(args[1]), *args[2:])
        elif kwargs.get("include_path"):
            kwargs["include_path"] = _loadable(kwargs["include_path"])
        original(self, *args, **kwargs)

    __init__.egmla_renders = True
    __init__.__wrapped__ = original
    __init__.__doc__ = original.__doc__
    TaskManager.__init__ = __init__


def _loadable(include_path):
    """`include_path` (a folder or a list of them) with each folder of portable YAMLs replaced by its rendering."""
    import os

    from egmla.eval.offline_tasks import loadable_tasks  # imported here: the egmla package imports torch

    many = isinstance(include_path, list | tuple)
    folders = list(include_path) if many else [include_path]
    try:
        folders = [str(loadable_tasks(f)) if f and os.path.isdir(f) else f for f in folders]
    except Exception as exc:  # lm-eval then reports the tasks it could not find, as without us
        print(f"egmla: could not render the task YAMLs in {include_path}: {exc!r}", file=sys.stderr)
        return include_path
    return folders if many else folders[0]


# What to run once each trigger module has been imported (its module is fully executed by then).
AFTER_IMPORT = {TRIGGER: register, TASKS_TRIGGER: render_include_paths}


class _AfterImport:
    """A meta path finder that finds nothing itself: it wraps the loader of each AFTER_IMPORT module so that its
    callback runs right after that module executes; after that one time per module it answers None to it."""

    egmla_lm_eval_hook = True  # recognised across copies of this module (the .pth one and the package one)

    def __init__(self):
        self.fired = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in AFTER_IMPORT or fullname in self.fired:
            return None
        import importlib.util  # here, not at start-up: it costs ~3 ms (contextlib, functools, ...)

        self.fired.add(fullname)  # once only; also stops the lookup below from coming back here
        spec = importlib.util.find_spec(fullname)  # the real spec, from the other finders
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenCall(spec.loader, AFTER_IMPORT[fullname])
        return spec


class _ThenCall:
    """Loader wrapper: run the real loader, then the callback. The module keeps its real loader in __spec__."""

    def __init__(self, loader, callback):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.callback()
        except Exception as exc:  # never break lm-eval's own import over our additions
            print(f"egmla: could not extend lm-eval ({self.callback.__name__}): {exc!r}", file=sys.stderr)


def install() -> None:
    """Arrange for "egmla" to be registered once lm-eval fills its registry, and for its TaskManager to render
    portable task folders (what the .pth line calls)."""
    for name, callback in AFTER_IMPORT.items():
        if name in sys.modules:
            callback()
    waiting = any(name not in sys.modules for name in AFTER_IMPORT)
    if waiting and not any(getattr(f, "egmla_lm_eval_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def main() -> None:
    """`egmla-lm-eval ARGS...`: lm-eval's command line (`lm_eval ARGS...`) with the "egmla" model registered
    and portable task folders rendered.

    Our configuration errors (a bad checkpoint=, model_args) end in one line and exit status 2.
    """
    register()
    render_include_paths()
    from lm_eval.__main__ import cli_evaluate

    from egmla.model import ConfigError

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except ConfigError as exc:
        print(f"egmla-lm-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def _cli(argv: list[str]) -> int:
    """`python -m egmla.eval.lm_eval_plugin install|uninstall|status` for this interpreter's site-packages."""
    from pathlib import Path

    target = Path(_site_packages()) / PTH_NAME
    command = argv[0] if argv else "status"
    if command == "install":
        target.write_text(PTH_LINE)
        print(f"installed {target}: `lm_eval --model egmla ...` now works in this environment")
    elif command == "uninstall":
        target.unlink(missing_ok=True)
        print(f"removed {target}")
    elif command == "status":
        state = "installed" if target.is_file() and target.read_text() == PTH_LINE else "not installed"
        print(f"{target}: {state}")
    else:
        print("usage: python -m egmla.eval.lm_eval_plugin install|uninstall|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
