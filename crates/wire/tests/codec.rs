//! The cell protocol's codec: every variant of every body round-trips, a
//! transfer keeps the authority it acts for, and bad bodies (cut short, of
//! another version, with bytes after them, with a count over its limit) are
//! refused with an error, never a panic, and before anything is reserved.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use cellpay_cell::{CellFigures, CellStatus, EngineError, Health, TierFigures};
use cellpay_core::codec::DecodeError;
use cellpay_core::{
    AccountId, AccountView, Authority, CellId, Command, Credit, Currency, EntryKind, EntryView, ErrorCode, Finding,
    IdempotencyReach, InboxAt, InboxFigures, InboxPrefix, LedgerAudit, LedgerFigures, Op, OpenAccount, OutboxAt,
    OutboxFigures, OutboxMessage, Outcome, Priority, Query, QueryAnswer, Rejection, SentPrefix, ShardMap, TenantId,
    Transfer, TransferId, TransferStatus, TransferView,
};
use cellpay_core::{
    ExportedAccount, ExportedEntry, ExportedRecord, LedgerExport, MoveFigures, MoveRecord, ShardExport, TierCursor,
    TierEntry, TierPage,
};
use cellpay_wire::codec::*;
use proptest::prelude::*;

/// The system allocator, noting the largest single allocation on this thread.
struct LargestAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` unchanged; the note only writes a thread-local.
unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

/// The largest single allocation `f` made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

fn account(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}
fn transfer_id(s: &str) -> TransferId {
    TransferId::new(s).unwrap()
}
fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}
fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

fn transfer(by: Authority) -> Transfer {
    Transfer {
        id: transfer_id("pay-1"),
        from: account("alice"),
        to: account("bob"),
        amount: 2500,
        currency: Some(cny()),
        memo: Some("lunch".into()),
        by,
    }
}

/// One command of every kind, a transfer for each authority.
fn every_command() -> Vec<Command> {
    vec![
        Command::real(Op::OpenAccount(OpenAccount {
            id: account("alice"),
            currency: cny(),
            overdraft: true,
            tenant: tenant("acme"),
        })),
        Command::real(Op::Transfer(transfer(Authority::Tenant(tenant("acme"))))),
        Command::shadow(Op::Transfer(Transfer {
            currency: None,
            memo: None,
            by: Authority::Admin,
            ..transfer(Authority::Admin)
        })),
        Command::real(Op::Credit(Credit {
            source: CellId(3),
            dest: Some(CellId(0)),
            seq: 9,
            transfer: transfer_id("t3"),
            from: account("carol"),
            to: account("alice"),
            amount: 5,
            currency: cny(),
        })),
        Command::real(Op::Settle { dest: CellId(1), seq: 2 }),
        Command::shadow(Op::Compensate { dest: CellId(2), seq: 4, reason: ErrorCode::InsufficientFunds }),
        Command::real(Op::InstallShardMap(ShardMap::round_robin(16, 4).unwrap())),
        Command::real(Op::FreezeShard { shard: 3, move_id: 8, to: CellId(2) }),
        Command::real(Op::UnfreezeShard { shard: 3, move_id: 8 }),
        Command::real(Op::InstallShard(Box::new(shard_export()))),
        Command::real(Op::DiscardShard { shard: 3, move_id: 8 }),
        Command::real(Op::DropShard { shard: 3, move_id: 8 }),
    ]
}

/// A shard on its way, with an account, a record and an entry in each ledger.
fn shard_export() -> ShardExport {
    let ledger = LedgerExport {
        accounts: vec![ExportedAccount {
            id: account("alice"),
            currency: cny(),
            balance: -40,
            overdraft: true,
            tenant: tenant("acme"),
        }],
        records: vec![ExportedRecord {
            id: transfer_id("pay-1"),
            from: 0,
            to: account("bob"),
            amount: 40,
            currency: cny(),
            currency_given: None,
            memo_hash: 77,
            status: TransferStatus::Settled,
            at_s: 1_700_000_000,
        }],
        history: vec![ExportedEntry {
            account: 0,
            transfer: transfer_id("pay-1"),
            counterparty: account("bob"),
            kind: EntryKind::Debit,
            amount: -40,
            balance_after: -40,
        }],
        legs_digest: 5,
        digest: 6,
    };
    ShardExport { shard: 3, move_id: 8, from: CellId(1), to: CellId(2), real: ledger, shadow: LedgerExport::default() }
}

fn account_view() -> AccountView {
    AccountView { id: account("alice"), currency: cny(), balance: -40, overdraft: true, tenant: tenant("acme") }
}

fn transfer_view(status: TransferStatus) -> TransferView {
    TransferView {
        id: transfer_id("pay-1"),
        from: account("alice"),
        to: account("bob"),
        amount: 2500,
        currency: cny(),
        status,
    }
}

fn every_outcome() -> Vec<Outcome> {
    vec![
        Outcome::AccountOpened { account: account_view(), created: true },
        Outcome::Transferred {
            transfer: transfer_view(TransferStatus::Pending),
            created: true,
            outbox: Some((CellId(2), 17)),
            minted: false,
        },
        Outcome::Transferred {
            transfer: transfer_view(TransferStatus::Settled),
            created: false,
            outbox: None,
            minted: true,
        },
        Outcome::CreditApplied { duplicate: true },
        Outcome::CreditRefused { code: ErrorCode::AccountNotFound, duplicate: false },
        Outcome::OutboxClosed { status: TransferStatus::Reversed, duplicate: true },
        Outcome::ShardMapInstalled { epoch: 7 },
        Outcome::MoveStep { open_messages: 3, duplicate: true },
        Outcome::rejected(ErrorCode::IdempotencyExpired, "too old: «retry» refused"),
    ]
}

/// Every engine error, `Shed` once per priority class.
fn every_engine_error() -> Vec<EngineError> {
    let mut out = vec![
        EngineError::Overloaded { cell: CellId(1), queued: 9000, max: 8192 },
        EngineError::TooLarge { commands: 70_000, max: SUBMIT_COMMANDS_MAX },
        EngineError::Unavailable { cell: CellId(4), reason: "fail-stop: disk full".into() },
    ];
    for class in Priority::ALL {
        out.push(EngineError::Shed { cell: CellId(2), class: class.as_str(), waited_ms: 120, target_ms: 5 });
    }
    out
}

fn every_query(by: Authority) -> Vec<Query> {
    vec![
        Query::Account { shadow: false, id: account("alice"), by: by.clone() },
        Query::Transfer { shadow: true, id: transfer_id("pay-1"), from: Some(account("alice")), by: by.clone() },
        Query::Transfer { shadow: false, id: transfer_id("pay-1"), from: None, by: by.clone() },
        Query::Entries { shadow: false, account: account("bob"), limit: 50, before: Some(1234), by: by.clone() },
        Query::Entries { shadow: true, account: account("bob"), limit: 1000, before: None, by },
        Query::Digests { shadow: true },
        Query::Audit { shadow: false },
        Query::Figures { shadow: true },
        Query::InboxAt { shadow: false, asked: vec![(CellId(0), 5), (CellId(3), u64::MAX)] },
        Query::OutboxAt { shadow: true, asked: vec![] },
        Query::OutboxAt { shadow: false, asked: vec![(CellId(1), 0)] },
        Query::Outbox { shadow: false, dest: CellId(2), after_seq: 99, limit: 4096 },
        Query::ExportShard { shard: 1023, older_after: 1 << 40 },
        Query::TierPage {
            shard: 7,
            snapshot: 3,
            seq_after: 9,
            cursor: TierCursor { part: 4, after_key: Some(vec![0, 1, 255]) },
        },
        Query::TierImport {
            shard: 7,
            move_id: 12,
            part: 3,
            keys_max: 100,
            entries: vec![TierEntry { key: vec![1, 2], seq: 5, at_ms: 6, value: vec![] }],
            first: false,
            last: true,
        },
        Query::ShardLoad,
    ]
}

fn outbox_figures(dest: u32) -> OutboxFigures {
    OutboxFigures {
        dest: CellId(dest),
        last_seq: 10,
        sent: i128::MAX,
        closed_through: 8,
        settled: 700,
        compensated: -3,
        closed_chain: 0xdead_beef,
        sent_chain: u64::MAX,
    }
}

fn inbox_figures(source: u32) -> InboxFigures {
    InboxFigures {
        source: CellId(source),
        applied_through: 9,
        received: 900,
        refused: i128::MIN,
        chain: 1,
        message_chain: 2,
    }
}

fn ledger_figures() -> LedgerFigures {
    LedgerFigures {
        accounts: 3,
        balance_sum: -(1 << 70),
        negative_accounts: 1,
        outbox: vec![outbox_figures(1), outbox_figures(2)],
        inbox: vec![inbox_figures(3)],
        moves: vec![MoveFigures {
            peer: CellId(2),
            out_moves: 3,
            out_net: -(1 << 66),
            out_mix: 7,
            in_moves: 1,
            in_net: 9,
            in_mix: u64::MAX,
        }],
        frozen: vec![MoveRecord {
            id: 4,
            shard: 9,
            from: CellId(1),
            to: CellId(2),
            accounts: 12,
            net: 1 << 65,
            digest: 3,
        }],
        arrived: vec![MoveRecord { id: 5, shard: 2, from: CellId(0), to: CellId(1), accounts: 1, net: -7, digest: 9 }],
    }
}

/// Every finding, `Walk` once per figure name the ledger's audit uses.
fn every_finding() -> Vec<Finding> {
    let mut out = vec![
        Finding::CellTerm { cell: CellId(1), term: -5 },
        Finding::Negative { cell: CellId(1), accounts: 2 },
        Finding::Lost { source: CellId(1), dest: CellId(2), first_seq: 3, last_seq: 4, amount: 70 },
        Finding::Unsent { source: CellId(2), dest: CellId(1), first_seq: 5, last_seq: 9, amount: -70 },
        Finding::Diverged { source: CellId(1), dest: CellId(2), through: 12, detail: "the chains differ".into() },
        Finding::Unverified { source: CellId(1), dest: CellId(2), seq: 3, applied_through: 9000 },
        Finding::MoveLost { source: CellId(1), dest: CellId(2), moves: 2, amount: 1 << 64 },
        Finding::MoveDiverged { source: CellId(2), dest: CellId(1), detail: "digests differ".into(), transient: true },
    ];
    for figure in WALK_FIGURES {
        out.push(Finding::Walk { cell: CellId(0), figure, kept: 10, walked: 11 });
    }
    out
}

fn every_answer() -> Vec<QueryAnswer> {
    vec![
        QueryAnswer::Account(account_view()),
        QueryAnswer::Transfers(vec![]),
        QueryAnswer::Transfers(vec![transfer_view(TransferStatus::Pending), transfer_view(TransferStatus::Reversed)]),
        QueryAnswer::Entries(vec![
            EntryView {
                seq: 1,
                transfer: transfer_id("t1"),
                kind: EntryKind::Debit,
                amount: -5,
                balance_after: -5,
                counterparty: account("bob"),
            },
            EntryView {
                seq: 2,
                transfer: transfer_id("t2"),
                kind: EntryKind::Credit,
                amount: 8,
                balance_after: 3,
                counterparty: account("carol"),
            },
            EntryView {
                seq: 3,
                transfer: transfer_id("t1"),
                kind: EntryKind::Reversal,
                amount: 5,
                balance_after: 8,
                counterparty: account("bob"),
            },
        ]),
        QueryAnswer::Digests { epoch: 4, digests: vec![0, 1, u64::MAX] },
        QueryAnswer::Audit(LedgerAudit { figures: ledger_figures(), findings: every_finding() }),
        QueryAnswer::Audit(LedgerAudit::default()),
        QueryAnswer::Figures(ledger_figures()),
        QueryAnswer::Figures(LedgerFigures { moves: vec![], frozen: vec![], arrived: vec![], ..ledger_figures() }),
        QueryAnswer::Audit(LedgerAudit { figures: LedgerFigures::default(), findings: vec![] }),
        QueryAnswer::InboxAt(vec![
            InboxAt {
                figures: inbox_figures(1),
                prefix: Some(InboxPrefix { seq: 4, received: 40, refused: 1, chain: 77 }),
            },
            InboxAt { figures: inbox_figures(2), prefix: None },
        ]),
        QueryAnswer::OutboxAt(vec![
            OutboxAt { figures: outbox_figures(1), prefix: Some(SentPrefix { seq: 9, sent: 90, chain: 5 }) },
            OutboxAt { figures: outbox_figures(3), prefix: None },
        ]),
        QueryAnswer::Outbox(vec![OutboxMessage {
            seq: 3,
            transfer: transfer_id("x1"),
            from: account("alice"),
            to: account("dave"),
            amount: 30,
            currency: cny(),
        }]),
        QueryAnswer::Rejected(Rejection::new(ErrorCode::Forbidden, "not your account")),
        QueryAnswer::ShardExport(Box::new(shard_export())),
        QueryAnswer::TierPage(Box::new(TierPage {
            snapshot: 2,
            through_seq: 99,
            part: 1,
            keys_max: 64,
            entries: vec![TierEntry { key: vec![0, 0, 0, 0, 7], seq: 1, at_ms: 2, value: b"v".to_vec() }],
            last: false,
            next: Some(TierCursor { part: 1, after_key: Some(vec![0, 0, 0, 0, 7]) }),
        })),
        QueryAnswer::TierImported { entries: 17 },
        QueryAnswer::ShardLoad(vec![0, 7, u64::MAX]),
    ]
}

fn tier_figures() -> TierFigures {
    TierFigures {
        runs: 3,
        entries: 1000,
        bytes: 1 << 20,
        memory_bytes: 4096,
        oldest_at_ms: Some(1_700_000_000_000),
        bound_floor_at_ms: None,
        disk_reads: 12,
        disk_hits: 2,
        disk_read_ns: 99_000,
        imported_runs: 1,
    }
}

fn every_status() -> Vec<StatusReport> {
    let healths = [
        Health::Serving,
        Health::Stalled { busy_ms: 1500, stall_after_ms: 1000 },
        Health::Failed { reason: Arc::from("fsync failed: EIO") },
    ];
    let mut out = Vec::new();
    for (i, health) in healths.into_iter().enumerate() {
        let figures = CellFigures {
            // A status carries no shard moves (the audit reads them).
            real: LedgerFigures { moves: vec![], frozen: vec![], arrived: vec![], ..ledger_figures() },
            shadow: LedgerFigures::default(),
            clock_ms: 1_800_000_000_000,
            reach_real: IdempotencyReach { records_held: 10, records_dropped: 2, oldest_at_ms: Some(5) },
            reach_shadow: IdempotencyReach::default(),
            window_promised_ms: 86_400_000,
            tier: (i != 1).then(tier_figures),
        };
        let status = CellStatus { cell: CellId(i as u32), epoch: 3, queue_depth: 17, queue_delay_us: 250, health };
        out.push(StatusReport { status, figures, outbox_generation: 42 + i as u64 });
    }
    out.push(StatusReport {
        status: CellStatus::down(CellId(9), "not running"),
        figures: CellFigures::default(),
        outbox_generation: 0,
    });
    out
}

/// One encoding of every body kind, with the decoder that reads it (a
/// decoder's answer as `Result<(), _>` so that they share one type).
type Decode = fn(&[u8]) -> Result<(), DecodeError>;

fn every_body() -> Vec<(&'static str, Vec<u8>, Decode)> {
    let outcomes: Decode = |b| decode_outcomes(b).map(drop);
    let answer: Decode = |b| decode_answer(b).map(drop);
    let mut out: Vec<(&'static str, Vec<u8>, Decode)> = vec![
        ("commands", encode_commands(&every_command()), |b| decode_commands(b).map(drop)),
        ("commands (none)", encode_commands(&[]), |b| decode_commands(b).map(drop)),
        ("outcomes", encode_outcomes(&Ok(every_outcome())), outcomes),
        ("outcomes (an error)", encode_outcomes(&Err(every_engine_error()[3].clone())), outcomes),
        ("status", encode_status(&every_status()[0]), |b| decode_status(b).map(drop)),
    ];
    for query in every_query(Authority::Tenant(tenant("acme"))) {
        out.push(("query", encode_query(&query), |b| decode_query(b).map(drop)));
    }
    for a in every_answer() {
        out.push(("answer", encode_answer(&Ok(a)), answer));
    }
    out.push(("answer (an error)", encode_answer(&Err(every_engine_error()[0].clone())), answer));
    out
}

#[test]
fn every_command_round_trips() {
    let commands = every_command();
    assert_eq!(decode_commands(&encode_commands(&commands)).unwrap(), commands);
    assert_eq!(decode_commands(&encode_commands(&[])).unwrap(), Vec::<Command>::new());
}

#[test]
fn a_transfer_acts_for_the_tenant_it_was_sent_for() {
    let sent = vec![Command::real(Op::Transfer(transfer(Authority::Tenant(tenant("acme")))))];
    let decoded = decode_commands(&encode_commands(&sent)).unwrap();
    let Op::Transfer(t) = &decoded[0].op else { panic!("a transfer decodes as a transfer: {decoded:?}") };
    assert_eq!(t.by, Authority::Tenant(tenant("acme")), "the transfer must not come back as admin");
    // The authority travels in the body: the same transfer as admin differs.
    let admin = vec![Command::real(Op::Transfer(transfer(Authority::Admin)))];
    assert_ne!(encode_commands(&admin), encode_commands(&sent));
    assert_eq!(decode_commands(&encode_commands(&admin)).unwrap(), admin);
}

#[test]
fn every_outcome_and_engine_error_round_trips() {
    let ok = Ok(every_outcome());
    assert_eq!(decode_outcomes(&encode_outcomes(&ok)).unwrap(), ok);
    assert_eq!(decode_outcomes(&encode_outcomes(&Ok(vec![]))).unwrap(), Ok(vec![]));
    for e in every_engine_error() {
        let err: Result<Vec<Outcome>, _> = Err(e);
        assert_eq!(decode_outcomes(&encode_outcomes(&err)).unwrap(), err);
    }
}

#[test]
fn every_query_round_trips_with_its_authority() {
    for by in [Authority::Admin, Authority::Tenant(tenant("acme"))] {
        for query in every_query(by) {
            assert_eq!(decode_query(&encode_query(&query)).unwrap(), query);
        }
    }
}

#[test]
fn every_answer_and_engine_error_round_trips() {
    for answer in every_answer() {
        let ok = Ok(answer);
        assert_eq!(decode_answer(&encode_answer(&ok)).unwrap(), ok);
    }
    for e in every_engine_error() {
        let err: Result<QueryAnswer, _> = Err(e);
        assert_eq!(decode_answer(&encode_answer(&err)).unwrap(), err);
    }
}

#[test]
fn every_status_round_trips() {
    for report in every_status() {
        assert_eq!(decode_status(&encode_status(&report)).unwrap(), report);
    }
}

#[test]
fn a_shed_class_decodes_to_its_priority_name_and_an_unknown_one_is_refused() {
    for class in Priority::ALL {
        let err: Result<Vec<Outcome>, _> =
            Err(EngineError::Shed { cell: CellId(1), class: class.as_str(), waited_ms: 1, target_ms: 2 });
        let Err(EngineError::Shed { class: decoded, .. }) = decode_outcomes(&encode_outcomes(&err)).unwrap() else {
            panic!("a shed error decodes as one")
        };
        assert_eq!(decoded, class.as_str());
    }
    let bogus: Result<Vec<Outcome>, _> =
        Err(EngineError::Shed { cell: CellId(1), class: "bulk", waited_ms: 1, target_ms: 2 });
    let e = decode_outcomes(&encode_outcomes(&bogus)).unwrap_err();
    assert!(e.reason.contains("bulk"), "the refusal names the class: {e}");
}

#[test]
fn an_unknown_walk_figure_decodes_as_unknown_and_keeps_its_amounts() {
    let finding = Finding::Walk { cell: CellId(2), figure: "inbox tail length", kept: 3, walked: 4 };
    let audit = Ok(QueryAnswer::Audit(LedgerAudit { figures: LedgerFigures::default(), findings: vec![finding] }));
    let Ok(QueryAnswer::Audit(decoded)) = decode_answer(&encode_answer(&audit)).unwrap() else {
        panic!("an audit decodes as one")
    };
    let expected = Finding::Walk { cell: CellId(2), figure: WALK_FIGURE_UNKNOWN, kept: 3, walked: 4 };
    assert_eq!(decoded.findings, vec![expected]);
}

/// The figure names the decoder knows are those the ledger's audit uses: a
/// new `walk("…")` in crates/core/src/ledger.rs must be added to `WALK_FIGURES`.
#[test]
fn the_known_walk_figures_are_those_the_ledger_names() {
    let source = include_str!("../../core/src/ledger.rs");
    let named: Vec<&str> =
        source.split("walk(\"").skip(1).map(|rest| &rest[..rest.find('"').expect("a string literal closes")]).collect();
    assert!(!named.is_empty(), "the ledger's audit names its figures through walk(\"…\")");
    for name in &named {
        assert!(WALK_FIGURES.contains(name), "WALK_FIGURES lacks {name:?}, which the ledger's audit names");
    }
    for known in WALK_FIGURES {
        assert!(named.contains(&known), "WALK_FIGURES names {known:?}, which the ledger no longer uses");
    }
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for (what, bytes, decode) in every_body() {
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "{what} cut at {cut} of {} bytes decoded", bytes.len());
        }
        assert!(decode(&bytes).is_ok(), "{what} whole decodes");
    }
}

#[test]
fn flipped_bytes_are_an_error_or_a_value_never_a_panic() {
    for (_, bytes, decode) in every_body() {
        for i in 0..bytes.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                let _ = decode(&bad);
            }
        }
    }
}

#[test]
fn a_version_outside_the_range_read_is_refused_and_named() {
    assert_eq!(PROTOCOL_VERSION_MIN, 1);
    for (what, bytes, decode) in every_body() {
        // Written in the oldest version that carries it: 1, or 2 for the disk tier's copy.
        assert!((1..=PROTOCOL_VERSION).contains(&bytes[0]), "{what} starts with the version it is written in");
        for version in [0, PROTOCOL_VERSION + 1, u8::MAX] {
            let mut other = bytes.clone();
            other[0] = version;
            let e = decode(&other).expect_err("another version is refused");
            assert!(e.reason.contains(&format!("version {version}")), "{what}: the error names the version: {e}");
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for (what, bytes, decode) in every_body() {
        for tail in [&[0u8][..], &[PROTOCOL_VERSION, 0, 0, 0, 0, 0, 0, 0, 0]] {
            let long = [&bytes[..], tail].concat();
            let e = decode(&long).expect_err("trailing bytes are refused");
            assert!(e.reason.contains("trailing"), "{what}: {e}");
        }
    }
}

/// A body of `version`, `prefix`, then a count of `count` and no items.
fn with_count(prefix: &[u8], count: u64) -> Vec<u8> {
    [&[PROTOCOL_VERSION][..], prefix, &count.to_le_bytes()].concat()
}

#[test]
fn a_count_over_its_limit_is_refused_before_anything_is_reserved() {
    let over = |max: usize| max as u64 + 1;
    let cases: Vec<(&str, Vec<u8>, Decode)> = vec![
        ("commands", with_count(&[], over(SUBMIT_COMMANDS_MAX)), |b| decode_commands(b).map(drop)),
        ("commands", with_count(&[], u64::MAX), |b| decode_commands(b).map(drop)),
        ("outcomes", with_count(&[0], over(SUBMIT_OUTCOMES_MAX)), |b| decode_outcomes(b).map(drop)),
        ("inbox_at query", with_count(&[6, 0], over(CELLS_MAX)), |b| decode_query(b).map(drop)),
        ("outbox_at query", with_count(&[7, 1], over(CELLS_MAX)), |b| decode_query(b).map(drop)),
        ("transfers", with_count(&[0, 1], over(ANSWER_TRANSFERS_MAX)), |b| decode_answer(b).map(drop)),
        ("entries", with_count(&[0, 2], over(ANSWER_ENTRIES_MAX)), |b| decode_answer(b).map(drop)),
        ("digests", with_count(&[0, 3, 0, 0, 0, 0, 0, 0, 0, 0], over(DIGESTS_MAX)), |b| decode_answer(b).map(drop)),
        ("inbox_at", with_count(&[0, 6], over(CELLS_MAX)), |b| decode_answer(b).map(drop)),
        ("outbox_at", with_count(&[0, 7], over(CELLS_MAX)), |b| decode_answer(b).map(drop)),
        ("outbox", with_count(&[0, 8], over(ANSWER_OUTBOX_MESSAGES_MAX)), |b| decode_answer(b).map(drop)),
    ];
    for (what, bytes, decode) in cases {
        let (result, largest) = largest_allocation(|| decode(&bytes));
        let e = result.expect_err("a count over its limit is refused");
        assert!(e.reason.contains("exceeds limit"), "{what}: {e}");
        assert!(largest < 1024, "{what}: {largest} bytes reserved for a refused count");
    }
}

#[test]
fn a_page_larger_than_its_answer_may_carry_is_refused() {
    let by = Authority::Admin;
    let entries =
        |limit| Query::Entries { shadow: false, account: account("bob"), limit, before: None, by: by.clone() };
    let outbox = |limit| Query::Outbox { shadow: false, dest: CellId(1), after_seq: 0, limit };
    for query in [entries(ANSWER_ENTRIES_MAX), outbox(ANSWER_OUTBOX_MESSAGES_MAX)] {
        assert_eq!(decode_query(&encode_query(&query)).unwrap(), query);
    }
    for query in [entries(ANSWER_ENTRIES_MAX + 1), outbox(ANSWER_OUTBOX_MESSAGES_MAX + 1), outbox(usize::MAX)] {
        let e = decode_query(&encode_query(&query)).expect_err("a page the answer cannot carry is refused");
        assert!(e.reason.contains("exceeds the answer's limit"), "{e}");
    }
}

#[test]
fn a_count_within_its_limit_reserves_only_what_the_bytes_hold() {
    // The figures' outbox list and the audit's findings, claiming their limit with no items behind.
    let figures_prefix = [&[0u8, 5][..], &[0; 8 + 16 + 8]].concat();
    let audit_prefix = [&[0u8, 4][..], &[0; 8 + 16 + 8], &[0; 16]].concat();
    let cases: Vec<(&str, Vec<u8>, Decode)> = vec![
        ("commands", with_count(&[], SUBMIT_COMMANDS_MAX as u64), |b| decode_commands(b).map(drop)),
        ("outcomes", with_count(&[0], SUBMIT_OUTCOMES_MAX as u64), |b| decode_outcomes(b).map(drop)),
        ("figures", with_count(&figures_prefix, CELLS_MAX as u64), |b| decode_answer(b).map(drop)),
        ("findings", with_count(&audit_prefix, AUDIT_FINDINGS_MAX as u64), |b| decode_answer(b).map(drop)),
        ("outbox", with_count(&[0, 8], ANSWER_OUTBOX_MESSAGES_MAX as u64), |b| decode_answer(b).map(drop)),
    ];
    for (what, bytes, decode) in cases {
        let (result, largest) = largest_allocation(|| decode(&bytes));
        let e = result.expect_err("a count with no items behind it is refused");
        assert!(e.reason.contains("more bytes"), "{what}: {e}");
        assert!(largest < 1024, "{what}: {largest} bytes reserved for items the input does not hold");
    }
}

fn id_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,64}"
}

fn authority_strategy() -> impl Strategy<Value = Authority> {
    prop_oneof![Just(Authority::Admin), id_strategy().prop_map(|t| Authority::Tenant(tenant(&t)))]
}

fn currency_strategy() -> impl Strategy<Value = Currency> {
    prop::sample::select(vec!["CNY", "USD", "EUR", "JPY"]).prop_map(|c| Currency::new(c).unwrap())
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let transfer = (
        any::<bool>(),
        (id_strategy(), id_strategy(), id_strategy()),
        any::<i64>(),
        prop::option::of(currency_strategy()),
        prop::option::of("\\PC{0,40}"),
        authority_strategy(),
    )
        .prop_map(|(shadow, (id, from, to), amount, currency, memo, by)| Command {
            shadow,
            op: Op::Transfer(Transfer {
                id: transfer_id(&id),
                from: account(&from),
                to: account(&to),
                amount,
                currency,
                memo: memo.map(Box::from),
                by,
            }),
        });
    let open = (any::<bool>(), id_strategy(), currency_strategy(), any::<bool>(), id_strategy()).prop_map(
        |(shadow, id, currency, overdraft, t)| Command {
            shadow,
            op: Op::OpenAccount(OpenAccount { id: account(&id), currency, overdraft, tenant: tenant(&t) }),
        },
    );
    let credit = (
        any::<u32>(),
        prop::option::of(any::<u32>()),
        any::<u64>(),
        (id_strategy(), id_strategy(), id_strategy()),
        any::<i64>(),
    )
        .prop_map(|(source, dest, seq, (t, from, to), amount)| {
            Command::real(Op::Credit(Credit {
                source: CellId(source),
                dest: dest.map(CellId),
                seq,
                transfer: transfer_id(&t),
                from: account(&from),
                to: account(&to),
                amount,
                currency: cny(),
            }))
        });
    let close =
        (any::<u32>(), any::<u64>(), prop::option::of(0..ErrorCode::ALL.len())).prop_map(|(dest, seq, code)| {
            let dest = CellId(dest);
            match code {
                None => Command::real(Op::Settle { dest, seq }),
                Some(i) => Command::shadow(Op::Compensate { dest, seq, reason: ErrorCode::ALL[i] }),
            }
        });
    prop_oneof![4 => transfer, 1 => open, 1 => credit, 1 => close]
}

fn outcome_strategy() -> impl Strategy<Value = Outcome> {
    let status = prop::sample::select(vec![TransferStatus::Pending, TransferStatus::Settled, TransferStatus::Reversed]);
    let code = prop::sample::select(ErrorCode::ALL.to_vec());
    let transferred = (
        (id_strategy(), id_strategy(), id_strategy()),
        any::<i64>(),
        currency_strategy(),
        status.clone(),
        any::<(bool, bool)>(),
        prop::option::of(any::<(u32, u64)>()),
    )
        .prop_map(|((id, from, to), amount, currency, status, (created, minted), outbox)| Outcome::Transferred {
            transfer: TransferView {
                id: transfer_id(&id),
                from: account(&from),
                to: account(&to),
                amount,
                currency,
                status,
            },
            created,
            outbox: outbox.map(|(dest, seq)| (CellId(dest), seq)),
            minted,
        });
    let opened = (id_strategy(), currency_strategy(), any::<i64>(), any::<bool>(), id_strategy(), any::<bool>())
        .prop_map(|(id, currency, balance, overdraft, t, created)| Outcome::AccountOpened {
            account: AccountView { id: account(&id), currency, balance, overdraft, tenant: tenant(&t) },
            created,
        });
    prop_oneof![
        3 => transferred,
        1 => opened,
        1 => any::<bool>().prop_map(|duplicate| Outcome::CreditApplied { duplicate }),
        1 => (code.clone(), any::<bool>()).prop_map(|(code, duplicate)| Outcome::CreditRefused { code, duplicate }),
        1 => (status, any::<bool>()).prop_map(|(status, duplicate)| Outcome::OutboxClosed { status, duplicate }),
        1 => any::<u64>().prop_map(|epoch| Outcome::ShardMapInstalled { epoch }),
        1 => (code, "\\PC{0,60}").prop_map(|(code, message)| Outcome::rejected(code, message)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_commands_round_trip(commands in prop::collection::vec(command_strategy(), 0..20)) {
        let bytes = encode_commands(&commands);
        prop_assert_eq!(decode_commands(&bytes).unwrap(), commands);
        // Cut anywhere, the body is refused.
        let cut = bytes.len() / 2;
        if cut > 0 {
            prop_assert!(decode_commands(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn generated_outcomes_round_trip(outcomes in prop::collection::vec(outcome_strategy(), 0..20)) {
        let ok = Ok(outcomes);
        let bytes = encode_outcomes(&ok);
        prop_assert_eq!(decode_outcomes(&bytes).unwrap(), ok);
        prop_assert!(decode_outcomes(&bytes[..bytes.len() - 1]).is_err());
    }
}
