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

fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Exists(_) => StatusCode::CONFLICT,
            StoreError::InvalidName(_) => StatusCode::BAD_REQUEST,
            StoreError::Short { len, .. } => return err(StatusCode::RANGE_NOT_SATISFIABLE, len.to_string()),
            e if e.is_full() => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR || status == StatusCode::INSUFFICIENT_STORAGE {
            tracing::error!(error = %e, "storage failure");
        }
        err(status, e.to_string())
    }
}

/// A hosted repository.
pub struct Hosted {
    /// Its name in URLs.
    pub name: String,
    /// Its storage.
    pub store: Arc<LocalStore>,
    /// Which token created each session object, so only it (or an admin) replaces or deletes
    /// it. Forgotten on restart: sessions then expire by their heartbeat.
    session_owners: Mutex<HashMap<String, String>>,
    /// Its scheduled jobs and their status.
    pub jobs: RepoJobs,
}

impl Hosted {
    /// Hosts a repository stored in `store`.
    pub fn new(name: String, store: LocalStore, jobs: RepoJobs) -> Self {
        Hosted { name, store: Arc::new(store), session_owners: Mutex::new(HashMap::new()), jobs }
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
    failures: Mutex<HashMap<IpAddr, Bucket>>,
    /// Counters for `/metrics`.
    pub metrics: crate::metrics::Metrics,
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl AppState {
    /// State for hosting `repos` with the tokens of `tokens_path`.
    pub fn new(repos: Vec<Hosted>, tokens_path: PathBuf, limits: ResolvedLimits) -> Result<Self, crate::ServerError> {
        let tokens = Tokens::load(&tokens_path)?;
        let permits = usize::try_from(limits.max_upload_memory / 1024).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Ok(AppState {
            repos: repos.into_iter().map(|h| (h.name.clone(), Arc::new(h))).collect(),
            tokens_seen: Mutex::new((Instant::now(), mtime(&tokens_path))),
            tokens: RwLock::new(tokens),
            tokens_path,
            limits,
            upload_memory: Semaphore::new(permits),
            failures: Mutex::new(HashMap::new()),
            metrics: Default::default(),
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
        if map.len() > 100_000 {
            map.retain(|_, b| b.last.elapsed() < Duration::from_secs(600));
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
        let hosted = self.repos.get(repo).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("this server hosts no repository named {repo:?}")))?;
        if !entry.opens(repo) {
            return Err(err(StatusCode::FORBIDDEN, format!("token {} does not open repository {repo:?}", entry.id)));
        }
        Ok((entry, hosted.clone()))
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

/// Parses `bytes=A-B` (the only form kura sends).
fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (b >= a).then(|| (a, b - a + 1))
}

/// `GET /v1/<repo>/<kind>/<name>`, whole or `Range: bytes=A-B`.
pub async fn get_object(State(s): Shared, ConnectInfo(peer): Peer, Path((repo, kind, name)): Path<(String, String, String)>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (_, hosted) = s.authorize(&headers, peer.ip(), &repo)?;
    let kind = kind_of(&kind)?;
    object_name(kind, &name)?;
    let store = hosted.store.clone();
    let range = match headers.get(header::RANGE) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(parse_range)
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "only Range: bytes=A-B is supported"))?,
        ),
        None => None,
    };
    let data = blocking(move || match range {
        // As HTTP has it: a range reaching past the end gets the bytes up to the end; only one
        // starting past the end is unsatisfiable.
        Some((off, len)) => match store.get_range(kind, &name, off, len) {
            Err(StoreError::Short { len: have, .. }) if off < have => store.get_range(kind, &name, off, have - off),
            r => r,
        },
        None => store.get(kind, &name),
    })
    .await?;
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    Ok((status, [(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// Query of a PUT.
#[derive(Debug, Deserialize)]
pub struct PutQuery {
    /// `replace=1`: rewrite a session object (heartbeat).
    #[serde(default)]
    replace: Option<String>,
}

/// Whether `role` may create objects of `kind`.
fn may_write(role: Role, kind: Kind) -> Result<(), ApiError> {
    let ok = match kind {
        Kind::Receipt | Kind::Trash => false,
        Kind::Session => true,
        Kind::Pack | Kind::Index | Kind::Snapshot => role != Role::Read,
        Kind::Config | Kind::Key | Kind::Plan | Kind::Protection => role == Role::Admin,
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

/// Reads an upload into memory within the size limit, cutting off a client that stalls.
async fn read_upload<'a>(s: &'a AppState, headers: &HeaderMap, body: Body) -> Result<(Vec<u8>, tokio::sync::SemaphorePermit<'a>), ApiError> {
    let max = s.limits.max_object_size;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(err(StatusCode::PAYLOAD_TOO_LARGE, format!("object larger than this server accepts ({max} bytes)")));
    }
    let kib = u32::try_from(declared.unwrap_or(max).div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let permit = s
        .upload_memory
        .acquire_many(kib.min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX)))
        .await
        .map_err(|_| err(StatusCode::SERVICE_UNAVAILABLE, "server shutting down"))?;
    let mut buf = Vec::with_capacity(usize::try_from(declared.unwrap_or(0)).unwrap_or(0));
    let mut stream = body.into_data_stream();
    loop {
        match tokio::time::timeout(s.limits.idle_timeout, stream.next()).await {
            Err(_) => return Err(err(StatusCode::REQUEST_TIMEOUT, "upload stalled; nothing was stored")),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(err(StatusCode::BAD_REQUEST, format!("upload broke off ({e}); nothing was stored"))),
            Ok(Some(Ok(chunk))) => {
                if (buf.len() + chunk.len()) as u64 > max {
                    return Err(err(StatusCode::PAYLOAD_TOO_LARGE, format!("object larger than this server accepts ({max} bytes)")));
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
            // A heartbeat in the future would keep a prune waiting for ever.
            #[derive(Deserialize)]
            struct Beat {
                heartbeat: Option<String>,
            }
            let beat: Beat = serde_json::from_slice(data).map_err(|e| err(StatusCode::BAD_REQUEST, format!("not a session record: {e}")))?;
            if let Some(t) = beat.heartbeat.and_then(|h| h.parse::<jiff::Timestamp>().ok()) {
                let ahead = t.duration_since(jiff::Timestamp::now());
                if ahead > jiff::SignedDuration::try_from(s.limits.future_skew).unwrap_or_default() {
                    return Err(err(StatusCode::BAD_REQUEST, "session heartbeat is in the future (check this client's clock)"));
                }
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn receipt(s: &AppState, claimed: jiff::Timestamp, token: &str) -> Receipt {
    let now = jiff::Timestamp::now();
    let skew = claimed.duration_since(now);
    let future = jiff::SignedDuration::try_from(s.limits.future_skew).unwrap_or_default();
    let past = jiff::SignedDuration::try_from(s.limits.past_skew).unwrap_or_default();
    let flag = if skew > future {
        Some(format!("claimed time is {}s after the server received it", skew.as_secs()))
    } else if -skew > past {
        Some(format!("claimed time is {}s before the server received it", -skew.as_secs()))
    } else {
        None
    };
    Receipt { version: 1, received: now.to_string(), claimed: claimed.to_string(), skew_seconds: skew.as_secs(), flag, token: token.to_string() }
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
    let replace = q.replace.is_some();
    if replace && kind != Kind::Session {
        return Err(err(StatusCode::FORBIDDEN, "only session objects are ever replaced"));
    }
    if kind == Kind::Session && tok.role != Role::Admin {
        let owners = hosted.session_owners.lock().map_err(|_| err(StatusCode::INTERNAL_SERVER_ERROR, "poisoned"))?;
        if owners.get(&name).is_some_and(|o| *o != tok.id) {
            return Err(err(StatusCode::FORBIDDEN, "that session belongs to another token"));
        }
    }
    let (data, _permit) = read_upload(&s, &headers, body).await?;
    let claimed = check_upload(&s, kind, &name, &data)?;
    let store = hosted.store.clone();
    let size = data.len();
    let n = name.clone();
    let result = blocking(move || if replace { store.replace(kind, &n, &data) } else { store.put_new(kind, &n, &data) }).await;
    match result {
        Ok(()) => {}
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
    if kind == Kind::Session
        && let Ok(mut owners) = hosted.session_owners.lock()
    {
        owners.insert(name.clone(), tok.id.clone());
    }
    if kind == Kind::Snapshot {
        // Back from the trash (`kura undelete`): the trash record has done its job.
        let store = hosted.store.clone();
        let n = name.clone();
        blocking(move || match store.delete(Kind::Trash, &n) {
            Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        })
        .await?;
    }
    if let Some(claimed) = claimed {
        let r = receipt(&s, claimed, &tok.id);
        if let Some(flag) = &r.flag {
            tracing::warn!(repo = %repo, snapshot = %name, token = %tok.id, "{flag}");
        }
        tracing::info!(repo = %repo, snapshot = %name, token = %tok.id, claimed = %r.claimed, "snapshot received");
        let bytes = serde_json::to_vec(&r).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let store = hosted.store.clone();
        blocking(move || match store.put_new(Kind::Receipt, &name, &bytes) {
            Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
            Err(e) => Err(e),
        })
        .await?;
    }
    tracing::debug!(repo = %repo, kind = kind.wire(), size, "stored");
    Ok(StatusCode::CREATED.into_response())
}

/// Moves a snapshot to the trash: the record is durable before the snapshot goes, so a crash
/// in between leaves both (a repeated delete finishes the move), never neither.
pub fn trash_snapshot(store: &LocalStore, name: &str, by: &str) -> Result<(), StoreError> {
    let bytes = store.get(Kind::Snapshot, name)?;
    let record = serde_json::to_vec(&kura_repo::trash::TrashRecord::new(&bytes, by)).unwrap_or_default();
    match store.put_new(Kind::Trash, name, &record) {
        Ok(()) | Err(StoreError::Exists(_)) => {}
        Err(e) => return Err(e),
    }
    store.delete(Kind::Snapshot, name)
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
            && hosted.session_owners.lock().map(|o| o.get(&name) == Some(&tok.id)).unwrap_or(false);
        if !own_session {
            tracing::warn!(repo = %repo, object = %format!("{}/{name}", kind.wire()), token = %tok.id, role = tok.role.name(), "refused a delete");
            return Err(err(StatusCode::FORBIDDEN, format!("a {} token can never delete", tok.role.name())));
        }
    }
    let store = hosted.store.clone();
    let n = name.clone();
    let by = tok.id.clone();
    blocking(move || if kind == Kind::Snapshot { trash_snapshot(&store, &n, &by) } else { store.delete(kind, &n) }).await?;
    if kind == Kind::Session
        && let Ok(mut owners) = hosted.session_owners.lock()
    {
        owners.remove(&name);
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
        for k in [Kind::Config, Kind::Key, Kind::Plan, Kind::Protection, Kind::Receipt] {
            assert!(may_write(Role::Backup, k).is_err(), "{k:?}");
        }
        assert!(may_write(Role::Read, Kind::Pack).is_err());
        assert!(may_write(Role::Admin, Kind::Receipt).is_err());
    }
}
