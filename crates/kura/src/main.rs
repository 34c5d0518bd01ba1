//! The `kura` binary: parses the command line, runs one command, prints one line per error and
//! exits with a code restic users know (0 ok, 1 fatal, 3 partial, 10 no repository, 12 wrong
//! password, 11 another prune is running, 130 interrupted) and kura's own (2 refused topology,
//! 4 a copy is late, 5 a copy is critical or a drill failed, 13 refused by the server: token or
//! role, 14 server unreachable, 15 fenced shadow). `kura pg wal-fetch` exits 1 for a file not
//! in the archive and 128 + the code for a failure, so PostgreSQL stops its recovery on one.

/// `println!` for results, through [`output::line`]: a reader that stops early (`kura
/// snapshots | head`) neither panics kura nor cuts its work short.
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::output::line(format_args!($($t)*))
    };
}

mod args;
mod cmd;
mod open;
mod output;
mod policy;

use args::{Cli, Command};
use clap::Parser;
use kura_ops::OpsError;
use kura_repo::RepoError;
use kura_store::StoreError;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// How a command ended when it did not fail.
pub enum Outcome {
    /// Everything done.
    Ok,
    /// Snapshot saved but some source files were unreadable.
    Partial,
    /// What was asked for does not exist, which the caller expects to happen (`kura pg
    /// wal-fetch` past the end of the archive).
    Missing,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        let repo = cause.downcast_ref::<RepoError>().or_else(|| match cause.downcast_ref::<OpsError>() {
            Some(OpsError::Repo(r)) => Some(r),
            _ => None,
        });
        match repo {
            Some(RepoError::NotFound(_)) => return 10,
            Some(RepoError::WrongPassword { .. }) => return 12,
            _ => {}
        }
        let store = cause.downcast_ref::<StoreError>().or(match repo {
            Some(RepoError::Store(s)) => Some(s),
            _ => None,
        });
        match store {
            Some(StoreError::Denied { .. }) => return 13,
            Some(StoreError::Network { .. }) => return 14,
            _ => {}
        }
        match cause.downcast_ref::<kura_shadow::ShadowError>() {
            Some(kura_shadow::ShadowError::Remote(_)) => return 14,
            Some(kura_shadow::ShadowError::Fenced(_)) => return 15,
            Some(kura_shadow::ShadowError::Denied(_)) => return 13,
            _ => {}
        }
        if cause.downcast_ref::<cmd::plan::Refused>().is_some() {
            return 2;
        }
        if let Some(a) = cause.downcast_ref::<cmd::status::Attention>() {
            return a.code();
        }
        match cause.downcast_ref::<OpsError>() {
            Some(OpsError::Interrupted) => return 130,
            Some(OpsError::Busy(_)) => return 11,
            _ => {}
        }
    }
    if INTERRUPTED.load(Ordering::Relaxed) { 130 } else { 1 }
}

fn run(cli: &Cli) -> anyhow::Result<Outcome> {
    match &cli.command {
        Command::Init => cmd::backup::init(cli),
        Command::Backup(a) => cmd::backup::run(cli, a, &INTERRUPTED),
        Command::Snapshots(f) => cmd::info::snapshots(cli, f),
        Command::Ls { snapshot, path } => cmd::info::ls(cli, snapshot, path.as_deref()),
        Command::Restore(a) => cmd::restore::run(cli, a, &INTERRUPTED),
        Command::Diff { a, b } => cmd::info::diff(cli, a, b),
        Command::Check(a) => cmd::backup::run_check(cli, a),
        Command::Cat { kind, id } => cmd::info::cat(cli, kind, id.as_deref()),
        Command::Key(k) => cmd::key::run(cli, k),
        Command::Forget(a) => cmd::retain::forget(cli, a),
        Command::Prune(a) => cmd::retain::prune(cli, a),
        Command::Copy(a) => cmd::copy::run(cli, a),
        Command::Pull(a) => cmd::copy::pull(cli, a),
        Command::Drill(a) => cmd::status::drill(cli, a),
        Command::Status(a) => cmd::status::status(cli, a),
        Command::Report(a) => cmd::status::report(cli, a),
        Command::Protect { snapshot, reason } => cmd::retain::protect(cli, snapshot, Some(reason)),
        Command::Unprotect { snapshot } => cmd::retain::protect(cli, snapshot, None),
        Command::Repair(r) => cmd::repair::run(cli, r),
        Command::Serve(a) => cmd::serve::run(cli, a),
        Command::Undelete { snapshots } => cmd::retain::undelete(cli, snapshots),
        Command::Shadow(c) => cmd::shadow::run(cli, c),
        Command::Plan { topology, server_config } => cmd::plan::run(cli, topology, server_config.as_deref()),
        Command::Pg(c) => cmd::pg::run(cli, c, &INTERRUPTED),
        Command::Promote { to } => cmd::shadow::run(cli, &args::ShadowCommand::Promote { to: to.clone() }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // First Ctrl-C: stop cleanly at the next chunk; second: leave at once.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
    });
    match run(&cli) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Partial) => ExitCode::from(3),
        Ok(Outcome::Missing) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kura: {}", format!("{e:#}").replace('\n', " "));
            let code = exit_code(&e);
            // PostgreSQL takes any restore_command exit below 126 for "no such file" and ends
            // recovery there, promoting at a point the user did not ask for; above 125 it stops
            // instead. So a wal-fetch that failed (not one that found nothing) exits 128 + code.
            if matches!(cli.command, Command::Pg(args::PgCommand::WalFetch { .. })) && code <= 125 {
                ExitCode::from(128 + code)
            } else {
                ExitCode::from(code)
            }
        }
    }
}
