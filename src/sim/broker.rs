//! A small embedded MQTT 5 broker for `floorgate demo`: QoS 0/1, retained messages, wills,
//! loopback only, no persistence. It can be switched "down" to show buffering through an outage.
//! Production gateways talk to a real broker; this exists so the demo needs nothing installed.

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A message that passed through the broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retained flag.
    pub retain: bool,
}

type Subs = Mutex<Vec<(u64, String, mpsc::Sender<Publish>)>>;

#[derive(Debug)]
struct Inner {
    retained: Mutex<HashMap<String, Publish>>,
    subs: Subs,
    feed: broadcast::Sender<Message>,
    down: watch::Sender<bool>,
    next_id: AtomicU64,
}

/// The demo broker.
#[derive(Debug, Clone)]
pub struct DemoBroker {
    inner: Arc<Inner>,
}

/// Whether an MQTT topic filter (with `+` and `#`) matches a topic.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl DemoBroker {
    /// Starts listening on `addr` (use port 0 for a free port).
    pub async fn start(
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> io::Result<(DemoBroker, SocketAddr)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (feed, _) = broadcast::channel(4096);
        let (down, _) = watch::channel(false);
        let broker = DemoBroker {
            inner: Arc::new(Inner {
                retained: Mutex::default(),
                subs: Mutex::default(),
                feed,
                down,
                next_id: AtomicU64::new(1),
            }),
        };
        let b = broker.clone();
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                    _ = shutdown.cancelled() => return,
                };
                if *b.inner.down.borrow() {
                    drop(sock);
                    continue;
                }
                let b = b.clone();
                let token = shutdown.clone();
                tokio::spawn(async move {
                    let _ = b.connection(sock, token).await;
                });
            }
        });
        Ok((broker, local))
    }

    /// Everything published to the broker, for a live view.
    pub fn feed(&self) -> broadcast::Receiver<Message> {
        self.inner.feed.subscribe()
    }

    /// Simulates an outage: drops every connection and refuses new ones until set back up.
    pub fn set_down(&self, down: bool) {
        self.inner.down.send_replace(down);
    }

    fn route(&self, p: &Publish) {
        let topic = String::from_utf8_lossy(&p.topic).to_string();
        if p.retain {
            let mut r = self
                .inner
                .retained
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if p.payload.is_empty() {
                r.remove(&topic);
            } else {
                r.insert(topic.clone(), p.clone());
            }
        }
        let _ = self.inner.feed.send(Message {
            topic: topic.clone(),
            payload: p.payload.clone(),
            retain: p.retain,
        });
        let subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        for (_, filter, tx) in subs.iter() {
            if topic_matches(filter, &topic) {
                let mut out = Publish::new(topic.clone(), QoS::AtMostOnce, p.payload.clone(), None);
                out.retain = false;
                let _ = tx.try_send(out);
            }
        }
    }

    async fn connection(&self, mut sock: TcpStream, shutdown: CancellationToken) -> io::Result<()> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Publish>(1024);
        let mut down = self.inner.down.subscribe();
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut out = BytesMut::new();
        let mut will = None;
        let result: io::Result<()> = async {
            loop {
                loop {
                    match Packet::read(&mut buf, Some(16 << 20)) {
                        Ok(packet) => {
                            let reply = match packet {
                                Packet::Connect(_, w, _) => {
                                    will = w;
                                    Some(Packet::ConnAck(ConnAck {
                                        session_present: false,
                                        code: ConnectReturnCode::Success,
                                        properties: None,
                                    }))
                                }
                                Packet::Publish(p) => {
                                    self.route(&p);
                                    (p.qos == QoS::AtLeastOnce).then(|| Packet::PubAck(PubAck::new(p.pkid, None)))
                                }
                                Packet::Subscribe(s) => {
                                    let mut retained = Vec::new();
                                    {
                                        let mut subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
                                        let r = self.inner.retained.lock().unwrap_or_else(|e| e.into_inner());
                                        for f in &s.filters {
                                            subs.push((id, f.path.clone(), tx.clone()));
                                            retained.extend(r.iter().filter(|(t, _)| topic_matches(&f.path, t)).map(|(_, p)| p.clone()));
                                        }
                                    }
                                    for mut p in retained {
                                        p.qos = QoS::AtMostOnce;
                                        p.pkid = 0;
                                        let _ = tx.try_send(p);
                                    }
                                    Some(Packet::SubAck(SubAck {
                                        pkid: s.pkid,
                                        return_codes: s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtMostOnce)).collect(),
                                        properties: None,
                                    }))
                                }
                                Packet::PingReq(_) => Some(Packet::PingResp(PingResp)),
                                Packet::Disconnect(_) => {
                                    will = None;
                                    return Ok(());
                                }
                                _ => None,
                            };
                            if let Some(reply) = reply {
                                reply.write(&mut out, None).map_err(|e| io::Error::other(e.to_string()))?;
                            }
                        }
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
                    }
                }
                if !out.is_empty() {
                    sock.write_all(&out).await?;
                    out.clear();
                }
                tokio::select! {
                    n = sock.read_buf(&mut buf) => {
                        if n? == 0 {
                            return Ok(());
                        }
                    }
                    Some(p) = rx.recv() => {
                        Packet::Publish(p).write(&mut out, None).map_err(|e| io::Error::other(e.to_string()))?;
                    }
                    _ = down.wait_for(|d| *d) => return Err(io::Error::other("broker down")),
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
        .await;
        self.inner
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _, _)| *i != id);
        if let (Err(_), Some(w)) = (&result, will) {
            let mut p = Publish::new(
                String::from_utf8_lossy(&w.topic).to_string(),
                w.qos,
                w.message.clone(),
                None,
            );
            p.retain = w.retain;
            self.route(&p);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters_match_like_mqtt() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/c"));
    }
}
