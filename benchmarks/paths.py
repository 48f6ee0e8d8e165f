"""Where things are: the repository, this package, the peers' programs, the results."""

from pathlib import Path

BENCH = Path(__file__).resolve().parent  # benchmarks/
ROOT = BENCH.parent  # the repository: src/dispatch is what the servers run
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"  # the default --out
