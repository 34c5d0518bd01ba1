//! The HTTP API (`/v1/<repo>/<kind>/<name>`): authenticates every request by token, enforces
//! what each role may do, checks uploads against their content-addressed names, and records the
//! server's receive time of every snapshot.

use crate::config::ResolvedLimits;
use crate::jobs::{JobStatus, RepoJobs};
use crate::tokens::{Role, TokenEntry, Tokens};
use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use kura_repo::receipt::Receipt;
use kura_store::remote::{RepoInfo, WireListed};
use kura_store::{Kind, LocalStore, Store, StoreError};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

/// A refusal or failure, sent as a status and a one-line plain-text reason.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

pub(crate) fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Exists(_) => StatusCode::CONFLICT,
            StoreError::InvalidName(_) => StatusCode::BAD_REQUEST,
            StoreError::Short { len, .. } => return err(StatusCode::RANGE_NOT_SATISFIABLE, len.to_string()),
            // The time in a form the client reads back (FORMAT.md §14).
            StoreError::Locked { until, .. } => {
                let secs = until.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                return err(StatusCode::LOCKED, format!("{e} (unix {secs})"));
            }
            e if e.is_full() => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR || status == StatusCode::INSUFFICIENT_STORAGE {
            tracing::error!(error = %e, "storage failure");
        }
        err(status, e.to_string())
    }
}

/// Where a hosted repository's objects are.
pub enum Storage {
    /// A directory: whole objects are streamed from their files.
    Local(Arc<LocalStore>),
    /// Any other store (an S3 bucket): read through the [`Store`] calls.
    Other(Arc<dyn Store>),
}

/// A hosted repository.
pub struct Hosted {
    /// Its name in URLs.
    pub name: String,
    /// Its storage, through the common interface.
    pub store: Arc<dyn Store>,
    /// The same, when it is a directory.
    pub local: Option<Arc<LocalStore>>,
    /// Which token created each session object, so only it (or an admin) replaces or deletes
    /// it; kept in `owners_path` across restarts.
    owners: Mutex<HashMap<String, String>>,
    owners_path: PathBuf,
    /// Serialises the moves of snapshots into and out of the trash.
    snapshot_lock: Mutex<()>,
    /// Its scheduled jobs and their status.
    pub jobs: RepoJobs,
}

impl Hosted {
    /// A state file of this repository's beside its session owners (`<state_dir>/<what>-<name>`).
    pub fn state_file(&self, what: &str) -> PathBuf {
        self.owners_path.with_file_name(format!("{what}-{}", self.name))
    }

    /// Hosts a repository stored in `store`; session owners are kept in `owners_path`.
    pub fn new(name: String, storage: Storage, jobs: RepoJobs, owners_path: PathBuf) -> Self {
        let (store, local): (Arc<dyn Store>, _) = match storage {
            Storage::Local(l) => (l.clone(), Some(l)),
            Storage::Other(s) => (s, None),
        };
        // Owners of sessions that are gone are dropped as the file is read.
        let owners: HashMap<String, String> = std::fs::read(&owners_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let live: std::collections::HashSet<String> =
            store.list(Kind::Session).map(|l| l.into_iter().map(|l| l.name).collect()).unwrap_or_default();
        let owners = owners.into_iter().filter(|(n, _)| live.contains(n)).collect();
        Hosted { name, store, local, owners: Mutex::new(owners), owners_path, snapshot_lock: Mutex::new(()), jobs }
    }

    /// Writes the owner list (temporary file, rename); a failure is logged, and costs only
    /// that a restarted server treats those sessions as an admin's.
    fn save_owners(&self, owners: &HashMap<String, String>) {
        let tmp = self.owners_path.with_extension("tmp");
        let r = serde_json::to_vec(owners)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &self.owners_path));
        if let Err(e) = r {
            tracing::error!(path = %self.owners_path.display(), error = %e, "cannot record session owners");
        }
    }
}

/// Failed token checks of one client address.
struct Bucket {
    left: f64,
    last: Instant,
    suppressed: u64,
    last_report: Instant,
}

/// Everything the handlers share.
pub struct AppState {
    /// Hosted repositories by name.
    pub repos: HashMap<String, Arc<Hosted>>,
    tokens: RwLock<Tokens>,
    tokens_path: PathBuf,
    /// When the token file was last looked at, and its mtime then.
    tokens_seen: Mutex<(Instant, Option<SystemTime>)>,
    /// Limits.
    pub limits: ResolvedLimits,
    /// Upload memory in KiB.
    upload_memory: Semaphore,
    upload_permits: u32,
    failures: Mutex<HashMap<IpAddr, Bucket>>,
    /// Counters for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Shadow streams received, by name.
    pub streams: HashMap<String, Arc<kura_shadow::Stream>>,
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl AppState {
    /// State for hosting `repos` with the tokens of `tokens_path`.
    pub fn new(repos: Vec<Hosted>, tokens_path: PathBuf, limits: ResolvedLimits) -> Result<Self, crate::ServerError> {
        let tokens = Tokens::load(&tokens_path)?;
        let permits = u32::try_from(limits.max_upload_memory / 1024).unwrap_or(u32::MAX).max(1);
        Ok(AppState {
            repos: repos.into_iter().map(|h| (h.name.clone(), Arc::new(h))).collect(),
            tokens_seen: Mutex::new((Instant::now(), mtime(&tokens_path))),
            tokens: RwLock::new(tokens),
            tokens_path,
            limits,
            upload_memory: Semaphore::new(permits as usize),
            upload_permits: permits,
            failures: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            streams: HashMap::new(),
        })
    }

    /// Re-reads the token file when it changed (`kura serve token add/revoke` while running);
    /// looked at most once a second.
    fn refresh_tokens(&self) {
        let Ok(mut seen) = self.tokens_seen.lock() else { return };
        if seen.0.elapsed() < Duration::from_secs(1) {
            return;
        }
        seen.0 = Instant::now();
        let now = mtime(&self.tokens_path);
        if now == seen.1 {
            return;
        }
        match Tokens::load(&self.tokens_path) {
            Ok(t) => {
                if let Ok(mut w) = self.tokens.write() {
                    *w = t;
                }
                seen.1 = now;
                tracing::info!(path = %self.tokens_path.display(), "token list reloaded");
            }
            Err(e) => tracing::error!(error = %e, "token list not reloaded"),
        }
    }

    /// Counts a failed token check from `ip`; true when the address is over its budget.
    fn throttled(&self, ip: IpAddr) -> bool {
        let Ok(mut map) = self.failures.lock() else { return true };
        // Bounded: many addresses (IPv6) only reset everyone's budget.
        if map.len() >= 100_000 {
            map.clear();
        }
        let burst = f64::from(self.limits.auth_failures_burst);
        let b = map.entry(ip).or_insert_with(|| Bucket {
            left: burst,
            last: Instant::now(),
            suppressed: 0,
            last_report: Instant::now(),
        });
        b.left = (b.left + b.last.elapsed().as_secs_f64()).min(burst);
        b.last = Instant::now();
        if b.left >= 1.0 {
            b.left -= 1.0;
            tracing::warn!(client = %ip, "request with an unknown or revoked token refused");
            return false;
        }
        b.suppressed += 1;
        if b.last_report.elapsed() >= Duration::from_secs(10) || b.suppressed == 1 {
            tracing::warn!(client = %ip, refused = b.suppressed, "too many bad tokens from this address; throttling it");
            b.last_report = Instant::now();
        }
        true
    }

    /// Finds the token of a request and the repository it asks for, or says why not.
    fn authorize(&self, headers: &HeaderMap, ip: IpAddr, repo: &str) -> Result<(TokenEntry, Arc<Hosted>), ApiError> {
        let entry = self.authenticate(headers, ip)?;
        // Refused before looked up: a token learns nothing of repositories it does not open.
        if !entry.opens(repo) || entry.role == Role::Shadow {
            return Err(err(StatusCode::FORBIDDEN, format!("token {} does not open repository {repo:?}", entry.id)));
        }
        let hosted = self.repos.get(repo).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("this server hosts no repository named {repo:?}")))?;
        Ok((entry, hosted.clone()))
    }

    /// Finds the token of a request, or says why not (throttling addresses that guess).
    pub fn authenticate(&self, headers: &HeaderMap, ip: IpAddr) -> Result<TokenEntry, ApiError> {
        self.refresh_tokens();
        let secret = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        let entry = self.tokens.read().ok().and_then(|t| t.lookup(secret).cloned());
        let Some(entry) = entry else {
            self.metrics.auth_failure();
            if self.throttled(ip) {
                return Err(err(StatusCode::TOO_MANY_REQUESTS, "too many requests with bad tokens from this address; wait"));
            }
            let why = if secret.is_empty() { "no token given (Authorization: Bearer)" } else { "unknown or revoked token" };
            return Err(err(StatusCode::UNAUTHORIZED, why));
        };
        Ok(entry)
    }
}

type Shared = State<Arc<AppState>>;
type Peer = ConnectInfo<SocketAddr>;

fn kind_of(segment: &str) -> Result<Kind, ApiError> {
    Kind::from_wire(segment).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no object kind {segment:?}")))
}

fn object_name(kind: Kind, name: &str) -> Result<(), ApiError> {
    kura_store::check_name(name).map_err(|_| err(StatusCode::BAD_REQUEST, format!("invalid object name {name:?}")))?;
    if kind == Kind::Config && name != "config" {
        return Err(err(StatusCode::BAD_REQUEST, "the config object is named config"));
    }
    Ok(())
}

/// Runs blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, format!("storage task failed: {e}")))?
        .map_err(ApiError::from)
}

/// `GET /v1/<repo>`: whether it is initialised and what the token may do.
pub async fn repo_info(State(s): Shared, ConnectInfo(peer): Peer, Path(repo): Path<String>, headers: HeaderMap) -> Result<Json<RepoInfo>, ApiError> {
    let (tok, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let store = hosted.store.clone();
    let initialised = blocking(move || match store.get(Kind::Config, "config") {
        Ok(_) => Ok(true),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    })
    .await?;
    Ok(Json(RepoInfo { name: repo, initialised, role: tok.role.name().into() }))
}

/// `GET /v1/<repo>/<kind>/`: names and sizes.
pub async fn list(State(s): Shared, ConnectInfo(peer): Peer, Path((repo, kind)): Path<(String, String)>, headers: HeaderMap) -> Result<Json<Vec<WireListed>>, ApiError> {
    let (_, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let kind = kind_of(&kind)?;
    let store = hosted.store.clone();
    let listed = blocking(move || store.list(kind)).await?;
    Ok(Json(listed.into_iter().map(|l| WireListed { name: l.name, size: l.size }).collect()))
}

/// Parses `bytes=A-B` (the only form kura sends) into offset and length.
fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    if b < a {
        return None;
    }
    Some((a, (b - a).checked_add(1)?))
}

/// Objects up to this size are answered from one read; larger ones are streamed.
const READ_WHOLE: u64 = 1 << 20;

/// A whole object of a directory store: its file, streamed.
async fn whole_file(local: &LocalStore, kind: Kind, name: &str) -> Result<(u64, Body), ApiError> {
    let path = local.object_path(kind, name)?;
    let n = name.to_string();
    let (file, len, small) = blocking(move || {
        let io_err = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(kura_store::ObjectName::new(kind, &n)),
            _ => StoreError::Io { verb: kura_store::Verb::Read, target: kura_store::ObjectName::new(kind, &n).to_string(), source: e },
        };
        let mut f = std::fs::File::open(&path).map_err(io_err)?;
        let len = f.metadata().map_err(io_err)?.len();
        if len <= READ_WHOLE {
            let mut buf = Vec::with_capacity(len as usize);
            std::io::Read::read_to_end(&mut f, &mut buf).map_err(io_err)?;
            return Ok((None, len, Some(buf)));
        }
        Ok((Some(f), len, None))
    })
    .await?;
    let body = match (file, small) {
        (_, Some(buf)) => Body::from(buf),
        (Some(f), None) => {
            // Read straight into each piece (no zeroing, no second buffer), in order: the
            // pieces come one after the other from the file's own position.
            let f = Arc::new(f);
            pieces_body(len, move |_, take| {
                let mut buf = Vec::with_capacity(take as usize);
                std::io::Read::read_to_end(&mut std::io::Read::take(&*f, take), &mut buf).map_err(|e| e.to_string())?;
                if buf.len() as u64 != take {
                    return Err(format!("the file ended {} bytes early", take - buf.len() as u64));
                }
                Ok(buf)
            })
        }
        (None, None) => Body::empty(),
    };
    Ok((len, body))
}

/// Pieces a large object is streamed in: each is one blocking read (a hand-off to the
/// blocking pool and back), so fewer, larger ones cost less; memory per answer stays bounded.
const PIECE: u64 = 4 << 20;

/// A body of `len` bytes in pieces of [`PIECE`] that `read(offset, length)` gives, on the
/// blocking pool, one after the other, as the client takes them. A failure ends the body
/// early: the client sees a short object and retries or fails.
fn pieces_body(len: u64, read: impl Fn(u64, u64) -> Result<Vec<u8>, String> + Send + Sync + 'static) -> Body {
    let read = Arc::new(read);
    let pieces = futures_util::stream::unfold(0u64, move |off| {
        let read = read.clone();
        async move {
            if off >= len {
                return None;
            }
            let take = PIECE.min(len - off);
            let piece = match tokio::task::spawn_blocking(move || read(off, take)).await {
                Ok(Ok(d)) => Ok(axum::body::Bytes::from(d)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.to_string()),
            };
            let piece = piece.map_err(|e| {
                tracing::error!(error = %e, "storage failure while streaming an object");
                std::io::Error::other(e)
            });
            let next = if piece.is_ok() { off + take } else { len };
            Some((piece, next))
        }
    });
    Body::from_stream(pieces)
}

/// A whole object of any other store (a bucket): its size first, then ranges of a few MiB
/// read one after the other as the client takes them.
async fn whole_object(store: Arc<dyn Store>, kind: Kind, name: String) -> Result<(u64, Body), ApiError> {
    let (st, n) = (store.clone(), name.clone());
    let len = blocking(move || st.size(kind, &n)).await?;
    if len <= READ_WHOLE {
        let data = blocking(move || store.get(kind, &name)).await?;
        return Ok((data.len() as u64, Body::from(data)));
    }
    Ok((len, pieces_body(len, move |off, take| store.get_range(kind, &name, off, take).map_err(|e| e.to_string()))))
}

/// `GET /v1/<repo>/<kind>/<name>`, whole (streamed from the file) or `Range: bytes=A-B` (at
/// most `max_object_size` bytes, answered with `Content-Range`).
pub async fn get_object(State(s): Shared, ConnectInfo(peer): Peer, Path((repo, kind, name)): Path<(String, String, String)>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (_, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let kind = kind_of(&kind)?;
    object_name(kind, &name)?;
    let store = hosted.store.clone();
    let Some(v) = headers.get(header::RANGE) else {
        // Small objects in one blocking call; large ones streamed, so memory stays bounded
        // however many clients read packs at once.
        let (len, body) = match hosted.local.clone() {
            Some(local) => whole_file(&local, kind, &name).await?,
            None => whole_object(store, kind, name.clone()).await?,
        };
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_LENGTH, len.to_string())], body).into_response());
    };
    let (off, len) = v
        .to_str()
        .ok()
        .and_then(parse_range)
        .ok_or_else(|| err(StatusCode::BAD_REQUEST, "only Range: bytes=A-B is supported"))?;
    if len > s.limits.max_object_size {
        return Err(err(StatusCode::BAD_REQUEST, "range longer than the largest object"));
    }
    // As HTTP has it: a range reaching past the end gets the bytes up to the end; only one
    // starting past the end is unsatisfiable.
    let n = name.clone();
    let (data, total) = blocking(move || match store.get_range(kind, &n, off, len) {
        Ok(d) => Ok((d, None)),
        Err(StoreError::Short { len: have, .. }) if off < have => Ok((store.get_range(kind, &n, off, have - off)?, Some(have))),
        Err(e) => Err(e),
    })
    .await?;
    let end = off + data.len() as u64;
    let total = total.map_or("*".to_string(), |t| t.to_string());
    let range = format!("bytes {off}-{}/{total}", end.saturating_sub(1));
    Ok((StatusCode::PARTIAL_CONTENT, [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_RANGE, range)], data).into_response())
}

/// Query of a PUT.
#[derive(Debug, Deserialize)]
pub struct PutQuery {
    /// `replace=1`: rewrite a session object (heartbeat); nothing else means replace.
    #[serde(default)]
    replace: Option<String>,
}

/// Whether `role` may create objects of `kind`.
fn may_write(role: Role, kind: Kind) -> Result<(), ApiError> {
    let ok = match kind {
        Kind::Receipt | Kind::Trash => false,
        Kind::Session => true,
        // A drill only reads; its record only adds a fact.
        Kind::Drill => matches!(role, Role::Read | Role::Backup | Role::Admin),
        Kind::Pack | Kind::Index | Kind::Snapshot => matches!(role, Role::Backup | Role::Admin),
        Kind::Config | Kind::Key | Kind::Plan | Kind::Protection | Kind::Lineage => role == Role::Admin,
    };
    if ok {
        return Ok(());
    }
    let what = if matches!(kind, Kind::Receipt | Kind::Trash) {
        format!("{} are written by the server only", kind.wire())
    } else {
        format!("a {} token cannot write {}", role.name(), kind.wire())
    };
    Err(err(StatusCode::FORBIDDEN, what))
}

/// The largest body of a small kind (sessions, config, keys, protection marks).
const SMALL_OBJECT: u64 = 1 << 20;

/// Reads an upload into memory within the size limit and the server's upload memory, cutting
/// off a client that stalls or trickles.
async fn read_upload<'a>(s: &'a AppState, kind: Kind, headers: &HeaderMap, body: Body) -> Result<(Vec<u8>, tokio::sync::SemaphorePermit<'a>), ApiError> {
    let max = match kind {
        Kind::Session | Kind::Config | Kind::Key | Kind::Protection | Kind::Drill => SMALL_OBJECT.min(s.limits.max_object_size),
        _ => s.limits.max_object_size,
    };
    let too_large = || err(StatusCode::PAYLOAD_TOO_LARGE, format!("object larger than this server accepts for {} ({max} bytes)", kind.wire()));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    // Memory is reserved for the whole object up front; a request that cannot get it soon is
    // told to come back (503 is retried by clients) instead of queueing without end.
    let kib = u32::try_from(declared.unwrap_or(max).div_ceil(1024).max(1)).unwrap_or(u32::MAX).min(s.upload_permits);
    let permit = tokio::time::timeout(s.limits.idle_timeout, s.upload_memory.acquire_many(kib))
        .await
        .map_err(|_| err(StatusCode::SERVICE_UNAVAILABLE, "the server's upload memory is in use; try again"))?
        .map_err(|_| err(StatusCode::SERVICE_UNAVAILABLE, "server shutting down"))?;
    // Besides the idle timeout, the whole upload must average 64 KiB/s after its first minute.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + declared.unwrap_or(max) / (64 << 10));
    let mut buf = Vec::with_capacity(usize::try_from(declared.unwrap_or(0)).unwrap_or(0));
    let mut stream = body.into_data_stream();
    loop {
        let wait = s.limits.idle_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Err(err(StatusCode::REQUEST_TIMEOUT, "upload stalled or too slow; nothing was stored")),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(err(StatusCode::BAD_REQUEST, format!("upload broke off ({e}); nothing was stored"))),
            Ok(Some(Ok(chunk))) => {
                if (buf.len() + chunk.len()) as u64 > max {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    if declared.is_some_and(|n| n != buf.len() as u64) {
        return Err(err(StatusCode::BAD_REQUEST, "upload shorter than its Content-Length; nothing was stored"));
    }
    Ok((buf, permit))
}

fn check_upload(s: &AppState, kind: Kind, name: &str, data: &[u8]) -> Result<Option<jiff::Timestamp>, ApiError> {
    if kind.content_addressed() {
        let h = blake3::hash(data).to_hex();
        if h.as_str() != name {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!("{} is not the BLAKE3 hash of the uploaded bytes ({h}); nothing was stored", kind.wire()),
            ));
        }
    }
    match kind {
        Kind::Snapshot => {
            let (public, _) = kura_repo::snapshot::decode_public(data)
                .map_err(|e| err(StatusCode::BAD_REQUEST, format!("not a kura snapshot: {e}")))?;
            let t = public.time.parse::<jiff::Timestamp>().map_err(|e| err(StatusCode::BAD_REQUEST, format!("snapshot time {:?}: {e}", public.time)))?;
            Ok(Some(t))
        }
        Kind::Session => {
            // Prune judges sessions by these records: one it cannot judge (another version,
            // no heartbeat) or with a heartbeat in the future would keep it waiting for ever.
            let info: kura_repo::session::SessionInfo = serde_json::from_slice(data)
                .map_err(|e| err(StatusCode::BAD_REQUEST, format!("not a version-1 session record: {e}")))?;
            let t: jiff::Timestamp = info.heartbeat.parse().map_err(|_| err(StatusCode::BAD_REQUEST, "session heartbeat is not a time"))?;
            let ahead = t.duration_since(jiff::Timestamp::now());
            if info.version != 1 || ahead > jiff::SignedDuration::try_from(s.limits.future_skew).unwrap_or_default() {
                return Err(err(StatusCode::BAD_REQUEST, "session record of another version or with a heartbeat in the future (check this client's clock)"));
            }
            Ok(None)
        }
        Kind::Drill => {
            // Status takes the newest record: one dated ahead would hide every later drill.
            let r = kura_repo::drill::DrillRecord::decode(data).map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
            let t: jiff::Timestamp = r.time.parse().map_err(|_| err(StatusCode::BAD_REQUEST, "drill time is not a time"))?;
            if t.duration_since(jiff::Timestamp::now()) > jiff::SignedDuration::try_from(s.limits.future_skew).unwrap_or_default() {
                return Err(err(StatusCode::BAD_REQUEST, "drill record dated in the future (check this client's clock)"));
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn receipt(s: &AppState, claimed: jiff::Timestamp, token: &TokenEntry) -> Receipt {
    make_receipt((s.limits.future_skew, s.limits.past_skew), claimed, jiff::Timestamp::now(), &token.id, Some(token.role.name()))
}

/// A receipt of a snapshot received at `now` that claims the time `claimed`, flagged when the
/// claim is further ahead or behind than `skew` (ahead, behind) allows.
pub(crate) fn make_receipt(
    skew: (std::time::Duration, std::time::Duration),
    claimed: jiff::Timestamp,
    now: jiff::Timestamp,
    token: &str,
    role: Option<&str>,
) -> Receipt {
    let off = claimed.duration_since(now);
    let future = jiff::SignedDuration::try_from(skew.0).unwrap_or_default();
    let past = jiff::SignedDuration::try_from(skew.1).unwrap_or_default();
    let flag = if off > future {
        Some(format!("claimed time is {}s after the server received it", off.as_secs()))
    } else if -off > past {
        Some(format!("claimed time is {}s before the server received it", -off.as_secs()))
    } else {
        None
    };
    Receipt {
        version: 1,
        received: now.to_string(),
        claimed: claimed.to_string(),
        skew_seconds: off.as_secs(),
        flag,
        token: token.to_string(),
        role: role.map(str::to_string),
    }
}

/// `PUT /v1/<repo>/<kind>/<name>`: create-only (or `?replace=1` for one's own session).
pub async fn put_object(
    State(s): Shared,
    ConnectInfo(peer): Peer,
    Path((repo, kind, name)): Path<(String, String, String)>,
    Query(q): Query<PutQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (tok, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let kind = kind_of(&kind)?;
    object_name(kind, &name)?;
    may_write(tok.role, kind)?;
    let replace = q.replace.as_deref() == Some("1");
    if replace && kind != Kind::Session {
        return Err(err(StatusCode::FORBIDDEN, "only session objects are ever replaced"));
    }
    let (data, _permit) = read_upload(&s, kind, &headers, body).await?;
    let claimed = check_upload(&s, kind, &name, &data)?;
    if kind == Kind::Session && tok.role != Role::Admin {
        // A prune or repair session makes every other prune and repair wait: admins only.
        let command = serde_json::from_slice::<kura_repo::session::SessionInfo>(&data).map(|i| i.command).unwrap_or_default();
        if matches!(command.as_str(), "prune" | "repair") {
            return Err(err(StatusCode::FORBIDDEN, format!("a {} token cannot run {command}", tok.role.name())));
        }
    }
    if kind == Kind::Session {
        claim_session(&hosted, &tok, &name).await?;
    }
    if kind == Kind::Snapshot {
        // A snapshot naming a pack the server does not have is damaged from the start, and
        // would stop the server's prune (which cannot tell it from lost data). A real client
        // checks the same before writing its snapshot.
        let (h, d) = (hosted.clone(), data.clone());
        let missing = blocking(move || {
            let packs = kura_repo::snapshot::decode_public(&d).map(|(p, _)| p.packs).unwrap_or_default();
            match &h.local {
                Some(l) => Ok(packs.into_iter().find(|p| l.object_path(Kind::Pack, &p.to_hex()).map_or(true, |f| !f.is_file()))),
                // One listing rather than a request per pack the snapshot names.
                None => {
                    let have: std::collections::HashSet<String> = h.store.list(Kind::Pack)?.into_iter().map(|l| l.name).collect();
                    Ok(packs.into_iter().find(|p| !have.contains(&p.to_hex())))
                }
            }
        })
        .await?;
        if let Some(p) = missing {
            return Err(err(StatusCode::BAD_REQUEST, format!("the snapshot names pack {} which this server does not have; nothing was stored", p.to_hex())));
        }
    }
    let size = data.len();
    let rec = claimed.map(|c| receipt(&s, c, &tok));
    let receipt = rec.clone();
    let h = hosted.clone();
    let n = name.clone();
    // One blocking task does the whole write, so a client that hangs up cannot cut it short
    // between the receipt and the snapshot.
    let result = blocking(move || match (kind, replace) {
        (Kind::Session, true) => h.store.replace(kind, &n, &data),
        (Kind::Snapshot, _) => put_snapshot(&h, &n, &data, receipt.as_ref()),
        _ => h.store.put_new(kind, &n, &data),
    })
    .await;
    match result {
        Ok(()) => {}
        Err(e) if kind == Kind::Session => {
            release_session(&hosted, &name, &tok);
            return Err(e);
        }
        // The same bytes under the same hash: a retry after a lost answer, or a dedup race.
        Err(ApiError(StatusCode::CONFLICT, _)) if kind.content_addressed() => {
            return Err(err(StatusCode::CONFLICT, "exists (with these very bytes)"));
        }
        Err(ApiError(StatusCode::CONFLICT, _)) => {
            tracing::warn!(repo = %repo, object = %format!("{}/{name}", kind.wire()), token = %tok.id, "refused to overwrite an existing object");
            return Err(err(StatusCode::CONFLICT, format!("{}/{name} exists and is never overwritten", kind.wire())));
        }
        Err(e) => return Err(e),
    }
    if let Some(r) = &rec {
        if let Some(flag) = &r.flag {
            tracing::warn!(repo = %repo, snapshot = %name, token = %tok.id, "{flag}");
        }
        tracing::info!(repo = %repo, snapshot = %name, token = %tok.id, claimed = %r.claimed, "snapshot received");
    }
    tracing::debug!(repo = %repo, kind = kind.wire(), size, "stored");
    Ok(StatusCode::CREATED.into_response())
}

/// Stores a snapshot: its receipt first (so no snapshot is ever without one; an existing
/// receipt of a snapshot that comes back from the trash stays), then the snapshot, then its
/// trash record goes. Serialised with [`trash_snapshot`] per repository.
pub(crate) fn put_snapshot(h: &Hosted, name: &str, data: &[u8], receipt: Option<&Receipt>) -> Result<(), StoreError> {
    let _guard = h.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = receipt {
        match h.store.put_new(Kind::Receipt, name, &serde_json::to_vec(r).unwrap_or_default()) {
            Ok(()) | Err(StoreError::Exists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    h.store.put_new(Kind::Snapshot, name, data)?;
    match h.store.delete(Kind::Trash, name) {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reserves a session name for `tok` before its record is written: the first token to write
/// a session owns it; another (but an admin) may neither replace nor delete it. A session the
/// server has no owner for (written outside the server) is an admin's alone.
async fn claim_session(hosted: &Arc<Hosted>, tok: &TokenEntry, name: &str) -> Result<(), ApiError> {
    let store = hosted.store.clone();
    let n = name.to_string();
    let exists = blocking(move || match store.get(Kind::Session, &n) {
        Ok(_) => Ok(true),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    })
    .await?;
    let mut owners = hosted.owners.lock().unwrap_or_else(|p| p.into_inner());
    match owners.get(name) {
        Some(o) if *o == tok.id => Ok(()),
        _ if tok.role == Role::Admin => Ok(()),
        Some(_) => Err(err(StatusCode::FORBIDDEN, "that session belongs to another token")),
        None if exists => Err(err(StatusCode::FORBIDDEN, "that session was not written through this server; only an admin token may change it")),
        None => {
            owners.insert(name.to_string(), tok.id.clone());
            hosted.save_owners(&owners);
            Ok(())
        }
    }
}

/// Forgets a session's owner (after its deletion, or a failed first write).
fn release_session(hosted: &Hosted, name: &str, tok: &TokenEntry) {
    let mut owners = hosted.owners.lock().unwrap_or_else(|p| p.into_inner());
    if owners.get(name) == Some(&tok.id) || tok.role == Role::Admin {
        owners.remove(name);
        hosted.save_owners(&owners);
    }
}

/// Moves a snapshot to the trash: the record is durable before the snapshot goes, so a crash
/// in between leaves both (a repeated delete finishes the move), never neither. An older
/// record of the same snapshot is replaced, so the undelete window starts now.
pub fn trash_snapshot(h: &Hosted, name: &str, by: &str) -> Result<(), StoreError> {
    let _guard = h.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
    let bytes = h.store.get(Kind::Snapshot, name)?;
    let record = serde_json::to_vec(&kura_repo::trash::TrashRecord::new(&bytes, by)).unwrap_or_default();
    match h.store.put_new(Kind::Trash, name, &record) {
        Ok(()) => {}
        Err(StoreError::Exists(_)) => {
            h.store.delete(Kind::Trash, name)?;
            h.store.put_new(Kind::Trash, name, &record)?;
        }
        Err(e) => return Err(e),
    }
    match h.store.delete(Kind::Snapshot, name) {
        // Locked in the bucket: it stays live, so the trash must not hold it too.
        Err(e @ StoreError::Locked { .. }) => {
            let _ = h.store.delete(Kind::Trash, name);
            Err(e)
        }
        r => r,
    }
}

/// `DELETE /v1/<repo>/<kind>/<name>`: admin tokens; other tokens only their own sessions.
/// A deleted snapshot goes to the trash for the repository's undelete window; the trash and
/// receipts are the server's alone.
pub async fn delete_object(State(s): Shared, ConnectInfo(peer): Peer, Path((repo, kind, name)): Path<(String, String, String)>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (tok, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let kind = kind_of(&kind)?;
    object_name(kind, &name)?;
    if matches!(kind, Kind::Trash | Kind::Receipt) {
        return Err(err(StatusCode::FORBIDDEN, format!("{} are removed by the server only, when the undelete window ends", kind.wire())));
    }
    if tok.role != Role::Admin {
        let own_session = kind == Kind::Session
            && hosted.owners.lock().map(|o| o.get(&name) == Some(&tok.id)).unwrap_or(false);
        if !own_session {
            tracing::warn!(repo = %repo, object = %format!("{}/{name}", kind.wire()), token = %tok.id, role = tok.role.name(), "refused a delete");
            return Err(err(StatusCode::FORBIDDEN, format!("a {} token can never delete", tok.role.name())));
        }
    }
    let h = hosted.clone();
    let n = name.clone();
    let by = tok.id.clone();
    blocking(move || if kind == Kind::Snapshot { trash_snapshot(&h, &n, &by) } else { h.store.delete(kind, &n) }).await?;
    if kind == Kind::Session {
        release_session(&hosted, &name, &tok);
    }
    tracing::info!(repo = %repo, object = %format!("{}/{name}", kind.wire()), token = %tok.id, "deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/<repo>/jobs`: each job's schedule, last run and next run.
pub async fn jobs_status(State(s): Shared, ConnectInfo(peer): Peer, Path(repo): Path<String>, headers: HeaderMap) -> Result<Json<std::collections::BTreeMap<&'static str, JobStatus>>, ApiError> {
    let (_, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let st = hosted.jobs.status.lock().map(|m| m.clone()).map_err(|_| err(StatusCode::INTERNAL_SERVER_ERROR, "poisoned"))?;
    Ok(Json(st))
}

/// `POST /v1/<repo>/jobs/<job>`: runs a job now (admin); answers with what it did.
pub async fn run_job(State(s): Shared, ConnectInfo(peer): Peer, Path((repo, job)): Path<(String, String)>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (tok, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    if tok.role != Role::Admin {
        return Err(err(StatusCode::FORBIDDEN, format!("a {} token cannot run jobs", tok.role.name())));
    }
    if !crate::jobs::JOBS.contains(&job.as_str()) {
        return Err(err(StatusCode::NOT_FOUND, format!("no job named {job:?}")));
    }
    tracing::info!(repo = %repo, job = %job, token = %tok.id, "job started by request");
    let result = tokio::task::spawn_blocking(move || crate::jobs::run_job(&hosted, &job))
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match result {
        Ok(m) => Ok((StatusCode::OK, format!("{m}\n")).into_response()),
        Err(m) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_only_the_simple_form() {
        assert_eq!(parse_range("bytes=0-9"), Some((0, 10)));
        assert_eq!(parse_range("bytes=5-5"), Some((5, 1)));
        for bad in ["bytes=9-0", "bytes=-5", "bytes=1-", "items=0-1", "bytes=0-1,3-4"] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn roles_write_only_what_they_may() {
        assert!(may_write(Role::Backup, Kind::Pack).is_ok());
        assert!(may_write(Role::Backup, Kind::Snapshot).is_ok());
        assert!(may_write(Role::Read, Kind::Session).is_ok());
        assert!(may_write(Role::Read, Kind::Drill).is_ok());
        assert!(may_write(Role::Shadow, Kind::Drill).is_err());
        for k in [Kind::Config, Kind::Key, Kind::Plan, Kind::Protection, Kind::Receipt, Kind::Lineage] {
            assert!(may_write(Role::Backup, k).is_err(), "{k:?}");
        }
        assert!(may_write(Role::Read, Kind::Pack).is_err());
        assert!(may_write(Role::Admin, Kind::Receipt).is_err());
    }
}
