"""Imported by multiprocessing's fork server, which poolloader asks to preload
it: imports the main module there (NOTE [ The fork server's __main__ ] in
``_forkserver.py``). Anywhere else it does nothing."""

from ._forkserver import preload_main

preload_main()
