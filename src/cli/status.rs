//! `floorgate status`: ask the running daemon (control socket) what the floor is doing.

use super::Failure;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Configuration file (tells where the daemon's control socket is).
    #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn ago(now: u64, ms: Option<u64>) -> String {
    match ms {
        Some(t) if t > 0 => format!("{}s ago", now.saturating_sub(t) / 1000),
        _ => "never".into(),
    }
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    let cfg = crate::config::load(&a.config).map_err(Failure::config)?;
    let st = crate::control::request(&cfg.gateway.control_socket, &json!({"cmd": "status"}))
        .await
        .map_err(Failure::new)?;
    if a.json {
        println!("{st}");
        return Ok(());
    }
    let now = crate::event::now_ms();
    println!(
        "gateway {}  version {}  config {}  up {}s",
        st["gateway"].as_str().unwrap_or("?"),
        st["version"].as_str().unwrap_or("?"),
        st["config_version"],
        st["uptime_s"]
    );
    println!(
        "\nDEVICE           BUS        STATE    LAST POLL   POLLS    FAILS  LATENCY  LAST ERROR"
    );
    for (name, d) in st["devices"].as_object().into_iter().flatten() {
        println!(
            "{:<16} {:<10} {:<8} {:<11} {:<8} {:<6} {:>5.1}ms  {}",
            name,
            d["bus"].as_str().unwrap_or(""),
            if d["online"] == true {
                "online"
            } else {
                "offline"
            },
            ago(now, d["last_ok_ms"].as_u64()),
            d["polls"],
            d["failures"],
            d["latency_ms"].as_f64().unwrap_or(0.0),
            d["last_error"].as_str().unwrap_or("-")
        );
    }
    println!("\nBUS        UTIL   TRANSACTIONS  TIMEOUTS  CRC/INVALID  EXCEPTIONS");
    for (name, b) in st["buses"].as_object().into_iter().flatten() {
        println!(
            "{:<10} {:>4.1}%  {:<13} {:<9} {:<12} {}",
            name,
            b["utilisation"].as_f64().unwrap_or(0.0) * 100.0,
            b["transactions"],
            b["timeouts"],
            b["crc_or_invalid"],
            b["exceptions"]
        );
    }
    let s = &st["store"];
    println!(
        "\nstore   {} events ({} telemetry), {} bytes, oldest {}, next seq {}, dropped {}",
        s["events"],
        s["telemetry"],
        s["bytes"],
        s["oldest_age_ms"]
            .as_u64()
            .map_or("-".to_string(), |a| format!("{}s old", a / 1000)),
        s["next_seq"],
        s["dropped"]
    );
    if s["writable"] == false {
        println!(
            "        NOT WRITABLE since {}: {}; {} events held in memory, devices wait, {}",
            ago(now, s["unwritable_since_ms"].as_u64()),
            s["error"].as_str().unwrap_or("?"),
            s["held_events"],
            if s["needs_restart"] == true {
                "restarting once the state directory takes writes"
            } else {
                "retrying"
            }
        );
    }
    let u: &Value = &st["uplink"];
    println!(
        "uplink  {}, last PUBACK {}, draining {:.0} events/s{}",
        if u["configured"] != true {
            "not configured"
        } else if u["connected"] == true {
            "connected"
        } else {
            "DISCONNECTED"
        },
        ago(now, u["last_puback_ms"].as_u64()),
        u["drain_rate_events_per_s"].as_f64().unwrap_or(0.0),
        u["last_error"]
            .as_str()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    Ok(())
}
