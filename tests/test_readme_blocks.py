"""Every other ```python block of the README runs as written, on tiny stand-ins for the reader's objects.

The README's snippets name objects the reader has (``model``, ``loader``,
``criterion``, ``opt``, ``x_train``, ...): each test builds small ones,
executes the block verbatim (a line that is only ``...`` -- "the same loop as
above" -- becomes the first block's training loop) and checks what the prose
around it promises. The custom estimator, the custom layer type and the
export blocks have their own tests (``test_readme.py``, ``test_layer_types.py``).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block(containing: str) -> str:
    """The one README python block that contains ``containing``, dedented."""
    found = [b for b in BLOCKS if containing in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {containing!r}"
    return textwrap.dedent(found[0])


def the_loop() -> str:
    """The first block's training loop (the lines from ``for x, y in loader:`` on, while indented)."""
    lines = block("search = bingo.TicketSearch(model, fraction=0.01").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("for x, y in loader:"))
    loop = [lines[start]] + [line for line in lines[start + 1:] if line.startswith("    ")]
    return "\n".join(loop)


def run(code: str, namespace: dict) -> dict:
    """Execute ``code`` in ``namespace``, each line that is only ``...`` (+ comment) replaced by the loop."""
    code = re.sub(r"^\.\.\.(\s+#.*)?$", lambda _: the_loop(), code, flags=re.M)
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def reader(seed: int = 0, steps: int = 24) -> dict:
    """What the README assumes the reader has: a model, a loader of (x, y), a loss, an optimizer, data splits."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4))
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps * 16 + 256, 16, generator=generator)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4  # learnable, not trivial
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, steps * 16, 16)]

    def accuracy(net, xs, ys):
        with torch.no_grad():
            return (net(xs).argmax(1) == ys).float().mean().item()

    return {"bingo": bingo, "torch": torch, "model": model, "loader": loader, "criterion": nn.CrossEntropyLoss(),
            "opt": torch.optim.Adam(model.parameters(), lr=1e-2), "x_train": x[: steps * 16], "x_val": x[-256:],
            "y_val": y[-256:], "accuracy": accuracy}


def pruned_fraction(masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m.bool()).sum()) for m in masks.values()) / total


def test_the_first_loop_searches_without_perturbing_training_and_prunes_exactly():
    plain = reader()
    exec(the_loop().replace("    search.step(x, y)", "    pass"), plain)
    ns = run(block("search = bingo.TicketSearch(model, fraction=0.01"), reader())
    trained = ns["model"].state_dict()  # pruned now: each weight is weight_orig (+ a mask)
    for key, value in plain["model"].state_dict().items():
        assert torch.equal(value, trained.get(key, trained.get(key + "_orig"))), key  # "left exactly as it was"
    assert set(ns["scores"]) == {"1.weight", "3.weight", "5.weight"}
    assert all(ns["scores"][k].shape == ns["model"].get_submodule(k[0]).weight.shape for k in ns["scores"])
    total = sum(m.numel() for m in ns["masks"].values())
    assert sum(int((~m).sum()) for m in ns["masks"].values()) == round(0.9 * total)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.mlp(torch.relu(self.attention(x)))


def test_block_scope_gives_each_block_its_own_sparsity():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Block(), Block()])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = Encoder(), nn.Linear(8, 3)

    torch.manual_seed(0)
    model = Net()
    # block 1 far larger in score than block 0: a global ranking would empty block 0
    scores = {f"encoder.layer.{i}.{part}.weight": torch.rand(8, 8) + 10 * i for i in (0, 1) for part in ("attention", "mlp")}
    ns = run(block('scope="block")'), {"bingo": bingo, "model": model, "scores": scores})
    for i in (0, 1):
        kept = [ns["masks"][f"encoder.layer.{i}.{part}.weight"] for part in ("attention", "mlp")]
        assert sum(int((~m).sum()) for m in kept) == round(0.8 * 128)


def test_compensated_bingo_block_refits_to_the_dense_outputs():
    import copy

    lines = block("bingo.compensate(model, masks, x_train[:1024])   # re-fit").splitlines()
    ns = run("\n".join(lines[:2]), reader(steps=60))  # the search and the loop
    dense = copy.deepcopy(ns["model"])
    ns = run("\n".join(lines[2:4]), ns)  # bingo_scores, prune
    uncompensated = copy.deepcopy(ns["model"])
    ns = run("\n".join(lines[4:]), ns)  # compensate
    assert pruned_fraction(ns["masks"]) == pytest.approx(0.9, abs=1e-3)
    for key, mask in ns["masks"].items():  # the masks hold through the re-fit
        assert torch.all(ns["model"].get_submodule(key.rsplit(".", 1)[0]).weight[~mask] == 0), key
    with torch.no_grad():
        target = dense(ns["x_val"])
        error = {name: F.mse_loss(net(ns["x_val"]), target).item() for name, net in (("after", ns["model"]), ("before", uncompensated))}
    assert error["after"] < error["before"]  # held-out inputs: nearer the dense outputs than the bare prune


def test_choose_magnitude_weight_block_judges_every_weight_and_keeps_the_best():
    ns = reader(steps=60)
    ns = run(block("search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH"), ns)
    ns = run(block("choice = bingo.choose_magnitude_weight("), ns)
    choice = ns["choice"]
    assert set(choice.judged) == set(bingo.BLEND_WEIGHTS)
    assert ns["chosen"] == max(choice.judged, key=lambda w: (choice.judged[w], w))
    assert ns["accuracy"](ns["pruned"], ns["x_val"], ns["y_val"]) == choice.judged[ns["chosen"]]
    assert pruned_fraction(choice.masks) == pytest.approx(0.9, abs=1e-3)


def test_the_closure_lines_search_a_two_input_and_a_dict_model():
    first, second = block("a two-input model").splitlines()

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(10, 8), nn.Linear(8, 3)

        def forward(self, tokens, mask):
            return self.out((self.embed(tokens) * mask[..., None]).mean(1))

    @dataclass
    class Output:
        loss: torch.Tensor

    class DictModel(TwoInputs):
        def forward(self, input_ids, attention_mask, labels):
            return Output(F.cross_entropy(super().forward(input_ids, attention_mask), labels))

    generator = torch.Generator().manual_seed(0)
    tokens, mask, y = torch.randint(0, 10, (16, 5), generator=generator), torch.ones(16, 5), torch.randint(0, 3, (16,), generator=generator)
    batch = {"input_ids": tokens, "attention_mask": mask, "labels": y}
    for line, model, loss in ((first, TwoInputs(), lambda m: F.cross_entropy(m(tokens, mask), y)),
                              (second, DictModel(), lambda m: m(**batch).loss)):
        search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, every=1, seed=0)
        loss(model).backward()  # the step of the loop the line sits in: the hybrid reads the gradients
        before = {k: v.clone() for k, v in model.state_dict().items()}
        run(line, {"search": search, "criterion": nn.CrossEntropyLoss(), "tokens": tokens, "mask": mask, "y": y,
                   "batch": batch})
        assert search.steps == 1, line
        assert all(torch.isfinite(s).all() and s.max() > s.min() for s in search.significance().values()), line
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), line


def test_two_four_block_prunes_and_refits_in_the_pattern_on_the_cpu():
    lines = block('sparsity="2:4"').splitlines()
    ns = reader(steps=30)
    exec(the_loop().replace("    search.step(x, y)", "    pass"), ns)
    ns["scores"] = bingo.magnitude_scores(ns["model"])
    run("\n".join(lines[:2]), ns)  # the rest needs CUDA: test_two_four_block_runs_whole_on_a_gpu
    for key, mask in ns["masks"].items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2), key
        weight = ns["model"].get_submodule(key.rsplit(".", 1)[0]).weight
        assert torch.all(weight[~mask] == 0), key


@pytest.mark.cuda
def test_two_four_block_runs_whole_on_a_gpu():
    ns = reader(steps=30)
    ns["model"] = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    ns["x_train"] = torch.randn(256, 64)
    ns["scores"] = bingo.magnitude_scores(ns["model"])
    run(block('sparsity="2:4"'), ns)
    assert ns["model"](torch.randn(32, 64, device="cuda", dtype=torch.half)).shape == (32, 64)


def test_the_integrations_block_prunes_with_lightning_and_the_hugging_face_trainer(tmp_path, monkeypatch):
    lightning = pytest.importorskip("lightning")
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    code = block("BingoCallback(")
    lightning_part, hf_part = code.split("\n\n", 1)
    ns = reader(steps=8)

    class Module(lightning.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):  # compensation calls the module on the calibration inputs
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    x, y = ns["x_train"], torch.randint(0, 4, (len(ns["x_train"]),))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = Module(ns["model"])
    run(lightning_part, {"lightning": lightning, "module": module, "train_loader": loader, "x_train": x})
    assert pruned_fraction({k: v for k, v in module.net.state_dict().items() if k.endswith("weight_mask")}) == pytest.approx(0.9, abs=1e-3)

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=generator), "labels": torch.tensor(i % 2)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=1, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    run(hf_part, {"transformers": transformers, "model": model, "args": args, "data": data})
    masks = {k: v for k, v in model.state_dict().items() if k.endswith("weight_mask")}
    assert masks and pruned_fraction(masks) == pytest.approx(0.5, abs=1e-3)


def test_the_ddp_block_prunes_and_compensates_in_one_process():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ns = reader(steps=30)
        ns.update(net=ns["model"], DistributedDataParallel=DistributedDataParallel, my_calibration_shard=ns["x_train"][:256])
        ns["opt"] = torch.optim.Adam(ns["net"].parameters(), lr=1e-2)
        ns = run(block("DistributedDataParallel(net)"), ns)
        assert ns["search"].steps == 30
        assert pruned_fraction(ns["masks"]) == pytest.approx(0.9, abs=1e-3)
        for key, mask in ns["masks"].items():
            assert torch.all(ns["net"].get_submodule(key.rsplit(".", 1)[0]).weight[~mask] == 0), key
    finally:
        dist.destroy_process_group()


def test_the_compensation_blocks_report_per_layer_errors_and_the_solver(capsys):
    ns = reader(steps=60)
    exec(the_loop().replace("    search.step(x, y)", "    pass"), ns)
    ns["scores"] = bingo.magnitude_scores(ns["model"])
    ns = run(block("print(result.error_before, result.error_after)"), ns)
    result = ns["result"]
    assert set(result.error_before) == set(result.error_after) == set(ns["masks"])
    assert all(result.error_after[k] <= result.error_before[k] for k in result.error_before)  # least squares never loses
    ns["calibration"] = ns["x_train"][:512]
    ns = run(block('solver="auto"'), ns)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and str(ns["result"].forward_passes) in out[1]


def test_the_gradual_block_reaches_its_final_sparsity_with_growing_masks():
    ns = reader(steps=720)
    ns = run(block("bingo.SparsityScheduler("), ns)
    masks = {k: v for k, v in ns["model"].state_dict().items() if k.endswith("weight_mask")}
    assert pruned_fraction(masks) == pytest.approx(0.9, abs=1e-3)
    assert ns["scheduler"].state_dict()  # an LR-scheduler-shaped piece: it checkpoints
