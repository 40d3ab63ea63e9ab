"""The SFT loss with vocabulary logits computed only where a target token is predicted.

An aggregation example is mostly prompt (the question and K proposals, ~80% of its tokens) and
the loss covers only the target. The standard causal-LM loss still projects every position onto
the vocabulary: for the default model that projection is a quarter of the forward compute, and its
float32 logits (0.6 MB per token for 151,936 tokens) ran a batch of four ~1,500-token examples out
of 24 GB. Passing ``logits_to_keep`` (the positions whose next token is a target, across the
batch) to the model computes the same loss on those positions only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["target_positions", "target_loss", "target_logits_trainer"]


def target_positions(labels: Any) -> Any:
    """Sequence positions whose next token has a label in any row of the batch (a 1-D tensor)."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(-1)


def target_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """Cross-entropy over the target tokens, summed and divided by ``num_items_in_batch`` (the
    Trainer's token count over a whole accumulated step) or, without it, by this batch's count:
    the value the model's own loss gives, without the logits of prompt positions.

    Returns:
        The loss and the model's outputs (their logits cover the target positions only).
    """
    import torch

    labels = inputs["labels"]
    keep = target_positions(labels)
    outputs = model(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=keep
    )
    logits = outputs.logits.float()
    targets = labels[:, 1:][:, keep]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
    return total / count, outputs


def target_logits_trainer() -> type:
    """transformers' ``Trainer`` with :func:`target_loss` as its loss (imported lazily)."""
    from transformers import Trainer

    class TargetLogitsTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Normalize as Trainer does: by the accumulated step's token count when the model takes
            # loss kwargs (Trainer then does not divide by the accumulation steps), else per batch.
            given = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss, outputs = target_loss(model, inputs, given)
            if given is not None and self.args.average_tokens_across_devices:
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp)
            return (loss, outputs) if return_outputs else loss

    return TargetLogitsTrainer
