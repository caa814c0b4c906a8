//! The daemon's topology: wires bus tasks → store writer → uplink, and handles the process life
//! (SIGTERM drains and exits, SIGHUP reloads the configuration without touching the store).

use crate::bus::{BusTask, Health};
use crate::config::{Config, ConfigErrors};
use crate::store::{Store, Writer};
use crate::uplink::{Incoming, Outbound, Outbox, Uplink, UplinkState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Daemon failures, mapped to exit codes by `main`.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is invalid (exit 78).
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A bus could not be set up.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// The uplink settings are unusable (TLS files, key permissions).
    #[error("uplink: {0}")]
    Uplink(#[from] crate::uplink::UplinkError),
    /// Other I/O (signals, sockets).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The pipeline for one configuration.
struct Pipeline {
    commands: std::collections::HashMap<String, mpsc::Sender<crate::bus::WriteCommand>>,
    pollers: CancellationToken,
    writer: CancellationToken,
    uplink: CancellationToken,
    others: CancellationToken,
    poll_tasks: JoinSet<()>,
    writer_task: tokio::task::JoinHandle<()>,
    uplink_task: Option<tokio::task::JoinHandle<()>>,
    other_tasks: JoinSet<()>,
    store: Arc<Store>,
    /// Shared with status (issue: control socket).
    #[allow(dead_code)]
    uplink_state: Option<Arc<UplinkState>>,
}

/// What a running daemon shares with `status` and the tests.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The store.
    pub store: Arc<Store>,
    /// Device health.
    pub health: Health,
    /// Uplink state (kept across reloads).
    pub uplink: Arc<UplinkState>,
    /// Messages the gateway publishes (config state, command results); survives reloads.
    pub outbox_tx: mpsc::Sender<Outbound>,
    outbox: Outbox,
    incoming_tx: mpsc::Sender<Incoming>,
    incoming_rx: Arc<std::sync::Mutex<Option<mpsc::Receiver<Incoming>>>>,
    /// Asks the daemon to reload its effective configuration (control socket, `config rollback`).
    pub reload: Arc<tokio::sync::Notify>,
    /// The applied remote config version, for `status`.
    pub config_version: Arc<std::sync::Mutex<Option<u64>>>,
}

impl Shared {
    /// Shared state around an opened store.
    pub fn new(store: Arc<Store>) -> Shared {
        let (outbox_tx, outbox) = mpsc::channel(256);
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        Shared {
            store,
            health: Health::default(),
            uplink: Arc::default(),
            outbox_tx,
            outbox: Arc::new(tokio::sync::Mutex::new(outbox)),
            incoming_tx,
            incoming_rx: Arc::new(std::sync::Mutex::new(Some(incoming_rx))),
            reload: Arc::default(),
            config_version: Arc::default(),
        }
    }

    fn publish(&self, subtopic: &str, payload: &impl serde::Serialize, retain: bool) {
        let msg = Outbound {
            subtopic: subtopic.to_string(),
            payload: serde_json::to_vec(payload).unwrap_or_default(),
            retain,
        };
        if self.outbox_tx.try_send(msg).is_err() {
            tracing::warn!(subtopic, "outbox full; message dropped");
        }
    }
}

fn birth(_config: &Config, version: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "state": "online",
        "version": env!("CARGO_PKG_VERSION"),
        "config_version": version,
        "started": crate::event::now_ms(),
    }))
    .unwrap_or_default()
}

impl Pipeline {
    fn start(
        config: &Config,
        shared: &Shared,
        version: Option<u64>,
    ) -> Result<Pipeline, DaemonError> {
        *shared
            .config_version
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = version;
        let pollers = CancellationToken::new();
        let writer_token = CancellationToken::new();
        let uplink_token = CancellationToken::new();
        let others = CancellationToken::new();
        let (writer, handle) = Writer::new(shared.store.clone(), config.store.commit_interval);
        let mut tasks = Vec::new();
        for bus in &config.buses {
            tasks.push(BusTask::new(
                config,
                bus,
                &shared.store,
                handle.clone(),
                shared.health.clone(),
            )?);
        }
        let uplink = match &config.uplink {
            Some(u) => {
                let mut up = Uplink::new(
                    u.clone(),
                    &config.gateway.id,
                    shared.store.clone(),
                    birth(config, version),
                    shared.uplink.clone(),
                );
                let mut topics = vec![
                    format!("{}/config/set", u.topic_prefix),
                    format!("{}/cmd", u.topic_prefix),
                ];
                for g in &config.gateway.groups {
                    topics.push(format!(
                        "floorgate/{}/groups/{g}/config/set",
                        config.gateway.site
                    ));
                }
                up.control(topics, shared.incoming_tx.clone(), shared.outbox.clone());
                up.options()?; // refuse unusable TLS files before anything starts
                Some(up)
            }
            None => None,
        };
        let commands = tasks
            .iter()
            .map(|t| (t.name().to_string(), t.commands()))
            .collect();
        let mut poll_tasks = JoinSet::new();
        for t in tasks {
            poll_tasks.spawn(t.run(pollers.clone()));
        }
        drop(handle);
        let writer_task = tokio::spawn(writer.run(writer_token.clone()));
        let uplink_state = uplink.as_ref().map(|u| u.state.clone());
        let uplink_task = uplink.map(|u| tokio::spawn(u.run(uplink_token.clone())));
        let mut other_tasks = JoinSet::new();
        if let Some(addr) = config.metrics.listen {
            let token = others.clone();
            other_tasks.spawn(async move {
                if let Err(error) = crate::metrics::serve(addr, token).await {
                    tracing::error!(%addr, %error, "metrics endpoint failed");
                }
            });
        }
        Ok(Pipeline {
            commands,
            pollers,
            writer: writer_token,
            uplink: uplink_token,
            others,
            poll_tasks,
            writer_task,
            uplink_task,
            other_tasks,
            store: shared.store.clone(),
            uplink_state,
        })
    }

    /// Stops in data-flow order: pollers, then the writer commits what they produced, then the
    /// uplink drains what it can before `deadline`. A store that does not take writes holds
    /// pollers in `send`: then the writer stops first, which releases them. The store keeps the
    /// group it holds, and new pollers start from its snapshots, so nothing derived is lost.
    async fn stop(mut self) {
        self.pollers.cancel();
        loop {
            tokio::select! {
                done = self.poll_tasks.join_next() => if done.is_none() { break },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if self.store.unwritable().is_some() {
                        self.writer.cancel();
                    }
                }
            }
        }
        self.writer.cancel();
        let _ = self.writer_task.await;
        self.uplink.cancel();
        if let Some(t) = self.uplink_task.take() {
            let _ = t.await;
        }
        self.others.cancel();
        while self.other_tasks.join_next().await.is_some() {}
    }
}

/// Options of `floorgate run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Config file.
    pub config: PathBuf,
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(opts: RunOptions) -> Result<(), DaemonError> {
    let (mut config, _) = crate::remote::load_effective(&opts.config)?;
    // A pushed configuration whose health gate the last run did not finish goes back first (the
    // state directory is the local file's: a push cannot change it).
    let interrupted = crate::remote::roll_back_interrupted_trial(&config.gateway.state_dir);
    if interrupted.is_some() {
        config = crate::remote::load_effective(&opts.config)?.0;
    }
    let store = Arc::new(
        Store::open(
            &config.gateway.state_dir,
            config.store.cache_bytes,
            config.store.max_bytes,
        )?
        .with_min_free(config.store.min_free),
    );
    let shared = Shared::new(store);
    if let Some(state) = interrupted {
        shared.publish("config/state", &state, true);
    }
    run_with(
        opts.config.as_path(),
        config,
        shared,
        CancellationToken::new(),
    )
    .await
}

/// Runs the daemon with an opened store until `stop` or a signal.
pub async fn run_with(
    path: &Path,
    mut config: Config,
    shared: Shared,
    stop: CancellationToken,
) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let history = crate::remote::History::new(&config.gateway.state_dir);
    let mut version = history.applied();
    let mut pipeline = Pipeline::start(&config, &shared, version.version())?;
    let mut incoming = shared
        .incoming_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| std::io::Error::other("daemon already running with this shared state"))?;
    let mut gate: Option<Gate> = None;
    let mut health_tick = tokio::time::interval(Duration::from_secs(60));
    let mut gate_tick = tokio::time::interval(Duration::from_millis(250));
    let stats = shared.store.stats();
    tracing::info!(
        gateway = %config.gateway.id,
        devices = config.devices.len(),
        buses = config.buses.len(),
        stored_events = stats.events,
        next_seq = stats.next_seq,
        "floorgate running"
    );
    let control_stop = CancellationToken::new();
    let control = crate::control::Control {
        gateway: config.gateway.id.clone(),
        config_version: shared.config_version.clone(),
        started_ms: crate::event::now_ms(),
        store: shared.store.clone(),
        health: shared.health.clone(),
        uplink: shared.uplink.clone(),
        uplink_configured: config.uplink.is_some(),
        reload: shared.reload.clone(),
        acked: Arc::default(),
    };
    let socket = config.gateway.control_socket.clone();
    let control_task = tokio::spawn(control.serve(socket.clone(), control_stop.clone()));
    crate::systemd::notify("READY=1");
    let mut watchdog = tokio::time::interval(Duration::from_secs(5));
    let mut store_tick = tokio::time::interval(Duration::from_secs(1));
    let mut unwritable = false;
    let mut failure: Option<DaemonError> = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stop.cancelled() => break,
            _ = store_tick.tick() => {
                let now = shared.store.unwritable();
                if now.is_some() != unwritable {
                    unwritable = now.is_some();
                    // Tell the cloud (retained health) and systemd at once, not at the next period.
                    shared.publish("health", &health_message(&shared, &config), true);
                    crate::systemd::notify(&systemd_status(now.as_ref()));
                }
                if let Some(u) = now.filter(|u| u.restart) {
                    tracing::error!(
                        error = %u.error,
                        held_events = u.held_events,
                        "state directory takes writes again, but sled takes none after its write failed: exiting to be restarted; held events are derived again from the committed snapshots"
                    );
                    failure = Some(crate::store::StoreError::Failed(u.error).into());
                    break;
                }
            }
            _ = watchdog.tick() => {
                if pipeline.alive() && progressing(&shared) {
                    crate::systemd::notify("WATCHDOG=1");
                } else {
                    tracing::error!("pipeline makes no progress; withholding the watchdog ping");
                }
            }
            msg = incoming.recv() => {
                let Some(msg) = msg else { continue };
                if msg.topic.ends_with("/config/set") {
                    if let Some(g) = on_config_set(&msg, path, &config, &shared, &history, gate.is_some()) {
                        tracing::info!(version = g.version, "applying pushed configuration");
                        let online = online_devices(&shared);
                        pipeline.stop().await;
                        let previous = (config.clone(), version);
                        config = g.config.clone();
                        version = g.applied;
                        match Pipeline::start(&config, &shared, version.version()) {
                            Ok(p) => {
                                pipeline = p;
                                gate = Some(Gate::new(g, previous, &shared, online));
                            }
                            Err(error) => {
                                let why = format!("cannot start with the new configuration: {error}");
                                (config, version) = previous;
                                pipeline = Pipeline::start(&config, &shared, version.version())?;
                                finish(&shared, &history, g.version, "rolled_back", Some(&why), version);
                            }
                        }
                    }
                } else if msg.topic.ends_with("/cmd") {
                    on_command(&msg, &config, &shared, &pipeline.commands);
                }
            }
            _ = health_tick.tick() => {
                shared.publish("health", &health_message(&shared, &config), true);
            }
            _ = gate_tick.tick(), if gate.is_some() => {
                let Some(g) = gate.as_ref() else { continue };
                match g.verdict(&shared) {
                    Verdict::Wait => {}
                    Verdict::Pass => {
                        finish(&shared, &history, g.version, "applied", None, version);
                        tracing::info!(version = g.version, "pushed configuration passed its health gate");
                        gate = None;
                    }
                    Verdict::Fail(why) => {
                        tracing::error!(version = g.version, reason = %why, "pushed configuration failed its health gate; rolling back");
                        let g = gate.take().ok_or_else(|| std::io::Error::other("gate"))?;
                        pipeline.stop().await;
                        (config, version) = g.previous;
                        pipeline = Pipeline::start(&config, &shared, version.version())?;
                        finish(&shared, &history, g.version, "rolled_back", Some(&why), version);
                    }
                }
            }
            _ = shared.reload.notified() => {
                tracing::info!("reload requested over the control socket");
                match crate::remote::load_effective(path) {
                    Ok((new, v)) => {
                        pipeline.stop().await;
                        (config, version) = (new, v);
                        pipeline = Pipeline::start(&config, &shared, version.version())?;
                    }
                    Err(errors) => tracing::error!(%errors, "reload rejected; keeping the running configuration"),
                }
            }
            _ = hup.recv() => {
                tracing::info!(path = %path.display(), "SIGHUP: reloading configuration");
                crate::systemd::notify("RELOADING=1");
                match crate::remote::load_effective(path) {
                    Ok((new, v)) => {
                        pipeline.stop().await;
                        (config, version) = (new, v);
                        pipeline = Pipeline::start(&config, &shared, version.version())?;
                        tracing::info!("configuration reloaded");
                    }
                    Err(errors) => {
                        tracing::error!(%errors, "new configuration rejected; keeping the running one");
                    }
                }
                crate::systemd::notify("READY=1");
            }
        }
    }
    tracing::info!("stopping: draining pollers, store and uplink");
    crate::systemd::notify("STOPPING=1");
    pipeline.stop().await;
    control_stop.cancel();
    if let Ok(Err(error)) = control_task.await {
        tracing::warn!(path = %socket.display(), %error, "control socket failed");
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    shared.store.flush()?;
    tracing::info!("stopped");
    Ok(())
}

impl Pipeline {
    /// The pipeline makes progress: the writer and uplink tasks are alive.
    fn alive(&self) -> bool {
        !self.writer_task.is_finished()
            && self.uplink_task.as_ref().is_none_or(|t| !t.is_finished())
    }
}

/// The writer and the uplink looped recently and every bus task completed a poll or probe
/// within its longest back-off (plus slack). A task stuck forever stops the watchdog pings, so
/// systemd restarts us.
/// While the store does not take writes, bus tasks wait for the writer on purpose (a restart
/// would not make the disk writable); the writer still has to loop.
fn progressing(shared: &Shared) -> bool {
    let now = crate::event::now_ms();
    let writer = crate::metrics::WRITER_BEAT_MS.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(writer) > 10_000 {
        return false;
    }
    // The uplink loops at least every second while it runs (0: none runs).
    let uplink = crate::metrics::UPLINK_BEAT_MS.load(std::sync::atomic::Ordering::Relaxed);
    if uplink != 0 && now.saturating_sub(uplink) > 10_000 {
        return false;
    }
    if shared.store.unwritable().is_some() {
        return true;
    }
    let h = shared.health.lock().unwrap_or_else(|p| p.into_inner());
    h.buses
        .values()
        .all(|b| now.saturating_sub(b.last_activity_ms) <= b.backoff_max_ms + b.poll_slack_ms)
}

/// A pushed configuration that passed its checks and is about to be applied.
#[derive(Debug)]
struct Accepted {
    version: u64,
    config: Config,
    applied: crate::remote::Applied,
}

/// Handles `config/set`: signature, version, validation and box checks. Rejections are reported on
/// `config/state` here; an accepted config is stored and returned for the daemon to apply.
fn on_config_set(
    msg: &Incoming,
    path: &Path,
    running: &Config,
    shared: &Shared,
    history: &crate::remote::History,
    busy: bool,
) -> Option<Accepted> {
    use crate::remote::{ConfigSet, ConfigState};
    let reject = |v: Option<u64>, why: String| {
        tracing::warn!(version = ?v, error = %why, "pushed configuration rejected");
        shared.publish("config/state", &ConfigState::rejected(v, why), true);
        None
    };
    let set: ConfigSet = match serde_json::from_slice(&msg.payload) {
        Ok(s) => s,
        Err(e) => {
            let v = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v["version"].as_u64());
            return reject(v, format!("malformed config/set: {e}"));
        }
    };
    let v = Some(set.version);
    match running.uplink.as_ref().and_then(|u| u.config_public_key.as_deref()) {
        Some(k) => match crate::uplink::remote::decode_public_key(k) {
            Ok(key) => {
                if let Err(e) = crate::remote::verify_signature(&key, &set) {
                    return reject(v, e);
                }
            }
            Err(e) => return reject(v, format!("config_public_key: {e}")),
        },
        None => tracing::warn!("accepting an unsigned configuration: set uplink.config_public_key to require signatures"),
    }
    let now = history.applied();
    if Some(set.version) == now.full || Some(set.version) == now.overlay {
        // The version in use again (e.g. a canary also follows the group topic): nothing to do,
        // and its retained `applied` state stays.
        tracing::debug!(
            version = set.version,
            "pushed configuration is the one in use"
        );
        return None;
    }
    let highest = history.highest();
    if set.version <= highest {
        return reject(
            v,
            format!("version {} is not newer than {highest}", set.version),
        );
    }
    if busy {
        return reject(v, "another configuration is being applied".into());
    }
    // A document with a [gateway] section is a whole configuration for this gateway; one with
    // only [profiles.*] and [poll] is a fleet overlay applied on top of it.
    let whole = toml::from_str::<toml::Table>(&set.toml)
        .map(|t| t.contains_key("gateway"))
        .unwrap_or(true);
    let located = |errors: crate::config::ConfigErrors| {
        errors.to_string().replace(
            &path.display().to_string(),
            &format!("config v{}", set.version),
        )
    };
    let (config, applied) = if whole {
        if msg.topic.contains("/groups/") {
            return reject(v, "a group configuration holds only [profiles.*] and [poll]; identity, buses, devices and credentials stay the gateway's own".into());
        }
        let base = match crate::config::parse_str(&set.toml, path) {
            Ok(c) => c,
            Err(errors) => return reject(v, located(errors)),
        };
        let config = match crate::remote::load_overlay(path, history, now.overlay) {
            Ok(Some(o)) => base.compose(&o),
            _ => base,
        };
        (
            config,
            crate::remote::Applied {
                full: v,
                overlay: now.overlay,
            },
        )
    } else {
        let overlay = match crate::config::parse_overlay(&set.toml, path) {
            Ok(o) => o,
            Err(errors) => return reject(v, located(errors)),
        };
        let base = match crate::remote::load_base(path, history, now.full) {
            Ok(b) => b,
            Err(e) => {
                return reject(
                    v,
                    format!("the gateway's own configuration does not load: {e}"),
                )
            }
        };
        let config = base.compose(&overlay);
        // Poll policy and devices must still fit together.
        if let Some(p) = config
            .poll_policy
            .keys()
            .find(|p| !config.profiles.contains_key(*p))
        {
            return reject(v, format!("[poll] names unknown profile {p:?}"));
        }
        (
            config,
            crate::remote::Applied {
                full: now.full,
                overlay: v,
            },
        )
    };
    if let Err(e) = crate::remote::check_against_box(&config, running) {
        return reject(v, e);
    }
    if let Err(e) = history.store(set.version, &set.toml) {
        return reject(v, format!("cannot store the configuration: {e}"));
    }
    if let Err(e) = history.begin_trial(set.version, now) {
        return reject(v, format!("cannot note the health gate's trial: {e}"));
    }
    if let Err(e) = history.set_applied(applied) {
        let _ = history.end_trial();
        return reject(v, format!("cannot switch to the configuration: {e}"));
    }
    Some(Accepted {
        version: set.version,
        config,
        applied,
    })
}

/// Records and reports the outcome of a pushed configuration; `current` is the version now in use.
fn finish(
    shared: &Shared,
    history: &crate::remote::History,
    version: u64,
    status: &str,
    error: Option<&str>,
    current: crate::remote::Applied,
) {
    if let Err(e) = history.set_applied(current) {
        tracing::error!(error = %e, "cannot record the configuration in use");
    } else if let Err(e) = history.end_trial() {
        tracing::error!(error = %e, "cannot end the health gate's trial");
    }
    if let Err(e) = history.record(version, status, error) {
        tracing::error!(error = %e, "cannot write the configuration history");
    }
    let state = crate::remote::ConfigState {
        version: Some(version),
        status: status.into(),
        error: error.map(str::to_string),
    };
    shared.publish("config/state", &state, true);
}

enum Verdict {
    Wait,
    Pass,
    Fail(String),
}

/// The health gate of an applied configuration.
struct Gate {
    version: u64,
    previous: (Config, crate::remote::Applied),
    deadline: tokio::time::Instant,
    window: Duration,
    sessions_before: u64,
    needs_uplink: bool,
    online_before: Vec<String>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("version", &self.version)
            .finish()
    }
}

impl Gate {
    fn new(
        a: Accepted,
        previous: (Config, crate::remote::Applied),
        shared: &Shared,
        online: Vec<String>,
    ) -> Gate {
        let window = a
            .config
            .uplink
            .as_ref()
            .map_or(Duration::from_secs(60), |u| u.config_window);
        // Devices that answered before the change must answer again (if still configured).
        let online_before = online
            .into_iter()
            .filter(|d| a.config.devices.iter().any(|n| &n.name == d))
            .collect();
        Gate {
            version: a.version,
            deadline: tokio::time::Instant::now() + window,
            window,
            sessions_before: shared
                .uplink
                .sessions
                .load(std::sync::atomic::Ordering::Relaxed),
            needs_uplink: a.config.uplink.is_some(),
            online_before,
            previous,
        }
    }

    fn verdict(&self, shared: &Shared) -> Verdict {
        use std::sync::atomic::Ordering;
        let uplink_ok = !self.needs_uplink
            || (shared.uplink.sessions.load(Ordering::Relaxed) > self.sessions_before
                && shared.uplink.connected.load(Ordering::Relaxed));
        let h = shared.health.lock().unwrap_or_else(|p| p.into_inner());
        let silent: Vec<&String> = self
            .online_before
            .iter()
            .filter(|d| !h.devices.get(*d).is_some_and(|x| x.online && x.polls > 0))
            .collect();
        if uplink_ok && silent.is_empty() {
            return Verdict::Pass;
        }
        if tokio::time::Instant::now() < self.deadline {
            return Verdict::Wait;
        }
        let mut why = Vec::new();
        if !uplink_ok {
            let last = shared
                .uplink
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            why.push(format!(
                "uplink did not reconnect within {:?}{}",
                self.window,
                last.map(|e| format!(" ({e})")).unwrap_or_default()
            ));
        }
        if !silent.is_empty() {
            why.push(format!(
                "devices stopped answering: {}",
                silent
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Verdict::Fail(format!("health gate: {}", why.join("; ")))
    }
}

/// Names of the devices that answered their last poll.
fn online_devices(shared: &Shared) -> Vec<String> {
    let h = shared.health.lock().unwrap_or_else(|p| p.into_inner());
    h.devices
        .iter()
        .filter(|(_, d)| d.online)
        .map(|(n, _)| n.clone())
        .collect()
}

const COMMANDS: u8 = b'c';

/// Handles `cmd`: at most once per id (the outcome is persisted before the write), never after
/// `expires`, only writable points with a value of the point's type and range.
fn on_command(
    msg: &Incoming,
    config: &Config,
    shared: &Shared,
    buses: &std::collections::HashMap<String, mpsc::Sender<crate::bus::WriteCommand>>,
) {
    use crate::remote::{check_command, Command, CommandResult};
    let store = shared.store.clone();
    let report = move |shared: &Shared, r: CommandResult, persist: bool| {
        if persist {
            if let Err(e) =
                store.put_record(COMMANDS, &r.id, &serde_json::to_vec(&r).unwrap_or_default())
            {
                tracing::error!(error = %e, id = %r.id, "cannot persist a command outcome");
            }
        }
        tracing::info!(id = %r.id, status = %r.status, error = ?r.error, "command");
        shared.publish("cmd/result", &r, false);
    };
    let cmd: Command = match serde_json::from_slice(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            let id = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string));
            match id {
                Some(id) if !id.is_empty() => report(
                    shared,
                    CommandResult::new(&id, "rejected", Some(format!("malformed command: {e}"))),
                    false,
                ),
                _ => tracing::warn!(error = %e, "malformed command without id ignored"),
            }
            return;
        }
    };
    if cmd.id.is_empty() || cmd.id.len() > 200 {
        return tracing::warn!("command with an empty or oversized id ignored");
    }
    match shared.store.get_record(COMMANDS, &cmd.id) {
        Ok(Some(_)) => {
            return report(
                shared,
                CommandResult::new(&cmd.id, "duplicate", Some("this id already ran".into())),
                false,
            )
        }
        Ok(None) => {}
        Err(e) => {
            return report(
                shared,
                CommandResult::new(&cmd.id, "failed", Some(format!("store: {e}"))),
                false,
            )
        }
    }
    if cmd.expires.is_some_and(|x| crate::event::now_ms() > x) {
        return report(shared, CommandResult::new(&cmd.id, "expired", None), true);
    }
    let (bus, point, value) = match check_command(config, &cmd) {
        Ok(v) => v,
        Err(e) => {
            return report(
                shared,
                CommandResult::new(&cmd.id, "rejected", Some(e)),
                true,
            )
        }
    };
    let Some(tx) = buses.get(&bus).cloned() else {
        return report(
            shared,
            CommandResult::new(&cmd.id, "failed", Some(format!("bus {bus} is not running"))),
            true,
        );
    };
    // Mark it before the write: a crash during the write must not run it twice.
    let running = CommandResult::new(&cmd.id, "running", None);
    if let Err(e) = shared.store.put_record(
        COMMANDS,
        &cmd.id,
        &serde_json::to_vec(&running).unwrap_or_default(),
    ) {
        return report(
            shared,
            CommandResult::new(&cmd.id, "failed", Some(format!("store: {e}"))),
            false,
        );
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let w = crate::bus::WriteCommand {
            device: cmd.device.clone(),
            point,
            value,
            reply,
        };
        let outcome = if tx.send(w).await.is_err() {
            Err("bus stopped".to_string())
        } else {
            rx.await.unwrap_or_else(|_| Err("bus stopped".to_string()))
        };
        let r = match outcome {
            Ok(()) => CommandResult::new(&cmd.id, "done", None),
            Err(e) => CommandResult::new(&cmd.id, "failed", Some(e)),
        };
        report(&shared, r, true);
    });
}

/// The `STATUS=` line for systemd (`systemctl status`).
fn systemd_status(unwritable: Option<&crate::store::Unwritable>) -> String {
    match unwritable {
        Some(u) => format!(
            "STATUS=store not writable: {}; {} events held in memory, {}",
            u.error,
            u.held_events,
            if u.failed {
                "restarting once the state directory takes writes"
            } else {
                "retrying"
            }
        ),
        None => "STATUS=running".into(),
    }
}

/// The periodic `health` message (retained): the floor at a glance for the cloud. Also sent at
/// once when the store stops or starts taking writes again.
fn health_message(shared: &Shared, config: &Config) -> serde_json::Value {
    let st = shared.store.stats();
    let unwritable = shared.store.unwritable();
    let h = shared.health.lock().unwrap_or_else(|p| p.into_inner());
    let down: Vec<&String> = h
        .devices
        .iter()
        .filter(|(_, d)| !d.online)
        .map(|(n, _)| n)
        .collect();
    serde_json::json!({
        "ts": crate::event::now_ms(),
        "gateway": config.gateway.id,
        "config_version": *shared.config_version.lock().unwrap_or_else(|p| p.into_inner()),
        "devices": { "total": h.devices.len(), "up": h.devices.len() - down.len(), "down": down },
        "backlog": { "events": st.events, "bytes": st.bytes, "oldest_seq": st.oldest_seq },
        "dropped": st.dropped,
        "store": {
            "writable": unwritable.is_none(),
            "error": unwritable.as_ref().map(|u| &u.error),
            "unwritable_since": unwritable.as_ref().map(|u| u.since_ms),
            "held_events": unwritable.as_ref().map_or(0, |u| u.held_events),
            "needs_restart": unwritable.as_ref().is_some_and(|u| u.failed),
        },
    })
}
