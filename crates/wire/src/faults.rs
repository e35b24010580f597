//! A fault-injecting TCP proxy for the cell-protocol links: put it between
//! a cell and whoever calls it (advertise the proxy's address for the cell),
//! then cut the link, drop one direction, or delay it. It needs no
//! privileges, so tests and drills can partition a cell on any machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Carries everything.
    Pass,
    /// Refuses new connections and closes open ones: a cell cut off.
    Cut,
    /// Carries requests to the cell and holds back what it answers (as a
    /// one-way partition does: TCP keeps the bytes until the path heals or
    /// a side gives up): work arrives, acknowledgements do not.
    StallReplies,
    /// Holds back what callers send; the connection stays open (a black hole).
    StallRequests,
    /// Holds every chunk this long in each direction.
    Delay(Duration),
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and carries connections to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let fault = Arc::new(watch::Sender::new(Fault::Pass));
        let watched = fault.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = tcp.accept().await else { continue };
                if *watched.borrow() == Fault::Cut {
                    drop(inbound);
                    continue;
                }
                let rx = watched.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::select! {
                        _ = carry(ir, ow, rx.clone(), Direction::Request) => {}
                        _ = carry(or, iw, rx, Direction::Reply) => {}
                    }
                });
            }
        });
        Ok(Self { addr, fault, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Reply,
}

/// Copies one direction under the current fault, until either side closes or the link is cut.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let now = *fault.borrow_and_update();
        let stalled = matches!(
            (now, direction),
            (Fault::StallReplies, Direction::Reply) | (Fault::StallRequests, Direction::Request)
        );
        if now == Fault::Cut {
            return;
        }
        if stalled {
            // Read nothing: the bytes wait in the kernel's buffers, and the sender's fill up.
            if fault.changed().await.is_err() {
                return;
            }
            continue;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() { return }
                continue;
            }
        };
        let now = *fault.borrow();
        match now {
            Fault::Cut => return,
            Fault::Delay(d) => tokio::time::sleep(d).await,
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
