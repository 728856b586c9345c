"""experiments/decode/kernel_costs.py: every source edit of its sweeps applies to the kernel it edits and leaves
valid Python (timing the edited kernels needs a GPU; this needs neither a GPU nor triton)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = "fc328f7"  # the kernel the README's candidate and ablation sweeps edited
RESTRUCTURED = "b7945e9"  # the one the costs sweep edits


def load_tool():
    spec = importlib.util.spec_from_file_location("kernel_costs", ROOT / "experiments/decode/kernel_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_edit_applies_to_the_kernel_it_names():
    tool = load_tool()
    try:
        base = tool.kernel_source(BASE)
        tool.kernel_source(RESTRUCTURED)
    except subprocess.CalledProcessError:
        pytest.skip(f"commit {BASE} or {RESTRUCTURED} is not in this clone (shallow)")
    for sweep in ("ablations", "candidates", "combinations", "restructured"):
        for label, (edits, _) in tool.SWEEPS[sweep].items():
            text = base
            for edit in edits:
                text = edit(text)
            assert text != base, (sweep, label)
            compile(text, f"{sweep}: {label}", "exec")
    restructured = tool.kernel_source(RESTRUCTURED)
    for label, (edits, _) in tool.SWEEPS["costs"].items():
        text = restructured
        for edit in edits:
            text = edit(text)
        assert text != restructured, label
        compile(text, f"costs: {label}", "exec")
    current = tool.kernel_source(None)
    assert "LAUNCHED = _egmla_decode_split" in current  # registers and spills are read from the launch
    for label, (edits, _) in tool.SWEEPS["next"].items():  # these name lines of the working tree's kernel
        text = current
        for edit in edits:
            text = edit(text)
        assert text != current, label
        compile(text, f"next: {label}", "exec")


def test_an_edit_that_finds_no_line_says_which():
    tool = load_tool()
    with pytest.raises(LookupError, match="no line 'x = _dot"):
        tool.replace("x = _dot(c, wuk_t)", "x = c")("unrelated kernel text")
