//! The `egress` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use egress::{
    commands::{self, exec::ExecArgs, run::RunArgs, Failure},
    output::LogFormat,
};
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Parser)]
#[command(name = "egress", version, about = "Per-cgroup egress filtering on eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground: enforce every policy of the file, stream flow events.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a policy file; print one line per policy.
    Check { file: PathBuf },
    /// Run a command in a fresh transient cgroup under one policy, with its flow events on stderr.
    Exec {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        policy: String,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run { log_format, .. } | Command::Exec { log_format, .. } => *log_format,
        Command::Check { .. } => LogFormat::Text,
    };
    init_logging(log_format);
    match dispatch(cli.command) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(failure) => {
            eprintln!("egress: {:#}", failure.error);
            ExitCode::from(u8::try_from(failure.status).unwrap_or(1))
        }
    }
}

fn dispatch(command: Command) -> Result<i32, Failure> {
    match command {
        Command::Check { file } => commands::check::check(&file).map(|()| 0),
        Command::Run { config, log_format } => {
            runtime()?.block_on(commands::run::run(RunArgs { config, log_format }))?;
            Ok(0)
        }
        Command::Exec { config, policy, log_format, command } => {
            runtime()?.block_on(commands::exec::exec(ExecArgs { config, policy, log_format, command }))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Daemon diagnostics go to stderr (flow events have their own stream).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
