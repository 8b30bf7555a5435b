"""What the report calls an arm is exactly what was trained: adapters are evaluated as trained,
LoRA targets that cannot be trained or evaluated faithfully are refused before any work."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from ftcore import models, study
from ftcore.steps import run_step
from ftcore.config import InputError

TIED_TARGETS = ["q_proj", "v_proj", "embed_tokens"]  # the tiny Llama ties its embeddings, as SmolLM2 does


class Logits(TrainerCallback):
    """The trained model's logits on a probe, taken in the trainer at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=torch.arange(40)[None]).logits.float()


def test_a_lora_arm_on_a_tied_layer_is_evaluated_as_trained(study_config):
    prepared = study.prepare(study_config(arms=["lora"], lora={"target_modules": TIED_TARGETS, "learning_rate": 0.05},
                                          train={"max_steps": 4}))
    plan = study.plan_arms(prepared)[0]
    seen = Logits()
    result = run_step(study.train(plan, prepared.cfg.artifacts_dir, callbacks=[seen]))
    arm_dir = Path(prepared.cfg.artifacts_dir) / result.dir
    evaluated = models.load_trained(arm_dir, prepared.model_dir)
    with torch.no_grad():
        logits = evaluated(input_ids=torch.arange(40)[None]).logits.float()
    torch.testing.assert_close(logits, seen.logits, rtol=1e-5, atol=1e-5)
    # Merging it, as evaluation used to, changes the tied output layer as well: a different model.
    merged = models.load_trained(arm_dir, prepared.model_dir).merge_and_unload()
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=torch.arange(40)[None]).logits.float(), seen.logits, atol=1e-3)


def test_the_table_reports_the_trained_adapter(study_config):
    """End to end: the eval step's perplexity is the trained PeftModel's, recomputed here by hand."""
    import pandas as pd

    from ftcore import perplexity

    cfg = study_config(arms=["lora"], lora={"target_modules": TIED_TARGETS, "learning_rate": 0.05},
                       train={"max_steps": 4})
    results = study.run_study(cfg)
    root = Path(cfg.artifacts_dir)
    prepared = study.prepare(cfg)
    arm = study.plan_arms(prepared)[0]
    model = models.load_trained(root / arm.dir, prepared.model_dir)
    rows = perplexity.domain_rows(pd.read_parquet(root / prepared.domain.test))
    by_hand = perplexity.summarize(perplexity.score_rows(model, rows, 1, models.load_tokenizer(prepared.model_dir).pad_token_id))
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    assert table.loc["lora", "domain_ppl"] == pytest.approx(by_hand["ppl"], rel=1e-6)


@pytest.mark.parametrize("lora, message", [
    ({"target_modules": TIED_TARGETS, "merge": True}, "adapts the input embedding, which this model ties .* Set lora.merge=false"),
    ({"target_modules": ["q_proj", "lm_head"]}, "adapts the output layer .lm_head."),
    ({"target_modules": ["no_such_module"]}, "Target modules .*no_such_module.* not found"),
])
def test_targets_that_cannot_be_evaluated_faithfully_are_refused_before_any_work(study_config, lora, message):
    cfg = study_config(arms=["full", "lora"], lora=lora)
    with pytest.raises(InputError, match=f"arm lora: lora.target_modules .*: {message}"):
        study.run_study(cfg)
    root = Path(cfg.artifacts_dir)
    assert not list(root.glob("tokenize-*")) and not list(root.glob("eval-*")) and not list(root.glob("train-*"))


@pytest.mark.parametrize("family, targets", [("gpt2", ["c_attn"]), ("neox", ["query_key_value"]),
                                             ("gpt2", "all-linear"), ("neox", "all-linear")])
def test_lora_targets_of_the_seed_families_are_accepted(tiny_models, family, targets):
    from ftcore.config import LoraSpec
    from ftcore.inputs import check_lora

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no library deprecation reaches the run's log from the check
        check_lora(LoraSpec(target_modules=targets), tiny_models[family], "lora")
    with pytest.raises(InputError, match="not found"):
        check_lora(LoraSpec(target_modules=["q_proj"]), tiny_models[family], "lora")  # a Llama name


def test_a_merge_that_changes_the_model_is_refused_at_save(tiny_model):
    """The merged model is checked against the trained one (logits) before it is written."""
    from peft import LoraConfig, get_peft_model

    from ftcore.training import merged_as_trained

    model = get_peft_model(models.load_model(tiny_model), LoraConfig(r=2, target_modules=["embed_tokens"],
                                                                     init_lora_weights=False))
    with pytest.raises(RuntimeError, match="merged model is not the trained one"):
        merged_as_trained(model)
    faithful = get_peft_model(models.load_model(tiny_model), LoraConfig(r=2, target_modules=["q_proj"],
                                                                        init_lora_weights=False))
    merged_as_trained(faithful)  # no error
