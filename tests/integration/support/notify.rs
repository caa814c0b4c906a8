//! A systemd-like notify socket: what `floorgate run` tells systemd (`READY=1`, `STATUS=...`,
//! `WATCHDOG=1`), collected with the time each message arrived.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
    seen: Mutex<Vec<(Instant, String)>>,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_nonblocking(true).expect("nonblocking");
        NotifySocket {
            _dir: dir,
            path,
            sock,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// `NOTIFY_SOCKET` for the daemon's environment.
    pub fn env(&self) -> (String, std::ffi::OsString) {
        ("NOTIFY_SOCKET".into(), self.path.clone().into_os_string())
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<(Instant, String)> {
        let mut seen = self.seen.lock().unwrap();
        let mut buf = [0u8; 1024];
        while let Ok(n) = self.sock.recv(&mut buf) {
            seen.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).to_string(),
            ));
        }
        seen.clone()
    }

    /// Waits (at most `within`) for a message that `matches`; returns it.
    pub async fn wait_for(
        &self,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((_, m)) = self.messages().into_iter().find(|(_, m)| matches(m)) {
                return Some(m);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
