-- wrk script for bench/run.py: POST a JSON body, write a JSON summary with latency percentiles.
-- env: BENCH_BODY_FILE (request body), BENCH_KEY (bearer key), BENCH_OUT (where the summary goes)
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench")

local curve = {1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.99}

done = function(summary, latency, requests)
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  local e = summary.errors
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout))
  out:write(string.format('"min_us":%d,"max_us":%d,"mean_us":%.1f,"percentiles":{', latency.min, latency.max,
    latency.mean))
  local ps = {50, 75, 90, 99, 99.9}
  for i, p in ipairs(ps) do
    out:write(string.format('%s"%g":%d', i > 1 and "," or "", p, latency:percentile(p)))
  end
  out:write('},"curve":[')
  for i, p in ipairs(curve) do
    out:write(string.format('%s[%g,%d]', i > 1 and "," or "", p, latency:percentile(p)))
  end
  out:write(']}\n')
  out:close()
end
