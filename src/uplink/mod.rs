//! The uplink: an MQTT 5 session over TLS that publishes stored events and deletes them only
//! after the broker's PUBACK.
//!
//! rumqttc gives no handle per publish, so acknowledgement is tracked by order: every publish we
//! hand to the client shows up as `Outgoing::Publish(pkid)` in the order it was handed over, and
//! the PUBACK names that pkid. Each session gets a fresh client and event loop (clean start), so
//! no stale request of an old session can shift that order; after a reconnect everything still in
//! the store is sent again from the oldest seq, which keeps per-device seq order.

pub mod remote;
pub mod tls;

use crate::event::payload;
use crate::store::Store;
use crate::store::{Reader, Run};
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Uplink failures.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// TLS files or settings.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The password file.
    #[error("cannot read password file {path}: {source}")]
    Password {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connecting or the session failed.
    #[error("{0}")]
    Session(String),
    /// The broker refused a publish (PUBACK reason code); the events stay stored.
    #[error("broker refused publish: {0:?}")]
    Refused(PubAckReason),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The MQTT password from `path` (a secret: its permissions are checked), without the final
/// line break.
pub fn read_password(path: &std::path::Path) -> Result<String, UplinkError> {
    tls::check_secret_permissions(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| UplinkError::Password {
        path: path.display().to_string(),
        source,
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// Uplink state shared with `status` and the health gate.
#[derive(Debug, Default)]
pub struct UplinkState {
    /// A session is established.
    pub connected: AtomicBool,
    /// Unix ms of the last successful PUBACK.
    pub last_puback_ms: AtomicU64,
    /// Sessions established since start.
    pub sessions: AtomicU64,
    /// Last error, for status.
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// An incoming message on a subscribed topic (remote config, commands).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// The queue of the gateway's own messages; it outlives uplink instances (reloads), so that a
/// message queued while offline goes out once a session is up again.
pub type Outbox = Arc<tokio::sync::Mutex<mpsc::Receiver<Outbound>>>;

/// A message the gateway itself publishes (status, config state, command results).
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Topic below the prefix, e.g. `status`.
    pub subtopic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

#[derive(Debug)]
enum Sent {
    /// Runs of stored events and how many events they hold.
    Events(Vec<Run>, u64),
    Control,
}

/// The uplink task.
#[derive(Debug)]
pub struct Uplink {
    cfg: crate::config::Uplink,
    gateway: String,
    store: Arc<Store>,
    /// Shared state.
    pub state: Arc<UplinkState>,
    subscriptions: Vec<String>,
    incoming: Option<mpsc::Sender<Incoming>>,
    outbound: Option<Outbox>,
    birth: Vec<u8>,
    drain_timeout: Duration,
    /// Fault injection for the watchdog test (`FLOORGATE_FAULT_HANG_UPLINK`): each session
    /// stops making progress after CONNACK.
    hang: bool,
}

impl Uplink {
    /// A new uplink for the gateway's events.
    pub fn new(
        cfg: crate::config::Uplink,
        gateway: &str,
        store: Arc<Store>,
        birth: Vec<u8>,
        state: Arc<UplinkState>,
    ) -> Uplink {
        Uplink {
            cfg,
            gateway: gateway.to_string(),
            store,
            state,
            subscriptions: Vec::new(),
            incoming: None,
            outbound: None,
            birth,
            drain_timeout: Duration::from_secs(5),
            hang: std::env::var_os("FLOORGATE_FAULT_HANG_UPLINK").is_some(),
        }
    }

    /// Subscribes to `topics` (full topic names), forwards what arrives to `to`, and publishes
    /// what is queued in `outbox` whenever a session is up.
    pub fn control(&mut self, topics: Vec<String>, to: mpsc::Sender<Incoming>, outbox: Outbox) {
        self.subscriptions = topics;
        self.incoming = Some(to);
        self.outbound = Some(outbox);
    }

    /// How long a graceful stop waits for outstanding PUBACKs.
    pub fn set_drain_timeout(&mut self, d: Duration) {
        self.drain_timeout = d;
    }

    /// Checks files and builds the MQTT options (TLS, credentials, will).
    pub fn options(&self) -> Result<MqttOptions, UplinkError> {
        let mut o = self.base_options(self.gateway.clone())?;
        o.set_last_will(LastWill::new(
            format!("{}/status", self.cfg.topic_prefix),
            br#"{"state":"offline"}"#.to_vec(),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        Ok(o)
    }

    /// Options of the control link: client id `ID-ctl` with a persistent session (clean start
    /// off, one week expiry), so that the broker queues config pushes and commands while the
    /// gateway is offline and delivers them when it is back.
    fn control_options(&self) -> Result<MqttOptions, UplinkError> {
        let mut o = self.base_options(format!("{}-ctl", self.gateway))?;
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(7 * 86_400));
        Ok(o)
    }

    fn base_options(&self, client_id: String) -> Result<MqttOptions, UplinkError> {
        let c = &self.cfg;
        let mut o = MqttOptions::new(client_id, c.host.clone(), c.port);
        o.set_keep_alive(c.keep_alive);
        o.set_clean_start(true);
        o.set_max_packet_size(Some(8 << 20));
        o.set_outgoing_inflight_upper_limit(c.max_inflight);
        o.set_connection_timeout(10);
        // Without TCP_NODELAY a live event (one small publish) waits for the ACK of the previous
        // segment, and the TLS handshake stalls on the delayed ACK (40 ms on Linux).
        let mut net = o.network_options();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        if c.tls {
            let cfg = tls::client_config(c)?;
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
        }
        if let Some(user) = &c.username {
            let password = match &c.password_file {
                Some(p) => read_password(p)?,
                None => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        Ok(o)
    }

    /// Connects once (TLS handshake, MQTT CONNECT/CONNACK) and disconnects: `floorgate check`.
    pub async fn probe(&self, within: Duration) -> Result<(), UplinkError> {
        let opts = self.options()?;
        let (client, eventloop) = AsyncClient::new(opts, 8);
        let mut events = Driver::new(eventloop);
        connack(&mut events, within).await?;
        let _ = client.try_disconnect();
        Ok(())
    }

    /// Runs sessions with jittered exponential back-off until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        beat();
        let control = match (
            self.subscriptions.is_empty(),
            self.incoming.clone(),
            self.control_options(),
        ) {
            (false, Some(to), Ok(opts)) => Some(AbortOnDrop(tokio::spawn(control_link(
                opts,
                self.subscriptions.clone(),
                to,
                self.cfg.reconnect_max,
                shutdown.clone(),
            )))),
            _ => None,
        };
        self.sessions(shutdown).await;
        drop(control);
        crate::metrics::UPLINK_BEAT_MS.store(0, Ordering::Relaxed);
    }

    async fn sessions(&mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let started = Instant::now();
            let result = self.session(&shutdown).await;
            self.state.connected.store(false, Ordering::Relaxed);
            crate::metrics::gauge(
                "floorgate_uplink_connected",
                "1 while an MQTT session is established.",
                &[],
                0.0,
            );
            match result {
                Ok(()) => return,
                Err(error) => {
                    crate::metrics::CONNECT_FAILURES.inc();
                    tracing::warn!(%error, retry_in = ?backoff, "uplink session ended");
                    *self
                        .state
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                    if matches!(error, UplinkError::Tls(_) | UplinkError::Password { .. }) {
                        backoff = self.cfg.reconnect_max;
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(250);
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.0);
            let wait = backoff.mul_f64(jitter);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
                _ = beating() => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    /// One session; PUBACKed events are removed from the store by an [`Acker`] beside it, which
    /// has finished before the next session reads the store again.
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), UplinkError> {
        let caught_up = Arc::new(AtomicBool::new(false));
        let acker = Acker::start(
            self.store.clone(),
            self.cfg.max_inflight as usize * 4,
            caught_up.clone(),
        );
        let mut ahead = None;
        let mut acked = Acked::default();
        let result = self
            .session_with(shutdown, &acker, caught_up, &mut ahead, &mut acked)
            .await;
        // Both threads end with the session: nothing holds the store afterwards.
        if let Some(ahead) = ahead {
            ahead.finish().await;
        }
        // PUBACKs the session had not handed over yet (a failed hand-over shows in `finish`).
        if acked.publishes > 0 {
            let _ = acker.ack(acked).await;
        }
        let recorded = acker.finish().await;
        result.and(recorded)
    }

    async fn session_with(
        &mut self,
        shutdown: &CancellationToken,
        acker: &Acker,
        caught_up: Arc<AtomicBool>,
        ahead: &mut Option<Prefetch>,
        acked: &mut Acked,
    ) -> Result<(), UplinkError> {
        let opts = self.options()?;
        // Twice the broker-side window: publishes queue in rumqttc's channel, ready to go out
        // the moment a PUBACK frees a slot, instead of waiting for this task to be scheduled.
        // Everything ahead holds payloads and keeps the sled leaves they came from in memory,
        // so no more than that (four times measured no faster, and used more memory).
        let window = self.cfg.max_inflight as usize * 2;
        let (client, eventloop) = AsyncClient::new(opts, window + 64);
        let mut events = Driver::new(eventloop);

        // Wait for CONNACK (a stop request meanwhile ends the session quietly).
        tokio::select! {
            r = connack(&mut events, Duration::from_secs(15)) => r?,
            _ = shutdown.cancelled() => return Ok(()),
            _ = beating() => {}
        }
        if self.hang {
            tracing::warn!("FLOORGATE_FAULT_HANG_UPLINK: the uplink hangs");
            shutdown.cancelled().await;
            return Ok(());
        }
        self.state.connected.store(true, Ordering::Relaxed);
        crate::metrics::gauge(
            "floorgate_uplink_connected",
            "1 while an MQTT session is established.",
            &[],
            1.0,
        );
        self.state.sessions.fetch_add(1, Ordering::Relaxed);
        crate::metrics::RECONNECTS.inc();
        tracing::info!(host = %self.cfg.host, port = self.cfg.port, "uplink connected");

        let prefix = self.cfg.topic_prefix.clone();
        let events_topic = format!("{prefix}/events");
        let mut unassigned: VecDeque<Sent> = VecDeque::new();
        let mut inflight: HashMap<u16, (Sent, Instant)> = HashMap::new();
        client
            .try_publish(
                format!("{prefix}/status"),
                QoS::AtLeastOnce,
                true,
                self.birth.clone(),
            )
            .map_err(|e| UplinkError::Session(e.to_string()))?;
        unassigned.push_back(Sent::Control);

        let outbox = self.outbound.clone();
        let mut outbox = match &outbox {
            Some(o) => Some(o.lock().await),
            None => None,
        };
        // Reading the store and framing payloads happen in a task of their own, a few reads
        // ahead, so that this task only hands publishes over and books PUBACKs.
        let ahead = ahead.insert(Prefetch::start(
            self.store.clone(),
            self.gateway.clone(),
            self.cfg.max_batch,
            caught_up,
        ));
        let mut draining: Option<Instant> = None;
        let mut ack_due: Option<Instant> = None;
        // The loop comes round at least every second, also while nothing happens (watchdog).
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            beat();
            // Keep the window full: everything still stored from the oldest seq, then new
            // commits. While stopping, the backlog keeps draining until the deadline.
            while unassigned.len() + inflight.len() < window {
                let Some(next) = ahead.try_next()? else { break };
                self.publish(&client, &events_topic, next, &mut unassigned)?;
            }
            let exhausted = ahead.caught_up();
            if let Some(deadline) = draining {
                if exhausted && unassigned.is_empty() && inflight.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        outstanding = unassigned.len() + inflight.len(),
                        "stop: PUBACKs still outstanding; events stay stored"
                    );
                    break;
                }
            }
            let room = unassigned.len() + inflight.len() < window;
            tokio::select! {
                ev = events.next() => {
                    // Handle everything already available before refilling the window once.
                    let mut next = Some(ev);
                    while let Some(ev) = next {
                        match ev {
                            Ok(ev) => self.on_event(ev, &mut unassigned, &mut inflight, acked)?,
                            Err(e) => return Err(UplinkError::Session(describe(&e))),
                        }
                        next = events.try_next();
                    }
                    // The acker wakes for a batch of PUBACKs, or when nothing is outstanding
                    // (live traffic: at once), or after ACK_DELAY.
                    if acked.publishes >= ACK_BATCH
                        || (acked.publishes > 0 && inflight.is_empty() && unassigned.is_empty())
                    {
                        ack_due = None;
                        acker.ack(std::mem::take(acked)).await?;
                    } else if acked.publishes > 0 && ack_due.is_none() {
                        ack_due = Some(Instant::now() + ACK_DELAY);
                    }
                }
                _ = tokio::time::sleep_until(ack_due.unwrap_or_else(Instant::now)), if ack_due.is_some() => {
                    ack_due = None;
                    if acked.publishes > 0 {
                        acker.ack(std::mem::take(acked)).await?;
                    }
                }
                next = ahead.next(), if room => {
                    self.publish(&client, &events_topic, next?, &mut unassigned)?;
                }
                out = async { outbox.as_mut()?.recv().await }, if room && outbox.is_some() => {
                    if let Some(out) = out {
                        client
                            .try_publish(format!("{prefix}/{}", out.subtopic), QoS::AtLeastOnce, out.retain, out.payload)
                            .map_err(|e| UplinkError::Session(e.to_string()))?;
                        unassigned.push_back(Sent::Control);
                    }
                }
                _ = shutdown.cancelled(), if draining.is_none() => {
                    draining = Some(Instant::now() + self.drain_timeout);
                }
                _ = tokio::time::sleep(Duration::from_millis(100)), if draining.is_some() => {}
                _ = tick.tick() => {
                    // A broker can keep answering pings and stop acknowledging publishes: a
                    // publish may wait twice the keep-alive interval for its PUBACK.
                    let oldest = inflight.values().map(|(_, at)| at.elapsed()).max();
                    let limit = self.cfg.keep_alive * 2;
                    if let Some(age) = oldest.filter(|age| *age > limit && draining.is_none()) {
                        return Err(UplinkError::Session(format!(
                            "no PUBACK for {} (limit {}, twice uplink.keep_alive): reconnecting; the events stay stored",
                            humantime::format_duration(Duration::from_secs(age.as_secs())),
                            humantime::format_duration(limit)
                        )));
                    }
                }
            }
        }
        // Graceful stop: say so (the will is only for unexpected loss), then disconnect.
        let _ = client.try_publish(
            format!("{prefix}/status"),
            QoS::AtLeastOnce,
            true,
            br#"{"state":"offline"}"#.to_vec(),
        );
        let _ = client.try_disconnect();
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, events.next()).await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
        Ok(())
    }

    /// Hands a prepared publish to the client and books it for the PUBACK.
    fn publish(
        &self,
        client: &AsyncClient,
        topic: &str,
        p: Prepared,
        unassigned: &mut VecDeque<Sent>,
    ) -> Result<(), UplinkError> {
        client
            .try_publish(topic, QoS::AtLeastOnce, false, p.body)
            .map_err(|e| UplinkError::Session(e.to_string()))?;
        unassigned.push_back(Sent::Events(p.runs, p.events));
        Ok(())
    }

    fn on_event(
        &mut self,
        ev: Event,
        unassigned: &mut VecDeque<Sent>,
        inflight: &mut HashMap<u16, (Sent, Instant)>,
        acked: &mut Acked,
    ) -> Result<(), UplinkError> {
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(sent) = unassigned.pop_front() {
                    inflight.insert(pkid, (sent, Instant::now()));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some((sent, at)) = inflight.remove(&ack.pkid) else {
                    return Ok(());
                };
                crate::metrics::observe(
                    "floorgate_uplink_puback_latency_seconds",
                    "Time from a publish leaving to its PUBACK.",
                    &[],
                    at.elapsed().as_secs_f64(),
                );
                if !matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    crate::metrics::PUBACK_FAILURES.inc();
                    tracing::error!(reason = ?ack.reason, "broker refused a publish; events stay stored and are retried");
                    return Err(UplinkError::Refused(ack.reason));
                }
                self.state
                    .last_puback_ms
                    .store(crate::event::now_ms(), Ordering::Relaxed);
                if let Sent::Events(runs, n) = sent {
                    acked.runs.extend(runs);
                    acked.events += n;
                    acked.publishes += 1;
                }
            }

            Event::Incoming(Packet::Disconnect(d)) => {
                return Err(UplinkError::Session(format!(
                    "broker disconnected: {:?}",
                    d.reason_code
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

/// PUBACKed publishes handed to the acker at once while a backlog drains (one wake-up of its
/// thread each).
const ACK_BATCH: u64 = 16;
/// How long PUBACKs wait for more before they are handed to the acker anyway.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// Wholly acknowledged blocks that may wait for deletion while a backlog drains; beyond, they are
/// deleted as they complete. Waiting costs memory beyond a few bytes per block: sled keeps the
/// leaves a drain read in memory until they change (its cache accounts accesses in batches),
/// so deleting as the drain goes is what bounds the memory of a long drain. A backlog of small
/// blocks drains slower for it (tens of thousands of deletes per million events), which is why
/// the store packs the blocks of an outage ([`Store`] packing).
const RECLAIM_DEFER_MAX: usize = 4096;
/// Blocks deleted per store operation (the store is locked meanwhile).
const RECLAIM_CHUNK: usize = 64;
/// Bytes of acknowledged blocks that may wait for deletion while a backlog drains. sled keeps
/// a block it read in memory until it changes the node that holds it, and it hardly counts
/// nodes larger than 128 KiB (stored as files of their own) against its cache, so what waits
/// here is resident: the bound is in bytes, not only in blocks. Measured with a 1 M backlog
/// (64 KiB blocks): RSS while draining 33 MiB with 4 MiB waiting, 28-29 MiB with 1 MiB, at
/// the same drain rate. 512 KiB instead of 1 MiB (ninth session, two batches of 8 runs each):
/// peak 16.8–17.6 MiB (medians 17.3, 17.2) against 17.2–18.2 (17.3, 17.8), for twice the
/// delete transactions: drain CPU per event 0.29–0.31 µs against 0.29, best against best 0.86
/// and 0.88 of the plain publisher against 0.91 and 0.92.
const RECLAIM_DEFER_BYTES: u64 = 512 << 10;
/// Bytes of blocks deleted since the allocator last gave its free memory back; once the session
/// has caught up and nothing waits after more than this, it does ([`crate::memory::trim`]).
const TRIM_AFTER_BYTES: u64 = 4 << 20;

/// The events of PUBACKed publishes, gathered for one store operation.
#[derive(Debug, Default)]
struct Acked {
    runs: Vec<Run>,
    events: u64,
    publishes: u64,
}

/// Deletes a chunk of acknowledged blocks; returns how many still wait, or 0 when the store does
/// not take the delete now (a full disk): they wait for the next acknowledgement, marked. Adds
/// the bytes deleted to `freed`.
fn reclaim_some(store: &Store, freed: &mut u64) -> usize {
    let before = store.reclaimable_bytes();
    let waiting = match store.reclaim(RECLAIM_CHUNK) {
        Ok(waiting) => waiting,
        Err(error) => {
            tracing::debug!(%error, "acknowledged blocks stay marked until the store takes the delete");
            0
        }
    };
    *freed += before.saturating_sub(store.reclaimable_bytes());
    waiting
}

/// Records PUBACKed events in the store on a thread of its own, so that the session goes on
/// with the next PUBACK meanwhile; what queued up is acknowledged in one store operation. The
/// queue is bounded: a session whose acker is behind waits for it.
///
/// Deleting acknowledged blocks costs far more than acknowledging them (see the store), and
/// while a backlog drains it would compete with the drain for a small box's CPU. So blocks are
/// deleted once the session has caught up with the store (`caught_up`), in chunks between
/// acknowledgements, or when more than [`RECLAIM_DEFER_MAX`] blocks or
/// [`RECLAIM_DEFER_BYTES`] wait.
struct Acker {
    tx: mpsc::Sender<Acked>,
    task: tokio::task::JoinHandle<Result<(), crate::store::StoreError>>,
}

impl Acker {
    fn start(store: Arc<Store>, depth: usize, caught_up: Arc<AtomicBool>) -> Acker {
        let (tx, mut rx) = mpsc::channel::<Acked>(depth.max(1));
        let rt = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            let mut waiting = store.reclaim_waiting();
            // Bytes of blocks deleted since the last trim.
            let mut freed = 0u64;
            loop {
                // While blocks wait, delete a chunk whenever the session is caught up and no
                // acknowledgement is queued; otherwise look again every 100 ms.
                let next = match rx.try_recv() {
                    Ok(item) => Some(item),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(_) if waiting > 0 && caught_up.load(Ordering::SeqCst) => {
                        waiting = reclaim_some(&store, &mut freed);
                        // A drained backlog leaves the allocator's high-water mark behind.
                        if waiting == 0 && freed > TRIM_AFTER_BYTES {
                            crate::memory::trim();
                            freed = 0;
                        }
                        continue;
                    }
                    Err(_) if waiting > 0 => {
                        let wait = tokio::time::timeout(Duration::from_millis(100), rx.recv());
                        match rt.block_on(wait) {
                            Ok(item) => item,
                            Err(_) => continue,
                        }
                    }
                    Err(_) => rx.blocking_recv(),
                };
                let Some(mut acked) = next else {
                    break;
                };
                while let Ok(more) = rx.try_recv() {
                    acked.runs.extend(more.runs);
                    acked.events += more.events;
                    acked.publishes += more.publishes;
                }
                store.ack_runs(&acked.runs)?;
                crate::metrics::PUBLISHES.add(acked.publishes);
                crate::metrics::EVENTS_ACKED.add(acked.events);
                waiting = store.reclaim_waiting();
                while waiting > 0
                    && (waiting > RECLAIM_DEFER_MAX
                        || store.reclaimable_bytes() > RECLAIM_DEFER_BYTES)
                {
                    waiting = reclaim_some(&store, &mut freed);
                }
            }
            Ok(())
        });
        Acker { tx, task }
    }

    /// Queues the events of PUBACKed publishes for the store.
    async fn ack(&self, acked: Acked) -> Result<(), UplinkError> {
        self.tx
            .send(acked)
            .await
            .map_err(|_| UplinkError::Session("acknowledging in the store failed".into()))
    }

    /// Waits until everything queued is recorded in the store.
    async fn finish(self) -> Result<(), UplinkError> {
        drop(self.tx);
        match self.task.await {
            Ok(r) => r.map_err(UplinkError::from),
            Err(e) => Err(UplinkError::Session(format!(
                "acknowledging task failed: {e}"
            ))),
        }
    }
}

/// A publish framed ahead of time: its payload and the stored events it carries.
#[derive(Debug)]
struct Prepared {
    body: Vec<u8>,
    runs: Vec<Run>,
    events: u64,
}

/// A payload under construction: `{"v":1,"gateway":ID,"events":[` + events + `]}`.
struct Frame {
    body: Vec<u8>,
    runs: Vec<Run>,
    events: u64,
}

impl Frame {
    /// A frame starting from `empty`, the payload without events (`payload(gateway, [])`),
    /// with room for `capacity` bytes.
    fn new(empty: &[u8], capacity: usize) -> Frame {
        let mut body = Vec::with_capacity(capacity.max(empty.len()));
        body.extend_from_slice(empty);
        Frame {
            body,
            runs: Vec::new(),
            events: 0,
        }
    }

    fn push(&mut self, at: &crate::store::EventRef, json: &[u8]) {
        self.body.truncate(self.body.len() - 2); // "]}"
        if self.events > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(json);
        self.body.extend_from_slice(b"]}");
        crate::store::push_run(&mut self.runs, at);
        self.events += 1;
    }

    fn done(mut self) -> Prepared {
        // The room was a guess: a payload holds on to it until its PUBACK.
        if self.body.capacity() > self.body.len() + self.body.len() / 4 {
            self.body.shrink_to_fit();
        }
        Prepared {
            body: self.body,
            runs: self.runs,
            events: self.events,
        }
    }
}

/// Notes that the uplink makes progress (see [`crate::metrics::UPLINK_BEAT_MS`]).
fn beat() {
    crate::metrics::UPLINK_BEAT_MS.store(crate::event::now_ms(), Ordering::Relaxed);
}

/// Beats every second while awaited beside something that may take long (a back-off, a
/// CONNACK); never completes.
async fn beating() {
    loop {
        beat();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Publishes framed per read of a backlog: the prefetch thread wakes once per read, and the
/// session once per hand-over. What is read ahead holds its payloads and keeps the sled leaves
/// it came from in memory. Peak RSS while a restarted 1 M backlog drained (one malloc arena,
/// the next read waiting for room in the channel): 18.6 MiB (17.9–18.9, 5 runs) with 16
/// against 19.7 (19.4–20.6) with 32; drain CPU 0.30 against 0.28 µs per event. With 8 the
/// drain fell below 0.8 of the plain publisher.
const READ_PUBLISHES: usize = 16;

/// The next publishes from `reader`: live traffic (fewer than 8 events waiting) one event per
/// publish, a backlog in batches of `max_batch` (up to [`READ_PUBLISHES`] of them), framed
/// straight from the stored blocks.
fn frame(
    store: &Store,
    reader: &mut Reader,
    empty: &[u8],
    max_batch: usize,
) -> Result<Vec<Prepared>, crate::store::StoreError> {
    let first = reader.read(store, 8)?;
    if first.len() < 8 {
        return Ok(first
            .iter()
            .map(|s| {
                let mut f = Frame::new(empty, empty.len() + 1 + s.json().len());
                f.push(&s.at, s.json());
                f.done()
            })
            .collect());
    }
    // Payloads of a backlog are alike: each is given the room the one before took (plus an
    // eighth), so that framing copies every event once instead of growing the payload.
    let mut out = Vec::new();
    let guess = empty.len()
        + first.iter().map(|s| s.json().len() + 1).sum::<usize>() * max_batch.max(1) / first.len();
    let mut current = Frame::new(empty, guess + guess / 8);
    let mut add = |at: &crate::store::EventRef, json: &[u8]| {
        current.push(at, json);
        if current.events as usize >= max_batch {
            let room = current.body.len() + current.body.len() / 8;
            out.push(std::mem::replace(&mut current, Frame::new(empty, room)).done());
        }
    };
    for s in &first {
        add(&s.at, s.json());
    }
    let more = (READ_PUBLISHES - 1) * max_batch.max(1);
    reader.read_with(store, more, |at, block, (a, b)| {
        add(&at, &block[a..b]);
    })?;
    if current.events > 0 {
        out.push(current.done());
    }
    Ok(out)
}

/// The prefetch task of a session: reads the store from the oldest unacknowledged seq (a
/// fresh [`Reader`] per session, so everything unacknowledged is sent again) and frames
/// payloads ahead of the session: besides the publishes the session took, one read of up to
/// [`READ_PUBLISHES`] waits in `ready` and one in the channel; the next is read once the
/// channel has room.
struct Prefetch {
    /// The publishes of one read at a time (see [`READ_PUBLISHES`]).
    rx: mpsc::Receiver<Result<Vec<Prepared>, UplinkError>>,
    ready: VecDeque<Prepared>,
    /// The last read found nothing more to send.
    idle: Arc<AtomicBool>,
    /// The thread ends once the receiver is dropped (see [`Prefetch::finish`]).
    task: tokio::task::JoinHandle<()>,
}

impl Prefetch {
    fn start(
        store: Arc<Store>,
        gateway: String,
        max_batch: usize,
        idle: Arc<AtomicBool>,
    ) -> Prefetch {
        // Capacity one read: see the type's documentation for what waits ahead.
        let (tx, rx) = mpsc::channel(1);
        let flag = idle.clone();
        let empty = payload(&gateway, []);
        // Reading and framing run on a blocking thread, like the acker's deletes.
        let rt = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            let mut reader = Reader::new(0);
            loop {
                // Room in the channel first: a read framed ahead of it would hold its payloads
                // and leaves while it waits.
                let Ok(permit) = rt.block_on(tx.reserve()) else {
                    return;
                };
                flag.store(false, Ordering::SeqCst);
                let prepared = match frame(&store, &mut reader, &empty, max_batch) {
                    Ok(p) => p,
                    Err(e) => {
                        permit.send(Err(e.into()));
                        return;
                    }
                };
                if prepared.is_empty() {
                    drop(permit);
                    flag.store(true, Ordering::SeqCst);
                    // A commit stores a wake-up even when nobody waits yet; the timeout is a
                    // safety net only (and how a closed session is noticed while idle).
                    if tx.is_closed() {
                        return;
                    }
                    rt.block_on(async {
                        tokio::select! {
                            biased;
                            _ = tx.closed() => {}
                            _ = tokio::time::timeout(Duration::from_secs(1), store.committed()) => {}
                        }
                    });
                    continue;
                }
                permit.send(Ok(prepared));
            }
        });
        Prefetch {
            rx,
            ready: VecDeque::new(),
            idle,
            task,
        }
    }

    /// The next prepared publish (cancel-safe).
    async fn next(&mut self) -> Result<Prepared, UplinkError> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Ok(p);
            }
            match self.rx.recv().await {
                Some(batch) => self.ready.extend(batch?),
                None => return Err(UplinkError::Session("store reader stopped".into())),
            }
        }
    }

    /// A prepared publish if one is ready now.
    fn try_next(&mut self) -> Result<Option<Prepared>, UplinkError> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Ok(Some(p));
            }
            match self.rx.try_recv() {
                Ok(batch) => self.ready.extend(batch?),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(UplinkError::Session("store reader stopped".into()))
                }
            }
        }
    }

    /// Stops the thread and waits for it.
    async fn finish(self) {
        drop(self.rx);
        let _ = self.task.await;
    }

    /// Everything stored has been handed over (nothing prepared, the reader found no more).
    fn caught_up(&self) -> bool {
        self.ready.is_empty() && self.rx.is_empty() && self.idle.load(Ordering::SeqCst)
    }
}

/// Drives rumqttc's event loop in its own task (its poll is never cancelled half-way through a
/// write) and hands the notifications over; the uplink task and the event loop then run on both
/// cores, which matters when draining a backlog.
struct Driver {
    rx: mpsc::Receiver<Result<Event, ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Driver {
    fn new(mut el: EventLoop) -> Driver {
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        Driver { rx, task }
    }

    /// The next event loop notification (cancel-safe).
    async fn next(&mut self) -> Result<Event, ConnectionError> {
        self.rx
            .recv()
            .await
            .unwrap_or(Err(ConnectionError::RequestsDone))
    }

    /// A notification that is ready now, if any.
    fn try_next(&mut self) -> Option<Result<Event, ConnectionError>> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The control link: its own persistent MQTT session that subscribes to config pushes and
/// commands and forwards them. Incoming QoS 1 messages are acknowledged on receipt: a crash right
/// after means the message is not run (commands are at most once).
async fn control_link(
    opts: MqttOptions,
    topics: Vec<String>,
    to: mpsc::Sender<Incoming>,
    reconnect_max: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let (client, eventloop) = AsyncClient::new(opts.clone(), 16);
        let mut events = Driver::new(eventloop);
        let connected = tokio::select! {
            r = connack(&mut events, Duration::from_secs(15)) => r,
            _ = shutdown.cancelled() => return,
        };
        if connected.is_ok() {
            backoff = Duration::from_millis(250);
            let mut ok = true;
            for t in &topics {
                ok &= client.subscribe(t.clone(), QoS::AtLeastOnce).await.is_ok();
            }
            let mut subscribed = 0;
            while ok {
                let ev = tokio::select! {
                    ev = events.next() => ev,
                    _ = shutdown.cancelled() => {
                        let _ = client.try_disconnect();
                        return;
                    }
                };
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed += 1;
                        if subscribed == topics.len() {
                            tracing::info!(topics = topics.len(), "control link subscribed");
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Incoming {
                            topic: String::from_utf8_lossy(&p.topic).to_string(),
                            payload: p.payload.to_vec(),
                        };
                        if to.try_send(msg).is_err() {
                            tracing::warn!("remote control queue full; message dropped");
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(error = %describe(&error), "control link lost");
                        ok = false;
                    }
                }
            }
        }
        let wait = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(reconnect_max);
    }
}

/// Waits for a successful CONNACK.
async fn connack(events: &mut Driver, within: Duration) -> Result<(), UplinkError> {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
    let deadline = Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| UplinkError::Session(format!("no CONNACK within {within:?}")))?;
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                return Ok(())
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                return Err(UplinkError::Session(format!(
                    "broker refused connection: {:?}",
                    ack.code
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(UplinkError::Session(describe(&e))),
        }
    }
}

/// A one-line description of a connection error, with the TLS cause spelled out.
pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Tls(t) => format!("TLS: {t}"),
        ConnectionError::Io(io) => format!("I/O: {io}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Body, Event};

    fn state(i: u64) -> Event {
        Event {
            ts: i,
            clock_synced: true,
            device: Some(format!("d{}", i % 3)),
            body: Body::State {
                values: [(
                    "door".to_string(),
                    crate::device::codec::Value::Bool(i % 2 == 0),
                )]
                .into_iter()
                .collect(),
            },
        }
    }

    /// Framed publishes carry every stored event once, in seq order, as `payload` would frame
    /// them; live traffic goes one event per publish, a backlog in batches of `max_batch`.
    #[test]
    fn frames_match_payload_and_batch_by_backlog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        store.commit(&[state(1), state(2)], &[]).expect("commit");
        let mut reader = Reader::new(0);
        let live = frame(&store, &mut reader, &payload("gw", []), 10).expect("frame");
        assert_eq!(live.len(), 2, "live events one per publish");
        let events: Vec<Event> = (3..=40).map(state).collect();
        store.commit(&events, &[]).expect("commit");
        let backlog = frame(&store, &mut reader, &payload("gw", []), 10).expect("frame");
        assert_eq!(
            backlog.iter().map(|p| p.events).collect::<Vec<_>>(),
            [10, 10, 10, 8]
        );
        let stored = store.read_from(0, usize::MAX).expect("read");
        let mut i = 0;
        for p in live.iter().chain(&backlog) {
            let n = p.events as usize;
            let expect = payload("gw", stored[i..i + n].iter().map(|s| s.json()));
            assert_eq!(p.body, expect);
            let runs = crate::store::runs(stored[i..i + n].iter().map(|s| &s.at));
            assert_eq!(p.runs, runs);
            i += n;
        }
        assert_eq!(i, stored.len());
        assert!(frame(&store, &mut reader, &payload("gw", []), 10)
            .expect("frame")
            .is_empty());
    }
}
