//! The `cairn` command line, as a library so the binary stays one line.
//!
//! - [`args`]: the clap definitions of every command.
//! - [`commands`]: volume, status and member commands (thin calls to `cairn_client`).
//! - [`gateway`]: `cairn nbd serve` (its [`gateway::NbdGateway`] also runs inside a storage
//!   node: `cairn node run --nbd-listen`), `cairn vhost serve` and `cairn debug read-replica`,
//!   on `cairn_client`.
//! - [`up`]: `cairn up`, the local cluster supervisor, and `cluster.json`.
//! - [`mod@bench`]: `cairn bench VOLUME`, fio-like jobs through the client library.
//! - [`output`]: aligned tables and `--json`.
//!
//! Contract: every user error is one clear `error:` line on stderr and a non-zero exit; `--json`
//! prints machine-readable output on stdout.

pub mod args;
pub mod bench;
pub mod commands;
pub mod gateway;
pub mod output;
pub mod up;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, MetaCommand, NbdCommand, NodeCommand, VhostCommand};

/// Runs the CLI with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Long-running services log what they do (info); one-shot commands only problems.
    let daemon = matches!(
        cli.command,
        Command::Up(_)
            | Command::Meta {
                command: MetaCommand::Run(_)
            }
            | Command::Node { .. }
            | Command::Nbd { .. }
            | Command::Vhost { .. }
    );
    init_tracing(if daemon { "info" } else { "warn" });
    let threads = match &cli.command {
        Command::Node {
            command: NodeCommand::Run(a),
        } => Some(a.io.threads),
        Command::Nbd {
            command: NbdCommand::Serve(a),
        } => Some(a.io.threads),
        Command::Vhost {
            command: VhostCommand::Serve(a),
        } => Some(a.io.threads),
        _ => None,
    };
    // One I/O thread is the current-thread scheduler: no work-stealing bookkeeping, and a task
    // woken by another runs after the tasks already ready (the multi-thread scheduler's LIFO
    // slot would run it first, breaking up batches).
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a terminal only: logs in files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
