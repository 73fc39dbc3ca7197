"""Every script in examples/ runs as a user would run it (a smoke test: exit 0 and its summary line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
#: script -> what its last line must say
EXAMPLES = {
    "plain_loop.py": r"^dense 0\.\d{3}; 80% pruned 0\.\d{3}; compensated 0\.\d{3}; sparsity 0\.800$",
    "two_inputs.py": r"^pruned to 0\.70 sparsity; training accuracy 0\.\d{3}$",
    "transformer_encoder.py": r"^q/k/v of layer 0 kept 0\.\d\d; pruned to 0\.70 of scored weights; training accuracy dense 0\.\d{3}, pruned 0\.\d{3}, fine-tuned 0\.\d{3}$",
    "lightning_callback.py": r"^search steps (\d+) \(= optimizer steps \1\); pruned test accuracy 0\.\d{3}$",
    "huggingface_trainer.py": r"^search steps \d+; \d+ weight tensors scored \(e\.g\. bert\.encoder\.layer\.0\.attention\.self\.query\.weight\); pruned [\d,]+ weights$",
    "gpt2_prune.py": r"^perplexity dense \d+\.\d\d; 50% pruned \d+\.\d\d, compensated \d+\.\d\d; 80% pruned \d+\.\d\d, compensated \d+\.\d\d$",
    "gpt2_trainer_callback.py": r"^search steps (\d+) \(= optimizer steps \1\); pruned 0\.50 of the scored weights, 8 layers re-fitted; held-out perplexity dense \d+\.\d\d, pruned and compensated \d+\.\d\d$",
    "conv1d_sequence.py": r"^accuracy dense 0\.\d{3}; 50% pruned 0\.\d{3}, compensated 0\.\d{3}; 80% pruned 0\.\d{3}, compensated 0\.\d{3}; filters halved and shrunk 0\.\d{3}$",
}


def test_every_example_is_listed():
    assert sorted(EXAMPLES) == sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    if script.startswith("lightning"):
        pytest.importorskip("lightning")
    if script.startswith("huggingface"):
        pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.match(EXAMPLES[script], last), last
    assert list(tmp_path.iterdir()) == []  # nothing written where it was run
