"""BINGO inside the trainers people already use.

- :mod:`bingo.integrations.lightning`: ``BingoCallback`` for Lightning
  (``pip install bingo-prune[lightning]``);
- :mod:`bingo.integrations.transformers`: ``BingoTrainerCallback`` for the
  Hugging Face ``Trainer`` (``pip install bingo-prune[transformers]``).

Both wrap one :class:`~bingo.integrations.session.PruneAfterTraining`: a
ticket search attached when training starts, stepped once per optimizer step,
checkpointed with the trainer's checkpoints, and a prune when training ends.
"""

from .session import PruneAfterTraining

__all__ = ["PruneAfterTraining"]
