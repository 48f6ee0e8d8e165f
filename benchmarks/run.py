"""``python benchmarks/run.py [options]`` = ``python -m benchmarks run [options]`` (kept for the commands
the README and the committed results record)."""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not benchmarks/
    from benchmarks.cli import main

    sys.exit(main(["run", *sys.argv[1:]], script="benchmarks/run.py"))
