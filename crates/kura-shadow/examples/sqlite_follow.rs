//! Follows a live SQLite database into a mirror in one process (the pusher's reader and the
//! standby's applier, no network between them) and measures, for every row the writer of
//! `bench/sqlite-source.sh` commits, the lag from its commit to its visibility in the mirror,
//! and the CPU the reading and the applying cost. A first figure for issue 10's budget before
//! the stream carries SQLite commits. Usage: sqlite_follow DB MIRROR SECONDS

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kura_shadow::sqlite_mirror::{Mirror, PageCommit};
use kura_shadow::sqlite_source::{OwnedCommit, Source};
use rusqlite::{Connection, OpenFlags};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn apply(mirror: &mut Mirror, commits: &[OwnedCommit]) {
    let pages: Vec<Vec<(u32, &[u8])>> = commits.iter().map(|c| c.pages.iter().map(|(p, img)| (*p, img.as_slice())).collect()).collect();
    let batch: Vec<PageCommit> = commits.iter().zip(&pages).map(|(c, p)| PageCommit { pages: p, db_pages: c.db_pages }).collect();
    mirror.apply(&batch).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (db, mirror_path, secs) = (&args[1], &args[2], args[3].parse::<u64>().unwrap());
    let (mut src, base) = Source::attach(db.as_ref()).unwrap();
    let mut mirror = Mirror::open(mirror_path.as_ref(), base.page_size).unwrap();
    apply(&mut mirror, std::slice::from_ref(&src.base_commit(&base).unwrap()));
    let reader = Connection::open_with_flags(mirror_path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut seen: i64 = reader.query_row("SELECT coalesce(max(seq), 0) FROM t", [], |r| r.get(0)).unwrap();
    let (mut read_cpu, mut apply_cpu, mut look_cpu) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut lags: Vec<i64> = Vec::new();
    let (mut polls, mut batches) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut last_ckpt = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let c0 = thread_cpu();
        let commits = if last_ckpt.elapsed() > Duration::from_secs(1) {
            last_ckpt = Instant::now();
            src.checkpoint().unwrap().unwrap_or_default()
        } else {
            src.poll().unwrap()
        };
        let c1 = thread_cpu();
        read_cpu += c1 - c0;
        polls += 1;
        if !commits.is_empty() {
            apply(&mut mirror, &commits);
            let c2 = thread_cpu();
            apply_cpu += c2 - c1;
            let visible = now_ns();
            let mut st = reader.prepare_cached("SELECT seq, ns FROM t WHERE seq > ?1").unwrap();
            let rows: Vec<(i64, i64)> = st.query_map([seen], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
            for (seq, ns) in rows {
                lags.push(visible - ns);
                seen = seen.max(seq);
            }
            look_cpu += thread_cpu() - c2;
            batches += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = t0.elapsed().as_secs_f64();
    lags.sort_unstable();
    let q = |p: f64| lags.get(((lags.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64 / 1e6;
    let st = src.stats();
    println!(
        "rows {} polls {polls} batches {batches} lag_ms p50 {:.2} p99 {:.2} max {:.2} | cpu_pct read {:.2} apply {:.2} measure {:.2} | checkpoints {} restarts {} yields {} fence_busy {}",
        lags.len(), q(0.5), q(0.99), q(1.0),
        100.0 * read_cpu.as_secs_f64() / wall, 100.0 * apply_cpu.as_secs_f64() / wall, 100.0 * look_cpu.as_secs_f64() / wall,
        st.checkpoints, st.restarts, st.yields, st.fence_busy
    );
}
