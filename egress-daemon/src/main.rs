//! The `egress` command line.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::{path::PathBuf, process::ExitCode, sync::LazyLock};

use clap::{CommandFactory, Parser, Subcommand};
use egress::{
    client::{self, flows as flows_client, ControlError, LogsArgs},
    commands::{self, exec::ExecArgs},
    daemon::{self, RunArgs},
    format::LogFormat,
    kernel::OnExit,
    policy::ConfigError,
    service,
    settings::DEFAULT_CONTROL_SOCKET,
};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// `egress --version`: the release, the embedded programs' build and the oldest Linux they need.
static VERSION: LazyLock<String> = LazyLock::new(egress::version);

#[derive(Parser)]
#[command(name = "egress", version = VERSION.as_str(), about = "Per-cgroup egress filtering on eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`: how events (and, for `run`, diagnostics) are written.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Text => Self::Text,
            LogFormatArg::Json => Self::Json,
        }
    }
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
        #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
        log_format: LogFormatArg,
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
        #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
        log_format: LogFormatArg,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// What the running daemon enforces on which cgroup, with flow counts.
    Status {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Recent flow events from the running daemon; `-f` keeps following.
    Logs {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
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
        /// Flow records (packets and bytes per flow and interval) instead of flow events.
        #[arg(long, conflicts_with = "blocked")]
        flows: bool,
    },
    /// The top talkers by bytes per workload and destination, refreshed live.
    Top {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Over the last this long (`30s`, `5m`).
        #[arg(long, default_value = "60s", value_parser = client::parse_duration)]
        window: std::time::Duration,
        /// Print the table once and exit.
        #[arg(long)]
        once: bool,
        #[arg(long)]
        json: bool,
    },
    /// Which rule decides a flow under a policy, and why, read from the file (no daemon needed).
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        policy: String,
        /// Also explain the same-named policy of this candidate file.
        #[arg(long)]
        candidate: Option<PathBuf>,
        /// `HOST[:PORT][/PROTO]`: an address (`10.0.0.1:443`, `[::1]:53/udp`) or a domain name.
        target: String,
    },
    /// Ask the running daemon to reload its policy file.
    Reload {
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
}

/// What the Debian package's build asks of the binary (xtask/src/package.rs). Generated from
/// [`Cli`], the one definition of the command line, and kept out of it, so that no help text,
/// completion or man page offers them.
#[derive(Parser)]
#[command(name = "egress")]
enum Packaging {
    /// Write the completion script for SHELL to stdout.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages, egress(1) and one per command, into DIR.
    Manpages { dir: PathBuf },
}

impl Packaging {
    fn run(self) -> std::io::Result<()> {
        match self {
            Self::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "egress", &mut std::io::stdout());
                Ok(())
            }
            Self::Manpages { dir } => {
                std::fs::create_dir_all(&dir)?;
                // The pages' footer names the release alone; `--version` tells the rest.
                clap_mangen::generate_to(Cli::command().version(env!("CARGO_PKG_VERSION")), &dir)
            }
        }
    }
}

fn main() -> ExitCode {
    if let Ok(packaging) = Packaging::try_parse() {
        return match packaging.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("egress: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run { log_format, .. } | Command::Exec { log_format, .. } => (*log_format).into(),
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    match dispatch(cli.command) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(error) => {
            let status = exit_status(&error);
            if status == EXIT_REJECTED {
                // FILE:LINE:COL: message alone, for editors to follow.
                eprintln!("{error:#}");
            } else {
                eprintln!("egress: {error:#}");
            }
            ExitCode::from(status)
        }
    }
}

/// Exit statuses (README, "Commands"): 0 done, 1 any other failure.
/// The policy file was rejected (`check`, `run`, `exec`, `reload`).
const EXIT_REJECTED: u8 = 2;
/// The daemon could not be reached on its control socket (not running, wrong `--socket`).
const EXIT_UNREACHABLE: u8 = 3;
/// The control socket refused this user (root and `settings.control_group` only).
const EXIT_NOT_PERMITTED: u8 = 4;

fn exit_status(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<ConfigError>() {
            return EXIT_REJECTED;
        }
        match cause.downcast_ref::<ControlError>() {
            Some(ControlError::Daemon(_)) => return EXIT_REJECTED,
            Some(ControlError::Unreachable { .. }) => return EXIT_UNREACHABLE,
            Some(ControlError::NotPermitted { .. }) => return EXIT_NOT_PERMITTED,
            Some(ControlError::Protocol { .. }) | None => {}
        }
    }
    1
}

fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Check { file } => commands::check::check(&file).map(|()| 0),
        Command::Run { config, log_format, on_exit } => {
            runtime()?.block_on(daemon::run(RunArgs {
                config,
                log_format: log_format.into(),
                on_exit: on_exit.into(),
            }))?;
            Ok(0)
        }
        Command::Exec { config, policy, log_format, command } => runtime()?.block_on(commands::exec::exec(ExecArgs {
            config,
            policy,
            log_format: log_format.into(),
            command,
        })),
        Command::Status { socket, json } => {
            runtime()?.block_on(client::status(&socket, json))?;
            Ok(0)
        }
        Command::Logs { socket, follow, blocked, policy, since, json, flows } => {
            let args = LogsArgs { follow, blocked_only: blocked, policy, since };
            if flows {
                runtime()?.block_on(flows_client::flow_logs(&socket, args, json, &mut std::io::stdout()))?;
            } else {
                runtime()?.block_on(client::logs(&socket, args, json))?;
            }
            Ok(0)
        }
        Command::Top { socket, window, once, json } => {
            runtime()?.block_on(flows_client::top(&socket, window, once, json))?;
            Ok(0)
        }
        Command::Explain { config, policy, candidate, target } => {
            commands::explain::run(commands::explain::ExplainArgs { config, policy, candidate, target })
        }
        Command::Reload { socket } => {
            runtime()?.block_on(client::reload(&socket))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        Packaging::command().debug_assert();
    }

    #[test]
    fn completions_offer_the_commands_and_not_the_packaging_ones() {
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "egress", &mut out);
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("reload"), "{script}");
        assert!(!script.contains("manpages") && !script.contains("completions"), "{script}");
    }

    #[test]
    fn the_version_names_the_programs_and_the_oldest_linux() {
        let version = egress::version();
        assert!(version.starts_with(env!("CARGO_PKG_VERSION")), "{version}");
        assert!(version.contains("kernel programs ") && version.contains("Linux 5.8 or later"), "{version}");
    }
}
