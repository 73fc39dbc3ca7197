"""BINGO in a Hugging Face Trainer: a small BERT-style classifier built from a config (no download).

    pip install "bingo-prune[transformers]"
    python examples/huggingface_trainer.py
"""

import tempfile

import torch
import transformers

from bingo.integrations.transformers import BingoTrainerCallback

torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32, num_labels=2)
model = transformers.BertForSequenceClassification(config)


class Parity(torch.utils.data.Dataset):
    """Token sequences labelled by whether token 7 occurs in them."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 100, (n, 16), generator=generator)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": self.labels[i]}


callback = BingoTrainerCallback(sparsity=0.5)  # fake passes re-run the model on its last training batch (with labels)
args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bingo-hf-example-"), per_device_train_batch_size=16, num_train_epochs=2,
                                      report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=Parity(256), callbacks=[callback])
trainer.train()
scored = list(callback.session.search.layers)
print(f"search steps {callback.session.search.steps}; {len(scored)} weight tensors scored "
      f"(e.g. {scored[0]}); pruned {sum(int((~m).sum()) for m in callback.session.masks.values()):,} weights")
