"""The subcommands of ``python -m benchmarks``, one module each: its options
(``add_arguments``, then ``finish`` for the values derived from them) and ``execute``,
which runs the workloads on the targets and writes the report."""
