//! The degrade plan: declared switches, their triggers, and their state.
//!
//! The plan is a TOML file of switches, each one of the actions cellpay knows
//! how to take ([`Action`]), with what it does, an optional trigger (a
//! measured signal above a threshold for a duration) and a release (below a
//! threshold for a duration). An operator can force a switch on or off, or
//! hand it back to its trigger. Only declared switches exist: an action the
//! plan does not name is never taken, whatever the signals say. Every change
//! is logged, counted in metrics, and kept in the switch's history.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::protect::rules::RulesError;

/// The bundled plan, used when none is configured.
pub const PLAN_BUNDLED: &str = include_str!("../degrade.toml");
/// The most switches a plan may declare: one per action.
pub const SWITCHES_MAX: usize = Action::ALL.len();

/// What a switch does when on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    ShadowOff,
    HistoryOff,
    BalanceReadsStale,
    CrossCellDefer,
}

impl Action {
    pub const ALL: [Action; 4] =
        [Action::ShadowOff, Action::HistoryOff, Action::BalanceReadsStale, Action::CrossCellDefer];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::ShadowOff => "shadow_off",
            Action::HistoryOff => "history_off",
            Action::BalanceReadsStale => "balance_reads_stale",
            Action::CrossCellDefer => "cross_cell_defer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// A measured signal a trigger watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    CriticalP99Ms,
    CriticalShedRatio,
    FrontDelayMs,
    QueueDelayMs,
    ErrorRatio,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::CriticalP99Ms => "critical_p99_ms",
            Signal::CriticalShedRatio => "critical_shed_ratio",
            Signal::FrontDelayMs => "front_delay_ms",
            Signal::QueueDelayMs => "queue_delay_ms",
            Signal::ErrorRatio => "error_ratio",
        }
    }
}

/// The signals as measured over the latest window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Signals {
    /// p99 of critical requests at the HTTP front, arrival to answer.
    pub critical_p99_ms: f64,
    /// Share of critical requests the HTTP front refused (its concurrency limit).
    pub critical_shed_ratio: f64,
    /// The shortest wait from arrival to admission at the HTTP front.
    pub front_delay_ms: f64,
    pub queue_delay_ms: f64,
    pub error_ratio: f64,
}

impl Signals {
    pub fn get(&self, s: Signal) -> f64 {
        match s {
            Signal::CriticalP99Ms => self.critical_p99_ms,
            Signal::CriticalShedRatio => self.critical_shed_ratio,
            Signal::FrontDelayMs => self.front_delay_ms,
            Signal::QueueDelayMs => self.queue_delay_ms,
            Signal::ErrorRatio => self.error_ratio,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub signal: Signal,
    pub above: f64,
    pub for_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub below: f64,
    pub for_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchPlan {
    pub name: Action,
    pub description: String,
    #[serde(default)]
    pub trigger: Option<Trigger>,
    #[serde(default)]
    pub release: Option<Release>,
    /// For `balance_reads_stale`: the oldest cached balance served.
    #[serde(default)]
    pub stale_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default, rename = "switch")]
    pub switches: Vec<SwitchPlan>,
}

/// The longest a trigger or release may wait, and the oldest stale read (I7).
pub const HOLD_S_MAX: f64 = 3600.0;
pub const STALE_MS_MAX: u64 = 60_000;

impl Plan {
    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let plan: Self = toml::from_str(text)?;
        plan.check()?;
        Ok(plan)
    }

    pub fn from_json(text: &[u8]) -> Result<Self, RulesError> {
        let plan: Self = serde_json::from_slice(text)?;
        plan.check()?;
        Ok(plan)
    }

    /// Every switch sound; the message names the first that is not.
    pub fn check(&self) -> Result<(), RulesError> {
        let hold = |s: f64| s.is_finite() && (0.0..=HOLD_S_MAX).contains(&s);
        for (i, s) in self.switches.iter().enumerate() {
            let name = s.name.as_str();
            if self.switches[..i].iter().any(|o| o.name == s.name) {
                return Err(format!("switch {name} is declared twice").into());
            }
            if s.description.trim().is_empty() {
                return Err(format!("switch {name}: say what it does in description").into());
            }
            match (&s.trigger, &s.release) {
                (Some(t), Some(r)) => {
                    if !(t.above.is_finite() && r.below.is_finite() && hold(t.for_s) && hold(r.for_s)) {
                        return Err(
                            format!("switch {name}: thresholds must be numbers and for_s 0..={HOLD_S_MAX}").into()
                        );
                    }
                    if r.below > t.above {
                        return Err(format!("switch {name}: release.below must not exceed trigger.above").into());
                    }
                }
                (Some(_), None) => {
                    return Err(format!("switch {name}: a trigger needs a release (when it turns off)").into())
                }
                (None, Some(_)) => {
                    return Err(format!("switch {name}: a release without a trigger means nothing").into())
                }
                (None, None) => {}
            }
            match (s.name, s.stale_ms) {
                (Action::BalanceReadsStale, Some(ms)) if (1..=STALE_MS_MAX).contains(&ms) => {}
                (Action::BalanceReadsStale, _) => {
                    return Err(format!("switch {name}: stale_ms must be between 1 and {STALE_MS_MAX}").into())
                }
                (_, Some(_)) => return Err(format!("switch {name}: only balance_reads_stale takes stale_ms").into()),
                (_, None) => {}
            }
        }
        Ok(())
    }
}

/// An operator named a switch the plan does not declare.
#[derive(Debug, thiserror::Error)]
#[error("the degrade plan declares no switch named {name:?}")]
pub struct UnknownSwitch {
    pub name: String,
}

/// How an operator set a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Driven by its trigger (a manual-only switch stays off).
    Auto,
    On,
    Off,
}

/// A switch turned on or off, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub switch: &'static str,
    pub active: bool,
    /// `operator` or `trigger`.
    pub by: &'static str,
    pub reason: String,
    pub at_unix_ms: u64,
}

struct SwitchState {
    plan: SwitchPlan,
    mode: Mode,
    /// Where the trigger alone would have the switch.
    triggered: bool,
    /// Since when the signal has been past the trigger (or release) threshold.
    past_since: Option<Instant>,
}

impl SwitchState {
    fn active(&self) -> bool {
        match self.mode {
            Mode::On => true,
            Mode::Off => false,
            Mode::Auto => self.triggered,
        }
    }
}

/// The most changes kept for the admin API and the dashboard (I7).
pub const CHANGES_KEPT: usize = 64;

pub struct Degrade {
    inner: Mutex<(Vec<SwitchState>, Vec<Change>)>,
    /// Fast flags, one per action, read on the request path (and by the relays).
    flags: [Arc<AtomicBool>; 4],
    stale_ms: AtomicU64,
    pub changes_total: AtomicU64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One switch as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchView {
    #[serde(flatten)]
    pub plan: SwitchPlan,
    pub mode: Mode,
    pub active: bool,
}

impl Degrade {
    pub fn new(plan: Plan) -> Self {
        let d = Self {
            inner: Mutex::new((Vec::new(), Vec::new())),
            flags: Default::default(),
            stale_ms: AtomicU64::new(0),
            changes_total: AtomicU64::new(0),
        };
        d.replace(plan);
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<SwitchState>, Vec<Change>)> {
        self.inner.lock().expect("degrade lock is never held across a panic")
    }

    /// Whether `action` is in force. False for anything the plan does not declare.
    pub fn is_on(&self, action: Action) -> bool {
        self.flags[action as usize].load(Relaxed)
    }

    /// The flag of `action`, for a part that checks it on its own (the relays).
    pub fn flag(&self, action: Action) -> Arc<AtomicBool> {
        self.flags[action as usize].clone()
    }

    /// The oldest cached balance `balance_reads_stale` may serve.
    pub fn stale_max(&self) -> Duration {
        Duration::from_millis(self.stale_ms.load(Relaxed))
    }

    /// Installs a new (checked) plan; a switch kept by name keeps its mode and state.
    pub fn replace(&self, plan: Plan) {
        let mut inner = self.lock();
        let old = std::mem::take(&mut inner.0);
        inner.0 = plan
            .switches
            .into_iter()
            .map(|p| match old.iter().find(|o| o.plan.name == p.name) {
                Some(o) => SwitchState { plan: p, mode: o.mode, triggered: o.triggered, past_since: None },
                None => SwitchState { plan: p, mode: Mode::Auto, triggered: false, past_since: None },
            })
            .collect();
        self.publish(&mut inner, "operator", "a new degrade plan");
    }

    /// Sets the flags from the states, logging and recording every flip.
    fn publish(&self, inner: &mut (Vec<SwitchState>, Vec<Change>), by: &'static str, reason: &str) {
        for action in Action::ALL {
            let state = inner.0.iter().find(|s| s.plan.name == action);
            let active = state.is_some_and(SwitchState::active);
            if let Some(s) = state.filter(|s| s.plan.name == Action::BalanceReadsStale) {
                self.stale_ms.store(s.plan.stale_ms.unwrap_or(0), Relaxed);
            }
            if self.flags[action as usize].swap(active, Relaxed) != active {
                let change =
                    Change { switch: action.as_str(), active, by, reason: reason.to_string(), at_unix_ms: unix_ms() };
                tracing::warn!(
                    switch = change.switch,
                    active,
                    by,
                    "degrade switch turned {}: {reason}",
                    if active { "on" } else { "off" }
                );
                metrics::counter!("cellpay_degrade_changes_total", "switch" => action.as_str(), "to" => if active { "on" } else { "off" }).increment(1);
                self.changes_total.fetch_add(1, Relaxed);
                if inner.1.len() == CHANGES_KEPT {
                    inner.1.remove(0);
                }
                inner.1.push(change);
            }
            metrics::gauge!("cellpay_degrade_active", "switch" => action.as_str()).set(if active { 1.0 } else { 0.0 });
        }
    }

    /// An operator's order; `Err` when the plan declares no such switch.
    pub fn set(&self, name: &str, mode: Mode) -> Result<SwitchView, UnknownSwitch> {
        let mut inner = self.lock();
        let Some(state) = inner.0.iter_mut().find(|s| s.plan.name.as_str() == name) else {
            return Err(UnknownSwitch { name: name.to_string() });
        };
        state.mode = mode;
        let view = SwitchView { plan: state.plan.clone(), mode, active: state.active() };
        let reason = format!("operator set {name} to {mode:?}");
        self.publish(&mut inner, "operator", &reason);
        Ok(view)
    }

    /// Feeds the latest signals to every trigger.
    pub fn evaluate(&self, signals: &Signals, now: Instant) {
        let mut inner = self.lock();
        let mut reasons = Vec::new();
        for s in inner.0.iter_mut() {
            let (Some(t), Some(r)) = (s.plan.trigger, s.plan.release) else { continue };
            let value = signals.get(t.signal);
            let (past, hold) = if s.triggered { (value < r.below, r.for_s) } else { (value > t.above, t.for_s) };
            if !past {
                s.past_since = None;
                continue;
            }
            let since = *s.past_since.get_or_insert(now);
            if now.saturating_duration_since(since).as_secs_f64() >= hold {
                s.triggered = !s.triggered;
                s.past_since = None;
                let (word, limit) = if s.triggered { ("above", t.above) } else { ("below", r.below) };
                reasons.push(format!("{} = {value:.2} {word} {limit} for {hold} s", t.signal.as_str()));
            }
        }
        if !reasons.is_empty() {
            self.publish(&mut inner, "trigger", &reasons.join("; "));
        }
    }

    pub fn switches(&self) -> Vec<SwitchView> {
        let inner = self.lock();
        inner.0.iter().map(|s| SwitchView { plan: s.plan.clone(), mode: s.mode, active: s.active() }).collect()
    }

    /// The latest changes, oldest first.
    pub fn changes(&self) -> Vec<Change> {
        self.lock().1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_plan_is_valid_and_declares_every_action() {
        let plan = Plan::from_toml(PLAN_BUNDLED).unwrap();
        assert_eq!(plan.switches.len(), SWITCHES_MAX);
    }

    #[test]
    fn a_trigger_holds_for_its_duration_then_releases_after_its_own() {
        let plan = Plan::from_toml(
            r#"[[switch]]
name = "history_off"
description = "x"
trigger = { signal = "critical_p99_ms", above = 100.0, for_s = 2.0 }
release = { below = 20.0, for_s = 5.0 }"#,
        )
        .unwrap();
        let d = Degrade::new(plan);
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let hot = Signals { critical_p99_ms: 150.0, ..Signals::default() };
        let calm = Signals { critical_p99_ms: 10.0, ..Signals::default() };
        d.evaluate(&hot, at(0.0));
        d.evaluate(&hot, at(1.9));
        assert!(!d.is_on(Action::HistoryOff));
        d.evaluate(&hot, at(2.0));
        assert!(d.is_on(Action::HistoryOff));
        d.evaluate(&calm, at(3.0));
        d.evaluate(&hot, at(4.0));
        d.evaluate(&calm, at(5.0));
        d.evaluate(&calm, at(9.9));
        assert!(d.is_on(Action::HistoryOff), "the calm spell was broken at 4 s");
        d.evaluate(&calm, at(10.0));
        assert!(!d.is_on(Action::HistoryOff));
        assert!(!d.is_on(Action::ShadowOff), "an undeclared switch never turns on");
        assert_eq!(d.changes().len(), 2);
        assert!(d.set("shadow_off", Mode::On).is_err());
    }

    #[test]
    fn bad_plans_are_refused_with_the_switch_named() {
        let bad = |text: &str| Plan::from_toml(text).unwrap_err().to_string();
        assert!(bad("[[switch]]\nname = \"payments_off\"\ndescription = \"x\"").contains("payments_off"));
        assert!(bad("[[switch]]\nname = \"history_off\"\ndescription = \"x\"\ntrigger = { signal = \"error_ratio\", above = 0.5, for_s = 1.0 }")
            .contains("needs a release"));
        assert!(bad("[[switch]]\nname = \"balance_reads_stale\"\ndescription = \"x\"").contains("stale_ms"));
    }
}
