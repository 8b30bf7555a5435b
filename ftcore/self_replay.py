"""Replay without the pretraining data: text the base model writes itself, mixed in like any replay corpus.

Most teams cannot replay their base model's pretraining data. Replaying the model's own samples
instead (Marek et al. 2026, arXiv 2605.26097; SA-SFT, arXiv 2602.20162) keeps the fine-tune close
to what the base already predicts. Here the base generates before any arm trains (transformers'
`generate`: batched, with the KV cache, sampling at `replay.generation`'s temperature and top-p),
from its start token or from the user's prompts; the samples become a jsonl corpus that is
fingerprinted, tokenized and mixed at replay_ratio exactly as a replay file is. The prompts are
never the general benchmark's text: a prompt file that shares it is refused (ftcore.contamination's
runs of tokens), since the replayed continuations would then train on the test set.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ftcore.config import CorpusSpec, GenerationSpec, InputError, StudyConfig

log = logging.getLogger("ftcore.self_replay")
MARGIN = 1.1  # generated beyond what the mix needs: re-tokenizing decoded text gives a few tokens more or less
EMPTY_BATCHES = 3  # batches in a row without one generated token: the model cannot write replay text this way


class GenerationError(InputError):
    """The base model cannot write replay text with these settings (no start token and no prompts, or empty
    samples); raised before any arm trains."""


def tokens_needed(cfg: StudyConfig, domain_train_tokens: int) -> int:
    """Tokens to generate: replay.generation.tokens, else what the largest replay_ratio of the arms that replay the
    model's own text needs for `domain_train_tokens` (ratio / (1 - ratio) of them:
    ftcore.training.build_training_mix) times MARGIN."""
    spec = cfg.self_replay.sampling
    if spec.tokens is not None:
        return spec.tokens
    ratio = max((a.replay_ratio for a in cfg.arms if cfg.replays_self(a)), default=0.0)
    return int(np.ceil(ratio / (1 - ratio) * domain_train_tokens * MARGIN))


PROMPT_TOKENS = 128  # a prompt is cut to its first this many tokens: a start to continue, not a document to copy


def prompts_spec(spec: CorpusSpec) -> CorpusSpec | None:
    """The prompts file of a self source (generation.prompts), as a file corpus to read (None without one)."""
    prompts = spec.sampling.prompts
    return spec.model_copy(update={"source": "file", "path": prompts, "generation": None}) if prompts else None


def read_prompts(spec: CorpusSpec) -> list[str]:
    """The prompts of a self source (each document's text fields joined), in file order; [] without a file.
    Raises CorpusError for an unreadable file, GenerationError for one without a non-empty prompt."""
    from ftcore import corpora

    source = prompts_spec(spec)
    if source is None:
        return []
    try:
        corpus = corpora.load_corpus(source, "replay")
    except corpora.CorpusError as exc:  # read as a corpus: name the field the user set
        raise corpora.CorpusError(str(exc).replace("replay.path", "replay.generation.prompts")) from None
    prompts = [t for t in corpora.document_texts(corpus, spec.text_fields) if t.strip()]
    if not prompts:
        raise GenerationError(f"replay.generation.prompts {source.path}: no prompt with text in fields "
                              f"{list(spec.text_fields)}")
    return prompts


def check_prompts(prompts: list[str], tokenizer, general_ids: np.ndarray) -> None:
    """Refuse prompts that hold the general benchmark's text: more than contamination.TOLERANCE of the general
    set's scored tokens (`general_ids`) in runs of contamination.RUN tokens the prompts share. Raises
    GenerationError naming replay.generation.prompts."""
    from ftcore import contamination

    ids = [np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    share = contamination.shared_share(general_ids, ids)
    if contamination.too_much(share, len(general_ids)):
        raise GenerationError(
            f"replay.generation.prompts: {100 * share:.1f}% of the general set's scored tokens lie in {contamination.RUN}-token runs "
            "the prompts hold: the model would replay the general benchmark's text, so the arms would train on the "
            "set their forgetting is measured on. Give prompts from other text, or none (generation from the start "
            "token)")


def start_token(tokenizer, model_bos: int | None, prompts: list[str]) -> int | None:
    """The token unconditional samples start from: the tokenizer's BOS, else the model config's bos_token_id (GPT-2's
    is its document separator <|endoftext|>, where its pretraining documents start); None with prompts. Raises
    GenerationError for a model with neither and no prompts."""
    if prompts:
        return None
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model_bos
    if start is None:
        raise GenerationError("replay.source self: this model has no start token (no bos_token in its tokenizer or "
                              "config) to generate from; give prompts in replay.generation.prompts (a text, jsonl or "
                              "csv file)")
    return start


def generate(model, tokenizer, spec: GenerationSpec, prompts: list[str], tokens: int, device: str,
             start: int | None = None, label: str = "generate-replay") -> tuple[list[str], dict[str, Any]]:
    """Samples of `model` until `tokens` new tokens (not counting the end marker), with their stats.

    Each batch of spec.batch_size samples starts from the token `start` (start_token) or from the next
    prompts (cycled, left-padded) and is sampled under its own seed (spec.seed, batch index), so the text is the same for
    the same settings. A sample ends at the end marker or after spec.max_new_tokens; its text is the
    continuation alone (not the prompt), empty ones dropped. Returns (texts, stats: samples, tokens,
    seconds, tokens_per_s). Raises GenerationError when EMPTY_BATCHES batches in a row write nothing.
    """
    import torch

    from ftcore.progress import Progress

    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    end = tokenizer.eos_token_id
    texts: list[str] = []
    total, batch, empty = 0, 0, 0
    progress = Progress(label, tokens, unit="tokens")
    began = time.perf_counter()
    model.eval()
    while total < tokens:
        if prompts:
            chosen = [prompts[(batch * spec.batch_size + i) % len(prompts)] for i in range(spec.batch_size)]
            enc = tokenizer(chosen, return_tensors="pt", padding=True, truncation=True, max_length=PROMPT_TOKENS)
        else:
            ids = torch.full((spec.batch_size, 1), start, dtype=torch.long)
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        enc = {k: v.to(device) for k, v in enc.items()}
        torch.manual_seed(spec.seed * 1_000_003 + batch)
        # The last batches write only about what is still missing (deterministic: it depends on `tokens` alone).
        longest = min(spec.max_new_tokens, max(1, -(-(tokens - total) // spec.batch_size)))
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                                 max_new_tokens=longest, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=end, use_cache=True)
        written = 0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            if end is not None and end in row:
                row = row[: row.index(end)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            if text.strip():
                texts.append(text)
                written += len(row)
        total += written
        progress.advance(written)
        batch += 1
        empty = 0 if written else empty + 1
        if empty >= EMPTY_BATCHES:
            raise GenerationError(f"replay.source self: {EMPTY_BATCHES} batches of {spec.batch_size} samples held no "
                                  "text (each ended at once with the end marker); give prompts in "
                                  "replay.generation.prompts or raise replay.generation.temperature")
    seconds = time.perf_counter() - began
    return texts, {"samples": len(texts), "tokens": total, "seconds": round(seconds, 2),
                   "tokens_per_s": round(total / seconds, 1) if seconds else None}


def write_corpus(texts: list[str], path: Path) -> None:
    """The samples as a jsonl corpus ({"text": ...} per line), the form a replay file takes."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def as_corpus(spec: CorpusSpec, path: Path) -> CorpusSpec:
    """The replay corpus the study reads after generation: the generated jsonl file."""
    return CorpusSpec(source="file", path=str(path), file_format="jsonl", text_fields=("text",))


def printable(text: str) -> str:
    """`text` with control, format and unassigned characters and U+FFFD (a byte a sampled token split) as spaces:
    what a report can quote. The replay corpus itself keeps the text as sampled."""
    import unicodedata

    return "".join(" " if unicodedata.category(c)[0] == "C" or c == "\ufffd" else c for c in text)


def markdown_literal(text: str) -> str:
    """`text` with Markdown's punctuation backslash-escaped (CommonMark), so a sample's `*`, `#` or `<` is shown as
    written, not as emphasis, a heading or HTML."""
    return re.sub(r"([\\`*_{}\[\]<>()#+\-!|~])", r"\\\1", text)


def report_lines(cfg: StudyConfig, generated: Any, root: Path, shown: int = 3, chars: int = 300) -> list[str]:
    """The report's account of the replayed text (`generated`: the generate-replay step's result): which arms
    mixed it in, how it was written and the first `shown` samples (their first `chars` characters), so a reader
    sees what was replayed."""
    g = cfg.self_replay.sampling
    start = f"the prompts in `{Path(g.prompts).name}`" if g.prompts else "its start token"
    own = [a.name for a in cfg.arms if a.replay_ratio > 0 and cfg.replays_self(a)]
    corpus = [a.name for a in cfg.arms if a.replay_ratio > 0 and not cfg.replays_self(a)]
    how = "`replay.source: self`" if cfg.replay is not None and cfg.replay.source == "self" else "`replay_source: self`"
    beside = (f"; {', '.join(corpus)} mixed in the replay corpus (`{Path(cfg.replay.path).name}`) instead"
              if corpus else "")
    lines = [f"Arm(s) {', '.join(own)} mixed in text the base model wrote itself ({how}){beside}. It was sampled from {start} "
             f"at temperature {g.temperature:g}, top-p {g.top_p:g}, at most {g.max_new_tokens} tokens per sample, seed "
             f"{g.seed}: {generated.samples} samples, {generated.tokens} tokens, in {generated.seconds:.3g} s "
             f"({generated.tokens_per_s} tokens/s). The text: `{generated.path}`. Its first samples:", ""]
    with open(root / generated.path, encoding="utf-8") as f:
        for _, line in zip(range(shown), f):
            text = " ".join(printable(json.loads(line)["text"]).split())
            lines.append("> " + markdown_literal(text[:chars] + " …" if len(text) > chars else text))
            lines.append("")
    return lines[:-1]
