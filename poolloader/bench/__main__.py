"""``python -m poolloader.bench``: runs :func:`poolloader.bench.main`.

Nothing imports this module; the package and the console script take ``main``
from ``_cli``. A package that imports its own ``__main__`` makes ``python -m``
find the module already imported and warn (a RuntimeWarning) before running it.
"""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
