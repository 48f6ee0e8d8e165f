"""``python benchmarks/soak_restarts.py [options]`` = ``python -m benchmarks soak [options]`` (kept for
the command the README records)."""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not benchmarks/
    from benchmarks.cli import main

    sys.exit(main(["soak", *sys.argv[1:]], script="benchmarks/soak_restarts.py"))
