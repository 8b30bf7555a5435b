"""Replay text the base model writes itself (replay.source self): a cached, deterministic step; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from ftcore import models, self_replay, study, training
from ftcore.config import GenerationSpec
from ftcore.steps import recorded

SELF = {"source": "self", "path": "", "generation": {"max_new_tokens": 24, "batch_size": 4, "temperature": 1.0}}
ARMS = ["full", {"name": "self-replay", "replay_ratio": 0.1}]


def _cfg(study_config, **generation):
    return study_config(arms=ARMS, replay={**SELF, "generation": {**SELF["generation"], **generation}})


def test_the_models_own_text_is_generated_once_deterministically_and_mixed_at_the_ratio(study_config):
    cfg = _cfg(study_config)
    p = study.prepare(cfg)
    text = p.generated
    assert text is not None and text.samples > 0
    root = Path(cfg.artifacts_dir)
    need = self_replay.tokens_needed(cfg, int(pd.read_parquet(root / p.domain.train)["input_ids"].map(len).sum()))
    assert text.tokens >= need > 0
    step = study.generate_replay(p.inputs, p.model, p.domain, p.general)
    assert recorded(step) == text  # a rerun generates nothing: the step is done
    first = (root / text.path).read_bytes()
    again = study.prepare(cfg)
    assert again.generated == text and (root / again.generated.path).read_bytes() == first
    # The same seed and settings write the same text in a fresh root; the samples are the continuation only.
    other = study.prepare(cfg.model_copy(update={"artifacts_dir": str(root.parent / "other")}))
    assert (Path(other.cfg.artifacts_dir) / other.generated.path).read_bytes() == first
    texts = [json.loads(line)["text"] for line in first.decode().splitlines()]
    assert len(texts) == text.samples and all(t.strip() for t in texts)
    # Mixed like a replay file: replay is the requested share of the training tokens.
    mix = training.build_training_mix(pd.read_parquet(root / p.domain.train), pd.read_parquet(root / p.replay.path),
                                      0.1, seed=0)
    assert training.replay_share(mix) == pytest.approx(0.1, abs=0.02)
    lines = self_replay.report_lines(cfg, text, root)  # the report's account names the study-level source
    assert lines[0].startswith("Arm(s) self-replay mixed in text the base model wrote itself (`replay.source: self`).")


def test_a_changed_temperature_regenerates_and_retrains_only_the_replay_arm(study_config):
    a, b = study.prepare(_cfg(study_config)), study.prepare(_cfg(study_config, temperature=0.7))
    assert a.generated.digest != b.generated.digest and a.replay.digest != b.replay.digest
    plans_a, plans_b = ({plan.name: plan.key for plan in study.plan_arms(p)} for p in (a, b))
    assert plans_a["full"] == plans_b["full"] and plans_a["self-replay"] != plans_b["self-replay"]


GENERATION = {"generation": SELF["generation"]}
BESIDE = ["replay", {"name": "self-replay", "replay_ratio": 0.1, "replay_source": "self"}]


def test_an_arm_replays_the_models_own_text_beside_the_replay_corpus(study_config):
    cfg = study_config(arms=["full", *BESIDE], replay=GENERATION)
    p = study.prepare(cfg)
    assert set(p.inputs.versions) == {"domain", "general", "replay", "self-replay"}
    assert p.generated is not None and p.self_replay is not None and p.self_replay.digest != p.replay.digest
    assert p.self_replay.path.startswith("tokenize-self-replay/")  # its own step, logged as what it is
    plans = {plan.name: plan for plan in study.plan_arms(p)}
    assert plans["replay"].replay_rows == p.replay.path and plans["self-replay"].replay_rows == p.self_replay.path
    assert plans["full"].replay_rows is None
    # The same ratio from two sources is two arms, not a duplicate.
    assert plans["replay"].replay_ratio == plans["self-replay"].replay_ratio and plans["replay"].key != plans["self-replay"].key
    # Only as many tokens as the self-replay arm needs are generated.
    root = Path(cfg.artifacts_dir)
    train_tokens = int(pd.read_parquet(root / p.domain.train)["input_ids"].map(len).sum())
    assert self_replay.tokens_needed(cfg, train_tokens) == self_replay.tokens_needed(
        study_config(arms=BESIDE[1:], replay=GENERATION), train_tokens)
    # A changed sampling setting regenerates and retrains the self-replay arm only.
    other = study.prepare(study_config(arms=["full", *BESIDE], replay={"generation": {**SELF["generation"],
                                                                                      "temperature": 0.7}}))
    again = {plan.name: plan.key for plan in study.plan_arms(other)}
    assert again["full"] == plans["full"].key and again["replay"] == plans["replay"].key
    assert again["self-replay"] != plans["self-replay"].key


def test_an_arm_replays_the_models_own_text_in_a_study_without_a_replay_corpus(study_config):
    cfg = study_config(arms=["full", {"replay_ratio": 0.1, "replay_source": "self"}], replay=None)
    assert cfg.arm_names == ["full", "full-self-replay0.1"]  # named after its source
    p = study.prepare(cfg)
    assert p.replay is None and p.self_replay is not None
    assert {plan.name: plan.replay_rows for plan in study.plan_arms(p)}["full-self-replay0.1"] == p.self_replay.path


def test_an_arm_source_that_cannot_mean_anything_is_refused(study_config):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="replay_source self but replay_ratio is 0"):
        study_config(arms=[{"name": "own", "replay_source": "self"}])
    with pytest.raises(ValidationError, match="replay.generation is set but nothing is generated"):
        study_config(arms=["full", "replay"], replay=GENERATION)
    with pytest.raises(ValidationError, match="domain.generation is set, but only replay text is generated"):
        study_config(domain=GENERATION)
    # A sweep of ratios with the model's own text expands like any other.
    cfg = study_config(arms=[{"name": "own", "replay_ratio": [0.05, 0.1], "replay_source": "self"}])
    assert cfg.arm_names == ["own-0.05", "own-0.1"] and all(cfg.replays_self(a) for a in cfg.arms)


def test_the_report_and_cards_say_what_each_arm_replayed(study_config):
    cfg = study_config(arms=BESIDE, replay=GENERATION)
    results = study.run_study(cfg)
    root = Path(cfg.artifacts_dir)
    report = (root / results["report"]).read_text()
    assert "## Replay: the base model's own text" in report
    assert "Arm(s) self-replay mixed in text the base model wrote itself (`replay_source: self`); replay mixed in the " \
           "replay corpus" in report
    assert "> " in report.split("## Replay: the base model's own text")[1]  # a sample of the text itself
    assert "| self replay |" in report  # its rows and tokens in the Data section
    cards = (root / results["report"]).parent / "cards"
    assert "replay text the base model generated itself" in (cards / "self-replay.md").read_text()
    assert "general replay text" in (cards / "replay.md").read_text()


def test_prompts_from_the_general_set_are_refused(study_config, corpus_files):
    cfg = study_config(arms=ARMS, replay={**SELF, "file_format": "text",
                                          "generation": {**SELF["generation"], "prompts": str(corpus_files["general"])}})
    with pytest.raises(self_replay.GenerationError, match="replay.generation.prompts: .* the general benchmark's text"):
        study.prepare(cfg)
    assert not list(Path(cfg.artifacts_dir).glob("generate-replay/*/replay.jsonl"))  # nothing half-written


def test_every_setting_that_picks_the_prompts_is_in_the_generation_key(study_config, corpus_files):
    """replay.max_docs caps the prompts read: changing it writes other text, never a stale cached one."""
    def key(**replay):
        cfg = study_config(arms=ARMS, replay={**SELF, "text_fields": ["text"], **replay,
                                              "generation": {**SELF["generation"], "prompts": str(corpus_files["replay"])}})
        p = study.prepare(cfg)
        return study.generate_replay(p.inputs, p.model, p.domain, p.general).dir.name

    assert key(max_docs=2) != key(max_docs=3)


def test_a_missing_prompts_file_is_named_as_the_field_the_user_set(study_config, tmp_path):
    from ftcore.inputs import check_inputs

    cfg = study_config(arms=ARMS, replay={**SELF, "generation": {"prompts": str(tmp_path / "nope.txt")}})
    with pytest.raises(Exception, match=r"^replay\.generation\.prompts: file .*nope.txt does not exist"):
        check_inputs(cfg)


def test_the_report_quotes_samples_without_control_characters():
    assert self_replay.printable("a\x00b\ufffdc\x1bd e") == "a b c d e"
    # Markdown in a sample is shown as written: rendered, the escaped text is the sample again.
    import markdown_it

    sample = "a *b* <h1>c</h1> # d [e](f) `g`"
    html = markdown_it.MarkdownIt().render(self_replay.markdown_literal(sample))
    assert "<em>" not in html and "<h1>" not in html and "<a " not in html and "<code>" not in html


def test_prompts_from_other_text_start_every_sample(study_config, corpus_files, tiny_model):
    cfg = study_config(arms=ARMS, replay={**SELF, "text_fields": ["text"],
                                          "generation": {**SELF["generation"], "prompts": str(corpus_files["replay"])}})
    p = study.prepare(cfg)
    assert p.generated.samples > 0 and p.inputs.versions["replay"].startswith("self:")


class _Silent(torch.nn.Module):
    """A model whose every sample ends at once: generate returns the prompt and the end marker."""

    def __init__(self, end: int):
        super().__init__()
        self.end = end

    def generate(self, input_ids, attention_mask, **kwargs):
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.end)], dim=1)


def test_a_model_that_writes_nothing_or_has_nothing_to_start_from_is_refused(tiny_model):
    tokenizer = models.load_tokenizer(tiny_model)
    with pytest.raises(self_replay.GenerationError, match="held no text"):
        self_replay.generate(_Silent(tokenizer.eos_token_id), tokenizer, GenerationSpec(batch_size=2), [], 100, "cpu",
                             start=tokenizer.eos_token_id)
    assert tokenizer.bos_token_id is None  # the fixture's tokenizer: the config's bos_token_id (its end marker) starts
    assert self_replay.start_token(tokenizer, models.bos_token_id(tiny_model), []) == tokenizer.eos_token_id
    with pytest.raises(self_replay.GenerationError, match="no start token .* replay.generation.prompts"):
        self_replay.start_token(tokenizer, None, [])
    assert self_replay.start_token(tokenizer, None, ["a prompt"]) is None  # prompts are a start


def test_self_is_a_replay_source_only(study_config):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="general.source self: only replay text"):
        study_config(general={"source": "self", "path": ""})
    with pytest.raises(ValidationError, match="replay.generation is set but nothing is generated"):
        study_config(replay={"generation": {"temperature": 0.5}})
    with pytest.raises(ValidationError, match="path is empty: source file"):
        study_config(replay={"path": ""})
    with pytest.raises(ValidationError, match=r"source self generates the replay text: leave path empty"):
        study_config(replay={"source": "self"})  # a merged-in corpus path is not silently read as prompts
    assert study_config(replay={"source": "self", "path": None}).replay.path == ""  # `path: null` in a file
