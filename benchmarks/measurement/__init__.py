"""What a run measures, independent of which server or workload: /proc (CPU, memory,
descriptors, children), wrk (its Lua hook and its result line), HTTP probes, server logs,
and the statistics over rounds (median, min–max, Jain's index)."""
