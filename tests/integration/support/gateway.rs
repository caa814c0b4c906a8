//! Runs the real `floorgate run` binary as a child process against a generated configuration,
//! so that tests can SIGTERM, SIGHUP and `kill -9` it.

use super::broker::{Broker, Pki};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Profiles shipped with the project.
pub fn profiles_glob() -> String {
    format!("{}/config/profiles/*.toml", env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `[uplink]` for a TLS broker at `port` with the test PKI's client certificate.
pub fn uplink_tls(pki: &Pki, port: u16) -> String {
    format!(
        "[uplink]\nurl = \"mqtts://localhost:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nmax_batch = 50\nreconnect_max = \"2s\"\n",
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    )
}

/// `[uplink]` for the test broker (direct).
pub fn uplink_for(pki: &Pki, broker: &Broker) -> String {
    uplink_tls(pki, broker.port)
}

/// A configuration for a test gateway: `[gateway]` + `[store]` + `[metrics]` + the given rest.
pub fn config(id: &str, state_dir: &Path, metrics_port: u16, rest: &str) -> String {
    format!(
        "[gateway]\nid = \"{id}\"\nsite = \"test\"\nstate_dir = \"{}\"\ninclude = [\"{}\"]\n\n[store]\ncommit_interval = \"20ms\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{rest}",
        state_dir.display(),
        profiles_glob()
    )
}

/// A running `floorgate run`.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub metrics_port: u16,
    child: Option<Child>,
    /// Extra environment of every spawn.
    env: Vec<(String, std::ffi::OsString)>,
}

impl Gateway {
    /// Writes the configuration built by `make(state_dir, metrics_port)` and starts the daemon.
    pub fn start(make: impl FnOnce(&Path, u16) -> String) -> Gateway {
        Gateway::start_with_env(Vec::new(), make)
    }

    /// Like [`Gateway::start`], with `env` added to the daemon's environment (also when it is
    /// spawned again).
    pub fn start_with_env(
        env: Vec<(String, std::ffi::OsString)>,
        make: impl FnOnce(&Path, u16) -> String,
    ) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics_port = free_port();
        let text = make(&dir.path().join("state"), metrics_port);
        let config_path = dir.path().join("floorgate.toml");
        std::fs::write(&config_path, text).expect("write config");
        let log_path = dir.path().join("floorgate.log");
        let mut g = Gateway {
            dir,
            config_path,
            log_path,
            metrics_port,
            child: None,
            env,
        };
        g.spawn();
        g
    }

    /// Starts the daemon process (again).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_floorgate"))
            .args(["--log-format", "human", "run", "--config"])
            .arg(&self.config_path)
            .env("FLOORGATE_LOG", "floorgate=debug,info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn floorgate");
        self.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGTERM and wait for the exit (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `within`) for the daemon to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.as_mut()?.try_wait() {
                self.child = None;
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Asserts that `needle` shows up in the log within `within` (fails with the log).
    pub async fn expect_log(&self, needle: &str, within: Duration) {
        assert!(self.wait_log(needle, within).await, "{}", self.log());
    }

    /// Reads one metric series (see [`super::metrics::scrape`]).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        super::metrics::scrape(self.metrics_port, series).await
    }

    /// Waits until a metric satisfies `pred`.
    pub async fn wait_metric(
        &self,
        series: &str,
        within: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Option<f64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(v) = self.metric(series).await {
                if pred(v) {
                    return Some(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Events received by a subscriber, flattened, with arrival order kept.
#[derive(Default, Debug)]
pub struct Received {
    pub events: Vec<serde_json::Value>,
}

impl Received {
    /// Adds every event of an `events` payload.
    pub fn add_payload(&mut self, payload: &[u8]) {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("payload is JSON");
        assert_eq!(v["v"], 1, "wire version");
        for e in v["events"].as_array().expect("events array") {
            self.events.push(e.clone());
        }
    }

    /// Distinct seqs received.
    pub fn seqs(&self) -> std::collections::BTreeSet<u64> {
        self.events
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    }

    /// Events of one device and kind, first delivery of each seq only.
    pub fn of(&self, device: &str, kind: &str) -> Vec<serde_json::Value> {
        let mut seen = std::collections::HashSet::new();
        self.events
            .iter()
            .filter(|e| e["device"] == device && e["kind"] == kind)
            .filter(|e| seen.insert(e["seq"].as_u64()))
            .cloned()
            .collect()
    }

    /// Asserts that a redelivered seq always carries the same event (seq never reused).
    pub fn assert_seq_identity(&self) {
        let mut by_seq = std::collections::HashMap::new();
        for e in &self.events {
            let seq = e["seq"].as_u64().expect("seq");
            if let Some(prev) = by_seq.insert(seq, e.clone()) {
                assert_eq!(prev, *e, "seq {seq} was reused for a different event");
            }
        }
    }

    /// Asserts that every seq between the first and the last received arrived.
    pub fn assert_no_seq_hole(&self) {
        let seqs = self.seqs();
        let (lo, hi) = (
            *seqs.first().expect("events"),
            *seqs.last().expect("events"),
        );
        assert_eq!(
            seqs.len() as u64,
            hi - lo + 1,
            "no hole in the seq range {lo}..{hi}"
        );
    }

    /// Asserts that per device, first deliveries arrive in increasing seq order.
    pub fn assert_per_device_order(&self) {
        let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for e in &self.events {
            let seq = e["seq"].as_u64().expect("seq");
            if !seen.insert(seq) {
                continue;
            }
            let dev = e["device"].as_str().unwrap_or("").to_string();
            if let Some(&prev) = last.get(&dev) {
                assert!(seq > prev, "device {dev}: seq {seq} arrived after {prev}");
            }
            last.insert(dev, seq);
        }
    }

    /// Sum of counter deltas of one device's point (first deliveries only).
    pub fn counter_sum(&self, device: &str, point: &str) -> u64 {
        self.of(device, "counter")
            .iter()
            .filter(|e| e["point"] == point)
            .map(|e| e["delta"].as_u64().unwrap_or(0))
            .sum()
    }
}
