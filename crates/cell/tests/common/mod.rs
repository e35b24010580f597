//! Commands the cell tests send.

use cellpay_core::*;

pub fn cny() -> Currency {
    Currency::new("CNY").unwrap()
}

pub fn open_cmd(id: &str, overdraft: bool) -> Command {
    Command::real(Op::OpenAccount(OpenAccount {
        id: AccountId::new(id).unwrap(),
        currency: cny(),
        overdraft,
        tenant: TenantId::default_tenant(),
    }))
}

pub fn transfer_cmd(id: &str, from: &str, to: &str, amount: i64) -> Command {
    Command::real(Op::Transfer(Transfer {
        id: TransferId::new(id).unwrap(),
        from: AccountId::new(from).unwrap(),
        to: AccountId::new(to).unwrap(),
        amount,
        currency: None,
        memo: None,
        by: Authority::Admin,
    }))
}
