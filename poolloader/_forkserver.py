"""Starting multiprocessing's fork server with the main module preloaded.

NOTE [ The fork server's __main__ ]: with ``forkserver``, each loader's
template process is forked from multiprocessing's fork server, which poolloader
asks to preload ``__main__`` (and its own template module), so that a template
starts with everything the user's script imports. Before Python 3.13.8
(CPython gh-126631) that request never reached the server: it looked for a
``main_path`` that ``spawn.get_preparation_data`` no longer gives. Each process
forked from the server then ran the main script again, as spawn does: every new
loader's template imported all the script imports (seconds, for a script that
imports Lightning), however warm the server was.

So the server also preloads :mod:`poolloader._forkserver_main`, which does what
the fixed versions do: it imports the main module as ``__mp_main__`` with the
script's ``sys.argv``, ``sys.path`` and working directory, which the main process
puts in the environment variable :data:`MAIN_ENV` while it starts the server
(the server pops it: the processes it forks do not see it). The processes
forked from the server then find the main module there and skip it. Where that
import fails (a script without a main guard), nothing is preloaded and each
forked process imports the script itself and reports what fails, as before.

What the script's top level does then happens in the server, once, and every
process forked from it inherits it, as with Python's own preloading: threads it
starts do not exist in them, and CUDA it initialises cannot be used there. The
server warns on standard error when the import leaves either behind; such code
belongs under the script's ``if __name__ == "__main__":``, where spawn's workers
do not run it either.

NOTE [ A forked child's fork server ]: a process made by ``os.fork()`` (a
launcher that forks, Lightning's ``ddp_fork``) inherits multiprocessing's record
of its parent's fork server, which is not its child: multiprocessing's check that
the server still runs (``waitpid``) then fails, and so did every forkserver loader
iterated there, with ``ChildProcessError``, once the parent had iterated one. The
child now forgets the parent's server (closing its copy of the descriptor that
keeps it alive, so the server still exits with the parent) and starts its own
when needed. It forgets the parent's temporary directory too, where its server's
socket would go: the parent removes that directory when it exits, and a child
that outlived it failed to start a server with ``FileNotFoundError``.
"""

from __future__ import annotations

import json
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.spawn
import os
import sys
import threading
import warnings
from typing import Any

from ._startup import collector_held
from ._threads import inherited_signal_mask

#: The environment variable that carries the main module to the fork server.
MAIN_ENV = "POOLLOADER_FORKSERVER_MAIN"

_starting = threading.Lock()  # one start at a time sets and clears MAIN_ENV


def start_forkserver() -> None:
    """Start multiprocessing's fork server unless it runs, with the main module
    to preload (NOTE [ The fork server's __main__ ]), without waiting for what it
    preloads. If that fails, starting a process through it fails the same way
    and reports it. Not while this process imports its main module as a child
    of another (a script without a main guard): the start that follows fails
    with multiprocessing's error for that, and a server started meanwhile would
    be left to the process that forked this one."""
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        return
    main = _main_module()
    with _starting:
        if main is not None:
            os.environ[MAIN_ENV] = json.dumps(main)
        try:
            with inherited_signal_mask():  # NOTE [ Signals go to the main thread ]
                multiprocessing.forkserver.ensure_running()
        except Exception:
            pass
        finally:
            os.environ.pop(MAIN_ENV, None)


def _main_module() -> dict[str, Any] | None:
    """What a spawned process is told about the main module (by name or by path),
    with ``sys.argv``, ``sys.path`` and the working directory; ``None`` where there
    is no main module to import (an interactive session)."""
    data = multiprocessing.spawn.get_preparation_data("poolloader-forkserver")
    name, path = data.get("init_main_from_name"), data.get("init_main_from_path")
    if name is None and path is None:
        return None
    found = {
        "name": name,
        "path": path,
        "argv": data.get("sys_argv"),
        "sys_path": data.get("sys_path"),
        "dir": data.get("dir"),
    }
    try:
        json.dumps(found)
    except (TypeError, ValueError):  # a path that is not text: leave it to each process
        return None
    return found


def preload_main() -> None:
    """In the fork server: import the main module as ``__mp_main__`` (NOTE [ The
    fork server's __main__ ]); nothing where :data:`MAIN_ENV` is not set. Never
    raises: an exception other than ImportError would end the server (Python
    3.11's preloading catches only that), and every start through it with it."""
    raw = os.environ.pop(MAIN_ENV, None)
    if not raw:
        return
    try:
        main = json.loads(raw)
        with collector_held():  # NOTE [ Imports without the collector ] in _startup.py
            ran = _preload(main["name"], main["path"], main["argv"], main["sys_path"], main["dir"])
        if ran:
            left = _left_behind()
            if left:
                warnings.warn(
                    f"poolloader: importing the main module ({main['name'] or main['path']}) "
                    f"in the fork server {left}, and every process forked from it inherits "
                    "that: DataLoader workers cannot use them. Move that code under "
                    "`if __name__ == '__main__':`.",
                    RuntimeWarning,
                    stacklevel=1,
                )
    except BaseException:
        pass  # each forked process imports the main module itself and reports why, as before
    finally:
        for stream in (sys.stdout, sys.stderr):  # what the script printed, not every child
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass


def _preload(
    name: str | None, path: str | None, argv: Any, sys_path: Any, directory: str | None
) -> bool:
    """Import the main module here as a spawned process would; whether it ran."""
    current = sys.modules.get("__main__")
    if name is not None and getattr(getattr(current, "__spec__", None), "name", None) == name:
        return False  # preloaded already (Python versions whose server does it)
    if path is not None and getattr(current, "__file__", None) == path:
        return False
    if sys_path is not None:
        sys.path[:] = sys_path
    if argv is not None:
        sys.argv[:] = argv
    if directory is not None:
        os.chdir(directory)
    me = multiprocessing.process.current_process()
    me._inheriting = True  # type: ignore[attr-defined]  # as spawn's children import it
    try:
        if name is not None:
            multiprocessing.spawn._fixup_main_from_name(name)  # type: ignore[attr-defined]
        elif path is not None:
            multiprocessing.spawn.import_main_path(path)
    finally:
        del me._inheriting  # type: ignore[attr-defined]
    return True


def _left_behind() -> str:
    """What importing the main module left in this process that forked processes
    cannot use ("" if nothing)."""
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        return f"started threads ({', '.join(threads)})"
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return "initialised CUDA"
    except Exception:
        pass
    return ""


#: multiprocessing's record of a running fork server, on its ``ForkServer`` object
#: (the authentication key is Python 3.13's).
_SERVER_RECORD = (
    "_forkserver_pid",
    "_forkserver_address",
    "_forkserver_alive_fd",
    "_forkserver_authkey",
)


def _forget_parents_server() -> None:
    """After ``os.fork()``, in the child: NOTE [ A forked child's fork server ]."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive = getattr(server, "_forkserver_alive_fd", None)
    for name in _SERVER_RECORD:
        if hasattr(server, name):
            setattr(server, name, None)
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass
    multiprocessing.process.current_process()._config.pop("tempdir", None)  # type: ignore[attr-defined]


os.register_at_fork(after_in_child=_forget_parents_server)
