//! The server's configuration file (`server.toml`): where to listen, where its state lives,
//! which repositories it hosts and the limits it enforces.

use crate::ServerError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `server.toml`, as parsed; unknown keys are errors, so a typo never silently disables a limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on (`0.0.0.0:8443`; port 0 picks a free one).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the server's own state: the token list and a generated certificate.
    pub state_dir: PathBuf,
    /// A CA-signed certificate; without it the server generates a self-signed one on first
    /// start and prints its fingerprint, which clients pin.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Limits against abusive clients.
    #[serde(default)]
    pub limits: Limits,
    /// The repositories this server hosts.
    #[serde(default, rename = "repository")]
    pub repositories: Vec<RepoConfig>,
    /// The shadow streams this server receives (it is their standby).
    #[serde(default, rename = "stream")]
    pub streams: Vec<StreamConfig>,
}

/// A shadow stream this server receives: a primary's `kura shadow push` appends to its
/// journal, and the server applies it to the mirror.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Name in URLs: `kura://HOST:PORT/<name>`.
    pub name: String,
    /// The hot mirror: a directory kura owns (anything else in it is removed).
    pub mirror: PathBuf,
    /// Where the journal lives; default `<state_dir>/shadow/<name>`.
    #[serde(default)]
    pub journal: Option<PathBuf>,
    /// Apply records only this long after they arrived (`1h`: a standby that stays behind on
    /// purpose); `0s` applies at once.
    #[serde(default = "default_delay")]
    pub apply_delay: String,
    /// How long the journal keeps every record (any moment within it can be restored); older
    /// records fold into the journal's base. `0s` keeps everything.
    #[serde(default = "default_window")]
    pub window: String,
    /// The mass-deletion breaker: hold (and alert) when more than this percentage of the
    /// mirror's files would be deleted or truncated within `breaker_window`; 0 turns it off.
    #[serde(default = "default_breaker_percent")]
    pub breaker_files_percent: f64,
    /// ...counting only bursts of at least this many files.
    #[serde(default = "default_breaker_min")]
    pub breaker_min_files: u64,
    /// Hold also when more than this many bytes would go within the window (`10GiB`).
    #[serde(default = "default_breaker_bytes")]
    pub breaker_bytes: String,
    /// The window bursts are summed over (`1m`).
    #[serde(default = "default_breaker_window")]
    pub breaker_window: String,
    /// The most the stream's SQLite databases may hold together (`1TiB`): a commit claiming
    /// more is refused, so a primary's credential cannot fill this server's disk with pages it
    /// never sends.
    #[serde(default = "default_max_database")]
    pub max_database: String,
}

fn default_max_database() -> String {
    "1TiB".into()
}

fn default_breaker_percent() -> f64 {
    20.0
}
fn default_breaker_min() -> u64 {
    100
}
fn default_breaker_bytes() -> String {
    "10GiB".into()
}
fn default_breaker_window() -> String {
    "1m".into()
}

fn default_delay() -> String {
    "0s".into()
}

impl StreamConfig {
    /// The journal directory.
    pub fn journal_dir(&self, state_dir: &Path) -> PathBuf {
        self.journal.clone().unwrap_or_else(|| state_dir.join("shadow").join(&self.name))
    }

    /// How the stream is received: the apply delay and the breaker.
    pub fn options(&self) -> Result<kura_shadow::StreamOptions, ServerError> {
        let key = |k: &str| format!("stream {:?} {k}", self.name);
        if !(0.0..=100.0).contains(&self.breaker_files_percent) {
            return Err(ServerError::Config(format!("{} = {} is not a percentage", key("breaker_files_percent"), self.breaker_files_percent)));
        }
        Ok(kura_shadow::StreamOptions {
            apply_delay: duration(&key("apply_delay"), &self.apply_delay)?,
            window: duration(&key("window"), &self.window)?,
            breaker: kura_shadow::Breaker {
                files_percent: self.breaker_files_percent,
                min_files: self.breaker_min_files,
                bytes: kura_ops::prune::parse_size(&self.breaker_bytes)
                    .ok_or_else(|| ServerError::Config(format!("{} = {:?} is not a size like 10GiB", key("breaker_bytes"), self.breaker_bytes)))?,
                window: duration(&key("breaker_window"), &self.breaker_window)?,
            },
            max_database: kura_ops::prune::parse_size(&self.max_database)
                .ok_or_else(|| ServerError::Config(format!("{} = {:?} is not a size like 1TiB", key("max_database"), self.max_database)))?,
        })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

/// PEM files of a certificate chain and its private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// One hosted repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Name in URLs: `kura://HOST:PORT/<name>`.
    pub name: String,
    /// Directory of the repository (created if missing); default `<state_dir>/repos/<name>`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Object storage instead of a directory: `s3://BUCKET/PREFIX`, reached with the AWS
    /// environment variables of the server process (`AWS_ACCESS_KEY_ID`, ...).
    #[serde(default)]
    pub storage: Option<String>,
    /// How long a deleted snapshot stays in the trash, recoverable with `kura undelete`, before
    /// the server lets its data go (`7d`).
    #[serde(default = "default_window")]
    pub undelete_window: String,
    /// Scheduled retention, by the server's clock.
    #[serde(default)]
    pub retention: Option<RetentionJob>,
    /// Scheduled verification of stored bytes against their names (no key needed).
    #[serde(default)]
    pub verify: Option<VerifyJob>,
    /// Scheduled keyless prune: deletes packs no snapshot (nor trashed one) uses.
    #[serde(default)]
    pub prune: Option<PruneJob>,
    /// Scheduled pull of snapshots from another repository, which this one replicates.
    #[serde(default)]
    pub pull: Option<PullJob>,
}

/// `[repository.pull]`: this repository is a replica of `from`, which the server reads on a
/// schedule (with a read token when `from` is a kura server) without the key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PullJob {
    /// When it runs (`daily 01:30`).
    pub schedule: String,
    /// The source: `kura://HOST:PORT/REPO`, `s3://BUCKET/PREFIX` or a directory.
    pub from: String,
    /// The access token for a kura server source (a read token is enough).
    pub token_file: Option<PathBuf>,
    /// The source server's certificate fingerprint (else the system's CAs decide).
    pub fingerprint: Option<String>,
    /// Only these hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Only snapshots carrying all these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Only snapshots whose paths include all these.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Only the newest snapshot of each `hourly`, `daily`, `weekly`, `biweekly`, `monthly` or
    /// `yearly` period per host and paths.
    pub newest_of: Option<String>,
    /// Zone of the schedule and the periods (default: the server's).
    pub timezone: Option<String>,
    /// Attempts of a run before it is reported failed (a network cut is retried: what was
    /// fetched stays).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

fn default_attempts() -> u32 {
    3
}

/// `[repository.prune]`: when the keyless prune runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneJob {
    /// When it runs (`weekly sun 03:00`).
    pub schedule: String,
}

fn default_window() -> String {
    "7d".into()
}

/// `[repository.retention]`: a schedule and a policy (the policy file's keys, docs/RETENTION.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionJob {
    /// When it runs (`daily 02:00`).
    pub schedule: String,
    /// Zone of the schedule and of the calendar rules (default: the server's).
    pub timezone: Option<String>,
    /// Grouping (`host,paths`).
    pub group_by: Option<String>,
    /// The default policy.
    pub keep: Option<kura_ops::policy::Keep>,
    /// Per-group policies.
    #[serde(default)]
    pub group: Vec<kura_ops::policy::GroupSection>,
}

impl RetentionJob {
    /// The policy as a policy file.
    pub fn policy(&self) -> kura_ops::policy::PolicyFile {
        kura_ops::policy::PolicyFile {
            timezone: self.timezone.clone(),
            group_by: self.group_by.clone(),
            keep: self.keep.clone(),
            group: self.group.clone(),
        }
    }
}

/// `[repository.verify]`: reads stored objects and checks them against their names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyJob {
    /// When it runs (`daily 04:00`).
    pub schedule: String,
    /// `1/7`: each run reads the next seventh of the packs (all index files, snapshots and keys
    /// every time); `all` reads every pack.
    #[serde(default = "default_subset")]
    pub subset: String,
}

fn default_subset() -> String {
    "1/7".into()
}

/// Parses a verify subset: `all` or `1/N`.
pub fn parse_subset(s: &str) -> Result<u64, String> {
    if s == "all" {
        return Ok(1);
    }
    match s.split_once('/') {
        Some(("1", n)) => n.parse().ok().filter(|n: &u64| (1..=256).contains(n)).ok_or_else(|| format!("subset {s:?}: N must be 1..256")),
        _ => Err(format!("subset {s:?}: use `all` or `1/N`")),
    }
}

/// Parses a duration like `7d`, `12h`, `30s`.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ServerError> {
    duration(key, s)
}

/// Limits, with defaults that a normal client never reaches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest object accepted (`256MiB`); a pack is at most a few times the pack size.
    pub max_object_size: String,
    /// Upload bytes held in memory at once across all clients (`1GiB`); further uploads wait.
    pub max_upload_memory: String,
    /// An upload that sends nothing for this long is cut off (`30s`).
    pub idle_timeout: String,
    /// A client must send its request headers within this long (`30s`).
    pub header_timeout: String,
    /// Failed token checks allowed per client address in a burst, refilled one per second.
    pub auth_failures_burst: u32,
    /// A snapshot whose claimed time is this far after its receive time is flagged (`10m`).
    pub future_skew: String,
    /// A snapshot whose claimed time is this far before its receive time is flagged (`2d`).
    pub past_skew: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_object_size: "256MiB".into(),
            max_upload_memory: "1GiB".into(),
            idle_timeout: "30s".into(),
            header_timeout: "30s".into(),
            auth_failures_burst: 20,
            future_skew: "10m".into(),
            past_skew: "2d".into(),
        }
    }
}

/// [`Limits`] with units resolved.
#[derive(Debug, Clone, Copy)]
pub struct ResolvedLimits {
    /// Bytes.
    pub max_object_size: u64,
    /// Bytes.
    pub max_upload_memory: u64,
    /// Idle upload cut-off.
    pub idle_timeout: Duration,
    /// Header deadline.
    pub header_timeout: Duration,
    /// Burst of failed token checks per address.
    pub auth_failures_burst: u32,
    /// Future skew that flags a snapshot.
    pub future_skew: Duration,
    /// Past skew that flags a snapshot.
    pub past_skew: Duration,
}

fn duration(key: &str, s: &str) -> Result<Duration, ServerError> {
    let span: jiff::Span = s.parse().map_err(|e| ServerError::Config(format!("{key} = {s:?}: {e}")))?;
    let d = jiff::SignedDuration::try_from(span)
        .or_else(|_| span.to_duration(jiff::SpanRelativeTo::days_are_24_hours()))
        .map_err(|e| ServerError::Config(format!("{key} = {s:?}: {e}")))?;
    Duration::try_from(d).map_err(|_| ServerError::Config(format!("{key} = {s:?} is negative")))
}

fn size(key: &str, s: &str) -> Result<u64, ServerError> {
    kura_ops::prune::parse_size(s)
        .filter(|n| *n > 0)
        .ok_or_else(|| ServerError::Config(format!("limits.{key} = {s:?} is not a size like 256MiB")))
}

impl ServerConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            ServerError::Config(m) => ServerError::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ServerError> {
        let cfg: ServerConfig = toml::from_str(text).map_err(|e| ServerError::Config(e.to_string().replace('\n', " ")))?;
        let mut seen = std::collections::HashSet::new();
        for r in &cfg.repositories {
            kura_store::check_name(&r.name)
                .map_err(|_| ServerError::Config(format!("repository name {:?} is not a plain name", r.name)))?;
            if r.name == "shadow" {
                return Err(ServerError::Config("repository name \"shadow\" is reserved for shadow streams".into()));
            }
            if !seen.insert(&r.name) {
                return Err(ServerError::Config(format!("repository {:?} is listed twice", r.name)));
            }
        }
        let mut names = std::collections::HashSet::new();
        for st in &cfg.streams {
            kura_store::check_name(&st.name).map_err(|_| ServerError::Config(format!("stream name {:?} is not a plain name", st.name)))?;
            if !names.insert(&st.name) || seen.contains(&st.name) {
                return Err(ServerError::Config(format!("stream {:?} is listed twice (or is also a repository)", st.name)));
            }
            st.options()?;
            if !st.mirror.is_absolute() {
                return Err(ServerError::Config(format!("stream {:?}: mirror {} must be an absolute path", st.name, st.mirror.display())));
            }
        }
        let l = cfg.limits()?;
        if l.max_object_size > l.max_upload_memory {
            return Err(ServerError::Config("limits.max_object_size must not exceed limits.max_upload_memory".into()));
        }
        for r in &cfg.repositories {
            let ctx = |m: String| ServerError::Config(format!("repository {:?}: {m}", r.name));
            duration("undelete_window", &r.undelete_window).map_err(|e| ctx(e.to_string()))?;
            match (&r.path, &r.storage) {
                (Some(_), Some(_)) => return Err(ctx("give either path or storage, not both".into())),
                (_, Some(s)) if !kura_store::s3::is_s3(s) => {
                    return Err(ctx(format!("storage {s:?} is not an s3://BUCKET/PREFIX location")));
                }
                _ => {}
            }
            if let Some(j) = &r.retention {
                j.schedule.parse::<crate::schedule::Schedule>().map_err(ctx)?;
                j.policy().resolve(None, None, None).map_err(|e| ctx(format!("retention: {e}")))?;
            }
            if let Some(j) = &r.prune {
                j.schedule.parse::<crate::schedule::Schedule>().map_err(|e| ctx(format!("prune: {e}")))?;
            }
            if let Some(j) = &r.verify {
                j.schedule.parse::<crate::schedule::Schedule>().map_err(ctx)?;
                parse_subset(&j.subset).map_err(ctx)?;
            }
        }
        Ok(cfg)
    }

    /// The limits with units resolved.
    pub fn limits(&self) -> Result<ResolvedLimits, ServerError> {
        let l = &self.limits;
        Ok(ResolvedLimits {
            max_object_size: size("max_object_size", &l.max_object_size)?,
            max_upload_memory: size("max_upload_memory", &l.max_upload_memory)?,
            idle_timeout: duration("limits.idle_timeout", &l.idle_timeout)?,
            header_timeout: duration("limits.header_timeout", &l.header_timeout)?,
            auth_failures_burst: l.auth_failures_burst.max(1),
            future_skew: duration("limits.future_skew", &l.future_skew)?,
            past_skew: duration("limits.past_skew", &l.past_skew)?,
        })
    }

    /// A repository's directory.
    pub fn repo_path(&self, r: &RepoConfig) -> PathBuf {
        r.path.clone().unwrap_or_else(|| self.state_dir.join("repos").join(&r.name))
    }

    /// The token list's file.
    pub fn tokens_path(&self) -> PathBuf {
        self.state_dir.join("tokens.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = ServerConfig::parse("state_dir = \"/var/lib/kura\"\n[[repository]]\nname = \"office\"\n").unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.repo_path(&c.repositories[0]), PathBuf::from("/var/lib/kura/repos/office"));
        let l = c.limits().unwrap();
        assert_eq!(l.max_object_size, 256 << 20);
        assert_eq!(l.past_skew, Duration::from_secs(2 * 86400));
    }

    #[test]
    fn storage_is_a_bucket_or_a_directory_never_both() {
        let c = ServerConfig::parse("state_dir = \"/x\"\n[[repository]]\nname = \"a\"\nstorage = \"s3://b/p\"\n").unwrap();
        assert_eq!(c.repositories[0].storage.as_deref(), Some("s3://b/p"));
        for bad in ["storage = \"s3://b/p\"\npath = \"/y\"", "storage = \"/y\""] {
            let e = ServerConfig::parse(&format!("state_dir = \"/x\"\n[[repository]]\nname = \"a\"\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains("repository \"a\""), "{e}");
        }
    }

    #[test]
    fn jobs_parse() {
        let c = ServerConfig::parse(
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\nundelete_window = \"3d\"\n\
             [repository.retention]\nschedule = \"daily 02:00\"\ntimezone = \"Europe/Berlin\"\nkeep = { daily = 7, weekly = 4 }\n\
             [repository.verify]\nschedule = \"weekly sun 04:00\"\n",
        )
        .unwrap();
        let r = &c.repositories[0];
        assert_eq!(r.undelete_window, "3d");
        assert_eq!(r.verify.as_ref().unwrap().subset, "1/7");
        assert!(r.retention.as_ref().unwrap().policy().resolve(None, None, None).is_ok());
    }

    #[test]
    fn typos_duplicates_and_bad_names_are_errors() {
        for bad in [
            "state_dir = \"/x\"\nlisten_on = \"1.2.3.4:1\"",
            "state_dir = \"/x\"\n[[repository]]\nname = \"../etc\"",
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\n[[repository]]\nname = \"a\"",
            "state_dir = \"/x\"\n[limits]\nmax_object_size = \"lots\"",
            "state_dir = \"/x\"\n[limits]\nidle_timeout = \"soon\"",
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\nundelete_window = \"a week\"",
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\n[repository.retention]\nschedule = \"daily 02:00\"",
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\n[repository.retention]\nschedule = \"at noon\"\nkeep = { daily = 7 }",
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\n[repository.retention]\nschedule = \"daily 02:00\"\nkeep = { dayly = 7 }",
            "state_dir = \"/x\"\n[[repository]]\nname = \"a\"\n[repository.verify]\nschedule = \"daily 04:00\"\nsubset = \"2/7\"",
        ] {
            assert!(ServerConfig::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
