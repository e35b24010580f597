//! The queue-delay controller of a cell (CoDel-like).
//!
//! A queue that stays long is the sign of overload; a burst that drains is
//! not. So the controller watches the smallest wait seen in each interval (the
//! standing delay, as CoDel does): if even the luckiest request of an interval
//! waited longer than the target, one more class is shed, lowest first
//! (shadow, then history, then balance reads); an interval whose standing
//! delay is back under the target serves one class again. Payments are never
//! shed by delay: they are protected by everything else being shed first.

use std::time::{Duration, Instant};

use cellpay_core::Priority;

/// The most classes the controller sheds: all but payments.
pub const SHED_LEVEL_MAX: usize = Priority::ALL.len() - 1;

pub struct QueueDelay {
    target: Duration,
    interval: Duration,
    interval_start: Instant,
    /// The smallest wait observed since `interval_start`.
    standing: Option<Duration>,
    level: usize,
}

impl QueueDelay {
    pub fn new(target: Duration, interval: Duration) -> Self {
        Self { target, interval, interval_start: Instant::now(), standing: None, level: 0 }
    }

    pub fn target(&self) -> Duration {
        self.target
    }

    /// One request's wait in the queue.
    pub fn observe(&mut self, waited: Duration) {
        self.standing = Some(self.standing.map_or(waited, |s| s.min(waited)));
    }

    /// Closes the interval if it is over, moves the level by at most one, and
    /// answers the level in force.
    pub fn tick(&mut self, now: Instant) -> usize {
        if now.saturating_duration_since(self.interval_start) < self.interval {
            return self.level;
        }
        match self.standing {
            Some(standing) if standing > self.target => self.level = (self.level + 1).min(SHED_LEVEL_MAX),
            _ => self.level = self.level.saturating_sub(1),
        }
        self.interval_start = now;
        self.standing = None;
        self.level
    }

    /// Whether `class` is shed at `level`: the lowest `level` classes are.
    pub fn sheds(level: usize, class: Priority) -> bool {
        class.rank() + level > SHED_LEVEL_MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_shed_the_lowest_classes_first_and_never_payments() {
        assert!(!Priority::ALL.iter().any(|&p| QueueDelay::sheds(0, p)));
        assert!(QueueDelay::sheds(1, Priority::Shadow) && !QueueDelay::sheds(1, Priority::History));
        assert!(QueueDelay::sheds(2, Priority::History) && !QueueDelay::sheds(2, Priority::Reads));
        assert!(QueueDelay::sheds(3, Priority::Reads) && !QueueDelay::sheds(3, Priority::Critical));
    }

    #[test]
    fn a_standing_queue_raises_the_level_one_interval_at_a_time_and_a_drained_one_lowers_it() {
        let interval = Duration::from_millis(100);
        let mut c = QueueDelay::new(Duration::from_millis(5), interval);
        let mut now = Instant::now();
        for expected in [1, 2, 3, 3] {
            c.observe(Duration::from_millis(50));
            c.observe(Duration::from_millis(6));
            now += interval;
            assert_eq!(c.tick(now), expected);
        }
        // A burst inside an interval moves nothing until the interval ends.
        c.observe(Duration::from_millis(1));
        assert_eq!(c.tick(now + Duration::from_millis(10)), 3);
        for expected in [2, 1, 0, 0] {
            c.observe(Duration::from_millis(1));
            c.observe(Duration::from_millis(80));
            now += interval;
            assert_eq!(c.tick(now), expected);
        }
    }
}
