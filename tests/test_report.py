"""The report: % change against base, seeds and bootstrap intervals, noise marks, the front, per-document change."""

import math

import numpy as np
import pandas as pd
import pytest

from ftcore import report, stats
from ftcore.report import analyse, compact_rows, expectation_checks, markdown_table, table_rows, write_report

DOCS = 40


def _docs(nll_per_token, tokens=None):
    tokens = np.full(len(nll_per_token), 50) if tokens is None else tokens
    nll = np.asarray(nll_per_token) * tokens
    return pd.DataFrame({"doc": np.arange(len(tokens)), "n_tokens": tokens, "nll_sum": nll, "n_bytes": tokens * 4})


def _eval(arm, which, nll_per_token, seed=None):
    docs = _docs(nll_per_token)
    nll = docs.nll_sum.sum() / docs.n_tokens.sum()
    return {"arm": arm, "seed": seed, "set": which, "ppl": math.exp(nll), "bpb": 1.0, "tokens": int(docs.n_tokens.sum()),
            "docs": docs}


def _study(factors, seeds=(0,), jitter=0.0):
    """Base per-document NLL around log 40 / log 30; each arm scales perplexity by a factor (per set)."""
    rng = np.random.default_rng(1)
    base = {"domain": np.log(40) + rng.normal(0, 0.3, DOCS), "general": np.log(30) + rng.normal(0, 0.3, DOCS)}
    evals = [_eval("base", s, base[s]) for s in base]
    for arm, (fd, fg) in factors.items():
        for i, seed in enumerate(seeds):
            shift = jitter * (1 if i % 2 else -1)
            evals.append(_eval(arm, "domain", base["domain"] + math.log(fd) + shift, seed))
            evals.append(_eval(arm, "general", base["general"] + math.log(fg) + shift, seed))
    return evals


FOUR = {"full": (0.65, 1.2), "replay": (0.675, 1.1), "lora": (0.7, 1.0333)}


def test_changes_against_base_with_intervals():
    a = analyse(_study(FOUR), order=["full", "replay", "lora"])
    assert a.arms.arm.tolist() == ["base", "full", "replay", "lora"]
    full = a.arms.set_index("arm").loc["full"]
    assert full.domain_change_pct == pytest.approx(-35.0) and full.general_change_pct == pytest.approx(20.0)
    # Every document moves by the same factor, so the paired interval of the change is (almost) a point.
    assert full.domain_change_ci_low == pytest.approx(-35.0, abs=1e-6) and full.domain_change_ci_high == pytest.approx(-35.0, abs=1e-6)
    base = a.arms.set_index("arm").loc["base"]
    assert base.domain_ppl_ci_low < base.domain_ppl < base.domain_ppl_ci_high
    # The base's interval sits beside its perplexity; it has no change of its own.
    base_row = table_rows(a.arms)[0]
    assert base_row["domain ppl"] == f"{base.domain_ppl:.2f} [{base.domain_ppl_ci_low:.2f}, {base.domain_ppl_ci_high:.2f}]"
    assert base_row["Δ domain ± std [95% CI]"] == base_row["Δ general ± std [95% CI]"] == "—"
    compact = compact_rows(a.arms)  # the UI's table: what each arm changed, short headers, seeds where several
    assert list(compact[0]) == ["arm", "Δ domain", "Δ general", "front"]  # one seed each: no seeds column
    assert report.base_perplexity_line(a.arms) == (f"Base perplexity: domain {base.domain_ppl:.2f} [{base.domain_ppl_ci_low:.2f}, "
                                                   f"{base.domain_ppl_ci_high:.2f}], general {base.general_ppl:.2f} "
                                                   f"[{base.general_ppl_ci_low:.2f}, {base.general_ppl_ci_high:.2f}]")
    assert [row["arm"] for row in compact] == [row["arm"] for row in table_rows(a.arms)][1:]  # no base row
    assert compact[0]["Δ domain"] == table_rows(a.arms)[1]["Δ domain ± std [95% CI]"]
    assert "| full | 1 | 26.00 | -35.0% [-35.0, -35.0] | 36.00 | +20.0% [+20.0, +20.0] |" in markdown_table(a.arms).replace(
        f"{full.domain_ppl:.2f}", "26.00").replace(f"{full.general_ppl:.2f}", "36.00")


def test_bootstrap_interval_covers_the_truth_and_narrows_with_more_documents():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 320):
        nll = rng.normal(3.0, 0.5, size=(1, n))
        tokens = np.full(n, 100.0)
        ppl = stats.resampled_ppl(nll * tokens, tokens, stats.resample_weights(n))
        lo, hi = stats.interval(ppl[:, 0])
        assert lo < math.exp(nll.mean()) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_seeds_give_mean_and_std_and_noise_is_marked():
    evals = _study({"full": (0.8, 1.2), "tiny": (0.995, 1.0)}, seeds=(0, 1, 2), jitter=0.02)
    a = analyse(evals, order=["full", "tiny"])
    t = a.arms.set_index("arm")
    assert t.loc["full", "seeds"] == 3 and t.loc["full", "domain_change_std"] > 0
    assert t.loc["full", "domain_change_pct"] == pytest.approx(a.runs[a.runs.arm == "full"].domain_change_pct.mean())
    assert not t.loc["full", "domain_within_noise"] and t.loc["tiny", "domain_within_noise"]
    assert "≈ " in markdown_table(a.arms).splitlines()[-1]
    assert len(a.runs) == 1 + 2 * 3


def test_differences_between_arms_are_judged_against_noise():
    a = analyse(_study({"full": (0.7, 1.2), "replay": (0.7, 1.1999), "lora": (0.8, 1.02)}), order=["full", "replay", "lora"])
    c = a.comparisons.set_index(["arm", "set"])
    assert c.loc[("lora", "general"), "diff_pp"] == pytest.approx(-18.0)
    assert not c.loc[("lora", "general"), "within_noise"]
    lines = "\n".join(expectation_checks(a, {"lora": "lora"}))
    assert "lora: general +2.0% vs full +20.0% (lower than full's: difference -18.0 pp" in lines
    assert "lora: 67% of full's domain gain (most of it)" in lines
    assert "replay: general +20.0% vs full +20.0% (no measurable difference from full" in lines


def test_expectations_say_when_forgetting_did_not_happen():
    lines = "\n".join(expectation_checks(analyse(_study({"full": (0.65, 0.97)}))))
    assert "full: domain perplexity -35.0% (within the expected" in lines
    assert "full: general perplexity -3.0% (fell: no forgetting measured)" in lines


def test_no_sentence_claims_what_its_numbers_do_not_show():
    """Each generated verdict, on a case where the opposite is true."""
    # Domain perplexity rose for every arm, and LoRA lost the domain instead of keeping a share of full's gain.
    lines = "\n".join(expectation_checks(analyse(_study({"full": (1.1, 1.2), "lora": (1.05, 1.0)}),
                                                  order=["full", "lora"]), {"lora": "lora"}))
    assert "full: domain perplexity +10.0% (rose: no domain gain" in lines
    assert "smaller fall" not in lines and "% of full's domain gain" not in lines
    # An arm that forgets more than full is called higher, not lower; LoRA gaining more is "more than".
    lines = "\n".join(expectation_checks(analyse(_study({"full": (0.7, 1.1), "lora": (0.6, 1.3)}),
                                                  order=["full", "lora"]), {"lora": "lora"}))
    assert "(higher than full's" in lines and "lora: 133% of full's domain gain (more than it)" in lines
    # A change within noise is never called a rise or a difference.
    evals = _study({"full": (0.8, 1.01), "lora": (0.8, 1.012)}, seeds=(0, 1, 2), jitter=0.05)
    lines = "\n".join(expectation_checks(analyse(evals, order=["full", "lora"])))
    assert "— within noise: no measurable forgetting" in lines
    assert "(no measurable difference from full" in lines and "rose: forgetting" not in lines


def test_the_documents_listed_as_worse_got_worse():
    """Every document improved under every arm: none may be listed under a heading that says 'rose'."""
    from ftcore.report import forgetting_summary

    evals = _study({"full": (0.7, 0.9), "lora": (0.8, 0.95)})
    text = "\n".join(forgetting_summary(analyse(evals).general_docs, ["full", "lora"]))
    assert "No document got worse on average over the arms." in text and "rose most" not in text
    assert "- full: 0 of 40 documents got worse (0%)" in text
    # One document doubles under full: it is the only one listed.
    general = next(e for e in evals if e["arm"] == "full" and e["set"] == "general")
    general["docs"].loc[7, "nll_sum"] += math.log(4) * general["docs"].loc[7, "n_tokens"]
    text = "\n".join(forgetting_summary(analyse(evals).general_docs, ["full", "lora"]))
    assert "The 1 document whose perplexity rose most" in text and text.count("\n| 7 |") == 1


def test_pareto_front():
    # (gain, forgetting): b dominates d; a, b, c trade off.
    assert stats.pareto_front([30, 20, 10, 15], [20, 5, 0, 6]) == [True, True, True, False]
    a = analyse(_study({"full": (0.65, 1.2), "worse": (0.7, 1.25), "lora": (0.8, 1.0)}), order=["full", "worse", "lora"])
    assert a.arms.set_index("arm").pareto.to_dict() == {"base": False, "full": True, "worse": False, "lora": True}


def test_per_document_change_finds_the_document_that_got_worse():
    evals = _study({"full": (0.7, 1.0)})
    general = next(e for e in evals if e["arm"] == "full" and e["set"] == "general")
    general["docs"].loc[7, "nll_sum"] += math.log(2) * general["docs"].loc[7, "n_tokens"]  # doc 7: ppl doubles
    titles = pd.DataFrame({"doc": range(DOCS), "title": [f"Article {i}" for i in range(DOCS)]})
    docs = analyse(evals, titles=titles).general_docs
    worst = docs.sort_values("ppl_change_pct").iloc[-1]
    assert worst.title == "Article 7" and worst.ppl_change_pct == pytest.approx(100.0)


def test_report_files(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    titles = pd.DataFrame({"doc": range(DOCS), "title": [f"Article {i}" for i in range(DOCS)]})
    paths = write_report(_study(FOUR, seeds=(0, 1), jitter=0.01), tmp_path / "out", "test", {"full": log},
                         {"config": "test"}, order=["full", "replay", "lora"], titles=titles)
    assert len(pd.read_parquet(paths["table"])) == 4 and len(pd.read_parquet(paths["runs"])) == 7
    assert len(pd.read_parquet(paths["general_docs"])) == 3 * 2 * DOCS
    text = open(paths["report"]).read()
    for part in ("# Fine-tuning cost study: test", "![frontier](frontier.png)", "## Every seed",
                 "## Where forgetting happens", "| Article "):
        assert part in text
    for name in ("perplexity", "frontier", "loss"):
        assert open(paths[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temp files left behind


def test_a_change_that_prints_as_zero_is_not_called_worse():
    from ftcore.report import forgetting_summary

    evals = _study({"full": (0.7, 0.9)})
    general = next(e for e in evals if e["arm"] == "full" and e["set"] == "general")
    # document 3: +0.04%, which prints as +0.0%
    general["docs"].loc[3, "nll_sum"] = (general["docs"].loc[3, "nll_sum"] / 0.9 ** 0  # noqa: no-op for clarity
                                         - math.log(0.9) * general["docs"].loc[3, "n_tokens"]
                                         + math.log(1.0004) * general["docs"].loc[3, "n_tokens"])
    text = "\n".join(forgetting_summary(analyse(evals).general_docs, ["full"]))
    assert "- full: 0 of 40 documents got worse" in text and "No document got worse" in text


def test_the_data_section_lists_training_before_held_out_whatever_order_the_stats_come_in():
    """A cached tokenize result's stats come back from JSON with sorted keys ("test" before "train"), a fresh one's
    in the order tokenizing wrote them: the report, rendered again from cache, reordered its Data table."""
    from types import SimpleNamespace

    from ftcore.study import data_stats

    def prepared(stats):
        return SimpleNamespace(domain=SimpleNamespace(stats=stats), general=SimpleNamespace(stats={"docs": 3}),
                               replay=None, self_replay=None)

    fresh = {"corpus": {"docs": 9}, "train": {"docs": 7}, "test": {"docs": 2}}
    cached = dict(sorted(fresh.items()))
    assert list(cached) == ["corpus", "test", "train"]
    for stats in (fresh, cached):
        assert list(data_stats(prepared(stats))) == ["domain", "domain train", "domain test", "general"]
