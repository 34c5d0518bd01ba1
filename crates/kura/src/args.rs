//! Command-line arguments (clap), shaped like restic's so its users feel at home.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// kura: deduplicated, encrypted, crash-safe backups.
#[derive(Parser, Debug)]
#[command(name = "kura", version, about, max_term_width = 100)]
pub struct Cli {
    /// Repository: a local path, or a kura server's `kura://HOST:PORT/REPO`. Default: a
    /// repository under your data directory, created on first backup.
    #[arg(short = 'r', long = "repo", env = "KURA_REPOSITORY", global = true)]
    pub repo: Option<String>,
    /// For a kura server: read the access token from this file (else KURA_TOKEN).
    #[arg(long, env = "KURA_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// For a kura server: accept exactly the certificate with this SHA-256 fingerprint (as
    /// `kura serve` prints it); else the system's CAs decide.
    #[arg(long, env = "KURA_FINGERPRINT", global = true)]
    pub fingerprint: Option<String>,
    /// Read the repository password from this file (else KURA_PASSWORD, else a prompt).
    #[arg(long, env = "KURA_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new repository.
    Init,
    /// Back up files and directories (or standard input).
    Backup(BackupArgs),
    /// List snapshots.
    Snapshots(FilterArgs),
    /// List the files in a snapshot.
    Ls {
        /// Snapshot id (prefix) or "latest".
        snapshot: String,
        /// Only entries at and below this path.
        path: Option<String>,
    },
    /// Restore a snapshot into a directory.
    Restore(RestoreArgs),
    /// Show what changed between two snapshots.
    Diff {
        /// First snapshot.
        a: String,
        /// Second snapshot.
        b: String,
    },
    /// Check the repository's structure and, with --read-data, every byte.
    Check(CheckArgs),
    /// Print a repository object, for debugging.
    Cat {
        /// config, key, snapshot, index, pack, tree or blob.
        kind: String,
        /// Object id (not needed for config).
        id: Option<String>,
    },
    /// Manage the passphrase keys of the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Remove snapshots a retention policy does not keep (shows every decision and its rule).
    Forget(Box<ForgetArgs>),
    /// Delete data no snapshot uses; safe while backups run.
    Prune(PruneArgs),
    /// Copy snapshots from another repository into this one (another key, machine or bucket).
    Copy(CopyArgs),
    /// Pull snapshots into a replica of their repository, without the key: every object is
    /// checked against its name; what a generation server does with a read token.
    Pull(PullArgs),
    /// Restore drill: restore a random sample of files (or a whole snapshot) into a scratch
    /// directory, check them against the ids recorded at backup time, and record the result
    /// and its duration in the repository.
    Drill(DrillArgs),
    /// Is every copy fresh, verified and restorable? Per group (or per dataset and generation
    /// of a topology): the newest snapshot's age, the last verification and the last drill.
    /// Exits 4 when something is late, 5 when something is critical or failing.
    Status(StatusArgs),
    /// A report of facts for customers and auditors: what is protected, copies and machines,
    /// the newest copy of each generation, last verified, last restored, measured RPO/RTO.
    Report(ReportArgs),
    /// Protect a snapshot: forget never removes it.
    Protect {
        /// Snapshot id (prefix) or "latest".
        snapshot: String,
        /// Why (recorded beside the mark).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a snapshot's protection.
    Unprotect {
        /// Snapshot id (prefix).
        snapshot: String,
    },
    /// Repair a damaged repository.
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Bring back snapshots deleted on a kura server within its undelete window; without ids,
    /// list what can be brought back.
    Undelete {
        /// Snapshot ids (or unique prefixes) to bring back.
        snapshots: Vec<String>,
    },
    /// Run a kura server hosting repositories for other machines (see `kura serve token`).
    Serve(ServeArgs),
    /// Real-time shadowing of a directory to a standby (a kura server with a `[[stream]]`).
    #[command(subcommand)]
    Shadow(ShadowCommand),
    /// Check a topology file (hosts, datasets, their shadow and generations) and print which
    /// copies will exist on which machine and for how long.
    Plan {
        /// The topology file (TOML; see docs/TOPOLOGY.md and examples/first-server.toml).
        topology: PathBuf,
        /// Print the `kura serve` configuration of this host instead: a repository with its
        /// pull, retention, verification and prune for each generation it keeps.
        #[arg(long, value_name = "HOST")]
        server_config: Option<String>,
    },
    /// PostgreSQL: WAL archiving (`archive_command`/`restore_command`), base backups and
    /// point-in-time restores, all as snapshots in the repository.
    #[command(subcommand)]
    Pg(PgCommand),
    /// Make a standby the primary after a failover (the same as `kura shadow promote`).
    Promote {
        /// The standby's stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
    },
}

/// Which PostgreSQL cluster (names its snapshots' tags and group).
#[derive(Args, Debug, Clone)]
pub struct PgCluster {
    /// Cluster name: WAL files and base backups of one cluster share it.
    #[arg(long, default_value = "main")]
    pub cluster: String,
    /// Host the snapshots are recorded under (default: this machine's name; for wal-fetch and
    /// restore: any host).
    #[arg(long)]
    pub host: Option<String>,
}

/// `kura pg` subcommands.
#[derive(Subcommand, Debug)]
pub enum PgCommand {
    /// Archive one WAL file: `archive_command = 'kura pg wal-push %p'`. The same file again is
    /// success; other bytes under an archived name are refused.
    WalPush {
        /// The file (PostgreSQL's %p).
        path: PathBuf,
        #[command(flatten)]
        cluster: PgCluster,
    },
    /// Fetch one archived WAL file: `restore_command = 'kura pg wal-fetch %f %p'`. Exits 1 when
    /// it was never archived (the end of the archive).
    WalFetch {
        /// The file's name (PostgreSQL's %f).
        name: String,
        /// Where to write it (PostgreSQL's %p).
        dest: PathBuf,
        #[command(flatten)]
        cluster: PgCluster,
    },
    /// Take a base backup with pg_basebackup into the repository. Connection options go after
    /// `--` (e.g. `-- -h /run/postgresql -U postgres`), or in PGHOST, PGPORT, PGUSER.
    Backup {
        #[command(flatten)]
        cluster: PgCluster,
        /// Where pg_basebackup writes before kura reads it (removed afterwards; default:
        /// pg-CLUSTER-base under kura's directory in your cache directory, ~/.cache/kura).
        #[arg(long)]
        staging: Option<PathBuf>,
        /// The pg_basebackup program (default: from PATH, else Debian's newest).
        #[arg(long)]
        pg_basebackup: Option<PathBuf>,
        /// Arguments for pg_basebackup.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Prepare a point-in-time restore: the newest base backup before --at into an empty data
    /// directory, set up to replay the archive to --at and then promote. Start PostgreSQL on it.
    Restore {
        #[command(flatten)]
        cluster: PgCluster,
        /// The new data directory (absent or empty).
        #[arg(long)]
        target: PathBuf,
        /// Recover to this moment (RFC 3339 or "YYYY-MM-DD HH:MM[:SS]" local); default: to the
        /// end of the archive.
        #[arg(long)]
        at: Option<String>,
        /// Turn archiving off in the restored copy (a trial restore: its new timeline must not
        /// go into the repository, where a later restore would follow it).
        #[arg(long)]
        no_archive: bool,
    },
}

/// `kura shadow` subcommands.
#[derive(Subcommand, Debug)]
pub enum ShadowCommand {
    /// On the primary: send every change of a directory to the standby as it happens.
    Push {
        /// The settings in a TOML file (keys source, to, token_file, fingerprint,
        /// rescan_every); flags given too take precedence.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The directory to shadow.
        #[arg(long, required_unless_present_any = ["config", "sqlite"], conflicts_with = "sqlite")]
        source: Option<PathBuf>,
        /// Or a live SQLite database in WAL mode, written by any program: every commit is sent
        /// as it happens, and the standby keeps a copy readers can open at any moment.
        #[arg(long)]
        sqlite: Option<PathBuf>,
        /// The standby's stream: kura://HOST:PORT/STREAM (a `shadow` token of it).
        #[arg(long, required_unless_present = "config")]
        to: Option<String>,
        /// Compare the whole tree at this interval too (the watcher is only a hint; default 10m).
        #[arg(long)]
        rescan_every: Option<String>,
        /// Bring the standby up to date once and exit (no watching).
        #[arg(long)]
        once: bool,
        /// With --sqlite: send at most this often while commits arrive (default 5ms); commits
        /// made meanwhile travel together. Lower for less lag, higher for less CPU on both
        /// hosts.
        #[arg(long)]
        interval: Option<String>,
        /// Where this host remembers the epoch it pushes at (default $KURA_STATE_DIR, else
        /// $XDG_STATE_HOME/kura, else ~/.local/state/kura).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Compare by content: this host's tree with the standby's, and the standby's mirror with
    /// its journal (every file hashed). Exit 3 when something differs.
    Verify {
        /// This host's directory (the one it pushes).
        #[arg(long, required_unless_present = "sqlite", conflicts_with = "sqlite")]
        source: Option<PathBuf>,
        /// This host's SQLite database (the one it pushes with `push --sqlite`): its pages as
        /// of one commit against the standby's record of that commit.
        #[arg(long)]
        sqlite: Option<PathBuf>,
        /// How long to wait for the standby to apply the database's commit (--sqlite).
        #[arg(long, default_value = "60s")]
        timeout: String,
        /// The standby's stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
        /// Send what differs from this host, and rewrite what differs on the mirror.
        #[arg(long)]
        repair: bool,
        /// As for push.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Make the standby the primary (admin token): the epoch goes up, the old primary's pushes
    /// are refused from then on, the mirror gets every record received and becomes the live copy.
    Promote {
        /// The standby's stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
    },
    /// Bring a fenced former primary back after a failover: what it wrote that the new primary
    /// never got is kept there as a branch, then DIR is made a copy of the new primary's tree
    /// (only differing entries are fetched).
    Rejoin {
        /// This host's directory (the one it pushed).
        #[arg(long)]
        source: PathBuf,
        /// The promoted stream: kura://HOST:PORT/STREAM (a `shadow` token of it).
        #[arg(long)]
        to: String,
        /// The branch's name (default: this host's name and the time).
        #[arg(long)]
        branch: Option<String>,
        /// Then stay a live copy: apply each change the new primary records, until the stream is
        /// handed back to this host (`kura shadow demote`) and it pushes again.
        #[arg(long)]
        follow: bool,
        /// As for push.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Hand a promoted stream back (admin token; the failback): the mirror's last changes are
    /// recorded, the epoch goes up, the standby's mirror follows the journal again, and the
    /// host that follows the stream (`kura shadow rejoin --follow`) takes over pushing.
    Demote {
        /// The promoted stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
    },
    /// A stream's role, epoch, lag and journal window.
    Status {
        /// Ask the standby: kura://HOST:PORT/STREAM.
        #[arg(long, conflicts_with = "journal", required_unless_present = "journal")]
        to: Option<String>,
        /// Or read a stream's directory on this machine (the standby).
        #[arg(long)]
        journal: Option<PathBuf>,
        /// With --to: also say whether this host is fenced (as for push).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Return once record SEQ is applied on the standby (an acknowledged write); with --sqlite,
    /// once every transaction the database has committed so far is.
    Wait {
        /// Sequence number.
        #[arg(required_unless_present = "sqlite", conflicts_with = "sqlite")]
        seq: Option<u64>,
        /// The shadowed SQLite database (on the primary).
        #[arg(long)]
        sqlite: Option<PathBuf>,
        /// The standby's stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
        /// Give up after this long (exit 1).
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Apply a mass deletion the standby's breaker holds (admin token of the stream).
    Release {
        /// The standby's stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
    },
    /// Drop a held mass deletion: the mirror keeps those files, later changes are applied
    /// (admin token of the stream).
    Discard {
        /// The standby's stream: kura://HOST:PORT/STREAM.
        #[arg(long)]
        to: String,
    },
    /// List the changes the journal holds (on the standby), to find the moment before a mistake.
    Log {
        /// The stream's directory (`<state_dir>/shadow/<name>` unless configured).
        #[arg(long)]
        journal: PathBuf,
        /// Only changes at or below this path (relative to the shadowed directory).
        #[arg(long)]
        path: Option<String>,
        /// Only changes received at or after this time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Write the tree as it was at a moment into a new directory (on the standby).
    Restore {
        /// The stream's directory.
        #[arg(long)]
        journal: PathBuf,
        /// The moment: "YYYY-MM-DD HH:MM[:SS]" (local time) or RFC 3339; the newest record
        /// when left out.
        #[arg(long, conflicts_with = "branch")]
        at: Option<String>,
        /// Restore a branch instead: a fenced primary's tree kept when it rejoined.
        #[arg(long)]
        branch: Option<String>,
        /// Only this path (relative to the shadowed directory) and what is below it; with
        /// --sqlite, which database.
        #[arg(long)]
        path: Option<String>,
        /// Restore a shadowed SQLite database into the new file --target, checked by SQLite.
        #[arg(long, conflicts_with = "branch")]
        sqlite: bool,
        /// With --sqlite: as of transaction (record) N instead of a moment.
        #[arg(long, requires = "sqlite", conflicts_with = "at")]
        txid: Option<u64>,
        /// Where to write it (a directory: empty or absent; with --sqlite, a new file).
        #[arg(long)]
        target: PathBuf,
    },
}

/// `kura serve` options.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The server's configuration file.
    #[arg(long, short = 'c', env = "KURA_SERVER_CONFIG")]
    pub config: PathBuf,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Manage access tokens instead of serving.
    #[command(subcommand)]
    pub command: Option<ServeCommand>,
}

/// `kura serve` subcommands.
#[derive(Subcommand, Debug)]
pub enum ServeCommand {
    /// Manage the server's access tokens (a running server picks changes up by itself).
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `kura serve token` subcommands.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown only this once).
    Add {
        /// backup (add snapshots, never delete), read (restore only), admin (everything) or
        /// shadow (push to the streams named with --repository).
        #[arg(long)]
        role: String,
        /// Repository it opens (repeatable); `*` for all.
        #[arg(long = "repository", required = true)]
        repos: Vec<String>,
        /// A name for it: the host or person that holds it.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List tokens (ids, labels, roles; never secrets).
    List,
    /// Revoke tokens by id or label.
    Revoke {
        /// Token id or label.
        which: String,
    },
}

/// `kura repair` subcommands.
#[derive(Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild the index from the packs' own headers.
    Index {
        /// Also read every pack and leave damaged blobs out of the index, so the next backup
        /// stores them again.
        #[arg(long)]
        read_data: bool,
    },
    /// Write a repaired copy of every damaged snapshot, without the files whose data is lost
    /// (in no index, or in a pack that is gone; after bit rot run `repair index --read-data`
    /// first, which drops the blobs that fail verification).
    Snapshots {
        /// Only report.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Also forget the damaged originals (default: keep them).
        #[arg(long)]
        forget: bool,
    },
}

/// `kura copy` options.
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The repository to copy from (a path, `kura://HOST:PORT/REPO` or `s3://BUCKET/PREFIX`).
    #[arg(long, value_name = "REPO")]
    pub from_repo: String,
    /// Read the source repository's password from this file (else KURA_FROM_PASSWORD, else a
    /// prompt).
    #[arg(long, env = "KURA_FROM_PASSWORD_FILE")]
    pub from_password_file: Option<PathBuf>,
    /// Snapshots to copy (ids, prefixes or `latest`); default: every one the destination lacks.
    pub snapshots: Vec<String>,
    /// Which snapshots.
    #[command(flatten)]
    pub select: SelectArgs,
}

/// Which snapshots `copy` and `pull` take.
#[derive(Args, Debug)]
pub struct SelectArgs {
    /// Only snapshots of this host, tag or path.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only the newest snapshot of each period per host and paths (hourly, daily, weekly,
    /// biweekly, monthly, yearly; local calendar, as retention counts): what a weekly copy takes.
    #[arg(long, value_name = "PERIOD", value_parser = ["hourly", "daily", "weekly", "biweekly", "monthly", "yearly"])]
    pub newest_of: Option<String>,
}

impl SelectArgs {
    /// The `--newest-of` period.
    pub fn period(&self) -> Option<kura_ops::retention::Period> {
        self.newest_of.as_deref().and_then(|n| kura_ops::retention::Period::ALL.into_iter().find(|p| p.name() == n))
    }
}

/// `kura pull` options.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// The repository to pull from (a path, `kura://HOST:PORT/REPO` or `s3://BUCKET/PREFIX`).
    #[arg(long, value_name = "REPO")]
    pub from_repo: String,
    /// For a kura server as the source: its access token (a read token is enough) from this
    /// file (else KURA_FROM_TOKEN).
    #[arg(long, env = "KURA_FROM_TOKEN_FILE")]
    pub from_token_file: Option<PathBuf>,
    /// The source server's certificate fingerprint (else the system's CAs decide).
    #[arg(long, env = "KURA_FROM_FINGERPRINT")]
    pub from_fingerprint: Option<String>,
    /// Which snapshots.
    #[command(flatten)]
    pub select: SelectArgs,
}

/// `kura drill` options.
#[derive(Args, Debug)]
pub struct DrillArgs {
    /// The snapshot (id prefix or `latest`); default: one at random.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// How many files to sample.
    #[arg(long, default_value_t = 20, conflicts_with = "full")]
    pub files: usize,
    /// Restore the whole snapshot: the recovery time of everything.
    #[arg(long)]
    pub full: bool,
    /// Where to make the scratch directory (removed afterwards); default: the system's
    /// temporary directory.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Drill a random copy of a topology instead (any dataset's backup repository or one of
    /// its generations, reached with its host's read token); the passphrase is the dataset's.
    #[arg(long, value_name = "FILE", conflicts_with = "snapshot")]
    pub topology: Option<PathBuf>,
}

/// `kura status` options.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A topology file: every dataset's repository and generations, at their hosts' addresses
    /// (each host's `token_file` and `fingerprint` reach them).
    #[arg(long, value_name = "FILE")]
    pub topology: Option<PathBuf>,
    /// Freshness limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Run this shell command when something is late or failing (the report on its stdin,
    /// KURA_STATUS=warn|crit in its environment).
    #[arg(long, value_name = "COMMAND")]
    pub notify: Option<String>,
    /// POST the report as JSON to this URL when something is late or failing.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
}

/// `kura report` options.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A topology file (as for `status`); without one, the repository (-r).
    #[arg(long, value_name = "FILE")]
    pub topology: Option<PathBuf>,
    /// `html` (one self-contained page) or `markdown`.
    #[arg(long, default_value = "html", value_parser = ["html", "markdown"])]
    pub format: String,
    /// Write it here instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The title (the site's or the customer's name).
    #[arg(long, default_value = "Data protection report")]
    pub title: String,
    /// Freshness limits.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// When `status` and `report` call a copy late.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// The newest snapshot is late after this long (without a topology, which sets its own).
    #[arg(long, default_value = "26h")]
    pub warn: String,
    /// ... and critical after this long.
    #[arg(long, default_value = "50h")]
    pub crit: String,
    /// The last successful drill is late after this long (`off` to not require drills).
    #[arg(long, default_value = "8d")]
    pub drill_warn: String,
}

/// `kura prune` options.
#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Only report what would be deleted and freed.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Limits.
    #[command(flatten)]
    pub opts: PruneOpts,
}

/// `kura forget` options.
#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Remove exactly these snapshots (ids or unique prefixes) instead of applying a policy.
    pub snapshots: Vec<String>,
    /// Keep the newest N snapshots (N or "unlimited").
    #[arg(long, value_name = "N")]
    pub keep_last: Option<String>,
    /// Keep the newest snapshot of each of the newest N hours.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<String>,
    /// Keep the newest snapshot of each of the newest N days.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<String>,
    /// Keep the newest snapshot of each of the newest N ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<String>,
    /// Keep the newest snapshot of each of the newest N two-week periods.
    #[arg(long, value_name = "N")]
    pub keep_biweekly: Option<String>,
    /// Keep the newest snapshot of each of the newest N months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<String>,
    /// Keep the newest snapshot of each of the newest N years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<String>,
    /// Keep every snapshot within this duration of the newest one (e.g. 2d, 1y6m, 36h).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep the newest snapshot of each hour within this duration of the newest one.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_hourly: Option<String>,
    /// Keep the newest snapshot of each day within this duration of the newest one.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_daily: Option<String>,
    /// Keep the newest snapshot of each week within this duration of the newest one.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_weekly: Option<String>,
    /// Keep the newest snapshot of each two-week period within this duration.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_biweekly: Option<String>,
    /// Keep the newest snapshot of each month within this duration of the newest one.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_monthly: Option<String>,
    /// Keep the newest snapshot of each year within this duration of the newest one.
    #[arg(long, value_name = "DURATION")]
    pub keep_within_yearly: Option<String>,
    /// Keep snapshots with all of these comma-separated tags (repeatable).
    #[arg(long, value_name = "TAGS")]
    pub keep_tag: Vec<String>,
    /// Allow a policy without rules: every unprotected snapshot is removed.
    #[arg(long)]
    pub keep_none: bool,
    /// Read the policy from this TOML file (per repository, with per-group sections).
    #[arg(long, env = "KURA_POLICY")]
    pub policy: Option<PathBuf>,
    /// Group snapshots by these fields: host, paths, tags (comma-separated) or none.
    #[arg(long, short = 'g')]
    pub group_by: Option<String>,
    /// Time zone of days, weeks, months (IANA name; default: the local zone).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Evaluate the policy as if it were this time (simulation).
    #[arg(long)]
    pub now: Option<String>,
    /// Only snapshots of this host.
    #[arg(long, short = 'H')]
    pub host: Option<String>,
    /// Only snapshots with this tag (repeatable).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Only show what would be removed.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Prune right after forgetting.
    #[arg(long)]
    pub prune: bool,
    /// Prune options.
    #[command(flatten)]
    pub prune_args: PruneOpts,
}

/// Prune options usable with `forget --prune`.
#[derive(Args, Debug, Clone)]
pub struct PruneOpts {
    /// Unused space to tolerate in kept packs: a percentage of the repository, a size (200M)
    /// or "unlimited".
    #[arg(long, default_value = "5%")]
    pub max_unused: String,
    /// Repack at most this much per run (e.g. 2G).
    #[arg(long)]
    pub max_repack_size: Option<String>,
}

/// `kura backup` options.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up.
    pub paths: Vec<PathBuf>,
    /// Exclude paths matching this gitignore-style pattern (repeatable).
    #[arg(short = 'e', long)]
    pub exclude: Vec<String>,
    /// Read exclude patterns from a file (repeatable).
    #[arg(long)]
    pub exclude_file: Vec<PathBuf>,
    /// Stay on the filesystem of each source path.
    #[arg(short = 'x', long)]
    pub one_file_system: bool,
    /// Tag the snapshot (repeatable).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Host name to record (default: this machine's).
    #[arg(long, short = 'H')]
    pub host: Option<String>,
    /// Record this time instead of now ("2026-11-21 14:05", RFC 3339).
    #[arg(long)]
    pub time: Option<String>,
    /// Read the data to back up from standard input.
    #[arg(long)]
    pub stdin: bool,
    /// File name for the data read from standard input.
    #[arg(long, default_value = "stdin")]
    pub stdin_filename: String,
    /// Use this snapshot as the parent instead of the latest one with the same host and paths.
    #[arg(long)]
    pub parent: Option<String>,
    /// Read every file, even those unchanged since the parent.
    #[arg(short, long)]
    pub force: bool,
    /// On a standby: back up this shadow stream's mirror (the stream's directory, holding
    /// stream.json) at a consistent point: the applier pauses between two records while the
    /// snapshot is read, and the snapshot is tagged shadow-record=N. Paths default to the mirror.
    #[arg(long, conflicts_with = "stdin")]
    pub shadow_stream: Option<PathBuf>,
}

/// Snapshot filters.
#[derive(Args, Debug)]
pub struct FilterArgs {
    /// Only snapshots of this host.
    #[arg(long, short = 'H')]
    pub host: Option<String>,
    /// Only snapshots with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Only snapshots containing this path.
    #[arg(long)]
    pub path: Option<String>,
}

impl FilterArgs {
    /// Whether a snapshot passes every given filter.
    pub fn matches(&self, s: &kura_repo::snapshot::SnapshotPublic) -> bool {
        self.host.as_ref().is_none_or(|h| &s.host == h) && self.tag.as_ref().is_none_or(|t| s.tags.contains(t)) && self.path.as_ref().is_none_or(|p| s.paths.contains(p))
    }
}

/// `kura restore` options.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id (prefix) or "latest".
    pub snapshot: String,
    /// Directory to restore into.
    #[arg(short, long)]
    pub target: PathBuf,
    /// Restore only this path of the snapshot (repeatable).
    #[arg(short, long)]
    pub include: Vec<String>,
    /// Replace existing files that differ from the snapshot.
    #[arg(long)]
    pub overwrite: bool,
}

/// `kura check` options.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Read all stored data: every pack must hash to its name (all damage at rest is found,
    /// and the affected files are named).
    #[arg(long)]
    pub read_data: bool,
    /// With the data read, also authenticate, decompress and re-hash every blob as a restore
    /// would (finds a faulty writer too; CPU-bound).
    #[arg(long)]
    pub deep: bool,
    /// Read only a subset: "n/m" (rotate n) or "p%".
    #[arg(long)]
    pub read_data_subset: Option<String>,
}

/// `kura key` subcommands.
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List keys.
    List,
    /// Add a key with a new password (KURA_NEW_PASSWORD, --new-password-file or a prompt).
    Add {
        /// File with the new password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key by id (prefix); not the one in use, not the last.
    Remove {
        /// Key id or prefix.
        id: String,
    },
    /// Change the password of the key in use.
    Passwd {
        /// File with the new password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
}
