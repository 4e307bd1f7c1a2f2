"""``python -m poolloader.bench``: poolloader against the stock torch DataLoader.

Every workload runs both loaders with the same dataset, sampler and
``num_workers``, alternating in one process tree, and reports ratios measured
in the same run; absolute times on a shared machine mean little.

``--peers`` runs some of the workloads with torchdata's and SPDL's loaders as
well, each checked to deliver torch's very batches, and prints one table.

Layout: ``_cli`` (command line, the run's sections, the results folder),
``_workloads`` (datasets and loader arguments), ``_runner`` (measuring),
``_peers`` (the other loaders and how each is built), ``_progress`` (progress
bar or plain lines), ``_report`` (tables, JSON, plot), ``_startup`` (start-up
timing in a fresh interpreter), ``_manifest`` (a 1M-record manifest through both
loaders, each figure from a fresh interpreter running ``_manifest_probe``).
``__main__`` only runs ``_cli.main``.
"""

from ._cli import main

__all__ = ["main"]
