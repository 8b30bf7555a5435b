"""Tokenize-chunk throughput: ftcore's instruction and stream tokenization against plain batched calls.

    .venv/bin/python bench/tokenize.py [--repeats 5]

Same tokenizer (SmolLM2's fast tokenizer), same documents (the demo's 600 arXiv title/abstract
pairs; the WikiText-2 test lines). Baselines: one batched `tokenizer(texts)` call over the same
prompt+completion texts, and over the same stream documents. ftcore does more (TRL's prompt/completion
mask, byte counts from offsets, chunking) and the ratio says what that costs.
"""

from __future__ import annotations

import argparse

from bench.common import demo_config, prepared, record, timed
from ftcore import chunking, corpora, models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = demo_config()
    tokenizer = models.load_tokenizer(prepared(cfg).model_dir)
    domain = corpora.load_corpus(cfg.domain, "domain", cfg.format)
    pairs = [chunking.prompt_completion(r, cfg.format, tokenizer) for r in domain.records.to_dict("records")]
    texts = [p + c + tokenizer.eos_token for p, c in pairs]
    general = corpora.load_corpus(cfg.general, "general")
    docs = corpora.document_texts(general, cfg.general.text_fields)

    t_instr, _ = timed(lambda: chunking.tokenize_instruction(domain.records, cfg.format, tokenizer, cfg.chunk_len), args.repeats)
    t_instr_base, _ = timed(lambda: tokenizer(texts), args.repeats)
    t_stream, _ = timed(lambda: chunking.tokenize_lm(docs, tokenizer, cfg.chunk_len, cfg.general_separator), args.repeats)
    t_stream_base, _ = timed(lambda: tokenizer(docs), args.repeats)
    record("tokenize", {
        "instruction": {"docs": len(texts), "ftcore_docs_per_s": round(len(texts) / t_instr),
                        "batched_tokenizer_docs_per_s": round(len(texts) / t_instr_base),
                        "ratio_ftcore_vs_batched": round(t_instr_base / t_instr, 3)},
        "stream": {"docs": len(docs), "ftcore_docs_per_s": round(len(docs) / t_stream),
                   "batched_tokenizer_docs_per_s": round(len(docs) / t_stream_base),
                   "ratio_ftcore_vs_batched": round(t_stream_base / t_stream, 3)},
    })


if __name__ == "__main__":
    main()
