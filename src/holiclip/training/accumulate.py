"""Gradient accumulation with cached features: k micro-batches of B train as one batch of k x B.

A contrastive loss is not a sum over samples: every sample's loss depends on the whole batch
(its negatives), so averaging k micro-batch losses trains with B negatives, not k x B. As
open_clip's ``--accum-freq``, :func:`backward_as_one_batch` first runs the model on all k
micro-batches without gradients and keeps their outputs (the features, a few floats per
sample), then for each micro-batch j runs it again with gradients, puts its outputs in place of
the cached ones and backpropagates the loss of the whole k x B batch. Pass j carries the
gradient through micro-batch j's outputs only, so the k backward passes sum to the gradient of
one k x B batch, while only one micro-batch's activations are alive at a time.

Beyond open_clip: outputs shared by the whole batch (0-dim tensors: the logit scale) keep their
gradient in the last pass only (open_clip counts it k times); each recompute replays the random
state its cached forward started from (a trainable tower with dropout gives the same outputs
twice); the loss is returned once per step (the trainer checks it on the device).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch

Outputs = dict[str, torch.Tensor]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def splice(cached: Sequence[Outputs], j: int, fresh: Outputs, shared_grad: bool) -> Outputs:
    """The k x B batch's outputs with micro-batch j's ``fresh`` (with gradients) in place of its
    cached ones. Tensors with a batch dimension are concatenated in micro-batch order; 0-dim
    tensors are shared by the batch and taken from ``fresh``, detached unless ``shared_grad``."""
    out = {}
    for key, value in fresh.items():
        if value.dim() == 0:
            out[key] = value if shared_grad else value.detach()
        else:
            out[key] = torch.cat([c[key] for c in cached[:j]] + [value] + [c[key] for c in cached[j + 1:]])
    return out


def backward_as_one_batch(
    micro_batches: Sequence,
    forward: Callable[[object], Outputs],
    loss: Callable[[Outputs], dict[str, torch.Tensor]],
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], ContextManager] = nullcontext,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Accumulates into ``.grad`` the gradient of ``loss`` on all ``micro_batches`` as one batch.

    ``forward(batch)`` gives the model outputs the loss takes (per-sample tensors with the batch
    first, 0-dim shared ones); ``loss(outputs)`` the named terms, which sum to the total;
    ``backward(total)`` backpropagates it (a grad scaler goes there); ``no_sync()`` is entered
    around every pass but the last (DDP's ``no_sync``: one gradient all-reduce per step). Returns
    the whole batch's loss terms, detached.
    """
    if len(micro_batches) < 2:
        raise ValueError(f"backward_as_one_batch needs 2 or more micro-batches, got {len(micro_batches)}")
    device = torch.device(device)
    states, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state(device))
            cached.append({k: v for k, v in forward(batch).items() if v.dim() > 0})
    after = _rng_state(device)
    last = len(micro_batches) - 1
    for j, batch in enumerate(micro_batches):
        _set_rng_state(states[j], device)
        # DDP decides in forward whether the backward all-reduces: both go inside no_sync
        with nullcontext() if j == last else no_sync():
            terms = loss(splice(cached, j, forward(batch), shared_grad=j == last))
            backward(sum(terms.values()))
    _set_rng_state(after, device)  # the stream continues as after the k cached forwards
    return {k: v.detach() for k, v in terms.items()}
