//! Sessions: every command that uses the index announces itself in `sessions/<id>` and records
//! which prune plans it has seen, so prune knows when condemned packs can no longer be in use.
//! There are no locks: a crashed session is recognised as dead (same host: its process is gone;
//! other hosts: its heartbeat stopped), never removed by hand.

use kura_store::{Kind, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a session rewrites its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(120);
/// A session on another machine whose heartbeat is older than this is dead. Clocks of machines
/// sharing a repository must agree to well within this (NTP), as for restic's stale locks.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

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

/// Boot id and PID namespace; empty when either is unknown, and then no process is ever judged
/// by its PID (only by its heartbeat).
fn machine_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
    if boot.trim().is_empty() || ns.is_empty() {
        return String::new();
    }
    format!("{}/{}", boot.trim(), ns)
}

/// Field 22 of /proc/PID/stat: the start time in ticks; `None` when the process is gone.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether a process exists: `kill(pid, 0)` succeeds or is refused (EPERM: it exists, owned
/// by someone else). `/proc` may hide other users' processes (hidepid), so it is not asked.
fn process_exists(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

impl SessionInfo {
    /// Decides whether this session may still run, seen from here at `now`.
    pub fn liveness(&self, now: jiff::Timestamp) -> Liveness {
        if !self.machine.is_empty() && self.machine == machine_id() {
            if !process_exists(self.pid) {
                return Liveness::Dead;
            }
            // The PID exists; it is another process only if its start time says so.
            return match process_start(self.pid) {
                Some(start) if start != self.pid_start => Liveness::Dead,
                _ => Liveness::Live,
            };
        }
        match self.heartbeat.parse::<jiff::Timestamp>() {
            Ok(t) if now.duration_since(t) < jiff::SignedDuration::try_from(STALE_AFTER).unwrap_or_default() => {
                Liveness::Live
            }
            // A version-1 record with a garbled heartbeat is garbage.
            Ok(_) | Err(_) => Liveness::Dead,
        }
    }
}

/// Reads a session object. Objects are replaced atomically, so one that is not a valid record
/// is garbage and reads as a dead session, except a record of a newer version, which this kura
/// cannot judge and so treats as live.
fn parse_session(bytes: &[u8]) -> SessionInfo {
    if let Ok(info) = serde_json::from_slice::<SessionInfo>(bytes)
        && info.version == 1
    {
        return info;
    }
    let newer = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("version")?.as_u64())
        .is_some_and(|v| v > 1);
    let now = jiff::Timestamp::now().to_string();
    SessionInfo {
        version: 0,
        command: if newer { "(newer kura)".into() } else { "(garbage)".into() },
        host: String::new(),
        machine: String::new(),
        pid: 0,
        pid_start: 0,
        started: String::new(),
        // Live for a newer version (heartbeat now), dead for garbage (no heartbeat).
        heartbeat: if newer { now } else { String::new() },
        plans_seen: Vec::new(),
    }
}

/// Every session object in the store with its id.
pub fn list_sessions(store: &dyn Store) -> Result<Vec<(String, SessionInfo)>, StoreError> {
    let mut out = Vec::new();
    for l in store.list(Kind::Session)? {
        match store.get(Kind::Session, &l.name) {
            Ok(b) => out.push((l.name, parse_session(&b))),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

struct Shared {
    // Held across serialising *and* writing, so a heartbeat can never overwrite a newer
    // `plans_seen` with an older copy.
    info: Mutex<SessionInfo>,
    stop: Mutex<bool>,
    wake: Condvar,
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
        let shared = Arc::new(Shared { info: Mutex::new(info), stop: Mutex::new(false), wake: Condvar::new() });
        let mut s = Session { store, id, shared, thread: None };
        s.update(|_| {})?;
        let (store, id, sh) = (s.store.clone(), s.id.clone(), s.shared.clone());
        // Without a heartbeat a long run would look dead to other machines: refuse to start.
        let t = std::thread::Builder::new()
            .name("kura-heartbeat".into())
            .spawn(move || heartbeat(store, id, sh))
            .map_err(|e| StoreError::Io {
                verb: kura_store::Verb::Write,
                target: "session heartbeat".into(),
                source: e,
            })?;
        s.thread = Some(t);
        Ok(s)
    }

    /// Changes the record and writes it, under the record's lock.
    fn update(&self, change: impl FnOnce(&mut SessionInfo)) -> Result<(), StoreError> {
        write_locked(&*self.store, &self.id, &self.shared, change)
    }

    /// The session's object name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records the plans this session has seen; durable on return.
    pub fn saw_plans(&self, plans: &[String]) -> Result<(), StoreError> {
        self.update(|i| i.plans_seen = plans.to_vec())
    }
}

fn write_locked(
    store: &dyn Store,
    id: &str,
    sh: &Shared,
    change: impl FnOnce(&mut SessionInfo),
) -> Result<(), StoreError> {
    let mut info = sh.info.lock().unwrap_or_else(|p| p.into_inner());
    change(&mut info);
    let bytes = serde_json::to_vec(&*info).unwrap_or_default();
    store.replace(Kind::Session, id, &bytes)
}

fn heartbeat(store: Arc<dyn Store>, id: String, sh: Arc<Shared>) {
    loop {
        let stop = sh.stop.lock().unwrap_or_else(|p| p.into_inner());
        // The stop flag is checked before waiting too: a session dropped before this thread
        // first took the lock would otherwise make its drop wait a whole heartbeat.
        let (stop, _) = sh.wake.wait_timeout_while(stop, HEARTBEAT, |stop| !*stop).unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
        drop(stop);
        // A failed heartbeat is retried at the next beat; a backup's final check that its
        // packs exist covers a session that looked dead meanwhile.
        let _ = write_locked(&*store, &id, &sh, |i| i.heartbeat = jiff::Timestamp::now().to_string());
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
        let info = all[0].1.clone();
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
        let mut gone_pid = info.clone();
        gone_pid.pid = 0x3fff_fff0; // above any pid_max: no such process
        assert_eq!(gone_pid.liveness(now), Liveness::Dead);
        drop(s);
        assert!(list_sessions(&*store).unwrap().is_empty());
        // Garbage is dead; a record of a newer kura is respected.
        assert_eq!(parse_session(b"{not json").liveness(now), Liveness::Dead);
        assert_eq!(parse_session(br#"{"version": 2, "whatever": 1}"#).liveness(now), Liveness::Live);
    }
}
