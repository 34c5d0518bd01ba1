//! A shadowed SQLite database inside a stream: its entry in the tree (a file whose chunks are
//! its pages, one each, marked so), how a commit's [`Op::Pages`] changes it, and how the
//! standby's mirror of it is written, repaired and hashed through SQLite itself, so readers of
//! the mirror only ever see whole commits (docs/design/sqlite-shadow.md §3).

use crate::apply::Chunks;
use crate::record::{Op, Record};
use crate::sqlite_mirror::{Mirror, MirrorError, PageCommit};
use crate::{Manifest, ShadowError, path};
use kura_repo::{Id, Node, NodeKind};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The link target that marks a file entry as a SQLite database kept page by page.
pub const SQLITE_MARK: &[u8] = b"kura:sqlite";

/// The page size of a SQLite database entry (kept in `rdev`), `None` for any other entry.
pub fn page_size_of(n: &Node) -> Option<u32> {
    (n.kind == NodeKind::File && n.target == SQLITE_MARK).then(|| u32::try_from(n.rdev).unwrap_or(0))
}

/// A new, empty database entry.
pub fn new_node(page_size: u32) -> Node {
    let mut n = Node::new(Vec::new(), NodeKind::File);
    n.mode = 0o644;
    n.target = SQLITE_MARK.to_vec();
    n.rdev = u64::from(page_size);
    n
}

/// Changes a database entry's pages in place as a commit says (`n` already has its page size).
pub(crate) fn patch(n: &mut Node, page_size: u32, db_pages: u32, pages: &[(u32, Id)]) {
    patch_ids(&mut n.content, db_pages, pages);
    n.size = u64::from(db_pages) * u64::from(page_size);
}

/// A database's page ids after a commit.
pub(crate) fn patch_ids(ids: &mut Vec<Id>, db_pages: u32, pages: &[(u32, Id)]) {
    // Pages past the old size are always listed (the standby checks), so the filler is
    // overwritten at once.
    ids.resize(db_pages as usize, Id([0; 32]));
    for (p, id) in pages {
        if let Some(c) = ids.get_mut((*p as usize).wrapping_sub(1)) {
            *c = *id;
        }
    }
}

/// The names SQLite keeps beside a database (`-wal`, `-shm`, `-journal`): part of the mirror's
/// database, not entries of the tree.
pub fn side_names(rel: &[u8]) -> [Vec<u8>; 3] {
    [[rel, b"-wal"].concat(), [rel, b"-shm"].concat(), [rel, b"-journal"].concat()]
}

/// Whether `rel` is a side file of a database entry of `m`.
pub fn is_side_file(m: &Manifest, rel: &[u8]) -> bool {
    [&b"-wal"[..], b"-shm", b"-journal"].iter().any(|s| rel.strip_suffix(*s).and_then(|db| m.get(db)).and_then(page_size_of).is_some())
}

/// Checks a batch's commits against the tree they follow: a commit that grows a database must
/// list every new page (the mirror never invents one), and a database entry keeps its page
/// size unless the commit lists every page (a database replaced by another), and the stream's
/// databases together never grow past `max_bytes` (0: no limit but the format's; a primary
/// could otherwise make any number of them from references to one zero page).
/// Each page's chunk must be one page long (`raw_len` gives a chunk's length, `None` when it is
/// unknown, which `all_chunks_held` refuses on its own).
pub fn check_records(head: &Manifest, records: &[Record], max_bytes: u64, raw_len: &dyn Fn(&Id) -> Option<u32>) -> Result<(), String> {
    let mut sizes: HashMap<&[u8], (u32, u32)> = HashMap::new();
    // Paths another change replaced, moved or removed within the batch: what the tree had
    // there (or below) no longer counts; nor at `exact`, ancestors a change turned into
    // directories.
    let mut gone: Vec<&[u8]> = Vec::new();
    let mut exact: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    // Every database of the tree, counted once even if the batch removes one (conservative).
    let mut total: u64 = if max_bytes > 0 && records.iter().any(|r| matches!(r.op, Op::Pages { .. })) {
        head.iter().filter(|(_, n)| page_size_of(n).is_some()).map(|(_, n)| n.size).sum()
    } else {
        0
    };
    for r in records {
        for a in path::ancestors(r.op.path()).chain(match &r.op {
            Op::Rename { from, .. } => path::ancestors(from),
            _ => path::ancestors(b""),
        }) {
            exact.insert(a);
            sizes.remove(a);
        }
        match &r.op {
            Op::Pages { path: p, page_size, db_pages, pages, .. } => {
                if let Some((pg, id)) = pages.iter().find(|(_, id)| raw_len(id).is_some_and(|n| n != *page_size)) {
                    return Err(format!("record {}: page {pg} of {} is a chunk of {} bytes, not {page_size}", r.seq, path::show(p), raw_len(id).unwrap_or(0)));
                }
                let (ps, len) = sizes.get(p.as_slice()).copied().unwrap_or_else(|| {
                    if exact.contains(p.as_slice()) || gone.iter().any(|g| path::within(p, g)) {
                        return (0, 0);
                    }
                    head.get(p).and_then(|n| page_size_of(n).map(|ps| (ps, n.content.len() as u32))).unwrap_or((0, 0))
                });
                let bytes = u64::from(*db_pages) * u64::from(*page_size);
                total = (total + bytes).saturating_sub(u64::from(ps) * u64::from(len));
                if max_bytes > 0 && total > max_bytes {
                    return Err(format!(
                        "record {}: with {} at {bytes} bytes the stream's databases would be {total} bytes, more than its max_database ({max_bytes} bytes; raise it in the standby's [[stream]])",
                        r.seq,
                        path::show(p)
                    ));
                }
                let from = if ps == *page_size { len } else { 0 };
                if *db_pages > from {
                    let mut listed: Vec<u32> = pages.iter().map(|(p, _)| *p).filter(|p| *p > from).collect();
                    listed.sort_unstable();
                    listed.dedup();
                    if listed.len() as u64 != u64::from(*db_pages - from) {
                        return Err(format!("record {}: {} grows from {from} to {db_pages} pages without carrying every new page", r.seq, path::show(p)));
                    }
                }
                sizes.insert(p.as_slice(), (*page_size, *db_pages));
            }
            op => {
                // Any other change of or above a database starts it over.
                sizes.retain(|k, _| !path::within(k, op.path()));
                gone.push(op.path());
                if let Op::Rename { from, .. } = op {
                    sizes.retain(|k, _| !path::within(k, from));
                    gone.push(from);
                }
            }
        }
    }
    Ok(())
}

fn mirror_err(e: MirrorError) -> ShadowError {
    match e {
        // A file SQLite cannot read as a database: damaged (only rebuilding it helps).
        MirrorError::Sqlite { path, source }
            if matches!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)) =>
        {
            ShadowError::Corrupt { what: path.display().to_string(), detail: source.to_string() }
        }
        MirrorError::Sqlite { path, source } => ShadowError::Io { path: path.display().to_string(), source: std::io::Error::other(source.to_string()) },
        MirrorError::Invalid { path, problem } => ShadowError::Corrupt { what: path.display().to_string(), detail: problem },
    }
}

thread_local! {
    /// Open mirrors of the applying thread: one SQLite connection per database, not one per
    /// commit.
    static MIRRORS: RefCell<HashMap<PathBuf, Mirror>> = RefCell::new(HashMap::new());
}

/// Closes the applying thread's mirror connections (before a change that may move or remove a
/// database file under them).
pub fn forget_mirrors() {
    MIRRORS.with(|m| m.borrow_mut().clear());
}

/// Removes a database file with its side files.
fn remove_db(p: &Path) -> Result<(), ShadowError> {
    for s in ["", "-wal", "-shm", "-journal"] {
        let mut q = p.as_os_str().to_owned();
        q.push(s);
        match std::fs::remove_file(&q) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ShadowError::io(PathBuf::from(q), e)),
            _ => {}
        }
    }
    Ok(())
}

/// Runs `f` on the mirror database at `rel` under `root`, opened (or created) for pages of
/// `page_size`: parents are made real directories, anything else in the way is removed, a
/// database with another page size is started over.
fn with_mirror<T>(root: &Path, rel: &[u8], page_size: u32, f: impl FnOnce(&mut Mirror) -> Result<T, MirrorError>) -> Result<T, ShadowError> {
    let p = path::join(root, rel);
    MIRRORS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.get(&p).is_none_or(|m| m.page_size() != page_size as usize) {
            cache.remove(&p);
            crate::apply::make_parents(root, rel)?;
            match std::fs::symlink_metadata(&p) {
                Ok(m) if !m.is_file() => crate::apply::remove(&p)?,
                _ => {}
            }
            let m = match Mirror::open(&p, page_size as usize) {
                Err(MirrorError::Invalid { .. }) => {
                    remove_db(&p)?;
                    Mirror::open(&p, page_size as usize)
                }
                r => r,
            };
            cache.insert(p.clone(), m.map_err(mirror_err)?);
        }
        let m = cache.get_mut(&p).ok_or_else(|| ShadowError::Usage("mirror cache".into()))?;
        let r = f(m).map_err(mirror_err);
        if r.is_err() {
            // Whatever failed (a full disk, a lock), the next attempt starts from a fresh
            // connection.
            cache.remove(&p);
        }
        r
    })
}

/// Page images an apply holds at once: a longer run (a base of a large database) is read and
/// written in parts of about this size, within its one transaction.
const APPLY_BYTES: usize = 64 << 20;

/// Applies commits of the database at `rel` to the mirror, as one SQLite transaction.
pub fn apply_pages(root: &Path, rel: &[u8], page_size: u32, commits: &[(u32, &[(u32, Id)])], chunks: &dyn Chunks) -> Result<(), ShadowError> {
    apply_pages_in(root, rel, page_size, commits, chunks, APPLY_BYTES)
}

/// A commit's size (0: worked out when written) and pages, or part of them.
type Piece<'a> = (u32, std::borrow::Cow<'a, [(u32, Id)]>);

/// [`apply_pages`] holding at most `part_bytes` of page images at once.
fn apply_pages_in(root: &Path, rel: &[u8], page_size: u32, commits: &[(u32, &[(u32, Id)])], chunks: &dyn Chunks, part_bytes: usize) -> Result<(), ShadowError> {
    // A commit larger than a part (a base, a reconcile of a whole database) goes in pieces in
    // page order; the pieces before its last leave the database at least as large as the
    // pages they wrote (size 0 below: worked out against the mirror's size when written).
    let per = (part_bytes / page_size.max(1) as usize).max(1);
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    for (db_pages, pages) in commits {
        if pages.len() <= per {
            pieces.push((*db_pages, std::borrow::Cow::Borrowed(*pages)));
            continue;
        }
        let mut sorted = pages.to_vec();
        sorted.sort_by_key(|(p, _)| *p);
        let n = sorted.len().div_ceil(per);
        for (k, part) in sorted.chunks(per).enumerate() {
            pieces.push((if k + 1 == n { *db_pages } else { 0 }, std::borrow::Cow::Owned(part.to_vec())));
        }
    }
    let mut begun = false;
    let r = (|| {
        let mut start = 0;
        while start < pieces.len() {
            let (mut end, mut bytes) = (start, 0usize);
            while end < pieces.len() && (end == start || bytes + pieces[end].1.len() * page_size as usize <= part_bytes) {
                bytes += pieces[end].1.len() * page_size as usize;
                end += 1;
            }
            let mut plain: Vec<Vec<(u32, Vec<u8>)>> = Vec::with_capacity(end - start);
            for (_, pages) in &pieces[start..end] {
                plain.push(pages.iter().map(|(p, id)| chunks.chunk(id).map(|b| (*p, b))).collect::<Result<_, _>>()?);
            }
            let refs: Vec<Vec<(u32, &[u8])>> = plain.iter().map(|c| c.iter().map(|(p, b)| (*p, b.as_slice())).collect()).collect();
            with_mirror(root, rel, page_size, |m| {
                if !begun {
                    m.begin()?;
                }
                for ((db_pages, _), pages) in pieces[start..end].iter().zip(&refs) {
                    let db_pages = match db_pages {
                        0 => pages.iter().map(|(p, _)| *p).max().unwrap_or(0).max(m.size()),
                        n => *n,
                    };
                    m.write(&[PageCommit { pages, db_pages }])?;
                }
                Ok(())
            })?;
            begun = true;
            start = end;
        }
        with_mirror(root, rel, page_size, |m| m.commit())
    })();
    if r.is_err() && begun {
        // A chunk that could not be read leaves the transaction open: nothing of it stays.
        let _ = with_mirror(root, rel, page_size, |m| {
            m.rollback();
            Ok(())
        });
    }
    r
}

/// Page 1 of a mirror as the primary wrote it: SQLite's pager sets the header's change counter
/// (bytes 24..28), its copy at 92..96 and the writing library's version (96..100) on every
/// commit, so the mirror's page 1 differs there from the primary's and only there. `want` is
/// the primary's page 1.
pub fn as_written_by(mirror: &[u8], want: &[u8]) -> Vec<u8> {
    let mut p = mirror.to_vec();
    if p.len() >= 100 && want.len() >= 100 {
        p[24..28].copy_from_slice(&want[24..28]);
        p[92..100].copy_from_slice(&want[92..100]);
    }
    p
}

/// Makes the mirror database at `rel` hold exactly the pages of `n`, writing only those that
/// differ (compared by id when the chunk key is known, else by bytes); returns how many
/// pages were written.
pub fn reconcile_db(root: &Path, rel: &[u8], n: &Node, chunks: &dyn Chunks) -> Result<u64, ShadowError> {
    match reconcile_db_once(root, rel, n, chunks) {
        // A mirror SQLite cannot read (a damaged file, something else written over it) is
        // rebuilt from the journal's pages: every page is known here.
        Err(ShadowError::Corrupt { what, detail }) => {
            tracing::warn!("{what}: {detail}; rebuilding the database from the journal");
            forget_mirrors();
            remove_db(&path::join(root, rel))?;
            reconcile_db_once(root, rel, n, chunks)
        }
        r => r,
    }
}

fn reconcile_db_once(root: &Path, rel: &[u8], n: &Node, chunks: &dyn Chunks) -> Result<u64, ShadowError> {
    let Some(page_size) = page_size_of(n) else { return Ok(0) };
    let key = chunks.id_key();
    let mut differ: Vec<u32> = Vec::new();
    let mut have = 0u32;
    let want_first = n.content.first().map(|id| chunks.chunk(id)).transpose()?;
    with_mirror(root, rel, page_size, |m| {
        m.for_each_page(|p, img| {
            have = have.max(p);
            let img = match (p, &want_first) {
                (1, Some(w)) => std::borrow::Cow::Owned(as_written_by(img, w)),
                _ => std::borrow::Cow::Borrowed(img),
            };
            let img: &[u8] = &img;
            let same = n.content.get((p as usize).wrapping_sub(1)).is_some_and(|want| match key {
                Some(k) => blake3::keyed_hash(&k, img).as_bytes() == &want.0,
                None => chunks.chunk(want).is_ok_and(|b| b == img),
            });
            if !same && p as usize <= n.content.len() {
                differ.push(p);
            }
        })
    })?;
    differ.extend(have + 1..=n.content.len() as u32);
    if differ.is_empty() && have as usize == n.content.len() {
        return Ok(0);
    }
    let pages: Vec<(u32, Id)> = differ.iter().map(|p| (*p, n.content[*p as usize - 1])).collect();
    apply_pages(root, rel, page_size, &[(n.content.len() as u32, &pages)], chunks)?;
    Ok(pages.len() as u64)
}

/// Replaces, in `mine` (the mirror hashed as plain files), each database entry of `tree` by
/// its pages as the mirror's SQLite sees them (committed state, whatever is still in its
/// log), and drops the side files: the two then compare page by page.
pub fn hash_mirror_dbs(mine: &mut Manifest, tree: &Manifest, root: &Path, id_key: &[u8; 32], chunks: &dyn Chunks) {
    for (rel, n) in tree.iter().filter(|(_, n)| page_size_of(n).is_some()) {
        for s in side_names(rel) {
            mine.apply(&Op::Delete { path: s });
        }
        let p = path::join(root, rel);
        let mut ids = Vec::new();
        let want_first = n.content.first().and_then(|id| chunks.chunk(id).ok());
        let read = Mirror::read_pages(&p, |pg, img| {
            let img = match (pg, &want_first) {
                (1, Some(w)) => std::borrow::Cow::Owned(as_written_by(img, w)),
                _ => std::borrow::Cow::Borrowed(img),
            };
            ids.push(Id(*blake3::keyed_hash(id_key, &img).as_bytes()))
        });
        match read {
            Ok(()) => {
                let mut m = n.clone();
                m.size = ids.len() as u64 * m.rdev;
                m.content = ids;
                mine.apply(&Op::Put { path: rel.clone(), node: Box::new(m) });
            }
            Err(_) => mine.apply(&Op::Delete { path: rel.clone() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(path: &str, db_pages: u32, list: &[u32]) -> Record {
        Record { seq: 1, at_ns: 0, op: Op::Pages { path: path.into(), page_size: 4096, db_pages, pages: list.iter().map(|p| (*p, Id([*p as u8; 32]))).collect(), change: 0, salt: [0, 0], frame: 0 } }
    }

    #[test]
    fn growth_must_carry_every_new_page() {
        let mut head = Manifest::default();
        assert!(check_records(&head, &[pages("db", 3, &[1, 2, 3])], 0, &|_| None).is_ok());
        assert!(check_records(&head, &[pages("db", 3, &[1, 3])], 0, &|_| None).unwrap_err().contains("every new page"));
        head.apply(&pages("db", 3, &[1, 2, 3]).op);
        assert_eq!(head.get(b"db").unwrap().content.len(), 3);
        // Within the size: any subset; growth: the new ones; a shrink: nothing more.
        assert!(check_records(&head, &[pages("db", 3, &[2]), pages("db", 5, &[4, 5]), pages("db", 2, &[])], 0, &|_| None).is_ok());
        assert!(check_records(&head, &[pages("db", 3, &[2]), pages("db", 5, &[5])], 0, &|_| None).is_err());
        // Another page size: a new database, every page listed.
        let other = Record { seq: 2, at_ns: 0, op: Op::Pages { path: b"db".to_vec(), page_size: 1024, db_pages: 2, pages: vec![(2, Id([0; 32]))], change: 0, salt: [0, 0], frame: 0 } };
        assert!(check_records(&head, &[other], 0, &|_| None).is_err());
        // A database past the standby's limit is refused.
        assert!(check_records(&head, &[pages("db", 4, &[4])], 3 * 4096, &|_| None).unwrap_err().contains("max_database"));
        assert!(check_records(&head, &[pages("db", 3, &[1])], 3 * 4096, &|_| None).is_ok());
        // ...and so is a second database that the limit has no room for.
        assert!(check_records(&head, &[pages("db2", 1, &[1])], 3 * 4096, &|_| None).unwrap_err().contains("max_database"));
        assert!(check_records(&head, &[pages("db2", 1, &[1])], 4 * 4096, &|_| None).is_ok());
        // A change below the database turns it into a directory: a database there starts over.
        let below = Record { seq: 1, at_ns: 0, op: Op::Delete { path: b"db/x".to_vec() } };
        assert!(check_records(&head, &[below, pages("db", 4, &[4])], 0, &|_| None).is_err());
        // A page whose chunk is not one page long is refused.
        assert!(check_records(&head, &[pages("db", 3, &[2])], 0, &|_| Some(100)).unwrap_err().contains("not 4096"));
        assert!(check_records(&head, &[pages("db", 3, &[2])], 0, &|_| Some(4096)).is_ok());
        // A delete in between starts the database over.
        assert!(check_records(&head, &[Record { seq: 1, at_ns: 0, op: Op::Delete { path: b"db".to_vec() } }, pages("db", 4, &[4])], 0, &|_| None).is_err());
    }

    #[test]
    fn a_position_holds_a_commit_only_in_the_same_log_generation() {
        let at = crate::SqlitePosition { change: 50_000, salt: [7, 9], frame: 120 };
        assert!(at.holds(50_000, [7, 9], 120) && at.holds(49_990, [7, 9], 100));
        assert!(!at.holds(50_001, [7, 9], 121), "a later frame of the same log");
        // The wal-index rebuilt (its counter starts over) or the log restarted: only frames say.
        assert!(!at.holds(10, [7, 9], 130) && !at.holds(10, [8, 1], 2));
        // Every commit in the database file: the counters must be equal.
        assert!(at.holds(50_000, [8, 1], 0) && !at.holds(3, [8, 1], 0));
    }

    #[test]
    fn a_commit_changes_the_entry_in_place() {
        let mut m = Manifest::default();
        m.apply(&pages("d/db", 3, &[1, 2, 3]).op);
        m.apply(&pages("d/db", 4, &[2, 4]).op);
        let n = m.get(b"d/db").unwrap();
        assert_eq!(n.content, vec![Id([1; 32]), Id([2; 32]), Id([3; 32]), Id([4; 32])]);
        assert_eq!((n.size, m.totals()), (4 * 4096, (1, 4 * 4096)));
        m.apply(&pages("d/db", 2, &[]).op);
        assert_eq!((m.get(b"d/db").unwrap().content.len(), m.totals()), (2, (1, 2 * 4096)));
        assert!(is_side_file(&m, b"d/db-wal") && !is_side_file(&m, b"d/dbx-wal"));
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    struct Pages(std::collections::HashMap<Id, Vec<u8>>);
    impl Chunks for Pages {
        fn chunk(&self, id: &Id) -> Result<Vec<u8>, ShadowError> {
            self.0.get(id).cloned().ok_or_else(|| ShadowError::Corrupt { what: "test".into(), detail: "no chunk".into() })
        }
    }

    /// A whole database in one commit, and then two pages far apart, each applied in parts of
    /// 7 pages within one transaction: the copy is the database both times (no page of the
    /// second commit's range zeroed, page 1 consistent with the size).
    #[test]
    fn a_commit_larger_than_a_part_goes_in_pieces_and_leaves_the_database_whole() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.db");
        let c = rusqlite::Connection::open(&src).unwrap();
        c.execute_batch("PRAGMA page_size=512; CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT); WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 400) INSERT INTO t SELECT n, printf('%.60c', 'x') FROM s;").unwrap();
        let read = |c: &Pages| {
            let mut out = Vec::new();
            let mut map = c.0.clone();
            Mirror::read_pages(&src, |p, img| {
                let id = Id(*blake3::hash(img).as_bytes());
                map.insert(id, img.to_vec());
                out.push((p, id));
            })
            .unwrap();
            (out, Pages(map))
        };
        let (all, chunks) = read(&Pages(Default::default()));
        assert!(all.len() > 30, "{}", all.len());
        let root = d.path().join("mirror");
        std::fs::create_dir_all(&root).unwrap();
        apply_pages_in(&root, b"app.db", 512, &[(all.len() as u32, &all)], &chunks, 7 * 512).unwrap();
        let sum = |p: &Path| -> (i64, String) {
            let c = rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let q: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
            (c.query_row("SELECT sum(n) + sum(length(v)) FROM t", [], |r| r.get(0)).unwrap(), q)
        };
        assert_eq!(sum(&root.join("app.db")), sum(&src));
        c.execute_batch("UPDATE t SET v = 'changed' WHERE n IN (3, 398)").unwrap();
        let (now, chunks) = read(&chunks);
        let changed: Vec<(u32, Id)> = now.iter().filter(|x| !all.contains(x)).copied().collect();
        assert!(changed.len() >= 2, "{changed:?}");
        apply_pages_in(&root, b"app.db", 512, &[(now.len() as u32, &changed)], &chunks, 512).unwrap();
        assert_eq!(sum(&root.join("app.db")), sum(&src));
        forget_mirrors();
    }
}
