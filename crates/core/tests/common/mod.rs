//! Helpers the state-machine tests share: ids, CNY, opening an account and
//! an admin transfer.

#![allow(dead_code)]

use cellpay_core::*;

pub fn id(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}

pub fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

/// Opens a CNY account of the default tenant and asserts it was created.
pub fn open(cell: &mut CellState, name: &str, overdraft: bool) {
    let out = cell.apply(&Command::real(Op::OpenAccount(OpenAccount {
        id: id(name),
        currency: cny(),
        overdraft,
        tenant: TenantId::default_tenant(),
    })));
    assert!(matches!(out, Outcome::AccountOpened { created: true, .. }), "{out:?}");
}

/// A real transfer, as admin, in the payer's currency.
pub fn transfer(tid: &str, from: &str, to: &str, amount: i64) -> Command {
    Command::real(Op::Transfer(Transfer {
        id: TransferId::new(tid).unwrap(),
        from: id(from),
        to: id(to),
        amount,
        currency: None,
        memo: None,
        by: Authority::Admin,
    }))
}
