-- wrk script for the scoring-gateway bench: POST a small Azure ML-style scoring payload
-- and, when the run ends, print one machine-readable line with the latency distribution.
--
-- No request()/response() hooks on purpose: defining them makes wrk call into Lua for
-- every request/response, which would slow the load generator and skew fast scenarios.

wrk.method = "POST"
wrk.body = '{"data": [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors_connect": %d, "errors_read": %d, "errors_write": %d, ' ..
      '"errors_status": %d, "errors_timeout": %d, ' ..
      '"lat_min_us": %d, "lat_mean_us": %.1f, "lat_max_us": %d, ' ..
      '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max,
      latency:percentile(50.0), latency:percentile(90.0),
      latency:percentile(99.0), latency:percentile(99.9)))
end
