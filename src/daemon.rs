//! The daemon's topology: wires bus tasks → store writer → uplink, and handles the process life
//! (SIGTERM drains and exits, SIGHUP reloads the configuration without touching the store).

use crate::bus::{BusTask, Health};
use crate::config::{self, Config, ConfigErrors};
use crate::store::{Store, Writer};
use crate::uplink::{Uplink, UplinkState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
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
    pollers: CancellationToken,
    writer: CancellationToken,
    uplink: CancellationToken,
    others: CancellationToken,
    poll_tasks: JoinSet<()>,
    writer_task: tokio::task::JoinHandle<()>,
    uplink_task: Option<tokio::task::JoinHandle<()>>,
    other_tasks: JoinSet<()>,
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
}

impl Shared {
    /// Shared state around an opened store.
    pub fn new(store: Arc<Store>) -> Shared {
        Shared {
            store,
            health: Health::default(),
            uplink: Arc::default(),
        }
    }
}

fn birth(_config: &Config) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "state": "online",
        "version": env!("CARGO_PKG_VERSION"),
        "config_version": serde_json::Value::Null,
        "started": crate::event::now_ms(),
    }))
    .unwrap_or_default()
}

impl Pipeline {
    fn start(config: &Config, shared: &Shared) -> Result<Pipeline, DaemonError> {
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
                let up = Uplink::new(
                    u.clone(),
                    &config.gateway.id,
                    shared.store.clone(),
                    birth(config),
                    shared.uplink.clone(),
                );
                up.options()?; // refuse unusable TLS files before anything starts
                Some(up)
            }
            None => None,
        };
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
            pollers,
            writer: writer_token,
            uplink: uplink_token,
            others,
            poll_tasks,
            writer_task,
            uplink_task,
            other_tasks,
            uplink_state,
        })
    }

    /// Stops in data-flow order: pollers, then the writer commits what they produced, then the
    /// uplink drains what it can before `deadline`.
    async fn stop(mut self) {
        self.pollers.cancel();
        while self.poll_tasks.join_next().await.is_some() {}
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
    let config = config::load(&opts.config)?;
    let store = Arc::new(Store::open(
        &config.gateway.state_dir,
        config.store.cache_bytes,
        config.store.max_bytes,
    )?);
    let shared = Shared::new(store);
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
    let mut pipeline = Pipeline::start(&config, &shared)?;
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
        config_version: None,
        started_ms: crate::event::now_ms(),
        store: shared.store.clone(),
        health: shared.health.clone(),
        uplink: shared.uplink.clone(),
        uplink_configured: config.uplink.is_some(),
        acked: Arc::default(),
    };
    let socket = config.gateway.control_socket.clone();
    let control_task = tokio::spawn(control.serve(socket.clone(), control_stop.clone()));
    crate::systemd::notify("READY=1");
    let mut watchdog = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stop.cancelled() => break,
            _ = watchdog.tick() => {
                if pipeline.alive() && progressing(&shared) {
                    crate::systemd::notify("WATCHDOG=1");
                } else {
                    tracing::error!("pipeline makes no progress; withholding the watchdog ping");
                }
            }
            _ = hup.recv() => {
                tracing::info!(path = %path.display(), "SIGHUP: reloading configuration");
                crate::systemd::notify("RELOADING=1");
                match config::load(path) {
                    Ok(new) => {
                        pipeline.stop().await;
                        config = new;
                        pipeline = Pipeline::start(&config, &shared)?;
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

/// The writer looped recently and every bus task completed a poll or probe within its longest
/// back-off (plus slack). A task stuck forever stops the watchdog pings, so systemd restarts us.
fn progressing(shared: &Shared) -> bool {
    let now = crate::event::now_ms();
    let writer = crate::metrics::WRITER_BEAT_MS.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(writer) > 10_000 {
        return false;
    }
    let h = shared.health.lock().unwrap_or_else(|p| p.into_inner());
    h.buses
        .values()
        .all(|b| now.saturating_sub(b.last_activity_ms) <= b.backoff_max_ms + 30_000)
}
