#!/usr/bin/env python3
"""Shows that the simulator catches real bugs: applies each mutation below to
a scratch copy of the checked-out commit (a git worktree), builds it, runs
`cellpay sim` over a budget of seeds, and expects it to fail. Prints one line
per mutation: caught (with the first failing seed) or MISSED. Exit 1 if any
mutation is missed.

    scripts/sim-mutations.py [--seeds N] [--steps N] [NAME...]
"""
import argparse, os, shutil, subprocess, sys, tempfile

# name, file, exact text, replacement, what the bug is
MUTATIONS = [
    ("engine-ignores-failed-append", "crates/cell/src/engine.rs",
     "self.store.append(self.seq + 1, bytes)?;",
     "let _ = self.store.append(self.seq + 1, bytes);",
     "the engine answers a batch whose append failed (answers before it is durable)"),
    ("engine-does-not-log-credits", "crates/cell/src/engine.rs",
     "                        if outcome.changed_state() {",
     "                        if outcome.changed_state() && !matches!(cmd.op, cellpay_core::Op::Credit(_)) {",
     "the engine applies credits without writing them to the log"),
    ("relay-settles-unanswered-credits", "crates/cell/src/relay.rs",
     "let answers = self.dest.submit(credits).await.map_err(unavailable)?;",
     "let answers = self.dest.submit(credits).await.unwrap_or_else(|_| vec![Outcome::CreditApplied { duplicate: false }; messages.len()]);",
     "the relay settles credits the payee's cell never confirmed (settle before the credit is durable)"),
    ("relay-compensates-applied-credits", "crates/cell/src/relay.rs",
     "Outcome::CreditApplied { .. } => Op::Settle { dest, seq: m.seq },",
     "Outcome::CreditApplied { .. } => Op::Compensate { dest, seq: m.seq, reason: ErrorCode::AccountNotFound },",
     "the relay credits the payer back for a credit the payee applied"),
    ("core-skips-duplicate-credit-check", "crates/core/src/ledger.rs",
     "        if c.seq <= applied_through {",
     "        if c.seq < applied_through {",
     "a redelivered credit (the last one applied) is applied again"),
    ("core-skips-payer-owner-check", "crates/core/src/ledger.rs",
     "if !place.owns(&t.from) {",
     "if false && !place.owns(&t.from) {",
     "a cell acts on a payment whose payer it does not own (I6 fencing)"),
    ("core-ignores-outbox-limit", "crates/core/src/ledger.rs",
     "if queued >= place.admission.outbox_messages_max {",
     "if queued >= place.admission.outbox_messages_max.saturating_add(1000) {",
     "a cell queues credits past its outbox limit (I7)"),
    ("engine-ignores-shadow-flag", "crates/cell/src/engine.rs",
     "                        let outcome = self.state.admit_with(cmd, &admission, older);",
     "                        let real = cellpay_core::Command { shadow: false, op: cmd.op.clone() };\n                        let outcome = self.state.admit_with(if matches!(cmd.op, cellpay_core::Op::Transfer(_)) { &real } else { cmd }, &admission, older);",
     "the engine applies shadow payments to the real ledger (I5)"),
    ("core-skips-credit-owner-check", "crates/core/src/ledger.rs",
     "        if !place.owns(&c.to) {\n            return place.wrong_cell(&c.to);",
     "        if false && !place.owns(&c.to) {\n            return place.wrong_cell(&c.to);",
     "a cell applies a credit for a payee it does not own at its epoch (the epoch check on a credit)"),
    ("cell-takes-calls-from-a-newer-map", "crates/cell/src/client.rs",
     "(sender_epoch > cell_epoch).then(|| {",
     "(false && sender_epoch > cell_epoch).then(|| {",
     "a cell behind its caller's shard map acts on the call (accepts a command from a stale map)"),
    ("core-skips-funds-check", "crates/core/src/ledger.rs",
     "if !payer_account.overdraft && payer_after < 0 {",
     "if !payer_account.overdraft && payer_after < -1_000_000 {",
     "a payer may spend money it does not have"),
]


def run(cmd, **kw):
    return subprocess.run(cmd, check=False, text=True, capture_output=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    root = run(["git", "rev-parse", "--show-toplevel"]).stdout.strip()
    scratch = tempfile.mkdtemp(prefix="cellpay-mutants-")
    target = os.path.join(root, "target", "mutants")
    missed = 0
    try:
        run(["git", "-C", root, "worktree", "add", "--detach", scratch, "HEAD"])
        for name, path, text, replacement, what in MUTATIONS:
            if args.names and name not in args.names:
                continue
            run(["git", "-C", scratch, "checkout", "--", "."])
            file = os.path.join(scratch, path)
            src = open(file).read()
            if src.count(text) != 1:
                print(f"{name}: the text to mutate is not found once in {path}; update the script")
                missed += 1
                continue
            open(file, "w").write(src.replace(text, replacement))
            build = run(["cargo", "build", "-q", "-p", "cellpay"], cwd=scratch,
                        env={**os.environ, "CARGO_TARGET_DIR": target})
            if build.returncode != 0:
                print(f"{name}: does not build:\n{build.stderr[-2000:]}")
                missed += 1
                continue
            sim = run([os.path.join(target, "debug", "cellpay"), "sim", "--seed", "1",
                       "--seeds", str(args.seeds), "--steps", str(args.steps)])
            fail = [l for l in sim.stdout.splitlines() if l.startswith("FAIL")]
            if sim.returncode == 1 and fail:
                print(f"{name}: caught ({what})\n    {fail[0][5:]}")
            elif sim.returncode not in (0, 1):
                # The simulator itself stopped (a panic): the bug is caught, loudly.
                print(f"{name}: caught, the run crashed ({what})\n    {sim.stderr.strip().splitlines()[-1:]}")
            else:
                print(f"{name}: MISSED ({what}): {sim.stdout.strip().splitlines()[-1:]}")
                missed += 1
    finally:
        run(["git", "-C", root, "worktree", "remove", "--force", scratch])
        shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
