"""Ready-made callbacks for the training frameworks: one line in a trainer's callbacks.

- ``modeguard.integrations.lightning.ModeGuardCallback``: a PyTorch Lightning ``Callback``
  (``lightning`` or ``pytorch_lightning``, whichever is installed).
- ``modeguard.integrations.transformers.ModeGuardCallback``: a Hugging Face
  ``TrainerCallback``.

Each module imports its framework when it is imported itself; modeguard never requires
one. Both share ``_session.CallbackSession``: watching at the start of training, the
report at the end, ``fail_on``.
"""
