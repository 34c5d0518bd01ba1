//! A stream on the standby: its journal, the tree as of its newest record, and the applier
//! thread that replays records onto the mirror (after `apply_delay`, when one is set).

use crate::apply::{self, Chunks};
use crate::journal::{Journal, StreamFile};
use crate::record::{BatchMeta, MAX_RECORDS, Op, RECORDS_VERSION, Record, Records, open_chunk};
use crate::{Manifest, ShadowError};
use kura_repo::{Id, NodeKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
    /// The stream was promoted: it records its own mirror, nobody appends to it (HTTP 423).
    #[error("stream {stream} was promoted to primary at epoch {epoch}: it records its own mirror and takes no pushes; a former primary comes back with `kura shadow rejoin`")]
    Promoted {
        /// The stream's name.
        stream: String,
        /// Its epoch.
        epoch: u64,
    },
    /// The branch is complete: nothing more is added to it (HTTP 409).
    #[error("branch {0} is sealed")]
    Sealed(String),
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
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    /// Stream name.
    pub stream: String,
    /// Failover epoch.
    pub epoch: u64,
    /// `standby` (the mirror follows the journal) or `primary` (promoted: the mirror is the
    /// live copy and the journal records its changes at the new epoch).
    #[serde(default)]
    pub role: String,
    /// The newest record of the epoch before the promotion (0 when never promoted).
    #[serde(default)]
    pub promoted_seq: u64,
    /// The newest record of the epoch a promoted stream was handed back at (0 when never).
    #[serde(default)]
    pub demoted_seq: u64,
    /// Branches kept from fenced primaries that rejoined.
    #[serde(default)]
    pub branches: Vec<BranchInfo>,
    /// Seconds the oldest record not yet applied has been waiting (0 when the mirror is up
    /// to date).
    #[serde(default)]
    pub lag_secs: f64,
    /// When a primary last pushed or sent its heartbeat (ns; 0 since the standby started).
    #[serde(default)]
    pub last_contact_ns: i64,
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
    /// Chunks kept (one stored again counts again until pruning drops the older copy).
    pub chunks: u64,
    /// Bytes of journal segments and packs.
    pub journal_bytes: u64,
    /// Chunk index entries held in memory (the others are in its runs on disk).
    #[serde(default)]
    pub index_in_memory: u64,
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
    /// For a SQLite stream: where the primary's database stood after the newest commit that is
    /// durable and applied (`kura shadow wait --sqlite` compares it with the database's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite_position: Option<SqlitePosition>,
}

/// A SQLite primary's position after a commit (FORMAT.md §15, op `Pages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SqlitePosition {
    /// The wal-index change counter.
    pub change: u32,
    /// The log generation's salts.
    pub salt: [u32; 2],
    /// The commit frame in that generation.
    pub frame: u32,
}

impl SqlitePosition {
    /// Whether a standby at this position holds every commit of a database whose wal-index
    /// now says (`change`, `salt`, `frame`): the same log generation at or past its last commit
    /// frame; or, when the log holds no frame (every commit is in the database file), the same
    /// counter.
    pub fn holds(&self, change: u32, salt: [u32; 2], frame: u32) -> bool {
        (self.salt == salt && self.frame >= frame && frame > 0) || (frame == 0 && self.change == change)
    }
}

struct Inner {
    journal: Journal,
    head: Manifest,
    /// Branches by name: each a journal of its own (records numbered from 1), sealed once
    /// complete.
    branches: std::collections::BTreeMap<String, Branch>,
}

struct Branch {
    journal: Journal,
    sealed: bool,
}

/// A branch in the status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct BranchInfo {
    /// Its name.
    pub name: String,
    /// Entries in its tree.
    pub entries: u64,
    /// When it was received (ns).
    pub time_ns: i64,
    /// Whether it is complete (a rejoin that was interrupted leaves it open, to be continued).
    pub sealed: bool,
}

/// Why a promotion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The stream is already the primary.
    #[error("stream {0} is already the primary (epoch {1})")]
    AlreadyPrimary(String, u64),
    /// The breaker holds changes: an operator decides first.
    #[error("stream {0} holds a mass deletion (record {1}): release or discard it before promoting")]
    Held(String, u64),
    /// Only a promoted stream is handed back.
    #[error("stream {0} is a standby (epoch {1}): only a promoted stream is handed back")]
    NotPrimary(String, u64),
    /// The stream shadows a SQLite database: its copy is not promoted into a recorded tree.
    #[error("stream {0} shadows the SQLite database {1}: promotion is not supported for it; its copy {2} is a consistent database at every moment (stop the old primary's pusher, then copy it with sqlite3 .backup), or `kura shadow restore --sqlite` brings back any transaction")]
    Sqlite(String, String, String),
    /// A promotion is still applying what was received before it.
    #[error("stream {0} is still applying the records received before its promotion: try again once `kura shadow status` shows it caught up")]
    Busy(String),
    /// stream.json could not be written, or the mirror's last changes could not be recorded.
    #[error(transparent)]
    Store(#[from] ShadowError),
}

/// A stream being received.
pub struct Stream {
    name: String,
    mirror: PathBuf,
    apply_delay: Duration,
    window: Duration,
    file: Mutex<StreamFile>,
    id_key: [u8; 32],
    chunker_seed: u64,
    /// Failover epoch; appends must carry it.
    epoch: AtomicU64,
    /// Promoted: the applier stops at `promoted_seq`, the mirror is the live copy.
    primary: AtomicBool,
    /// `<dir>/apply.lock`: held exclusively while a run of records is applied, so a backup of
    /// the mirror that holds it shared sees the state between two records.
    apply_lock: std::fs::File,
    /// Last push or heartbeat from a primary (ns).
    last_contact: std::sync::atomic::AtomicI64,
    promoted_seq: AtomicU64,
    demoted_seq: AtomicU64,
    /// Set while a promoted stream is handed back: its recorder stops.
    demoting: AtomicBool,
    /// The thread recording a promoted mirror (taken and joined by a demotion).
    recorder: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// One promotion or demotion at a time.
    switching: Mutex<()>,
    inner: Mutex<Inner>,
    applied: AtomicU64,
    /// `<dir>/applied`, kept open: the applier rewrites it after every run it applies.
    applied_file: Mutex<Option<std::fs::File>>,
    /// Newest record synced to disk (an append is answered once it is).
    durable: AtomicU64,
    /// How long the newest append's sync took (µs).
    last_sync_us: AtomicU64,
    /// A failed sync: the journal's tail is in doubt until the standby restarts (and cuts it).
    sync_failed: Mutex<Option<String>>,
    /// Woken on appends (for the applier) and on applies (for waiters).
    changed: Condvar,
    lock: Mutex<()>,
    /// Threads asleep on `changed` (counted under `lock`).
    sleepers: std::sync::atomic::AtomicUsize,
    apply_error: Mutex<Option<String>>,
    stop: AtomicBool,
    dir: PathBuf,
    breaker: Breaker,
    max_database: u64,
    /// The mirror was made equal to the journal at `applied` (at open, or since a failure that
    /// left it in doubt): the applier waits for that before it applies anything.
    reconciled: AtomicBool,
    /// The deletions the applier made within the breaker's window (kept across a restart of
    /// the applier: a burst split around it is still judged whole).
    burst: Mutex<BurstWindow>,
    /// Held by a pruning round and by a write-out (and merge) of the journal's index: one at a
    /// time, each reading files the other writes.
    upkeep: Mutex<()>,
    /// The burst the breaker holds, if any.
    held: Mutex<Option<Held>>,
    /// Records up to this one pass the breaker (released by an operator).
    release_upto: AtomicU64,
    /// Destructive records up to this one are not applied (discarded by an operator).
    discard_upto: AtomicU64,
    /// Records never applied to the mirror (kept in `<dir>/discarded`).
    discarded: Mutex<std::collections::BTreeSet<u64>>,
    /// Chunks just received, for the applier.
    fresh: Mutex<Fresh>,
}

/// The lock file a backup of the mirror holds shared (`kura backup --shadow-stream`); it holds
/// the newest applied record (20 digits and a newline) once the applier has applied one.
pub const APPLY_LOCK: &str = "apply.lock";

/// How a stream is received.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamOptions {
    /// Apply records only this long after they arrived.
    pub apply_delay: Duration,
    /// The mass-deletion breaker.
    pub breaker: Breaker,
    /// How long records are kept (restorable); zero keeps them for ever.
    pub window: Duration,
    /// The most a stream's SQLite databases may hold together, in bytes (0: the format's limit).
    pub max_database: u64,
}

/// The applier notes its progress on disk at most this often while records keep coming.
const NOTE_APPLIED_EVERY: Duration = Duration::from_millis(100);
/// The chunk index's entries in memory are written out at least this often.
const INDEX_WRITE_EVERY: Duration = Duration::from_secs(5);
/// A failed write-out of the index is tried again this much later.
const INDEX_RETRY: Duration = Duration::from_secs(5);

/// Plain bytes the applier may keep of chunks just received.
const FRESH_BYTES: usize = 64 << 20;

/// Chunks just received, plain and checked against their ids, kept for the applier: a mirror
/// that keeps up then writes them without reading, decompressing and hashing each one again
/// from the journal (that was a fifth of a standby's CPU in a first sync). The applier takes
/// them in the order they came, so when it falls behind by more than the bound the newest are
/// not kept (dropping the oldest would drop the very ones it needs next, and it would miss
/// them all); chunks it has gone past without taking them (a record superseded, a chunk used
/// twice) are dropped as it goes.
#[derive(Default)]
struct Fresh {
    map: std::collections::HashMap<Id, Vec<u8>>,
    /// Ids in the order they came, with the journal's head once they were in.
    order: std::collections::VecDeque<(Id, u64)>,
    bytes: usize,
}

impl Fresh {
    /// Keeps the chunks of a batch appended up to record `head` (unless the bound is reached).
    fn put(&mut self, id: Id, plain: Vec<u8>, head: u64) {
        if self.bytes + plain.len() > FRESH_BYTES || self.map.contains_key(&id) {
            return;
        }
        self.bytes += plain.len();
        self.order.push_back((id, head));
        self.map.insert(id, plain);
    }

    fn take(&mut self, id: &Id) -> Option<Vec<u8>> {
        let v = self.map.remove(id)?;
        self.bytes -= v.len();
        Some(v)
    }

    /// Drops what came with records before `applied` (a batch of chunks alone carries a large
    /// file's data ahead of its record: the next record, so one more is kept).
    fn retire(&mut self, applied: u64) {
        while let Some(&(id, head)) = self.order.front() {
            if head + 1 >= applied {
                break;
            }
            self.order.pop_front();
            self.take(&id);
        }
    }
}

struct JournalChunks<'a>(&'a Stream);

impl Chunks for JournalChunks<'_> {
    fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        if let Some(plain) = self.0.fresh.lock().ok().and_then(|mut f| f.take(id)) {
            return Ok(plain);
        }
        let h = self.0.lock_inner().journal.chunk(id)?;
        h.ok_or_else(|| ShadowError::Corrupt { what: format!("stream {}", self.0.name), detail: format!("chunk {} is not in the journal", id.short()) })?
            .read(&self.0.id_key)
    }
    fn id_key(&self) -> Option<[u8; 32]> {
        Some(self.0.id_key)
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
        let head = journal.manifest_at(journal.head())?;
        let mut applied = std::fs::read_to_string(dir.join("applied")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0).min(journal.head()).max(journal.base().seq);
        // A promoted stream's later records came from the mirror itself.
        if file.primary && applied >= file.promoted_seq {
            applied = journal.head();
        }
        let branches = load_branches(&dir.join("branches"), file.id_key())?;
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
            id_key: file.id_key(),
            chunker_seed: file.chunker_seed(),
            epoch: AtomicU64::new(file.epoch),
            primary: AtomicBool::new(file.primary),
            last_contact: std::sync::atomic::AtomicI64::new(0),
            apply_lock: std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(APPLY_LOCK)).map_err(|e| ShadowError::io(dir.join(APPLY_LOCK), e))?,
            promoted_seq: AtomicU64::new(file.promoted_seq),
            demoted_seq: AtomicU64::new(file.demoted_seq),
            demoting: AtomicBool::new(false),
            recorder: Mutex::new(None),
            switching: Mutex::new(()),
            file: Mutex::new(file),
            inner: Mutex::new(Inner { journal, head, branches }),
            applied: AtomicU64::new(applied),
            durable: AtomicU64::new(0),
            sync_failed: Mutex::new(None),
            applied_file: Mutex::new(None),
            changed: Condvar::new(),
            lock: Mutex::new(()),
            sleepers: std::sync::atomic::AtomicUsize::new(0),
            last_sync_us: AtomicU64::new(0),
            apply_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            breaker: opts.breaker,
            max_database: opts.max_database,
            reconciled: AtomicBool::new(true),
            burst: Mutex::new(BurstWindow::default()),
            upkeep: Mutex::new(()),
            held: Mutex::new(None),
            release_upto: AtomicU64::new(0),
            discard_upto: AtomicU64::new(0),
            discarded: Mutex::new(discarded.clone()),
            fresh: Mutex::new(Fresh::default()),
        });
        // A promoted mirror is the live copy: users write to it, nothing is reconciled away.
        if !s.primary.load(Ordering::SeqCst) {
            // Under the lock a backup of the mirror takes, and then the record it is at in the
            // lock file (a killed applier's newer number would tag a backup wrongly).
            // A mirror that cannot be reconciled now (a full disk, a file in the way) does not
            // keep the server from starting: the journal receives, the applier tries again.
            if let Err(e) = s.reconcile() {
                tracing::error!(stream = name, "cannot make the mirror equal to the journal at record {applied}: {e}; the journal keeps receiving, trying again");
                s.reconciled.store(false, Ordering::SeqCst);
                if let Ok(mut a) = s.apply_error.lock() {
                    *a = Some(format!("mirror not reconciled: {e}"));
                }
            }
        }
        s.durable.store(s.lock_inner().journal.head(), Ordering::SeqCst);
        // The applier; a promoted stream's records its own mirror once the applier is done.
        s.spawn_applier()?;
        let me = s.clone();
        std::thread::Builder::new()
            .name(format!("kura-prune-{name}"))
            .spawn(move || me.prune_loop())
            .map_err(|e| ShadowError::io(mirror, e))?;
        Ok(s)
    }

    /// Makes the mirror equal to the journal at `applied`, under the lock a backup of the
    /// mirror takes, and writes that record into the lock file (a killed applier's newer number
    /// would tag a backup wrongly).
    fn reconcile(&self) -> Result<(), ShadowError> {
        let applied = self.applied.load(Ordering::SeqCst);
        let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
        let _ = self.apply_lock.lock();
        let at = self.lock_inner().journal.manifest_skipping(applied, &skip);
        let r = at.and_then(|at| apply::reconcile(&self.mirror, &at, &JournalChunks(self)));
        let _ = std::os::unix::fs::FileExt::write_at(&self.apply_lock, format!("{applied:020}\n").as_bytes(), 0);
        let _ = self.apply_lock.unlock();
        let r = r?;
        if r != apply::Reconciled::default() {
            tracing::info!(stream = %self.name, written = r.written, removed = r.removed, "mirror reconciled with the journal at record {applied}");
        }
        self.reconciled.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Notes `seq` as applied, in memory and in `applied`: twenty digits written in place, one
    /// `pwrite` that a killed process does not tear (a hint: a lost or unreadable one makes the
    /// next start reconcile from an older record, which is more work, never another mirror).
    /// A temporary file and a rename ten times a second were about 1% of a SQLite standby's
    /// CPU (perf).
    fn save_applied(&self, seq: u64) -> Result<(), ShadowError> {
        self.applied.store(seq, Ordering::SeqCst);
        let path = self.dir.join("applied");
        let mut f = self.applied_file.lock().unwrap_or_else(|p| p.into_inner());
        let file = match f.take() {
            Some(file) => file,
            None => std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(|e| ShadowError::io(&path, e))?,
        };
        let r = std::os::unix::fs::FileExt::write_all_at(&file, format!("{seq:020}").as_bytes(), 0);
        *f = Some(file);
        r.map_err(|e| ShadowError::io(&path, e))
    }

    fn spawn_applier(self: &Arc<Self>) -> Result<(), ShadowError> {
        let me = self.clone();
        let run = move || {
            while !me.stop.load(Ordering::SeqCst) {
                let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.clone().apply_loop())) else { break };
                // A bug costs the stream a restart of its applier (from the applied record,
                // reconciling first), never the applying for good behind a healthy status.
                let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                tracing::error!(stream = %me.name, "the applier failed ({what}); restarting it");
                if let Ok(mut a) = me.apply_error.lock() {
                    *a = Some(format!("the applier failed ({what}); restarting it"));
                }
                crate::sqlite_stream::forget_mirrors();
                me.reconciled.store(false, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(1));
            }
        };
        std::thread::Builder::new().name(format!("kura-apply-{}", self.name)).spawn(run).map(drop).map_err(|e| ShadowError::io(&self.mirror, e))
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
        self.wake();
    }

    /// Wakes whoever waits on `changed` (the applier, `wait`, a reader of records). Every change
    /// they wait for is made before and announced under `lock`; with nobody asleep, no system
    /// call (an applied run and an append each woke for nothing a futex: two of the nine a
    /// SQLite standby made per append).
    fn wake(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits on `changed` at most `dur`, `g` being `lock`'s guard (see [`Stream::wake`]).
    fn sleep<'a>(&self, g: std::sync::MutexGuard<'a, ()>, dur: Duration) -> std::sync::MutexGuard<'a, ()> {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let g = self.changed.wait_timeout(g, dur).unwrap_or_else(|p| p.into_inner()).0;
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        g
    }

    /// Whether appends are quick enough to run on an async worker: the newest one's sync took
    /// under a millisecond (a server hands a slow disk's appends to a thread of their own).
    pub fn syncs_fast(&self) -> bool {
        self.last_sync_us.load(Ordering::Relaxed) < 1_000
    }

    /// Checks and appends a batch; returns the new head once it is durable.
    pub fn append(&self, body: &[u8]) -> Result<u64, AppendError> {
        self.append_from(body, false)
    }

    /// `own`: the batch comes from this stream's own mirror (a promoted stream recording it).
    fn append_from(&self, body: &[u8], own: bool) -> Result<u64, AppendError> {
        if self.primary.load(Ordering::SeqCst) && !own {
            return Err(AppendError::Promoted { stream: self.name.clone(), epoch: self.epoch.load(Ordering::SeqCst) });
        }
        let (meta, data_off) = BatchMeta::decode(body).map_err(AppendError::Malformed)?;
        let key = self.id_key;
        // Chunks are checked against their ids before the lock: the costly part. The applier
        // gets them as they are (not when it applies only later, or not at all).
        let keep = !own && self.apply_delay.is_zero();
        let mut plains = Vec::new();
        let mut off = data_off;
        for c in &meta.chunks {
            let stored = &body[off..off + c.zlen as usize];
            let plain = open_chunk(&key, c, stored).map_err(AppendError::Malformed)?;
            if keep {
                plains.push((c.id, plain));
            }
            off += c.zlen as usize;
        }
        if let Some(e) = self.sync_failed.lock().ok().and_then(|f| f.clone()) {
            return Err(AppendError::Store(ShadowError::Corrupt { what: format!("stream {}", self.name), detail: format!("{e}; restart the standby") }));
        }
        let mut inner = self.lock_inner();
        let epoch = self.epoch.load(Ordering::SeqCst);
        if meta.epoch < epoch {
            return Err(AppendError::Fenced { stream: epoch, primary: meta.epoch });
        }
        if meta.epoch > epoch {
            return Err(AppendError::Malformed(format!("epoch {} is ahead of the stream's {epoch}", meta.epoch)));
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
        all_chunks_held(&meta, |id| inner.journal.has_chunk(id))?;
        // Only a database's commits have rules of their own: a directory's batches (thousands of
        // records and chunks) pay nothing for them.
        if meta.records.iter().any(|r| matches!(r.op, Op::Pages { .. })) {
            let mut lens: std::collections::HashMap<Id, u32> = meta.chunks.iter().map(|c| (c.id, c.raw_len)).collect();
            for id in meta.records.iter().flat_map(|r| r.op.chunk_ids()) {
                if !lens.contains_key(id)
                    && let Some(h) = inner.journal.chunk(id)?
                {
                    lens.insert(*id, h.raw_len());
                }
            }
            crate::sqlite_stream::check_records(&inner.head, &meta.records, self.max_database, &|id| lens.get(id).copied())
                .map_err(AppendError::Malformed)?;
        }
        inner.journal.append(body, &meta, data_off)?;
        for r in &meta.records {
            inner.head.apply(&r.op);
        }
        let head = inner.journal.head();
        if let Ok(mut f) = self.fresh.lock() {
            for (id, plain) in plains {
                f.put(id, plain, head);
            }
        }
        if self.primary.load(Ordering::SeqCst) && self.applied.load(Ordering::SeqCst) >= self.promoted_seq.load(Ordering::SeqCst) {
            // Records of a promoted stream came from its mirror: nothing to apply.
            self.applied.store(head, Ordering::SeqCst);
        }
        let seg = inner.journal.last_segment();
        drop(inner);
        // Durable before the answer, synced here, outside the journal's lock (a sync of the
        // segment covers every frame written before it, so concurrent appends share their
        // work). A thread of its own for it cost two more context switches an append: a tenth
        // of a standby's CPU at 250 appends a second.
        let t = std::time::Instant::now();
        let synced = seg.map(|(file, path)| (file.sync_data(), path));
        self.last_sync_us.store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Some((Err(e), path)) = synced {
            let why = format!("journal {} could not be synced: {e}", path.display());
            tracing::error!(stream = %self.name, "{why}");
            if let Ok(mut f) = self.sync_failed.lock() {
                *f = Some(why);
            }
            return Err(AppendError::Store(ShadowError::io(&path, e)));
        }
        self.durable.fetch_max(head, Ordering::SeqCst);
        self.wake();
        Ok(head)
    }

    /// Makes this stream the primary (`kura shadow promote`): the epoch goes up, so the old
    /// primary's appends are refused from now on; records received before are applied (at
    /// once, without the apply delay); then the applier stops and the mirror is the live copy.
    /// Waits at most `timeout` for the mirror to catch up; returns the record it was promoted at.
    pub fn promote(&self, timeout: Duration) -> Result<(u64, u64, bool), PromoteError> {
        let _one = self.switching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = self.held.lock().ok().and_then(|h| h.clone()) {
            return Err(PromoteError::Held(self.name.clone(), h.seq));
        }
        let (epoch, seq) = {
            let inner = self.lock_inner();
            // A promoted mirror is recorded as files: a database and its log would go in as
            // whatever bytes they hold at each scan.
            if let Some((db, _)) = inner.head.iter().find(|(_, n)| crate::sqlite_stream::page_size_of(n).is_some()) {
                return Err(PromoteError::Sqlite(self.name.clone(), crate::path::show(db), crate::path::join(&self.mirror, db).display().to_string()));
            }
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            if f.primary {
                return Err(PromoteError::AlreadyPrimary(self.name.clone(), f.epoch));
            }
            let mut next = f.clone();
            next.epoch += 1;
            next.primary = true;
            next.promoted_seq = inner.journal.head();
            next.save(&self.dir)?;
            *f = next;
            self.promoted_seq.store(f.promoted_seq, Ordering::SeqCst);
            self.epoch.store(f.epoch, Ordering::SeqCst);
            self.primary.store(true, Ordering::SeqCst);
            (f.epoch, f.promoted_seq)
        };
        tracing::warn!(stream = %self.name, epoch, record = seq, "promoted: the mirror is the primary copy; the old primary is fenced");
        self.wake();
        let caught_up = self.wait_applied(seq, timeout);
        Ok((epoch, seq, caught_up))
    }

    /// Appends a batch to branch `name` (created on first use; records numbered from 1; only
    /// whole entries, `Put`): a fenced primary's tree, kept when it rejoins. `last` seals it.
    /// Chunks the stream's journal holds need not be sent again.
    pub fn append_branch(&self, name: &str, body: &[u8], last: bool) -> Result<u64, AppendError> {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || name.starts_with('.') {
            return Err(AppendError::Malformed(format!("branch name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'")));
        }
        let (meta, data_off) = BatchMeta::decode(body).map_err(AppendError::Malformed)?;
        let mut off = data_off;
        for c in &meta.chunks {
            open_chunk(&self.id_key, c, &body[off..off + c.zlen as usize]).map_err(AppendError::Malformed)?;
            off += c.zlen as usize;
        }
        if meta.records.iter().any(|r| !matches!(r.op, Op::Put { .. })) {
            return Err(AppendError::Malformed("a branch holds whole entries only (puts)".into()));
        }
        let mut inner = self.lock_inner();
        let inner = &mut *inner;
        if !inner.branches.contains_key(name) {
            let j = Journal::open(&self.dir.join("branches").join(name), self.id_key, false)?;
            inner.branches.insert(name.to_string(), Branch { journal: j, sealed: false });
        }
        let Some(b) = inner.branches.get_mut(name) else {
            return Err(AppendError::Malformed("branch vanished".into()));
        };
        if b.sealed {
            return Err(AppendError::Sealed(name.to_string()));
        }
        let expected = b.journal.head() + 1;
        if let Some(first) = meta.records.first()
            && first.seq != expected
        {
            return Err(AppendError::OutOfOrder { expected, got: first.seq });
        }
        all_chunks_held(&meta, |id| Ok(b.journal.has_chunk(id)? || inner.journal.has_chunk(id)?))?;
        if !meta.records.is_empty() || !meta.chunks.is_empty() {
            b.journal.append(body, &meta, data_off)?;
        }
        if let Some((f, p)) = b.journal.last_segment() {
            f.sync_data().map_err(|e| ShadowError::io(&p, e))?;
        }
        if last {
            let p = self.dir.join("branches").join(name).join("sealed");
            std::fs::write(&p, b"").and_then(|_| std::fs::File::open(&p)?.sync_all()).map_err(|e| ShadowError::io(&p, e))?;
            b.sealed = true;
            tracing::warn!(stream = %self.name, branch = name, entries = b.journal.head(), "branch kept from a fenced primary");
        }
        Ok(b.journal.head())
    }

    /// Records the promoted mirror's changes into the journal at the new epoch, as a primary's
    /// push would (watcher, rescans), until the stream stops: history stays continuous across
    /// the failover, and `restore --at` reaches on past it.
    fn record_mirror(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("kura-record-{}", self.name)).spawn(move || {
            let target = Own(me.clone());
            let done = || me.stop.load(Ordering::SeqCst) || me.demoting.load(Ordering::SeqCst);
            while !done() {
                match crate::push::follow(&target, &me.mirror, Duration::from_secs(600), None, &done) {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(stream = %me.name, "cannot record the promoted mirror {}: {e}; retrying", me.mirror.display());
                        for _ in 0..50 {
                            if done() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            }
        });
        match spawned {
            Ok(h) => *self.recorder.lock().unwrap_or_else(|p| p.into_inner()) = Some(h),
            Err(e) => tracing::error!(stream = %self.name, "cannot start recording the promoted mirror: {e}"),
        }
    }

    /// Hands a promoted stream back (`kura shadow demote`, the failback): the mirror's last
    /// changes are recorded, the epoch goes up and the stream is a standby again, its mirror
    /// following the journal. A host that followed the stream to its last record (`kura shadow
    /// rejoin --follow`) pushes at the new epoch; a pusher of an older epoch stays fenced.
    /// Returns the new epoch and the last record of the old one.
    pub fn demote(self: &Arc<Self>) -> Result<(u64, u64), PromoteError> {
        let _one = self.switching.lock().unwrap_or_else(|p| p.into_inner());
        if !self.primary.load(Ordering::SeqCst) {
            return Err(PromoteError::NotPrimary(self.name.clone(), self.epoch.load(Ordering::SeqCst)));
        }
        let Some(recorder) = self.recorder.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(PromoteError::Busy(self.name.clone()));
        };
        self.demoting.store(true, Ordering::SeqCst);
        let _ = recorder.join();
        let handed = || -> Result<(u64, u64), ShadowError> {
            // What users wrote last, after the recorder's final round.
            crate::push::sync_once(&Own(self.clone()), &self.mirror, None)?;
            let inner = self.lock_inner();
            let head = inner.journal.head();
            // `applied` first: a standby restarted between the two files reconciles its mirror
            // to the head, never back to the promotion.
            self.save_applied(head)?;
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = f.clone();
            next.epoch += 1;
            next.primary = false;
            next.demoted_seq = head;
            next.save(&self.dir)?;
            *f = next;
            self.demoted_seq.store(head, Ordering::SeqCst);
            self.epoch.store(f.epoch, Ordering::SeqCst);
            self.primary.store(false, Ordering::SeqCst);
            Ok((f.epoch, head))
        };
        let (epoch, seq) = match handed() {
            Ok(x) => x,
            // Still the primary (a full disk, say): its mirror goes on being recorded.
            Err(e) => {
                self.demoting.store(false, Ordering::SeqCst);
                self.record_mirror();
                return Err(e.into());
            }
        };
        self.demoting.store(false, Ordering::SeqCst);
        tracing::warn!(stream = %self.name, epoch, record = seq, "handed back: the mirror follows the journal again; the host that follows the stream pushes at the new epoch");
        self.spawn_applier()?;
        self.wake();
        Ok((epoch, seq))
    }

    /// The durable records after `after` (at most [`MAX_RECORDS`]), waiting at most `timeout`
    /// for one to come: what a host following a promoted stream applies. `Err(base)` when
    /// `after` was pruned from the journal (the follower resyncs from a tree).
    pub fn records_after(&self, after: u64, timeout: Duration) -> Result<Result<Records, u64>, ShadowError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let durable = self.durable.load(Ordering::SeqCst);
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            {
                let inner = self.lock_inner();
                let base = inner.journal.base().seq;
                if after < base {
                    return Ok(Err(base));
                }
                if durable > after || left.is_zero() || after > inner.journal.head() {
                    let records: Vec<Record> = inner.journal.records(after, durable, MAX_RECORDS)?.into_iter().map(|e| Record { seq: e.seq, at_ns: e.at_ns, op: e.op }).collect();
                    return Ok(Ok(Records {
                        version: RECORDS_VERSION,
                        epoch: self.epoch.load(Ordering::SeqCst),
                        primary: self.primary.load(Ordering::SeqCst),
                        demoted_seq: self.demoted_seq.load(Ordering::SeqCst),
                        head: inner.journal.head(),
                        records,
                    }));
                }
            }
            g = self.sleep(g, left.min(Duration::from_millis(200)));
        }
    }

    /// Hashes the mirror and compares it with the journal's tree as of the applied record; with
    /// `repair`, rewrites what differs from the journal. The applier waits meanwhile (the
    /// journal keeps receiving).
    pub fn verify_mirror(&self, repair: bool) -> Result<crate::verify::Verified, ShadowError> {
        if self.primary.load(Ordering::SeqCst) {
            return Err(ShadowError::Usage(format!("stream {} was promoted: its mirror is the live copy, there is no journal state to compare it with", self.name)));
        }
        // A second open file description: flock() excludes it from the applier's.
        let p = self.dir.join(APPLY_LOCK);
        let lock = std::fs::File::open(&p).map_err(|e| ShadowError::io(&p, e))?;
        lock.lock().map_err(|e| ShadowError::io(&p, e))?;
        let applied = self.applied.load(Ordering::SeqCst);
        let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
        let tree = self.lock_inner().journal.manifest_skipping(applied, &skip)?;
        let mut mine = crate::verify::hash_tree(&self.mirror, self.id_key, self.chunker_seed, &tree)?;
        crate::sqlite_stream::hash_mirror_dbs(&mut mine, &tree, &self.mirror, &self.id_key, &JournalChunks(self));
        let drift = mine.differences(&tree);
        let mut v = crate::verify::Verified::new(mine.len().max(tree.len()), &drift, applied);
        if !drift.is_empty() {
            tracing::warn!(stream = %self.name, drifted = drift.len(), "the mirror differs from the journal at record {applied}");
        }
        if repair && !drift.is_empty() {
            apply::reconcile_verified(&self.mirror, &tree, &JournalChunks(self), Some(&mine))?;
            v.repaired = true;
        }
        Ok(v)
    }

    /// A chunk's plain bytes (for a rejoining host's resync).
    pub fn read_chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
        JournalChunks(self).chunk(id)
    }

    /// The tree as of record `seq`, encoded; `None` when `seq` is outside the journal.
    pub fn manifest_at(&self, seq: u64) -> Result<Option<Vec<u8>>, ShadowError> {
        let inner = self.lock_inner();
        if seq < inner.journal.base().seq || seq > inner.journal.head() {
            return Ok(None);
        }
        Ok(Some(inner.journal.manifest_at(seq)?.encode()))
    }

    /// Notes that a primary is in touch (a push or its heartbeat).
    pub fn touch(&self) {
        self.last_contact.store(crate::now_ns(), Ordering::SeqCst);
    }

    /// The tree as of the newest record, encoded.
    pub fn manifest(&self) -> Vec<u8> {
        self.lock_inner().head.encode()
    }

    /// Status figures; `secrets` adds the id key and chunker seed (for the stream's own token).
    pub fn status(&self, secrets: bool) -> StreamStatus {
        let inner = self.lock_inner();
        let (chunks, bytes) = inner.journal.sizes();
        let applied = self.applied.load(Ordering::SeqCst);
        // Unreadable, the lag is taken from the oldest record known to wait.
        let waiting = match inner.journal.next_after(applied) {
            Ok(e) => e.map(|e| e.recv_ns),
            Err(_) => (applied < inner.journal.head()).then(|| inner.journal.oldest_time()),
        };
        StreamStatus {
            lag_secs: waiting.map(|t| crate::now_ns().saturating_sub(t).max(0) as f64 / 1e9).unwrap_or(0.0),
            last_contact_ns: self.last_contact.load(Ordering::SeqCst),
            stream: self.name.clone(),
            epoch: self.epoch.load(Ordering::SeqCst),
            role: if self.primary.load(Ordering::SeqCst) { "primary" } else { "standby" }.into(),
            promoted_seq: self.promoted_seq.load(Ordering::SeqCst),
            demoted_seq: self.demoted_seq.load(Ordering::SeqCst),
            branches: inner
                .branches
                .iter()
                .map(|(n, b)| BranchInfo { name: n.clone(), entries: b.journal.head(), time_ns: b.journal.oldest_time(), sealed: b.sealed })
                .collect(),
            head: inner.journal.head(),
            applied: self.applied.load(Ordering::SeqCst),
            durable: self.durable.load(Ordering::SeqCst),
            head_time_ns: inner.journal.last().map(|e| e.recv_ns).unwrap_or(inner.journal.base().recv_ns),
            oldest_time_ns: inner.journal.oldest_time(),
            records: inner.journal.len(),
            chunks: chunks as u64,
            journal_bytes: bytes,
            index_in_memory: inner.journal.index_in_memory() as u64,
            window_secs: self.window.as_secs(),
            base_seq: inner.journal.base().seq,
            apply_error: self.apply_error.lock().ok().and_then(|e| e.clone()),
            held: self.held.lock().ok().and_then(|h| h.clone()),
            discarded: self.discarded.lock().map(|d| d.len() as u64).unwrap_or(0),
            id_key: if secrets { hex::encode(self.id_key) } else { String::new() },
            chunker_seed: if secrets { self.chunker_seed } else { 0 },
            sqlite_position: {
                let upto = applied.min(self.durable.load(Ordering::SeqCst));
                // The newest database commit at or before it (a look back of bounded length; an
                // unreadable journal tells none).
                let mut found = None;
                let _ = inner.journal.scan(upto.saturating_sub(4096), |e| {
                    if e.seq > upto {
                        return false;
                    }
                    if let Op::Pages { change, salt, frame, .. } = e.op
                        && !e.op.is_base_part()
                    {
                        found = Some(SqlitePosition { change, salt, frame });
                    }
                    true
                });
                found
            },
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
            g = self.sleep(g, left.min(Duration::from_millis(200)));
        }
        true
    }

    /// Writes the journal's index out of memory as it fills and prunes the journal to its
    /// window now and then, until the stream stops.
    fn prune_loop(self: Arc<Self>) {
        let every = (self.window / 10).clamp(Duration::from_millis(200), Duration::from_secs(60));
        // The first round soon after start: a standby that was down for days has catching up
        // to do.
        let mut next = std::time::Instant::now() + every.min(Duration::from_secs(1));
        // The index is written out once HOT_ENTRIES wait, and whatever waits every
        // INDEX_WRITE_EVERY (a slow stream's memory is freed too); after a failure (a full
        // disk) it is tried again INDEX_RETRY later, the entries still readable in memory.
        let (mut written_at, mut retry_at) = (Instant::now(), Instant::now());
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100).min(every));
            if Instant::now() >= retry_at {
                let all = written_at.elapsed() >= INDEX_WRITE_EVERY;
                match self.write_out_index(if all { 1 } else { crate::chunk_index::HOT_ENTRIES }) {
                    Ok(wrote) => {
                        if wrote || all {
                            written_at = Instant::now();
                        }
                    }
                    Err(e) => {
                        tracing::error!(stream = %self.name, "cannot write the journal's chunk index out of memory (kept there, tried again in {}s): {e}", INDEX_RETRY.as_secs());
                        retry_at = Instant::now() + INDEX_RETRY;
                    }
                }
            }
            if self.window.is_zero() || std::time::Instant::now() < next {
                continue;
            }
            next = std::time::Instant::now() + every;
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
        let _upkeep = self.upkeep.lock().unwrap_or_else(|p| p.into_inner());
        let Some(plan) = self.lock_inner().journal.prune_plan(before, upto)? else {
            return Ok((0, 0));
        };
        let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
        // Branches may name chunks only the journal holds.
        let keep: std::collections::HashSet<Id> = {
            let inner = self.lock_inner();
            let mut keep = std::collections::HashSet::new();
            for b in inner.branches.values() {
                keep.extend(b.journal.manifest_at(b.journal.head())?.chunk_ids().copied());
            }
            keep
        };
        let built = plan.build(&skip, &keep)?;
        let cleanup = self.lock_inner().journal.prune_commit(built)?;
        let done = (cleanup.records, cleanup.bytes);
        cleanup.finish()?;
        tracing::info!(stream = %self.name, records = done.0, bytes = done.1, "journal pruned to its window");
        Ok(done)
    }

    /// Writes the journal's index entries out of memory as a run when at least `min` wait,
    /// without the stream's lock (the entries stay readable in memory until the run holds
    /// them), and merges runs. Returns whether it wrote.
    pub fn write_out_index(&self, min: usize) -> Result<bool, ShadowError> {
        let _upkeep = self.upkeep.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = self.lock_inner().journal.index_freeze(min) else {
            return Ok(false);
        };
        let run = w.write()?;
        self.lock_inner().journal.index_written(run);
        // Merged by tiers, without the lock; the merged runs stay in use until it is done.
        loop {
            let Some(m) = self.lock_inner().journal.index_merge_plan(None) else {
                break;
            };
            let merged = m.run()?;
            self.lock_inner().journal.index_merged(merged);
        }
        Ok(true)
    }

    /// Reports why the applier is stuck in its status and waits `backoff`, doubling it (up to
    /// 10 s) for the next try.
    fn stall(&self, why: String, backoff: &mut Duration) {
        if let Ok(mut a) = self.apply_error.lock() {
            *a = Some(why);
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
    }

    /// Applies records as they arrive (each once its delay has passed), noting progress in
    /// `applied`. A failure (full disk) is reported in the status and retried. The breaker holds
    /// a burst of deletions before it reaches the mirror.
    fn apply_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        // Only this thread uses it; a panic leaves it as it was (poisoned, taken as it is).
        let mut window = self.burst.lock().unwrap_or_else(|p| p.into_inner());
        // The newest applied record noted in `applied`, and when: at most every
        // NOTE_APPLIED_EVERY (when noting renamed a file, noting each of hundreds of small runs
        // a second, a database's commits, was most of a standby's CPU). A start from an older
        // note reconciles the mirror back to it and applies again: only more work, never a
        // different mirror.
        let (mut noted, mut noted_at) = (self.applied.load(Ordering::SeqCst), Instant::now());
        // The mirror's tree (the journal's, without discarded deletions).
        let mut tree = {
            let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
            // Unreadable, the loop reconciles first and reads it again.
            self.lock_inner().journal.manifest_skipping(self.applied.load(Ordering::SeqCst), &skip).unwrap_or_else(|_| {
                self.reconciled.store(false, Ordering::SeqCst);
                crate::Manifest::default()
            })
        };
        while !self.stop.load(Ordering::SeqCst) {
            if !self.reconciled.load(Ordering::SeqCst) {
                if let Err(e) = self.reconcile() {
                    self.stall(format!("mirror not reconciled: {e}"), &mut backoff);
                    continue;
                }
                // Records applied since are in the tree the reconcile wrote.
                let skip = self.discarded.lock().map(|d| d.clone()).unwrap_or_default();
                let read = self.lock_inner().journal.manifest_skipping(self.applied.load(Ordering::SeqCst), &skip);
                match read {
                    Ok(t) => tree = t,
                    Err(e) => {
                        self.reconciled.store(false, Ordering::SeqCst);
                        self.stall(format!("journal unreadable: {e}"), &mut backoff);
                        continue;
                    }
                }
            }
            let applied = self.applied.load(Ordering::SeqCst);
            let promoted = self.primary.load(Ordering::SeqCst);
            if promoted && applied >= self.promoted_seq.load(Ordering::SeqCst) {
                // The mirror is the live copy now; later records come from it.
                self.applied.store(self.lock_inner().journal.head(), Ordering::SeqCst);
                self.wake();
                tracing::info!(stream = %self.name, "applier stopped: the mirror is the primary copy");
                self.record_mirror();
                return;
            }
            let now = crate::now_ns();
            // A promotion applies what was received at once.
            let delay = if promoted { 0 } else { i64::try_from(self.apply_delay.as_nanos()).unwrap_or(i64::MAX) };
            let held = self.held.lock().map(|h| h.is_some()).unwrap_or(false);
            let (batch, next_due): (Vec<(u64, i64, Op)>, Option<i64>) = if held {
                (Vec::new(), None)
            } else {
                let inner = self.lock_inner();
                let mut out = Vec::new();
                let mut due = None;
                let limit = if promoted { self.promoted_seq.load(Ordering::SeqCst) } else { u64::MAX };
                let read = inner.journal.scan(applied, |e| {
                    if e.seq > limit {
                        return false;
                    }
                    if e.recv_ns.saturating_add(delay) > now {
                        due = Some(e.recv_ns.saturating_add(delay));
                        return false;
                    }
                    // A base's records before its last are no state of the database: the batch
                    // goes on to its last, which the run waits for (below).
                    let partial = e.op.is_base_part();
                    out.push((e.seq, e.recv_ns, e.op.clone()));
                    out.len() < 256 || partial
                });
                drop(inner);
                if let Err(e) = read {
                    self.stall(format!("journal unreadable: {e}"), &mut backoff);
                    continue;
                }
                (out, due)
            };
            if batch.is_empty() {
                if noted < applied && noted_at.elapsed() >= NOTE_APPLIED_EVERY {
                    // Not saved (full disk): the next start reconciles from an older record.
                    let _ = self.save_applied(applied);
                    (noted, noted_at) = (applied, Instant::now());
                }
                let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                // Appends notify under `lock`: checked here under it, no wake-up is lost.
                if !held && next_due.is_none() && self.lock_inner().journal.head() > applied {
                    continue;
                }
                if held && self.held.lock().map(|h| h.is_none()).unwrap_or(false) {
                    continue;
                }
                let mut wait = next_due.map(|d| Duration::from_nanos(d.saturating_sub(now).max(0) as u64)).unwrap_or(Duration::from_secs(1));
                if noted < applied {
                    wait = wait.min(NOTE_APPLIED_EVERY);
                }
                drop(self.sleep(g, wait.min(Duration::from_secs(1))));
                continue;
            }
            // Judge the whole burst received so far, not record by record: an `rm -rf` that
            // arrived together is held before any of it reaches the mirror.
            let release_upto = self.release_upto.load(Ordering::SeqCst);
            let discard_upto = self.discard_upto.load(Ordering::SeqCst);
            let mut hold_at = None;
            if let Some(first) = batch.iter().find(|(seq, _, op)| *seq > release_upto.max(discard_upto) && destroys(&tree, op) != (0, 0)) {
                // The mirror's files and bytes once the whole burst is applied, and the files
                // it would cut to less than half.
                // Worked out on the part of the tree the burst touches (a copy of the whole
                // tree per run cost a core on a large mirror).
                // Unreadable, nothing is applied (a part of the burst would judge it wrongly).
                let read = self.lock_inner().journal.records(first.0 - 1, u64::MAX, usize::MAX);
                let ops = match read {
                    Ok(ops) => ops,
                    Err(e) => {
                        self.stall(format!("journal unreadable: {e}"), &mut backoff);
                        continue;
                    }
                };
                let (after, truncated) = {
                    let mut m = tree.subset(ops.iter().flat_map(|e| match &e.op {
                        Op::Put { path, .. } | Op::Delete { path } | Op::Pages { path, .. } => [Some(path.as_slice()), None],
                        Op::Rename { from, to } => [Some(from.as_slice()), Some(to.as_slice())],
                    }).flatten());
                    let before = m.totals();
                    let mut truncated = 0u64;
                    for e in ops {
                        truncated += truncates(&m, &e.op);
                        m.apply(&e.op);
                    }
                    let (now, later) = (tree.totals(), m.totals());
                    (((now.0 + later.0).saturating_sub(before.0), (now.1 + later.1).saturating_sub(before.1)), truncated)
                };
                if let Some(reason) = window.trips(&self.breaker, &tree, first.1, after, truncated) {
                    hold_at = Some((first.0, reason));
                }
            }
            let mut done = applied;
            let mut failed = None;
            let mut incomplete = false;
            // A backup of the mirror holding the lock shared waits for this run to end, and
            // this run for the backup (the journal keeps receiving meanwhile).
            if let Err(e) = self.apply_lock.lock() {
                tracing::warn!(stream = %self.name, "cannot lock {APPLY_LOCK}: {e}");
            }
            let mut w = apply::Writer::new(&self.mirror);
            let mut i = 0;
            while let Some((seq, recv_ns, op)) = batch.get(i) {
                i += 1;
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
                if let Op::Pages { path, page_size, .. } = op {
                    w.forget();
                    // A database's consecutive commits go in as one SQLite transaction (never
                    // destructive: nothing in the run is held or discarded).
                    let run = batch[i - 1..].iter().take_while(|(_, _, o)| matches!(o, Op::Pages { path: p, page_size: ps, .. } if p == path && ps == page_size)).count();
                    if batch[i + run - 2].2.is_base_part() {
                        if i - 1 + run == batch.len() {
                            // The rest of a base is on its way: applied with it as one
                            // transaction, so no reader ever sees half a base.
                            incomplete = true;
                            break;
                        }
                        if matches!(&batch[i - 1 + run].2, Op::Pages { path: p, .. } if p == path) {
                            // A base cut off and followed by one of another page size, which
                            // replaces the whole copy: its parts are never written.
                            for (s, _, o) in &batch[i - 1..i - 1 + run] {
                                tree.apply(o);
                                done = *s;
                            }
                            i += run - 1;
                            continue;
                        }
                    }
                    let commits: Vec<(u32, &[(u32, Id)])> = batch[i - 1..i - 1 + run]
                        .iter()
                        .filter_map(|(_, _, o)| match o {
                            Op::Pages { db_pages, pages, .. } => Some((*db_pages, pages.as_slice())),
                            _ => None,
                        })
                        .collect();
                    match crate::sqlite_stream::apply_pages(&self.mirror, path, *page_size, &commits, &JournalChunks(&self)) {
                        Ok(()) => {
                            for (s, _, o) in &batch[i - 1..i - 1 + run] {
                                tree.apply(o);
                                done = *s;
                            }
                            i += run - 1;
                            continue;
                        }
                        Err(e) => {
                            // A database SQLite can no longer read is rebuilt before going on.
                            if matches!(e, ShadowError::Corrupt { .. }) {
                                self.reconciled.store(false, Ordering::SeqCst);
                            }
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                match w.apply(op, &JournalChunks(&self)) {
                    Ok(()) => {
                        window.truncated(*recv_ns, truncates(&tree, op));
                        tree.apply(op);
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
                if let Ok(mut f) = self.fresh.lock() {
                    f.retire(done);
                }
                // The exact record, for a backup of the mirror that takes the lock next: a
                // write in place, no rename (`applied` itself is noted less often).
                let _ = std::os::unix::fs::FileExt::write_at(&self.apply_lock, format!("{done:020}\n").as_bytes(), 0);
                if noted_at.elapsed() >= NOTE_APPLIED_EVERY {
                    let _ = self.save_applied(done);
                    (noted, noted_at) = (done, Instant::now());
                }
            }
            if let Some((_, recv_ns, _)) = batch.iter().find(|(seq, ..)| *seq == done) {
                window.sample(&self.breaker, *recv_ns, tree.totals());
            }
            // Writing inside a directory moved its mtime: back to the tree's.
            let applied_ops = batch.iter().filter(|(seq, ..)| *seq <= done && !self.discarded.lock().is_ok_and(|d| d.contains(seq))).map(|(_, _, op)| op);
            apply::set_dir_times(&self.mirror, apply::touched_dirs(&tree, applied_ops).into_iter());
            let _ = self.apply_lock.unlock();
            if done > applied {
                self.wake();
            }
            if incomplete && failed.is_none() {
                // Until the base's last record is in (or due), not at every append of its
                // parts: each new batch copies the page lists of every part so far.
                loop {
                    let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                    let wait = match next_due {
                        Some(d) => Duration::from_nanos(d.saturating_sub(crate::now_ns()).max(0) as u64),
                        None if self.lock_inner().journal.last().is_some_and(|e| e.op.is_base_part()) => Duration::from_secs(1),
                        None => Duration::ZERO,
                    };
                    if wait.is_zero() || self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    drop(self.sleep(g, wait.min(Duration::from_secs(1))));
                    if next_due.is_some() {
                        break;
                    }
                }
            }
            match failed {
                Some(e) => {
                    tracing::warn!(stream = %self.name, "cannot apply record {}: {e}", done + 1);
                    self.stall(format!("record {}: {e}", done + 1), &mut backoff);
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
        self.wake();
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
        self.wake();
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
        // A database's commits are its application's to make (a DELETE is not a deletion); a
        // database written where a directory or another file is replaces it.
        Op::Pages { path, .. } => match tree.get(path) {
            Some(n) if crate::sqlite_stream::page_size_of(n).is_none() => tree.totals_at(path),
            _ => (0, 0),
        },
    }
}

/// 1 when a record cuts a file of `tree` to less than half (the bytes lost count through the
/// totals).
fn truncates(tree: &Manifest, op: &Op) -> u64 {
    match op {
        Op::Put { path, node } => u64::from(tree.get(path).is_some_and(|old| old.kind == NodeKind::File && node.kind == NodeKind::File && node.size < old.size / 2)),
        _ => 0,
    }
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
    /// The mirror's files and bytes after each run of records within the window: the loss is
    /// measured from their peak, so churn (files made and deleted again) is not a loss, and a
    /// deleted subtree counts once.
    samples: std::collections::VecDeque<(i64, u64, u64)>,
    /// Files cut to less than half within the window.
    truncations: std::collections::VecDeque<(i64, u64)>,
}

impl BurstWindow {
    fn sample(&mut self, b: &Breaker, t: i64, (files, bytes): (u64, u64)) {
        self.expire(b, t);
        self.samples.push_back((t, files, bytes));
    }

    fn truncated(&mut self, t: i64, files: u64) {
        if files > 0 {
            self.truncations.push_back((t, files));
        }
    }

    /// Forgets what is older than the window before `t`.
    fn expire(&mut self, b: &Breaker, t: i64) {
        let start = t.saturating_sub(i64::try_from(b.window.as_nanos()).unwrap_or(i64::MAX));
        while self.samples.front().is_some_and(|(at, ..)| *at < start) {
            self.samples.pop_front();
        }
        while self.truncations.front().is_some_and(|(at, _)| *at < start) {
            self.truncations.pop_front();
        }
    }

    /// Why a burst at time `t` that leaves the mirror with `after` (files, bytes) and cuts
    /// `truncated` files would trip the breaker, if it would.
    fn trips(&mut self, b: &Breaker, tree: &Manifest, t: i64, after: (u64, u64), truncated: u64) -> Option<String> {
        if b.files_percent <= 0.0 {
            return None;
        }
        self.expire(b, t);
        let now = tree.totals();
        let peak_files = self.samples.iter().map(|s| s.1).chain([now.0]).max().unwrap_or(0);
        let peak_bytes = self.samples.iter().map(|s| s.2).chain([now.1]).max().unwrap_or(0);
        let cut: u64 = self.truncations.iter().map(|t| t.1).sum::<u64>().saturating_add(truncated);
        let lost = peak_files.saturating_sub(after.0).saturating_add(cut);
        let limit = ((peak_files as f64) * b.files_percent / 100.0).max(b.min_files as f64);
        if lost as f64 > limit {
            return Some(format!("{lost} of {peak_files} files would be deleted or truncated within {:?} (limit {:.0})", b.window, limit));
        }
        let by = peak_bytes.saturating_sub(after.1);
        if by > b.bytes {
            return Some(format!("{by} bytes would be deleted or truncated within {:?} (limit {})", b.window, b.bytes));
        }
        None
    }
}

/// Checks that every file of the batch names chunks it carries or `held` says are held.
fn all_chunks_held(meta: &BatchMeta, held: impl Fn(&Id) -> Result<bool, ShadowError>) -> Result<(), AppendError> {
    let in_batch: std::collections::HashSet<Id> = meta.chunks.iter().map(|c| c.id).collect();
    let mut missing: Vec<Id> = Vec::new();
    for id in meta.records.iter().flat_map(|r| r.op.chunk_ids()) {
        if !in_batch.contains(id) && !held(id)? {
            missing.push(*id);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort();
    missing.dedup();
    Err(AppendError::Missing(missing))
}

/// Opens every branch under `dir` (none when it does not exist).
fn load_branches(dir: &Path, id_key: [u8; 32]) -> Result<std::collections::BTreeMap<String, Branch>, ShadowError> {
    let mut out = std::collections::BTreeMap::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(ShadowError::io(dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| ShadowError::io(dir, e))?;
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let journal = Journal::open(&e.path(), id_key, false)?;
        out.insert(name, Branch { journal, sealed: e.path().join("sealed").exists() });
    }
    Ok(out)
}

/// A promoted stream as the target of its own mirror's changes.
struct Own(Arc<Stream>);

impl crate::push::Target for Own {
    fn status(&self) -> Result<StreamStatus, ShadowError> {
        Ok(self.0.status(true))
    }
    fn manifest(&self) -> Result<Manifest, ShadowError> {
        Manifest::decode(&self.0.manifest()).map_err(|e| ShadowError::Corrupt { what: format!("stream {}", self.0.name), detail: e })
    }
    fn append(&self, body: Vec<u8>) -> Result<u64, ShadowError> {
        self.0.append_from(&body, true).map_err(|e| match e {
            AppendError::Store(e) => e,
            e => ShadowError::Remote(format!("stream {}: {e}", self.0.name)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kura_repo::Node;

    fn file(size: u64) -> Node {
        let mut n = Node::new(Vec::new(), NodeKind::File);
        n.size = size;
        n
    }

    fn put(tree: &mut Manifest, name: String, size: u64) -> Op {
        let op = Op::Put { path: name.into_bytes(), node: Box::new(file(size)) };
        tree.apply(&op);
        op
    }

    #[test]
    fn the_breaker_weighs_net_loss_not_churn() {
        let b = Breaker { files_percent: 20.0, min_files: 10, bytes: 1 << 30, window: Duration::from_secs(60) };
        let sec = 1_000_000_000i64;
        let mut tree = Manifest::default();
        for i in 0..100 {
            put(&mut tree, format!("f{i}"), 1000);
        }
        let mut w = BurstWindow::default();
        w.sample(&b, 0, tree.totals());
        // Churn: 500 files made and deleted again within the window never trip it.
        for round in 0..50 {
            for i in 0..10 {
                put(&mut tree, format!("tmp{i}"), 10);
            }
            w.sample(&b, sec + round, tree.totals());
            let mut after = tree.clone();
            for i in 0..10 {
                after.apply(&Op::Delete { path: format!("tmp{i}").into_bytes() });
            }
            assert_eq!(w.trips(&b, &tree, sec + round, after.totals(), 0), None, "round {round}");
            tree = after;
            w.sample(&b, sec + round, tree.totals());
        }
        // Deleting the 100 files 10 at a time trips it once the loss from the window's peak (110:
        // churn raises it by its amplitude) passes 20%: at 30.
        let mut tripped = None;
        for run in 0..3 {
            let mut after = tree.clone();
            for i in run * 10..run * 10 + 10 {
                after.apply(&Op::Delete { path: format!("f{i}").into_bytes() });
            }
            tripped = w.trips(&b, &tree, 2 * sec, after.totals(), 0);
            if tripped.is_some() {
                assert_eq!(run, 1);
                break;
            }
            tree = after;
            w.sample(&b, 2 * sec, tree.totals());
        }
        assert!(tripped.as_deref().is_some_and(|r| r.contains("30 of 110")), "{tripped:?}");
        // A minute later the earlier deletions are out of the window.
        let later = 200 * sec;
        let mut after = tree.clone();
        after.apply(&Op::Delete { path: b"f15".to_vec() });
        assert_eq!(w.trips(&b, &tree, later, after.totals(), 0), None);
        // Truncations count as files lost though the count stays.
        let t = w.trips(&b, &tree, later, tree.totals(), 19);
        assert!(t.as_deref().is_some_and(|r| r.contains("19 of 90")), "{t:?}");
        assert_eq!(truncates(&tree, &Op::Put { path: b"f50".to_vec(), node: Box::new(file(400)) }), 1);
        assert_eq!(truncates(&tree, &Op::Put { path: b"f50".to_vec(), node: Box::new(file(600)) }), 0);
    }

    #[test]
    fn fresh_chunks_stay_within_their_bound_and_the_oldest_stay_until_the_applier_passes() {
        let mut f = Fresh::default();
        let chunk = FRESH_BYTES / 8;
        for i in 0..20u8 {
            f.put(Id([i; 32]), vec![i; chunk], u64::from(i) + 1);
            assert!(f.bytes <= FRESH_BYTES && f.bytes == f.map.values().map(Vec::len).sum::<usize>());
        }
        assert_eq!(f.map.len(), 8);
        assert!(f.take(&Id([11; 32])).is_none(), "a newer chunk was kept over an older one the applier needs first");
        assert_eq!(f.take(&Id([0; 32])), Some(vec![0; chunk]));
        assert!(f.take(&Id([0; 32])).is_none(), "taken twice");
        // Room again: the next batch is kept.
        f.put(Id([20; 32]), vec![20; chunk], 21);
        assert_eq!(f.map.len(), 8);
        // Beyond the bound: not kept, the applier reads it from the journal.
        f.put(Id([99; 32]), vec![0; FRESH_BYTES / 2], 22);
        assert!(f.take(&Id([99; 32])).is_none());
        // The applier went past records 1-5 without taking their chunks (superseded records):
        // dropped, all but those of the record before the next.
        f.retire(6);
        assert!(f.take(&Id([3; 32])).is_none() && f.map.contains_key(&Id([5; 32])));
        assert_eq!(f.bytes, f.map.values().map(Vec::len).sum::<usize>());
        // Taken ids do not pile up in the queue.
        for i in 0..100_000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            f.put(Id(id), vec![1], 100 + u64::from(i));
            f.take(&Id(id));
            f.retire(100 + u64::from(i));
        }
        assert!(f.order.len() < 10, "{}", f.order.len());
        assert!(f.map.len() <= 8, "{}", f.map.len());
    }
}
