"""Loaded by a test's fresh process (PYTHONPATH): records every first import of the heavy
packages that happens on a thread other than the main one, and writes them to the file in
CTCD_IMPORT_PROBE at exit. Two threads importing these package graphs at once can get a
partially initialised module (CPython's import-lock deadlock avoidance): see test_one_shot.py.
"""

import atexit
import json
import os
import sys
import threading

_WATCHED = {"sklearn", "mlflow", "scipy", "pandas", "numpy", "skops", "pandera", "pyarrow"}
_off_main: list[tuple[str, str]] = []


def _hook(event: str, args: tuple) -> None:
    if event == "import" and args[0].partition(".")[0] in _WATCHED:
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            _off_main.append((thread.name, args[0]))


def _dump() -> None:
    with open(os.environ["CTCD_IMPORT_PROBE"], "w") as out:
        json.dump(_off_main, out)


if os.environ.get("CTCD_IMPORT_PROBE"):
    sys.addaudithook(_hook)
    atexit.register(_dump)
