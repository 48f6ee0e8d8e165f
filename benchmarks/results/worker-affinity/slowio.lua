
-- Each request picks its path: 10% /slow?ms=50, the rest are instant.
-- Built in init(): only then does wrk.headers hold Host (and the -H headers).
local slow, fast
init = function(args)
  slow = wrk.format(nil, "/slow?ms=50")
  fast = wrk.format(nil, "/")
end
request = function()
  if math.random() < 0.1 then return slow end
  return fast
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
