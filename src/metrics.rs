//! Metrics for the person on call, served in the Prometheus text format on `metrics.listen`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A process-wide counter without labels.
#[derive(Debug)]
pub struct Counter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl Counter {
    const fn new(name: &'static str, help: &'static str) -> Counter {
        Counter {
            name,
            help,
            value: AtomicU64::new(0),
        }
    }
    /// Adds one.
    pub fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// Store commits.
pub static STORE_COMMITS: Counter = Counter::new(
    "floorgate_store_commits_total",
    "Durable group commits of the store.",
);
/// Blocks merged by packing.
pub static STORE_PACKED: Counter = Counter::new(
    "floorgate_store_blocks_packed_total",
    "Small blocks no reader had read, merged into larger ones (while the uplink is behind).",
);
/// Tombstones swept.
pub static STORE_TOMBSTONES_SWEPT: Counter = Counter::new(
    "floorgate_store_tombstones_swept_total",
    "Keys of blocks deleted while a backlog drained, removed once it was drained.",
);
/// Store write failures.
pub static STORE_ERRORS: Counter = Counter::new(
    "floorgate_store_errors_total",
    "Failed store commits (disk full, I/O errors).",
);
/// Publishes acknowledged.
pub static PUBLISHES: Counter = Counter::new(
    "floorgate_uplink_publishes_total",
    "Event publishes acknowledged by the broker (PUBACK success).",
);
/// Events acknowledged.
pub static EVENTS_ACKED: Counter = Counter::new(
    "floorgate_uplink_events_acked_total",
    "Events deleted from the store after PUBACK.",
);
/// PUBACKs with a failure reason.
pub static PUBACK_FAILURES: Counter = Counter::new(
    "floorgate_uplink_puback_failures_total",
    "PUBACKs with a failure reason code (events kept).",
);
/// Reconnects.
pub static RECONNECTS: Counter = Counter::new(
    "floorgate_uplink_connects_total",
    "MQTT sessions established.",
);
/// Connection failures.
pub static CONNECT_FAILURES: Counter = Counter::new(
    "floorgate_uplink_connect_failures_total",
    "Failed MQTT connection attempts or lost sessions.",
);

/// Unix ms of the store writer's last loop (watchdog: the pipeline makes progress).
pub static WRITER_BEAT_MS: AtomicU64 = AtomicU64::new(0);

/// Unix ms of the uplink's last loop, or 0 while no uplink runs (watchdog).
pub static UPLINK_BEAT_MS: AtomicU64 = AtomicU64::new(0);

static COUNTERS: [&Counter; 9] = [
    &STORE_COMMITS,
    &STORE_PACKED,
    &STORE_TOMBSTONES_SWEPT,
    &STORE_ERRORS,
    &PUBLISHES,
    &EVENTS_ACKED,
    &PUBACK_FAILURES,
    &RECONNECTS,
    &CONNECT_FAILURES,
];

struct Family {
    help: &'static str,
    kind: &'static str,
    series: BTreeMap<String, f64>,
}

/// Bucket bounds of every histogram, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

struct Histogram {
    help: &'static str,
    series: BTreeMap<String, ([u64; 12], u64, f64)>,
}

static HISTOGRAMS: Mutex<BTreeMap<&'static str, Histogram>> = Mutex::new(BTreeMap::new());

/// Records one observation (seconds) in a labelled histogram.
pub fn observe(name: &'static str, help: &'static str, pairs: &[(&str, &str)], secs: f64) {
    let mut map = HISTOGRAMS.lock().unwrap_or_else(|p| p.into_inner());
    let h = map.entry(name).or_insert_with(|| Histogram {
        help,
        series: BTreeMap::new(),
    });
    let add = |(buckets, count, sum): &mut ([u64; 12], u64, f64)| {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                buckets[i] += 1;
            }
        }
        *count += 1;
        *sum += secs;
    };
    with_labels(pairs, |key| match h.series.get_mut(key) {
        Some(series) => add(series),
        None => add(h.series.entry(key.to_string()).or_insert(([0; 12], 0, 0.0))),
    });
}

static LABELED: Mutex<BTreeMap<&'static str, Family>> = Mutex::new(BTreeMap::new());

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    write_labels(&mut s, pairs);
    s
}

/// `k="v",...` with `\` and `"` escaped.
fn write_labels(s: &mut String, pairs: &[(&str, &str)]) {
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            if matches!(c, '\\' | '"') {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
    }
}

/// Runs `f` with the label key of `pairs`, built in a reused buffer: updating a series that
/// exists allocates nothing (the bus updates several per transaction).
fn with_labels<R>(pairs: &[(&str, &str)], f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut s) => {
            s.clear();
            write_labels(&mut s, pairs);
            f(&s)
        }
        Err(_) => f(&labels(pairs)),
    })
}

fn update(
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    pairs: &[(&str, &str)],
    f: impl FnOnce(&mut f64),
) {
    let mut map = LABELED.lock().unwrap_or_else(|p| p.into_inner());
    let fam = map.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
    with_labels(pairs, |key| match fam.series.get_mut(key) {
        Some(v) => f(v),
        None => f(fam.series.entry(key.to_string()).or_insert(0.0)),
    });
}

/// Adds to a labelled counter.
pub fn count(name: &'static str, help: &'static str, pairs: &[(&str, &str)], n: u64) {
    update(name, help, "counter", pairs, |v| *v += n as f64);
}

/// Sets a labelled gauge.
pub fn gauge(name: &'static str, help: &'static str, pairs: &[(&str, &str)], value: f64) {
    update(name, help, "gauge", pairs, |v| *v = value);
}

/// Reads a labelled series (tests and `status`).
pub fn value(name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
    let map = LABELED.lock().unwrap_or_else(|p| p.into_inner());
    map.get(name)
        .and_then(|f| with_labels(pairs, |key| f.series.get(key).copied()))
}

/// The whole registry in Prometheus text format.
pub fn render() -> String {
    let mut out = String::new();
    for c in COUNTERS {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} counter\n{} {}",
            c.name,
            c.help,
            c.name,
            c.name,
            c.get()
        );
    }
    let map = LABELED.lock().unwrap_or_else(|p| p.into_inner());
    for (name, fam) in map.iter() {
        let _ = writeln!(
            out,
            "# HELP {name} {}\n# TYPE {name} {}",
            fam.help, fam.kind
        );
        for (l, v) in &fam.series {
            if l.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{l}}} {v}");
            }
        }
    }
    drop(map);
    let hist = HISTOGRAMS.lock().unwrap_or_else(|p| p.into_inner());
    for (name, h) in hist.iter() {
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", h.help);
        for (l, (buckets, count, sum)) in &h.series {
            let sep = if l.is_empty() { "" } else { "," };
            for (b, n) in BUCKETS.iter().zip(buckets) {
                let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"{b}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"+Inf\"}} {count}");
            let braces = if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            };
            let _ = writeln!(
                out,
                "{name}_sum{braces} {sum}\n{name}_count{braces} {count}"
            );
        }
    }
    out
}

/// Serves `GET /metrics` (any path) until shutdown.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await;
            let body = render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_are_escaped_and_found_again() {
        let pairs = [("device", "cab \"7\""), ("path", "c:\\x")];
        count("floorgate_test_total", "Test.", &pairs, 2);
        count("floorgate_test_total", "Test.", &pairs, 3);
        assert_eq!(value("floorgate_test_total", &pairs), Some(5.0));
        assert_eq!(value("floorgate_test_total", &[("device", "other")]), None);
        observe("floorgate_test_seconds", "Test.", &pairs, 0.2);
        observe("floorgate_test_seconds", "Test.", &pairs, 0.3);
        let text = render();
        assert!(
            text.contains(r#"floorgate_test_total{device="cab \"7\"",path="c:\\x"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"floorgate_test_seconds_count{device="cab \"7\"",path="c:\\x"} 2"#),
            "{text}"
        );
    }
}
