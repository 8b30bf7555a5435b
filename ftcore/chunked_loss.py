"""The training loss through the output layer a few positions at a time, for CPUs.

A causal LM's loss materialises its logits for every position of a batch, then their fp32 copy, their
log-softmax and their gradient: for gemma-3-270m (262,144-token vocabulary) at 8 x 256 positions each of
those is 2.1 GB, allocated, page-faulted and freed again on every step (BENCHMARKS.md §12). This computes the
same loss, the mean (or, with `num_items`, the sum divided by it) of -log p(target) over the positions whose
label is not -100, and its gradients, 256 positions at a time into one reused fp32 buffer, and only over those
positions. Each chunk's gradient with respect to the logits (softmax minus one-hot) is computed in the forward
pass, as Liger-Kernel's fused linear cross-entropy does on GPUs (Hsu et al. 2024), so nothing is recomputed in
the backward pass; the softmax reuses the exp pass of the log-sum-exp.

The numbers are those of transformers' `ForCausalLMLoss`: logits in the compute dtype (bf16 under autocast, as
the model's own head computes them), upcast to fp32 for the log-softmax. tests/test_training.py checks the
loss and every gradient against the model's own loss on GPT-2, GPT-NeoX and Llama.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK = 256  # positions per chunk: its fp32 logits (256 MiB at a 262k vocabulary) are one buffer, reused (BENCHMARKS.md §12)
IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(hidden @ weight.T + bias)[target], times `scale`; gradients computed chunk by
    chunk in the forward pass (scaled before they are rounded to the compute dtype, as autograd would)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, chunk, scale):  # noqa: PLR0913 - autograd's signature
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h = hidden.to(dtype)
            want_h, want_w, want_b = ctx.needs_input_grad[:3]
            grads = want_h or want_w or want_b
            grad_h = torch.empty_like(h) if want_h else None
            # Every chunk's logit gradients, for the weight's gradient in one product at the end.
            grad_logits = torch.empty(h.shape[0], w.shape[0], dtype=dtype, device=h.device) if want_w or want_b else None
            total = torch.zeros((), dtype=torch.float64, device=h.device)
            logits = torch.empty(min(chunk, h.shape[0]), w.shape[0], dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                target = targets[rows]
                out = logits[: len(target)]
                out.copy_(torch.nn.functional.linear(h[rows], w, b))  # in the compute dtype, then fp32
                # log-sum-exp by its max, with one exp pass that the gradient reuses (softmax = exp / sum).
                top = out.amax(dim=-1, keepdim=True)
                picked = out.gather(1, target[:, None]).squeeze(1)
                sums = out.sub_(top).exp_().sum(dim=-1, keepdim=True)
                lse = (top + sums.log()).squeeze(1)
                total += (lse - picked).sum(dtype=torch.float64)
                if not grads:
                    continue
                probs = out.div_(sums)  # d(-log p[target]) / d logits = softmax - one-hot
                probs[torch.arange(len(target), device=h.device), target] -= 1
                g = probs.mul_(scale).to(dtype)
                if want_h:
                    torch.matmul(g, w, out=grad_h[rows])
                if grad_logits is not None:
                    grad_logits[rows] = g
            grad_w = (grad_logits.T @ h).to(weight.dtype) if want_w else None
            grad_b = grad_logits.float().sum(0).to(bias.dtype) if want_b else None
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.hidden_dtype = hidden.dtype
        return (total * scale).float()

    @staticmethod
    def backward(ctx, grad_total):
        saved = [t if present else None for t, present in zip(ctx.saved_tensors, ctx.present)]
        # The loss is what the trainer backpropagates, usually with gradient 1 (or 1 / the accumulation steps).
        grad_h, grad_w, grad_b = (t if t is None or float(grad_total) == 1.0 else t * grad_total.to(t.dtype)
                                  for t in saved)
        if grad_h is not None:
            grad_h = grad_h.to(ctx.hidden_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def supports(model: nn.Module) -> bool:
    """Whether `model` (a transformers causal LM, or a peft model around one) has the shape this loss needs: a
    decoder whose last hidden state feeds one linear output layer, with no logit soft-capping (Gemma 2)."""
    inner = inner_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    return (isinstance(head, nn.Linear) and hasattr(inner, "get_decoder") and inner.get_decoder() is not inner
            and getattr(config, "final_logit_softcapping", None) is None
            and not getattr(config, "is_encoder_decoder", False))


def splits_exactly(model: nn.Module) -> bool:
    """Whether `model`'s logits are its output layer applied to its decoder's last hidden state and nothing more:
    `supports`, then one probe of 4 tokens computed both ways in fp32 (dropout off), once per model (kept on it). A
    model that scales its logits after the output layer (Cohere's logit_scale, Granite's logits_scaling other than
    1, ...) fails it: the chunked loss and ftcore.models.ReusedLogits would silently compute other numbers, so their
    callers take the model's own forward instead. The probe calls the model's class's forward: a forward replaced on
    the instance is a wrapper, not the model (accelerate's mixed precision runs it under bf16 autocast whatever the
    caller says, which made a bf16 trainer's probe compare bf16 logits with fp32 ones and take the slower loss)."""
    if not supports(model):
        return False
    known = getattr(model, "_ftstudy_splits_exactly", None)
    if known is not None:
        return known
    inner = inner_model(model)
    head = inner.get_output_embeddings()
    ids = torch.arange(1, 5, device=head.weight.device)[None] % head.weight.shape[0]
    mask = torch.ones_like(ids)
    modes = {module: module.training for module in model.modules()}  # restored as they were, module by module
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(head.weight.device.type, enabled=False):
            own = type(model).forward(model, input_ids=ids, attention_mask=mask).logits.float()
            hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            split = torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    finally:
        for module, training in modes.items():
            module.training = training
    known = bool(own.shape == split.shape and torch.allclose(own, split, rtol=1e-4, atol=1e-4))
    model._ftstudy_splits_exactly = known
    return known


def causal_lm_loss(model: nn.Module, inputs: dict[str, torch.Tensor], num_items: torch.Tensor | int | None = None,
                   chunk: int = CHUNK) -> torch.Tensor:
    """The causal LM loss of `model` on `inputs` (input_ids [batch, seq], attention_mask, labels with -100 where
    no loss is taken): the sum of -log p(next token) in nats over labelled positions, divided by `num_items`, or
    their mean when `num_items` is None, as transformers' ForCausalLMLoss. Call it under the autocast the model
    trains in; the output layer runs in that dtype.

    Raises ValueError if the model is not one `supports` accepts."""
    if not supports(model):
        raise ValueError(f"{type(inner_model(model)).__name__}: the chunked loss needs a decoder and one linear "
                         "output layer without logit soft-capping")
    inner = inner_model(model)
    labels = inputs["labels"]
    # Everything the model's own forward would hand its decoder (packed rows' position ids included), bar the labels.
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    hidden = inner.get_decoder()(**forward, use_cache=False).last_hidden_state
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE
    head = inner.get_output_embeddings()
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    count = float(num_items) if num_items is not None else max(int(keep.sum()), 1)
    return _LinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, targets[keep], dtype, chunk, 1.0 / count)


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (its LoRA layers are in place inside it), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
