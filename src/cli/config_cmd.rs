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
    /// Remotely applied configuration versions and their outcomes.
    History {
        /// Configuration file (locates the state directory).
        #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Go back to a stored version (default: the previously applied one, else the local file).
    Rollback {
        /// Version to use; `local` for the local file.
        version: Option<String>,
        /// Configuration file (locates the state directory).
        #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

pub(super) async fn run(c: Command) -> Result<(), Failure> {
    match c {
        Command::History { config, json } => {
            let cfg = crate::config::load(&config).map_err(Failure::config)?;
            let h = crate::remote::History::new(&cfg.gateway.state_dir);
            let entries = h.entries();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"current": h.current(), "highest": h.highest(), "history": entries})
                );
            } else {
                println!(
                    "in use: {}",
                    h.current()
                        .map_or("local file".to_string(), |v| format!("version {v}"))
                );
                println!("VERSION  STATUS        WHEN (unix ms)  ERROR");
                for e in entries {
                    println!(
                        "{:<8} {:<13} {:<15} {}",
                        e.version,
                        e.status,
                        e.ts,
                        e.error.unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::Rollback { version, config } => {
            let cfg = crate::config::load(&config).map_err(Failure::config)?;
            let h = crate::remote::History::new(&cfg.gateway.state_dir);
            let from = h.current();
            let target = match version.as_deref() {
                Some("local") => None,
                Some(v) => {
                    let v: u64 = v.parse().map_err(|_| {
                        Failure::new(format!("{v:?} is not a version (or `local`)"))
                    })?;
                    let text = h
                        .text(v)
                        .map_err(|e| Failure::new(format!("version {v} is not stored: {e}")))?;
                    crate::config::parse_str(&text, &config).map_err(|e| {
                        Failure::config(format!("version {v} does not load here: {e}"))
                    })?;
                    Some(v)
                }
                None => from.and_then(|f| h.previous_applied(f)),
            };
            h.set_current(target).map_err(Failure::new)?;
            // Chosen by hand: a restart keeps it, also during a pushed version's health gate.
            h.end_trial().map_err(Failure::new)?;
            if let Some(f) = from {
                h.record(f, "rolled_back", Some("rolled back by hand"))
                    .map_err(Failure::new)?;
            }
            let shown = target.map_or("the local file".to_string(), |v| format!("version {v}"));
            match crate::control::request(
                &cfg.gateway.control_socket,
                &serde_json::json!({"cmd": "reload"}),
            )
            .await
            {
                Ok(_) => println!("now using {shown}; the daemon is reloading"),
                Err(_) => println!(
                    "now using {shown}; the daemon is not running and will use it at start"
                ),
            }
            Ok(())
        }
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
