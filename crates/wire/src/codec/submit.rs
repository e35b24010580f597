//! The submit call's bodies: commands, with the authority a transfer acts
//! for, and the outcomes a cell answers them with.
//!
//! A command is the log's encoding (`cellpay_core::codec::encode_command`),
//! which leaves out a transfer's `by`: a logged transfer was admitted once
//! and replays as admin. Over the protocol the transfer is not admitted yet,
//! so its authority follows the logged fields, and the decoded transfer acts
//! for it (never for admin unless admin sent it).

use cellpay_core::codec::{decode_command, encode_command, DecodeError, Reader, Writer};
use cellpay_core::{Authority, Command, Op, Outcome};

use super::{read_cell, read_opt, view, write_opt};

/// The fewest bytes a command takes: the log's minimum (a transfer's
/// authority only adds to it).
pub(super) const COMMAND_BYTES_MIN: usize = cellpay_core::codec::COMMAND_BYTES_MIN;
/// The fewest bytes an outcome takes: a tag and one flag (`CreditApplied`).
pub(super) const OUTCOME_BYTES_MIN: usize = 2;

const AUTHORITY_ADMIN: u8 = 0;
const AUTHORITY_TENANT: u8 = 1;

pub(super) fn write_authority(w: &mut Writer, by: &Authority) {
    match by {
        Authority::Admin => w.u8(AUTHORITY_ADMIN),
        Authority::Tenant(tenant) => {
            w.u8(AUTHORITY_TENANT);
            w.id(tenant.as_str());
        }
    }
}

pub(super) fn read_authority(r: &mut Reader<'_>) -> Result<Authority, DecodeError> {
    match r.u8()? {
        AUTHORITY_ADMIN => Ok(Authority::Admin),
        AUTHORITY_TENANT => r.tenant_id().map(Authority::Tenant),
        other => Err(r.error(format!("unknown authority tag {other}"))),
    }
}

pub(super) fn write_command(w: &mut Writer, command: &Command) {
    encode_command(w, command);
    if let Op::Transfer(t) = &command.op {
        write_authority(w, &t.by);
    }
}

pub(super) fn read_command(r: &mut Reader<'_>) -> Result<Command, DecodeError> {
    let mut command = decode_command(r)?;
    if let Op::Transfer(t) = &mut command.op {
        t.by = read_authority(r)?;
    }
    Ok(command)
}

const OUTCOME_ACCOUNT_OPENED: u8 = 0;
const OUTCOME_TRANSFERRED: u8 = 1;
const OUTCOME_CREDIT_APPLIED: u8 = 2;
const OUTCOME_CREDIT_REFUSED: u8 = 3;
const OUTCOME_OUTBOX_CLOSED: u8 = 4;
const OUTCOME_SHARD_MAP_INSTALLED: u8 = 5;
const OUTCOME_REJECTED: u8 = 6;
const OUTCOME_MOVE_STEP: u8 = 7;

pub(super) fn write_outcome(w: &mut Writer, outcome: &Outcome) {
    match outcome {
        Outcome::AccountOpened { account, created } => {
            w.u8(OUTCOME_ACCOUNT_OPENED);
            view::write_account(w, account);
            w.bool(*created);
        }
        Outcome::Transferred { transfer, created, outbox, minted } => {
            w.u8(OUTCOME_TRANSFERRED);
            view::write_transfer(w, transfer);
            w.bool(*created);
            write_opt(w, outbox.as_ref(), |w, (dest, seq)| {
                w.u32(dest.0);
                w.u64(*seq);
            });
            w.bool(*minted);
        }
        Outcome::CreditApplied { duplicate } => {
            w.u8(OUTCOME_CREDIT_APPLIED);
            w.bool(*duplicate);
        }
        Outcome::CreditRefused { code, duplicate } => {
            w.u8(OUTCOME_CREDIT_REFUSED);
            w.u8(code.tag());
            w.bool(*duplicate);
        }
        Outcome::OutboxClosed { status, duplicate } => {
            w.u8(OUTCOME_OUTBOX_CLOSED);
            w.status(*status);
            w.bool(*duplicate);
        }
        Outcome::ShardMapInstalled { epoch } => {
            w.u8(OUTCOME_SHARD_MAP_INSTALLED);
            w.u64(*epoch);
        }
        Outcome::Rejected(rejection) => {
            w.u8(OUTCOME_REJECTED);
            view::write_rejection(w, rejection);
        }
        Outcome::MoveStep { open_messages, duplicate } => {
            w.u8(OUTCOME_MOVE_STEP);
            w.u64(*open_messages);
            w.bool(*duplicate);
        }
    }
}

pub(super) fn read_outcome(r: &mut Reader<'_>) -> Result<Outcome, DecodeError> {
    Ok(match r.u8()? {
        OUTCOME_ACCOUNT_OPENED => Outcome::AccountOpened { account: view::read_account(r)?, created: r.bool()? },
        OUTCOME_TRANSFERRED => Outcome::Transferred {
            transfer: view::read_transfer(r)?,
            created: r.bool()?,
            outbox: read_opt(r, |r| Ok((read_cell(r)?, r.u64()?)))?,
            minted: r.bool()?,
        },
        OUTCOME_CREDIT_APPLIED => Outcome::CreditApplied { duplicate: r.bool()? },
        OUTCOME_CREDIT_REFUSED => Outcome::CreditRefused { code: r.error_code()?, duplicate: r.bool()? },
        OUTCOME_OUTBOX_CLOSED => Outcome::OutboxClosed { status: r.status()?, duplicate: r.bool()? },
        OUTCOME_SHARD_MAP_INSTALLED => Outcome::ShardMapInstalled { epoch: r.u64()? },
        OUTCOME_REJECTED => Outcome::Rejected(view::read_rejection(r)?),
        OUTCOME_MOVE_STEP => Outcome::MoveStep { open_messages: r.u64()?, duplicate: r.bool()? },
        other => return Err(r.error(format!("unknown outcome tag {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellpay_core::{AccountId, Currency, OpenAccount, TenantId};

    #[test]
    fn the_minimum_sizes_are_those_of_the_smallest_values() {
        let open = Command::real(Op::OpenAccount(OpenAccount {
            id: AccountId::new("a").unwrap(),
            currency: Currency::new("CNY").unwrap(),
            overdraft: false,
            tenant: TenantId::new("t").unwrap(),
        }));
        let mut w = Writer::default();
        write_command(&mut w, &open);
        assert_eq!(w.buf.len(), COMMAND_BYTES_MIN);
        let mut w = Writer::default();
        write_outcome(&mut w, &Outcome::CreditApplied { duplicate: false });
        assert_eq!(w.buf.len(), OUTCOME_BYTES_MIN);
    }
}
