//! `cellpay debug crash-load`: the child process of the crash test.
//!
//! Opens one cell, makes sure its accounts exist and are funded, prints
//! `READY`, then runs client threads that submit random transfers and print
//! `ACK <id> <from> <to> <amount>` for each acknowledged one, flushing after
//! every request. The parent `kill -9`s it at a random moment and checks that
//! every printed transfer survived. Bounded: it stops by itself after
//! `--max-seconds`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellpay_cell::{Cell, EngineConfig};
use cellpay_core::{
    AccountId, Authority, CellId, Command, Currency, Limits, Op, OpenAccount, Outcome, ShardMap, TenantId, Transfer,
    TransferId,
};
use cellpay_store::StoreOptions;
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    cell_dir: PathBuf,
    /// A tag that makes this run's transfer ids unique.
    #[arg(long)]
    tag: String,
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Log bytes between checkpoints: small, so crashes land during checkpoints too.
    #[arg(long, default_value_t = 64 << 10)]
    checkpoint_bytes: u64,
    #[arg(long, default_value_t = 30)]
    max_seconds: u64,
}

fn account(i: usize) -> AccountId {
    AccountId::new(&format!("c{i}")).expect("valid id")
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = EngineConfig {
        checkpoint_log_bytes: args.checkpoint_bytes,
        store: StoreOptions { segment_bytes_max: 256 << 10 },
        limits: Limits { transfers_retained_max: 1 << 21, history_entries_max: 1 << 16 },
        ..EngineConfig::default()
    };
    let map = ShardMap::round_robin(cellpay_core::SHARDS_DEFAULT, 1).expect("valid map");
    let cell = Cell::open_embedded(&args.cell_dir, CellId(0), &map, config).context("opening the cell")?;
    let h = cell.handle();
    let cny = Currency::new("CNY").expect("ISO code");
    let bank = AccountId::new("bank").expect("valid id");
    let mut setup = vec![Command::real(Op::OpenAccount(OpenAccount {
        id: bank.clone(),
        currency: cny,
        overdraft: true,
        tenant: TenantId::default_tenant(),
    }))];
    for i in 0..args.accounts {
        setup.push(Command::real(Op::OpenAccount(OpenAccount {
            id: account(i),
            currency: cny,
            overdraft: false,
            tenant: TenantId::default_tenant(),
        })));
        setup.push(Command::real(Op::Transfer(Transfer {
            id: TransferId::new(&format!("fund-{i}")).expect("valid id"),
            from: bank.clone(),
            to: account(i),
            amount: 1_000_000,
            currency: None,
            memo: None,
            by: Authority::Admin,
        })));
    }
    h.submit(setup)?.wait_blocking()?;
    println!("READY");
    std::io::stdout().flush()?;

    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (h, out, tag, accounts) = (h.clone(), out.clone(), args.tag.clone(), args.accounts);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(c as u64);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let size = rng.random_range(1..=16);
                    let cmds: Vec<Command> = (0..size)
                        .map(|_| {
                            n += 1;
                            let from = rng.random_range(0..accounts);
                            let to = (from + rng.random_range(1..accounts)) % accounts;
                            Command::real(Op::Transfer(Transfer {
                                id: TransferId::new(&format!("{tag}-{c}-{n}")).expect("valid id"),
                                from: account(from),
                                to: account(to),
                                amount: rng.random_range(1..=5000),
                                currency: None,
                                memo: None,
                                by: Authority::Admin,
                            }))
                        })
                        .collect();
                    let outcomes = match h.submit(cmds) {
                        Ok(s) => s.wait_blocking(),
                        Err(e) => Err(e),
                    };
                    let Ok(outcomes) = outcomes else { continue };
                    let mut text = String::new();
                    for o in outcomes {
                        if let Outcome::Transferred { transfer: t, created: true, .. } = o {
                            text.push_str(&format!("ACK {} {} {} {}\n", t.id, t.from, t.to, t.amount));
                        }
                    }
                    let mut out = out.lock().expect("stdout lock");
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread")?;
    }
    cell.stop()?;
    Ok(ExitCode::SUCCESS)
}
