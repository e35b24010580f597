//! [`RemoteCell`]: a [`CellClient`] for a cell in another process.
//!
//! One HTTP/2 connection per peer carries every call, multiplexed. Each call
//! has a deadline; at most [`RemoteConfig::in_flight_max`] submit calls are
//! in flight to one peer, and while they are, the commands that arrive queue
//! per priority class and leave together as one call when a slot frees (a
//! network hop per payment would not keep up). A peer that cannot be reached
//! answers `cell_unavailable` at once: the connection is refused, or it
//! cannot be opened within the connect timeout, and the calls that follow
//! fail fast until it can.
//!
//! The status, figures and outbox generation are read by a background poll
//! every [`RemoteConfig::status_poll`]: `status()` and `figures()` never wait
//! on the network.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellpay_cell::{BoxFuture, CellClient, CellFigures, CellStatus, EngineError};
use cellpay_core::{priority_of, CellId, Command, Outcome, Priority, Query, QueryAnswer, ShardMap};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::codec;
use crate::secret::ClusterSecret;
use crate::server::{CELL_HEADER, EPOCH_HEADER, PROTOCOL_HEADER, REQUEST_ID_HEADER};

/// Limits and clocks of one peer's client (I7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteConfig {
    /// Time to open a connection; past it the call answers `cell_unavailable`.
    pub connect_timeout: Duration,
    /// Deadline of one submit or query, from sending to the whole answer.
    pub call_timeout: Duration,
    /// Submit calls in flight to this peer at once: while they are, commands
    /// queue and leave together (fewer, larger calls; 2 measured best here,
    /// docs/BENCHMARKS.md).
    pub in_flight_max: usize,
    /// Query calls in flight to this peer at once (apart, so a slow audit read
    /// never holds back payments).
    pub queries_in_flight_max: usize,
    /// Control calls in flight to this peer at once: a shard move's steps and
    /// map installs ([`cellpay_core::Op::is_control`]), each sent as a call of
    /// its own, never queued behind payments for a submit or query slot.
    pub control_in_flight_max: usize,
    /// The most commands coalesced into one call (a caller's own batch is
    /// never split, and goes alone when it is larger).
    pub coalesce_commands_max: usize,
    /// Commands waiting for a call slot, across classes; past it, `overloaded`.
    pub queued_commands_max: usize,
    /// How often the status is read.
    pub status_poll: Duration,
}

/// A call's body: one that starts with its protocol version (a codec body),
/// or raw bytes (a limit, or nothing) that speak version 1.
enum Body {
    Versioned(Vec<u8>),
    Raw(Vec<u8>),
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            call_timeout: Duration::from_secs(5),
            in_flight_max: 2,
            queries_in_flight_max: 16,
            control_in_flight_max: 4,
            coalesce_commands_max: 4096,
            queued_commands_max: 65_536,
            status_poll: Duration::from_millis(100),
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<Outcome>, EngineError>>;

/// One caller's commands waiting for a call.
struct Waiting {
    commands: Vec<Command>,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    commands: usize,
}

struct Inner {
    cell: CellId,
    address: RwLock<String>,
    secret: ClusterSecret,
    config: RemoteConfig,
    /// The open connection, if any; replaced after a failure.
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    slots: Arc<Semaphore>,
    query_slots: Arc<Semaphore>,
    control_slots: Semaphore,
    /// Per priority class, in `Priority::ALL` order.
    queues: [Mutex<Queue>; 4],
    queued: AtomicU64,
    /// Wakes the flusher when commands are queued.
    wake: Arc<tokio::sync::Notify>,
    status: RwLock<CellStatus>,
    figures: RwLock<Arc<CellFigures>>,
    outbox: watch::Sender<u64>,
    request_ids: AtomicU64,
    /// The outbox limit the flow rules set (0: none), and whether the cell
    /// as now running has it: a restarted cell is sent it again.
    outbox_max: AtomicU64,
    outbox_max_delivered: std::sync::atomic::AtomicBool,
    /// Calls sent, and commands they carried: their ratio is the coalescing.
    calls: AtomicU64,
    commands_sent: AtomicU64,
    /// The epoch of the shard map this client's owner works at (0: unknown),
    /// sent with every submit and query.
    sender_epoch: AtomicU64,
    /// The runtime the client was started on: its tasks (connections,
    /// flushes) run there, whichever runtime a call comes from.
    runtime: tokio::runtime::Handle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The flusher waits on this: it wakes, finds no client, and ends.
        self.wake.notify_one();
    }
}

/// Runs a connection's tasks on the runtime its client was started on.
#[derive(Clone)]
struct OnRuntime(tokio::runtime::Handle);

impl<F> hyper::rt::Executor<F> for OnRuntime
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// A cell in another process.
#[derive(Clone)]
pub struct RemoteCell(Arc<Inner>);

fn class_index(p: Priority) -> usize {
    Priority::ALL.iter().position(|&q| q == p).expect("every class is listed")
}

impl RemoteCell {
    /// A client of cell `cell` at `address` (host:port); starts its status
    /// poll, which ends when the last clone is dropped. Needs a tokio runtime.
    pub fn start(cell: CellId, address: &str, secret: ClusterSecret, config: RemoteConfig) -> Self {
        let inner = Arc::new(Inner {
            cell,
            address: RwLock::new(address.to_string()),
            secret,
            config,
            conn: tokio::sync::Mutex::new(None),
            slots: Arc::new(Semaphore::new(config.in_flight_max)),
            query_slots: Arc::new(Semaphore::new(config.queries_in_flight_max)),
            control_slots: Semaphore::new(config.control_in_flight_max.max(1)),
            queues: Default::default(),
            queued: AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            status: RwLock::new(CellStatus::down(cell, "not reached yet")),
            figures: RwLock::new(Arc::default()),
            outbox: watch::Sender::new(0),
            request_ids: AtomicU64::new(0),
            outbox_max: AtomicU64::new(0),
            outbox_max_delivered: std::sync::atomic::AtomicBool::new(false),
            calls: AtomicU64::new(0),
            commands_sent: AtomicU64::new(0),
            sender_epoch: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(poll_status(Arc::downgrade(&inner)));
        tokio::spawn(flush_queues(Arc::downgrade(&inner), inner.wake.clone()));
        Self(inner)
    }

    pub fn address(&self) -> String {
        self.0.address.read().expect("address lock").clone()
    }

    /// Points the client at a new address (the cell moved); the next call connects there.
    pub fn set_address(&self, address: &str) {
        let mut current = self.0.address.write().expect("address lock");
        if *current != address {
            *current = address.to_string();
            drop(current);
            if let Ok(mut conn) = self.0.conn.try_lock() {
                *conn = None;
            }
        }
    }

    /// Calls sent and commands they carried, since start.
    pub fn sent(&self) -> (u64, u64) {
        (self.0.calls.load(Relaxed), self.0.commands_sent.load(Relaxed))
    }
}

/// Opens a connection to `address` (TCP, then the HTTP/2 handshake, each
/// within the connect timeout) whose tasks run on `runtime`.
async fn open_connection(
    cell: CellId,
    address: String,
    config: RemoteConfig,
    runtime: tokio::runtime::Handle,
) -> Result<SendRequest<Full<Bytes>>, String> {
    let connect = tokio::net::TcpStream::connect(address.as_str());
    let tcp = match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("cannot connect to {address}: {e}")),
        Err(_) => return Err(format!("no connection to {address} within {} ms", config.connect_timeout.as_millis())),
    };
    let _ = tcp.set_nodelay(true);
    let mut builder = hyper::client::conn::http2::Builder::new(OnRuntime(runtime.clone()));
    builder
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .keep_alive_interval(crate::server::KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(crate::server::KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let handshake = builder.handshake(TokioIo::new(tcp));
    let (sender, connection) = match tokio::time::timeout(config.connect_timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(format!("HTTP/2 handshake with {address} failed: {e}")),
        Err(_) => return Err(format!("HTTP/2 handshake with {address} timed out")),
    };
    runtime.spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%cell, "cell protocol connection ended: {e}");
        }
    });
    Ok(sender)
}

impl Inner {
    fn unavailable(&self, reason: String) -> EngineError {
        EngineError::Unavailable { cell: self.cell, reason }
    }

    /// The open connection, or a new one. A peer that cannot be connected to
    /// is marked down at once, not at the next status poll: the breaker then
    /// knows the cell is gone, and probes it as soon as the poll finds it back.
    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, EngineError> {
        let connected = self.connect().await;
        if let Err(EngineError::Unavailable { reason, .. }) = &connected {
            *self.status.write().expect("status lock") = CellStatus::down(self.cell, reason);
        }
        connected
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, EngineError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *conn = None;
        let address = self.address.read().expect("address lock").clone();
        // The socket and the connection's tasks belong to the client's own
        // runtime, whichever runtime this call came from.
        let opened = self.runtime.spawn(open_connection(self.cell, address, self.config, self.runtime.clone()));
        let sender = match opened.await {
            Ok(opened) => opened.map_err(|why| self.unavailable(why))?,
            Err(e) => return Err(self.unavailable(format!("the connecting task was lost: {e}"))),
        };
        *conn = Some(sender.clone());
        Ok(sender)
    }

    /// One call: `body` to `path`, the answer's bytes, within the deadline.
    /// The header names the body's protocol version: a versioned body's own
    /// (its first byte), 1 for a raw or empty one.
    async fn call(&self, method: hyper::Method, path: &str, body: Body) -> Result<Bytes, EngineError> {
        let (version, body) = match body {
            Body::Versioned(b) => (b.first().copied().unwrap_or(1), b),
            Body::Raw(b) => (1, b),
        };
        let deadline = self.config.call_timeout;
        let attempt = async {
            let mut sender = self.connection().await?;
            let address = self.address.read().expect("address lock").clone();
            let request_id = format!("c{}-{}", self.cell.0, self.request_ids.fetch_add(1, Relaxed));
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(format!("http://{address}{path}"))
                .header(hyper::header::AUTHORIZATION, self.secret.header())
                // A cell of the version before reads every body but the tier copy's.
                .header(PROTOCOL_HEADER, version.to_string())
                .header(REQUEST_ID_HEADER, &request_id)
                .header(CELL_HEADER, self.cell.0.to_string());
            let epoch = self.sender_epoch.load(Relaxed);
            if epoch > 0 {
                request = request.header(EPOCH_HEADER, epoch.to_string());
            }
            let request = request.body(Full::new(Bytes::from(body))).expect("a well-formed request");
            sender.ready().await.map_err(|e| self.unavailable(format!("connection to {address} lost: {e}")))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.unavailable(format!("call to {address} failed: {e}")))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unavailable(format!("answer from {address} cut: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let why = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
                tracing::warn!(cell = %self.cell, %request_id, %status, "the cell refused a call: {why}");
                return Err(self.unavailable(format!("the cell answered {status}: {why}")));
            }
            Ok(bytes)
        };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => Err(self.unavailable(format!("no answer within {} ms", deadline.as_millis()))),
        }
    }

    /// Takes waiting callers of class `class`, oldest first, up to the coalescing limit (always at least one).
    fn take(&self, class: usize) -> Vec<Waiting> {
        let mut queue = self.queues[class].lock().expect("queue lock");
        let mut taken = Vec::new();
        let mut commands = 0;
        while let Some(front) = queue.waiting.front() {
            let n = front.commands.len();
            if !taken.is_empty() && commands + n > self.config.coalesce_commands_max {
                break;
            }
            let w = queue.waiting.pop_front().expect("front exists");
            queue.commands -= n;
            self.queued.fetch_sub(n as u64, Relaxed);
            // A caller that gave up (its deadline passed) is not sent.
            if w.reply.is_closed() {
                continue;
            }
            commands += n;
            taken.push(w);
        }
        taken
    }

    /// Sends the taken callers' commands as one call and answers each.
    async fn flush(self: Arc<Self>, taken: Vec<Waiting>, _slot: tokio::sync::OwnedSemaphorePermit) {
        let mut all = Vec::with_capacity(taken.iter().map(|w| w.commands.len()).sum());
        let mut sizes = Vec::with_capacity(taken.len());
        let mut replies = Vec::with_capacity(taken.len());
        for w in taken {
            sizes.push(w.commands.len());
            all.extend(w.commands);
            replies.push(w.reply);
        }
        let answer = self.send_commands(all).await;
        match answer {
            Ok(outcomes) => {
                let mut rest = outcomes.into_iter();
                for (reply, n) in replies.into_iter().zip(sizes) {
                    let _ = reply.send(Ok(rest.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn submit(self: Arc<Self>, commands: Vec<Command>) -> Result<Vec<Outcome>, EngineError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        if commands.len() > codec::SUBMIT_COMMANDS_MAX {
            return Err(EngineError::TooLarge { commands: commands.len(), max: codec::SUBMIT_COMMANDS_MAX });
        }
        if cellpay_core::is_control(&commands) {
            return self.submit_control(commands).await;
        }
        let n = commands.len();
        let queued = self.queued.fetch_add(n as u64, Relaxed);
        if queued + n as u64 > self.config.queued_commands_max as u64 {
            self.queued.fetch_sub(n as u64, Relaxed);
            return Err(EngineError::Overloaded {
                cell: self.cell,
                queued: queued as usize,
                max: self.config.queued_commands_max,
            });
        }
        let class = class_index(priority_of(&commands));
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = self.queues[class].lock().expect("queue lock");
            queue.commands += n;
            queue.waiting.push_back(Waiting { commands, reply });
        }
        self.wake.notify_one();
        // A caller waits at most two deadlines: one for a call slot (a lower
        // class waits behind higher ones), one for the call. Past that its
        // commands are not sent (a taken call is not recalled: the outcome is
        // unknown, which idempotent commands make safe).
        match tokio::time::timeout(self.config.call_timeout * 2, answer).await {
            Ok(answered) => answered.unwrap_or_else(|_| Err(self.unavailable("the call was abandoned".into()))),
            Err(_) => {
                let ms = (self.config.call_timeout * 2).as_millis();
                Err(self.unavailable(format!("no answer within {ms} ms of queueing")))
            }
        }
    }

    /// One submit call of `commands`, answered with one outcome each.
    async fn send_commands(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, EngineError> {
        let total = commands.len();
        self.calls.fetch_add(1, Relaxed);
        self.commands_sent.fetch_add(total as u64, Relaxed);
        let cell = self.cell.0.to_string();
        metrics::counter!("cellpay_cell_protocol_calls_total", "cell" => cell.clone()).increment(1);
        metrics::counter!("cellpay_cell_protocol_commands_total", "cell" => cell).increment(total as u64);
        let body = codec::encode_commands(&commands);
        drop(commands);
        let bytes = self.call(hyper::Method::POST, "/cell/v1/submit", Body::Versioned(body)).await?;
        match codec::decode_outcomes(&bytes) {
            Ok(Ok(outcomes)) if outcomes.len() == total => Ok(outcomes),
            Ok(Ok(outcomes)) => {
                Err(self.unavailable(format!("the cell answered {} outcomes for {total} commands", outcomes.len())))
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(self.unavailable(format!("garbled answer: {e}"))),
        }
    }

    /// Control work goes as a call of its own as soon as a control slot is
    /// free: a move's step waits for no payment on the way to the cell
    /// (where it goes in the control lane).
    async fn submit_control(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, EngineError> {
        let _slot = self.control_slot().await?;
        self.send_commands(commands).await
    }

    /// A control slot, waited for at most one call deadline.
    async fn control_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, EngineError> {
        match tokio::time::timeout(self.config.call_timeout, self.control_slots.acquire()).await {
            Ok(slot) => Ok(slot.expect("the semaphore is never closed")),
            Err(_) => Err(self.unavailable(format!(
                "no control call slot within {} ms ({} in flight)",
                self.config.call_timeout.as_millis(),
                self.config.control_in_flight_max
            ))),
        }
    }

    async fn query(self: Arc<Self>, query: Query) -> Result<QueryAnswer, EngineError> {
        let _slot = if query.is_control() {
            self.control_slot().await?
        } else {
            self.query_slots.acquire().await.expect("the semaphore is never closed")
        };
        let bytes =
            self.call(hyper::Method::POST, "/cell/v1/query", Body::Versioned(codec::encode_query(&query))).await?;
        codec::decode_answer(&bytes).unwrap_or_else(|e| Err(self.unavailable(format!("garbled answer: {e}"))))
    }

    /// Sends the outbox limit unless the cell as now running has it.
    async fn deliver_outbox_max(&self) {
        let max = self.outbox_max.load(Relaxed);
        if max == 0 || self.outbox_max_delivered.load(Relaxed) {
            return;
        }
        match self.call(hyper::Method::PUT, "/cell/v1/outbox-limit", Body::Raw(max.to_le_bytes().to_vec())).await {
            Ok(_) => self.outbox_max_delivered.store(self.outbox_max.load(Relaxed) == max, Relaxed),
            Err(e) => tracing::debug!(cell = %self.cell, "could not set the outbox limit yet: {e}"),
        }
    }

    async fn read_map(&self) -> Result<ShardMap, EngineError> {
        let bytes = self.call(hyper::Method::GET, "/cell/v1/map", Body::Raw(Vec::new())).await?;
        codec::decode_map(&bytes).map_err(|e| self.unavailable(format!("garbled shard map: {e}")))
    }

    async fn read_status(&self) -> Result<codec::StatusReport, EngineError> {
        let bytes = self.call(hyper::Method::GET, "/cell/v1/status", Body::Raw(Vec::new())).await?;
        codec::decode_status(&bytes).map_err(|e| self.unavailable(format!("garbled status: {e}")))
    }
}

/// Sends the queued commands: whenever a submit slot is free and commands
/// wait, the highest class's waiting callers leave together as one call, on a
/// task of its own (a caller that gives up cuts no one else's answer short).
/// One task per peer, so a caller is woken once, by its answer.
async fn flush_queues(inner: Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let Some(me) = inner.upgrade() else { return };
        let waiting = me.queues.iter().any(|q| !q.lock().expect("queue lock").waiting.is_empty());
        if !waiting {
            drop(me);
            wake.notified().await;
            continue;
        }
        let slot = me.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        // Highest class first (`Priority::ALL` is in priority order).
        let taken = (0..me.queues.len()).map(|class| me.take(class)).find(|t| !t.is_empty());
        match taken {
            Some(taken) => {
                me.runtime.spawn(me.clone().flush(taken, slot));
            }
            None => drop(slot),
        }
    }
}

/// Reads the peer's status every `status_poll` while the client lives.
async fn poll_status(inner: Weak<Inner>) {
    let mut last_generation = None;
    loop {
        let Some(me) = inner.upgrade() else { return };
        let period = me.config.status_poll;
        let started = Instant::now();
        match me.read_status().await {
            Ok(report) => {
                *me.status.write().expect("status lock") = report.status;
                *me.figures.write().expect("figures lock") = Arc::new(report.figures);
                if last_generation != Some(report.outbox_generation) {
                    last_generation = Some(report.outbox_generation);
                    me.outbox.send_modify(|g| *g += 1);
                }
                me.deliver_outbox_max().await;
            }
            Err(e) => {
                let reason = match e {
                    EngineError::Unavailable { reason, .. } => reason,
                    other => other.to_string(),
                };
                *me.status.write().expect("status lock") = CellStatus::down(me.cell, &reason);
                last_generation = None;
                // It may come back as a new process, which knows only its own default.
                me.outbox_max_delivered.store(false, Relaxed);
            }
        }
        drop(me);
        tokio::time::sleep(period.saturating_sub(started.elapsed())).await;
    }
}

impl CellClient for RemoteCell {
    fn cell(&self) -> CellId {
        self.0.cell
    }

    fn status(&self) -> CellStatus {
        self.0.status.read().expect("status lock").clone()
    }

    fn submit(&self, commands: Vec<Command>) -> BoxFuture<'_, Result<Vec<Outcome>, EngineError>> {
        Box::pin(self.0.clone().submit(commands))
    }

    fn query(&self, query: Query) -> BoxFuture<'_, Result<QueryAnswer, EngineError>> {
        Box::pin(self.0.clone().query(query))
    }

    fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.0.outbox.subscribe()
    }

    fn figures(&self) -> Arc<CellFigures> {
        self.0.figures.read().expect("figures lock").clone()
    }

    /// Sent with the next status read, and again to a cell that restarts:
    /// until it arrives the cell keeps the limit it had.
    fn set_outbox_messages_max(&self, max: u64) {
        self.0.outbox_max.store(max, Relaxed);
        self.0.outbox_max_delivered.store(false, Relaxed);
    }

    /// Asks the cell (within the call deadline); `None` when it cannot answer.
    fn shard_map(&self) -> BoxFuture<'_, Option<ShardMap>> {
        Box::pin(async move {
            match self.0.read_map().await {
                Ok(map) => Some(map),
                Err(e) => {
                    tracing::debug!(cell = %self.0.cell, "could not read the cell's shard map: {e}");
                    None
                }
            }
        })
    }

    fn set_sender_epoch(&self, epoch: u64) {
        self.0.sender_epoch.fetch_max(epoch, Relaxed);
    }
}
