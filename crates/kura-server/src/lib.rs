//! `kura serve`: an HTTPS server hosting kura repositories on another machine than the one
//! they protect. Backup tokens can add objects and snapshots but never delete or overwrite one;
//! the server checks every content-addressed upload against its name and records its own
//! receive time of every snapshot. The server never holds a repository key.
//!
//! The protocol is in `docs/FORMAT.md` §14; [`kura_store::RemoteStore`] is its client.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod config;
pub mod jobs;
pub mod metrics;
pub mod schedule;
pub mod shadow;
pub mod tls;
pub mod tokens;

pub use config::ServerConfig;
pub use tokens::{Role, Tokens};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::get;
use futures_util::FutureExt;
use kura_store::{LocalStore, S3Options, S3Store};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration (or the token list) is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The certificate or key cannot be loaded or made.
    #[error("TLS: {0}")]
    Tls(String),
    /// A hosted repository's directory cannot be used.
    #[error("repository {name}: {source}")]
    Repo {
        /// Repository name.
        name: String,
        /// Why.
        #[source]
        source: kura_store::StoreError,
    },
    /// Listening or serving failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Logs one line per request (method, path, status, duration and peer; never a header) and
/// counts it in the metrics; a shadow stream's routine appends and waits only at debug level.
async fn access_log(
    axum::extract::State(state): axum::extract::State<Arc<api::AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let start = Instant::now();
    let method = req.method().clone();
    let received = content_length(req.headers());
    let path = req.uri().path().to_string();
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    // A bug in a handler must cost one request a 500, never the connection or the server.
    let resp = match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => {
            tracing::error!(%method, %path, "request handler panicked");
            api::ApiError(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal error".into()).into_response()
        }
    };
    // A shadow stream appends up to 250 times a second: its successful appends and waits go
    // to the debug level (the metrics count them), or the log would grow by gigabytes a day.
    let routine = resp.status().is_success()
        && path.starts_with("/v1/shadow/")
        && !path.contains("/branch/")
        && (path.ends_with("/append") || path.ends_with("/wait"));
    let (status, ms) = (resp.status().as_u16(), start.elapsed().as_millis() as u64);
    if routine {
        tracing::debug!(target: "kura::access", %method, %path, status, ms, %peer);
    } else {
        tracing::info!(target: "kura::access", %method, %path, status, ms, %peer);
    }
    state.metrics.request(method.as_str(), resp.status().as_u16(), received, content_length(resp.headers()));
    resp
}

fn content_length(h: &axum::http::HeaderMap) -> u64 {
    h.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `GET /metrics`: any valid token (a scraper gets a read token); only the repositories that
/// token opens are shown.
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<api::AppState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let tok = match state.authenticate(&headers, peer.ip()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let repos = state.repos.iter().filter(|(n, _)| tok.opens(n)).map(|(n, h)| (n.clone(), h.clone())).collect();
    let streams = state.streams.iter().filter(|(n, _)| tok.opens(n)).map(|(n, s)| (n.clone(), s.clone())).collect();
    let text = tokio::task::spawn_blocking(move || {
        let m = &state.metrics;
        m.render(&repos, &streams)
    })
    .await
    .unwrap_or_default();
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// The API's routes over `state`.
pub fn router(state: Arc<api::AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/shadow/{stream}", get(shadow::status))
        .route("/v1/shadow/{stream}/manifest", get(shadow::manifest))
        .route("/v1/shadow/{stream}/append", axum::routing::post(shadow::append))
        .route("/v1/shadow/{stream}/wait", get(shadow::wait))
        .route("/v1/shadow/{stream}/release", axum::routing::post(shadow::release))
        .route("/v1/shadow/{stream}/discard", axum::routing::post(shadow::discard))
        .route("/v1/shadow/{stream}/promote", axum::routing::post(shadow::promote))
        .route("/v1/shadow/{stream}/demote", axum::routing::post(shadow::demote))
        .route("/v1/shadow/{stream}/records", get(shadow::records))
        .route("/v1/shadow/{stream}/verify", axum::routing::post(shadow::verify))
        .route("/v1/shadow/{stream}/chunk/{id}", get(shadow::chunk))
        .route("/v1/shadow/{stream}/branch/{name}/append", axum::routing::post(shadow::append_branch))
        .route("/v1/{repo}", get(api::repo_info))
        .route("/v1/{repo}/jobs", get(api::jobs_status))
        .route("/v1/{repo}/jobs/{job}", axum::routing::post(api::run_job))
        .route("/v1/{repo}/{kind}/", get(api::list))
        .route("/v1/{repo}/{kind}/{name}", get(api::get_object).put(api::put_object).delete(api::delete_object))
        .fallback(|| async { api::ApiError(axum::http::StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// Opens (creating the layout of) every configured repository.
fn host_repos(cfg: &ServerConfig) -> Result<Vec<api::Hosted>, ServerError> {
    let limits = cfg.limits()?;
    let skew = (limits.future_skew, limits.past_skew);
    cfg.repositories
        .iter()
        .map(|r| {
            let err = |source| ServerError::Repo { name: r.name.clone(), source };
            let store = match &r.storage {
                Some(url) => api::Storage::Other(Arc::new(S3Store::attach(url, &S3Options::from_env()).map_err(err)?)),
                None => api::Storage::Local(Arc::new(LocalStore::create(&cfg.repo_path(r)).map_err(err)?)),
            };
            let owners = cfg.state_dir.join(format!("session-owners-{}.json", r.name));
            Ok(api::Hosted::new(r.name.clone(), store, jobs::RepoJobs::new(r, skew)?, owners))
        })
        .collect()
}

/// Sets up logging to stderr: human lines, or JSON lines with `json`. `RUST_LOG` filters.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { b.json().try_init() } else { b.try_init() };
}

/// Runs the server in the foreground until SIGINT or SIGTERM. `ready` is called once the
/// socket listens, with its address and the certificate's fingerprint.
pub fn run(cfg: &ServerConfig, ready: impl FnOnce(SocketAddr, &tls::Identity, usize)) -> Result<(), ServerError> {
    kura_store::remote::install_crypto_provider();
    let limits = cfg.limits()?;
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| ServerError::Config(format!("cannot create state_dir {}: {e}", cfg.state_dir.display())))?;
    let identity = tls::identity(cfg)?;
    let repos = host_repos(cfg)?;
    let mut state = api::AppState::new(repos, cfg.tokens_path(), limits)?;
    for st in &cfg.streams {
        let s = kura_shadow::Stream::open(&st.name, &st.journal_dir(&cfg.state_dir), &st.mirror, st.options()?)
            .map_err(|e| ServerError::Config(format!("stream {:?}: {e}", st.name)))?;
        state.streams.insert(st.name.clone(), s);
    }
    let state = Arc::new(state);
    let token_count = Tokens::load(&cfg.tokens_path())?.entries().len();
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(|source| ServerError::Listen { addr: cfg.listen, source })?;
    listener.set_nonblocking(true).map_err(|source| ServerError::Listen { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Listen { addr: cfg.listen, source })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServerError::Listen { addr, source })?;
    rt.block_on(async move {
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(identity.config.clone());
        // TCP_NODELAY: with Nagle's algorithm the tail of an answer waited for the client's
        // delayed ACK, 40 ms here and there (a pull of 30 snapshots stalled on a few of them).
        let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
            .handshake_timeout(limits.header_timeout)
            .acceptor(axum_server::accept::NoDelayAcceptor::new());
        let mut server = axum_server::from_tcp(listener)
            .map_err(|source| ServerError::Listen { addr, source })?
            .acceptor(acceptor);
        server.http_builder().http1().header_read_timeout(limits.header_timeout);
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
            tracing::info!("shutting down: finishing requests in flight (10 s at most)");
            h.graceful_shutdown(Some(Duration::from_secs(10)));
        });
        tokio::spawn(jobs::scheduler(state.repos.values().cloned().collect()));
        ready(addr, &identity, token_count);
        server
            .handle(handle)
            .serve(router(state).into_make_service_with_connect_info::<SocketAddr>())
            .await
            .map_err(|source| ServerError::Listen { addr, source })
    })
}
