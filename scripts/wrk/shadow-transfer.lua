-- The request `cellpay bench http --shadow` sends: one shadow transfer (with the
-- shadow_off switch on, answered 503 degraded). SECRET: an admin token secret.
wrk.method = "POST"
wrk.path = "/v1/transfers"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SECRET")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Cellpay-Shadow"] = "1"
wrk.body = '{"id":"h1-1","from":"u0000001","to":"u0000002","amount":17}'
