//! Sessions: every command that uses the index announces itself in `sessions/<id>` and records
//! which prune plans it has seen, so prune knows when condemned packs can no longer be in use.
//! There are no locks: a crashed session is recognised as dead (same host: its process is gone;
//! other hosts: its heartbeat stopped), never removed by hand.

use kura_store::{Kind, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a session rewrites its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(120);
/// A session on another host whose heartbeat is older than this is dead.
pub const STALE_AFTER: Duration = Duration::from_secs(15 * 60);

/// What a session object holds (plain JSON: it names no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    /// Record version (1).
    pub version: u32,
    /// What runs: `backup`, `restore`, `check`, `prune`, ...
    pub command: String,
    /// Host name.
    pub host: String,
    /// Identity of the running kernel and PID namespace: processes are only looked up by PID
    /// when this matches, so a PID is never mistaken across reboots or containers.
    pub machine: String,
    /// Process id.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (guards against PID reuse).
    pub pid_start: u64,
    /// When the session began (RFC 3339, the session's own clock).
    pub started: String,
    /// Last heartbeat (RFC 3339).
    pub heartbeat: String,
    /// Prune plans (ids) this session knew when it loaded the index: it never uses their packs
    /// for deduplication.
    pub plans_seen: Vec<String>,
}

/// Whether a session found in the repository may still be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or not provably dead).
    Live,
    /// Its process is gone, or its heartbeat stopped long ago.
    Dead,
}

fn machine_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
    format!("{}/{}", boot.trim(), ns)
}

/// Field 22 of /proc/PID/stat: the start time in ticks; `None` when the process is gone.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

impl SessionInfo {
    /// Decides whether this session may still run, seen from here at `now`.
    pub fn liveness(&self, now: jiff::Timestamp) -> Liveness {
        if self.machine == machine_id() && !self.machine.is_empty() {
            return if process_start(self.pid) == Some(self.pid_start) { Liveness::Live } else { Liveness::Dead };
        }
        match self.heartbeat.parse::<jiff::Timestamp>() {
            Ok(t) if now.duration_since(t) < jiff::SignedDuration::try_from(STALE_AFTER).unwrap_or_default() => {
                Liveness::Live
            }
            Ok(_) => Liveness::Dead,
            // An unreadable heartbeat cannot prove death.
            Err(_) => Liveness::Live,
        }
    }
}

/// Every session object in the store with its id; unreadable ones are returned as `None` (a
/// session being written concurrently, or garbage) and count as live.
pub fn list_sessions(store: &dyn Store) -> Result<Vec<(String, Option<SessionInfo>)>, StoreError> {
    let mut out = Vec::new();
    for l in store.list(Kind::Session)? {
        match store.get(Kind::Session, &l.name) {
            Ok(b) => out.push((l.name, serde_json::from_slice(&b).ok())),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

struct Shared {
    info: Mutex<SessionInfo>,
    stop: Mutex<bool>,
    wake: Condvar,
    failed: AtomicBool,
}

/// This process's session: registered on creation, kept alive by a heartbeat thread, removed on
/// drop.
pub struct Session {
    store: Arc<dyn Store>,
    id: String,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    /// Registers a session. Durable on return: whoever lists sessions afterwards sees it.
    pub fn register(store: Arc<dyn Store>, command: &str) -> Result<Session, StoreError> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| StoreError::Io {
            verb: kura_store::Verb::Write,
            target: "session id".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let id = hex::encode(raw);
        let now = jiff::Timestamp::now().to_string();
        let pid = std::process::id();
        let info = SessionInfo {
            version: 1,
            command: command.into(),
            host: crate::repo::hostname(),
            machine: machine_id(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            started: now.clone(),
            heartbeat: now,
            plans_seen: Vec::new(),
        };
        let shared = Arc::new(Shared {
            info: Mutex::new(info),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            failed: AtomicBool::new(false),
        });
        let mut s = Session { store, id, shared, thread: None };
        s.write()?;
        let (store, id, sh) = (s.store.clone(), s.id.clone(), s.shared.clone());
        // Without a heartbeat the session only looks dead to other hosts after STALE_AFTER,
        // which delays nothing here; a failed spawn is not worth failing the command for.
        s.thread = std::thread::Builder::new()
            .name("kura-heartbeat".into())
            .spawn(move || heartbeat(store, id, sh))
            .ok();
        Ok(s)
    }

    fn write(&self) -> Result<(), StoreError> {
        let bytes = {
            let info = self.shared.info.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec(&*info).unwrap_or_default()
        };
        self.store.replace(Kind::Session, &self.id, &bytes)
    }

    /// The session's object name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records the plans this session has seen; durable on return.
    pub fn saw_plans(&self, plans: &[String]) -> Result<(), StoreError> {
        self.shared.info.lock().unwrap_or_else(|p| p.into_inner()).plans_seen = plans.to_vec();
        self.write()
    }

    /// True when a heartbeat could not be written (the session may look dead to others).
    pub fn heartbeat_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }
}

fn heartbeat(store: Arc<dyn Store>, id: String, sh: Arc<Shared>) {
    loop {
        let stop = sh.stop.lock().unwrap_or_else(|p| p.into_inner());
        let (stop, _) = sh.wake.wait_timeout(stop, HEARTBEAT).unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
        drop(stop);
        let bytes = {
            let mut info = sh.info.lock().unwrap_or_else(|p| p.into_inner());
            info.heartbeat = jiff::Timestamp::now().to_string();
            serde_json::to_vec(&*info).unwrap_or_default()
        };
        if store.replace(Kind::Session, &id, &bytes).is_err() {
            sh.failed.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.store.delete(Kind::Session, &self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_session_is_live_and_a_dead_pid_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(kura_store::LocalStore::create(dir.path()).unwrap());
        let s = Session::register(store.clone(), "test").unwrap();
        s.saw_plans(&["ab".into()]).unwrap();
        let all = list_sessions(&*store).unwrap();
        assert_eq!(all.len(), 1);
        let info = all[0].1.clone().unwrap();
        assert_eq!(info.plans_seen, vec!["ab".to_string()]);
        let now = jiff::Timestamp::now();
        assert_eq!(info.liveness(now), Liveness::Live);
        let mut gone = info.clone();
        gone.pid_start += 1; // the same PID, another process
        assert_eq!(gone.liveness(now), Liveness::Dead);
        let mut remote = info.clone();
        remote.machine = "elsewhere".into();
        assert_eq!(remote.liveness(now), Liveness::Live);
        remote.heartbeat = "2020-01-01T00:00:00Z".into();
        assert_eq!(remote.liveness(now), Liveness::Dead);
        drop(s);
        assert!(list_sessions(&*store).unwrap().is_empty());
    }
}
