"""The README's Lightning example: a callback that looks at the backbone's features puts
it in eval and never puts it back (MG101 at every step)."""

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from modeguard.integrations.lightning import ModeGuardCallback


class LitClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FeatureStats(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.backbone.eval()  # to look at the features ... and never put back


def main():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    trainer = pl.Trainer(max_epochs=2, callbacks=[ModeGuardCallback(fail_on="never"), FeatureStats()],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(LitClassifier(), DataLoader(TensorDataset(x, y), batch_size=16))


if __name__ == "__main__":
    main()
