//! The front door against hostile clients (issue 11, items 1, 2 and 5), on
//! the real binary: sockets that send nothing or send slowly neither lock
//! payments out nor stay open past their timeouts; slow bodies hold no edge
//! permit and teach the edge limit nothing; the body budget refuses with a
//! contract error; every refusal the front makes is the contract's JSON.
//!
//! Raw sockets play the hostile clients; the payments go through the test
//! client (`ureq`). Bounds are generous and every wait polls to a deadline:
//! these run on a loaded two-core machine.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Reply, Server, ADMIN, CLIENT};
use serde_json::{json, Value};

fn addr(s: &Server) -> String {
    s.base.strip_prefix("http://").expect("an http base").to_string()
}

/// The kinds of hostile connection of issue 11.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hostile {
    /// Connects and sends nothing.
    Idle,
    /// Sends half a request head.
    HalfHead,
    /// Sends a whole head (with a valid token) and a few bytes of a declared 200-byte body.
    HalfBody,
    /// Completes one request without a token, then idles on the kept-alive connection.
    IdleKeepAlive,
}

const KINDS: [Hostile; 4] = [Hostile::Idle, Hostile::HalfHead, Hostile::HalfBody, Hostile::IdleKeepAlive];

fn hostile(addr: &str, kind: Hostile) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let head = match kind {
        Hostile::Idle => String::new(),
        Hostile::HalfHead => "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".into(),
        Hostile::HalfBody => format!(
            "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"id\":"
        ),
        Hostile::IdleKeepAlive => "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".into(),
    };
    s.write_all(head.as_bytes()).expect("send");
    s
}

/// Whether the server has closed `s` (EOF or reset), reading and dropping
/// whatever it answered first.
fn closed_by_server(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Polls until every socket was closed by the server, or panics after `within`.
fn all_closed(socks: &[(Hostile, TcpStream)], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let open: Vec<Hostile> = socks.iter().filter(|(_, s)| !closed_by_server(s)).map(|(k, _)| *k).collect();
        if open.is_empty() {
            return;
        }
        let by_kind: Vec<(Hostile, usize)> =
            KINDS.iter().map(|k| (*k, open.iter().filter(|o| *o == k).count())).filter(|(_, n)| *n > 0).collect();
        assert!(Instant::now() < deadline, "{} connections still open after {within:?}: {by_kind:?}", open.len());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One request on a raw socket; answers the status, the lower-cased head and
/// the body (read to the declared length, or to EOF).
fn raw(addr: &str, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).expect("send");
    read_answer(&mut s)
}

fn read_answer(s: &mut TcpStream) -> (u16, String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap());
            if len.is_some_and(|n| got.len() >= end + 4 + n) {
                let body = String::from_utf8_lossy(&got[end + 4..end + 4 + len.unwrap()]).into_owned();
                return (head[9..12].parse().unwrap(), head, body);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no answer: {text:?}"));
    (head[9..12].parse().unwrap(), head.to_lowercase(), body.to_string())
}

/// The contract's error with `code` (and a valid shape per the OpenAPI document).
fn contract_error(status: u16, body: &str, want_status: u16, code: &str) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{status}: not JSON: {body:?}"));
    assert_eq!((status, v["error"]["code"].as_str()), (want_status, Some(code)), "{v}");
    common::conforms(&v, "Error");
}

fn open_accounts(s: &Server) {
    let r = s.post("/v1/accounts", ADMIN, &json!({"id": "bank", "currency": "CNY", "overdraft": true}));
    assert!(r.status == 201 || r.status == 200, "{}", r.body);
    let r = s.post("/v1/accounts", CLIENT, &json!({"id": "shop", "currency": "CNY"}));
    assert!(r.status == 201 || r.status == 200, "{}", r.body);
}

fn pay(s: &Server, id: &str) -> Reply {
    s.post("/v1/transfers", ADMIN, &json!({"id": id, "from": "bank", "to": "shop", "amount": 1}))
}

fn metric(s: &Server, name: &str) -> Option<f64> {
    let text = s.request("GET", "/metrics", None, &[], None).body;
    // A 429 (over /metrics' rate) is JSON: no figure this time.
    let text = text.as_str()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_full_door_makes_room_for_clients_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    // Timeouts far beyond the test client's 30 s: only eviction can let payments in.
    let s = Server::start(
        dir.path(),
        &[
            "--cells",
            "2",
            "--connections-max",
            "64",
            "--header-read-timeout-ms",
            "120000",
            "--keep-alive-idle-timeout-ms",
            "120000",
            "--body-rate-grace-ms",
            "120000",
            "--body-read-timeout-ms",
            "120000",
        ],
    );
    open_accounts(&s);
    let addr = addr(&s);
    // A client that completed an authenticated request keeps its connection.
    let mut trusted = TcpStream::connect(&addr).unwrap();
    trusted.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let cluster = format!("GET /v1/cluster HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT}\r\n\r\n");
    trusted.write_all(cluster.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut trusted).0, 200);

    let held: Vec<(Hostile, TcpStream)> = (0..200).map(|i| KINDS[i % 4]).map(|k| (k, hostile(&addr, k))).collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..20 {
        let r = pay(&s, &format!("room-{i}"));
        assert_eq!(r.status, 201, "payment {i} while 200 hostile connections knock: {}", r.body);
    }
    trusted.write_all(cluster.as_bytes()).unwrap();
    assert_eq!(read_answer(&mut trusted).0, 200, "the authenticated connection was not the one closed");
    let closed = held.iter().filter(|(_, s)| closed_by_server(s)).count();
    assert!(closed > 0, "room was made by closing hostile connections");
}

#[test]
fn idle_and_slow_connections_are_closed_by_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        &[
            "--cells",
            "2",
            "--header-read-timeout-ms",
            "1500",
            "--keep-alive-idle-timeout-ms",
            "1500",
            "--body-rate-grace-ms",
            "1000",
            "--body-read-timeout-ms",
            "3000",
        ],
    );
    open_accounts(&s);
    let addr = addr(&s);
    let socks: Vec<(Hostile, TcpStream)> = (0..240).map(|i| KINDS[i % 4]).map(|k| (k, hostile(&addr, k))).collect();
    // Payments from another client go on meanwhile.
    for i in 0..20 {
        assert_eq!(pay(&s, &format!("during-{i}")).status, 201);
    }
    all_closed(&socks, Duration::from_secs(60));
    // A half-sent body is told why before its connection closes.
    let mut slow = hostile(&addr, Hostile::HalfBody);
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (status, head, body) = read_answer(&mut slow);
    contract_error(status, &body, 408, "invalid_request");
    assert!(head.contains("connection: close"), "{head}");
    assert!(metric(&s, "cellpay_body_timeouts_total").unwrap_or(0.0) >= 1.0);
}

#[test]
fn the_per_address_cap_refuses_extra_connections_unless_exempt() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        &["--cells", "1", "--connections-per-address-max", "4", "--connections-per-address-exempt", "none"],
    );
    let addr = addr(&s);
    // The server did not talk to this address since it was ready: 4 are held, the rest refused.
    let socks: Vec<(Hostile, TcpStream)> = (0..12).map(|_| (Hostile::Idle, hostile(&addr, Hostile::Idle))).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = socks.iter().filter(|(_, s)| closed_by_server(s)).count();
        if refused >= 8 {
            break;
        }
        assert!(Instant::now() < deadline, "only {refused} of 12 connections refused with a cap of 4");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(socks);
    // Once they are gone, the address gets in again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while raw_ok(&addr).is_none() {
        assert!(Instant::now() < deadline, "the address was not let in again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn raw_ok(addr: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200").then_some(200)
}

#[test]
fn slow_bodies_hold_no_edge_permit_and_the_limit_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut rules = cellpay_router::FlowRules::default();
    rules.edge_concurrency.initial = 16;
    rules.edge_concurrency.min = 4;
    let rules_path = dir.path().join("rules.toml");
    std::fs::write(&rules_path, toml::to_string(&rules).unwrap()).unwrap();
    let data = dir.path().join("data");
    let s = Server::start(
        &data,
        &["--cells", "2", "--rules", rules_path.to_str().unwrap(), "--body-rate-grace-ms", "60000"],
    );
    open_accounts(&s);
    let addr = addr(&s);
    // 64 half-sent payments: four times the edge limit.
    let mut slow: Vec<TcpStream> = (0..64).map(|_| hostile(&addr, Hostile::HalfBody)).collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..30 {
        let r = pay(&s, &format!("while-slow-{i}"));
        assert_eq!(r.status, 201, "payment {i} while 64 bodies are half-sent: {}", r.body);
    }
    // The slow bodies finish, one by one, over seconds.
    for (i, sock) in slow.iter_mut().enumerate() {
        let rest = format!("\"slow-{i}\",\"from\":\"bank\",\"to\":\"shop\",\"amount\":1}}");
        let rest = format!("{rest:<194}");
        sock.write_all(rest.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(40));
    }
    for (i, sock) in slow.iter_mut().enumerate() {
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (status, _, body) = read_answer(sock);
        assert_eq!(status, 201, "slow payment {i}: {body}");
    }
    let limit = metric(&s, "cellpay_edge_concurrency_limit").expect("the edge limit is published");
    assert!(limit >= 16.0, "the slow clients taught the edge limit: {limit}");
    // A payment run afterwards: no 503.
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..8)
            .map(|t| {
                let s = &s;
                scope.spawn(move || (0..25).map(|i| pay(s, &format!("after-{t}-{i}")).status).collect::<Vec<_>>())
            })
            .collect();
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 201), "after the slow phase: {statuses:?}");
}

#[test]
fn the_body_budget_refuses_with_a_contract_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        &[
            "--cells",
            "1",
            "--body-bytes-max",
            "16384",
            "--body-bytes-in-flight-max",
            "65536",
            "--body-rate-grace-ms",
            "60000",
        ],
    );
    let addr = addr(&s);
    let head = format!(
        "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT}\r\nContent-Length: 16000\r\n\r\n{{"
    );
    // Four bodies of 16,000 bytes fit in 64 KiB; the fifth does not.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut sock = TcpStream::connect(&addr).unwrap();
        sock.write_all(head.as_bytes()).unwrap();
        held.push(sock);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&s, "cellpay_body_bytes_in_flight").unwrap_or(0.0) < 64000.0 {
        assert!(Instant::now() < deadline, "the four bodies were not taken in");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, head_text, body) = raw(&addr, head.as_bytes());
    contract_error(status, &body, 503, "overloaded");
    assert!(head_text.contains("retry-after:"), "{head_text}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&s, "cellpay_body_bytes_in_flight").unwrap_or(1.0) > 0.0 {
        assert!(Instant::now() < deadline, "the budget was not given back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_refusal_of_the_front_is_a_contract_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "1"]);
    open_accounts(&s);
    let addr = addr(&s);

    // 405, with Allow.
    let delete = format!("DELETE /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT}\r\n\r\n");
    let (status, head, body) = raw(&addr, delete.as_bytes());
    contract_error(status, &body, 405, "invalid_request");
    assert!(head.contains("allow: post"), "{head}");
    let (status, _, body) = raw(&addr, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    contract_error(status, &body, 405, "invalid_request");

    // 414 and 431, under hyper's own (higher) caps.
    let long = format!("GET /v1/accounts/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "a".repeat(9000));
    let (status, _, body) = raw(&addr, long.as_bytes());
    contract_error(status, &body, 414, "invalid_request");
    let big = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "b".repeat(40_000));
    let (status, _, body) = raw(&addr, big.as_bytes());
    contract_error(status, &body, 431, "invalid_request");

    // A path that does not decode, and a query that does not parse.
    let r = s.get("/v1/accounts/%FF", CLIENT);
    contract_error(r.status, &r.body.to_string(), 400, "invalid_request");
    let r = s.get("/v1/accounts/bank/entries?limit=x", ADMIN);
    contract_error(r.status, &r.body.to_string(), 400, "invalid_request");

    // The bearer scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = s.request("GET", "/v1/accounts/shop", None, &[("Authorization", &format!("{scheme} {CLIENT}"))], None);
        assert_eq!(r.status, 200, "{scheme}: {}", r.body);
    }
    let r = s.request("GET", "/v1/accounts/shop", None, &[("Authorization", &format!("Basic {CLIENT}"))], None);
    contract_error(r.status, &r.body.to_string(), 401, "unauthorized");
}

/// The front gate refuses from the request head alone (issue 13): a shadow
/// payment while `shadow_off` is on is answered 503 `degraded` before auth
/// and before its body is read. A small body already sent is drained, so the
/// connection serves the next request; a large one is never read, and the
/// connection is closed after the answer. Each refusal is counted as the
/// protection stack and the HTTP metrics count every answer.
#[test]
fn the_front_gate_refuses_from_the_head_and_keeps_small_connections() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "2"]);
    open_accounts(&s);
    assert_eq!(s.put("/v1/admin/degrade/shadow_off", ADMIN, &json!({"mode": "on"})).status, 200);
    let addr = addr(&s);
    let mut sock = TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // No token at all: the gate answers before auth would have said 401.
    let body = r#"{"id":"gate-1","from":"bank","to":"shop","amount":1}"#;
    let shadow = format!(
        "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nX-Cellpay-Shadow: 1\r\nX-Request-Id: gate-test-1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(shadow.as_bytes()).unwrap();
    let (status, head, answer) = read_answer(&mut sock);
    contract_error(status, &answer, 503, "degraded");
    assert!(head.contains("x-request-id: gate-test-1"), "the client's id is echoed: {head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    // The same connection serves a real payment: the refused body was drained.
    let real = r#"{"id":"gate-real-1","from":"bank","to":"shop","amount":1}"#;
    let pay = format!(
        "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{real}",
        real.len()
    );
    sock.write_all(pay.as_bytes()).unwrap();
    let (status, _, answer) = read_answer(&mut sock);
    assert_eq!(status, 201, "the kept connection serves the next request: {answer}");
    // A large shadow upload: answered at once, its body never read, the connection closed.
    let mut big = TcpStream::connect(&addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nX-Cellpay-Shadow: 1\r\n\
                Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{\"id\":";
    big.write_all(head.as_bytes()).unwrap();
    let (status, _, answer) = read_answer(&mut big);
    contract_error(status, &answer, 503, "degraded");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !closed_by_server(&big) {
        assert!(Instant::now() < deadline, "the connection of a refused upload stays open");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Counted where every refusal and every answer is.
    let shed = metric(&s, "cellpay_shed_total{layer=\"degrade\",class=\"shadow\",cell=\"router\"}");
    assert_eq!(shed, Some(2.0));
    let answered = metric(&s, "cellpay_http_requests_total{route=\"/v1/transfers\",code=\"503\"}");
    assert_eq!(answered, Some(2.0));
    // Real traffic and shadow traffic with the switch off pass the gate.
    assert_eq!(s.put("/v1/admin/degrade/shadow_off", ADMIN, &json!({"mode": "off"})).status, 200);
    let r = s.post_shadow("/v1/accounts", ADMIN, &json!({"id": "shadow-bank", "currency": "CNY"}));
    assert_eq!(r.status, 201, "{}", r.body);
}
