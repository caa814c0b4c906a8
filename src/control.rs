//! The local control socket: `floorgate status` and `floorgate buffer` ask the running daemon.
//! One JSON request per line, one JSON answer per line. The socket is created with mode 0600, so
//! only the service user (and root) can use it.

use crate::bus::Health;
use crate::store::Store;
use crate::uplink::UplinkState;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// What the control server can see.
#[derive(Debug, Clone)]
pub struct Control {
    /// Gateway id.
    pub gateway: String,
    /// Applied config version, if remote config is in use (updated by the daemon).
    pub config_version: Arc<std::sync::Mutex<Option<u64>>>,
    /// Unix ms of the daemon start.
    pub started_ms: u64,
    /// The store.
    pub store: Arc<Store>,
    /// Device and bus health.
    pub health: Health,
    /// Uplink state.
    pub uplink: Arc<UplinkState>,
    /// Whether an uplink is configured.
    pub uplink_configured: bool,
    /// Wakes the daemon to reload its effective configuration.
    pub reload: Arc<tokio::sync::Notify>,
    /// Drain rate sampler: (unix ms, events acknowledged) one per second, last 10.
    pub acked: Arc<std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>>,
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The daemon is not running or the socket is not reachable.
    #[error("cannot reach the daemon at {path}: {source} (is `floorgate run` running with this config?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The daemon answered something unexpected.
    #[error("control protocol: {0}")]
    Protocol(String),
}

fn oldest_age_ms(store: &Store) -> Option<u64> {
    let first = store.read_from(0, 1).ok()?.into_iter().next()?;
    let v: Value = serde_json::from_slice(first.json()).ok()?;
    Some(crate::event::now_ms().saturating_sub(v["ts"].as_u64()?))
}

impl Control {
    /// The status document.
    pub fn status(&self) -> Value {
        let now = crate::event::now_ms();
        let st = self.store.stats();
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let buses: serde_json::Map<String, Value> = h
            .buses
            .iter()
            .map(|(name, b)| {
                let elapsed = now.saturating_sub(b.since_ms).max(1) as f64;
                (
                    name.clone(),
                    json!({
                        "utilisation": (b.busy_ms / elapsed).min(1.0),
                        "transactions": b.transactions, "timeouts": b.timeouts, "crc_or_invalid": b.invalid,
                        "exceptions": b.exceptions, "transport_errors": b.transport_errors,
                    }),
                )
            })
            .collect();
        let devices: serde_json::Map<String, Value> = h
            .devices
            .iter()
            .map(|(name, d)| (name.clone(), serde_json::to_value(d).unwrap_or(Value::Null)))
            .collect();
        drop(h);
        let rate = {
            let s = self.acked.lock().unwrap_or_else(|p| p.into_inner());
            match (s.front(), s.back()) {
                (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 * 1000.0 / (b.0 - a.0) as f64,
                _ => 0.0,
            }
        };
        let last_puback = self.uplink.last_puback_ms.load(Ordering::Relaxed);
        let unwritable = self.store.unwritable();
        json!({
            "gateway": self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "config_version": *self.config_version.lock().unwrap_or_else(|p| p.into_inner()),
            "started": self.started_ms,
            "uptime_s": now.saturating_sub(self.started_ms) / 1000,
            "devices": devices,
            "buses": buses,
            "store": {
                "events": st.events, "telemetry": st.telemetry, "bytes": st.bytes,
                "oldest_seq": st.oldest_seq, "oldest_age_ms": oldest_age_ms(&self.store),
                "next_seq": st.next_seq, "dropped": st.dropped,
                "writable": unwritable.is_none(),
                "error": unwritable.as_ref().map(|u| &u.error),
                "unwritable_since_ms": unwritable.as_ref().map(|u| u.since_ms),
                "held_events": unwritable.as_ref().map_or(0, |u| u.held_events),
                "needs_restart": unwritable.as_ref().is_some_and(|u| u.failed),
            },
            "uplink": {
                "configured": self.uplink_configured,
                "connected": self.uplink.connected.load(Ordering::Relaxed),
                "sessions": self.uplink.sessions.load(Ordering::Relaxed),
                "last_puback_ms": (last_puback > 0).then_some(last_puback),
                "drain_rate_events_per_s": rate,
                "last_error": self.uplink.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            },
        })
    }

    fn handle(&self, req: &Value) -> Value {
        match req["cmd"].as_str() {
            Some("status") => self.status(),
            Some("buffer_stats") => buffer_stats(&self.store),
            Some("reload") => {
                self.reload.notify_one();
                json!({ "reloading": true })
            }
            Some("buffer_export") => {
                let max = req["max"].as_u64().unwrap_or(u64::MAX) as usize;
                match self.store.read_from(0, max) {
                    Ok(events) => {
                        let lines: Vec<Value> = events
                            .iter()
                            .filter_map(|e| serde_json::from_slice(e.json()).ok())
                            .collect();
                        json!({ "events": lines })
                    }
                    Err(e) => json!({ "error": e.to_string() }),
                }
            }
            Some("buffer_purge") => match purge(&self.store) {
                Ok(v) => v,
                Err(e) => json!({ "error": e.to_string() }),
            },
            other => json!({ "error": format!("unknown command {other:?}") }),
        }
    }

    /// Serves the socket until shutdown.
    pub async fn serve(self, path: PathBuf, shutdown: CancellationToken) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let this = Arc::new(self);
        let sampler = this.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let mut s = sampler.acked.lock().unwrap_or_else(|p| p.into_inner());
                s.push_back((crate::event::now_ms(), crate::metrics::EVENTS_ACKED.get()));
                while s.len() > 10 {
                    s.pop_front();
                }
            }
        });
        loop {
            let (sock, _) = tokio::select! {
                r = listener.accept() => r?,
                _ = shutdown.cancelled() => break,
            };
            let this = this.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match serde_json::from_str::<Value>(&line) {
                        Ok(req) => {
                            let this = this.clone();
                            tokio::task::spawn_blocking(move || this.handle(&req))
                                .await
                                .unwrap_or(Value::Null)
                        }
                        Err(e) => json!({ "error": format!("bad request: {e}") }),
                    };
                    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}

/// Store counters as JSON.
pub fn buffer_stats(store: &Store) -> Value {
    let st = store.stats();
    json!({
        "events": st.events, "telemetry": st.telemetry, "bytes": st.bytes,
        "oldest_seq": st.oldest_seq, "oldest_age_ms": oldest_age_ms(store), "next_seq": st.next_seq,
        "acknowledged_blocks_to_delete": store.reclaimable(),
    })
}

/// Removes every stored event and commits a `gap` event saying so.
pub fn purge(store: &Store) -> Result<Value, crate::store::StoreError> {
    match store.purge()? {
        Some((n, first, last)) => {
            store.commit_gap(n, first, last)?;
            tracing::warn!(
                dropped = n,
                first_seq = first,
                last_seq = last,
                "buffer purged by operator"
            );
            Ok(json!({ "purged": n, "first_seq": first, "last_seq": last }))
        }
        None => Ok(json!({ "purged": 0 })),
    }
}

/// Sends one request to the daemon and returns its answer.
pub async fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let sock = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (r, mut w) = sock.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    let mut lines = BufReader::new(r).lines();
    let answer = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| ControlError::Protocol("no answer within 30s".into()))?
        .map_err(|e| ControlError::Protocol(e.to_string()))?
        .ok_or_else(|| ControlError::Protocol("connection closed".into()))?;
    serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(e.to_string()))
}
