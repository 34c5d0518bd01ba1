//! The client of a kura server (`kura serve`): the same write-once objects over HTTPS, with a
//! bearer token, an optionally pinned certificate, and retries of transient failures.
//!
//! The wire protocol is specified in `docs/FORMAT.md` §14. Every call is blocking; the HTTP
//! client keeps a pool of connections, so the threads of a backup upload in parallel.

use crate::{Kind, Listed, ObjectName, ObjectReader, Staged, Store, StoreError, Verb, check_name};
use crate::blocks::{Block, Blocks, FetchBlock};
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The query string of an upload that replaces a session object (heartbeats).
pub const REPLACE_QUERY: &str = "replace=1";

/// How to reach and authenticate to a server.
#[derive(Clone)]
pub struct RemoteOptions {
    /// The bearer token (never printed: `Debug` hides it).
    pub token: String,
    /// SHA-256 of the server's certificate (hex, colons allowed, optional `sha256:` prefix).
    /// When set, exactly that certificate is accepted (a self-signed one included); otherwise
    /// the system's trusted CAs decide.
    pub fingerprint: Option<String>,
    /// Attempts after the first for a request that failed on the network or with a 5xx.
    pub retries: u32,
}

impl fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("token", &"(hidden)")
            .field("fingerprint", &self.fingerprint)
            .field("retries", &self.retries)
            .finish()
    }
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions { token: String::new(), fingerprint: None, retries: 6 }
    }
}

/// Packs uploading in the background at most (memory: this many packs besides the ones being
/// filled).
const UPLOADS_IN_FLIGHT: usize = 2;

#[derive(Default)]
struct UploadState {
    in_flight: usize,
    /// The first background upload that failed; reported by the next `settle`.
    failed: Option<StoreError>,
}

/// Background pack uploads of one store (shared by its handles).
#[derive(Default)]
struct Uploads {
    state: std::sync::Mutex<UploadState>,
    done: std::sync::Condvar,
}

/// A repository hosted by a kura server.
pub struct RemoteStore {
    uploads: Arc<Uploads>,
    blocks: Arc<Blocks>,
    client: Client,
    /// `https://host:port[/prefix]/v1/<repo>`
    base: String,
    /// `kura://host:port/<repo>` for messages.
    display: String,
    token: String,
    retries: u32,
}

impl fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteStore({})", self.display)
    }
}

/// True when a repository location names a kura server rather than a directory.
pub fn is_remote(location: &str) -> bool {
    location.starts_with("kura://") || location.starts_with("https://")
}

/// Splits `kura://HOST:PORT/REPO` or `https://HOST:PORT[/PREFIX]/REPO` into the server's
/// HTTPS root and the repository name.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("kura://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not a kura server address (kura://HOST:PORT/REPO)"))?;
    let rest = rest.trim_end_matches('/');
    let (host_and_prefix, repo) =
        rest.rsplit_once('/').ok_or_else(|| format!("{url:?} names no repository (kura://HOST:PORT/REPO)"))?;
    if host_and_prefix.is_empty() || host_and_prefix.starts_with('/') {
        return Err(format!("{url:?} names no host"));
    }
    check_name(repo).map_err(|_| format!("{url:?}: {repo:?} is not a valid repository name"))?;
    if url.starts_with("kura://") && host_and_prefix.contains('/') {
        return Err(format!("{url:?}: a kura:// address is HOST:PORT/REPO; use https:// for a path prefix"));
    }
    Ok((format!("https://{host_and_prefix}"), repo.to_string()))
}

/// Parses a certificate fingerprint: 64 hex digits, colons and a `sha256:` prefix allowed.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hexes: String = s.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hexes).map_err(|_| format!("fingerprint {s:?} is not hex"))?;
    bytes.try_into().map_err(|_| format!("fingerprint {s:?} is not 32 bytes (SHA-256)"))
}

/// The fingerprint of a DER certificate as kura prints it: `sha256:` and 64 hex digits.
pub fn fingerprint_of(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// Accepts exactly the certificate with the pinned SHA-256, and checks that the server holds
/// its private key (the handshake signatures), as a CA-verified connection would.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if subtle::ConstantTimeEq::ct_eq(&got[..], &self.sha256[..]).into() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint is {} but {} was pinned",
                fingerprint_of(end_entity.as_ref()),
                format_args!("sha256:{}", hex::encode(self.sha256))
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration that accepts exactly the certificate with fingerprint `fp`.
pub fn pinned_config(fp: &str) -> Result<rustls::ClientConfig, String> {
    let sha256 = parse_fingerprint(fp)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { sha256, provider }))
        .with_no_client_auth())
}

/// POSTs `body` as JSON to `url` (a monitoring webhook), within 15 s; the answer's status.
pub fn post_json(url: &str, body: &[u8]) -> Result<u16, String> {
    install_crypto_provider();
    let client = Client::builder().timeout(Duration::from_secs(15)).build().map_err(|e| chain(&e))?;
    // A webhook's URL is often its secret: errors leave it out.
    let r = client.post(url).header("content-type", "application/json").body(body.to_vec()).send().map_err(|e| chain(&e.without_url()))?;
    Ok(r.status().as_u16())
}

/// Installs the process-wide TLS crypto provider (aws-lc-rs) once; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The full error chain of a transport error in one line (reqwest nests the TLS cause).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

enum Attempt {
    Done(Response),
    /// Worth another try (network failure, 5xx, 429), with the message if it was the last.
    Retry(StoreError),
}

impl RemoteStore {
    /// Prepares a client for the repository at `url`; nothing is sent yet.
    pub fn connect(url: &str, opts: &RemoteOptions) -> Result<Self, StoreError> {
        install_crypto_provider();
        let (root, repo) = parse_url(url).map_err(StoreError::BadLocation)?;
        let mut builder = Client::builder()
            .user_agent(concat!("kura/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // A 16 MiB pack over a slow link takes a while; a dead peer is found by keepalive.
            .timeout(Duration::from_secs(600))
            .tcp_keepalive(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            // The server closes connections idle longer than its header timeout (30 s by
            // default); reusing one that is about to close would cost a retry.
            .pool_idle_timeout(Duration::from_secs(20));
        if let Some(fp) = &opts.fingerprint {
            builder = builder.tls_backend_preconfigured(pinned_config(fp).map_err(StoreError::BadLocation)?);
        }
        let client = builder.build().map_err(|e| StoreError::Network {
            verb: Verb::Open,
            target: url.into(),
            detail: chain(&e),
        })?;
        let hostport = root.trim_start_matches("https://");
        Ok(RemoteStore {
            uploads: Arc::default(),
            // A kura server answers small ranges quickly: 2 MiB blocks.
            blocks: Arc::new(Blocks::new(2 << 20)),
            client,
            base: format!("{root}/v1/{repo}"),
            display: format!("kura://{hostport}/{repo}"),
            token: opts.token.clone(),
            retries: opts.retries,
        })
    }

    /// Connects to an existing repository: [`StoreError::NoStore`] when the server does not
    /// host it or it was never initialised.
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self, StoreError> {
        let s = Self::connect(url, opts)?;
        if !s.info()?.initialised {
            return Err(StoreError::NoStore(s.display.clone()));
        }
        Ok(s)
    }

    /// Connects to a repository the server hosts but that is not initialised yet (`init`).
    pub fn create(url: &str, opts: &RemoteOptions) -> Result<Self, StoreError> {
        let s = Self::connect(url, opts)?;
        s.info()?;
        Ok(s)
    }

    /// What the server says about this repository and the token's rights on it.
    pub fn info(&self) -> Result<RepoInfo, StoreError> {
        let resp = match self.send(Verb::Open, &self.display.clone(), || self.client.get(&self.base)) {
            Err(StoreError::Server { status: 404, .. }) => return Err(StoreError::NoStore(self.display.clone())),
            r => r?,
        };
        let body = resp.bytes().map_err(|e| self.net(Verb::Open, &self.display, &e))?;
        serde_json::from_slice(&body).map_err(|e| StoreError::Server {
            verb: Verb::Open,
            target: self.display.clone(),
            status: 200,
            message: format!("unreadable repository information: {e}"),
        })
    }

    /// The server's jobs on this repository and their last results (`GET /v1/<repo>/jobs`):
    /// job name → `{ schedule, last_start, last_ok, last_message, last_success, next, ... }`.
    pub fn jobs(&self) -> Result<serde_json::Value, StoreError> {
        let target = format!("{}/jobs", self.display);
        let resp = self.send(Verb::Read, &target, || self.client.get(format!("{}/jobs", self.base)))?;
        let body = resp.bytes().map_err(|e| self.net(Verb::Read, &target, &e))?;
        serde_json::from_slice(&body).map_err(|e| StoreError::Server {
            verb: Verb::Read,
            target,
            status: 200,
            message: format!("unreadable job status: {e}"),
        })
    }

    fn url(&self, kind: Kind, name: &str) -> String {
        format!("{}/{}/{}", self.base, kind.wire(), name)
    }

    fn net(&self, verb: Verb, target: &str, e: &reqwest::Error) -> StoreError {
        let hint = if e.is_connect() { " (is `kura serve` running and reachable?)" } else { "" };
        StoreError::Network { verb, target: target.to_string(), detail: format!("{}{hint}", chain(e)) }
    }

    fn attempt(&self, verb: Verb, target: &str, req: RequestBuilder) -> Result<Attempt, StoreError> {
        let resp = match req.bearer_auth(&self.token).send() {
            Ok(r) => r,
            Err(e) => {
                let failed = self.net(verb, target, &e);
                // A certificate mismatch will not change by retrying.
                let detail = chain(&e);
                if detail.contains("fingerprint") || detail.contains("certificate") {
                    return Err(failed);
                }
                return Ok(Attempt::Retry(failed));
            }
        };
        let status = resp.status();
        if status.is_success() || status == StatusCode::PARTIAL_CONTENT {
            return Ok(Attempt::Done(resp));
        }
        let message = resp.text().unwrap_or_default().trim().chars().take(500).collect::<String>();
        let target = target.to_string();
        let err = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StoreError::Denied { verb, target, reason: message },
            _ => StoreError::Server { verb, target, status: status.as_u16(), message },
        };
        if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            return Ok(Attempt::Retry(err));
        }
        Err(err)
    }

    /// Sends a request, retrying network failures and 5xx answers with exponential backoff.
    /// Every request kura sends is idempotent (create-only writes of content-addressed names
    /// answer "exists" to a repeat), so a retry after a lost answer is harmless.
    fn send(&self, verb: Verb, target: &str, make: impl Fn() -> RequestBuilder) -> Result<Response, StoreError> {
        let mut delay = Duration::from_millis(250);
        let mut tries = 0;
        loop {
            match self.attempt(verb, target, make())? {
                Attempt::Done(r) => return Ok(r),
                Attempt::Retry(e) if tries >= self.retries => return Err(e),
                Attempt::Retry(_) => {
                    tries += 1;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Maps "not found" and "exists" answers to the store's own errors.
    fn object(&self, verb: Verb, kind: Kind, name: &str, make: impl Fn() -> RequestBuilder) -> Result<Response, StoreError> {
        check_name(name)?;
        let obj = ObjectName::new(kind, name);
        match self.send(verb, &obj.to_string(), make) {
            Err(StoreError::Server { status: 404, .. }) => Err(StoreError::NotFound(obj)),
            Err(StoreError::Server { status: 409, .. }) => Err(StoreError::Exists(obj)),
            Err(StoreError::Server { status: 423, message, .. }) => {
                let secs = message.rsplit("(unix ").next().and_then(|t| t.trim_end_matches(')').parse::<u64>().ok()).unwrap_or(0);
                Err(StoreError::Locked { name: obj, until: std::time::UNIX_EPOCH + Duration::from_secs(secs) })
            }
            other => other,
        }
    }

    /// The answer's body as the object's bytes. A hostile or broken server could stream
    /// without end: it never reads past the largest object of this kind a repository can hold.
    fn body(kind: Kind, name: &str, resp: Response) -> (ObjectReader<'static>, usize) {
        let left = max_body(kind);
        // Sized once from Content-Length by whoever reads it whole: a 16 MiB pack read by
        // growing a buffer and copying it out again costs more than the network on loopback.
        let hint = resp.content_length().unwrap_or(0).min(left) as usize;
        let target = ObjectName::new(kind, name);
        (ObjectReader::new(target.clone(), Box::new(Body { resp, left, target })), hint)
    }

    fn upload(&self, kind: Kind, name: &str, data: bytes::Bytes, replace: bool) -> Result<(), StoreError> {
        // Write order (FORMAT.md §10): packs still uploading in the background must be
        // durable before an index file or snapshot can name them.
        // Sessions are outside the write order; their heartbeats need not wait.
        if kind != Kind::Pack && kind != Kind::Session {
            self.settle()?;
        }
        let mut url = self.url(kind, name);
        if replace {
            url = format!("{url}?{REPLACE_QUERY}");
        }
        match self.object(Verb::Write, kind, name, || self.client.put(&url).body(data.clone())) {
            // The name is the hash of these bytes, so the object that exists holds exactly them:
            // a retry after a lost answer, or another client's identical upload.
            Err(StoreError::Exists(_)) if kind.content_addressed() => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

/// The most bytes a client reads for one object of `kind`: small records are at most 1 MiB
/// (the server's own limit), packs at most the largest `pack_size` (1 GiB) plus one blob, and
/// indexes and snapshots the same bound.
fn max_body(kind: Kind) -> u64 {
    match kind {
        Kind::Session | Kind::Config | Kind::Key | Kind::Protection | Kind::Drill | Kind::Receipt => 1 << 20,
        _ => (1 << 30) + (64 << 20),
    }
}

/// An answer's body read as an object, at most `left` more bytes.
struct Body {
    resp: Response,
    left: u64,
    target: ObjectName,
}

impl std::io::Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte past the limit is asked for, so an answer that is too long is seen.
        let want = buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        match std::io::Read::read(&mut self.resp, &mut buf[..want]) {
            Ok(n) if n as u64 > self.left => Err(std::io::Error::other(StoreError::Server {
                verb: Verb::Read,
                target: self.target.to_string(),
                status: 200,
                message: format!("the answer is longer than the largest {:?} object ({} bytes)", self.target.kind, max_body(self.target.kind)),
            })),
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Err(e) => Err(std::io::Error::other(StoreError::Network {
                verb: Verb::Read,
                target: self.target.to_string(),
                detail: format!("the answer broke off: {e}"),
            })),
        }
    }
}

/// The same error again (the first failed upload is reported by every later write).
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::NotFound(n) => StoreError::NotFound(n.clone()),
        StoreError::Exists(n) => StoreError::Exists(n.clone()),
        StoreError::NoStore(l) => StoreError::NoStore(l.clone()),
        StoreError::BadLocation(l) => StoreError::BadLocation(l.clone()),
        StoreError::InvalidName(n) => StoreError::InvalidName(n.clone()),
        StoreError::Short { name, offset, end, len } => StoreError::Short { name: name.clone(), offset: *offset, end: *end, len: *len },
        StoreError::Denied { verb, target, reason } => StoreError::Denied { verb: *verb, target: target.clone(), reason: reason.clone() },
        StoreError::Server { verb, target, status, message } => {
            StoreError::Server { verb: *verb, target: target.clone(), status: *status, message: message.clone() }
        }
        StoreError::Network { verb, target, detail } => StoreError::Network { verb: *verb, target: target.clone(), detail: detail.clone() },
        StoreError::Backend { verb, target, detail } => StoreError::Backend { verb: *verb, target: target.clone(), detail: detail.clone() },
        StoreError::Locked { name, until } => StoreError::Locked { name: name.clone(), until: *until },
        StoreError::Io { verb, target, source } => {
            StoreError::Io { verb: *verb, target: target.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
    }
}

/// A repository as the server describes it to a token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RepoInfo {
    /// The repository's name on the server.
    pub name: String,
    /// Whether `init` has written its config.
    pub initialised: bool,
    /// The token's role: `backup`, `read` or `admin`.
    pub role: String,
}

/// One entry of a listing on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct WireListed {
    /// Object name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

impl Store for RemoteStore {
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.upload(kind, name, bytes::Bytes::copy_from_slice(data), false)
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let url = self.url(kind, name);
        let resp = self.object(Verb::Read, kind, name, || self.client.get(&url))?;
        let (body, hint) = Self::body(kind, name, resp);
        let mut out = Vec::new();
        body.read_all(&mut out, hint)?;
        Ok(out)
    }

    fn reader(&self, kind: Kind, name: &str) -> Result<ObjectReader<'_>, StoreError> {
        let url = self.url(kind, name);
        let resp = self.object(Verb::Read, kind, name, || self.client.get(&url))?;
        Ok(Self::body(kind, name, resp).0)
    }

    fn get_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if kind == Kind::Pack && self.blocks.covers(len) {
            let src: Arc<dyn FetchBlock> = Arc::new(self.clone_handle());
            return self.blocks.get_range(&src, name, offset, len);
        }
        self.fetch_range(kind, name, offset, len)
    }


    fn list(&self, kind: Kind) -> Result<Vec<Listed>, StoreError> {
        // A listing shows this process's own uploads (a backup checks its packs are there).
        self.settle()?;
        let url = format!("{}/{}/", self.base, kind.wire());
        let target = format!("{}/{}", self.display, kind.wire());
        let resp = self.send(Verb::List, &target, || self.client.get(&url))?;
        let body = resp.bytes().map_err(|e| self.net(Verb::List, &target, &e))?;
        let entries: Vec<WireListed> = serde_json::from_slice(&body).map_err(|e| StoreError::Server {
            verb: Verb::List,
            target: target.clone(),
            status: 200,
            message: format!("unreadable listing: {e}"),
        })?;
        Ok(entries.into_iter().map(|e| Listed { name: e.name, size: e.size, modified: None }).collect())
    }

    fn stage(&self, kind: Kind) -> Result<Box<dyn Staged>, StoreError> {
        let store = self.clone_handle();
        Ok(Box::new(crate::MemStaged::new(move |name: &str, buf: Vec<u8>| RemoteStore::commit_staged(store, kind, name, buf))))
    }

    fn replace(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if kind != Kind::Session {
            return Err(StoreError::InvalidName(format!("{} (only sessions are replaced)", ObjectName::new(kind, name))));
        }
        self.upload(kind, name, bytes::Bytes::copy_from_slice(data), true)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let url = self.url(kind, name);
        self.object(Verb::Delete, kind, name, || self.client.delete(&url)).map(|_| ())
    }

    fn location(&self) -> String {
        self.display.clone()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn prefetch(&self, name: &str, offset: u64, len: u64) -> bool {
        let src: Arc<dyn FetchBlock> = Arc::new(self.clone_handle());
        self.blocks.prefetch(&src, name, offset, len)
    }

    fn check_admin(&self) -> Result<(), StoreError> {
        let info = self.info()?;
        if info.role == "admin" {
            return Ok(());
        }
        Err(StoreError::Denied {
            verb: Verb::Delete,
            target: self.display.clone(),
            reason: format!("this is a {} token, which can never delete; this command needs an admin token", info.role),
        })
    }
}

impl RemoteStore {
    /// One range request; returns what the server sent, which is shorter than asked only
    /// where the object ends first. An answer that is not the range asked for (a proxy that
    /// ignored `Range`) is an error, never bytes at the wrong offset.
    fn fetch_range_upto(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let last = offset.checked_add(len - 1).ok_or_else(|| StoreError::Short { name: ObjectName::new(kind, name), offset, end: u64::MAX, len: 0 })?;
        let url = self.url(kind, name);
        let range = format!("bytes={offset}-{last}");
        let resp = match self.object(Verb::Read, kind, name, || self.client.get(&url).header("Range", &range)) {
            // Starting past the end: the server's message is the object's length.
            Err(StoreError::Server { status: 416, message, .. }) => {
                return Err(StoreError::Short { name: ObjectName::new(kind, name), offset, end: last + 1, len: message.trim().parse().unwrap_or(0) });
            }
            r => r?,
        };
        let starts_right = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok())
            == Some(offset);
        if resp.status() != StatusCode::PARTIAL_CONTENT || !starts_right {
            return Err(StoreError::Server {
                verb: Verb::Read,
                target: ObjectName::new(kind, name).to_string(),
                status: resp.status().as_u16(),
                message: format!("the answer is not the range {range} (is a proxy ignoring Range?)"),
            });
        }
        let (reader, hint) = Self::body(kind, name, resp);
        let mut body = Vec::new();
        reader.read_all(&mut body, hint)?;
        if body.len() as u64 > len {
            return Err(StoreError::Server {
                verb: Verb::Read,
                target: ObjectName::new(kind, name).to_string(),
                status: 206,
                message: format!("the answer to {range} is longer than asked"),
            });
        }
        Ok(body)
    }

    /// Exactly `len` bytes at `offset`, or [`StoreError::Short`].
    fn fetch_range(&self, kind: Kind, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let body = self.fetch_range_upto(kind, name, offset, len)?;
        if (body.len() as u64) < len {
            return Err(StoreError::Short { name: ObjectName::new(kind, name), offset, end: offset.saturating_add(len), len: offset + body.len() as u64 });
        }
        Ok(body)
    }

    /// Waits until every pack handed to a background upload is stored; fails with the first
    /// upload that failed (after its retries).
    pub fn settle(&self) -> Result<(), StoreError> {
        let mut st = self.uploads.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.in_flight > 0 {
            st = self.uploads.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        // Sticky: every later write is refused too, so nothing can name the lost pack.
        match &st.failed {
            Some(e) => Err(copy_error(e)),
            None => Ok(()),
        }
    }

    /// Another handle on the same connection pool.
    fn clone_handle(&self) -> RemoteStore {
        RemoteStore {
            uploads: self.uploads.clone(),
            blocks: self.blocks.clone(),
            client: self.client.clone(),
            base: self.base.clone(),
            display: self.display.clone(),
            token: self.token.clone(),
            retries: self.retries,
        }
    }
}

impl FetchBlock for RemoteStore {
    fn fetch_block(&self, pack: &str, offset: u64, len: u64) -> Result<Block, StoreError> {
        self.fetch_range_upto(Kind::Pack, pack, offset, len).map(Block::from)
    }
}

impl RemoteStore {
    /// Commits a staged object: hands the pack to a background upload and returns, so the
    /// thread that filled it goes on sealing; at most [`UPLOADS_IN_FLIGHT`] packs are on their
    /// way at once. The pack is durable once [`RemoteStore::settle`] returns, which every write
    /// of another kind and every listing calls first, so no index file or snapshot can name a
    /// pack before it is.
    fn commit_staged(store: RemoteStore, kind: Kind, name: &str, buf: Vec<u8>) -> Result<(), StoreError> {
        let up = store.uploads.clone();
        {
            let mut st = up.state.lock().unwrap_or_else(|p| p.into_inner());
            while st.in_flight >= UPLOADS_IN_FLIGHT {
                st = up.done.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.in_flight += 1;
        }
        let name = name.to_string();
        let data = bytes::Bytes::from(buf);
        std::thread::spawn(move || {
            let r = store.upload(kind, &name, data, false);
            let mut st = up.state.lock().unwrap_or_else(|p| p.into_inner());
            st.in_flight -= 1;
            if let Err(e) = r
                && st.failed.is_none()
            {
                st.failed = Some(e);
            }
            up.done.notify_all();
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_host_and_a_repository() {
        assert_eq!(parse_url("kura://b.example:8443/office").unwrap(), ("https://b.example:8443".into(), "office".into()));
        assert_eq!(parse_url("https://b:1/pre/fix/office/").unwrap(), ("https://b:1/pre/fix".into(), "office".into()));
        for bad in ["kura://host", "kura:///repo", "kura://h/a/b", "https://h/..", "https://h/a%2e", "/srv/repo", "s3://b/p"] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex64).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&format!("sha256:{colons}")).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn options_never_show_the_token() {
        let o = RemoteOptions { token: "secret-token-123".into(), ..Default::default() };
        assert!(!format!("{o:?}").contains("secret-token-123"));
    }
}
