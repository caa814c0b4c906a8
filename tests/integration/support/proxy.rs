//! A TCP proxy between the gateway and the broker that a test can cut, restore, slow down and
//! stall, to simulate network faults without restarting the broker (subscribers keep their
//! sessions). In front of a plaintext broker ([`Proxy::start_mqtt`]) it can also drop the
//! broker's PUBACKs while everything else (CONNACK, PINGRESP) passes.

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
    /// Plaintext MQTT: the broker's side is forwarded packet by packet.
    mqtt: AtomicBool,
    drop_pubacks: AtomicBool,
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

/// The broker's side of a plaintext MQTT connection, packet by packet: PUBACKs are dropped while
/// `drop_pubacks` is set.
async fn pump_mqtt(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    knobs: Arc<Knobs>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        // Whole packets: a fixed header byte, the remaining length (1-4 bytes, 7 bits each).
        while let Some(len) = packet_len(&pending) {
            let packet: Vec<u8> = pending.drain(..len).collect();
            let puback = packet[0] >> 4 == 4;
            if puback && knobs.drop_pubacks.load(Ordering::Relaxed) {
                continue;
            }
            if to.write_all(&packet).await.is_err() {
                return;
            }
        }
    }
}

/// The length of the first whole MQTT packet in `b`, if it is complete.
fn packet_len(b: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *b.get(1 + i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let len = 2 + i + remaining;
            return (b.len() >= len).then_some(len);
        }
    }
    None
}

impl Proxy {
    /// Forwards 127.0.0.1:<free port> to the plaintext MQTT broker at `target`, able to drop
    /// its PUBACKs ([`Proxy::drop_pubacks`]).
    pub async fn start_mqtt(target: SocketAddr) -> Proxy {
        let proxy = Proxy::start(target).await;
        proxy.knobs.mqtt.store(true, Ordering::Relaxed);
        proxy
    }

    /// Drops the broker's PUBACKs (`true`) or forwards them again.
    pub fn drop_pubacks(&self, on: bool) {
        self.knobs.drop_pubacks.store(on, Ordering::Relaxed);
    }

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
                    let back = async {
                        if k.mqtt.load(Ordering::Relaxed) {
                            pump_mqtt(ro, wi, k.clone()).await;
                        } else {
                            pump(ro, wi, k.clone()).await;
                        }
                    };
                    tokio::select! {
                        _ = pump(ri, wo, k.clone()) => {}
                        _ = back => {}
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
