//! The standby's side of shadowing inside `kura serve`: a primary's `shadow` token appends
//! batches to its stream's journal; nothing it can send removes or rewrites a record.
//! Endpoints (`docs/FORMAT.md` §15): status, manifest, append, wait, release, discard,
//! promote, demote, chunk, records, branch append.

use crate::api::{AppState, ApiError, err};
use crate::tokens::{Role, TokenEntry};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kura_shadow::{AppendError, Stream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

type Shared = State<Arc<AppState>>;

/// The token and stream of a request, or why not.
fn open(state: &AppState, headers: &HeaderMap, peer: SocketAddr, stream: &str) -> Result<(TokenEntry, Arc<Stream>), ApiError> {
    let tok = state.authenticate(headers, peer.ip())?;
    if !tok.opens(stream) {
        return Err(err(StatusCode::FORBIDDEN, format!("token {} does not open stream {stream:?}", tok.id)));
    }
    let s = state.streams.get(stream).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("this server receives no stream named {stream:?}")))?;
    Ok((tok, s.clone()))
}

fn may_push(tok: &TokenEntry) -> bool {
    matches!(tok.role, Role::Shadow | Role::Admin)
}

/// `GET /v1/shadow/{stream}`: status; the chunk key only for a token that may push.
pub async fn status(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>) -> Response {
    match open(&state, &headers, peer, &stream) {
        Ok((tok, s)) => {
            // A pusher's status request is its heartbeat.
            if tok.role == Role::Shadow {
                s.touch();
            }
            axum::Json(s.status(may_push(&tok))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Query of `manifest`.
#[derive(serde::Deserialize)]
pub struct ManifestQuery {
    #[serde(default)]
    seq: Option<u64>,
}

/// `GET /v1/shadow/{stream}/manifest[?seq=N]`: the tree as of the newest record, or of record N
/// (postcard; 404 when N is outside the journal).
pub async fn manifest(
    State(state): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(stream): Path<String>,
    Query(q): Query<ManifestQuery>,
) -> Response {
    let (tok, s) = match open(&state, &headers, peer, &stream) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if !may_push(&tok) {
        return err(StatusCode::FORBIDDEN, "only a shadow token of the stream reads its tree").into_response();
    }
    match tokio::task::spawn_blocking(move || match q.seq {
        None => Ok(Some(s.manifest())),
        Some(seq) => s.manifest_at(seq),
    })
    .await
    {
        Ok(Ok(Some(b))) => b.into_response(),
        Ok(Ok(None)) => err(StatusCode::NOT_FOUND, "that record is outside the journal's window").into_response(),
        Ok(Err(e)) => {
            tracing::error!(stream = %stream, "reading the journal failed: {e}");
            err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

/// `GET /v1/shadow/{stream}/chunk/{id}`: a chunk's plain bytes (a rejoining host fetches
/// what it lacks).
pub async fn chunk(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path((stream, id)): Path<(String, String)>) -> Response {
    let (tok, s) = match open(&state, &headers, peer, &stream) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if !may_push(&tok) {
        return err(StatusCode::FORBIDDEN, "only a shadow token of the stream reads its chunks").into_response();
    }
    let Some(id) = kura_repo::Id::from_hex(&id) else {
        return err(StatusCode::BAD_REQUEST, format!("{id:?} is not a chunk id")).into_response();
    };
    match tokio::task::spawn_blocking(move || s.read_chunk(&id)).await {
        Ok(Ok(b)) => b.into_response(),
        Ok(Err(e)) => err(StatusCode::NOT_FOUND, e.to_string()).into_response(),
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

/// The stream for an admin token, or the answer that refuses `what` to anyone else.
fn open_admin(state: &AppState, headers: &HeaderMap, peer: SocketAddr, stream: &str, what: &str) -> Result<Arc<Stream>, ApiError> {
    let (tok, s) = open(state, headers, peer, stream)?;
    if tok.role != Role::Admin {
        return Err(err(StatusCode::FORBIDDEN, format!("only an admin token {what}")));
    }
    Ok(s)
}

/// `POST /v1/shadow/{stream}/promote` (admin): the standby becomes the primary (epoch + 1; the
/// old primary is fenced); answers once the mirror holds every record received before.
pub async fn promote(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>) -> Response {
    let s = match open_admin(&state, &headers, peer, &stream, "promotes a stream") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let r = tokio::task::spawn_blocking(move || s.promote(Duration::from_secs(300)).map(|(epoch, seq, caught_up)| serde_json::json!({ "epoch": epoch, "promoted_seq": seq, "caught_up": caught_up }))).await;
    answer(&stream, "promotion", r, |e| !matches!(e, kura_shadow::PromoteError::Store(_)))
}

/// `POST /v1/shadow/{stream}/demote` (admin): a promoted stream is handed back (the failback):
/// its mirror's last changes are recorded, the epoch goes up, the mirror follows the journal
/// again and the host that followed it pushes.
pub async fn demote(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>) -> Response {
    let s = match open_admin(&state, &headers, peer, &stream, "hands a stream back") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let r = tokio::task::spawn_blocking(move || s.demote().map(|(epoch, seq)| serde_json::json!({ "epoch": epoch, "demoted_seq": seq }))).await;
    answer(&stream, "demotion", r, |e| !matches!(e, kura_shadow::PromoteError::Store(_)))
}

/// Query of `records`.
#[derive(serde::Deserialize)]
pub struct RecordsQuery {
    after: u64,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// `GET /v1/shadow/{stream}/records?after=N&timeout_ms=M`: the durable records after N
/// (postcard `Records`), waiting at most M ms (≤ 60 s) for one; 410 when N was pruned. What a
/// former primary following its promoted standby applies.
pub async fn records(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>, Query(q): Query<RecordsQuery>) -> Response {
    let (tok, s) = match open(&state, &headers, peer, &stream) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if !may_push(&tok) {
        return err(StatusCode::FORBIDDEN, "only a shadow token of the stream reads its records").into_response();
    }
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(25_000).min(60_000));
    match tokio::task::spawn_blocking(move || s.records_after(q.after, timeout)).await {
        Ok(Ok(Ok(r))) => r.encode().into_response(),
        Ok(Ok(Err(base))) => err(StatusCode::GONE, format!("record {} was pruned from the journal (it starts after {base})", q.after + 1)).into_response(),
        Ok(Err(e)) => {
            tracing::error!(stream = %stream, "reading the journal failed: {e}");
            err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

/// The JSON answer of a blocking operation; `conflict` tells the refusals (409) from failures
/// (500, logged).
fn answer<T: serde::Serialize, E: std::fmt::Display>(stream: &str, what: &str, r: Result<Result<T, E>, tokio::task::JoinError>, conflict: impl Fn(&E) -> bool) -> Response {
    match r {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) if conflict(&e) => err(StatusCode::CONFLICT, e.to_string()).into_response(),
        Ok(Err(e)) => {
            tracing::error!(stream = %stream, "{what} failed: {e}");
            err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

/// Query of `verify`.
#[derive(serde::Deserialize)]
pub struct VerifyQuery {
    #[serde(default)]
    repair: bool,
}

/// `POST /v1/shadow/{stream}/verify[?repair=true]`: hashes the mirror and compares it with the
/// journal; `repair` rewrites what differs (a token that may push).
pub async fn verify(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>, Query(q): Query<VerifyQuery>) -> Response {
    let (tok, s) = match open(&state, &headers, peer, &stream) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if !may_push(&tok) {
        return err(StatusCode::FORBIDDEN, "only a shadow or admin token of the stream verifies its mirror").into_response();
    }
    let r = tokio::task::spawn_blocking(move || s.verify_mirror(q.repair)).await;
    answer(&stream, "verification", r, |e| matches!(e, kura_shadow::ShadowError::Usage(_)))
}

/// Query of a branch append.
#[derive(serde::Deserialize)]
pub struct BranchQuery {
    #[serde(default)]
    last: bool,
}

/// `POST /v1/shadow/{stream}/branch/{name}/append[?last=true]`: a batch of a fenced primary's
/// tree, kept as a named branch (append-only; `last` seals it).
pub async fn append_branch(
    State(state): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((stream, name)): Path<(String, String)>,
    Query(q): Query<BranchQuery>,
    body: Body,
) -> Response {
    let (s, body) = match batch(&state, &headers, peer, &stream, body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match tokio::task::spawn_blocking(move || s.append_branch(&name, &body, q.last)).await {
        Ok(r) => appended(&stream, r),
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

/// The stream and the batch of a push, once the token may push to it.
async fn batch(state: &AppState, headers: &HeaderMap, peer: SocketAddr, stream: &str, body: Body) -> Result<(Arc<Stream>, axum::body::Bytes), Response> {
    let (tok, s) = open(state, headers, peer, stream).map_err(|e| e.into_response())?;
    if !may_push(&tok) {
        return Err(err(StatusCode::FORBIDDEN, format!("a {} token cannot push to a stream", tok.role.name())).into_response());
    }
    let body = axum::body::to_bytes(body, kura_shadow::record::MAX_BATCH).await.map_err(|e| err(StatusCode::PAYLOAD_TOO_LARGE, format!("batch not read: {e}")).into_response())?;
    Ok((s, body))
}

/// `POST /v1/shadow/{stream}/append`: a batch; answers `{"head": N}` once it is durable.
pub async fn append(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>, body: Body) -> Response {
    let (s, body) = match batch(&state, &headers, peer, &stream, body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    s.touch();
    // A small batch on the worker itself while the disk syncs fast: handing the worker's other
    // tasks to a thread of their own for each append (block_in_place) cost a SQLite standby an
    // eighth of its CPU, more than the sync it spared them from waiting for. A large batch
    // (chunks to check) or a slow disk's gets a thread.
    let r = if body.len() <= 256 << 10 && s.syncs_fast() { s.append(&body) } else { tokio::task::block_in_place(|| s.append(&body)) };
    appended(&stream, r)
}

/// The answer to an append: `{"head": N}`, or the refusal with its status.
fn appended(stream: &str, r: Result<u64, AppendError>) -> Response {
    match r {
        Ok(head) => axum::Json(serde_json::json!({ "head": head })).into_response(),
        Err(e) => {
            let status = match &e {
                AppendError::Malformed(_) => StatusCode::BAD_REQUEST,
                AppendError::OutOfOrder { .. } | AppendError::Sealed(_) => StatusCode::CONFLICT,
                AppendError::Missing(_) => StatusCode::PRECONDITION_FAILED,
                AppendError::Fenced { .. } | AppendError::Promoted { .. } => StatusCode::LOCKED,
                AppendError::Store(kura_shadow::ShadowError::Io { source, .. }) if source.raw_os_error() == Some(28) => StatusCode::INSUFFICIENT_STORAGE,
                AppendError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            if status.is_server_error() {
                tracing::error!(stream = %stream, "append failed: {e}");
            }
            let mut j = serde_json::json!({ "error": e.to_string() });
            match &e {
                AppendError::OutOfOrder { expected, .. } => j["expected"] = (*expected).into(),
                AppendError::Missing(ids) => j["missing"] = ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>().into(),
                _ => {}
            }
            (status, axum::Json(j)).into_response()
        }
    }
}

/// Query of `wait`.
#[derive(serde::Deserialize)]
pub struct WaitQuery {
    seq: u64,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// `GET /v1/shadow/{stream}/wait?seq=N&timeout_ms=M`: returns once record N is applied to the
/// mirror (200), or 408 after the timeout (at most 10 minutes).
pub async fn wait(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>, Query(q): Query<WaitQuery>) -> Response {
    let (_, s) = match open(&state, &headers, peer, &stream) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(60_000).min(600_000));
    let seq = q.seq;
    let s2 = s.clone();
    match tokio::task::spawn_blocking(move || s2.wait_applied(seq, timeout)).await {
        Ok(true) => axum::Json(serde_json::json!({ "applied": s.status(false).applied })).into_response(),
        Ok(false) => err(StatusCode::REQUEST_TIMEOUT, format!("record {seq} not applied within {} ms", timeout.as_millis())).into_response(),
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
    }
}

/// `POST /v1/shadow/{stream}/release` (admin): the held burst of deletions goes to the mirror.
pub async fn release(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>) -> Response {
    operator(&state, &headers, peer, &stream, |s| s.release())
}

/// `POST /v1/shadow/{stream}/discard` (admin): the held deletions never reach the mirror.
pub async fn discard(State(state): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, Path(stream): Path<String>) -> Response {
    operator(&state, &headers, peer, &stream, |s| s.discard())
}

fn operator(state: &AppState, headers: &HeaderMap, peer: SocketAddr, stream: &str, act: impl FnOnce(&Stream) -> Option<kura_shadow::Held>) -> Response {
    let (tok, s) = match open(state, headers, peer, stream) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if tok.role != Role::Admin {
        return err(StatusCode::FORBIDDEN, "only an admin token releases or discards held changes").into_response();
    }
    match act(&s) {
        Some(h) => axum::Json(serde_json::json!({ "held": h })).into_response(),
        None => err(StatusCode::CONFLICT, "nothing is held").into_response(),
    }
}
