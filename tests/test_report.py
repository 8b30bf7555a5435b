"""The report renders: table with % change, expectation checks, markdown and plots."""

import pandas as pd
import pytest

from ftcore.report import build_table, expectation_checks, markdown_table, write_report


def _evals():
    def s(ppl, bpb=1.0):
        return {"ppl": ppl, "bpb": bpb, "tokens": 100}
    return {
        "base": {"domain": s(40.0), "general": s(30.0)},
        "full": {"domain": s(26.0), "general": s(36.0)},
        "replay": {"domain": s(27.0), "general": s(33.0)},
        "lora": {"domain": s(28.0), "general": s(31.0)},
    }


def test_table_changes_against_base():
    table = build_table(_evals())
    assert table.arm.tolist() == ["base", "full", "replay", "lora"]
    full = table.set_index("arm").loc["full"]
    assert full.domain_change_pct == pytest.approx(-35.0) and full.general_change_pct == pytest.approx(20.0)
    assert "| full | 26.00 | -35.0% | 36.00 | +20.0% |" in markdown_table(table)


def test_expectations_are_checked_against_numbers():
    lines = "\n".join(expectation_checks(build_table(_evals())))
    assert "full: domain perplexity -35.0% (within the expected" in lines
    assert "full: general perplexity +20.0% (rose, as expected)" in lines
    assert "replay: general +10.0% vs full +20.0% (less forgetting than full: yes)" in lines
    assert "lora: keeps 86% of full FT's domain gain (most)" in lines
    evals = _evals()
    evals["full"]["general"]["ppl"] = 29.0
    lines = "\n".join(expectation_checks(build_table(evals)))
    assert "did not rise: no forgetting measured" in lines


def test_report_files(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    paths = write_report(_evals(), tmp_path / "out", "test", {"full": log}, {"config": "test"})
    assert pd.read_parquet(paths["table"]).shape == (4, 9)
    text = open(paths["report"]).read()
    assert "# Fine-tuning cost study: test" in text and "![tradeoff](tradeoff.png)" in text
    for name in ("perplexity", "tradeoff", "loss"):
        assert open(paths[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temp files left behind
