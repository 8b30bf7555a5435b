"""Which base model shows what fine-tuning costs: the demo-base study on each base, side by side.

    .venv/bin/python -m bench.base_models [--models gemma-3-270m SmolLM2-135M-Instruct] [--set field=value ...]

For each base model, the `demo-base` preset's study (the seed's learning rate 5e-5 for full and replay,
LoRA at 2e-4, 40 steps of 8 x 256 tokens on the demo's arXiv abstracts (30 before b26abc7, as in
results/base_models.json: `--set train.max_steps=30`), WikiText-2 as the general set,
State of the Union speeches as replay) run by ftstudy itself (ftcore.study.run_study, no Prefect),
into the same artifacts root as `make demo-base`: a study already run there is read from its cache.
It prints and keeps (bench/results/base_models.json) the base perplexities and every arm's change
with its 95% paired bootstrap interval over documents, the KL from the base, and the seed's
qualitative expectations checked one by one:

- full FT lowers domain perplexity (interval below 0), and raises general perplexity (interval above 0);
- replay raises general perplexity less than full FT;
- LoRA keeps most of full FT's domain gain (more than half of it) and raises general perplexity less.

Between two arms, "less" compares their mean changes; the intervals printed beside them say whether the
difference is larger than the noise (the report's paired comparisons give it exactly).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from bench.common import ROOT, record
from ftcore import study
from ftcore.config_files import load_config

COLUMNS = ("domain_ppl", "general_ppl", "domain_change_pct", "domain_change_ci_low", "domain_change_ci_high",
           "general_change_pct", "general_change_ci_low", "general_change_ci_high", "general_kl")


def run(model: str, overrides: list[str]) -> tuple[pd.DataFrame, float]:
    """The demo-base study on base `model`: its table (one row per arm, base first) and its wall seconds."""
    cfg = load_config("demo-base", [f"model.name={model}", *overrides],
                      artifacts_dir=str(ROOT / "artifacts"))
    started = time.perf_counter()
    results = study.run_study(cfg)
    wall = time.perf_counter() - started
    if results.get("failed") or results.get("failed_tasks"):
        raise SystemExit(f"{model}: steps failed: {results.get('failed') or results.get('failed_tasks')}")
    table = pd.read_parquet(study.report_files(cfg.artifacts_dir, results)["table"])
    return table[["arm", *[c for c in COLUMNS if c in table.columns]]], wall


def expectations(table: pd.DataFrame) -> dict[str, bool]:
    """The seed's qualitative result, claim by claim, on one base's table."""
    arm = table.set_index("arm")
    full, replay, lora = (arm.loc[a] for a in ("full", "replay", "lora"))
    return {
        "full lowers domain perplexity": bool(full.domain_change_ci_high < 0),
        "full raises general perplexity": bool(full.general_change_ci_low > 0),
        "replay raises general perplexity less than full": bool(replay.general_change_pct < full.general_change_pct),
        "lora keeps most (>1/2) of full's domain gain": bool(lora.domain_change_pct < full.domain_change_pct / 2),
        "lora raises general perplexity less than full": bool(lora.general_change_pct < full.general_change_pct),
    }


def markdown(tables: dict[str, pd.DataFrame]) -> str:
    """One table: a row per base and arm, the changes with their intervals."""
    lines = ["| base | arm | domain ppl | Δ domain, % (95% CI) | general ppl | Δ general, % (95% CI) | KL, nats/token |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for model, table in tables.items():
        for row in table.itertuples():
            if row.arm == "base":
                cells = ["", "", ""]
            else:
                cells = [f"{row.domain_change_pct:+.1f} ({row.domain_change_ci_low:+.1f} to {row.domain_change_ci_high:+.1f})",
                         f"{row.general_change_pct:+.1f} ({row.general_change_ci_low:+.1f} to "
                         f"{row.general_change_ci_high:+.1f})", f"{getattr(row, 'general_kl', float('nan')):.3f}"]
            lines.append(f"| {model} | {row.arm} | {row.domain_ppl:.2f} | {cells[0]} | {row.general_ppl:.2f} | "
                         f"{cells[1]} | {cells[2]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "SmolLM2-135M-Instruct"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="an override of the demo-base preset for every model (e.g. train.max_steps=60)")
    args = parser.parse_args()
    tables, walls = {}, {}
    for model in args.models:
        tables[model], walls[model] = run(model, args.overrides)
    print(markdown(tables))
    record("base_models", {
        "preset": "demo-base", "overrides": args.overrides,
        "wall_s": walls,  # 0 where the study came from the cache
        "tables": {m: t.to_dict("records") for m, t in tables.items()},
        "expectations": {m: expectations(t) for m, t in tables.items()},
        "markdown": markdown(tables),
    })


if __name__ == "__main__":
    main()
