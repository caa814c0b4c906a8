//! The command line: one file per subcommand; errors become one-line causes and exit codes.

mod buffer;
mod check;
mod completions;
mod config_cmd;
mod demo;
mod fleet;
mod run;
mod rw;
mod scan;
mod setup;
mod simulate;
mod status;

use clap::{Parser, Subcommand};

/// Exit code for invalid configuration (EX_CONFIG): systemd does not restart-loop on it.
pub const EX_CONFIG: i32 = 78;

/// floorgate: edge gateway for hospital floor machines (Modbus RTU/TCP → durable store → TLS MQTT).
#[derive(Debug, Parser)]
#[command(name = "floorgate", version, about)]
pub struct Cli {
    /// Log format: human, json, or journal (default: journal under systemd, else human).
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Run(run::Args),
    /// Zero-setup showcase: simulated floor, embedded broker, the real pipeline, live view.
    Demo(demo::Args),
    /// Run simulated devices on Modbus TCP or a serial port / pseudo-terminal.
    Simulate(simulate::Args),
    /// Field installer wizard: ports, scan, profiles, uplink, config, service (or all by flags).
    Setup(setup::Args),
    /// Validate the configuration and the environment (ports, certificates, keys, broker, disk, clock).
    Check(check::Args),
    /// Ask the running daemon for devices, buses, buffer, uplink and config version.
    Status(status::Args),
    /// Inspect, export or purge the offline buffer.
    #[command(subcommand)]
    Buffer(buffer::Command),
    /// Configuration files: validate.
    #[command(subcommand)]
    Config(config_cmd::Command),
    /// Find devices on a bus (unit ids x baud rates x parities) and guess their profiles.
    Scan(scan::Args),
    /// Read registers or coils of a device, raw or by the named point of a configured device.
    Read(rw::ReadArgs),
    /// Write a holding register or coil, raw or a writable point of a configured device.
    Write(rw::WriteArgs),
    /// Cloud side of signed remote configuration: make the signing key, push a config to a
    /// gateway or a group (canary first) and report each gateway's outcome.
    #[command(subcommand)]
    Fleet(fleet::Command),
    /// Print the shell completion script (bash, zsh or fish).
    #[command(hide = true)]
    Completions(completions::CompletionsArgs),
    /// Print the manual page (roff).
    #[command(hide = true)]
    Man,
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// One-line cause (may hold several lines for configuration errors).
    pub message: String,
}

impl Failure {
    /// A generic failure (exit 1).
    pub fn new(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
    /// A configuration failure (exit 78).
    pub fn config(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: EX_CONFIG,
            message: message.to_string(),
        }
    }
}

fn init_logging(format: Option<&str>, default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, warning) = log_filter(std::env::var("FLOORGATE_LOG").ok(), default_level);
    if let Some(warning) = warning {
        eprintln!("floorgate: {warning}");
    }
    let format = format.map(str::to_string).unwrap_or_else(|| {
        if std::env::var_os("JOURNAL_STREAM").is_some() {
            "journal".into()
        } else {
            "human".into()
        }
    });
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let _ = match format.as_str() {
        "json" => builder.json().finish().with(filter).try_init(),
        // journald stamps time and host itself.
        "journal" => builder
            .without_time()
            .with_ansi(false)
            .finish()
            .with(filter)
            .try_init(),
        _ => builder.finish().with(filter).try_init(),
    };
}

/// The log filter: `FLOORGATE_LOG` (`target=level` directives and a default level, separated by
/// commas, e.g. `floorgate=debug,info`) when set and valid, else `default_level`; a value that
/// does not parse is named in the warning returned.
fn log_filter(
    var: Option<String>,
    default_level: &str,
) -> (tracing_subscriber::filter::Targets, Option<String>) {
    use tracing_subscriber::filter::Targets;
    let default = || default_level.parse::<Targets>().unwrap_or_default();
    match var.as_deref().map(str::trim) {
        None | Some("") => (default(), None),
        Some(value) => match value.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(e) => (
                default(),
                Some(format!(
                    "FLOORGATE_LOG={value:?} is not a log filter ({e}); logging at {default_level}"
                )),
            ),
        },
    }
}

/// Parses arguments, runs the command, returns the exit code.
pub fn main() -> i32 {
    crate::memory::tune_allocator();
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Demo(_));
    init_logging(
        cli.log_format.as_deref(),
        if quiet { "error" } else { "info" },
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floorgate: cannot start runtime: {e}");
            return 1;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run(a) => run::run(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Simulate(a) => simulate::run(a).await,
            Command::Config(c) => config_cmd::run(c).await,
            Command::Status(a) => status::run(a).await,
            Command::Check(a) => check::run(a).await,
            Command::Setup(a) => setup::run(a).await,
            Command::Buffer(c) => buffer::run(c).await,
            Command::Scan(a) => scan::run(a).await,
            Command::Read(a) => rw::read(a).await,
            Command::Write(a) => rw::write(a).await,
            Command::Fleet(c) => fleet::run(c).await,
            Command::Completions(a) => completions::completions(a),
            Command::Man => completions::man(),
        }
    });
    match result {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("floorgate: {}", f.message);
            f.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn the_log_filter_takes_directives_and_a_default_level() {
        let (f, warning) = log_filter(Some("floorgate=debug,info".into()), "error");
        assert_eq!(warning, None);
        assert!(f.would_enable("floorgate::uplink", &Level::DEBUG));
        assert!(f.would_enable("sled", &Level::INFO));
        assert!(!f.would_enable("sled", &Level::DEBUG));
        // Without a default level only the targets named log.
        let (f, _) = log_filter(Some("floorgate=debug".into()), "info");
        assert!(!f.would_enable("rumqttc", &Level::ERROR));
        let (f, warning) = log_filter(None, "info");
        assert_eq!(warning, None);
        assert!(f.would_enable("floorgate", &Level::INFO));
        assert!(!f.would_enable("floorgate", &Level::DEBUG));
    }

    #[test]
    fn a_log_filter_that_does_not_parse_is_named_and_the_default_used() {
        let (f, warning) = log_filter(Some("floorgate=loud".into()), "warn");
        let warning = warning.expect("a warning");
        assert!(
            warning.contains("FLOORGATE_LOG=\"floorgate=loud\""),
            "{warning}"
        );
        assert!(warning.contains("logging at warn"), "{warning}");
        assert!(f.would_enable("floorgate", &Level::WARN));
        assert!(!f.would_enable("floorgate", &Level::INFO));
    }
}
