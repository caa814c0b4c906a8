//! `floorgate run`: the daemon.

use super::Failure;
use crate::daemon::{self, DaemonError, RunOptions};
use std::path::PathBuf;

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Configuration file.
    #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub(super) config: PathBuf,
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    daemon::run(RunOptions { config: a.config })
        .await
        .map_err(|e| match e {
            DaemonError::Config(c) => Failure::config(c),
            DaemonError::Uplink(u) => Failure::config(format!("uplink: {u}")),
            other => Failure::new(other),
        })
}
