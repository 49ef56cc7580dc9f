"""ftlab.process: the command line's process keeps the garbage collector off its long-lived objects and
still exits with the code it was given, its atexit handlers run and its output flushed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROGRAM = """
import atexit, gc, sys
from ftlab.process import command_process
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
with command_process():
    frozen = gc.get_freeze_count()
    print("frozen", frozen > 0, flush=False)
    sys.exit(int(sys.argv[2]))
"""


def test_command_process_freezes_and_keeps_exit_code_and_handlers(tmp_path: Path) -> None:
    for code in (0, 3):
        marker = tmp_path / f"atexit{code}"
        proc = subprocess.run([sys.executable, "-c", PROGRAM, str(marker), str(code)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout.split() == ["frozen", "True"]
        assert marker.read_text() == "atexit ran"


def test_an_error_still_ends_with_its_traceback(tmp_path: Path) -> None:
    program = "from ftlab.process import command_process\nwith command_process():\n    raise ValueError('boom')\n"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ValueError: boom" in proc.stderr


IMPORTS_PROGRAM = """
import gc, sys
from ftlab.process import command_process, imports_without_collection
full = []
gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2 and full.append(1))
with command_process():
    before = gc.get_freeze_count()
    try:
        with imports_without_collection():
            off = not gc.isenabled()
            junk = [[] for _ in range(300_000)]  # enough new objects to start several collections
            gc.collect(2)  # an explicit collection still runs; count only the automatic ones below
            full.clear()
            more = [[] for _ in range(300_000)]
            raise KeyError("an import failed")
    except KeyError:
        pass
    print(off, gc.isenabled(), not full, gc.get_freeze_count() >= before + 600_000)
"""


def test_imports_without_collection_holds_the_collector_off_then_freeze_what_they_made() -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORTS_PROGRAM], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    off, enabled_after, no_automatic_full_collection, frozen = proc.stdout.split()
    assert off == "True" and enabled_after == "True"  # off inside, back on after, even after an error
    assert no_automatic_full_collection == "True"
    assert frozen == "True"  # the objects made inside are in the permanent generation


def test_imports_without_collection_does_nothing_outside_a_command_process() -> None:
    import gc

    from ftlab.process import imports_without_collection

    frozen = gc.get_freeze_count()
    with imports_without_collection():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
