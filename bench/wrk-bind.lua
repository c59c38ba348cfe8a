-- wrk script: POST /_matrix/identity/internal/bind with a new address on every request.
-- PREFIX (env) keeps runs apart; MXID_DOMAIN (env) is the server part of the MXIDs.
local counter = 0
local prefix = os.getenv("PREFIX") or "wrk"
local domain = os.getenv("MXID_DOMAIN") or "127.0.0.1:48448"
local thread_id = 0

function setup(thread)
  thread:set("thread_id", thread_id)
  thread_id = thread_id + 1
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local local_part = string.format("%s%d-%d", prefix, thread_id, counter)
  local body = string.format(
    '{"medium":"email","address":"%s@bench.test","mxid":"@%s:%s"}',
    local_part, local_part, domain)
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.2f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(99) / 1000, summary.errors.status + summary.errors.timeout))
end
