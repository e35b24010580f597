//! Who may hold a connection: at most `connections_max` open (I7), at most
//! `connections_per_address_max` from one client address, and, at the cap,
//! room is made by closing the longest-idle connection that has not yet
//! completed an authenticated request.
//!
//! A cap alone is a lock anyone can close from outside: 4,096 sockets that
//! send nothing used to fill it, and every payment then waited for them.
//! Timeouts ([`crate::front`]) bound how long each may stay; eviction makes
//! sure that while they stay, a client with a token still gets in, because
//! only connections that never proved a token are closed to make room. The
//! per-address cap stops one host from filling the table; loopback and
//! trusted proxies are exempt (the load generator, the drills and `bench http`
//! open hundreds of connections from 127.0.0.1).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::front::FrontLimits;

/// An address or a CIDR range (`10.0.0.0/8`, `::1`), for the per-address exemptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    base: IpAddr,
    prefix_bits: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or a CIDR range (like 10.0.0.0/8 or ::1)")]
pub struct AddressRangeError(String);

impl AddressRange {
    /// 127.0.0.0/8 and ::1.
    pub fn loopback() -> Vec<AddressRange> {
        vec![
            AddressRange { base: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), prefix_bits: 8 },
            AddressRange { base: IpAddr::V6(Ipv6Addr::LOCALHOST), prefix_bits: 128 },
        ]
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (base, ip, bits) = match (self.base, canonical(ip)) {
            (IpAddr::V4(b), IpAddr::V4(i)) => (u128::from(b.to_bits()), u128::from(i.to_bits()), 32),
            (IpAddr::V6(b), IpAddr::V6(i)) => (b.to_bits(), i.to_bits(), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix_bits);
        host_bits >= bits || (base >> host_bits) == (ip >> host_bits)
    }
}

impl FromStr for AddressRange {
    type Err = AddressRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddressRangeError(s.to_string());
        let (ip, prefix) = match s.trim().split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix.parse::<u8>().map_err(|_| err())?)),
            None => (s.trim(), None),
        };
        let base = canonical(ip.parse::<IpAddr>().map_err(|_| err())?);
        let bits = if base.is_ipv4() { 32 } else { 128 };
        let prefix_bits = prefix.unwrap_or(bits);
        if prefix_bits > bits {
            return Err(err());
        }
        Ok(Self { base, prefix_bits })
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_bits)
    }
}

/// An IPv4 client seen through an IPv6 socket counts as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One open connection, as the table and its own task see it.
pub struct Connection {
    id: u64,
    address: IpAddr,
    /// Milliseconds since the table's epoch when the connection last went
    /// quiet (opened, or its last request finished).
    idle_since_ms: AtomicU64,
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// Set once a request with a valid token has completed: such a
    /// connection is never closed to make room.
    authenticated: AtomicBool,
    evicting: AtomicBool,
    evict: Notify,
    epoch: Instant,
}

/// A connection's handle, also put into each of its requests' extensions.
pub type ConnectionRef = Arc<Connection>;

/// Marks a request in flight on its connection until dropped.
pub struct Busy(ConnectionRef);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(self.0.now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Connection {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn request_started(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        Busy(self.clone())
    }

    /// The connection proved a token and completed a request with it.
    pub fn mark_authenticated(&self) {
        self.authenticated.store(true, Relaxed);
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Relaxed)
    }

    /// Resolves once the table chose this connection to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// The timeout that applies while quiet: the head timeout until a first
    /// request arrived, the keep-alive idle timeout after.
    fn quiet_timeout(&self, header_read: Duration, keep_alive_idle: Duration) -> Duration {
        if self.requests.load(Relaxed) == 0 {
            header_read
        } else {
            keep_alive_idle
        }
    }

    /// When to look again whether the connection idled out.
    pub fn next_idle_check(&self, header_read: Duration, keep_alive_idle: Duration) -> Instant {
        let timeout = self.quiet_timeout(header_read, keep_alive_idle);
        if self.in_flight.load(Relaxed) > 0 {
            return Instant::now() + timeout;
        }
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Relaxed)) + timeout
    }

    /// Why the connection should close now, if it was quiet too long.
    pub fn idle_past(&self, header_read: Duration, keep_alive_idle: Duration) -> Option<&'static str> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let quiet = Duration::from_millis(self.now_ms().saturating_sub(self.idle_since_ms.load(Relaxed)));
        let first = self.requests.load(Relaxed) == 0;
        (quiet >= self.quiet_timeout(header_read, keep_alive_idle)).then_some(if first {
            "header_timeout"
        } else {
            "keep_alive_idle"
        })
    }
}

/// What [`ConnectionTable::try_admit`] decided.
pub enum Admit {
    Open(Placed),
    /// The table is at `connections_max`.
    Full,
    /// The client's address holds `connections_per_address_max` already.
    AddressFull,
}

struct Open {
    by_id: HashMap<u64, ConnectionRef>,
    by_address: HashMap<IpAddr, usize>,
    next_id: u64,
}

/// Every open connection.
pub struct ConnectionTable {
    connections_max: usize,
    per_address_max: usize,
    exempt: Vec<AddressRange>,
    open: Mutex<Open>,
    freed: Notify,
    epoch: Instant,
}

impl ConnectionTable {
    pub fn new(limits: &FrontLimits) -> Self {
        assert!(limits.connections_max > 0, "checked with the configuration");
        Self {
            connections_max: limits.connections_max,
            per_address_max: limits.connections_per_address_max,
            exempt: limits.connections_per_address_exempt.clone(),
            open: Mutex::new(Open { by_id: HashMap::new(), by_address: HashMap::new(), next_id: 0 }),
            freed: Notify::new(),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().expect("the connection table lock is never held across a panic")
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves after some connection closed (or at once if one closed since
    /// the last wait); take it before trying, so no close is missed.
    pub fn freed(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.freed.notified()
    }

    /// A place for a connection from `address`, or why not.
    pub fn try_admit(self: &Arc<Self>, address: IpAddr) -> Admit {
        let address = canonical(address);
        let exempt = self.exempt.iter().any(|r| r.contains(address));
        let mut open = self.lock();
        if open.by_id.len() >= self.connections_max {
            return Admit::Full;
        }
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        if !exempt && from_address >= self.per_address_max {
            return Admit::AddressFull;
        }
        open.next_id += 1;
        let conn = Arc::new(Connection {
            id: open.next_id,
            address,
            idle_since_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            authenticated: AtomicBool::new(false),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
            epoch: self.epoch,
        });
        open.by_id.insert(conn.id, conn.clone());
        *open.by_address.entry(address).or_insert(0) += 1;
        metrics::gauge!("cellpay_connections_open").set(open.by_id.len() as f64);
        Admit::Open(Placed { conn, table: self.clone() })
    }

    /// Whether a connection chosen to make room has not closed yet.
    pub fn evicting(&self) -> bool {
        self.lock().by_id.values().any(|c| c.evicting.load(Relaxed))
    }

    /// Closes the longest-quiet connection that never completed an
    /// authenticated request (a busy one only if none is quiet); false if
    /// every connection has authenticated or one is being closed already.
    pub fn evict_one(&self) -> bool {
        let open = self.lock();
        if open.by_id.values().any(|c| c.evicting.load(Relaxed)) {
            return false;
        }
        let victim = open
            .by_id
            .values()
            .filter(|c| !c.is_authenticated())
            .min_by_key(|c| (c.in_flight.load(Relaxed) > 0, c.idle_since_ms.load(Relaxed)));
        let Some(victim) = victim else { return false };
        victim.evicting.store(true, Relaxed);
        victim.evict.notify_one();
        tracing::debug!(address = %victim.address, "closing an unauthenticated connection to make room");
        true
    }

    fn close(&self, id: u64, address: IpAddr) {
        let mut open = self.lock();
        open.by_id.remove(&id);
        if let Some(n) = open.by_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&address);
            }
        }
        metrics::gauge!("cellpay_connections_open").set(open.by_id.len() as f64);
        drop(open);
        self.freed.notify_one();
    }

    /// Waits until every connection has closed.
    pub async fn wait_empty(&self) {
        loop {
            let freed = self.freed();
            if self.is_empty() {
                return;
            }
            freed.await;
        }
    }
}

/// A connection's place in the table, held by its task: dropping it takes
/// the connection out of the table and lets the next one in.
pub struct Placed {
    conn: ConnectionRef,
    table: Arc<ConnectionTable>,
}

impl Placed {
    pub fn conn(&self) -> &ConnectionRef {
        &self.conn
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.table.close(self.conn.id, self.conn.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections_max: usize, per_address_max: usize) -> FrontLimits {
        FrontLimits { connections_max, connections_per_address_max: per_address_max, ..FrontLimits::default() }
    }

    fn open(table: &Arc<ConnectionTable>, ip: &str) -> Placed {
        match table.try_admit(ip.parse().unwrap()) {
            Admit::Open(p) => p,
            _ => panic!("{ip} was not admitted"),
        }
    }

    #[test]
    fn ranges_parse_and_match() {
        let r: AddressRange = "10.1.0.0/16".parse().unwrap();
        assert!(r.contains("10.1.200.3".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped counts as IPv4");
        let all: AddressRange = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let one: AddressRange = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()) && !one.contains("::2".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "::1/129", "10.0.0.0/x"] {
            assert!(bad.parse::<AddressRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_per_address_cap_spares_loopback() {
        let table = Arc::new(ConnectionTable::new(&limits(100, 2)));
        let _held: Vec<_> = (0..2).map(|_| open(&table, "192.0.2.7")).collect();
        assert!(matches!(table.try_admit("192.0.2.7".parse().unwrap()), Admit::AddressFull));
        let _other = open(&table, "192.0.2.8");
        let _local: Vec<_> = (0..10).map(|_| open(&table, "127.0.0.1")).collect();
        assert_eq!(table.len(), 13);
    }

    #[test]
    fn at_the_cap_the_longest_quiet_unauthenticated_connection_goes() {
        let table = Arc::new(ConnectionTable::new(&limits(3, 10)));
        let authed = open(&table, "192.0.2.1");
        authed.conn().mark_authenticated();
        let oldest = open(&table, "192.0.2.2");
        std::thread::sleep(Duration::from_millis(5));
        let newer = open(&table, "192.0.2.3");
        assert!(matches!(table.try_admit("192.0.2.4".parse().unwrap()), Admit::Full));
        assert!(table.evict_one());
        assert!(oldest.conn().evicting.load(Relaxed) && !newer.conn().evicting.load(Relaxed));
        assert!(!table.evict_one(), "one eviction at a time");
        drop(oldest);
        let _next = open(&table, "192.0.2.4");
        drop(newer);
        let _last = open(&table, "192.0.2.5");
        assert!(matches!(table.try_admit("192.0.2.6".parse().unwrap()), Admit::Full));
        assert!(table.evict_one(), "192.0.2.4 is unauthenticated");
        assert!(!authed.conn().evicting.load(Relaxed), "an authenticated connection is never chosen");
    }
}
