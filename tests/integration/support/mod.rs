//! Test support: a real mosquitto with generated certificates, the daemon as a child process,
//! a cuttable TCP proxy, a tmpfs that can be filled and a systemd-like notify socket.
#![allow(dead_code)]

pub mod broker;
pub mod ext4;
pub mod gateway;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod tmpfs;

use std::time::{Duration, Instant};

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
