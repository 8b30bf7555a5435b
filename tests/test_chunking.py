"""Tokenize and chunk: lm chunks, TRL's completion mask, input styles, bytes per token."""

import datasets
import pandas as pd
import pytest
from trl import SFTConfig, SFTTrainer

from ftcore.chunking import (chunk_stream, move_trailing_spaces, prompt_completion, stream_prefix, token_bytes,
                             tokenize_documents, tokenize_instruction, tokenize_lm)
from ftcore.config import FormatSpec
from ftcore.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def test_lm_chunks_cover_the_stream(tok):
    texts = ["The first document is here.", "A second one, a bit longer than the first one."]
    ids, nbytes, _, skipped = tokenize_documents(texts, tok, "\n\n")
    assert skipped == 0
    assert tok.decode(ids.tolist()) == "The first document is here.\n\nA second one, a bit longer than the first one.\n\n"
    assert nbytes.sum() == len("\n\n".join(texts).encode()) + 2
    df, stats = tokenize_lm(texts, tok, chunk_len=8)
    assert all(len(r) == 8 for r in df.input_ids[:-1]) and 2 <= len(df.input_ids.iloc[-1]) <= 8
    assert sum(len(r) for r in df.input_ids) == stats.tokens == len(ids)
    assert all(list(i) == list(l) for i, l in zip(df.input_ids, df.labels))  # every token in the loss
    assert df.n_bytes.tolist() == [sum(b[1:]) for b in df.token_bytes]


@pytest.fixture(scope="module")
def bos_tok(tok):
    """The tiny tokenizer made to start every text with BOS, as Llama's and Gemma's do."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tok.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.vocab_size)])
    out = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token)
    out.add_special_tokens({"bos_token": "<bos>"})
    assert out.bos_token_id == tok.vocab_size and out("a")["input_ids"][0] == out.bos_token_id
    return out


def test_stream_windows_start_with_bos_where_the_tokenizer_adds_one(tok, bos_tok):
    texts = ["The first document is here.", "A second one, a bit longer than the first one."]
    assert stream_prefix(tok) is None  # no BOS added: windows as before
    assert stream_prefix(bos_tok) == bos_tok.bos_token_id
    ids, nbytes, _, _ = tokenize_documents(texts, bos_tok, "\n\n")
    df, stats = tokenize_lm(texts, bos_tok, chunk_len=8)
    assert all(r[0] == bos_tok.bos_token_id for r in df.input_ids)
    assert all(len(r) == 8 for r in df.input_ids[:-1])
    assert [t for r in df.input_ids for t in r[1:]] == ids.tolist()  # the stream, each token once, in order
    # every stream token is predicted (BOS is context only) and its bytes counted once
    assert stats.loss_tokens == stats.tokens == len(ids)
    assert df.n_bytes.sum() == nbytes.sum() == len("\n\n".join(texts).encode()) + 2
    assert all(len(d) == len(r) for d, r in zip(df.token_docs, df.input_ids))


def test_too_short_documents_are_skipped_and_counted(tok):
    _, _, _, skipped = tokenize_documents(["", "long enough text"], tok, "")
    assert skipped == 1


def test_chunk_stream_drops_a_one_token_tail():
    import numpy as np
    df = chunk_stream(np.arange(9), np.ones(9, int), 4)
    assert [len(r) for r in df.input_ids] == [4, 4]


def test_token_bytes_counts_multibyte_once():
    text = "héllo"
    # two tokens sharing the offsets of one character must not count it twice
    assert token_bytes(text, [(0, 1), (1, 2), (1, 2), (2, 5)]) == [1, 2, 0, 3]
    assert token_bytes(text + "<eos>", [(0, 5), (5, 10)], limit=5) == [6, 0]


def test_completion_mask_prompt_is_ignored(tok):
    fmt = FormatSpec(prompt_field="t", completion_field="c", prompt_template="Title: {prompt}\nAbstract: ")
    records = pd.DataFrame({"t": ["Deep nets", "Sparse graphs"], "c": ["We study deep nets.", "Graphs are sparse."]})
    df, stats = tokenize_instruction(records, fmt, tok, chunk_len=128)
    assert stats.rows == 2 and stats.skipped == 0
    for row, rec in zip(df.itertuples(), records.itertuples()):
        # the template's trailing space belongs to the completion: the prompt ends at "Abstract:"
        prompt_len = len(tok("Title: " + rec.t + "\nAbstract:")["input_ids"])
        ids, labels = list(row.input_ids), list(row.labels)
        assert labels[:prompt_len] == [-100] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[prompt_len:-1]) == " " + rec.c
        assert row.n_bytes == len((" " + rec.c).encode())


# SmolLM2's own chat template: the assistant turn ends "<|im_end|>\n", and its EOS is <|im_end|> (trl #3318).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou "
    "are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}")


@pytest.fixture(scope="module")
def chat_toks(tok):
    """The tiny tokenizer with ChatML markup as special tokens, EOS <|im_end|> and SmolLM2's template; and the same
    adding BOS to every text with a template that writes BOS itself (as Gemma's does)."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    out = {}
    for name in ("smollm2", "bos"):
        backend = copy.deepcopy(tok.backend_tokenizer)
        backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<bos>"])
        extra = {}
        if name == "bos":
            backend.post_processor = TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
            extra["bos_token"] = "<bos>"
        chat = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token=tok.pad_token, **extra)
        chat.chat_template = ("{{ bos_token }}" if name == "bos" else "") + SMOLLM2_TEMPLATE
        out[name] = chat
    return out


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 1 2"},
     {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"},
     {"role": "user", "content": "Another"}, {"role": "assistant", "content": "Red, or green."}],
]


def _style_case(style: str, tokenizer) -> tuple[FormatSpec, pd.DataFrame, list[dict]]:
    """Records in `style`, and the same examples as TRL's prompt/completion dataset, built here."""
    if style == "fields":
        fmt = FormatSpec(prompt_field="t", completion_field="c", prompt_template="Q: {prompt}\nA: ")
        records = pd.DataFrame({"t": ["one", "two words", "three more words"],
                                "c": ["alpha beta", "gamma", "delta epsilon zeta"]})
    elif style == "alpaca":
        fmt = FormatSpec(style="alpaca")
        records = pd.DataFrame({"instruction": ["Sum", "Name a colour"], "input": ["1 2", ""], "output": ["3", "Blue"]})
    else:
        fmt = FormatSpec(style=style)
        if style == "chatml":
            records = pd.DataFrame({"messages": CONVERSATIONS})
        else:
            sharegpt = {"user": "human", "assistant": "gpt", "system": "system"}
            records = pd.DataFrame({"conversations": [[{"from": sharegpt[m["role"]], "value": m["content"]} for m in c]
                                                      for c in CONVERSATIONS]})
        # TRL's conversational prompt/completion: the turns before the last assistant turn, and that turn.
        return fmt, records, [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
    pairs = [prompt_completion(r, fmt, tokenizer) for r in records.to_dict("records")]
    return fmt, records, [{"prompt": p, "completion": c} for p, c in pairs]


@pytest.mark.parametrize("style, chat", [("fields", None), ("alpaca", None), ("chatml", "smollm2"),
                                         ("sharegpt", "smollm2"), ("chatml", "bos")])
def test_mask_matches_trl_own_preparation(tiny_model, tok, chat_toks, tmp_path, style, chat):
    """Our parquet rows equal what SFTTrainer builds from the same examples, for every format.style: a chat template
    that ends the assistant turn in "<|im_end|>\n" gets no second end marker, a template that writes BOS no second BOS."""
    tokenizer = chat_toks[chat] if chat else tok
    fmt, records, examples = _style_case(style, tokenizer)
    ours, _ = tokenize_instruction(records, fmt, tokenizer, chunk_len=64)
    raw = datasets.Dataset.from_list(examples)
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=64, report_to="none", use_cpu=True,
                     bf16=False, activation_checkpointing=False)
    trainer = SFTTrainer(model=load_model(tiny_model), args=args, train_dataset=raw, processing_class=tokenizer)
    prepared = trainer.train_dataset
    assert [list(x) for x in prepared["input_ids"]] == [list(x) for x in ours.input_ids]
    assert [list(x) for x in prepared["labels"]] == [list(x) for x in ours.labels]


def test_truncation_and_prompt_filling_the_chunk(tok):
    fmt = FormatSpec(prompt_field="t", completion_field="c", prompt_template="{prompt}")
    records = pd.DataFrame({"t": ["word " * 50, "short", "short"], "c": ["the completion", "x " * 100, "fits"]})
    df, stats = tokenize_instruction(records, fmt, tok, chunk_len=16)
    assert stats.skipped == 1 and stats.rows == 2  # the first prompt alone fills the chunk
    assert len(df.input_ids.iloc[0]) == 16
    # truncation is counted: both long examples were cut, and what they lost (EOS included)
    full = [len(tok(p + c)["input_ids"]) + 1 for p, c in (("word " * 50, "the completion"), ("short", "x " * 100))]
    assert stats.truncated == 2 and stats.truncated_tokens == sum(n - 16 for n in full)
    assert df.input_ids.iloc[0][-1] != tok.eos_token_id and df.input_ids.iloc[1][-1] == tok.eos_token_id


def test_a_trailing_space_of_the_prompt_moves_to_the_completion(tok):
    """BPE would merge the template's last space into the completion's first token; moving it keeps the
    prompt's tokens a prefix of prompt + completion's, and the text unchanged."""
    assert move_trailing_spaces("Abstract: ", "We study") == ("Abstract:", " We study")
    assert move_trailing_spaces("### Response:\n", "3") == ("### Response:\n", "3")
    fmt = FormatSpec(prompt_field="t", completion_field="c", prompt_template="Title: {prompt}\nAbstract: ")
    records = pd.DataFrame({"t": ["Deep nets"], "c": ["is better than ugly."]})  # " is" is one token here
    _, stats = tokenize_instruction(records, fmt, tok, chunk_len=64)
    assert stats.merged_boundary == 0
    p, c = "Title: Deep nets\nAbstract: ", "is better than ugly."  # what was tokenized before the move
    assert tok(p)["input_ids"] != tok(p + c)["input_ids"][: len(tok(p)["input_ids"])]


def test_corpus_text_that_spells_a_special_token_stays_text(tok):
    """'<|endoftext|>' inside a document is characters, not the EOS token; the EOS that ends an example is one."""
    fmt = FormatSpec(prompt_field="t", completion_field="c", prompt_template="Q: {prompt}\nA: ")
    records = pd.DataFrame({"t": ["a <|endoftext|> b"], "c": ["the end <|endoftext|> here"]})
    df, _ = tokenize_instruction(records, fmt, tok, chunk_len=128)
    ids = list(df.input_ids[0])
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "Q: a <|endoftext|> b\nA: the end <|endoftext|> here"
    stream, _, _, _ = tokenize_documents(["x <|endoftext|> y"], tok, "\n\n")
    assert tok.eos_token_id not in stream.tolist() and tok.decode(stream.tolist()) == "x <|endoftext|> y\n\n"


def test_alpaca_sharegpt_chatml(tok):
    p, c = prompt_completion({"instruction": "Sum", "input": "1 2", "output": "3"}, FormatSpec(style="alpaca"), tok)
    assert "### Instruction:\nSum" in p and "### Input:\n1 2" in p and p.endswith("### Response:\n") and c == "3"
    p, _ = prompt_completion({"instruction": "Sum", "input": "", "output": "3"}, FormatSpec(style="alpaca"), tok)
    assert "### Input" not in p
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    p, c = prompt_completion({"conversations": conv}, FormatSpec(style="sharegpt"), tok)
    assert p.endswith("<|im_start|>assistant\n") and "Be brief." in p and c.startswith("Hello!")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    p2, c2 = prompt_completion({"messages": msgs}, FormatSpec(style="chatml"), tok)
    assert c2 == c and p2.endswith("<|im_start|>assistant\n")
    df, _ = tokenize_instruction(pd.DataFrame({"messages": [msgs]}), FormatSpec(style="chatml"), tok, 64)
    completion = [t for t, lab in zip(df.input_ids[0], df.labels[0]) if lab != -100]
    assert tok.decode(completion).startswith("Hello!")
