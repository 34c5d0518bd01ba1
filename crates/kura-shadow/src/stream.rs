//! A stream on the standby: its journal, the tree as of its newest record, and the applier
//! thread that replays records onto the mirror (after `apply_delay`, when one is set).

use crate::apply::{self, Chunks};
use crate::journal::{Journal, StreamFile};
use crate::record::{BatchMeta, Op, open_chunk};
use crate::{Manifest, ShadowError};
use kura_repo::{Id, NodeKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Why a batch was not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Not a valid batch (HTTP 400).
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// Its first record is not the next one (HTTP 409): the primary resynchronises.
    #[error("expected record {expected}, batch starts at {got}")]
    OutOfOrder {
        /// The next sequence number the journal takes.
        expected: u64,
        /// The batch's first.
        got: u64,
    },
    /// Files name chunks neither the journal nor the batch holds (HTTP 412).
    #[error("{} chunks are missing", .0.len())]
    Missing(Vec<Id>),
    /// The stream moved to a newer epoch (failover): this primary is fenced (HTTP 423).
    #[error("fenced: the stream is at epoch {stream}, this primary at {primary}")]
    Fenced {
        /// The stream's epoch.
        stream: u64,
        /// The batch's.
        primary: u64,
    },
    /// The journal could not be written (HTTP 507 for a full disk, else 500).
    #[error(transparent)]
    Store(#[from] ShadowError),
}

/// What `GET /v1/shadow/STREAM` reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    /// Stream name.
    pub stream: String,
    /// Failover epoch.
    pub epoch: u64,
    /// Newest journalled record.
    pub head: u64,
    /// Newest record applied to the mirror.
    pub applied: u64,
    /// Receive time of the newest record (ns), 0 when none.
    pub head_time_ns: i64,
    /// Receive time of the oldest record kept (ns): the window starts here.
    pub oldest_time_ns: i64,
    /// Records kept.
    pub records: u64,
    /// Distinct chunks kept, and journal bytes.
    pub chunks: u64,
    /// Bytes of journal segments.
    pub journal_bytes: u64,
    /// The last error of the applier, if it is stuck.
    pub apply_error: Option<String>,
    /// Hex id key and chunker seed (only for a token of the stream; empty otherwise).
    #[serde(default)]
    pub id_key: String,
    /// Chunker seed.
    #[serde(default)]
    pub chunker_seed: u64,
}

struct Inner {
    journal: Journal,
    head: Manifest,
}

/// A stream being received.
pub struct Stream {
    name: String,
    mirror: PathBuf,
    apply_delay: Duration,
    file: StreamFile,
    inner: Mutex<Inner>,
    applied: AtomicU64,
    /// Woken on appends (for the applier) and on applies (for waiters).
    changed: Condvar,
    lock: Mutex<()>,
    apply_error: Mutex<Option<String>>,
    stop: AtomicBool,
    dir: PathBuf,
}

struct JournalChunks<'a>(&'a Stream);

impl Chunks for JournalChunks<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        let h = self.0.lock_inner().journal.chunk(id);
        h.ok_or_else(|| ShadowError::Corrupt { what: format!("stream {}", self.0.name), detail: format!("chunk {} is not in the journal", id.short()) })?
            .read(&self.0.file.id_key())
    }
}

impl Stream {
    /// Opens (creating on first use) the stream kept in `dir` and starts applying it to
    /// `mirror`: the mirror is first made equal to the state at the last applied record.
    pub fn open(name: &str, dir: &Path, mirror: &Path, apply_delay: Duration) -> Result<Arc<Stream>, ShadowError> {
        let mut file = StreamFile::load(dir, true)?;
        let journal = Journal::open(&dir.join("journal"), file.id_key(), false)?;
        if file.mirror.as_deref() != Some(mirror) {
            // The mirror is made equal to the journal, removing everything else: only ever in
            // a directory that is empty or already this stream's.
            let used = std::fs::read_dir(mirror).map(|mut d| d.next().is_some()).unwrap_or(false);
            if used {
                let why = match &file.mirror {
                    Some(m) => format!("this stream's mirror was {}", m.display()),
                    None => "a new stream needs an empty or new directory".into(),
                };
                return Err(ShadowError::Usage(format!("mirror {} is not empty and not this stream's ({why}); kura would replace its contents", mirror.display())));
            }
            file.mirror = Some(mirror.to_path_buf());
            file.save(dir)?;
        }
        let head = journal.manifest_at(journal.head());
        let applied = std::fs::read_to_string(dir.join("applied")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0).min(journal.head());
        let s = Arc::new(Stream {
            name: name.to_string(),
            mirror: mirror.to_path_buf(),
            apply_delay,
            file,
            inner: Mutex::new(Inner { journal, head }),
            applied: AtomicU64::new(applied),
            changed: Condvar::new(),
            lock: Mutex::new(()),
            apply_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            dir: dir.to_path_buf(),
        });
        let at = s.lock_inner().journal.manifest_at(applied);
        let r = apply::reconcile(mirror, &at, &JournalChunks(&s))?;
        if r != apply::Reconciled::default() {
            tracing::info!(stream = name, written = r.written, removed = r.removed, "mirror reconciled with the journal at record {applied}");
        }
        let me = s.clone();
        std::thread::Builder::new()
            .name(format!("kura-apply-{name}"))
            .spawn(move || me.apply_loop())
            .map_err(|e| ShadowError::io(mirror, e))?;
        Ok(s)
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the applier (at the next record).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Checks and appends a batch; returns the new head once it is durable.
    pub fn append(&self, body: &[u8]) -> Result<u64, AppendError> {
        let (meta, data_off) = BatchMeta::decode(body).map_err(AppendError::Malformed)?;
        let key = self.file.id_key();
        // Chunks are checked against their ids before the lock: the costly part.
        let mut off = data_off;
        for c in &meta.chunks {
            let stored = &body[off..off + c.zlen as usize];
            open_chunk(&key, c, stored).map_err(AppendError::Malformed)?;
            off += c.zlen as usize;
        }
        let mut inner = self.lock_inner();
        if meta.epoch < self.file.epoch {
            return Err(AppendError::Fenced { stream: self.file.epoch, primary: meta.epoch });
        }
        let expected = inner.journal.head() + 1;
        // A batch of chunks alone carries a large file's data ahead of its record.
        if let Some(first) = meta.records.first()
            && first.seq != expected
        {
            return Err(AppendError::OutOfOrder { expected, got: first.seq });
        }
        if meta.records.is_empty() && meta.chunks.is_empty() {
            return Ok(expected - 1);
        }
        let in_batch: std::collections::HashSet<Id> = meta.chunks.iter().map(|c| c.id).collect();
        let mut missing: Vec<Id> = meta
            .records
            .iter()
            .filter_map(|r| match &r.op {
                Op::Put { node, .. } if node.kind == NodeKind::File => Some(node.content.iter()),
                _ => None,
            })
            .flatten()
            .filter(|id| !in_batch.contains(id) && !inner.journal.has_chunk(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Err(AppendError::Missing(missing));
        }
        inner.journal.append(body, &meta, data_off)?;
        for r in &meta.records {
            inner.head.apply(&r.op);
        }
        let head = inner.journal.head();
        drop(inner);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
        Ok(head)
    }

    /// The tree as of the newest record, encoded.
    pub fn manifest(&self) -> Vec<u8> {
        self.lock_inner().head.encode()
    }

    /// Status figures; `secrets` adds the id key and chunker seed (for the stream's own token).
    pub fn status(&self, secrets: bool) -> StreamStatus {
        let inner = self.lock_inner();
        let e = inner.journal.entries();
        let (chunks, bytes) = inner.journal.sizes();
        StreamStatus {
            stream: self.name.clone(),
            epoch: self.file.epoch,
            head: inner.journal.head(),
            applied: self.applied.load(Ordering::SeqCst),
            head_time_ns: e.last().map(|e| e.recv_ns).unwrap_or(0),
            oldest_time_ns: e.first().map(|e| e.recv_ns).unwrap_or(0),
            records: e.len() as u64,
            chunks: chunks as u64,
            journal_bytes: bytes,
            apply_error: self.apply_error.lock().ok().and_then(|e| e.clone()),
            id_key: if secrets { hex::encode(self.file.id_key()) } else { String::new() },
            chunker_seed: if secrets { self.file.chunker_seed() } else { 0 },
        }
    }

    /// Waits until record `seq` is applied to the mirror, at most `timeout`; returns whether it is.
    pub fn wait_applied(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.applied.load(Ordering::SeqCst) < seq {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.changed.wait_timeout(g, left.min(Duration::from_millis(200))).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Applies records as they arrive (each once its delay has passed), noting progress in
    /// `applied`. A failure (full disk) is reported in the status and retried.
    fn apply_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        while !self.stop.load(Ordering::SeqCst) {
            let applied = self.applied.load(Ordering::SeqCst);
            let now = crate::now_ns();
            let delay = i64::try_from(self.apply_delay.as_nanos()).unwrap_or(i64::MAX);
            let (batch, next_due): (Vec<(u64, Op)>, Option<i64>) = {
                let inner = self.lock_inner();
                let e = inner.journal.entries();
                let start = e.partition_point(|e| e.seq <= applied);
                let mut out = Vec::new();
                let mut due = None;
                for e in &e[start..] {
                    if e.recv_ns.saturating_add(delay) > now {
                        due = Some(e.recv_ns.saturating_add(delay));
                        break;
                    }
                    out.push((e.seq, e.op.clone()));
                    if out.len() >= 256 {
                        break;
                    }
                }
                (out, due)
            };
            if batch.is_empty() {
                let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                // Appends notify under `lock`: checked here under it, no wake-up is lost.
                if next_due.is_none() && self.lock_inner().journal.head() > applied {
                    continue;
                }
                let wait = next_due.map(|d| Duration::from_nanos(d.saturating_sub(now).max(0) as u64)).unwrap_or(Duration::from_secs(1));
                let _ = self.changed.wait_timeout(g, wait.min(Duration::from_secs(1)));
                continue;
            }
            let mut done = applied;
            let mut failed = None;
            for (seq, op) in &batch {
                match apply::apply(&self.mirror, op, &JournalChunks(&self)) {
                    Ok(()) => done = *seq,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if done > applied {
                self.applied.store(done, Ordering::SeqCst);
                // Renamed into place: a torn number would send the reconcile back to the start.
                let tmp = self.dir.join(".applied.tmp");
                if std::fs::write(&tmp, done.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, self.dir.join("applied"));
                }
                let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                self.changed.notify_all();
            }
            match failed {
                Some(e) => {
                    tracing::warn!(stream = %self.name, "cannot apply record {}: {e}", done + 1);
                    if let Ok(mut a) = self.apply_error.lock() {
                        *a = Some(format!("record {}: {e}", done + 1));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                None => {
                    backoff = Duration::from_millis(100);
                    if let Ok(mut a) = self.apply_error.lock() {
                        *a = None;
                    }
                }
            }
        }
    }
}
