//! `kura shadow push`: the primary's loop. Connects to the standby, takes its tree, sends
//! what differs, then sends changes as the watcher reports them (with full rescans on start,
//! after an event-queue overflow and on a schedule: the watcher is a hint, the scans are the
//! truth). Any failure (network, refusal, restart of either side) ends in a reconnect and a
//! fresh comparison with the standby's tree, so nothing acknowledged is ever sent twice and
//! nothing unacknowledged is lost.

use crate::capture::{Capture, Pending, relative};
use crate::record::{BATCH_VERSION, BatchMeta, Record};
use crate::stream::StreamStatus;
use crate::{Manifest, ShadowError};
use kura_store::remote::chain;
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Batches are sent once this much chunk data is pending, without waiting for more events.
const BATCH_DATA: usize = 8 << 20;
/// Records per batch at most.
const BATCH_RECORDS: usize = 4096;
/// A burst of events ends after this long without one...
const QUIET: Duration = Duration::from_millis(2);
/// ...or this long after its first.
const COALESCE: Duration = Duration::from_millis(10);
/// A file kept open for writing is compared at least this often.
const WRITE_WAIT: Duration = Duration::from_secs(1);

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The tree to shadow.
    pub source: PathBuf,
    /// `https://HOST:PORT` of the standby.
    pub server: String,
    /// Stream name.
    pub stream: String,
    /// Bearer token (a `shadow` token of the stream).
    pub token: String,
    /// Pinned certificate fingerprint.
    pub fingerprint: Option<String>,
    /// Full rescans at this interval.
    pub rescan_every: Duration,
    /// Sync once and return (no watching).
    pub once: bool,
}

/// What a sync sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Records.
    pub records: u64,
    /// Chunk bytes (compressed).
    pub bytes: u64,
    /// The standby's newest record afterwards.
    pub head: u64,
}

/// A connection to the standby's stream.
pub struct Link {
    client: reqwest::blocking::Client,
    base: String,
    token: String,
}

impl Link {
    /// Prepares the client (nothing is sent yet).
    pub fn new(server: &str, stream: &str, token: &str, fingerprint: Option<&str>) -> Result<Link, ShadowError> {
        kura_store::remote::install_crypto_provider();
        let mut b = reqwest::blocking::Client::builder()
            .user_agent(concat!("kura/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(20));
        if let Some(fp) = fingerprint {
            b = b.tls_backend_preconfigured(kura_store::remote::pinned_config(fp).map_err(ShadowError::Usage)?);
        }
        let client = b.build().map_err(|e| ShadowError::Remote(format!("{server}: {e}")))?;
        Ok(Link { client, base: format!("{server}/v1/shadow/{stream}"), token: token.to_string() })
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<(u16, Vec<u8>), ShadowError> {
        let r = req.bearer_auth(&self.token).send().map_err(|e| ShadowError::Remote(format!("{}: {}", self.base, chain(&e))))?;
        let status = r.status().as_u16();
        let body = r.bytes().map_err(|e| ShadowError::Remote(format!("{}: {}", self.base, chain(&e))))?.to_vec();
        Ok((status, body))
    }

    fn refusal(&self, status: u16, body: &[u8]) -> ShadowError {
        let msg = String::from_utf8_lossy(body).trim().to_string();
        let msg = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string)).unwrap_or(msg);
        match status {
            423 => return ShadowError::Fenced(format!("{}: {msg}", self.base)),
            401 | 403 => return ShadowError::Denied(format!("{} answered {status}: {msg}", self.base)),
            _ => {}
        }
        ShadowError::Remote(format!("{} answered {status}: {msg}", self.base))
    }

    /// The stream's status.
    pub fn status(&self) -> Result<StreamStatus, ShadowError> {
        let (s, b) = self.send(self.client.get(&self.base))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        serde_json::from_slice(&b).map_err(|e| ShadowError::Remote(format!("{}: bad status: {e}", self.base)))
    }

    /// The standby's tree as of its newest record.
    pub fn manifest(&self) -> Result<Manifest, ShadowError> {
        let (s, b) = self.send(self.client.get(format!("{}/manifest", self.base)))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        Manifest::decode(&b).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))
    }

    /// Appends a batch; returns the new head.
    pub fn append(&self, body: Vec<u8>) -> Result<u64, ShadowError> {
        let (s, b) = self.send(self.client.post(format!("{}/append", self.base)).body(body))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))?;
        v.get("head").and_then(|h| h.as_u64()).ok_or_else(|| ShadowError::Remote(format!("{}: no head in the answer", self.base)))
    }

    /// An operator's `release` or `discard` of held changes; returns what was held.
    pub fn operate(&self, verb: &str) -> Result<crate::Held, ShadowError> {
        let (s, b) = self.send(self.client.post(format!("{}/{verb}", self.base)))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))?;
        serde_json::from_value(v["held"].clone()).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))
    }

    /// Waits until record `seq` is applied on the standby (at most `timeout`).
    pub fn wait(&self, seq: u64, timeout: Duration) -> Result<bool, ShadowError> {
        let (s, b) = self.send(self.client.get(format!("{}/wait?seq={seq}&timeout_ms={}", self.base, timeout.as_millis())).timeout(timeout + Duration::from_secs(30)))?;
        match s {
            200 => Ok(true),
            408 => Ok(false),
            _ => Err(self.refusal(s, &b)),
        }
    }
}

/// One connected session: the capture state, the next sequence number and the epoch.
struct Session {
    cap: Capture,
    next: u64,
    epoch: u64,
}

impl Session {
    fn start(link: &Link, source: &Path) -> Result<Session, ShadowError> {
        let st = link.status()?;
        let key: [u8; 32] = hex::decode(&st.id_key).ok().and_then(|k| k.try_into().ok()).ok_or_else(|| ShadowError::Remote("the standby did not give this token the stream's chunk key (is it a shadow token of this stream?)".into()))?;
        let manifest = link.manifest()?;
        Ok(Session { cap: Capture::new(source, manifest, key, st.chunker_seed), next: st.head + 1, epoch: st.epoch })
    }

    /// Sends pending changes in batches of at most [`BATCH_DATA`] bytes of chunks (more only
    /// for a single chunk) and [`BATCH_RECORDS`] records; a record's chunks travel in its batch
    /// or an earlier one (a large new file's chunks go ahead in batches of their own).
    fn flush(&mut self, link: &Link, p: &mut Pending, sent: &mut Sent) -> Result<(), ShadowError> {
        let now = crate::now_ns();
        let (ops, marks, chunks, data) = (std::mem::take(&mut p.ops), std::mem::take(&mut p.marks), std::mem::take(&mut p.chunks), std::mem::take(&mut p.data));
        let new = |epoch| BatchMeta { version: BATCH_VERSION, epoch, records: Vec::new(), chunks: Vec::new() };
        let (mut batch, mut size, mut ci, mut from) = (new(self.epoch), 0usize, 0usize, 0usize);
        let mut send = |s: &mut Session, batch: &mut BatchMeta, size: &mut usize, from: &mut usize| -> Result<(), ShadowError> {
            for (i, r) in batch.records.iter_mut().enumerate() {
                r.seq = s.next + i as u64;
            }
            let body = batch.encode(&data[*from..*from + *size]);
            let head = link.append(body)?;
            sent.records += batch.records.len() as u64;
            sent.bytes += *size as u64;
            sent.head = head;
            s.next = head + 1;
            *from += *size;
            *size = 0;
            *batch = new(s.epoch);
            Ok(())
        };
        for (op, mark) in ops.into_iter().zip(marks) {
            while ci < mark {
                let c = chunks[ci];
                if size + c.zlen as usize > BATCH_DATA && (size > 0 || !batch.records.is_empty()) {
                    send(self, &mut batch, &mut size, &mut from)?;
                }
                batch.chunks.push(c);
                size += c.zlen as usize;
                ci += 1;
            }
            batch.records.push(Record { seq: 0, at_ns: now, op });
            if batch.records.len() >= BATCH_RECORDS {
                send(self, &mut batch, &mut size, &mut from)?;
            }
        }
        if !batch.records.is_empty() || size > 0 {
            send(self, &mut batch, &mut size, &mut from)?;
        }
        Ok(())
    }
}

/// Syncs the tree once: connects, compares everything, sends the differences.
pub fn sync_once(link: &Link, source: &Path) -> Result<Sent, ShadowError> {
    let mut s = Session::start(link, source)?;
    let mut p = Pending::default();
    s.cap.full_scan(&mut p)?;
    let mut sent = Sent { head: s.next - 1, ..Sent::default() };
    s.flush(link, &mut p, &mut sent)?;
    Ok(sent)
}

/// Pushes until an unrecoverable error (a fenced primary, a missing source): reconnects with
/// backoff after anything else.
pub fn run(opts: &PushOptions) -> Result<Sent, ShadowError> {
    let link = Link::new(&opts.server, &opts.stream, &opts.token, opts.fingerprint.as_deref())?;
    if opts.once {
        return sync_once(&link, &opts.source);
    }
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(tx).map_err(|e| ShadowError::Usage(format!("cannot watch {}: {e}", opts.source.display())))?;
    watcher
        .watch(&opts.source, RecursiveMode::Recursive)
        .map_err(|e| ShadowError::Usage(format!("cannot watch {}: {e}", opts.source.display())))?;
    let mut backoff = Duration::from_millis(200);
    let mut total = Sent::default();
    loop {
        match session(&link, opts, &rx, &mut total) {
            Err(e @ (ShadowError::Fenced(_) | ShadowError::Usage(_) | ShadowError::Denied(_))) => return Err(e),
            Err(ShadowError::Io { path, source }) if !opts.source.exists() => return Err(ShadowError::Io { path, source }),
            Err(e) => {
                tracing::warn!("shadow push: {e}; reconnecting in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Ok(()) => backoff = Duration::from_millis(200),
        }
    }
}

/// One connected session: full comparison, then events until something fails.
fn session(link: &Link, opts: &PushOptions, rx: &mpsc::Receiver<notify::Result<notify::Event>>, total: &mut Sent) -> Result<(), ShadowError> {
    let mut s = Session::start(link, &opts.source)?;
    // Events from before this comparison are covered by it.
    while rx.try_recv().is_ok() {}
    let mut p = Pending::default();
    s.cap.full_scan(&mut p)?;
    s.flush(link, &mut p, total)?;
    tracing::info!(head = total.head, "shadow push: in sync with the standby");
    let mut last_scan = Instant::now();
    // Files written to and not yet closed: compared at their close (a half-written file is a
    // state nobody wants on the standby), or after WRITE_WAIT for a writer that keeps its file
    // open (a log).
    let mut writing: std::collections::HashMap<Vec<u8>, Instant> = std::collections::HashMap::new();
    loop {
        let mut wait = opts.rescan_every.saturating_sub(last_scan.elapsed());
        if let Some(oldest) = writing.values().min() {
            wait = wait.min(WRITE_WAIT.saturating_sub(oldest.elapsed()));
        }
        let wait = wait.max(Duration::from_millis(1));
        let first = match rx.recv_timeout(wait) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ShadowError::Usage("the file watcher stopped".into())),
        };
        let mut rescan = last_scan.elapsed() >= opts.rescan_every;
        let mut events = Vec::new();
        events.extend(first);
        // A file is usually created, written and closed in a few syscalls: wait for the rest
        // of such a burst (a few ms, at most COALESCE) and compare each path once.
        let burst = Instant::now();
        while events.len() < BATCH_RECORDS && burst.elapsed() < COALESCE {
            match rx.recv_timeout(QUIET) {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let mut dirty: Vec<Vec<u8>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // The two halves of a rename (inotify's cookie pairs them) wait for their pairing, so
        // a moved directory is one record, not a delete and a copy.
        let mut halves: Vec<(usize, std::path::PathBuf)> = Vec::new();
        for ev in events {
            match ev {
                Err(e) => {
                    tracing::warn!("file watcher: {e}; rescanning");
                    rescan = true;
                }
                Ok(ev) if ev.need_rescan() => rescan = true,
                Ok(ev) => {
                    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
                    match (ev.kind, ev.tracker()) {
                        (EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::To)), Some(t)) => halves.extend(ev.paths.iter().map(|p| (t, p.clone()))),
                        (EventKind::Modify(ModifyKind::Name(RenameMode::Both)), t) if ev.paths.len() == 2 => {
                            halves.retain(|(h, _)| Some(*h) != t);
                            // What came before the rename is compared before it.
                            for d in dirty.drain(..) {
                                s.cap.scan_path(&d, false, &mut p)?;
                            }
                            seen.clear();
                            match (relative(&opts.source, &ev.paths[0]), relative(&opts.source, &ev.paths[1])) {
                                (Some(from), Some(to)) => s.cap.renamed(&from, &to, &mut p)?,
                                (a, b) => dirty.extend(a.into_iter().chain(b)),
                            }
                        }
                        (EventKind::Access(AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)), _) => {}
                        (EventKind::Modify(ModifyKind::Data(_)) | EventKind::Create(notify::event::CreateKind::File), _) => {
                            for path in &ev.paths {
                                if let Some(rel) = relative(&opts.source, path) {
                                    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                                        writing.entry(rel).or_insert_with(Instant::now);
                                    } else if seen.insert(rel.clone()) {
                                        dirty.push(rel);
                                    }
                                }
                            }
                        }
                        _ => {
                            for path in &ev.paths {
                                if let Some(rel) = relative(&opts.source, path) {
                                    writing.remove(&rel);
                                    if seen.insert(rel.clone()) {
                                        dirty.push(rel);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if p.data.len() >= BATCH_DATA {
                s.flush(link, &mut p, total)?;
            }
        }
        for (rel, since) in writing.iter_mut() {
            if since.elapsed() >= WRITE_WAIT {
                *since = Instant::now();
                if seen.insert(rel.clone()) {
                    dirty.push(rel.clone());
                }
            }
        }
        // Halves never paired: moved in from or out to another place.
        dirty.extend(halves.iter().filter_map(|(_, path)| relative(&opts.source, path)));
        for d in dirty {
            s.cap.scan_path(&d, false, &mut p)?;
        }
        if rescan {
            s.cap.full_scan(&mut p)?;
            last_scan = Instant::now();
        }
        if !p.is_empty() {
            s.flush(link, &mut p, total)?;
        }
    }
}
