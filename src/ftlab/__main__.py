from ftlab.process import command_process
from ftlab.timing import import_libraries

# First, and timed: metrics.json's phase_seconds["imports"] (ftlab.timing).
import_libraries("torch", "lightning")

from ftlab.entry import main  # noqa: E402

if __name__ == "__main__":
    with command_process():
        main()
