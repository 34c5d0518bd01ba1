//! Finding the repository and its password: `-r`/KURA_REPOSITORY, or the embedded default
//! repository under the user's data directory whose generated password lives owner-only in the
//! user's config directory.

use crate::args::Cli;
use anyhow::{Context, Result, bail};
use kura_repo::{KdfParams, RepoError, Repository};
use kura_store::remote::{RemoteOptions, is_remote};
use kura_store::s3::{S3Options, is_s3};
use kura_store::{LocalStore, RemoteStore, S3Store, Store};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the repository is and whether it is the embedded default.
pub struct Location {
    /// Directory of the repository (empty for a server's).
    pub path: PathBuf,
    /// `kura://HOST:PORT/REPO` when a kura server hosts it, `s3://BUCKET/PREFIX` in a bucket.
    pub url: Option<String>,
    /// True when no repository was named and the default is used.
    pub default: bool,
}

impl Location {
    /// The location as the user named it, for messages.
    pub fn describe(&self) -> String {
        self.url.clone().unwrap_or_else(|| self.path.display().to_string())
    }
}

/// The default repository's directory and password file.
pub fn default_paths() -> Result<(PathBuf, PathBuf)> {
    let data = dirs::data_dir().context("cannot find your data directory (set HOME or XDG_DATA_HOME), or name a repository with -r")?;
    let conf = dirs::config_dir().context("cannot find your config directory (set HOME or XDG_CONFIG_HOME)")?;
    Ok((data.join("kura").join("repository"), conf.join("kura").join("default-repository.password")))
}

/// Resolves the repository location.
pub fn location(cli: &Cli) -> Result<Location> {
    location_of(cli.repo.as_ref())
}

/// Where a repository given as a string (or the default one) is.
pub fn location_of(repo: Option<&String>) -> Result<Location> {
    match repo {
        Some(u) if is_remote(u) || is_s3(u) => Ok(Location { path: PathBuf::new(), url: Some(u.clone()), default: false }),
        Some(p) => Ok(Location { path: PathBuf::from(p), url: None, default: false }),
        None => Ok(Location { path: default_paths()?.0, url: None, default: true }),
    }
}

/// How to reach a kura server: the token from --token-file or KURA_TOKEN, the pinned
/// fingerprint, and KURA_RETRIES (attempts after the first for network failures).
pub fn remote_options(cli: &Cli) -> Result<RemoteOptions> {
    remote_options_with(cli.token_file.as_deref(), "KURA_TOKEN", "--token-file", cli.fingerprint.as_ref())
}

/// [`remote_options`] with the token from `token_file`, else the variable `env`.
pub fn remote_options_with(token_file: Option<&std::path::Path>, env: &str, flag: &str, fingerprint: Option<&String>) -> Result<RemoteOptions> {
    let token = match (token_file, std::env::var(env)) {
        (Some(f), _) => {
            let t = std::fs::read_to_string(f).with_context(|| format!("cannot read token file {}", f.display()))?;
            t.trim().to_string()
        }
        (None, Ok(t)) => t,
        (None, Err(_)) => bail!("a kura server needs an access token: set {env} or use {flag}"),
    };
    let mut opts = RemoteOptions { token: token.trim().to_string(), fingerprint: fingerprint.cloned(), ..Default::default() };
    if let Ok(r) = std::env::var("KURA_RETRIES") {
        opts.retries = r.parse().with_context(|| format!("KURA_RETRIES={r:?} is not a number"))?;
    }
    Ok(opts)
}

/// S3 settings from the AWS environment, KURA_RETRIES and KURA_S3_TIMEOUT (seconds a stalled
/// answer is waited for before the request is retried).
fn s3_options() -> Result<S3Options> {
    let mut opts = S3Options::from_env();
    if let Ok(r) = std::env::var("KURA_RETRIES") {
        opts.retries = r.parse().with_context(|| format!("KURA_RETRIES={r:?} is not a number"))?;
    }
    if let Ok(t) = std::env::var("KURA_S3_TIMEOUT") {
        let secs: u64 = t.parse().ok().filter(|s| *s > 0).with_context(|| format!("KURA_S3_TIMEOUT={t:?} is not a number of seconds"))?;
        opts.io_timeout = std::time::Duration::from_secs(secs);
    }
    Ok(opts)
}

/// Opens the store of an existing repository (no key needed yet).
pub fn open_store(cli: &Cli, loc: &Location) -> Result<Arc<dyn Store>> {
    open_store_with(loc, &|| remote_options(cli))
}

/// [`open_store`] with the server options `remote` gives (asked only for a kura server).
pub fn open_store_with(loc: &Location, remote: &dyn Fn() -> Result<RemoteOptions>) -> Result<Arc<dyn Store>> {
    Ok(match &loc.url {
        Some(u) if is_s3(u) => Arc::new(S3Store::open(u, &s3_options()?).map_err(RepoError::from)?),
        Some(u) => Arc::new(RemoteStore::open(u, &remote()?).map_err(RepoError::from)?),
        None => Arc::new(LocalStore::open(&loc.path).map_err(RepoError::from)?),
    })
}

/// The store a pull fills: an existing repository, or a new one (a missing or empty
/// directory, a bucket prefix or server repository not initialised yet).
pub fn pull_target(cli: &Cli) -> Result<Arc<dyn Store>> {
    let loc = location(cli)?;
    Ok(match &loc.url {
        Some(u) if is_s3(u) => match S3Store::create(u, &s3_options()?) {
            Ok(s) => Arc::new(s),
            Err(kura_store::StoreError::Exists(_)) => Arc::new(S3Store::open(u, &s3_options()?).map_err(RepoError::from)?),
            Err(e) => return Err(RepoError::from(e).into()),
        },
        Some(u) => Arc::new(RemoteStore::create(u, &remote_options(cli)?).map_err(RepoError::from)?),
        None => match LocalStore::open(&loc.path) {
            Ok(s) => Arc::new(s),
            Err(_) => {
                if std::fs::read_dir(&loc.path).is_ok_and(|mut d| d.next().is_some()) {
                    bail!("{} is neither a repository nor empty; a pull fills an empty directory or a replica", loc.path.display());
                }
                Arc::new(LocalStore::create(&loc.path).map_err(RepoError::from)?)
            }
        },
    })
}

/// Prepares the store of a repository `init` is about to create; refuses an existing one.
pub fn create_store(cli: &Cli, loc: &Location) -> Result<Arc<dyn Store>> {
    match &loc.url {
        Some(u) if is_s3(u) => match S3Store::create(u, &s3_options()?) {
            Ok(s) => {
                let honoured = s.probe().map_err(RepoError::from)?;
                if !cli.quiet {
                    eprintln!(
                        "{u}: the server {} conditional writes (If-None-Match); kura does not rely on them",
                        if honoured { "honours" } else { "ignores" }
                    );
                    let f = s.features();
                    match (&f.lock, f.lock_without_default) {
                        (Some(l), _) => eprintln!(
                            "{u}: Object Lock {} for {} days: nothing kura writes can be deleted before then, not even by prune",
                            l.mode.as_str(),
                            l.period.as_secs() / 86_400
                        ),
                        (None, true) => eprintln!("{u}: Object Lock is on but without a default retention, so kura's objects are not locked"),
                        (None, false) if f.versioning.as_deref() == Some("Enabled") => {
                            eprintln!("{u}: versioning is on: deleted objects stay as old versions until a lifecycle rule expires them")
                        }
                        _ => {}
                    }
                }
                Ok(Arc::new(s))
            }
            Err(kura_store::StoreError::Exists(_)) => bail!(RepoError::AlreadyExists(loc.describe())),
            Err(e) => Err(RepoError::from(e).into()),
        },
        Some(u) => {
            let s = RemoteStore::create(u, &remote_options(cli)?).map_err(RepoError::from)?;
            if s.info().map_err(RepoError::from)?.initialised {
                bail!(RepoError::AlreadyExists(loc.describe()));
            }
            Ok(Arc::new(s))
        }
        None => {
            if LocalStore::open(&loc.path).is_ok() {
                bail!(RepoError::AlreadyExists(loc.describe()));
            }
            Ok(Arc::new(LocalStore::create(&loc.path).map_err(RepoError::from)?))
        }
    }
}

/// Reads a password file, without its trailing newline.
pub fn read_password_file(p: &std::path::Path) -> Result<Vec<u8>> {
    let mut b = std::fs::read(p).with_context(|| format!("cannot read password file {}", p.display()))?;
    while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        b.pop();
    }
    Ok(b)
}

/// The password: --password-file, KURA_PASSWORD, the default repository's password file, or a
/// prompt on a terminal (asked twice when `confirm`).
pub fn password(cli: &Cli, loc: &Location, confirm: bool) -> Result<Vec<u8>> {
    match given_password(cli, loc)? {
        Some(p) => Ok(p),
        None => prompt("repository password", confirm),
    }
}

/// The password given without asking: --password-file, KURA_PASSWORD, or the default
/// repository's password file.
fn given_password(cli: &Cli, loc: &Location) -> Result<Option<Vec<u8>>> {
    if let Some(p) = &cli.password_file {
        return read_password_file(p).map(Some);
    }
    if let Ok(p) = std::env::var("KURA_PASSWORD") {
        return Ok(Some(p.into_bytes()));
    }
    if loc.default {
        let (_, keyfile) = default_paths()?;
        if keyfile.exists() {
            return read_password_file(&keyfile).map(Some);
        }
    }
    Ok(None)
}

/// Asks for a password on the terminal.
pub fn prompt(what: &str, confirm: bool) -> Result<Vec<u8>> {
    if !std::io::stdin().is_terminal() {
        bail!("no password given: set KURA_PASSWORD or use --password-file");
    }
    let p = rpassword::prompt_password(format!("enter {what}: ")).context("cannot read password")?;
    if confirm {
        let again = rpassword::prompt_password(format!("enter {what} again: ")).context("cannot read password")?;
        if again != p {
            bail!("passwords do not match");
        }
    }
    if p.is_empty() {
        bail!("empty password refused");
    }
    Ok(p.into_bytes())
}

/// Opens the repository and loads its index.
pub fn open(cli: &Cli) -> Result<Repository> {
    let loc = location(cli)?;
    let store = open_store(cli, &loc)?;
    let pw = password(cli, &loc, false)?;
    let repo = Repository::open(store, &pw)?;
    Ok(repo)
}

/// Opens the repository for a command that deletes or changes existing objects; a kura
/// server's backup or read token is refused before any work (unless only reporting).
pub fn open_admin(cli: &Cli, dry_run: bool) -> Result<Repository> {
    let repo = open(cli)?;
    if !dry_run {
        repo.store().check_admin().map_err(RepoError::from)?;
    }
    Ok(repo)
}

/// Opens the repository and loads its index for reading; packs no readable index file covers
/// (an interrupted backup, a damaged index file) are indexed in memory from their headers.
pub fn open_indexed(cli: &Cli, command: &str) -> Result<Repository> {
    index(open(cli)?, command)
}

/// Opens the repository `copy` reads from: `--from-password-file`, else KURA_FROM_PASSWORD,
/// else a prompt. A kura server there is reached with the same token options as the
/// destination.
pub fn open_source(cli: &Cli, from: &str, password_file: Option<&std::path::Path>) -> Result<Repository> {
    let loc = location_of(Some(&from.to_string()))?;
    let store = open_store(cli, &loc).context("opening the source repository")?;
    let pw = match (password_file, std::env::var("KURA_FROM_PASSWORD")) {
        (Some(f), _) => read_password_file(f)?,
        (None, Ok(p)) => p.into_bytes(),
        (None, Err(_)) if std::io::stdin().is_terminal() => prompt("source repository password", false)?,
        (None, Err(_)) => bail!("no password for the source repository: set KURA_FROM_PASSWORD or use --from-password-file"),
    };
    let repo = Repository::open(store, &pw).context("opening the source repository")?;
    index(repo, "copy")
}

/// Registers a reader's session and loads the index (see [`open_indexed`]).
pub fn index(repo: Repository, command: &str) -> Result<Repository> {
    // The session keeps a concurrent prune from deleting packs this command reads. A
    // repository on read-only media cannot record it, and nothing can prune it either.
    start_reader_session(&repo, command)?;
    let problems = repo.load_index()?;
    for e in &problems {
        eprintln!("kura: warning: {e}; reading pack headers instead");
    }
    let (_, bad) = repo.index_orphan_packs(false)?;
    for e in &bad {
        eprintln!("kura: warning: {e}");
    }
    Ok(repo)
}

/// Registers a reading command's session. A repository this user cannot write (read-only
/// media, another user's files) cannot record it: the command still runs, and says that a
/// concurrent prune could make it fail (it can lose nothing).
pub fn start_reader_session(repo: &Repository, command: &str) -> Result<()> {
    match repo.start_session(command) {
        Ok(()) => Ok(()),
        Err(RepoError::Store(s)) if s.is_read_only() => {
            eprintln!("kura: note: cannot register a session in this repository ({s}); a prune running at the same time could make this command fail");
            Ok(())
        }
        Err(e) => Err(e).context("registering this session in the repository"),
    }
}

/// Opens the repository for a backup; the default repository is created on first use with a
/// generated password, and the user is told where it is.
pub fn open_for_backup(cli: &Cli) -> Result<Repository> {
    let loc = location(cli)?;
    if !loc.default || LocalStore::open(&loc.path).is_ok() {
        return open(cli);
    }
    let (_, keyfile) = default_paths()?;
    let pw = match given_password(cli, &loc)? {
        Some(p) => p,
        None => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let pw = hex::encode(raw).into_bytes();
            write_owner_only(&keyfile, &pw)?;
            eprintln!(
                "kura: generated the password of your default repository and stored it in {} (readable only by you).\n\
                 kura: keep a copy of that file somewhere safe: without it these backups cannot be read.",
                keyfile.display()
            );
            pw
        }
    };
    let store = LocalStore::create(&loc.path).map_err(RepoError::from)?;
    let repo = Repository::init(Arc::new(store), &pw, KdfParams::default())?;
    eprintln!("kura: created the default repository at {}", loc.path.display());
    Ok(repo)
}

fn write_owner_only(path: &std::path::Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data).and_then(|_| f.write_all(b"\n")).and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
