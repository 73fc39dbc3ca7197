"""BINGO in a Hugging Face ``Trainer`` on a GPT-2: ``BingoTrainerCallback`` searches, prunes and compensates.

    pip install "bingo-prune[transformers]"
    python examples/gpt2_trainer_callback.py          # about 20 s on 2 CPU cores

The same tiny GPT-2 and synthetic language as ``examples/gpt2_prune.py``
(whose helpers it imports), trained by ``transformers.Trainer`` instead of a
plain loop. ``BingoTrainerCallback`` attaches ``bingo``'s search when
training begins, steps it once per optimizer step (its fake passes re-run the
model on the last training batch, whose labels give the loss), and when
training ends prunes the model to 50% of the scored weights and compensates
it on the ``calibration`` sequences. A callback listed before it measures the
dense model at the end of training, before it is pruned.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from bingo.integrations.transformers import BingoTrainerCallback
from gpt2_prune import build_model, chain_perplexity, markov_chain, perplexity, sample_sequences


class Sequences(torch.utils.data.Dataset):
    """Token sequences as a causal language model trains on them: the labels are the inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class DensePerplexity(transformers.TrainerCallback):
    """Held-out perplexity of the model when training ends, before the callbacks after this one (the prune) run."""

    def __init__(self, held_out: torch.Tensor) -> None:
        self.held_out, self.value = held_out, None

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self.value = perplexity(model, self.held_out)


def run(steps: int = 300, seed: int = 0, sparsity: float = 0.5, layers: int = 2, width: int = 128, heads: int = 4,
        vocab: int = 16, order: int = 2, length: int = 32, batch_size: int = 16, lr: float = 3e-3,
        train_sequences: int = 4096, held_out_sequences: int = 512, calibration_sequences: int = 128) -> dict:
    """Train with the Trainer and the callback; returns the callback, the model and the numbers."""
    chain = markov_chain(vocab, order, seed=seed)
    train_tokens = sample_sequences(chain, train_sequences, length, seed=seed + 1)
    held_out = sample_sequences(chain, held_out_sequences, length, seed=seed + 2)
    model = build_model(vocab, length, layers, width, heads, seed=seed)
    dense = DensePerplexity(held_out)
    # compensation calls model(**calibration): the first calibration_sequences training sequences
    callback = BingoTrainerCallback(sparsity=sparsity, calibration={"input_ids": train_tokens[:calibration_sequences]})
    with tempfile.TemporaryDirectory(prefix="bingo-gpt2-trainer-") as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, weight_decay=0.0,
            lr_scheduler_type="constant", seed=seed, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(train_tokens), callbacks=[dense, callback])
        trainer.train()
    session = callback.session
    masks = session.masks
    return {
        "callback": callback,
        "model": model,
        "optimizer_steps": trainer.state.global_step,
        "search_steps": session.search.steps,
        "coverage": str(session.search.coverage()),
        "scored_sparsity": sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
        "best_possible": chain_perplexity(chain, held_out),
        "dense": dense.value,
        "compensated": perplexity(model, held_out),
        "layers": list(session.compensation.layers),
        "skipped": list(session.compensation.skipped),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    summary = run(steps=args.steps, seed=args.seed, sparsity=args.sparsity, width=args.width)
    print(summary["coverage"])
    print(f"re-fitted {', '.join(summary['layers']) or 'nothing'}; skipped {'; '.join(summary['skipped']) or 'nothing'}")
    print(f"search steps {summary['search_steps']} (= optimizer steps {summary['optimizer_steps']}); "
          f"pruned {summary['scored_sparsity']:.2f} of the scored weights, {len(summary['layers'])} layers re-fitted; "
          f"held-out perplexity dense {summary['dense']:.2f}, pruned and compensated {summary['compensated']:.2f}")
    return summary


if __name__ == "__main__":
    main()
