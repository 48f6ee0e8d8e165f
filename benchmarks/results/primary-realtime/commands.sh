cd /work/main
for i in 1 2; do
  .venv/bin/python -m benchmarks run --modes least-connections,pull --workloads tiny,mixed --rounds 2 --duration 6 --out /tmp/bench/rt-ab/off-$i
  .venv/bin/python -m benchmarks run --modes least-connections,pull --workloads tiny,mixed --rounds 2 --duration 6 --dispatch-args "--primary-realtime 1" --out /tmp/bench/rt-ab/on-$i
done
