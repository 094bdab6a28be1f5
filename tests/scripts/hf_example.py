"""The README's Hugging Face example: a BatchNorm backbone frozen and put in eval before
trainer.train(), which the Trainer's model.train() at every step puts back in train
(transformers#24479): MG301, set by the Trainer."""

import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from modeguard.integrations.transformers import ModeGuardCallback


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.head(self.backbone(x))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def main():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = [{"x": row, "labels": int(row[0] > 0)} for row in x]
    model = Classifier()
    model.backbone.requires_grad_(False)  # fine-tune the head only ...
    model.backbone.eval()                 # ... with the backbone's statistics frozen
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=8, per_device_train_batch_size=16, report_to=[], save_strategy="no",
                                 use_cpu=True, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[ModeGuardCallback(fail_on="never")]).train()


if __name__ == "__main__":
    main()
