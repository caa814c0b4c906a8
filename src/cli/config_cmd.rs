//! `floorgate config validate`: check a configuration file without running it.

use super::Failure;
use std::path::PathBuf;

/// `config` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Check a configuration file; prints every problem as file:line:col and exits 78 on any.
    Validate {
        /// Configuration file.
        #[arg(env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
        path: PathBuf,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(c: Command) -> Result<(), Failure> {
    match c {
        Command::Validate { path, json } => match crate::config::load(&path) {
            Ok(cfg) => {
                let points: usize = cfg.profiles.values().map(|p| p.points.len()).sum();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": true, "gateway": cfg.gateway.id, "buses": cfg.buses.len(),
                            "devices": cfg.devices.len(), "profiles": cfg.profiles.len(), "points": points})
                    );
                } else {
                    println!(
                        "{}: ok (gateway {}, {} buses, {} devices, {} profiles, {} points)",
                        path.display(),
                        cfg.gateway.id,
                        cfg.buses.len(),
                        cfg.devices.len(),
                        cfg.profiles.len(),
                        points
                    );
                }
                Ok(())
            }
            Err(errors) => {
                if json {
                    let list: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                    println!("{}", serde_json::json!({"ok": false, "errors": list}));
                }
                Err(Failure::config(errors))
            }
        },
    }
}
