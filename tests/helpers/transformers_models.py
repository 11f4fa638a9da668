"""Tiny ``transformers`` models, random token data and fast CPU ``TrainingArguments``.

Every model is built from a config with random weights (nothing is downloaded): a BERT sequence
classifier, a GPT-2 language model, and a BERT with an auxiliary head whose output is detached by
mistake. :class:`NanLossTrainer` makes the loss NaN at one optimizer step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

VOCAB = 64
SEQUENCE = 12


def bert_config(**overrides: Any) -> BertConfig:
    options: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
        "num_labels": 2,
        **overrides,
    }
    return BertConfig(**options)


def tiny_bert(**overrides: Any) -> BertForSequenceClassification:
    """A one-layer BERT sequence classifier (hidden size 16, two labels), random weights."""
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(**overrides))


def tiny_gpt2(**overrides: Any) -> GPT2LMHeadModel:
    """A one-layer GPT-2 language model (hidden size 16, tied embeddings), random weights."""
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "vocab_size": VOCAB,
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **overrides,
    }
    model = GPT2LMHeadModel(GPT2Config(**options))
    model.loss_type = "ForCausalLM"  # transformers cannot tell it from the class name
    return model


class BertWithAuxHead(nn.Module):
    """A BERT classifier with an auxiliary regression head (sequence length from the pooled
    output), weighted into the loss. The bug: the auxiliary head's output is detached, as in
    code copied from an inference path, so the head never receives a gradient and never trains,
    while the loss looks normal."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = bert_config()
        self.bert = BertModel(self.config)
        self.classifier = nn.Linear(self.config.hidden_size, 2)
        self.aux_head = nn.Linear(self.config.hidden_size, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        logits = self.classifier(pooled)
        length = self.aux_head(pooled).detach().squeeze(-1)  # the bug
        outputs = {"logits": logits}
        if labels is not None:
            target = attention_mask.sum(dim=1).to(length.dtype) / attention_mask.shape[1]
            outputs["loss"] = nn.functional.cross_entropy(
                logits, labels
            ) + 0.1 * nn.functional.mse_loss(length, target)
        return outputs


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``size`` random sequences as the Trainer's default collator expects them.

    ``task="classification"``: ``labels`` is one class per sequence (the parity of its first
    token, so there is something to learn); ``task="lm"``: ``labels`` are the input ids.
    """

    def __init__(
        self, size: int = 64, *, task: str = "classification", seed: int = 0, length: int = SEQUENCE
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (size, length), generator=generator)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask[:, -2:] = torch.randint(0, 2, (size, 2), generator=generator)
        self.task = task

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        labels = ids.clone() if self.task == "lm" else ids[0] % 2
        return {"input_ids": ids, "attention_mask": self.attention_mask[index], "labels": labels}


def training_args(output_dir: str | os.PathLike[str], **overrides: Any) -> TrainingArguments:
    """Arguments for a few fast CPU steps: no checkpoints, no logging, no progress bar."""
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**options)


class NanLossTrainer(Trainer):
    """A ``Trainer`` whose loss is NaN at optimizer step ``nan_at`` (every micro-batch of it),
    on rank ``nan_rank`` only when that is given."""

    def __init__(self, *args: Any, nan_at: int, nan_rank: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.nan_at = nan_at
        self.nan_rank = nan_rank

    def compute_loss(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        on_rank = self.nan_rank is None or self.args.process_index == self.nan_rank
        if on_rank and self.state.global_step == self.nan_at:
            loss = loss * torch.tensor(float("nan"))
        return loss
