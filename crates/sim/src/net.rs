//! The simulated network between the router, the relays and the cells: a
//! [`SimLink`] is a real [`CellClient`] (the interface a cell in another
//! process will be reached through), whose calls the network may lose before
//! or after the cell acts on them, duplicate, delay, or refuse while the cell
//! is cut off by a partition, or deliver a relay's call to another cell
//! than the one it means (an address gone stale).
//!
//! Every call carries the epoch of the map its sender works at, as the cell
//! protocol does, and meets the same refusal there: a cell behind it answers
//! `wrong_cell`. What a cell does with a call it should have refused (one
//! from a newer map, one meant for another cell) is written down in
//! [`Net::violations`] for the simulation to fail on.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use cellpay_cell::{behind_refusal, BoxFuture, CellClient, CellFigures, CellHandle, CellStatus, EngineError};
use cellpay_core::{CellId, Command, Outcome, Query, QueryAnswer};
use tokio::sync::watch;

use crate::rng::Rng;

/// How often each fault strikes a call, per million calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetFaults {
    /// The request is lost: the cell never sees it.
    pub request_loss: u32,
    /// The cell acts on it, and its answer is lost.
    pub reply_loss: u32,
    /// The request arrives twice (the second answer is dropped).
    pub duplicate: u32,
    /// Calls wait up to this many ticks before they arrive.
    pub delay_ticks_max: u64,
    /// The caller gives up at once (a timeout) while the request is still on
    /// its way: it arrives up to `late_ticks_max` ticks later, after whatever
    /// the caller sent next (a reordering).
    pub late: u32,
    pub late_ticks_max: u64,
    /// A relay's call reaches another cell than the one it means.
    pub misdeliver: u32,
}

/// A request still on its way after its caller gave up on it.
pub type Orphan = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The network's state, shared by every link of one simulation.
pub struct Net {
    rng: Rng,
    /// The simulation's tick, which delayed calls wait for.
    pub tick: u64,
    pub faults: NetFaults,
    /// Cells cut off from everyone: calls to them fail.
    pub cut: BTreeSet<CellId>,
    pub lost_requests: u64,
    pub lost_replies: u64,
    pub duplicates: u64,
    pub late: u64,
    pub misdelivered: u64,
    pub behind_refusals: u64,
    /// Requests delivered late; the simulation polls them every tick.
    pub orphans: Vec<Orphan>,
    /// Every cell's slot, where a misdelivered call lands.
    pub slots: Vec<Slot>,
    /// Calls a cell acted on that it should have refused.
    pub violations: Vec<String>,
}

pub type SharedNet = Arc<Mutex<Net>>;

impl Net {
    pub fn new(rng: Rng) -> SharedNet {
        Arc::new(Mutex::new(Net {
            rng,
            tick: 0,
            faults: NetFaults::default(),
            cut: BTreeSet::new(),
            lost_requests: 0,
            lost_replies: 0,
            duplicates: 0,
            late: 0,
            misdelivered: 0,
            behind_refusals: 0,
            orphans: Vec::new(),
            slots: Vec::new(),
            violations: Vec::new(),
        }))
    }
}

/// What happens to one call, decided when it is made.
struct Fate {
    arrive_at: u64,
    request_lost: bool,
    reply_lost: bool,
    duplicate: bool,
    /// Arrives at this tick, after the caller gave up.
    late_at: Option<u64>,
    /// Reaches this other cell (a misdeliverable link's submit only).
    elsewhere: Option<usize>,
}

fn fate(net: &SharedNet) -> Fate {
    let mut n = net.lock().expect("one thread");
    let f = n.faults;
    let delay = if f.delay_ticks_max > 0 { n.rng.below(f.delay_ticks_max + 1) } else { 0 };
    let fate = Fate {
        arrive_at: n.tick + delay,
        request_lost: n.rng.chance(f.request_loss),
        reply_lost: n.rng.chance(f.reply_loss),
        duplicate: n.rng.chance(f.duplicate),
        late_at: None,
        elsewhere: None,
    };
    let late = n.rng.chance(f.late);
    let fate = Fate { late_at: late.then(|| n.tick + 1 + n.rng.below(f.late_ticks_max.max(1))), ..fate };
    n.late += u64::from(late);
    n.lost_requests += u64::from(fate.request_lost);
    n.lost_replies += u64::from(fate.reply_lost);
    n.duplicates += u64::from(fate.duplicate);
    fate
}

/// Ready once the simulation's tick reaches `at` (the simulation polls every
/// pending call each tick, so no waker is needed).
struct Until {
    net: SharedNet,
    at: u64,
}

impl Future for Until {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.net.lock().expect("one thread").tick >= self.at {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The engine a cell runs now, if any (empty while it is down).
pub type Slot = Arc<Mutex<Option<CellHandle>>>;

/// A [`CellClient`] that reaches a cell through the simulated network.
pub struct SimLink {
    cell: CellId,
    slot: Slot,
    net: SharedNet,
    /// The figures last seen, answered while the cell is down.
    figures: Mutex<Arc<CellFigures>>,
    outbox: watch::Sender<u64>,
    /// The epoch of the map the link's owner works at, sent with every call.
    sender_epoch: AtomicU64,
    /// Whether its submits may reach another cell (a relay's link to its peer).
    misdeliverable: bool,
}

impl SimLink {
    pub fn new(cell: CellId, slot: Slot, net: SharedNet) -> Self {
        Self {
            cell,
            slot,
            net,
            figures: Mutex::new(Arc::default()),
            outbox: watch::Sender::new(0),
            sender_epoch: AtomicU64::new(0),
            misdeliverable: false,
        }
    }

    /// A link whose submits the network may deliver to another cell.
    pub fn misdeliverable(cell: CellId, slot: Slot, net: SharedNet) -> Self {
        Self { misdeliverable: true, ..Self::new(cell, slot, net) }
    }

    /// The fate of a submit: a misdeliverable link's may go elsewhere.
    fn submit_fate(&self) -> Fate {
        let mut fate = fate(&self.net);
        if self.misdeliverable {
            let mut n = self.net.lock().expect("one thread");
            let (rate, cells) = (n.faults.misdeliver, n.slots.len());
            if cells > 1 && n.rng.chance(rate) {
                let other = (self.cell.0 as usize + 1 + n.rng.below(cells as u64 - 1) as usize) % cells;
                fate.elsewhere = Some(other);
                n.misdelivered += 1;
            }
        }
        fate
    }

    fn handle(&self) -> Option<CellHandle> {
        self.slot.lock().expect("one thread").clone()
    }

    fn unavailable(cell: CellId, reason: &str) -> EngineError {
        EngineError::Unavailable { cell, reason: format!("simulated network: {reason}") }
    }

    /// Waits for the call's arrival; answers the handle of the cell it
    /// reaches (its own, or another's when misdelivered) if it can be reached.
    async fn arrive(cell: CellId, slot: &Slot, net: &SharedNet, fate: &Fate) -> Result<CellHandle, EngineError> {
        Until { net: net.clone(), at: fate.arrive_at }.await;
        if fate.request_lost {
            return Err(Self::unavailable(cell, "request lost"));
        }
        if net.lock().expect("one thread").cut.contains(&cell) {
            return Err(Self::unavailable(cell, "partitioned"));
        }
        let slot = match fate.elsewhere {
            Some(other) => net.lock().expect("one thread").slots[other].clone(),
            None => slot.clone(),
        };
        let handle = slot.lock().expect("one thread").clone();
        handle.ok_or_else(|| Self::unavailable(cell, "the cell is down"))
    }

    /// Why `handle`'s cell should refuse a call this link sent at `sender`'s
    /// epoch, if it should: it comes from a newer map, or was meant for another cell.
    fn refusable(&self, handle: &CellHandle, sender: u64) -> Option<String> {
        let mine = handle.epoch();
        if sender > mine {
            return Some(format!(
                "cell {} at epoch {mine} acted on a call from a sender at epoch {sender}",
                handle.cell()
            ));
        }
        (handle.cell() != self.cell)
            .then(|| format!("cell {} acted on a call meant for cell {}", handle.cell(), self.cell))
    }

    /// Submits `commands` as the cell protocol delivers them: refused whole
    /// while the cell is behind the sender's map. An answer that changed
    /// state where the call should have been refused is a violation.
    async fn deliver(
        net: &SharedNet,
        handle: &CellHandle,
        sender_epoch: u64,
        refusable: Option<String>,
        commands: Vec<Command>,
        duplicate: bool,
    ) -> Result<Vec<Outcome>, EngineError> {
        if let Some(refused) = behind_refusal(handle.cell(), handle.epoch(), sender_epoch) {
            net.lock().expect("one thread").behind_refusals += 1;
            return Ok(vec![Outcome::Rejected(refused); commands.len()]);
        }
        let first = handle.submit(commands.clone());
        if duplicate {
            let _ = handle.submit(commands);
        }
        let answer = match first {
            Ok(submission) => submission.wait().await,
            Err(e) => Err(e),
        };
        if let (Some(why), Ok(outcomes)) = (refusable, &answer) {
            if outcomes.iter().any(Outcome::changed_state) {
                net.lock().expect("one thread").violations.push(format!("{why}: {outcomes:?}"));
            }
        }
        answer
    }

    fn reply<T>(cell: CellId, net: &SharedNet, fate: &Fate, answer: Result<T, EngineError>) -> Result<T, EngineError> {
        if fate.reply_lost || net.lock().expect("one thread").cut.contains(&cell) {
            return Err(Self::unavailable(cell, "reply lost"));
        }
        answer
    }
}

impl CellClient for SimLink {
    fn cell(&self) -> CellId {
        self.cell
    }

    fn status(&self) -> CellStatus {
        match self.handle() {
            Some(h) => CellClient::status(&h),
            None => CellStatus::down(self.cell, "down (simulated)"),
        }
    }

    fn submit(&self, commands: Vec<Command>) -> BoxFuture<'_, Result<Vec<Outcome>, EngineError>> {
        let fate = self.submit_fate();
        let sender_epoch = self.sender_epoch.load(Relaxed);
        if let Some(at) = fate.late_at {
            let (cell, slot, net) = (self.cell, self.slot.clone(), self.net.clone());
            let orphan: Orphan = Box::pin(async move {
                Until { net: net.clone(), at }.await;
                let handle = slot.lock().expect("one thread").clone();
                let cut = net.lock().expect("one thread").cut.contains(&cell);
                if let (false, Some(handle)) = (cut, handle) {
                    // Its answer goes to a caller that gave up.
                    let refusable = (sender_epoch > handle.epoch()).then(|| {
                        format!(
                            "cell {cell} at epoch {} acted on a late call from epoch {sender_epoch}",
                            handle.epoch()
                        )
                    });
                    let _ = Self::deliver(&net, &handle, sender_epoch, refusable, commands, false).await;
                }
            });
            self.net.lock().expect("one thread").orphans.push(orphan);
            return Box::pin(
                async move { Err(Self::unavailable(cell, "timed out (the request is still on its way)")) },
            );
        }
        Box::pin(async move {
            let handle = Self::arrive(self.cell, &self.slot, &self.net, &fate).await?;
            let refusable = self.refusable(&handle, sender_epoch);
            let answer = Self::deliver(&self.net, &handle, sender_epoch, refusable, commands, fate.duplicate).await;
            Self::reply(self.cell, &self.net, &fate, answer)
        })
    }

    fn query(&self, query: Query) -> BoxFuture<'_, Result<QueryAnswer, EngineError>> {
        let fate = fate(&self.net);
        Box::pin(async move {
            let handle = Self::arrive(self.cell, &self.slot, &self.net, &fate).await?;
            let sender_epoch = self.sender_epoch.load(Relaxed);
            if let Some(refused) = behind_refusal(handle.cell(), handle.epoch(), sender_epoch) {
                self.net.lock().expect("one thread").behind_refusals += 1;
                return Self::reply(self.cell, &self.net, &fate, Ok(QueryAnswer::Rejected(refused)));
            }
            let answer = match handle.query(query) {
                Ok(submission) => submission.wait().await,
                Err(e) => Err(e),
            };
            Self::reply(self.cell, &self.net, &fate, answer)
        })
    }

    fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.outbox.subscribe()
    }

    fn figures(&self) -> Arc<CellFigures> {
        let mut seen = self.figures.lock().expect("one thread");
        if let Some(h) = self.handle() {
            *seen = h.figures();
        }
        seen.clone()
    }

    fn set_outbox_messages_max(&self, max: u64) {
        if let Some(h) = self.handle() {
            h.set_outbox_messages_max(max);
        }
    }

    fn set_sender_epoch(&self, epoch: u64) {
        self.sender_epoch.fetch_max(epoch, Relaxed);
    }
}
