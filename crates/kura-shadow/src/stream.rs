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
    /// Newest record synced to disk.
    #[serde(default)]
    pub durable: u64,
    /// Receive time of the newest record (ns), 0 when none.
    pub head_time_ns: i64,
    /// Receive time of the oldest record kept (ns): the window starts here.
    pub oldest_time_ns: i64,
    /// Records kept.
    pub records: u64,
    /// Distinct chunks kept, and journal bytes.
    pub chunks: u64,
    /// Bytes of journal segments and packs.
    pub journal_bytes: u64,
    /// Records older than this are folded into the base (0: kept for ever).
    #[serde(default)]
    pub window_secs: u64,
    /// The newest record folded into the base (0 when nothing was pruned yet).
    #[serde(default)]
    pub base_seq: u64,
    /// The last error of the applier, if it is stuck.
    pub apply_error: Option<String>,
    /// A mass deletion the breaker holds (the mirror is kept until release or discard).
    #[serde(default)]
    pub held: Option<Held>,
    /// Records never applied because an operator discarded them.
    #[serde(default)]
    pub discarded: u64,
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
    window: Duration,
    file: StreamFile,
    inner: Mutex<Inner>,
    applied: AtomicU64,
    /// Newest record synced to disk (an append is answered once written; a syncer thread makes
    /// batches durable together).
    durable: AtomicU64,
    /// A failed sync: the journal's tail is in doubt until the standby restarts (and cuts it).
    sync_failed: Mutex<Option<String>>,
    /// Woken on appends (for the applier) and on applies (for waiters).
    changed: Condvar,
    lock: Mutex<()>,
    apply_error: Mutex<Option<String>>,
    stop: AtomicBool,
    dir: PathBuf,
    breaker: Breaker,
    /// The burst the breaker holds, if any.
    held: Mutex<Option<Held>>,
    /// Records up to this one pass the breaker (released by an operator).
    release_upto: AtomicU64,
    /// Destructive records up to this one are not applied (discarded by an operator).
    discard_upto: AtomicU64,
    /// Records never applied to the mirror (kept in `<dir>/discarded`).
    discarded: Mutex<std::collections::BTreeSet<u64>>,
}

/// How a stream is received.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamOptions {
    /// Apply records only this long after they arrived.
    pub apply_delay: Duration,
    /// The mass-deletion breaker.
    pub breaker: Breaker,
    /// How long records are kept (restorable); zero keeps them for ever.
    pub window: Duration,
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
    pub fn open(name: &str, dir: &Path, mirror: &Path, opts: StreamOptions) -> Result<Arc<Stream>, ShadowError> {
        let mut file = StreamFile::load(dir, true)?;
        let mut journal = Journal::open(&dir.join("journal"), file.id_key(), false)?;
        if !opts.window.is_zero() {
            journal.set_segment_age(opts.window / 8);
        }
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
        let applied = std::fs::read_to_string(dir.join("applied")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0).min(journal.head()).max(journal.base().seq);
        let discarded: std::collections::BTreeSet<u64> =
            std::fs::read_to_string(dir.join("discarded")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect();
        // Discarded records the journal lost with a torn tail are not the records that the
        // primary sends again under the same numbers.
        let discarded: std::collections::BTreeSet<u64> = discarded.into_iter().filter(|s| *s <= journal.head()).collect();
        let s = Arc::new(Stream {
            name: name.to_string(),
            mirror: mirror.to_path_buf(),
            apply_delay: opts.apply_delay,
            window: opts.window,
            file,
            inner: Mutex::new(Inner { journal, head }),
            applied: AtomicU64::new(applied),
            durable: AtomicU64::new(0),
            sync_failed: Mutex::new(None),
            changed: Condvar::new(),
            lock: Mutex::new(()),
            apply_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            breaker: opts.breaker,
            held: Mutex::new(None),
            release_upto: AtomicU64::new(0),
            discard_upto: AtomicU64::new(0),
            discarded: Mutex::new(discarded.clone()),
        });
        let at = s.lock_inner().journal.manifest_skipping(applied, &discarded);
        let r = apply::reconcile(mirror, &at, &JournalChunks(&s))?;
        if r != apply::Reconciled::default() {
            tracing::info!(stream = name, written = r.written, removed = r.removed, "mirror reconciled with the journal at record {applied}");
        }
        s.durable.store(s.lock_inner().journal.head(), Ordering::SeqCst);
        let me = s.clone();
        std::thread::Builder::new()
            .name(format!("kura-apply-{name}"))
            .spawn(move || me.apply_loop())
            .map_err(|e| ShadowError::io(mirror, e))?;
        let me = s.clone();
        std::thread::Builder::new()
            .name(format!("kura-sync-{name}"))
            .spawn(move || me.sync_loop())
            .map_err(|e| ShadowError::io(mirror, e))?;
        if !opts.window.is_zero() {
            let me = s.clone();
            std::thread::Builder::new()
                .name(format!("kura-prune-{name}"))
                .spawn(move || me.prune_loop())
                .map_err(|e| ShadowError::io(mirror, e))?;
        }
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

    /// Checks and appends a batch; returns the new head once it is written (the syncer makes it
    /// durable within milliseconds; `wait_applied` waits for that).
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
        if let Some(e) = self.sync_failed.lock().ok().and_then(|f| f.clone()) {
            return Err(AppendError::Store(ShadowError::Corrupt { what: format!("stream {}", self.name), detail: format!("{e}; restart the standby") }));
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
            durable: self.durable.load(Ordering::SeqCst),
            head_time_ns: e.last().map(|e| e.recv_ns).unwrap_or(inner.journal.base().recv_ns),
            oldest_time_ns: inner.journal.oldest_time(),
            records: e.len() as u64,
            chunks: chunks as u64,
            journal_bytes: bytes,
            window_secs: self.window.as_secs(),
            base_seq: inner.journal.base().seq,
            apply_error: self.apply_error.lock().ok().and_then(|e| e.clone()),
            held: self.held.lock().ok().and_then(|h| h.clone()),
            discarded: self.discarded.lock().map(|d| d.len() as u64).unwrap_or(0),
            id_key: if secrets { hex::encode(self.file.id_key()) } else { String::new() },
            chunker_seed: if secrets { self.file.chunker_seed() } else { 0 },
        }
    }

    /// Waits until record `seq` is durable in the journal and applied to the mirror, at most
    /// `timeout`; returns whether it is.
    pub fn wait_applied(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.applied.load(Ordering::SeqCst) < seq || self.durable.load(Ordering::SeqCst) < seq {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.changed.wait_timeout(g, left.min(Duration::from_millis(200))).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Prunes the journal to its window now and then, until the stream stops.
    fn prune_loop(self: Arc<Self>) {
        let every = (self.window / 10).clamp(Duration::from_millis(200), Duration::from_secs(60));
        let mut last = std::time::Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100).min(every));
            if last.elapsed() < every {
                continue;
            }
            last = std::time::Instant::now();
            if let Err(e) = self.prune() {
                tracing::error!(stream = %self.name, "cannot prune the journal to its window: {e}");
            }
        }
    }

    /// One pruning round: records older than the window that are applied and durable are
    /// folded into the journal's base; returns the records and bytes pruned. The costly part
    /// (the new base, the pack of chunks that stay) runs without the stream's lock.
    pub fn prune(&self) -> Result<(u64, u64), ShadowError> {
        if self.window.is_zero() {
            return Ok((0, 0));
        }
        let before = crate::now_ns().saturating_sub(i64::try_from(self.window.as_nanos()).unwrap_or(i64::MAX));
        let upto = self.applied.load(Ordering::SeqCst).min(self.durable.load(Ordering::SeqCst));
        let Some(plan) = self.lock_inner().journal.prune_plan(before, upto) else {
            return Ok((0, 0));
        };
        let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
        let built = plan.build(&skip)?;
        let cleanup = self.lock_inner().journal.prune_commit(built)?;
        let done = (cleanup.records, cleanup.bytes);
        cleanup.finish()?;
        tracing::info!(stream = %self.name, records = done.0, bytes = done.1, "journal pruned to its window");
        Ok(done)
    }

    /// Syncs the journal whenever records are written but not durable: every append waiting
    /// meanwhile shares one `fdatasync` (group commit).
    fn sync_loop(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            let (head, seg) = {
                let inner = self.lock_inner();
                (inner.journal.head(), inner.journal.last_segment())
            };
            if head <= self.durable.load(Ordering::SeqCst) {
                let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                if self.lock_inner().journal.head() <= self.durable.load(Ordering::SeqCst) {
                    let _ = self.changed.wait_timeout(g, Duration::from_secs(1));
                }
                continue;
            }
            if let Some((file, path)) = seg
                && let Err(e) = file.sync_data()
            {
                tracing::error!(stream = %self.name, "cannot sync the journal {}: {e}", path.display());
                if let Ok(mut f) = self.sync_failed.lock() {
                    *f = Some(format!("journal {} could not be synced: {e}", path.display()));
                }
                return;
            }
            self.durable.store(head, Ordering::SeqCst);
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }

    /// Applies records as they arrive (each once its delay has passed), noting progress in
    /// `applied`. A failure (full disk) is reported in the status and retried. The breaker holds
    /// a burst of deletions before it reaches the mirror.
    fn apply_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut window = BurstWindow::default();
        // The mirror's tree (the journal's, without discarded deletions).
        let mut tree = {
            let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
            self.lock_inner().journal.manifest_skipping(self.applied.load(Ordering::SeqCst), &skip)
        };
        while !self.stop.load(Ordering::SeqCst) {
            let applied = self.applied.load(Ordering::SeqCst);
            let now = crate::now_ns();
            let delay = i64::try_from(self.apply_delay.as_nanos()).unwrap_or(i64::MAX);
            let held = self.held.lock().map(|h| h.is_some()).unwrap_or(false);
            let (batch, next_due): (Vec<(u64, i64, Op)>, Option<i64>) = if held {
                (Vec::new(), None)
            } else {
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
                    out.push((e.seq, e.recv_ns, e.op.clone()));
                    if out.len() >= 256 {
                        break;
                    }
                }
                (out, due)
            };
            if batch.is_empty() {
                let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                // Appends notify under `lock`: checked here under it, no wake-up is lost.
                if !held && next_due.is_none() && self.lock_inner().journal.head() > applied {
                    continue;
                }
                if held && self.held.lock().map(|h| h.is_none()).unwrap_or(false) {
                    continue;
                }
                let wait = next_due.map(|d| Duration::from_nanos(d.saturating_sub(now).max(0) as u64)).unwrap_or(Duration::from_secs(1));
                let _ = self.changed.wait_timeout(g, wait.min(Duration::from_secs(1)));
                continue;
            }
            // Judge the whole burst received so far, not record by record: an `rm -rf` that
            // arrived together is held before any of it reaches the mirror.
            let release_upto = self.release_upto.load(Ordering::SeqCst);
            let discard_upto = self.discard_upto.load(Ordering::SeqCst);
            let mut hold_at = None;
            if let Some(first) = batch.iter().find(|(seq, _, op)| *seq > release_upto.max(discard_upto) && destroys(&tree, op) != (0, 0)) {
                let burst = {
                    let inner = self.lock_inner();
                    let e = inner.journal.entries();
                    let start = e.partition_point(|e| e.seq < first.0);
                    burst_cost(&tree, e[start..].iter().map(|e| &e.op))
                };
                if let Some(reason) = window.trips(&self.breaker, &tree, first.1, burst) {
                    hold_at = Some((first.0, reason));
                }
            }
            let mut done = applied;
            let mut failed = None;
            for (seq, recv_ns, op) in &batch {
                if let Some((at, reason)) = &hold_at
                    && seq == at
                {
                    tracing::error!(stream = %self.name, record = seq, "mass deletion held, the mirror is kept as it is: {reason}; `kura shadow release` applies it, `kura shadow discard` drops it");
                    if let Ok(mut h) = self.held.lock() {
                        *h = Some(Held { seq: *seq, since_ns: crate::now_ns(), reason: reason.clone() });
                    }
                    break;
                }
                let cost = destroys(&tree, op);
                if cost != (0, 0) && *seq <= discard_upto {
                    // An operator discarded the held deletions: the mirror keeps the files.
                    if let Ok(mut d) = self.discarded.lock() {
                        d.insert(*seq);
                        self.save_discarded(&d);
                    }
                    done = *seq;
                    continue;
                }
                match apply::apply(&self.mirror, op, &JournalChunks(&self)) {
                    Ok(()) => {
                        tree.apply(op);
                        window.add(*recv_ns, cost);
                        done = *seq;
                    }
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

    fn save_discarded(&self, d: &std::collections::BTreeSet<u64>) {
        let text: String = d.iter().map(|s| format!("{s}\n")).collect();
        let tmp = self.dir.join(".discarded.tmp");
        let r = std::fs::write(&tmp, text).and_then(|_| std::fs::File::open(&tmp)?.sync_all()).and_then(|_| std::fs::rename(&tmp, self.dir.join("discarded")));
        if let Err(e) = r {
            tracing::error!(stream = %self.name, "cannot record discarded records: {e}");
        }
    }

    /// Applies the held burst and everything received so far (an operator's `release`).
    pub fn release(&self) -> Option<Held> {
        let held = self.held.lock().ok()?.take()?;
        self.release_upto.store(self.lock_inner().journal.head(), Ordering::SeqCst);
        tracing::warn!(stream = %self.name, record = held.seq, "held deletions released");
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
        Some(held)
    }

    /// Drops the held deletions (and any received since) from the mirror; everything else is
    /// applied (an operator's `discard`).
    pub fn discard(&self) -> Option<Held> {
        let held = self.held.lock().ok()?.take()?;
        let head = self.lock_inner().journal.head();
        self.discard_upto.store(head, Ordering::SeqCst);
        self.release_upto.store(head, Ordering::SeqCst);
        tracing::warn!(stream = %self.name, record = held.seq, "held deletions discarded: the mirror keeps those files");
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
        Some(held)
    }
}

/// Files and bytes a record would remove from `tree`: deletions, a directory replaced by a
/// file, a file cut to less than half, the target of a rename.
fn destroys(tree: &Manifest, op: &Op) -> (u64, u64) {
    match op {
        Op::Delete { path } => tree.totals_at(path),
        Op::Put { path, node } => match tree.get(path) {
            Some(old) if old.kind == NodeKind::Dir && node.kind != NodeKind::Dir => tree.totals_at(path),
            Some(old) if old.kind == NodeKind::File && node.kind == NodeKind::File && node.size < old.size / 2 => (1, old.size - node.size),
            Some(old) if old.kind == NodeKind::File && node.kind != NodeKind::File => (1, old.size),
            _ => (0, 0),
        },
        Op::Rename { from, to } if from != to && !crate::path::within(to, from) && tree.get(from).is_some() => tree.totals_at(to),
        Op::Rename { .. } => (0, 0),
    }
}

/// What a run of records would remove from `tree` together: each deleted subtree counted once
/// (a file's delete and its directory's do not add up), truncations and replaced targets added.
fn burst_cost<'a>(tree: &Manifest, ops: impl Iterator<Item = &'a Op>) -> (u64, u64) {
    let mut deleted: Vec<&[u8]> = Vec::new();
    // Counted once per topmost deleted path.
    let (mut files, mut bytes) = (0u64, 0u64);
    for op in ops {
        match op {
            Op::Delete { path } => deleted.push(path),
            _ => {
                let (f, b) = destroys(tree, op);
                files = files.saturating_add(f);
                bytes = bytes.saturating_add(b);
            }
        }
    }
    let set: std::collections::HashSet<&[u8]> = deleted.iter().copied().collect();
    for p in set.iter().copied() {
        if crate::path::ancestors(p).any(|a| set.contains(a)) {
            continue;
        }
        let (f, b) = tree.totals_at(p);
        files = files.saturating_add(f);
        bytes = bytes.saturating_add(b);
    }
    (files, bytes)
}

/// Limits of the mass-deletion breaker.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    /// Hold when more than this share of the mirror's files would go within `window`
    /// (0 turns the breaker off).
    pub files_percent: f64,
    /// ...and at least this many files (small trees change wholesale legitimately).
    pub min_files: u64,
    /// Hold when more than this many bytes would go within `window`.
    pub bytes: u64,
    /// The span bursts are summed over.
    pub window: Duration,
}

impl Default for Breaker {
    fn default() -> Breaker {
        Breaker { files_percent: 20.0, min_files: 100, bytes: 10 << 30, window: Duration::from_secs(60) }
    }
}

/// A burst the breaker holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Held {
    /// The first record not applied.
    pub seq: u64,
    /// Since when (ns).
    pub since_ns: i64,
    /// What tripped it.
    pub reason: String,
}

/// Deletions applied within the breaker's window.
#[derive(Default)]
struct BurstWindow {
    recent: std::collections::VecDeque<(i64, u64, u64)>,
    files: u64,
    bytes: u64,
}

impl BurstWindow {
    fn add(&mut self, t: i64, (files, bytes): (u64, u64)) {
        if files > 0 || bytes > 0 {
            self.recent.push_back((t, files, bytes));
            self.files = self.files.saturating_add(files);
            self.bytes = self.bytes.saturating_add(bytes);
        }
    }

    /// Why applying `cost` at time `t` would trip the breaker, if it would.
    fn trips(&mut self, b: &Breaker, tree: &Manifest, t: i64, (files, bytes): (u64, u64)) -> Option<String> {
        if b.files_percent <= 0.0 {
            return None;
        }
        let start = t.saturating_sub(i64::try_from(b.window.as_nanos()).unwrap_or(i64::MAX));
        while self.recent.front().is_some_and(|(at, ..)| *at < start) {
            if let Some((_, f, by)) = self.recent.pop_front() {
                self.files = self.files.saturating_sub(f);
                self.bytes = self.bytes.saturating_sub(by);
            }
        }
        let (total_files, _) = tree.totals();
        // The share is of the files there were before this window's deletions.
        let base = total_files.saturating_add(self.files);
        let limit = ((base as f64) * b.files_percent / 100.0).max(b.min_files as f64);
        let (f, by) = (self.files.saturating_add(files), self.bytes.saturating_add(bytes));
        if f as f64 > limit {
            return Some(format!("{f} of {base} files would be deleted or truncated within {:?} (limit {:.0})", b.window, limit));
        }
        if by > b.bytes {
            return Some(format!("{by} bytes would be deleted or truncated within {:?} (limit {})", b.window, b.bytes));
        }
        None
    }
}
