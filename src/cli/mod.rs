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
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("FLOORGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let format = format.map(str::to_string).unwrap_or_else(|| {
        if std::env::var_os("JOURNAL_STREAM").is_some() {
            "journal".into()
        } else {
            "human".into()
        }
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format.as_str() {
        "json" => builder.json().try_init(),
        // journald stamps time and host itself.
        "journal" => builder.without_time().with_ansi(false).try_init(),
        _ => builder.try_init(),
    };
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
