"""``python -m poolloader.bench``: poolloader against the stock torch DataLoader.

Every workload runs both loaders with the same dataset, sampler and
``num_workers``, alternating in one process tree, and reports ratios measured
in the same run; absolute times on a shared machine mean little.
"""

from .__main__ import main

__all__ = ["main"]
