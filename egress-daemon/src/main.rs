//! The `egress` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use egress::{
    commands::{self, exec::ExecArgs, Failure, EXIT_INVALID_CONFIG},
    control::client::{self, LogsArgs},
    daemon::{self, RunArgs},
    kernel::OnExit,
    output::LogFormat,
    service,
};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

const DEFAULT_SOCKET: &str = "/run/egress/control.sock";

#[derive(Parser)]
#[command(name = "egress", version, about = "Per-cgroup egress filtering on eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--on-exit`: what a clean stop leaves behind.
#[derive(Clone, Copy, clap::ValueEnum)]
enum OnExitArg {
    /// Enforcement stays in place (programs, links and maps stay pinned).
    Keep,
    /// Enforcement is removed with the daemon.
    Detach,
}

impl From<OnExitArg> for OnExit {
    fn from(arg: OnExitArg) -> Self {
        match arg {
            OnExitArg::Keep => Self::Keep,
            OnExitArg::Detach => Self::Detach,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground: enforce every policy of the file, stream flow events.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// What a clean stop leaves behind: `keep` enforcement in place, or `detach` it.
        #[arg(long, value_enum, default_value_t = OnExitArg::Keep)]
        on_exit: OnExitArg,
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
    /// What the running daemon enforces on which cgroup, with flow counts.
    Status {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Recent flow events from the running daemon; `-f` keeps following.
    Logs {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(short, long)]
        follow: bool,
        /// Only blocked flows.
        #[arg(long)]
        blocked: bool,
        #[arg(long)]
        policy: Option<String>,
        /// Only events newer than this (`30s`, `5m`, `2h`, `1d`).
        #[arg(long, value_parser = client::parse_duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to reload its policy file.
    Reload {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run { log_format, .. } | Command::Exec { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    match dispatch(cli.command) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        // A bad policy file is reported as FILE:LINE:COL: message alone, for editors to follow.
        Err(failure) if failure.status == EXIT_INVALID_CONFIG => {
            eprintln!("{:#}", failure.error);
            ExitCode::from(2)
        }
        Err(failure) => {
            eprintln!("egress: {:#}", failure.error);
            ExitCode::from(u8::try_from(failure.status).unwrap_or(1))
        }
    }
}

fn dispatch(command: Command) -> Result<i32, Failure> {
    match command {
        Command::Check { file } => commands::check::check(&file).map(|()| 0),
        Command::Run { config, log_format, on_exit } => {
            runtime()?.block_on(daemon::run(RunArgs { config, log_format, on_exit: on_exit.into() }))?;
            Ok(0)
        }
        Command::Exec { config, policy, log_format, command } => {
            runtime()?.block_on(commands::exec::exec(ExecArgs { config, policy, log_format, command }))
        }
        Command::Status { socket, json } => {
            runtime()?.block_on(client::status(&socket, json))?;
            Ok(0)
        }
        Command::Logs { socket, follow, blocked, policy, since, json } => {
            let args = LogsArgs { follow, blocked_only: blocked, policy, since };
            runtime()?.block_on(client::logs(&socket, args, json))?;
            Ok(0)
        }
        Command::Reload { socket } => {
            runtime()?
                .block_on(client::reload(&socket))
                .map_err(|error| Failure { status: EXIT_INVALID_CONFIG, error })?;
            Ok(0)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Daemon diagnostics go to stderr (flow events have their own stream); under systemd they go
/// to the journal with their level as priority.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if service::under_journal() {
        if let Ok(journal) = tracing_journald::layer() {
            tracing_subscriber::registry().with(filter).with(journal).init();
            return;
        }
    }
    use std::io::IsTerminal;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
