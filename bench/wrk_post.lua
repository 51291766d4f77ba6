-- wrk script: POST the JSON body in the file named by $BENCH_BODY_FILE, and print one machine-readable
-- summary line at the end ("BENCH_RESULT {...}": counts, errors, latency percentiles in microseconds).
local path = assert(os.getenv("BENCH_BODY_FILE"), "set BENCH_BODY_FILE to the request body file")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p99_us":%.0f,"max_us":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
