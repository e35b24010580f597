-- A payment per request, as `cellpay bench http` sends them: a fresh transfer id
-- each time, payer and payee among the 1000 funded accounts (u0000000..u0000999,
-- opened and funded by a `bench http` run first). SECRET: an admin token secret.
wrk.method = "POST"
wrk.path = "/v1/transfers"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SECRET")
wrk.headers["Content-Type"] = "application/json"
local run = tostring(os.time())
local n = 0
request = function()
  n = n + 1
  local from = math.random(0, 999)
  local to = (from + math.random(1, 999)) % 1000
  local body = string.format('{"id":"w%s-%d","from":"u%07d","to":"u%07d","amount":%d}', run, n, from, to, math.random(1, 100))
  return wrk.format(nil, nil, nil, body)
end
