"""Fine-tuning a GPT-2 classifier with ``transformers.Trainer`` whose backbone never learns.

The backbone runs under ``torch.no_grad()``, as in feature-extraction code copied into a
fine-tuning script: only the head trains, and the loss still goes down a little. gradwatch's
callback reports ``no_grad`` within a few steps, naming the backbone's parameters. The model is a
tiny GPT-2 built from a config (random weights, nothing downloaded), the data random tokens.

python examples/transformers_trainer.py
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, Trainer, TrainingArguments

from gradwatch.transformers import GradWatchCallback


class GPT2Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.backbone = GPT2Model(config)
        self.head = nn.Linear(config.n_embd, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # the bug. The fix: no torch.no_grad() here.
            hidden = self.backbone(input_ids=input_ids).last_hidden_state
        logits = self.head(hidden[:, -1])
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, size: int = 256) -> None:
        self.input_ids = torch.randint(0, 64, (size, 16))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "labels": ids[-1] % 2}


torch.manual_seed(0)
callback = GradWatchCallback(on_finding="record")
arguments = TrainingArguments(
    output_dir="runs/transformers_trainer",
    use_cpu=True,
    max_steps=8,
    per_device_train_batch_size=16,
    report_to=["tensorboard"],
    logging_steps=4,
    save_strategy="no",
    disable_tqdm=True,
)
trainer = Trainer(
    model=GPT2Classifier(),
    args=arguments,
    train_dataset=RandomTokens(),
    callbacks=[callback],
)
trainer.train()

print(callback.summary())
print(f"TensorBoard: tensorboard --logdir {callback.output_dir}")
