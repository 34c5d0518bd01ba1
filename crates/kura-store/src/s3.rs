//! S3-compatible object storage (AWS S3, Ceph RGW, MinIO, Garage, ...) through Apache OpenDAL:
//! a repository at `s3://BUCKET/PREFIX`, laid out exactly like a local one below the prefix.
//!
//! Correctness never rests on a conditional write: some servers accept `If-None-Match: *` and
//! overwrite anyway. Content-addressed objects are written unconditionally (a second write of a
//! name carries the same bytes); the few others (config, sessions, protection marks) are
//! checked with a HEAD first and written with `If-None-Match`, which is as good as the server
//! makes it.

use crate::blocks::{Block, Blocks, FetchBlock};
use crate::s3lock::{BucketFeatures, Raw, Retention};
use crate::{Kind, Listed, ObjectName, Staged, Store, StoreError, Verb, check_name};
use opendal::{ErrorKind, Operator};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where and how to reach the bucket. Built from the location and the usual AWS environment.
#[derive(Clone, Default)]
pub struct S3Options {
    /// Endpoint URL (`http://127.0.0.1:9000`); empty: AWS.
    pub endpoint: String,
    /// Region (`us-east-1` when none is given: most other servers ignore it).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Virtual-host-style addressing (`BUCKET.endpoint`) instead of path style.
    pub virtual_host: bool,
    /// Retries of a failed request (with exponential backoff), after the first attempt.
    pub retries: usize,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Longest wait for the next bytes of an answer (a server that stalls).
    pub io_timeout: Duration,
}

impl std::fmt::Debug for S3Options {
    // The secret never reaches a log or a message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("virtual_host", &self.virtual_host)
            .finish_non_exhaustive()
    }
}

impl S3Options {
    /// Reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`
    /// (or `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) and
    /// `KURA_S3_VIRTUAL_HOST=1`.
    pub fn from_env() -> S3Options {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        S3Options {
            endpoint: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")).unwrap_or_default(),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into()),
            access_key_id: var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
            session_token: var("AWS_SESSION_TOKEN"),
            virtual_host: var("KURA_S3_VIRTUAL_HOST").is_some_and(|v| v == "1"),
            retries: 6,
            timeout: Duration::from_secs(120),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// The useful part of an OpenDAL error: the S3 error code and message when the server answered,
/// else the innermost cause (connection refused, timed out).
fn describe(e: &opendal::Error) -> String {
    let msg = e.message();
    let field = |name: &str| {
        let start = msg.find(&format!("{name}: \""))? + name.len() + 3;
        let len = msg[start..].find('"')?;
        Some(msg[start..start + len].to_string()).filter(|v| !v.is_empty())
    };
    if let Some(code) = field("code") {
        return match field("message") {
            Some(m) => format!("the server answered {code}: {m}"),
            None => format!("the server answered {code}"),
        };
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let root = cause.to_string();
    if root == msg || msg.contains(&root) { msg.to_string() } else { format!("{msg}: {root}") }
}

/// True for `s3://` locations.
pub fn is_s3(location: &str) -> bool {
    location.starts_with("s3://")
}

/// Packs are read in blocks of this size: object stores answer each request slowly (tens of
/// milliseconds on AWS) but stream fast.
const S3_BLOCK: u64 = 8 << 20;

/// Objects larger than this go up in parts, several at once.
const MULTIPART_ABOVE: usize = 8 << 20;

/// A repository in an S3 bucket.
pub struct S3Store(std::sync::Arc<Inner>, std::sync::Arc<Blocks>);

struct Inner {
    rt: tokio::runtime::Runtime,
    op: Operator,
    /// Signed requests for what OpenDAL lacks (Object Lock).
    raw: Raw,
    features: BucketFeatures,
    display: String,
    stats: Stats,
}

/// Requests made and bytes moved (object stores bill by them); printed to stderr when the
/// store is dropped if `KURA_S3_STATS` is set.
#[derive(Default)]
struct Stats {
    put: AtomicU64,
    put_bytes: AtomicU64,
    get: AtomicU64,
    get_bytes: AtomicU64,
    list: AtomicU64,
    head: AtomicU64,
    delete: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::env::var_os("KURA_S3_STATS").is_some() {
            let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let st = &self.stats;
            eprintln!(
                "s3 requests: {} PUT ({} bytes), {} GET ({} bytes), {} LIST, {} HEAD, {} DELETE",
                l(&st.put), l(&st.put_bytes), l(&st.get), l(&st.get_bytes), l(&st.list), l(&st.head), l(&st.delete)
            );
        }
    }
}

impl S3Store {
    /// Connects to `s3://BUCKET/PREFIX` and checks that the bucket answers.
    fn connect(location: &str, opts: &S3Options) -> Result<S3Store, StoreError> {
        let bad = |m: &str| StoreError::BadLocation(format!("{location}: {m} (expected s3://BUCKET/PREFIX)"));
        let rest = location.strip_prefix("s3://").ok_or_else(|| bad("not an s3:// location"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad("the prefix may not contain . or .."));
        }
        if opts.access_key_id.is_empty() || opts.secret_access_key.is_empty() {
            return Err(StoreError::BadLocation(format!(
                "{location}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )));
        }
        // OpenDAL's process-wide HTTP transport (reqwest) over kura's rustls provider; both
        // calls are idempotent.
        crate::remote::install_crypto_provider();
        opendal::install_default();
        // OpenDAL's S3 service lists and deletes versions when asked (Object Lock upkeep).
        let build = |checksum: &str| {
            let mut b = opendal::services::S3::default()
                .bucket(bucket)
                .root(&format!("/{prefix}"))
                .region(&opts.region)
                .access_key_id(&opts.access_key_id)
                .secret_access_key(&opts.secret_access_key)
                // Never wander off to instance metadata or ~/.aws for other credentials.
                .disable_config_load()
                .disable_ec2_metadata()
                // The server checks each upload's bytes (a body damaged on the way is refused).
                // Buckets with Object Lock take no upload without one, and some servers know
                // only Content-MD5 then.
                .checksum_algorithm(checksum);
            if !opts.endpoint.is_empty() {
                b = b.endpoint(&opts.endpoint);
            }
            if let Some(t) = &opts.session_token {
                b = b.session_token(t);
            }
            if opts.virtual_host {
                b = b.enable_virtual_host_style();
            }
            Ok::<_, StoreError>(
                Operator::new(b)
                    .map_err(|e| StoreError::BadLocation(format!("{location}: {e}")))?
                    .layer(opendal::layers::TimeoutLayer::new().with_timeout(opts.timeout).with_io_timeout(opts.io_timeout))
                    .layer(opendal::layers::RetryLayer::new().with_max_times(opts.retries).with_jitter()),
            )
        };
        let raw = Raw::new(opts, bucket, prefix)
            .map_err(|e| StoreError::BadLocation(format!("{location}: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kura-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io { verb: Verb::Open, target: location.into(), source: e })?;
        let display = location.trim_end_matches('/').to_string();
        let mut s = Inner { rt, op: build("crc32c")?, raw, features: BucketFeatures::default(), display, stats: Stats::default() };
        // One listing: a missing bucket, wrong credentials or an unreachable server show here,
        // before any work.
        let probe = s.rt.block_on(async { s.op.list_with("/").limit(1).await });
        match probe {
            Ok(_) => {}
            // Servers differ in how they say it; the S3 error code is the same everywhere.
            Err(e) if e.kind() == ErrorKind::NotFound || e.to_string().contains("NoSuchBucket") => {
                return Err(StoreError::NoStore(format!("{} (bucket {bucket:?} does not exist)", s.display)));
            }
            Err(e) => return Err(s.err(Verb::Open, &s.display.clone(), e)),
        }
        // Object Lock decides how deletes work, so it is asked every time, not remembered.
        s.features = s
            .rt
            .block_on(s.raw.features())
            .map_err(|detail| StoreError::Network { verb: Verb::Open, target: format!("{} (bucket settings)", s.display), detail })?;
        if s.features.lock.is_some() || s.features.lock_without_default {
            s.op = build("md5")?;
        }
        Ok(S3Store(std::sync::Arc::new(s), std::sync::Arc::new(Blocks::new(S3_BLOCK))))
    }

    /// Opens an existing repository.
    pub fn open(location: &str, opts: &S3Options) -> Result<S3Store, StoreError> {
        let s = Self::connect(location, opts)?;
        match s.0.head("config") {
            Ok(_) => Ok(s),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StoreError::NoStore(s.0.display.clone())),
            Err(e) => Err(s.0.err(Verb::Open, &s.0.display.clone(), e)),
        }
    }

    /// The bucket's versioning and Object Lock settings, as it answered at open.
    pub fn features(&self) -> &BucketFeatures {
        &self.0.features
    }

    /// Connects whether or not the prefix holds a repository yet (`kura serve` hosting one,
    /// which its first client initialises).
    pub fn attach(location: &str, opts: &S3Options) -> Result<S3Store, StoreError> {
        Self::connect(location, opts)
    }

    /// Prepares a new repository; refuses a prefix that already holds one.
    pub fn create(location: &str, opts: &S3Options) -> Result<S3Store, StoreError> {
        let s = Self::connect(location, opts)?;
        match s.0.head("config") {
            Ok(_) => Err(StoreError::Exists(ObjectName::new(Kind::Config, "config"))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(s),
            Err(e) => Err(s.0.err(Verb::Open, &s.0.display.clone(), e)),
        }
    }

    /// Finds out whether the server honours `If-None-Match: *` (some accept it and overwrite
    /// anyway), by creating one probe object twice, and records the answer with the bucket's
    /// versioning and Object Lock settings in `store.json` beside the repository
    /// (informational: kura never relies on the first, and asks for the others at each open).
    /// Returns the answer.
    pub fn probe(&self) -> Result<bool, StoreError> {
        let inner = &self.0;
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| StoreError::Io { verb: Verb::Write, target: "probe name".into(), source: std::io::Error::other(e.to_string()) })?;
        let probe = format!("probe-{}", hex::encode(raw));
        let put = |body: &'static [u8]| inner.rt.block_on(async { inner.op.write_with(&probe, body).if_not_exists(true).await.map(|_| ()) });
        put(b"1").map_err(|e| inner.err(Verb::Write, &format!("{}/{probe}", inner.display), e))?;
        let honoured = match put(b"2") {
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => true,
            Ok(()) => false,
            Err(e) => return Err(inner.err(Verb::Write, &format!("{}/{probe}", inner.display), e)),
        };
        let _ = inner.rt.block_on(inner.op.delete(&probe));
        let f = &inner.features;
        let record = serde_json::json!({
            "version": 1,
            "probed": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "conditional_create": honoured,
            "versioning": f.versioning,
            "object_lock": f.lock.map(|l| serde_json::json!({"mode": l.mode.as_str(), "days": l.period.as_secs() / 86_400})),
        })
        .to_string();
        inner
            .rt
            .block_on(async { inner.op.write("store.json", record.into_bytes()).await.map(|_| ()) })
            .map_err(|e| inner.err(Verb::Write, &format!("{}/store.json", inner.display), e))?;
        Ok(honoured)
    }
}

impl Inner {
    fn path(kind: Kind, name: &str) -> Result<String, StoreError> {
        if kind == Kind::Config {
            return if name == "config" { Ok("config".into()) } else { Err(StoreError::InvalidName(name.into())) };
        }
        check_name(name)?;
        Ok(match kind {
            // As on disk: 256 directories, so a listing can be split.
            Kind::Pack => format!("{}/{}/{name}", kind.dir(), name.get(..2).unwrap_or("00")),
            _ => format!("{}/{name}", kind.dir()),
        })
    }

    fn target(&self, kind: Kind, name: &str) -> String {
        format!("{}/{}", self.display, ObjectName::new(kind, name))
    }

    /// One line for an OpenDAL error: what was done, to what, and the server's reason.
    fn err(&self, verb: Verb, target: &str, e: opendal::Error) -> StoreError {
        let detail = describe(&e);
        match e.kind() {
            ErrorKind::PermissionDenied => StoreError::Denied { verb, target: target.into(), reason: format!("{detail}; check the S3 credentials and the bucket policy") },
            ErrorKind::ConfigInvalid => StoreError::BadLocation(format!("{target}: {detail}")),
            _ if e.is_temporary() || e.kind() == ErrorKind::RateLimited => {
                StoreError::Network { verb, target: target.into(), detail: format!("{detail} (after retries)") }
            }
            // A permanent refusal (invalid bucket name, unsupported request): retrying is no use.
            _ if detail.starts_with("the server answered") => StoreError::Backend { verb, target: target.into(), detail },
            _ => StoreError::Network { verb, target: target.into(), detail },
        }
    }

    fn obj_err(&self, verb: Verb, kind: Kind, name: &str, e: opendal::Error) -> StoreError {
        if e.kind() == ErrorKind::NotFound {
            return StoreError::NotFound(ObjectName::new(kind, name));
        }
        self.err(verb, &self.target(kind, name), e)
    }

    /// Runs a request to completion on the runtime's own threads and waits once for the
    /// result. (`block_on` would poll it on this thread, which every arriving piece of a large
    /// body then wakes: tens of thousands of context switches per restore.)
    fn run<T: Send + 'static>(&self, f: impl std::future::Future<Output = opendal::Result<T>> + Send + 'static) -> opendal::Result<T> {
        match self.rt.block_on(self.rt.spawn(f)) {
            Ok(r) => r,
            Err(e) => Err(opendal::Error::new(ErrorKind::Unexpected, format!("request task failed: {e}"))),
        }
    }

    /// Reads a range (to its end, or the object's), as one contiguous buffer.
    fn read_range(&self, path: &str, range: std::ops::Range<u64>) -> opendal::Result<Vec<u8>> {
        let (op, path) = (self.op.clone(), path.to_string());
        self.run(async move { op.read_with(&path).range(range).await.map(|b| b.to_vec()) })
    }

    fn head(&self, path: &str) -> opendal::Result<opendal::Metadata> {
        Stats::add(&self.stats.head, 1);
        self.rt.block_on(self.op.stat(path))
    }

    fn write(&self, kind: Kind, name: &str, data: Vec<u8>, create_only: bool) -> Result<(), StoreError> {
        let path = Self::path(kind, name)?;
        let len = data.len();
        Stats::add(&self.stats.put, 1);
        Stats::add(&self.stats.put_bytes, len as u64);
        let op = self.op.clone();
        let r = self.run(async move {
            if len > MULTIPART_ABOVE {
                // Parts in flight at once: bounded memory, full bandwidth.
                let mut w = op.writer_with(&path).chunk(MULTIPART_ABOVE).concurrent(4).await?;
                w.write(data).await?;
                w.close().await.map(|_| ())
            } else {
                op.write_with(&path, data).if_not_exists(create_only).await.map(|_| ())
            }
        });
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Err(StoreError::Exists(ObjectName::new(kind, name))),
            Err(e) => Err(self.err(Verb::Write, &self.target(kind, name), e)),
        }
    }
}

/// The operations, behind [`S3Store`]'s `Store` implementation.
impl Inner {
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if kind.content_addressed() {
            // Same name, same bytes: rewriting is harmless, and needs no HEAD first.
            return self.write(kind, name, data.to_vec(), false);
        }
        let path = Self::path(kind, name)?;
        match self.head(&path) {
            Ok(_) => return Err(StoreError::Exists(ObjectName::new(kind, name))),
            // Servers differ in how they say it; the S3 error code is the same everywhere.
            Err(e) if e.kind() == ErrorKind::NotFound || e.to_string().contains("NoSuchBucket") => {}
            Err(e) => return Err(self.obj_err(Verb::Write, kind, name, e)),
        }
        self.write(kind, name, data.to_vec(), true)
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = Self::path(kind, name)?;
        Stats::add(&self.stats.get, 1);
        let (op, p) = (self.op.clone(), path.clone());
        let b = self.run(async move { op.read(&p).await.map(|b| b.to_vec()) }).map_err(|e| self.obj_err(Verb::Read, kind, name, e))?;
        Stats::add(&self.stats.get_bytes, b.len() as u64);
        Ok(b)
    }

    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let path = Self::path(kind, name)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.checked_add(len).ok_or_else(|| StoreError::InvalidName(format!("{name}: range overflows")))?;
        Stats::add(&self.stats.get, 1);
        let got = self.read_range(&path, offset..end);
        if let Ok(b) = &got {
            Stats::add(&self.stats.get_bytes, b.len() as u64);
        }
        let short = |have: u64| StoreError::Short { name: ObjectName::new(kind, name), offset, end, len: have };
        match got {
            Ok(b) if b.len() as u64 == len => Ok(b),
            Ok(_) | Err(_) => {
                // A range past the end (416, or fewer bytes): say how long the object is.
                match self.head(&path) {
                    Ok(m) if m.content_length() < end => Err(short(m.content_length())),
                    Ok(_) => match got {
                        Err(e) => Err(self.obj_err(Verb::Read, kind, name, e)),
                        Ok(b) => Err(short(offset + b.len() as u64)),
                    },
                    Err(e) => Err(self.obj_err(Verb::Read, kind, name, e)),
                }
            }
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<Listed>, StoreError> {
        if kind == Kind::Config {
            return match self.head("config") {
                Ok(m) => Ok(vec![Listed { name: "config".into(), size: m.content_length(), modified: m.last_modified().map(Into::into) }]),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(self.err(Verb::List, &format!("{}/config", self.display), e)),
            };
        }
        let dir = format!("{}/", kind.dir());
        Stats::add(&self.stats.list, 1);
        let entries = self
            .rt
            .block_on(async { self.op.list_with(&dir).recursive(true).await })
            .map_err(|e| if e.kind() == ErrorKind::NotFound { None } else { Some(self.err(Verb::List, &format!("{}/{dir}", self.display), e)) });
        let entries = match entries {
            Ok(v) => v,
            Err(None) => return Ok(Vec::new()),
            Err(Some(e)) => return Err(e),
        };
        Ok(entries
            .into_iter()
            .filter(|e| e.metadata().is_file())
            .filter(|e| check_name(e.name()).is_ok())
            .map(|e| Listed {
                name: e.name().to_string(),
                size: e.metadata().content_length(),
                modified: e.metadata().last_modified().map(Into::into),
            })
            .collect())
    }


    fn replace(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if kind != Kind::Session {
            return Err(StoreError::InvalidName(format!("{name}: only sessions are replaced")));
        }
        self.write(kind, name, data.to_vec(), false)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let path = Self::path(kind, name)?;
        if self.features.lock.is_some() && guarded(kind) {
            let obj = ObjectName::new(kind, name);
            Stats::add(&self.stats.head, 1);
            if let Some(r) = self.rt.block_on(self.raw.retention(&path, &obj))?
                && r.until > std::time::SystemTime::now()
            {
                return Err(StoreError::Locked { name: obj, until: r.until });
            }
            // Its lock has ended: every version goes, so the bytes are really freed (a plain
            // delete would only hide them behind a delete marker).
            return self.delete_versions(kind, name, &path);
        }
        // S3 answers a delete of a missing key with success; the contract says NotFound.
        self.head(&path).map_err(|e| self.obj_err(Verb::Delete, kind, name, e))?;
        Stats::add(&self.stats.delete, 1);
        self.rt.block_on(self.op.delete(&path)).map_err(|e| self.obj_err(Verb::Delete, kind, name, e))
    }

}

/// Kinds without which a generation cannot be restored (its snapshot, its packs, the key files
/// and config that decrypt them): on a locked bucket they are deleted only once their retention
/// has ended. The others (index files, which a repair rebuilds from packs, and bookkeeping:
/// sessions, plans, lineage, trash records, receipts, protection marks) are hidden by a delete
/// marker at once; their old versions go once unlocked.
fn guarded(kind: Kind) -> bool {
    matches!(kind, Kind::Pack | Kind::Snapshot | Kind::Key | Kind::Config)
}

impl Inner {
    /// Deletes every version of one object for good.
    fn delete_versions(&self, kind: Kind, name: &str, path: &str) -> Result<(), StoreError> {
        Stats::add(&self.stats.list, 1);
        let versions = self
            .rt
            .block_on(async { self.op.list_with(path).versions(true).deleted(true).await })
            .map_err(|e| self.obj_err(Verb::Delete, kind, name, e))?;
        let mut versions: Vec<(bool, String)> = versions
            .iter()
            .filter(|e| e.path() == path)
            .filter_map(|e| Some((e.metadata().is_current() != Some(false), e.metadata().version()?.to_string())))
            .collect();
        if versions.is_empty() {
            return Err(StoreError::NotFound(ObjectName::new(kind, name)));
        }
        // The current version last: should an older one be refused, the object stays whole.
        versions.sort_by_key(|(current, _)| *current);
        for (_, v) in versions {
            Stats::add(&self.stats.delete, 1);
            match self.rt.block_on(async { self.op.delete_with(path).version(&v).await }) {
                Ok(()) => {}
                // Its lock ended (checked before), so a refusal is a version locked longer, or
                // credentials without the permission: the store has the last word.
                Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                    return Err(StoreError::Denied {
                        verb: Verb::Delete,
                        target: format!("{} (version {v})", self.target(kind, name)),
                        reason: "a version is locked longer than the current one, or the credentials lack s3:DeleteObjectVersion".into(),
                    });
                }
                Err(e) => return Err(self.obj_err(Verb::Delete, kind, name, e)),
            }
        }
        Ok(())
    }

    fn keep_locked(&self, kind: Kind, until: &[(String, std::time::SystemTime)]) -> Result<u64, StoreError> {
        let Some(default) = self.features.lock else { return Ok(0) };
        use futures_util::StreamExt;
        let one = |name: String, want: std::time::SystemTime| async move {
            let path = Self::path(kind, &name)?;
            let obj = ObjectName::new(kind, &name);
            Stats::add(&self.stats.head, 1);
            let now = self.raw.retention(&path, &obj).await?;
            if now.is_some_and(|r| r.until >= want) {
                return Ok(0);
            }
            let mode = now.map_or(default.mode, |r| r.mode);
            Stats::add(&self.stats.put, 1);
            self.raw.set_retention(&path, &obj, Retention { mode, until: want }).await?;
            Ok::<u64, StoreError>(1)
        };
        self.rt.block_on(async {
            let mut done = futures_util::stream::iter(until.iter().cloned().map(|(n, t)| one(n, t))).buffer_unordered(16);
            let mut extended = 0;
            while let Some(r) = done.next().await {
                match r {
                    Ok(n) => extended += n,
                    // Gone meanwhile (a concurrent prune): nothing to keep.
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(extended)
        })
    }

    fn purge_versions(&self) -> Result<crate::LockUpkeep, StoreError> {
        let mut up = crate::LockUpkeep::default();
        if self.features.lock.is_none() {
            return Ok(up);
        }
        Stats::add(&self.stats.list, 1);
        let all = self
            .rt
            .block_on(async { self.op.list_with("/").recursive(true).versions(true).deleted(true).await })
            .map_err(|e| self.err(Verb::List, &self.display, e))?;
        // Only kura's own objects: the prefix may be a whole bucket shared with other data.
        let ours = |path: &str| {
            matches!(path, "config" | "store.json")
                || path.starts_with("probe-")
                || Kind::ALL.iter().any(|k| k.dir() != "" && path.strip_prefix(k.dir()).is_some_and(|r| r.starts_with('/')))
        };
        let mut by_path: std::collections::BTreeMap<String, Vec<opendal::Entry>> = std::collections::BTreeMap::new();
        for e in all.into_iter().filter(|e| e.metadata().version().is_some() && ours(e.path())) {
            by_path.entry(e.path().to_string()).or_default().push(e);
        }
        for (path, versions) in by_path {
            let mut left = 0;
            let mut current_marker = None;
            for e in &versions {
                let m = e.metadata();
                let Some(v) = m.version() else { continue };
                if m.is_current() != Some(false) {
                    if m.is_deleted() {
                        current_marker = Some(v.to_string());
                    }
                    continue;
                }
                Stats::add(&self.stats.delete, 1);
                match self.rt.block_on(async { self.op.delete_with(&path).version(v).await }) {
                    Ok(()) if !m.is_deleted() => {
                        up.versions_deleted += 1;
                        up.version_bytes += m.content_length();
                    }
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                        up.versions_locked += 1;
                        left += 1;
                    }
                    Err(e) => return Err(self.err(Verb::Delete, &format!("{}/{path}", self.display), e)),
                }
            }
            // A delete marker over nothing: the object is gone for good, so is the marker.
            if let (Some(v), 0) = (current_marker, left) {
                Stats::add(&self.stats.delete, 1);
                self.rt
                    .block_on(async { self.op.delete_with(&path).version(&v).await })
                    .map_err(|e| self.err(Verb::Delete, &format!("{}/{path}", self.display), e))?;
            }
        }
        Ok(up)
    }
}

impl Store for S3Store {
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.0.put_new(kind, name, data)
    }
    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        self.0.get(kind, name)
    }
    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        if kind == Kind::Pack && self.1.covers(len) {
            let src: std::sync::Arc<dyn FetchBlock> = self.0.clone();
            return self.1.get_range(&src, name, offset, len);
        }
        self.0.get_range(kind, name, offset, len)
    }
    fn list(&self, kind: Kind) -> Result<Vec<Listed>, StoreError> {
        self.0.list(kind)
    }
    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        let path = Inner::path(kind, name)?;
        self.0.head(&path).map(|m| m.content_length()).map_err(|e| self.0.obj_err(Verb::Read, kind, name, e))
    }
    fn stage(&self, kind: Kind) -> Result<Box<dyn Staged>, StoreError> {
        // One PUT (or multipart upload) at commit.
        let store = self.0.clone();
        Ok(Box::new(crate::MemStaged::new(move |name: &str, buf: Vec<u8>| store.write(kind, name, buf, !kind.content_addressed()))))
    }
    fn replace(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.0.replace(kind, name, data)
    }
    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        self.0.delete(kind, name)
    }
    fn location(&self) -> String {
        self.0.display.clone()
    }
    fn is_remote(&self) -> bool {
        true
    }
    fn prefetch(&self, name: &str, offset: u64, len: u64) -> bool {
        let src: std::sync::Arc<dyn FetchBlock> = self.0.clone();
        self.1.prefetch(&src, name, offset, len)
    }
    fn locked_until(&self, kind: Kind, name: &str) -> Result<Option<std::time::SystemTime>, StoreError> {
        if self.0.features.lock.is_none() || !guarded(kind) {
            return Ok(None);
        }
        let path = Inner::path(kind, name)?;
        Stats::add(&self.0.stats.head, 1);
        let r = self.0.rt.block_on(self.0.raw.retention(&path, &ObjectName::new(kind, name)))?;
        Ok(r.map(|r| r.until).filter(|u| *u > std::time::SystemTime::now()))
    }
    fn lock_period(&self) -> Option<Duration> {
        self.0.features.lock.map(|l| l.period)
    }
    fn keep_locked(&self, kind: Kind, until: &[(String, std::time::SystemTime)]) -> Result<u64, StoreError> {
        self.0.keep_locked(kind, until)
    }
    fn purge_versions(&self) -> Result<crate::LockUpkeep, StoreError> {
        self.0.purge_versions()
    }
}

impl FetchBlock for Inner {
    fn fetch_block(&self, pack: &str, offset: u64, len: u64) -> Result<Block, StoreError> {
        // A block may end past the pack: the bytes up to its end, as HTTP ranges have it, in
        // one request, kept in the pieces it arrived in.
        let path = Self::path(Kind::Pack, pack)?;
        Stats::add(&self.stats.get, 1);
        let (op, p) = (self.op.clone(), path.clone());
        let range = offset..offset.saturating_add(len);
        match self.run(async move { op.read_with(&p).range(range).await.map(Block::from_parts) }) {
            Ok(b) if b.len() > 0 => {
                Stats::add(&self.stats.get_bytes, b.len() as u64);
                Ok(b)
            }
            // Nothing there (a read-ahead past the pack's end), a block reaching past the end
            // (OpenDAL then reports too little data) or a failure: the object's length says
            // which, and what can be read.
            _ => match self.head(&path) {
                Ok(m) if offset >= m.content_length() => Err(StoreError::Short {
                    name: ObjectName::new(Kind::Pack, pack),
                    offset,
                    end: offset.saturating_add(len),
                    len: m.content_length(),
                }),
                Ok(m) => self.get_range(Kind::Pack, pack, offset, len.min(m.content_length() - offset)).map(Block::from),
                Err(e) => Err(self.obj_err(Verb::Read, Kind::Pack, pack, e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_laid_out_as_on_disk() {
        assert_eq!(Inner::path(Kind::Pack, "abcd").unwrap(), "data/ab/abcd");
        assert_eq!(Inner::path(Kind::Snapshot, "ef01").unwrap(), "snapshots/ef01");
        assert_eq!(Inner::path(Kind::Config, "config").unwrap(), "config");
        for bad in ["../x", "a/b", ".tmp", ""] {
            assert!(Inner::path(Kind::Index, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_locations_and_missing_credentials_are_named() {
        let opts = S3Options { access_key_id: "a".into(), secret_access_key: "b".into(), ..S3Options::default() };
        for (loc, want) in [("s3://", "no bucket"), ("s3://b/../x", "may not contain"), ("file:///x", "not an s3://")] {
            let e = S3Store::connect(loc, &opts).err().unwrap().to_string();
            assert!(e.contains(want), "{loc}: {e}");
        }
        let e = S3Store::connect("s3://b/p", &S3Options::default()).err().unwrap().to_string();
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
        assert!(!format!("{:?}", S3Options { secret_access_key: "hunter2".into(), ..S3Options::default() }).contains("hunter2"));
    }
}
