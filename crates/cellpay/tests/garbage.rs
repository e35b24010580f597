//! No client input produces a 500: random bodies, random JSON shapes, odd
//! headers and paths against every route of the running server all answer
//! with the contract's 4xx errors (I7, DESIGN.md section 4).

mod common;

use common::{Server, ADMIN, CLIENT};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn random_json(rng: &mut impl Rng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e20),
        4 => {
            let pool = ["", "a", "acct-1", "CNY", "USD", "x y", "é", "0", "-1", "9007199254740992"];
            json!(pool[rng.random_range(0..pool.len())])
        }
        5 => Value::Array((0..rng.random_range(0..4)).map(|_| random_json(rng, depth + 1)).collect()),
        _ => {
            let keys = ["id", "from", "to", "amount", "currency", "memo", "overdraft", "transfers", "x"];
            let mut m = serde_json::Map::new();
            for _ in 0..rng.random_range(0..6) {
                m.insert(keys[rng.random_range(0..keys.len())].into(), random_json(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

#[test]
fn no_input_makes_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--cells", "2", "--body-bytes-max", "4096"]);
    s.post("/v1/accounts", ADMIN, &json!({"id": "acct-1", "currency": "CNY", "overdraft": true}));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let posts = ["/v1/accounts", "/v1/transfers", "/v1/transfers/batch"];
    let gets = [
        "/v1/accounts/acct-1",
        "/v1/accounts/acct-1/entries?limit=x",
        "/v1/accounts/%FF",
        "/v1/transfers/%00",
        "/v1/accounts/acct-1/entries?before=-1&limit=5",
        "/v1/audit",
        "/v1/cluster",
        "/v1/digests",
    ];
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..600 {
        let token = [CLIENT, ADMIN][i % 2];
        let shadow = ["0", "1", "yes", ""][rng.random_range(0..4)];
        let headers = [("X-Cellpay-Shadow", shadow)];
        let reply = if i % 4 == 3 {
            s.request("GET", gets[rng.random_range(0..gets.len())], Some(token), &headers, None)
        } else {
            let body = match rng.random_range(0..4) {
                0 => (0..rng.random_range(0..64)).map(|_| rng.random_range(32u8..127) as char).collect::<String>(),
                1 => "x".repeat(5000),
                _ => random_json(&mut rng, 0).to_string(),
            };
            s.request("POST", posts[rng.random_range(0..posts.len())], Some(token), &headers, Some(&body))
        };
        assert!(
            reply.status < 500 || reply.body["error"]["code"] == "cell_unavailable",
            "{} {}",
            reply.status,
            reply.body
        );
        assert!(reply.status != 500, "{}", reply.body);
        *seen.entry(reply.status).or_insert(0) += 1;
    }
    assert!(
        seen.keys().any(|s| *s == 400) && seen.keys().any(|s| *s == 413),
        "the inputs reached the checks: {seen:?}"
    );
    assert_eq!(s.get("/v1/audit", CLIENT).body["ok"], true);
}
