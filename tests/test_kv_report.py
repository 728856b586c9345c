"""The egmla-kv command: the paper's Table 1 KV column and the per-selection table."""

from __future__ import annotations

import json

from egmla.kv_report import expand_sweep, main


def test_paper_table_prints_the_papers_kv_column(capsys):
    assert main(["--paper"]) == 0
    out = capsys.readouterr().out
    for label, kv in [
        ("MHA", "18,432"),
        ("MLA-Base", "3,840"),
        ("EG-MLA kv256", "3,840"),
        ("EG-MLA kv64", "1,536"),
        ("EG-MLA kv16", "960"),
    ]:
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert f" {kv} (" in line and "yes" in line, line
    assert "NO" not in out
    assert "saves 91.67% of MHA's KV cache" in out and "60.0% of MLA-Base's" in out
    assert "154.39M" in out  # 12 x 50,257 x 256 gate-table parameters


def test_selection_rows_expand_commas_and_compare_to_references(capsys):
    assert main(["model=120m", "attention=mha,egmla", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in rows] == ["mha", "egmla"]
    mha, eg = rows
    assert (mha["kv_elements_per_token"], mha["kv_bytes_per_token"], mha["saving_vs_mha"]) == (18432, 36864, 0.0)
    assert eg["kv_elements_per_token"] == 1536 and eg["kv_id_bytes_per_token"] == 4
    assert round(eg["saving_vs_mha"], 4) == 0.9167 and round(eg["saving_vs_mla"], 4) == 0.6
    assert eg["params_gate_tables"] == 12 * 50257 * 256


def test_bad_selection_is_one_line_error(capsys):
    assert main(["attention=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("egmla-kv: error: no config 'attention/nope'") and "\n" not in err


def test_expand_sweep_keeps_bracketed_values_whole():
    assert expand_sweep(["a=1,2", "b=[3,4]"]) == [["a=1", "b=[3,4]"], ["a=2", "b=[3,4]"]]
