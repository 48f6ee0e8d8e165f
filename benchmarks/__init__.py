"""Benchmarks of dispatch: ``python -m benchmarks {run,failures,abuse,soak}`` (cli.py).

    targets/      the servers under test and how each is started and stopped
    workloads/    what is done to them: the comparison's workloads, failures and
                  restarts, the abuse attacks, the restart soak
    measurement/  wrk runs, /proc (CPU, memory, descriptors), probes, logs, statistics
    report/       Markdown tables, JSON, the PNG plot
    commands/     one module per subcommand: its options, and the loop that runs it

Nothing is imported here: servers under test import ``benchmarks.peers`` and
``benchmarks.targets.abuse_apps`` and should not pay for the rest.
"""
