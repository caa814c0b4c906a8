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

/// A floor without behaviour models: registers only change when the test changes them.
pub fn still_floor(n_bag: usize, n_cab: usize) -> floorgate::sim::SimFloor {
    let mut f = floorgate::sim::SimFloor::new(n_bag, n_cab);
    f.models = false;
    f
}

/// Still bag dispensers and cabinets on Modbus TCP (their values change only when a test sets
/// them) and a TLS mosquitto with its generated PKI, what most gateway tests start from:
/// `(stop, tcp, devices, pki, broker)`. The simulators run until `stop`; `pki` owns the
/// certificate files.
pub async fn tls_floor(
    bags: usize,
    cabinets: usize,
) -> (
    tokio_util::sync::CancellationToken,
    std::net::SocketAddr,
    Vec<floorgate::sim::Device>,
    broker::Pki,
    broker::Broker,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let (tcp, devs) = still_floor(bags, cabinets)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .expect("simulated floor");
    let pki = broker::Pki::generate();
    let broker = broker::Broker::start_tls(&pki);
    (stop, tcp, devs, pki, broker)
}
