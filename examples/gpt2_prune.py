"""BINGO on a GPT-2: search while training, prune 50% and 80%, compensate, held-out perplexity.

    pip install "bingo-prune[transformers]"
    python examples/gpt2_prune.py                      # about 20 s on 2 CPU cores
    python examples/gpt2_prune.py --steps 1000 --json gpt2.json

A tiny GPT-2 (``transformers.GPT2LMHeadModel`` built from a config, no
download) learns a synthetic language: sequences of 16 kinds of token drawn
from a fixed random second-order Markov chain (after every pair of tokens, 4
possible next ones, with random probabilities), so the best possible
perplexity is known (about 3.2) and far below the uniform one (16), and
predicting it takes attention (the token two places back matters).

It trains a few hundred AdamW steps in a plain loop with ``bingo``'s ticket
search attached through a closure. Then, for each target sparsity, a copy of
the trained model is pruned by the search's significance blended with
magnitude, and its survivors are re-fitted on training sequences
(``bingo.compensate`` with ``{"input_ids": ...}`` calibration inputs, called
as ``model(**calibration)``). It prints the held-out perplexity dense, pruned
and compensated, what the search scored (``search.coverage()``) and what
compensation re-fitted and skipped.

GPT-2's blocks are ``transformers.pytorch_utils.Conv1D`` layers (an affine
map whose weight is stored ``in × out``): the default search scores all of
them. Its output layer ``lm_head`` shares its weight with the token
embedding ``transformer.wte``: one tied matrix, left out by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import transformers

import bingo

SPARSITIES = (0.5, 0.8)


def markov_chain(vocab: int, order: int = 2, successors: int = 4, seed: int = 0) -> torch.Tensor:
    """Transition probabilities ``(vocab ** order, vocab)`` of an order-``order`` Markov chain.

    Every context (the last ``order`` tokens) has ``successors`` possible next
    tokens, with Dirichlet(1) weights. An order of 2 or more takes attention
    to learn: the next token depends on the one two places back.
    """
    generator = torch.Generator().manual_seed(seed)
    chain = torch.zeros(vocab**order, vocab)
    for context in range(vocab**order):
        nxt = torch.randperm(vocab, generator=generator)[:successors]
        weights = -torch.rand(successors, generator=generator).clamp_min(1e-6).log()  # Exp(1), normalised: Dirichlet(1)
        chain[context, nxt] = weights / weights.sum()
    return chain


def _order(chain: torch.Tensor) -> int:
    return round(math.log(len(chain)) / math.log(chain.shape[1]))


def _contexts(chain: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Row of ``chain`` for every position from ``order`` onwards: the context of the token that follows it."""
    order, vocab = _order(chain), chain.shape[1]
    index = torch.zeros(tokens.shape[0], tokens.shape[1] - order + 1, dtype=torch.long)
    for k in range(order):
        index = index * vocab + tokens[:, k : tokens.shape[1] - order + 1 + k]
    return index


def sample_sequences(chain: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens (int64): ``order`` uniform tokens, then the chain."""
    generator = torch.Generator().manual_seed(seed)
    order, vocab = _order(chain), chain.shape[1]
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, :order] = torch.randint(vocab, (n, order), generator=generator)
    for t in range(order, length):
        context = _contexts(chain, tokens[:, t - order : t])[:, 0]
        tokens[:, t] = torch.multinomial(chain[context], 1, generator=generator)[:, 0]
    return tokens


def chain_perplexity(chain: torch.Tensor, tokens: torch.Tensor) -> float:
    """The perplexity of the best possible predictor on ``tokens``' predicted positions.

    Uniform for the first ``order - 1`` predicted tokens (their context is
    not complete yet), the chain itself after that.
    """
    order, vocab = _order(chain), chain.shape[1]
    known = chain[_contexts(chain, tokens)[:, :-1], tokens[:, order:]].log()
    nll = -known.sum() + (order - 1) * len(tokens) * math.log(vocab)
    return math.exp(float(nll) / (len(tokens) * (tokens.shape[1] - 1)))


def build_model(vocab: int, length: int, layers: int = 2, width: int = 128, heads: int = 4, seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A GPT-2 built from a config (no dropout, so a run is deterministic), weights seeded."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers, n_head=heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> float:
    """``exp`` of the mean next-token cross-entropy on ``tokens`` (every batch the same number of positions)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in tokens.split(batch_size):
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
        count += len(batch)
    model.train(was_training)
    return math.exp(total / count)


def train(model: torch.nn.Module, tokens: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> tuple[bingo.TicketSearch, dict]:
    """``steps`` AdamW steps on random batches of ``tokens`` with bingo's search attached; returns it and what it cost."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=seed)
    forwards = [0]  # every call of the model: the training steps' and the search's fake passes
    counter = model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(len(tokens), (batch_size,), generator=generator)
        batch = {"input_ids": tokens[rows], "labels": tokens[rows]}  # GPT-2 shifts the labels itself
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        search.step(lambda m: m(**batch).loss)  # after optimizer.step(), before the next zero_grad()
    seconds = time.perf_counter() - start
    counter.remove()
    return search, {"train_seconds": seconds, "search_seconds": search.seconds, "fake_passes": forwards[0] - steps}


def prune_and_compensate(model: torch.nn.Module, scores: dict, sparsity: float, calibration: dict, held_out: torch.Tensor,
                         validation: torch.Tensor) -> dict:
    """Prune a copy of ``model`` to ``sparsity`` of the scored weights, then compensate it; perplexity after each.

    Compensation is guarded by the validation split's loss (``evaluate=``): the
    re-fit aims at the dense network's outputs, and where the pruned model
    already does better than that (a light prune can), it is undone.
    """
    pruned = copy.deepcopy(model)  # the tie between lm_head and wte survives deepcopy
    masks = bingo.prune(pruned, scores, sparsity=sparsity)
    removed = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    before = perplexity(pruned, held_out)
    result = bingo.compensate(pruned, masks, calibration, evaluate=lambda m: -math.log(perplexity(m, validation)))
    return {
        "sparsity": sparsity,
        "scored_sparsity": removed,
        "pruned": before,
        "compensated": perplexity(pruned, held_out),
        "layers": list(result.layers),
        "skipped": list(result.skipped),
        "undone": result.undone,
        "calibration_forwards": result.forward_passes,
        "compensation_seconds": result.seconds,
    }


def run(steps: int = 300, seed: int = 0, layers: int = 2, width: int = 128, heads: int = 4, vocab: int = 16, order: int = 2,
        length: int = 32, batch_size: int = 16, lr: float = 3e-3, train_sequences: int = 4096, held_out_sequences: int = 512,
        calibration_sequences: int = 128, sparsities: tuple[float, ...] = SPARSITIES) -> dict:
    """Train, search, prune and compensate one GPT-2; everything the example prints, as a dict."""
    chain = markov_chain(vocab, order, seed=seed)
    train_tokens = sample_sequences(chain, train_sequences, length, seed=seed + 1)
    held_out = sample_sequences(chain, held_out_sequences, length, seed=seed + 2)
    validation = sample_sequences(chain, held_out_sequences // 2, length, seed=seed + 3)  # guards compensation; held_out reports
    model = build_model(vocab, length, layers, width, heads, seed=seed)
    search, cost = train(model, train_tokens, steps, batch_size, lr, seed)
    # The default ranking of `bingo`: the search's estimate blended with magnitude, over the same weights.
    scores = bingo.bingo_scores(search, model)
    calibration = {"input_ids": train_tokens[:calibration_sequences]}  # compensate calls model(**calibration)
    results = [prune_and_compensate(model, scores, s, calibration, held_out, validation) for s in sparsities]
    return {
        "settings": {"steps": steps, "seed": seed, "layers": layers, "width": width, "heads": heads, "vocab": vocab,
                     "order": order, "length": length, "batch_size": batch_size, "lr": lr, "train_sequences": train_sequences,
                     "held_out_sequences": held_out_sequences, "calibration_sequences": calibration_sequences},
        "parameters": sum(p.numel() for p in model.parameters()),
        "coverage": str(search.coverage()),
        "scored": list(search.layers),
        "train_steps": search.steps,
        **cost,
        "uniform": float(vocab),
        "best_possible": chain_perplexity(chain, held_out),
        "dense": perplexity(model, held_out),
        "results": results,
    }


def report(summary: dict) -> str:
    """The printed summary: coverage, the perplexities, and what compensation re-fitted and skipped."""
    s = summary["settings"]
    lines = [
        f"GPT-2, {s['layers']} layers of width {s['width']}: {summary['parameters']:,} parameters; "
        f"{summary['train_steps']} training steps in {summary['train_seconds']:.1f} s "
        f"(search {summary['search_seconds']:.1f} s, {summary['fake_passes']} fake passes)",
        summary["coverage"],
        f"held-out perplexity: uniform {summary['uniform']:.1f}, the chain itself {summary['best_possible']:.2f}, dense {summary['dense']:.2f}",
        "sparsity  pruned  compensated  re-fitted  skipped  calibration forwards",
    ]
    for r in summary["results"]:
        lines.append(f"{r['sparsity']:8.2f}  {r['pruned']:6.2f}  {r['compensated']:11.2f}  {len(r['layers']):9d}  "
                     f"{len(r['skipped']):7d}  {r['calibration_forwards']:20d}")
    for r in summary["results"]:
        lines.append(f"at {r['sparsity']:.0%}: re-fitted {', '.join(r['layers']) or 'nothing'}; skipped {'; '.join(r['skipped']) or 'nothing'}")
    lines.append(f"perplexity dense {summary['dense']:.2f}; " + "; ".join(
        f"{r['sparsity']:.0%} pruned {r['pruned']:.2f}, compensated {r['compensated']:.2f}" for r in summary["results"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-sequences", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=16, help="kinds of token (default 16)")
    parser.add_argument("--order", type=int, default=2, help="order of the Markov chain (default 2)")
    parser.add_argument("--calibration-sequences", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    summary = run(steps=args.steps, seed=args.seed, layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab,
                  order=args.order, batch_size=args.batch_size, train_sequences=args.train_sequences,
                  calibration_sequences=args.calibration_sequences)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
