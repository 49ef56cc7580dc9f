from ftlab.process import command_process, imports_without_collection
from ftlab.timing import import_libraries


def _main() -> None:
    with command_process():
        with imports_without_collection():
            # First, and timed: metrics.json's phase_seconds["imports"] (ftlab.timing).
            import_libraries("torch", "lightning")
            from ftlab.entry import main
        main()


if __name__ == "__main__":
    _main()
