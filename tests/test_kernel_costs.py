"""experiments/decode/kernel_costs.py: every source edit of its sweeps applies to the kernel it edits and leaves
valid Python (timing the edited kernels needs a GPU; this needs neither a GPU nor triton)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import load_script

BASE = "fc328f7"  # the kernel the README's candidate and ablation sweeps edited
RESTRUCTURED = "b7945e9"  # the one the costs sweep edits


def check_edits(tool, sweeps: list[str], source: str) -> None:
    """Every entry of these sweeps changes `source` and leaves valid Python."""
    for sweep in sweeps:
        for label, (edits, _) in tool.SWEEPS[sweep].items():
            text = source
            for edit in edits:
                text = edit(text)
            assert text != source, (sweep, label)
            compile(text, f"{sweep}: {label}", "exec")


def test_every_edit_applies_to_the_kernel_it_names():
    tool = load_script("experiments/decode/kernel_costs.py")
    try:
        base, restructured = tool.kernel_source(BASE), tool.kernel_source(RESTRUCTURED)
    except subprocess.CalledProcessError:
        pytest.skip(f"commit {BASE} or {RESTRUCTURED} is not in this clone (shallow)")
    check_edits(tool, ["ablations", "candidates", "combinations", "restructured"], base)
    check_edits(tool, ["costs"], restructured)
    current = tool.kernel_source(None)
    assert "LAUNCHED = _egmla_decode_split" in current  # registers and spills are read from the launch
    check_edits(tool, ["next"], current)  # these name lines of the working tree's kernel


def test_an_edit_that_finds_no_line_says_which():
    tool = load_script("experiments/decode/kernel_costs.py")
    with pytest.raises(LookupError, match="no line 'x = _dot"):
        tool.replace("x = _dot(c, wuk_t)", "x = c")("unrelated kernel text")
