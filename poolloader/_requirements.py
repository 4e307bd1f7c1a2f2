"""The oldest torch poolloader runs on, checked once when the package is imported.

NOTE [ Oldest torch ]
~~~~~~~~~~~~~~~~~~~~~
torch 2.6 is the first release with everything poolloader calls; 2.5 lacks two:

* ``torch.utils.data.DataLoader(..., in_order=...)``: ``loader.py`` passes it to
  torch's constructor and the pool iterator reads ``loader.in_order``. Added in
  2.6 (pytorch#141833); torch 2.5's constructor refuses the keyword.
* ``torch.accelerator.current_device_index`` / ``set_device_index``: the pinning
  thread (``_pin_memory.py``) follows the consumer's device with them. The module
  and these names are new in 2.6 (pytorch#132204, pytorch#143186); 2.5 has no
  ``torch.accelerator``.

Everything else poolloader takes from torch, private names included, is in
2.5.1 already: ``collate(..., collate_fn_map=...)``, ``collate_tensor_fn`` and
``default_collate_fn_map``; ``_DatasetKind.create_fetcher``,
``_BaseDataLoaderIter`` and ``_SingleProcessDataLoaderIter`` with
``_pin_memory_device``; ``pin_memory(data, device)``;
``_utils.worker._generate_state`` and ``WorkerInfo``;
``signal_handling._set_worker_signal_handlers``; ``torch.frombuffer`` and
``Tensor.is_nested``. Checked against the sources of the 2.5.1 and 2.6.0 wheels.

Without this check a user on torch 2.5 installs cleanly and meets a TypeError
about ``in_order`` at the first ``DataLoader(...)``; with it the import says
what is wrong and how to fix it.
"""

from __future__ import annotations

import torch
from packaging.version import InvalidVersion, Version

#: The oldest torch release poolloader supports (NOTE [ Oldest torch ]); keep
#: ``install_requires`` in setup.cfg at the same floor.
OLDEST_TORCH = (2, 6)


def torch_too_old(version: str) -> bool:
    """Whether a torch version string (``torch.__version__``) is below the floor.

    Pre-releases and local builds of the floor release (``2.6.0a0+git…``,
    ``2.6.0+cpu``) count as that release; a string that is not a version does
    not fail the import (a source build may report anything)."""
    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    return release[:2] < OLDEST_TORCH


def check_torch() -> None:
    """Raise ImportError when the installed torch is older than :data:`OLDEST_TORCH`."""
    if torch_too_old(torch.__version__):
        floor = ".".join(map(str, OLDEST_TORCH))
        raise ImportError(
            f"poolloader needs torch>={floor} (DataLoader's in_order= and torch.accelerator "
            f"first appear there), but found torch {torch.__version__} in "
            f"{torch.__file__}; upgrade it with: pip install 'torch>={floor},<3'"
        )


check_torch()
