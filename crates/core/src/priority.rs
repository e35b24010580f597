//! Priority classes (DESIGN.md section 6), highest first: payments and their
//! status; balance reads; history; shadow traffic. Under overload the lowest
//! class is shed first. The class follows from the work itself, so the router,
//! the engine and the metrics all classify a request the same way.

use crate::command::{Command, Op, Query};

/// A priority class. The order of the variants is the order of importance:
/// `Critical < Reads < History < Shadow`, and a larger rank is shed earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Payments, payment status, account opening, the relay's legs, operator reads.
    Critical = 0,
    /// Balance reads.
    Reads = 1,
    /// History and other best-effort reads.
    History = 2,
    /// Stress-test traffic: shed before anything real.
    Shadow = 3,
}

impl Priority {
    /// Every class, highest first.
    pub const ALL: [Priority; 4] = [Priority::Critical, Priority::Reads, Priority::History, Priority::Shadow];

    pub fn rank(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Reads => "reads",
            Priority::History => "history",
            Priority::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The class of a request that is shadow or not and would otherwise be `real`.
    pub fn of(shadow: bool, real: Priority) -> Self {
        if shadow {
            Priority::Shadow
        } else {
            real
        }
    }
}

impl Command {
    /// Commands that move or create money are critical; shadow ones are shadow.
    pub fn priority(&self) -> Priority {
        if self.op.is_control() {
            // A shard map is installed by the operator, never shed.
            return Priority::Critical;
        }
        Priority::of(self.shadow, Priority::Critical)
    }
}

impl Op {
    /// A shard move's step or a shard map's install: the cluster's control
    /// work, which goes ahead of queued payments at a cell (its control lane)
    /// and on the way to it (a call of its own), so that a move's write pause
    /// never waits behind a busy cell's payments once per step.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            Op::InstallShardMap(_)
                | Op::FreezeShard { .. }
                | Op::UnfreezeShard { .. }
                | Op::InstallShard(_)
                | Op::DiscardShard { .. }
                | Op::DropShard { .. }
        )
    }
}

/// Whether a whole submission is control work (see [`Op::is_control`]).
pub fn is_control(commands: &[Command]) -> bool {
    !commands.is_empty() && commands.iter().all(|c| c.op.is_control())
}

impl Query {
    /// A shard move's reads: its export and its copy of the disk tier.
    pub fn is_control(&self) -> bool {
        matches!(self, Query::ExportShard { .. } | Query::TierPage { .. } | Query::TierImport { .. })
    }

    pub fn priority(&self) -> Priority {
        match self {
            Query::Account { shadow, .. } => Priority::of(*shadow, Priority::Reads),
            Query::Entries { shadow, .. } => Priority::of(*shadow, Priority::History),
            Query::Transfer { shadow, .. } => Priority::of(*shadow, Priority::Critical),
            // The relay, the audit and the digests keep money moving and provable.
            Query::Outbox { shadow, .. } => Priority::of(*shadow, Priority::Critical),
            Query::Digests { .. }
            | Query::Figures { .. }
            | Query::InboxAt { .. }
            | Query::OutboxAt { .. }
            | Query::ExportShard { .. }
            | Query::TierPage { .. }
            | Query::TierImport { .. }
            | Query::ShardLoad => Priority::Critical,
            // The full audit walks every account: it waits behind everything real.
            Query::Audit { .. } => Priority::Shadow,
        }
    }
}

/// The class of a whole submission: its most important command.
pub fn priority_of(commands: &[Command]) -> Priority {
    commands.iter().map(Command::priority).min().unwrap_or(Priority::Critical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Authority;

    #[test]
    fn classes_order_and_names_round_trip() {
        assert!(Priority::Critical < Priority::Reads && Priority::Reads < Priority::History);
        assert!(Priority::History < Priority::Shadow);
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse("payments"), None);
    }

    #[test]
    fn shadow_reads_are_shadow_and_real_reads_keep_their_class() {
        let id = crate::AccountId::new("a").unwrap();
        let q = |shadow| Query::Entries { shadow, account: id.clone(), limit: 1, before: None, by: Authority::Admin };
        assert_eq!(q(false).priority(), Priority::History);
        assert_eq!(q(true).priority(), Priority::Shadow);
        assert_eq!(Query::Account { shadow: false, id: id.clone(), by: Authority::Admin }.priority(), Priority::Reads);
    }
}
