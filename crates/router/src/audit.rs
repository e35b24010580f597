//! The cluster audit: I1 and I4 over every cell, for one ledger.

use cellpay_cell::EngineError;
use cellpay_core::{AuditView, CellId, Query, QueryAnswer};
use tokio::task::JoinSet;

use crate::cluster::Cluster;

/// I1 and I4 for one ledger over the whole cluster.
#[derive(Debug, Clone)]
pub struct LedgerAudit {
    /// Σ balances + money in flight between cells: zero when money is conserved.
    pub sum: i128,
    /// Σ balances over all accounts of all cells.
    pub balances: i128,
    /// Money debited in one cell and not yet credited (or credited back) in another.
    pub in_flight: i128,
    pub negative_accounts: u64,
    pub cells: Vec<(CellId, AuditView)>,
}

impl LedgerAudit {
    pub fn ok(&self) -> bool {
        self.sum == 0 && self.negative_accounts == 0
    }
}

pub type ClusterAudit = Result<LedgerAudit, (CellId, EngineError)>;

impl Cluster {
    /// Reads every cell's audit figures. Each cell keeps its own part of the
    /// conservation identity with every batch, so the cells may be read at
    /// different moments and the sum is still exact.
    pub async fn audit(&self, shadow: bool) -> ClusterAudit {
        let mut tasks = JoinSet::new();
        for cell in self.cells() {
            let cell = cell.clone();
            tasks.spawn(async move { (cell.cell(), cell.query(Query::Audit { shadow }).await) });
        }
        let mut cells = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (cell, answer) = joined.expect("audit tasks do not panic");
            match answer {
                Ok(QueryAnswer::Audit(view)) => cells.push((cell, view)),
                Ok(other) => {
                    let reason = format!("audit answered {other:?}");
                    return Err((cell, EngineError::Unavailable { cell, reason }));
                }
                Err(e) => return Err((cell, e)),
            }
        }
        cells.sort_by_key(|(c, _)| *c);
        let balances = cells.iter().map(|(_, v)| v.balance_sum).sum::<i128>();
        let sum = cells.iter().map(|(_, v)| v.conservation_term()).sum::<i128>();
        let negative_accounts = cells.iter().map(|(_, v)| v.negative_accounts).sum();
        Ok(LedgerAudit { sum, balances, in_flight: sum - balances, negative_accounts, cells })
    }
}
