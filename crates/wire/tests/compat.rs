//! Wire compatibility across versions, for rolling upgrades.
//!
//! The bodies of protocol version 1 are frozen here as files
//! (`tests/golden/v1/*.bin`): what a version-1 router sends and what a
//! version-1 cell answers. Every later build must keep reading them as the
//! values below (an old router talks to a new cell, a new router reads an old
//! cell's answers) and, while it writes version 1, write them byte for byte
//! (a new router talks to an old cell). A body written in a version the build
//! does not read is refused with a message naming both versions, and a live
//! cell process answers a version it does not speak with 400 naming the range
//! it does, rather than guessing.
//!
//! `CELLPAY_WIRE_BLESS=1 cargo test -p cellpay-wire --test compat` writes the
//! files; do that only for a new version's own directory, never to change v1.

use std::path::PathBuf;
use std::sync::Arc;

use cellpay_cell::{Cell, CellFigures, CellStatus, EngineConfig, EngineError, Health};
use cellpay_core::{
    AccountId, AccountView, Authority, CellId, Command, Currency, Op, OpenAccount, Outcome, Query, QueryAnswer,
    ShardMap, TenantId, Transfer, TransferId, TransferStatus, TransferView,
};
use cellpay_wire::codec::*;
use cellpay_wire::{ClusterSecret, RemoteCell, RemoteConfig};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1").join(name)
}

fn account(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}

fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

fn commands() -> Vec<Command> {
    vec![
        Command::real(Op::OpenAccount(OpenAccount {
            id: account("alice"),
            currency: cny(),
            overdraft: false,
            tenant: TenantId::new("shop-1").unwrap(),
        })),
        Command::real(Op::Transfer(Transfer {
            id: TransferId::new("t-1").unwrap(),
            from: account("alice"),
            to: account("bob"),
            amount: 2_500,
            currency: Some(cny()),
            memo: Some("rent".into()),
            by: Authority::Tenant(TenantId::new("shop-1").unwrap()),
        })),
        Command::shadow(Op::Settle { dest: CellId(2), seq: 7 }),
    ]
}

fn outcomes() -> Result<Vec<Outcome>, EngineError> {
    Ok(vec![
        Outcome::AccountOpened {
            account: AccountView {
                id: account("alice"),
                currency: cny(),
                balance: 0,
                overdraft: false,
                tenant: TenantId::new("shop-1").unwrap(),
            },
            created: true,
        },
        Outcome::Transferred {
            transfer: TransferView {
                id: TransferId::new("t-1").unwrap(),
                from: account("alice"),
                to: account("bob"),
                amount: 2_500,
                currency: cny(),
                status: TransferStatus::Pending,
            },
            created: true,
            outbox: Some((CellId(1), 3)),
            minted: false,
        },
        Outcome::rejected(cellpay_core::ErrorCode::InsufficientFunds, "alice has 0 CNY"),
    ])
}

fn query() -> Query {
    Query::Transfer {
        shadow: false,
        id: TransferId::new("t-1").unwrap(),
        from: Some(account("alice")),
        by: Authority::Tenant(TenantId::new("shop-1").unwrap()),
    }
}

fn answer() -> Result<QueryAnswer, EngineError> {
    Err(EngineError::Unavailable { cell: CellId(1), reason: "the cell's engine is not running".into() })
}

fn status() -> StatusReport {
    StatusReport {
        status: CellStatus { cell: CellId(1), epoch: 4, queue_depth: 12, queue_delay_us: 900, health: Health::Serving },
        figures: CellFigures { clock_ms: 1_765_000_000_000, window_promised_ms: 86_400_000, ..CellFigures::default() },
        outbox_generation: 42,
    }
}

/// Does this build read a frozen body back as the value it stood for?
type Reads = Box<dyn Fn(&[u8]) -> bool>;

/// Each frozen body: its file, the bytes this build writes for its value, and its check.
fn cases() -> Vec<(&'static str, Vec<u8>, Reads)> {
    vec![
        ("submit.bin", encode_commands(&commands()), Box::new(|b| decode_commands(b).unwrap() == commands())),
        ("outcomes.bin", encode_outcomes(&outcomes()), Box::new(|b| decode_outcomes(b).unwrap() == outcomes())),
        ("query.bin", encode_query(&query()), Box::new(|b| decode_query(b).unwrap() == query())),
        ("answer.bin", encode_answer(&answer()), Box::new(|b| decode_answer(b).unwrap() == answer())),
        ("status.bin", encode_status(&status()), Box::new(|b| decode_status(b).unwrap() == status())),
    ]
}

#[test]
fn version_1_bodies_are_read_as_they_were_and_written_byte_for_byte() {
    if std::env::var_os("CELLPAY_WIRE_BLESS").is_some() {
        std::fs::create_dir_all(golden("")).unwrap();
        for (name, bytes, _) in cases() {
            std::fs::write(golden(name), bytes).unwrap();
        }
    }
    for (name, written, reads) in cases() {
        let frozen = std::fs::read(golden(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(frozen[0], 1, "{name} is a version-1 body");
        assert!(reads(&frozen), "{name}: this build reads a version-1 body as the value it stood for");
        // A body with nothing of a later version is still written as version 1, byte for byte.
        assert_eq!(written, frozen, "{name}: this build writes version 1 exactly as before");
    }
    const { assert!(PROTOCOL_VERSION_MIN <= 1, "dropping version 1 is a breaking change: say so and bump MIN on purpose") };
}

#[test]
fn a_body_of_a_version_this_build_does_not_read_is_refused_naming_it() {
    for (name, _, _) in cases() {
        let mut body = std::fs::read(golden(name)).unwrap();
        body[0] = PROTOCOL_VERSION + 1;
        let refused = match name {
            "submit.bin" => decode_commands(&body).err(),
            "outcomes.bin" => decode_outcomes(&body).err(),
            "query.bin" => decode_query(&body).err(),
            "answer.bin" => decode_answer(&body).err(),
            _ => decode_status(&body).err(),
        };
        let e = refused.unwrap_or_else(|| panic!("{name}: a newer version was read"));
        assert!(e.to_string().contains(&(PROTOCOL_VERSION + 1).to_string()), "{name}: {e}");
    }
}

/// A live cell process's server: a version-1 request (the frozen bytes) is
/// served; a request that claims a version it does not speak gets 400 naming
/// the versions it reads; one without the cluster secret gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_serves_a_version_1_caller_and_refuses_a_version_it_does_not_speak() {
    let dir = tempfile::tempdir().unwrap();
    let map = ShardMap::round_robin(64, 1).unwrap();
    let cell = Cell::open_embedded(dir.path(), CellId(0), &map, EngineConfig::default()).unwrap();
    let slot = Arc::new(cellpay_cell::CellSlot::new(CellId(0)));
    slot.install(cell.handle());
    let secret = ClusterSecret::new("compat-test-cluster-secret").unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(cellpay_wire::serve(tcp, cellpay_wire::app(slot.clone(), secret.clone(), Default::default()), stop));

    // The frozen submit body, sent raw as a version-1 router would.
    let client = RemoteCell::start(CellId(0), &addr.to_string(), secret.clone(), RemoteConfig::default());
    let raw = |version: &str, secret: Option<&str>, body: Vec<u8>| {
        let addr = addr.to_string();
        let (version, secret) = (version.to_string(), secret.map(str::to_string));
        async move {
            use http_body_util::BodyExt;
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let mut req =
                hyper::Request::post(format!("http://{addr}/cell/v1/submit")).header("x-cellpay-protocol", version);
            if let Some(s) = secret {
                req = req.header("authorization", format!("Bearer {s}"));
            }
            let resp = send
                .send_request(req.body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
        }
    };
    let v1 = std::fs::read(golden("submit.bin")).unwrap();
    let (status, body) = raw("1", Some("compat-test-cluster-secret"), v1.clone()).await;
    assert_eq!(status, 200);
    let outcomes = decode_outcomes(&body).unwrap().unwrap();
    assert_eq!(outcomes.len(), 3, "every command of the version-1 body was answered");
    assert!(matches!(outcomes[0], Outcome::AccountOpened { created: true, .. }), "{outcomes:?}");

    let (status, body) = raw("9", Some("compat-test-cluster-secret"), v1.clone()).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("9") && text.contains(&PROTOCOL_VERSION.to_string()), "names both versions: {text}");
    let (status, body) = raw("1", None, v1).await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert!(!String::from_utf8_lossy(&body).contains("compat-test"), "the secret is never echoed");

    // And the client of this build reads the cell's answers.
    let again = cellpay_cell::CellClient::submit(&client, commands()).await.unwrap();
    assert!(matches!(again[0], Outcome::AccountOpened { created: false, .. }), "a replay: {again:?}");
    slot.clear();
    cell.stop().unwrap();
}

/// A field added in version 2 reads as zero from a version-1 body: a
/// version-1 coordinator's export asks for every record outside memory.
#[test]
fn a_version_1_export_query_reads_with_no_copy_mark() {
    // version 1 | the export query's tag (9) | not shadow | shard 7
    let v1 = [1u8, 9, 0, 7, 0, 0, 0];
    assert_eq!(decode_query(&v1).unwrap(), Query::ExportShard { shard: 7, older_after: 0 });
    // Without a mark it is still written as version 1, byte for byte.
    assert_eq!(encode_query(&Query::ExportShard { shard: 7, older_after: 0 }), v1);
    // With one it is version 2, and carries it.
    let now = encode_query(&Query::ExportShard { shard: 7, older_after: 1 << 30 });
    assert_eq!(now[0], 2);
    assert_eq!(decode_query(&now).unwrap(), Query::ExportShard { shard: 7, older_after: 1 << 30 });
    // A version-2 body cut to version 1's length is refused, not misread.
    let mut cut = now[..7].to_vec();
    cut[0] = 2;
    assert!(decode_query(&cut).is_err());
}
