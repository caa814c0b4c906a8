//! `floorgate buffer stats|export|purge`: inspect or empty the offline buffer. Goes through the
//! running daemon's control socket, or opens the store directly when the daemon is stopped.

use super::Failure;
use crate::store::Store;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// `buffer` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Events, bytes and age of the oldest buffered event.
    Stats {
        #[command(flatten)]
        common: Common,
    },
    /// Every buffered event as JSON lines (stdout, or --output FILE).
    Export {
        #[command(flatten)]
        common: Common,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Delete every buffered event; a `gap` event tells the cloud what was removed.
    Purge {
        #[command(flatten)]
        common: Common,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Options shared by the buffer commands.
#[derive(Debug, clap::Args)]
pub(super) struct Common {
    /// Configuration file.
    #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Asks the daemon; when it is not running, runs `local` on the store opened directly.
async fn ask(
    common: &Common,
    req: Value,
    local: impl FnOnce(&Store) -> Result<Value, String>,
) -> Result<Value, Failure> {
    let cfg = crate::config::load(&common.config).map_err(Failure::config)?;
    match crate::control::request(&cfg.gateway.control_socket, &req).await {
        Ok(v) => match v.get("error").and_then(Value::as_str) {
            Some(e) => Err(Failure::new(e)),
            None => Ok(v),
        },
        Err(crate::control::ControlError::Connect { .. }) => {
            let store = Store::open(
                &cfg.gateway.state_dir,
                cfg.store.cache_bytes,
                cfg.store.max_bytes,
            )
            .map_err(|e| {
                Failure::new(format!(
                    "the daemon is not reachable and the store cannot be opened: {e}"
                ))
            })?;
            local(&store).map_err(Failure::new)
        }
        Err(e) => Err(Failure::new(e)),
    }
}

pub(super) async fn run(c: Command) -> Result<(), Failure> {
    match c {
        Command::Stats { common } => {
            let v = ask(&common, json!({"cmd": "buffer_stats"}), |s| {
                Ok(crate::control::buffer_stats(s))
            })
            .await?;
            if common.json {
                println!("{v}");
            } else {
                println!(
                    "{} events ({} telemetry), {} bytes, oldest seq {}, oldest {}, next seq {}",
                    v["events"],
                    v["telemetry"],
                    v["bytes"],
                    v["oldest_seq"],
                    v["oldest_age_ms"]
                        .as_u64()
                        .map_or("-".to_string(), |a| format!("{}s old", a / 1000)),
                    v["next_seq"]
                );
            }
        }
        Command::Export { common, output } => {
            let v = ask(&common, json!({"cmd": "buffer_export"}), |s| {
                let events = s.read_from(0, usize::MAX).map_err(|e| e.to_string())?;
                let list: Vec<Value> = events
                    .iter()
                    .filter_map(|e| serde_json::from_slice(e.json()).ok())
                    .collect();
                Ok(json!({ "events": list }))
            })
            .await?;
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .map_err(|e| Failure::new(format!("{}: {e}", p.display())))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let events = v["events"].as_array().cloned().unwrap_or_default();
            for e in &events {
                writeln!(out, "{e}").map_err(Failure::new)?;
            }
            if output.is_some() {
                eprintln!("exported {} events", events.len());
            }
        }
        Command::Purge { common, yes } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return Err(Failure::new(
                        "purge deletes every buffered event: confirm on a terminal or pass --yes",
                    ));
                }
                eprint!("delete every buffered event? the cloud gets a gap event [y/N] ");
                let mut answer = String::new();
                std::io::stdin()
                    .read_line(&mut answer)
                    .map_err(Failure::new)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return Err(Failure::new("not purged"));
                }
            }
            let v = ask(&common, json!({"cmd": "buffer_purge"}), |s| {
                crate::control::purge(s).map_err(|e| e.to_string())
            })
            .await?;
            if common.json {
                println!("{v}");
            } else {
                println!("purged {} events", v["purged"]);
            }
        }
    }
    Ok(())
}
