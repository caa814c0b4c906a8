//! A TCP proxy between the gateway and the broker that a test can cut, restore, slow down and
//! stall, to simulate network faults without restarting the broker (subscribers keep their
//! sessions).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Knobs {
    delay_ms: AtomicU64,
    stalled: AtomicBool,
    connections: AtomicU64,
    attempts: AtomicU64,
}

/// A cuttable, slowable TCP forwarder.
pub struct Proxy {
    pub port: u16,
    down: Arc<watch::Sender<bool>>,
    knobs: Arc<Knobs>,
    task: tokio::task::JoinHandle<()>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    knobs: Arc<Knobs>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while knobs.stalled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let d = knobs.delay_ms.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Forwards 127.0.0.1:<free port> to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (tx, _) = watch::channel(false);
        let down = Arc::new(tx);
        let knobs = Arc::new(Knobs::default());
        let (d, k) = (down.clone(), knobs.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                k.attempts.fetch_add(1, Ordering::Relaxed);
                // Closing with a zero linger sends a reset, as a network fault does.
                let _ = socket_linger_zero(&inbound);
                if *d.borrow() {
                    drop(inbound);
                    continue;
                }
                k.connections.fetch_add(1, Ordering::Relaxed);
                let mut rx = d.subscribe();
                let k = k.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::select! {
                        _ = pump(ri, wo, k.clone()) => {}
                        _ = pump(ro, wi, k) => {}
                        _ = rx.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            knobs,
            task,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.down.send_replace(true);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.down.send_replace(false);
    }

    /// Delays every chunk forwarded in either direction.
    pub fn set_delay(&self, d: Duration) {
        self.knobs
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Stops forwarding (connections stay open) until unstalled.
    pub fn stall(&self, on: bool) {
        self.knobs.stalled.store(on, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.knobs.connections.load(Ordering::Relaxed)
    }

    /// Connection attempts so far, also those refused while cut.
    pub fn attempts(&self) -> u64 {
        self.knobs.attempts.load(Ordering::Relaxed)
    }
}

/// SO_LINGER 0: dropping the socket resets the connection instead of closing it.
fn socket_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
