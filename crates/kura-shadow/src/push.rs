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
const BATCH_DATA: usize = crate::capture::FLUSH_DATA;
/// Records per batch at most.
const BATCH_RECORDS: usize = crate::capture::FLUSH_RECORDS;
/// A burst of events ends after this long without one...
const QUIET: Duration = Duration::from_millis(2);
/// ...or this long after its first.
const COALESCE: Duration = Duration::from_millis(10);
/// A file kept open for writing is compared at least this often.
const WRITE_WAIT: Duration = Duration::from_secs(1);
/// With nothing to send, the primary asks for the standby's status this often: the standby
/// sees the primary alive, and a primary that was failed over learns it is fenced.
const HEARTBEAT: Duration = Duration::from_secs(10);

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
    /// Where this host remembers the epoch it pushes at (fencing survives restarts).
    pub state_dir: PathBuf,
}

/// What a host remembers of a stream between runs (`<state dir>/shadow-<id>.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PushState {
    /// Format version (1).
    pub version: u32,
    /// The stream's name (for people reading the file).
    pub stream: String,
    /// The epoch this host pushes at.
    pub epoch: u64,
    /// This host rejoined as a copy of the promoted primary: it does not push.
    #[serde(default)]
    pub rejoined: bool,
    /// The primary's newest record this copy holds (`kura shadow rejoin --follow`).
    #[serde(default)]
    pub followed: u64,
}

impl PushState {
    /// The state file of the stream whose chunk key is `id_key` (hex): one per stream, never
    /// shared by two streams that happen to have the same name or address.
    pub fn path(dir: &Path, id_key: &str) -> PathBuf {
        let h = blake3::derive_key("kura shadow push state 2026", id_key.as_bytes());
        dir.join(format!("shadow-{}.json", hex::encode(&h[..8])))
    }

    /// Reads the state (`None` when this host never pushed to the stream).
    pub fn load(p: &Path) -> Result<Option<PushState>, ShadowError> {
        match std::fs::read(p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| ShadowError::Corrupt { what: p.display().to_string(), detail: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShadowError::io(p, e)),
        }
    }

    /// Writes it atomically and durably.
    pub fn save(&self, p: &Path) -> Result<(), ShadowError> {
        let dir = p.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| ShadowError::io(dir, e))?;
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        let r = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, p)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        r.map_err(|e| ShadowError::io(p, e))
    }
}

/// The epoch this host may push at: the one it remembers, checked against the standby's. A
/// standby at a newer epoch was promoted, so this host is fenced; the first push remembers the
/// standby's.
pub fn checked_epoch(st: &StreamStatus, state_dir: &Path) -> Result<u64, ShadowError> {
    let p = PushState::path(state_dir, &st.id_key);
    match PushState::load(&p)? {
        None => {
            PushState { version: 1, stream: st.stream.clone(), epoch: st.epoch, rejoined: false, followed: 0 }.save(&p)?;
            Ok(st.epoch)
        }
        // Handed back (`kura shadow demote`) to this copy, which holds the last record of the
        // promoted epoch: it pushes at the new one.
        Some(mut mine) if mine.rejoined && handed_back(st, &mine) && mine.followed >= st.demoted_seq => {
            mine.epoch = st.epoch;
            mine.rejoined = false;
            mine.save(&p)?;
            Ok(st.epoch)
        }
        Some(mine) if mine.rejoined && handed_back(st, &mine) => Err(ShadowError::Fenced(format!(
            "stream {} was handed back at record {} but this copy holds only up to record {}: `kura shadow rejoin --source DIR --to URL` catches up, then it pushes",
            st.stream, st.demoted_seq, mine.followed
        ))),
        Some(mine) if mine.rejoined && mine.epoch == st.epoch => Err(ShadowError::Fenced(format!(
            "this host rejoined stream {} as a copy of its new primary (epoch {}): it does not push while that primary does ({} records it)",
            st.stream,
            st.epoch,
            p.display()
        ))),
        Some(mine) if mine.epoch < st.epoch => Err(ShadowError::Fenced(format!(
            "stream {} was promoted on the standby to epoch {} while this host pushed at epoch {}: this host is fenced and sends nothing; \
             `kura shadow rejoin --source DIR --to URL` keeps its changes as a branch and makes DIR a copy of the new primary",
            st.stream, st.epoch, mine.epoch
        ))),
        Some(mine) if mine.epoch > st.epoch => Err(ShadowError::Usage(format!(
            "this host pushed to stream {} at epoch {} but the standby's is at {}: it is not the stream this host knew (recreated?); remove {} to start over",
            st.stream,
            mine.epoch,
            st.epoch,
            p.display()
        ))),
        Some(mine) => Ok(mine.epoch),
    }
}

/// Whether the stream was handed back (demoted) after `mine` followed it, with nobody pushing
/// at the new epoch yet.
pub(crate) fn handed_back(st: &StreamStatus, mine: &PushState) -> bool {
    st.role == "standby" && st.demoted_seq > 0 && st.epoch > mine.epoch && st.head == st.demoted_seq
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

/// Where a primary's changes go: a standby over the network ([`Link`]), or a promoted
/// stream recording its own mirror in the same process.
pub trait Target: Sync {
    /// The stream's status (with the chunk key).
    fn status(&self) -> Result<StreamStatus, ShadowError>;
    /// The stream's tree as of its newest record.
    fn manifest(&self) -> Result<Manifest, ShadowError>;
    /// Appends a batch; returns the new head.
    fn append(&self, body: Vec<u8>) -> Result<u64, ShadowError>;
}

impl Target for Link {
    fn status(&self) -> Result<StreamStatus, ShadowError> {
        Link::status(self)
    }
    fn manifest(&self) -> Result<Manifest, ShadowError> {
        Link::manifest(self)
    }
    fn append(&self, body: Vec<u8>) -> Result<u64, ShadowError> {
        Link::append(self, body)
    }
}

/// A connection to the standby's stream.
#[derive(Clone)]
pub struct Link {
    client: reqwest::blocking::Client,
    base: String,
    token: String,
    /// `?last=true` on the next append (a branch's final batch).
    query: String,
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
        Ok(Link { client, base: format!("{server}/v1/shadow/{stream}"), token: token.to_string(), query: String::new() })
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

    /// The same stream's branch `name` (appends go to it).
    pub fn branch(&self, name: &str) -> Link {
        Link { base: format!("{}/branch/{name}", self.base), ..self.clone() }
    }

    /// Seals this branch link's branch (an empty final batch).
    pub fn seal(&self) -> Result<u64, ShadowError> {
        let body = BatchMeta { version: BATCH_VERSION, epoch: 0, records: Vec::new(), chunks: Vec::new() }.encode(&[]);
        Link { query: "?last=true".into(), ..self.clone() }.append(body)
    }

    /// The tree as of record `seq` (`None` when the journal no longer holds it).
    pub fn manifest_at(&self, seq: u64) -> Result<Option<Manifest>, ShadowError> {
        let (s, b) = self.send(self.client.get(format!("{}/manifest?seq={seq}", self.base)))?;
        match s {
            200 => Manifest::decode(&b).map(Some).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base))),
            404 => Ok(None),
            _ => Err(self.refusal(s, &b)),
        }
    }

    /// A chunk's plain bytes, checked against its id.
    pub fn chunk(&self, id: &kura_repo::Id, id_key: &[u8; 32]) -> Result<Vec<u8>, ShadowError> {
        let (s, b) = self.send(self.client.get(format!("{}/chunk/{}", self.base, id.to_hex())))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        if blake3::keyed_hash(id_key, &b).as_bytes() != &id.0 {
            return Err(ShadowError::Remote(format!("{}: chunk {} arrived damaged", self.base, id.short())));
        }
        Ok(b)
    }

    /// Asks the standby to hash its mirror and compare it with its journal (and, with
    /// `repair`, to rewrite what differs).
    pub fn verify(&self, repair: bool) -> Result<crate::verify::Verified, ShadowError> {
        let (s, b) = self.send(self.client.post(format!("{}/verify?repair={repair}", self.base)).timeout(Duration::from_secs(3600)))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        serde_json::from_slice(&b).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))
    }

    /// Promotes the stream (admin token): returns (epoch, promoted record, caught up).
    pub fn promote(&self) -> Result<(u64, u64, bool), ShadowError> {
        let (s, b) = self.send(self.client.post(format!("{}/promote", self.base)).timeout(Duration::from_secs(330)))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))?;
        Ok((v["epoch"].as_u64().unwrap_or(0), v["promoted_seq"].as_u64().unwrap_or(0), v["caught_up"].as_bool().unwrap_or(false)))
    }

    /// Hands a promoted stream back (admin token): returns (epoch, last record of the old one).
    pub fn demote(&self) -> Result<(u64, u64), ShadowError> {
        let (s, b) = self.send(self.client.post(format!("{}/demote", self.base)).timeout(Duration::from_secs(600)))?;
        if s != 200 {
            return Err(self.refusal(s, &b));
        }
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base)))?;
        Ok((v["epoch"].as_u64().unwrap_or(0), v["demoted_seq"].as_u64().unwrap_or(0)))
    }

    /// The durable records after `after`, waiting at most `wait` for one; `None` when `after`
    /// was pruned from the standby's journal.
    pub fn records(&self, after: u64, wait: Duration) -> Result<Option<crate::record::Records>, ShadowError> {
        let url = format!("{}/records?after={after}&timeout_ms={}", self.base, wait.as_millis());
        let (s, b) = self.send(self.client.get(url).timeout(wait + Duration::from_secs(30)))?;
        match s {
            200 => crate::record::Records::decode(&b, after).map(Some).map_err(|e| ShadowError::Remote(format!("{}: {e}", self.base))),
            410 => Ok(None),
            _ => Err(self.refusal(s, &b)),
        }
    }

    /// Appends a batch; returns the new head.
    pub fn append(&self, body: Vec<u8>) -> Result<u64, ShadowError> {
        let (s, b) = self.send(self.client.post(format!("{}/append{}", self.base, self.query)).body(body))?;
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
pub(crate) struct Session {
    pub(crate) cap: Capture,
    pub(crate) out: Outbox,
}

/// The sending half of a session: the next sequence number, the epoch, and the compressor.
pub(crate) struct Outbox {
    pub(crate) next: u64,
    pub(crate) epoch: u64,
    packer: crate::record::Packer,
}

/// The stream's chunk key, which the standby gives only to a token that may push.
pub(crate) fn id_key(st: &StreamStatus) -> Result<[u8; 32], ShadowError> {
    hex::decode(&st.id_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| ShadowError::Remote("the standby did not give this token the stream's chunk key (is it a shadow token of this stream?)".into()))
}

impl Session {
    /// Connects: the standby's status and tree. `state_dir`: where this host's epoch is kept
    /// (`None` for a stream recording its own mirror).
    pub(crate) fn start(link: &dyn Target, source: &Path, state_dir: Option<&Path>) -> Result<Session, ShadowError> {
        let st = link.status()?;
        let key = id_key(&st)?;
        let epoch = match state_dir {
            Some(d) => checked_epoch(&st, d)?,
            None => st.epoch,
        };
        let manifest = link.manifest()?;
        Ok(Session { cap: Capture::new(source, manifest, key, st.chunker_seed), out: Outbox::new(st.head + 1, epoch) })
    }

    /// Compares the whole tree and sends the differences, in batches as the scan finds them.
    /// Three threads: the scan reads, chunks and hashes; a packer compresses; a sender sends,
    /// so the standby checks and stores one batch while the next ones are read and compressed
    /// (one after the other, a first sync took the sum of all three).
    pub(crate) fn full_sync(&mut self, link: &dyn Target, sent: &mut Sent) -> Result<(), ShadowError> {
        let (cap, out) = (&mut self.cap, &mut self.out);
        std::thread::scope(|sc| {
            // One batch in flight and one waiting at each stage: enough to keep all busy.
            let (tx, rx) = mpsc::sync_channel::<Pending>(1);
            let (ptx, prx) = mpsc::sync_channel::<Pending>(1);
            let spawn_err = |e| ShadowError::Remote(format!("cannot start a sending thread: {e}"));
            let packer = std::thread::Builder::new()
                .name("kura-push-pack".into())
                .spawn_scoped(sc, move || {
                    let mut packer = crate::record::Packer::default();
                    for mut p in rx {
                        p.pack(&mut packer);
                        if ptx.send(p).is_err() {
                            return;
                        }
                    }
                })
                .map_err(spawn_err)?;
            let sender = std::thread::Builder::new()
                .name("kura-push-send".into())
                .spawn_scoped(sc, move || -> Result<(), ShadowError> {
                    for mut p in prx {
                        out.flush(link, &mut p, sent)?;
                    }
                    Ok(())
                })
                .map_err(spawn_err)?;
            let stopped = || ShadowError::Remote("the sending thread stopped".into());
            let mut p = Pending::default();
            let scanned = cap
                .full_scan_with(&mut p, &mut |p| tx.send(std::mem::take(p)).map_err(|_| stopped()))
                .and_then(|()| tx.send(p).map_err(|_| stopped()));
            drop(tx);
            let _ = packer.join();
            // The sender's error says why the scan stopped: it goes first.
            sender.join().unwrap_or_else(|_| Err(ShadowError::Remote("the sending thread panicked".into())))?;
            scanned
        })
    }

    pub(crate) fn flush(&mut self, link: &dyn Target, p: &mut Pending, sent: &mut Sent) -> Result<(), ShadowError> {
        self.out.flush(link, p, sent)
    }
}

impl Outbox {
    pub(crate) fn new(next: u64, epoch: u64) -> Outbox {
        Outbox { next, epoch, packer: crate::record::Packer::default() }
    }

    /// Sends pending changes in batches of at most [`BATCH_DATA`] bytes of chunks (more only
    /// for a single chunk) and [`BATCH_RECORDS`] records; a record's chunks travel in its batch
    /// or an earlier one (a large new file's chunks go ahead in batches of their own).
    pub(crate) fn flush(&mut self, link: &dyn Target, p: &mut Pending, sent: &mut Sent) -> Result<(), ShadowError> {
        let now = crate::now_ns();
        p.pack(&mut self.packer);
        p.packed = false;
        let (ops, marks, chunks, data) = (std::mem::take(&mut p.ops), std::mem::take(&mut p.marks), std::mem::take(&mut p.chunks), std::mem::take(&mut p.data));
        let new = |epoch| BatchMeta { version: BATCH_VERSION, epoch, records: Vec::new(), chunks: Vec::new() };
        let (mut batch, mut size, mut ci, mut from) = (new(self.epoch), 0usize, 0usize, 0usize);
        let mut send = |s: &mut Outbox, batch: &mut BatchMeta, size: &mut usize, from: &mut usize| -> Result<(), ShadowError> {
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
pub fn sync_once(link: &dyn Target, source: &Path, state_dir: Option<&Path>) -> Result<Sent, ShadowError> {
    let mut s = Session::start(link, source, state_dir)?;
    let mut sent = Sent { head: s.out.next - 1, ..Sent::default() };
    s.full_sync(link, &mut sent)?;
    Ok(sent)
}

/// Pushes until an unrecoverable error (a fenced primary, a missing source): reconnects with
/// backoff after anything else.
pub fn run(opts: &PushOptions) -> Result<Sent, ShadowError> {
    let link = Link::new(&opts.server, &opts.stream, &opts.token, opts.fingerprint.as_deref())?;
    if opts.once {
        return sync_once(&link, &opts.source, Some(&opts.state_dir));
    }
    follow(&link, &opts.source, opts.rescan_every, Some(&opts.state_dir), &|| false)
}

/// Watches `source` and sends its changes to `target` until `stop` says so (checked at least
/// every second) or an unrecoverable error.
pub fn follow(target: &dyn Target, source: &Path, rescan_every: Duration, state_dir: Option<&Path>, stop: &dyn Fn() -> bool) -> Result<Sent, ShadowError> {
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(tx).map_err(|e| ShadowError::Usage(format!("cannot watch {}: {e}", source.display())))?;
    watcher.watch(source, RecursiveMode::Recursive).map_err(|e| ShadowError::Usage(format!("cannot watch {}: {e}", source.display())))?;
    let mut backoff = Duration::from_millis(200);
    let mut total = Sent::default();
    while !stop() {
        match session(target, source, rescan_every, state_dir, &rx, &mut total, stop) {
            Err(e @ (ShadowError::Fenced(_) | ShadowError::Usage(_) | ShadowError::Denied(_))) => return Err(e),
            Err(ShadowError::Io { path, source: e }) if !source.exists() => return Err(ShadowError::Io { path, source: e }),
            Err(e) => {
                tracing::warn!("shadow push: {e}; reconnecting in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Ok(()) => backoff = Duration::from_millis(200),
        }
    }
    Ok(total)
}

/// One connected session: full comparison, then events until something fails.
fn session(
    link: &dyn Target,
    source: &Path,
    rescan_every: Duration,
    state_dir: Option<&Path>,
    rx: &mpsc::Receiver<notify::Result<notify::Event>>,
    total: &mut Sent,
    stop: &dyn Fn() -> bool,
) -> Result<(), ShadowError> {
    let mut s = Session::start(link, source, state_dir)?;
    // Events from before this comparison are covered by it.
    while rx.try_recv().is_ok() {}
    s.full_sync(link, total)?;
    let mut p = Pending::default();
    tracing::info!(head = total.head, "shadow push: in sync with the standby");
    let mut last_scan = Instant::now();
    let mut last_contact = Instant::now();
    // Files written to and not yet closed: compared at their close (a half-written file is a
    // state nobody wants on the standby), or after WRITE_WAIT for a writer that keeps its file
    // open (a log).
    let mut writing: std::collections::HashMap<Vec<u8>, Instant> = std::collections::HashMap::new();
    while !stop() {
        if last_contact.elapsed() >= HEARTBEAT {
            let st = link.status()?;
            if st.epoch != s.out.epoch || (state_dir.is_some() && st.role == "primary") {
                return Err(ShadowError::Fenced(format!(
                    "stream {} was promoted on the standby (epoch {}, this host pushes at {}): this host is fenced; `kura shadow rejoin` brings it back",
                    st.stream, st.epoch, s.out.epoch
                )));
            }
            last_contact = Instant::now();
        }
        let mut wait = rescan_every.saturating_sub(last_scan.elapsed()).min(Duration::from_secs(1));
        if let Some(oldest) = writing.values().min() {
            wait = wait.min(WRITE_WAIT.saturating_sub(oldest.elapsed()));
        }
        let wait = wait.max(Duration::from_millis(1));
        let first = match rx.recv_timeout(wait) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ShadowError::Usage("the file watcher stopped".into())),
        };
        let mut rescan = last_scan.elapsed() >= rescan_every;
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
                            match (relative(source, &ev.paths[0]), relative(source, &ev.paths[1])) {
                                (Some(from), Some(to)) => s.cap.renamed(&from, &to, &mut p)?,
                                (a, b) => dirty.extend(a.into_iter().chain(b)),
                            }
                        }
                        (EventKind::Access(AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)), _) => {}
                        (EventKind::Modify(ModifyKind::Data(_)) | EventKind::Create(notify::event::CreateKind::File), _) => {
                            for path in &ev.paths {
                                if let Some(rel) = relative(source, path) {
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
                                if let Some(rel) = relative(source, path) {
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
        dirty.extend(halves.iter().filter_map(|(_, path)| relative(source, path)));
        for d in dirty {
            s.cap.scan_path(&d, false, &mut p)?;
        }
        if rescan {
            s.flush(link, &mut p, total)?;
            s.full_sync(link, total)?;
            last_scan = Instant::now();
        }
        if !p.is_empty() {
            s.flush(link, &mut p, total)?;
            last_contact = Instant::now();
        }
    }
    Ok(())
}
