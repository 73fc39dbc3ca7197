"""The benchmark and experiment harness: datasets, model zoo, training loops, baselines, comparisons, reports, the CLI.

Beside the library, not part of it: ``import bingo`` never loads this
package, and only this package uses matplotlib, scikit-learn and tqdm. What
a user prunes with (search, scores, selection, masks, compensation, shrink,
export, the trainer integrations) is the core, :mod:`bingo`; the harness is
what measures it (``bingo compare``, ``benchmarks/``) and the ``bingo``
command.

- :mod:`bingo.bench.data`: datasets (digits, IDX, ``.npz``, Fashion-MNIST, MNIST)
- :mod:`bingo.bench.models`: the model zoo the CLI and benchmarks train
- :mod:`bingo.bench.training`: the training loop and ``evaluate``
- :mod:`bingo.bench.strategies`: BINGO and the baselines as comparable methods
- :mod:`bingo.bench.compare`, :mod:`bingo.bench.report`: ``bingo compare`` and its tables and plots
- :mod:`bingo.bench.configs`: config dataclasses as CLI flags
- :mod:`bingo.bench.model_file`: the ``--save`` file of ``bingo run`` and its export
- :mod:`bingo.bench.cli`: the ``bingo`` command
"""
