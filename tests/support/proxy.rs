//! A TCP proxy for fault tests, put between pgferry and Postgres or Redis.
//!
//! It passes traffic both ways, and on request:
//! - [`Proxy::hang`]: stops forwarding while every socket stays open (a
//!   black hole: new connections are accepted but never reach the server)
//!   until [`Proxy::pass`];
//! - [`Proxy::cut`]: resets every open connection (RST to both sides);
//! - [`Proxy::cut_client`]: resets the client side only and keeps the
//!   server side open and silent, as when the client's host vanished: the
//!   server notices only through its own timeouts.
//!
//! It runs on a runtime of its own, so a test can block its thread freely.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    _rt: tokio::runtime::Runtime,
}

struct Shared {
    upstream: u16,
    /// True while traffic passes.
    passing: watch::Sender<bool>,
    /// Bumped by `cut` (both sides) and by `cut_client` (client side only).
    cut: watch::Sender<u64>,
    cut_client: watch::Sender<u64>,
    accepted: AtomicU64,
    /// Server sides of connections whose client side was cut.
    parked: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream,
            passing: watch::channel(true).0,
            cut: watch::channel(0).0,
            cut_client: watch::channel(0).0,
            accepted: AtomicU64::new(0),
            parked: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(client, s.clone()));
            }
        });
        Proxy {
            port,
            shared,
            _rt: rt,
        }
    }

    /// Forwards traffic (again).
    pub fn pass(&self) {
        self.shared.passing.send_replace(true);
    }

    /// Stops forwarding; sockets stay open.
    pub fn hang(&self) {
        self.shared.passing.send_replace(false);
    }

    /// Resets every open connection, on both sides.
    pub fn cut(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Resets the client side of every open connection; the server side
    /// stays open and gets nothing more.
    pub fn cut_client(&self) {
        self.shared.cut_client.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

/// Closes with RST instead of FIN.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

async fn serve(mut client: TcpStream, s: Arc<Shared>) {
    let mut passing = s.passing.subscribe();
    let mut cut = s.cut.subscribe();
    let mut cut_client = s.cut_client.subscribe();
    // A black hole does not even reach the server.
    tokio::select! {
        r = passing.wait_for(|p| *p) => if r.is_err() { return },
        _ = cut.changed() => return reset(client),
        _ = cut_client.changed() => return reset(client),
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", s.upstream)).await else {
        return reset(client);
    };
    let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        let pass = *passing.borrow_and_update();
        tokio::select! {
            _ = cut.changed() => {
                reset(client);
                reset(server);
                return;
            }
            _ = cut_client.changed() => {
                reset(client);
                s.parked.lock().unwrap().push(server);
                return;
            }
            _ = passing.changed() => {}
            r = client.read(&mut up), if pass => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if passing.wait_for(|p| *p).await.is_err() || server.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            r = server.read(&mut down), if pass => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if passing.wait_for(|p| *p).await.is_err() || client.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}
