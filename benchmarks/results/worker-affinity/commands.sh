# Saturation price of --worker-affinity: off and on alternated twice (closed loop, wrk -c64).
cd /work/main
for i in 1 2; do
  .venv/bin/python -m benchmarks run --modes least-connections,pull,shared --workloads tiny,mixed --rounds 2 --duration 6 --out /tmp/bench/pin-ab/off-$i
  .venv/bin/python -m benchmarks run --modes least-connections,pull,shared --workloads tiny,mixed --rounds 2 --duration 6 --dispatch-args=--worker-affinity --out /tmp/bench/pin-ab/on-$i
done
