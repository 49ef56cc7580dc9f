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
