"""The causal-LM loss over supervised tokens, computed without ever holding the whole vocabulary
for every position: the one implementation behind training, evaluation perplexity and the
long-context evaluation.

The output head of a 49k-vocabulary model is about a fifth of the forward compute, and the
instruction data's loss covers ~20% of positions; the head runs only at the positions that predict
a supervised token (transformers' `logits_to_keep` with a boolean mask). On long raw text every
position is supervised, and `[tokens x vocabulary]` logits with their fp32 copy, log-softmax and
gradients (about 18 bytes an entry) dominate a step's memory (14 of 16 GiB at 16k tokens on the
default model). So the model's forward stops before the head (a forward pre-hook on the output
embeddings captures the head's input and hands the head an empty slice), and the head and
cross-entropy run on chunks of `chunk_tokens` positions, each chunk's gradients taken while its
logits exist and the logits freed before the next chunk (Liger's scheme), so at most one chunk's
logits live at a time and the head costs no more than before. Losses are summed in fp32.

The head is called as a module (with whatever PEFT or DeepSpeed put around it), so LoRA on the
head, `modules_to_save` and ZeRO-3's parameter gathering work as in the model's own forward; the
forward itself runs through any DDP / DeepSpeed wrapper. On CUDA, Liger's fused linear
cross-entropy or Apple's Cut Cross-Entropy (optional extras) can take the chunked head's place.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorasft.config import DEFAULT_CHUNK_TOKENS
from lorasft.data.tokenize import IGNORE
from lorasft.model.load import accepts_logits_to_keep

EXTRAS = {
    "liger": ("liger_kernel", "liger-kernel"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy"),
}


@dataclass(frozen=True)
class LossSettings:
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """Positions per chunk of the output head and cross-entropy; 0: all at once (no chunking)."""
    kernel: str = "auto"
    """auto | chunked | liger | cce | off (train.fused_loss)."""

    @classmethod
    def from_train(cls, train) -> LossSettings:
        return cls(chunk_tokens=train.loss_chunk_tokens, kernel=train.fused_loss)


DEFAULT_LOSS = LossSettings()


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: position t is kept when token t+1 is in the loss."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def unwrapped(model) -> nn.Module:
    """The model inside DDP / DeepSpeed / torch.compile wrappers (their forward hides
    `logits_to_keep` and the output head)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def extra_available(kernel: str) -> bool:
    return importlib.util.find_spec(EXTRAS[kernel][0]) is not None


def check_kernel(kernel: str, chunk_tokens: int) -> str | None:
    """Why `train.fused_loss=kernel` cannot run here (None: it can). Called when training starts."""
    if kernel in EXTRAS:
        package = EXTRAS[kernel][1]
        if not torch.cuda.is_available():
            return f"train.fused_loss={kernel} runs on CUDA GPUs only; use chunked (or auto) here"
        if not extra_available(kernel):
            return (f"train.fused_loss={kernel} needs {package}: pip install 'lorasft[{kernel}]' "
                    f"(or pip install {package})")  # fmt: skip
    if kernel == "chunked" and chunk_tokens <= 0:
        return "train.fused_loss=chunked needs train.loss_chunk_tokens > 0"
    return None


def _plain_head(head: nn.Module) -> bool:
    """A bare linear layer whose full weight is at hand (not wrapped by PEFT, not partitioned by
    ZeRO-3): what the fused kernels take."""
    return type(head) is nn.Linear and not hasattr(head.weight, "ds_id")


def _fits_kernel(kernel: str, head: nn.Module) -> bool:
    """Cut Cross-Entropy takes no bias; both take the head's weight alone (no PEFT wrapper)."""
    return _plain_head(head) and (kernel == "liger" or head.bias is None)


def _logit_softcap(config) -> float | None:
    return getattr(config, "final_logit_softcapping", None) or None


def _scales_logits(config) -> bool:
    """Heads whose models rescale logits after the projection in ways the chunked path does not
    repeat (Cohere's logit_scale, Granite's logits_scaling): they keep the model's own head."""
    return any(
        getattr(config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling")
    )


def choose_kernel(model, loss: LossSettings, head: nn.Module) -> str:
    """The kernel this call runs: `off` for models the chunked path cannot serve."""
    config = unwrapped(model).config
    if loss.kernel == "off" or _scales_logits(config):
        return "off"
    if loss.kernel in EXTRAS:
        return loss.kernel if _fits_kernel(loss.kernel, head) else "chunked"
    if loss.kernel == "auto" and torch.cuda.is_available():
        for kernel in ("cce", "liger"):
            if extra_available(kernel) and _fits_kernel(kernel, head):
                return kernel
    return "chunked" if loss.chunk_tokens > 0 else "off"


@contextmanager
def head_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, a forward of the model captures what its output head is given (the
    hidden states at the kept positions) and the head computes logits for none of them."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_nll(head: nn.Module, softcap: float | None, hidden: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:  # fmt: skip
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


class _ChunkedHeadNLL(torch.autograd.Function):
    """Summed NLL over chunks whose gradients are taken while the chunk's logits exist (as Liger's
    fused linear cross-entropy does): the forward pass runs each chunk's head, loss and backward
    and keeps only the gradients (the chunk's hidden states', and the head's own trainable
    parameters' summed over chunks); the backward pass scales them. No chunk is recomputed, so
    the head costs what the whole-vocabulary loss costs."""

    @staticmethod
    def forward(ctx, head, softcap, n, *tensors):
        hidden, targets, params = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        total = torch.zeros((), dtype=torch.float32, device=hidden[0].device)
        grads_h, grads_p = [], [torch.zeros_like(p) for p in params]
        for h, t in zip(hidden, targets, strict=True):
            with torch.enable_grad():
                h = h.detach().requires_grad_(True)
                loss = _chunk_nll(head, softcap, h, t)
                g = torch.autograd.grad(loss, [h, *params])
            total += loss.detach()
            grads_h.append(g[0])
            for acc, gp in zip(grads_p, g[1:]):
                acc += gp
        ctx.n, ctx.n_params = n, len(params)
        ctx.save_for_backward(*grads_h, *grads_p)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads_h, grads_p = saved[: ctx.n], saved[ctx.n :]
        scaled = lambda gs: [g * grad_out.to(g.dtype) for g in gs]
        return (None, None, None, *scaled(grads_h), *([None] * ctx.n), *scaled(grads_p))


def chunks_nll(
    head: nn.Module, hidden_chunks, target_chunks, softcap: float | None = None
) -> torch.Tensor:
    """Summed NLL (fp32) over paired chunks, at most one chunk's logits alive at a time. With
    gradients: taken per chunk in the forward pass (`_ChunkedHeadNLL`); a head whose parameters
    ZeRO-3 partitions (gathered only inside a call of the head) instead recomputes each chunk
    in the backward pass under activation checkpointing."""
    fn = functools.partial(_chunk_nll, head, softcap)
    params = [p for p in head.parameters() if p.requires_grad]
    needs_grad = any(h.requires_grad for h in hidden_chunks) or bool(params)
    if not torch.is_grad_enabled() or not needs_grad:
        total = torch.zeros((), dtype=torch.float32, device=hidden_chunks[0].device)
        for h, t in zip(hidden_chunks, target_chunks, strict=True):
            total = total + fn(h, t)
        return total
    if any(hasattr(p, "ds_id") for p in params):
        pairs = zip(hidden_chunks, target_chunks, strict=True)
        return sum(checkpoint(fn, h, t, use_reentrant=False) for h, t in pairs)
    n = len(hidden_chunks)
    return _ChunkedHeadNLL.apply(head, softcap, n, *hidden_chunks, *target_chunks, *params)


def chunked_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Summed NLL of `targets` (n,) predicted from `hidden` (n, hidden) through `head`."""
    if hidden.size(0) == 0:
        return hidden.sum(dtype=torch.float32) * 0  # keeps the graph for an all-masked batch
    return chunks_nll(head, hidden.split(chunk_tokens), targets.split(chunk_tokens), softcap)


def fused_nll(kernel: str, head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
              softcap: float | None) -> torch.Tensor:  # fmt: skip
    """Summed NLL by Liger's fused linear cross-entropy or Cut Cross-Entropy (CUDA)."""
    if kernel == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)
        return fn(head.weight, hidden, targets, head.bias).float()
    from cut_cross_entropy import linear_cross_entropy

    # filter_eps=None: every gradient entry computed (CCE's default skips those it deems below
    # the dtype's resolution, an approximation)
    return linear_cross_entropy(hidden, head.weight, targets, softcap=softcap, reduction="sum",
                                filter_eps=None).float()  # fmt: skip


def _logits_nll(model, fwd: dict, keep: torch.Tensor, targets: torch.Tensor, head_only: bool):
    """The whole-vocabulary path: logits for every kept position at once."""
    if head_only:
        outputs = model(**fwd, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.size(-1))
    else:
        outputs = model(**fwd, use_cache=False)
        logits = outputs.logits[keep]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), outputs


def supervised_nll(model, inputs: dict, head_only: bool = True,
                   loss: LossSettings = DEFAULT_LOSS) -> tuple[torch.Tensor, int, object]:  # fmt: skip
    """`(summed NLL, count, outputs)` over the supervised tokens (labels other than IGNORE), each
    predicted from the tokens before it. `head_only`: the output head runs only at the positions
    that predict one (the model must take `logits_to_keep`: `accepts_logits_to_keep` of the model
    unwrapped), else on all of them, at once. With `loss`'s chunked or fused kernel (head_only)
    the returned outputs carry no logits."""
    labels = inputs["labels"]
    keep = supervised_positions(labels)
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    targets = labels[:, 1:][keep[:, :-1]]
    inner = unwrapped(model)
    head = inner.get_output_embeddings() if head_only else None  # head_only: a transformers model
    kernel = choose_kernel(model, loss, head) if head is not None else "off"
    if kernel == "off":
        nll, outputs = _logits_nll(model, fwd, keep, targets, head_only)
        return nll, targets.numel(), outputs
    with head_input(head) as captured:
        outputs = model(**fwd, logits_to_keep=keep, use_cache=False)
    hidden, softcap = captured[0], _logit_softcap(inner.config)
    if kernel == "chunked":
        nll = chunked_nll(head, hidden, targets, loss.chunk_tokens, softcap)
    else:
        nll = fused_nll(kernel, head, hidden, targets, softcap)
    return nll, targets.numel(), outputs


def causal_lm_loss(model, inputs: dict, num_items: torch.Tensor | int | None,
                   loss: LossSettings = DEFAULT_LOSS):  # fmt: skip
    """Sum of token NLL over supervised positions / num_items (the tokens of the whole
    accumulated batch, so gradient accumulation weighs every token alike)."""
    nll, count, outputs = supervised_nll(model, inputs, loss=loss)
    return nll / (num_items if num_items is not None else max(count, 1)), outputs


def say_kernel(model, loss: LossSettings) -> str:
    """One line for the log: which loss kernel training runs and why."""
    inner = unwrapped(model)
    head = inner.get_output_embeddings()
    if not accepts_logits_to_keep(inner) or head is None:
        return "loss: the model's own (its forward takes no logits_to_keep)"
    kernel = choose_kernel(model, loss, head)
    if kernel == "off":
        why = (
            "train.fused_loss=off"
            if loss.kernel == "off"
            else (
                "train.loss_chunk_tokens=0"
                if loss.chunk_tokens <= 0
                else "the model rescales its logits"
            )
        )
        return f"loss: whole-vocabulary logits at the supervised positions ({why})"
    if kernel == "chunked":
        return f"loss: output head and cross-entropy in chunks of {loss.chunk_tokens} positions"
    return f"loss: {EXTRAS[kernel][1]}'s fused linear cross-entropy"
