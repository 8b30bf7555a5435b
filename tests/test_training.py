"""Each arm trains, logs finite losses and changes what it should; replay ratio; resume."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerState

from ftcore import study
from ftcore.steps import run_step
from ftcore.training import LossLog, NonFiniteLossError, build_training_mix, replay_share


@pytest.fixture
def prepared(study_config):
    """The study's inputs, prepared by the DAG's own first half (ftcore.study.prepare)."""
    return study.prepare(study_config(train={"max_steps": 4, "save_steps": 2, "logging_steps": 1}))


def _plan(prepared, name, seed=0):
    arm = next(a for a in prepared.cfg.arms if a.name == name)
    return study.plan_arm(prepared.cfg, arm, seed, prepared.model, prepared.domain, prepared.replay)


def train(prepared, name, callbacks=None):
    return run_step(study.train(_plan(prepared, name), prepared.cfg.artifacts_dir, callbacks=callbacks))


def arm_dir(prepared, result):
    return Path(prepared.cfg.artifacts_dir) / result.dir


class Snapshot(TrainerCallback):
    """Parameters before and after training, by name."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(self):
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


def _log(arm_dir):
    return [json.loads(line) for line in (Path(arm_dir) / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arm", ["full", "replay", "lora"])
def test_arm_trains_and_changes_its_trainable_parameters(prepared, arm):
    snap = Snapshot()
    result = train(prepared, arm, callbacks=[snap])
    out = arm_dir(prepared, result)
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert result.summary["steps"] == 4
    # every trainable parameter changed, nothing else did (for LoRA: only the adapter)
    assert snap.changed() == snap.trainable
    if arm == "lora":
        assert snap.trainable and all("lora_" in n for n in snap.trainable)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert not (out / "model").exists()
    else:
        saved = load_file(out / "model" / "model.safetensors")
        base = load_file(prepared.model.locate(prepared.cfg.artifacts_dir) / "model.safetensors")
        assert any(not torch.equal(saved[k], base[k]) for k in base)
    assert any((out / "checkpoints").glob("runs/*/events.out.tfevents.*"))


def test_replay_mix_has_the_requested_ratio(prepared):
    root = Path(prepared.cfg.artifacts_dir)
    train = pd.read_parquet(root / prepared.domain.train)
    replay_rows = pd.read_parquet(root / prepared.replay.path)
    for ratio in (0.1, 0.25):
        mix = build_training_mix(train, replay_rows, ratio, seed=0)
        tolerance = max(len(r) for r in replay_rows.input_ids) / mix.input_ids.map(len).sum()
        assert replay_share(mix) == pytest.approx(ratio, abs=tolerance)
        assert (mix.source == "domain").sum() == len(train)  # every domain row is kept
    with pytest.raises(ValueError, match="replay.max_docs"):
        build_training_mix(train, replay_rows.head(1), 0.5, seed=0)


def test_an_arms_own_lora_rank_and_replay_ratio_are_used(study_config):
    prepared = study.prepare(study_config(train={"max_steps": 1, "save_steps": 5, "logging_steps": 1},
                                          arms=["lora", {"name": "lora-r2", "method": "lora", "lora": {"r": 2}},
                                                {"name": "r25", "replay_ratio": 0.25}]))
    params = {arm: train(prepared, arm).summary["trainable_params"] for arm in ("lora", "lora-r2")}
    assert params["lora"] == 2 * params["lora-r2"]  # the smoke preset's rank is 4; LoRA's size is linear in r
    summary = train(prepared, "r25").summary
    assert summary["method"] == "full" and summary["replay_share"] == pytest.approx(0.25, abs=0.05)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill after step 3")


def test_resume_continues_from_the_checkpoint(prepared, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(prepared, "full", callbacks=[Crash()])
    result = train(prepared, "full")
    assert result.summary["resumed_from_step"] == 2
    assert [e["step"] for e in _log(arm_dir(prepared, result))] == [1, 2, 3, 4]
    # an uninterrupted run in a copy of the inputs ends with the same weights
    clean_root = tmp_path / "clean"
    shutil.copytree(prepared.cfg.artifacts_dir, clean_root, ignore=shutil.ignore_patterns("train-*"))
    clean = run_step(study.train(_plan(prepared, "full"), clean_root))
    a = load_file(arm_dir(prepared, result) / "model" / "model.safetensors")
    b = load_file(clean_root / clean.dir / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert _log(arm_dir(prepared, result))[-1]["loss"] == pytest.approx(_log(clean_root / clean.dir)[-1]["loss"], rel=1e-5)


def test_non_finite_loss_stops_the_arm(tmp_path):
    callback = LossLog(tmp_path / "train_log.jsonl", resume_step=0)
    state = TrainerState(global_step=7, epoch=0.5)
    callback.on_log(None, state, None, logs={"loss": 2.5})
    with pytest.raises(NonFiniteLossError, match="nan at step 7"):
        callback.on_log(None, state, None, logs={"loss": float("nan")})
    assert [e["step"] for e in _log(tmp_path)] == [7, 7]  # the bad value is logged before stopping


def test_a_checkpoint_killed_mid_save_is_skipped(prepared):
    from ftcore.training import newest_complete_checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(prepared, "full", callbacks=[Crash()])
    ckpts = next(Path(prepared.cfg.artifacts_dir).glob("train-full/*/checkpoints"))
    partial = ckpts / "checkpoint-4"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")  # killed before trainer_state.json
    assert newest_complete_checkpoint(ckpts).endswith("checkpoint-2") and not partial.exists()
    result = train(prepared, "full")
    assert result.summary["resumed_from_step"] == 2 and result.summary["steps"] == 4


@pytest.mark.parametrize("arm", ["full", "lora"])
def test_plain_loss_equals_trls_fused_loss(prepared, arm, tmp_path):
    """The CPU trainer's loss (the model's own cross-entropy) is TRL's completion-only loss, for the same batch."""
    import datasets
    from trl import SFTTrainer

    from ftcore import training
    from ftcore.models import load_model, load_tokenizer

    plan = _plan(prepared, arm)
    model_dir = plan.model.locate(prepared.cfg.artifacts_dir)
    rows = pd.read_parquet(Path(prepared.cfg.artifacts_dir) / plan.train_rows)[["input_ids", "completion_mask"]].head(4)
    dataset = datasets.Dataset.from_pandas(rows, preserve_index=False)
    losses = []
    for cls in (training.PlainLossSFTTrainer, SFTTrainer):
        torch.manual_seed(0)
        args = training.sft_config(plan.train, plan.learning_rate, plan.chunk_len, plan.precision, plan.device,
                                   tmp_path / cls.__name__)
        trainer = cls(model=load_model(model_dir), args=args, train_dataset=dataset,
                      processing_class=load_tokenizer(model_dir),
                      peft_config=training.peft_config(plan.lora) if plan.lora else None)
        trainer.model.eval()  # no dropout: both see the same function
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            n = int((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(n))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("arm", ["full", "lora"])
def test_a_bf16_trainer_takes_the_chunked_loss(study_config, arm, monkeypatch, caplog):
    """Under bf16, accelerate replaces the model's forward with one run under autocast; the probe that decides
    whether the output layer can be applied apart (chunked_loss.splits_exactly) must see the model, not that
    wrapper, or every step silently takes the slower loss (as at 781df4d on every bf16 CPU)."""
    from ftcore import chunked_loss

    calls = []
    own = chunked_loss.causal_lm_loss
    monkeypatch.setattr(chunked_loss, "causal_lm_loss", lambda *a, **k: calls.append(1) or own(*a, **k))
    # Curve points from step 0 (their scoring probes the model too, before the first step's loss).
    prepared = study.prepare(study_config(train={"max_steps": 4, "save_steps": 2, "logging_steps": 1},
                                          eval={"every_steps": 2}))
    plan = next(p for p in study.plan_arms(prepared) if p.name == arm).model_copy(update={"precision": "bf16"})
    assert plan.curve is not None
    with caplog.at_level("INFO", logger="ftcore.training"):
        result = run_step(study.train(plan, prepared.cfg.artifacts_dir))
    assert result.summary["steps"] == 4 and len(calls) == 4
    assert "training loss: through the output layer in chunks of positions" in caplog.text


def test_a_lora_arm_trained_twice_is_the_same_bytes(prepared, tmp_path):
    """peft writes target_modules in arbitrary order; ftstudy sorts them, so identical trainings have one
    digest and their evaluations stay cached. The adapter names its base model, not this machine's path."""
    plan = _plan(prepared, "lora")
    first = run_step(study.train(plan, prepared.cfg.artifacts_dir))
    again_root = tmp_path / "again"
    shutil.copytree(prepared.cfg.artifacts_dir, again_root, ignore=shutil.ignore_patterns("train-*"))
    again = run_step(study.train(plan, again_root))
    assert first.digest == again.digest
    config = json.loads((arm_dir(prepared, first) / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    # the base by its name (a local model's is its own directory), never a path inside the artifacts root
    assert config["base_model_name_or_path"] == prepared.model.name
    assert not config["base_model_name_or_path"].startswith(prepared.cfg.artifacts_dir)
    assert not (arm_dir(prepared, first) / "adapter" / "README.md").exists()  # the study writes its own card


def test_dora_and_rslora_change_what_trains(study_config):
    """DoRA adds a magnitude vector per adapted layer, which trains; rsLoRA scales by alpha / sqrt(r)."""
    import math

    prepared = study.prepare(study_config(
        train={"max_steps": 2, "save_steps": 5, "logging_steps": 1},
        arms=[{"name": "dora", "method": "lora", "lora": {"use_dora": True}},
              {"name": "rslora", "method": "lora", "lora": {"use_rslora": True}}]))
    snap = Snapshot()
    run_step(study.train(_plan(prepared, "dora"), prepared.cfg.artifacts_dir, callbacks=[snap]))
    magnitudes = {n for n in snap.trainable if "lora_magnitude_vector" in n}
    assert magnitudes and magnitudes <= snap.changed()  # the magnitude vectors exist and trained
    scales = Scales()
    run_step(study.train(_plan(prepared, "rslora"), prepared.cfg.artifacts_dir, callbacks=[scales]))
    lora = prepared.cfg.lora
    assert scales.values and all(v == pytest.approx(lora.alpha / math.sqrt(lora.r)) for v in scales.values)
    assert lora.alpha / math.sqrt(lora.r) != lora.alpha / lora.r


class Scales(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        from peft.tuners.lora import LoraLayer

        self.values = [m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)]


def test_packed_rows_have_the_loss_of_the_unpacked_rows(prepared, tmp_path):
    """Packing (padding-free, position ids restarting per example) leaves each example's loss alone: the
    attention implementation in use keeps packed examples from attending to each other."""
    import datasets
    from trl import SFTTrainer

    from ftcore import training
    from ftcore.models import load_model, load_tokenizer

    plan = _plan(prepared, "full")
    model_dir = plan.model.locate(prepared.cfg.artifacts_dir)
    rows = pd.read_parquet(Path(prepared.cfg.artifacts_dir) / plan.train_rows)[["input_ids", "completion_mask"]].head(5)
    dataset = datasets.Dataset.from_pandas(rows, preserve_index=False)
    losses, batches = {}, {}
    for packing in (False, True):
        train = plan.train.model_copy(update={"packing": packing, "batch_size": 8})
        args = training.sft_config(train, plan.learning_rate, 4 * plan.chunk_len, "fp32", "cpu", tmp_path / str(packing))
        trainer = SFTTrainer(model=load_model(model_dir), args=args, train_dataset=dataset,
                             processing_class=load_tokenizer(model_dir))
        trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            losses[packing] = float(training.PlainLossSFTTrainer.compute_loss(trainer, trainer.model, dict(batch),
                                                                            num_items_in_batch=torch.tensor(n)))
        batches[packing] = batch
    assert batches[True]["input_ids"].shape[0] < batches[False]["input_ids"].shape[0]  # packed into fewer rows
    assert (batches[True]["attention_mask"] if "attention_mask" in batches[True] else torch.ones(1)).all()  # no padding
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    # the control: the same packed row without its position ids lets examples attend across, and the loss moves
    leaky = {k: v for k, v in batches[True].items() if k in ("input_ids", "labels")}
    with torch.no_grad():
        leaked = float(load_model(model_dir)(**leaky).loss)
    assert abs(leaked - losses[False]) > 50 * abs(losses[True] - losses[False]) + 1e-5


def test_loading_a_model_draws_no_progress_bar(tiny_model, capfd):
    """transformers' "Loading weights" bar, once per load, flooded every run log (dozens per study)."""
    from ftcore import models

    models.load_model(tiny_model)
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_loss_has_the_models_own_loss_and_gradients(tiny_models, family, precision):
    """ftcore.chunked_loss (the CPU trainer's loss, 3 positions at a time here) against the model's own
    ForCausalLMLoss on one batch: the loss and every parameter's gradient, fully trained and under LoRA (frozen
    output layer), in fp32 and under bf16 autocast (the head's logits in bf16, as the model computes them)."""
    from peft import LoraConfig, get_peft_model

    from ftcore import chunked_loss
    from ftcore.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(3, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt: no loss
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for lora in (False, True):
        grads = []
        for chunked in (False, True):
            model = load_model(tiny_models[family]).train()
            for module in model.modules():  # dropout off: both sides compute the same function
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            if lora:
                torch.manual_seed(1)  # the same adapter initialisation on both sides
                model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
            assert chunked_loss.supports(model)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                if chunked:
                    loss = chunked_loss.causal_lm_loss(model, batch, num_items=torch.tensor(17), chunk=3)
                else:
                    loss = model(**batch, num_items_in_batch=torch.tensor(17)).loss
            loss.backward()
            grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        (plain, plain_grads), (chunk, chunk_grads) = grads
        tol = 1e-5 if precision == "fp32" else 2e-2
        assert chunk == pytest.approx(plain, rel=tol)
        assert plain_grads.keys() == chunk_grads.keys()
        for name, g in plain_grads.items():
            scale = float(g.abs().max()) or 1.0
            assert float((chunk_grads[name] - g).abs().max()) <= tol * scale, (family, lora, name)


def test_chunked_loss_mean_and_refusal(tiny_model):
    """Without a token count the loss is the mean over labelled positions; a model whose logits are soft-capped
    (Gemma 2) is not computed this way."""
    from ftcore import chunked_loss
    from ftcore.models import load_model

    model = load_model(tiny_model)
    ids = torch.randint(3, 60, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        assert float(chunked_loss.causal_lm_loss(model, batch)) == pytest.approx(float(model(**batch).loss), rel=1e-5)
        model.config.final_logit_softcapping = 30.0
        assert not chunked_loss.supports(model)
        with pytest.raises(ValueError, match="soft-capping"):
            chunked_loss.causal_lm_loss(model, batch)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reused_logits_equal_the_models_own_and_reuse_one_buffer(tiny_models, family, precision):
    """ftcore.models.ReusedLogits (what scoring and the KL's reference use): the model's own logits bit for bit, in fp32
    and under bf16 autocast, for the model, under LoRA and with the adapter off (a LoRA arm's reference), on batches
    of two shapes; every call writes into the same buffer (a 262k vocabulary's logits are 1 GiB a batch)."""
    from peft import LoraConfig, get_peft_model

    from ftcore.models import ReusedLogits, load_model, reference_logits

    torch.manual_seed(0)
    model = load_model(tiny_models[family]).eval()
    torch.manual_seed(1)
    lora = get_peft_model(load_model(tiny_models[family]).eval(),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False))
    batches = []
    for shape in ((3, 11), (2, 7)):
        ids = torch.randint(3, 60, shape)
        mask = torch.ones_like(ids)
        mask[-1, shape[1] - 3 :] = 0
        batches.append((ids, mask))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for net in (model, lora):
            reused, pointers = ReusedLogits(net), set()
            for ids, mask in batches:
                out = reused(ids, mask)
                pointers.add(out.data_ptr())
                assert torch.equal(out, net(input_ids=ids, attention_mask=mask).logits)
            assert reused.decoder is not None and len(pointers) == 1
            reused.release()
            assert reused.buffer is None and reused.weight is None
        adapter_off = reference_logits("lora", lora, tiny_models[family])
        for ids, mask in batches:
            with lora.disable_adapter():
                base = lora(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(adapter_off(ids, mask), base)
            assert not torch.equal(base, lora(input_ids=ids, attention_mask=mask).logits)  # the adapter was off


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stored_hidden_states_give_the_models_own_logits(tiny_models, tmp_path, family, precision):
    """ftcore.models.StoredHidden (the base's decoder output, kept by its evaluation for the arms' exact KL): kept
    while the base scores (`keep_hidden`), through a file and back, the output layer on it gives the base's own logits
    bit for bit, for the base loaded beside a full arm and for a LoRA arm's adapter-off reference; a batch it does
    not hold, a file that is not one and a precision other than the stored one are refused with what to do."""
    from peft import LoraConfig, get_peft_model

    from ftcore.models import (ReusedLogits, StoredHidden, keep_hidden, load_model, reference_logits,
                               stored_reference_logits)

    torch.manual_seed(0)
    model = load_model(tiny_models[family]).eval()
    lora = get_peft_model(load_model(tiny_models[family]).eval(),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False))
    batches = [(torch.randint(3, 60, shape), torch.ones(shape, dtype=torch.long)) for shape in ((3, 11), (2, 7))]
    batches[0][1][-1, 8:] = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        kept = StoredHidden(precision)
        with keep_hidden(model, kept):
            own = ReusedLogits(model)
            expected = [own(ids, mask).clone() for ids, mask in batches]
        assert len(kept.batches) == 2
        stored = StoredHidden.load(kept.save(tmp_path / "hidden.safetensors"), precision)
        adapter_off = reference_logits("lora", lora, tiny_models[family])
        for method in ("full", "lora"):
            reference = stored_reference_logits(method, lora, tiny_models[family], "cpu", stored)
            for (ids, mask), want in zip(batches, expected):
                assert torch.equal(reference(ids, mask), want)
                assert torch.equal(want, adapter_off(ids, mask))  # what the LoRA arm's reference was before
        with pytest.raises(ValueError, match="no stored hidden states for this batch"):
            reference(torch.randint(3, 60, (3, 11)), torch.ones(3, 11, dtype=torch.long))
        with pytest.raises(ValueError, match="no stored hidden states for this batch"):  # same tokens, another mask
            reference(batches[0][0], torch.ones(3, 11, dtype=torch.long))
    other = "fp32" if precision == "bf16" else "bf16"
    with pytest.raises(ValueError, match=f"computed in {precision}, this pass scores in {other}"):
        StoredHidden.load(tmp_path / "hidden.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable file of stored hidden states"):
        StoredHidden.load(tmp_path / "bad.safetensors", precision)


def test_a_model_that_scales_its_logits_after_the_output_layer_keeps_its_own_forward():
    """Cohere multiplies its logits by logit_scale after the output layer: the chunked loss and the reused logits
    buffer, which apply the output layer themselves, would compute other numbers silently. The probe
    (ftcore.chunked_loss.splits_exactly) sees it and both take the model's own forward; a Llama passes the probe."""
    from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

    from ftcore import chunked_loss
    from ftcore.models import ReusedLogits

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    cohere = CohereForCausalLM(CohereConfig(**small, logit_scale=0.25)).eval()
    llama = LlamaForCausalLM(LlamaConfig(**small)).eval()
    assert chunked_loss.supports(cohere)  # the structure alone does not show the scale
    assert not chunked_loss.splits_exactly(cohere) and chunked_loss.splits_exactly(llama)
    ids = torch.randint(3, 60, (2, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        reused = ReusedLogits(cohere)
        assert reused.decoder is None
        assert torch.equal(reused(ids, mask), cohere(input_ids=ids, attention_mask=mask).logits)
