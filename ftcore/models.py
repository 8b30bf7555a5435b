"""Loading models and tokenizers from local directories (what every step after the fetch reads).

Where a model comes from is `ftcore.sources`; here a directory becomes a model: the base model,
or a trained arm (its full weights, or the base with its LoRA adapter).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ftcore.plan import TRAIN_SUMMARY
from ftcore.results import Scored

# transformers draws a "Loading weights" bar per model load: dozens per study in the run logs, each for a load of
# seconds. ftcore's own progress lines (ftcore.progress) say what runs.
hf_logging.disable_progress_bar()


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a missing pad token is the EOS token (padding is masked out everywhere)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A causal LM in `dtype` on `device`, with the true mean token loss (see `loss_type`)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    # GPT-2's default loss type makes Trainer's logged loss 511/512 of the true mean.
    model.loss_type = "ForCausalLM"
    return model.to(device)


def load_quantized(model_dir: str | Path, device: str = "cpu", compute_dtype: torch.dtype = torch.float32):
    """The model with its linear layers in 4-bit NF4 with double quantization (bitsandbytes; the QLoRA
    recipe, Dettmers et al. 2023), computing in `compute_dtype` on `device`."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": device},
                                                 dtype=compute_dtype)
    model.loss_type = "ForCausalLM"
    return model


def load_trained(arm_dir: str | Path, base_dir: str | Path, device: str = "cpu", quantized: bool = False) -> torch.nn.Module:
    """A finished arm's model for evaluation, exactly as it was trained: its full weights, or the base
    with its LoRA adapter applied unmerged (a PeftModel).

    The adapter is never merged here: merging changes every weight tied to an adapted one (an
    adapted input embedding also changes a tied output layer), so a merged model can differ from
    the trained one. An arm saved with lora.merge also has model/, an extra output; its adapter is
    what is evaluated. A QLoRA arm (`quantized`) is its adapter on the base in 4-bit NF4, as it trained.
    Raises FileNotFoundError when the arm did not finish training.
    """
    from peft import PeftModel

    arm_dir = Path(arm_dir)
    if not (arm_dir / TRAIN_SUMMARY).exists():
        raise FileNotFoundError(f"{arm_dir} has no {TRAIN_SUMMARY}: the arm did not finish training")
    if (arm_dir / "adapter").is_dir():
        base = load_quantized(base_dir, device) if quantized else load_model(base_dir)
        with quiet_library_deprecations():
            model = PeftModel.from_pretrained(base, arm_dir / "adapter").eval()
        return model if quantized else model.to(device)  # a 4-bit model is placed when loaded, and cannot move
    return load_model(arm_dir / "model", device=device)


@contextlib.contextmanager
def quiet_library_deprecations():
    """Silence one deprecation that peft triggers inside transformers (`is_gradient_checkpointing`):
    nothing a user of ftstudy can act on; every other warning still reaches the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def bos_token_id(model_dir: str | Path) -> int | None:
    """The model config's bos_token_id (of its text model, for a multimodal config); None when it has none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return getattr(config.get_text_config(), "bos_token_id", None)


def load_scored(scored: Scored, base_dir: str | Path, root: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The model an evaluation or a task scores: the base, the base in 4-bit NF4, or a trained arm as it was
    trained (`load_trained`)."""
    if scored.method == "base":
        return load_model(base_dir, device=device)
    if scored.method == "nf4":
        return load_quantized(base_dir, device)
    return load_trained(Path(root) / scored.dir, base_dir, device, quantized=scored.method == "qlora")


class ReusedLogits:
    """A causal LM's logits on a batch, `(input_ids, attention_mask) -> [batch x width x vocab]`, written into one
    buffer that the next call overwrites: valid until then. Equal to `model(...).logits` bit for bit (the decoder's
    last hidden state times the output layer, in the autocast dtype where autocast is on; tests check GPT-2, GPT-NeoX
    and Llama). Why: a 262k-vocabulary model's logits for 8 x 256 positions are 1 GiB in bf16, which the model's own
    forward allocates afresh every batch, and which glibc maps and the kernel faults in afresh whenever the scoring
    runs in a thread (a Prefect task's), where `tasks.heap.keep_freed_memory` cannot help (a thread's malloc arena
    maps every block over 64 MiB). In a thread, gemma-3-270m's forward on 8 x 256 tokens: 1.1-1.2 s instead of
    1.6-1.7 (BENCHMARKS.md §12). The output layer's weight is cast to that dtype once, at the first call: create one
    per pass over a model whose weights do not change during it. A model whose logits are not exactly its output
    layer on the decoder's last hidden state (`ftcore.chunked_loss.splits_exactly`: logit soft-capping or scaling,
    an adapter on the output layer) gets `model(...).logits`."""

    def __init__(self, model: torch.nn.Module):
        from ftcore import chunked_loss

        self.model = model
        inner = chunked_loss.inner_model(model) if chunked_loss.splits_exactly(model) else None
        self.decoder = inner.get_decoder() if inner is not None else None
        self.head = inner.get_output_embeddings() if inner is not None else None
        self.weight: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        if self.weight is None or self.weight.dtype != dtype:
            self.weight = self.head.weight.to(dtype)
        shape = (*hidden.shape[:-1], self.weight.shape[0])
        size = shape[0] * shape[1] * shape[2]
        if self.buffer is None or self.buffer.numel() < size or self.buffer.dtype != dtype or self.buffer.device != hidden.device:
            self.buffer = torch.empty(size, dtype=dtype, device=hidden.device)
        out = self.buffer[:size].view(shape)
        bias = self.head.bias
        torch.matmul(hidden.to(dtype), self.weight.T, out=out)
        return out if bias is None else out.add_(bias.to(dtype))

    def release(self) -> None:
        """Drop the buffer and the cast weight (score_rows calls it when its pass ends): a reference kept beside an
        arm for its curve points would otherwise hold them (1.3 GB for gemma-3-270m in bf16) while the arm trains."""
        self.buffer = self.weight = None


def reference_logits(method: str, model: torch.nn.Module, base_dir: str | Path, device: str = "cpu"):
    """The base model's logits on a batch, `(input_ids, attention_mask) -> logits`, for the exact KL beside
    `model` (a model of `method`): a LoRA arm's own model with its adapter switched off (the base's weights, no
    second model in memory); for a full arm, a QLoRA arm (whose adapter-free model is the 4-bit base) and
    the 4-bit base, the base loaded beside it. The logits are written into one reused buffer (`ReusedLogits`): each
    call's are valid until the next; a caller that keeps them copies them. Its `release()` drops the buffer."""
    if method == "lora":
        adapter_off = ReusedLogits(model)

        def logits(input_ids, attention_mask):
            with model.disable_adapter():
                return adapter_off(input_ids, attention_mask)
        logits.release = adapter_off.release
        return logits
    return ReusedLogits(load_model(base_dir, device=device).eval())


class StoredHidden:
    """A base model's decoder output per batch, kept by the base's evaluation (`keep_hidden`) for the exact KL of an
    arm's evaluation of the same set (`stored_reference_logits`), which then runs only the base's output layer: for
    gemma-3-270m on 8 x 256 tokens in bf16 the decoder is 42-46% of its forward's time (a Zen 4 CPU; BENCHMARKS.md
    §12). Each batch's last hidden state is kept as the output layer multiplies it (cast to the compute dtype, as
    `ReusedLogits` casts it), found again by the batch's token ids, attention mask and shape: the logits are the
    base's own on that batch, bit for bit. It stands in for the decoder, `(input_ids=, attention_mask=, use_cache=) -> .last_hidden_state`;
    a batch not stored raises ValueError (the two passes scored other rows, or batched them otherwise)."""

    def __init__(self, precision: str):
        self.precision = precision
        # (shape, ids, mask) -> (input_ids, attention_mask, hidden), all on the CPU
        self.batches: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        return (tuple(input_ids.shape), input_ids.to(torch.int64).cpu().numpy().tobytes(),
                attention_mask.to(torch.int64).cpu().numpy().tobytes())

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep one batch's `hidden` [batch x width x hidden size] for its `input_ids` and `attention_mask`
        [batch x width] (copied)."""
        self.batches[self._key(input_ids, attention_mask)] = tuple(
            t.detach().cpu().clone() for t in (input_ids, attention_mask, hidden))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SimpleNamespace:
        found = self.batches.get(self._key(input_ids, attention_mask))
        if found is None:
            raise ValueError(f"no stored hidden states for this batch of {tuple(input_ids.shape)} tokens: the base was "
                             "scored on other rows or batches; score the base again")
        return SimpleNamespace(last_hidden_state=found[2].to(input_ids.device))

    def save(self, path: str | Path) -> Path:
        """The batches as one safetensors file (tensors `{i}.input_ids`, `{i}.attention_mask`, `{i}.hidden`; the
        precision in its metadata), written to a temporary name and renamed."""
        from safetensors.torch import save_file

        from ftcore.io import atomic_path

        tensors = {}
        for i, batch in enumerate(self.batches.values()):
            for name, t in zip(("input_ids", "attention_mask", "hidden"), batch):
                tensors[f"{i}.{name}"] = t.contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"precision": self.precision})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, precision: str) -> StoredHidden:
        """The batches `save` wrote, for a pass in `precision` ('fp32' or 'bf16'). Raises ValueError when the file is
        damaged, not such a file, or was computed at another precision."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get("precision")
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable file of stored hidden states ({exc}); score the base again") from None
        if stored != precision:
            raise ValueError(f"{path}: hidden states computed in {stored}, this pass scores in {precision}; score the "
                             "base again at this precision")
        out = cls(precision)
        for i in range(len(tensors) // 3):
            ids, mask, hidden = (tensors.get(f"{i}.{name}") for name in ("input_ids", "attention_mask", "hidden"))
            if ids is None or mask is None or hidden is None or mask.shape != ids.shape or hidden.shape[:2] != ids.shape:
                raise ValueError(f"{path}: batch {i} is missing or its shapes disagree; score the base again")
            out.batches[cls._key(ids, mask)] = (ids, mask, hidden)
        return out


@contextlib.contextmanager
def keep_hidden(model: torch.nn.Module, stored: StoredHidden):
    """Within the block, every call of `model`'s decoder adds its batch's last hidden state to `stored`, cast to the
    autocast dtype where autocast is on (what `ReusedLogits` multiplies by the output layer). Nothing is kept for a
    model whose logits are not exactly that product (`ftcore.chunked_loss.splits_exactly`): an arm's KL against it
    runs the whole model (`stored_reference_logits`)."""
    from ftcore import chunked_loss

    if not chunked_loss.splits_exactly(model):
        yield stored
        return

    def keep(module, args, kwargs, output):
        hidden = output.last_hidden_state
        kind = hidden.device.type
        stored.add(kwargs["input_ids"], kwargs["attention_mask"],
                   hidden.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else hidden)
    handle = chunked_loss.inner_model(model).get_decoder().register_forward_hook(keep, with_kwargs=True)
    try:
        yield stored
    finally:
        handle.remove()


def stored_reference_logits(method: str, model: torch.nn.Module, base_dir: str | Path, device: str,
                            stored: StoredHidden):
    """`reference_logits` from the base's stored decoder output: only the base's output layer runs (a LoRA arm's own,
    its adapter off: the output layer carries none where the logits split; a full or QLoRA arm's base loaded beside
    it), the same logits bit for bit. A model whose logits are not its output layer on its last hidden state gets
    `reference_logits`, the base run whole."""
    reused = ReusedLogits(model if method == "lora" else load_model(base_dir, device=device).eval())
    if reused.decoder is None:
        return reference_logits(method, model, base_dir, device)
    reused.decoder = stored  # it stands in for the base's decoder
    return reused
