//! The views a ledger answers with (an account, a transfer, a history entry,
//! an outbox message) and a rejection: shared by outcomes and answers.

use cellpay_core::codec::{DecodeError, Reader, Writer};
use cellpay_core::{AccountView, EntryKind, EntryView, OutboxMessage, Rejection, TransferView};

/// The fewest bytes a transfer view takes: three one-byte ids, amount,
/// currency, status.
pub(super) const TRANSFER_VIEW_BYTES_MIN: usize = 3 * 2 + 8 + 3 + 1;
/// The fewest bytes a history entry takes: seq, a one-byte id, kind, amount,
/// balance after, a one-byte id.
pub(super) const ENTRY_VIEW_BYTES_MIN: usize = 8 + 2 + 1 + 8 + 8 + 2;
/// The fewest bytes an outbox message takes: seq, three one-byte ids, amount, currency.
pub(super) const OUTBOX_MESSAGE_BYTES_MIN: usize = 8 + 3 * 2 + 8 + 3;

pub(super) fn write_account(w: &mut Writer, a: &AccountView) {
    w.id(a.id.as_str());
    w.currency(a.currency);
    w.i64(a.balance);
    w.bool(a.overdraft);
    w.id(a.tenant.as_str());
}

pub(super) fn read_account(r: &mut Reader<'_>) -> Result<AccountView, DecodeError> {
    Ok(AccountView {
        id: r.account_id()?,
        currency: r.currency()?,
        balance: r.i64()?,
        overdraft: r.bool()?,
        tenant: r.tenant_id()?,
    })
}

pub(super) fn write_transfer(w: &mut Writer, t: &TransferView) {
    w.id(t.id.as_str());
    w.id(t.from.as_str());
    w.id(t.to.as_str());
    w.i64(t.amount);
    w.currency(t.currency);
    w.status(t.status);
}

pub(super) fn read_transfer(r: &mut Reader<'_>) -> Result<TransferView, DecodeError> {
    Ok(TransferView {
        id: r.transfer_id()?,
        from: r.account_id()?,
        to: r.account_id()?,
        amount: r.i64()?,
        currency: r.currency()?,
        status: r.status()?,
    })
}

const ENTRY_DEBIT: u8 = 0;
const ENTRY_CREDIT: u8 = 1;
const ENTRY_REVERSAL: u8 = 2;

pub(super) fn write_entry(w: &mut Writer, e: &EntryView) {
    w.u64(e.seq);
    w.id(e.transfer.as_str());
    w.u8(match e.kind {
        EntryKind::Debit => ENTRY_DEBIT,
        EntryKind::Credit => ENTRY_CREDIT,
        EntryKind::Reversal => ENTRY_REVERSAL,
    });
    w.i64(e.amount);
    w.i64(e.balance_after);
    w.id(e.counterparty.as_str());
}

pub(super) fn read_entry(r: &mut Reader<'_>) -> Result<EntryView, DecodeError> {
    let seq = r.u64()?;
    let transfer = r.transfer_id()?;
    let kind = match r.u8()? {
        ENTRY_DEBIT => EntryKind::Debit,
        ENTRY_CREDIT => EntryKind::Credit,
        ENTRY_REVERSAL => EntryKind::Reversal,
        other => return Err(r.error(format!("unknown entry kind {other}"))),
    };
    Ok(EntryView { seq, transfer, kind, amount: r.i64()?, balance_after: r.i64()?, counterparty: r.account_id()? })
}

pub(super) fn write_outbox_message(w: &mut Writer, m: &OutboxMessage) {
    w.u64(m.seq);
    w.id(m.transfer.as_str());
    w.id(m.from.as_str());
    w.id(m.to.as_str());
    w.i64(m.amount);
    w.currency(m.currency);
}

pub(super) fn read_outbox_message(r: &mut Reader<'_>) -> Result<OutboxMessage, DecodeError> {
    Ok(OutboxMessage {
        seq: r.u64()?,
        transfer: r.transfer_id()?,
        from: r.account_id()?,
        to: r.account_id()?,
        amount: r.i64()?,
        currency: r.currency()?,
    })
}

pub(super) fn write_rejection(w: &mut Writer, rejection: &Rejection) {
    w.u8(rejection.code.tag());
    w.str(&rejection.message);
}

pub(super) fn read_rejection(r: &mut Reader<'_>) -> Result<Rejection, DecodeError> {
    Ok(Rejection { code: r.error_code()?, message: r.str()?.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellpay_core::{AccountId, Currency, TransferId, TransferStatus};

    /// The minimum sizes reserve room by: each is what its smallest value takes.
    #[test]
    fn the_minimum_sizes_are_those_of_the_smallest_values() {
        let (a, t) = (AccountId::new("a").unwrap(), TransferId::new("t").unwrap());
        let cny = Currency::new("CNY").unwrap();
        let mut w = Writer::default();
        let view = TransferView {
            id: t.clone(),
            from: a.clone(),
            to: a.clone(),
            amount: 0,
            currency: cny,
            status: TransferStatus::Pending,
        };
        write_transfer(&mut w, &view);
        assert_eq!(w.buf.len(), TRANSFER_VIEW_BYTES_MIN);
        let mut w = Writer::default();
        let entry = EntryView {
            seq: 0,
            transfer: t.clone(),
            kind: EntryKind::Debit,
            amount: 0,
            balance_after: 0,
            counterparty: a.clone(),
        };
        write_entry(&mut w, &entry);
        assert_eq!(w.buf.len(), ENTRY_VIEW_BYTES_MIN);
        let mut w = Writer::default();
        let message = OutboxMessage { seq: 0, transfer: t, from: a.clone(), to: a, amount: 0, currency: cny };
        write_outbox_message(&mut w, &message);
        assert_eq!(w.buf.len(), OUTBOX_MESSAGE_BYTES_MIN);
    }
}
