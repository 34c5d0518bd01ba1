//! The local directory backend: one file per object, written to a temporary name, fsynced,
//! then hard-linked into place (so an existing name is never replaced) and the directory fsynced.

use crate::{Kind, Listed, ObjectName, ObjectReader, Staged, Store, StoreError, Verb, check_name};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A repository stored in a local directory (or a mounted filesystem).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io(verb: Verb, target: impl std::fmt::Display, source: std::io::Error) -> StoreError {
    StoreError::Io { verb, target: target.to_string(), source }
}

/// A failed open or read of an object: [`StoreError::NotFound`] when it does not exist.
fn read_error(kind: Kind, name: &str, e: std::io::Error) -> StoreError {
    match e.kind() {
        ErrorKind::NotFound => StoreError::NotFound(ObjectName::new(kind, name)),
        _ => io(Verb::Read, ObjectName::new(kind, name), e),
    }
}

impl LocalStore {
    /// Opens an existing store; [`StoreError::NoStore`] when the directory or its `config` is
    /// missing.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        if !root.join("config").is_file() {
            return Err(StoreError::NoStore(root.display().to_string()));
        }
        Ok(LocalStore { root: root.to_path_buf() })
    }

    /// Creates the directory layout (idempotent). The repository only exists once its `config`
    /// object has been written, which the caller does last.
    pub fn create(root: &Path) -> Result<Self, StoreError> {
        let mk = |p: &Path| fs::create_dir_all(p).map_err(|e| io(Verb::Open, p.display(), e));
        mk(root)?;
        for kind in [Kind::Key, Kind::Index, Kind::Snapshot, Kind::Session, Kind::Plan, Kind::Protection] {
            mk(&root.join(kind.dir()))?;
        }
        for i in 0..=255u8 {
            mk(&root.join("data").join(format!("{i:02x}")))?;
        }
        sync_dir(&root.join("data"))?;
        sync_dir(root)?;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(LocalStore { root: root.to_path_buf() })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir_of(&self, kind: Kind, name: &str) -> PathBuf {
        match kind {
            Kind::Config => self.root.clone(),
            Kind::Pack => self.root.join("data").join(name.get(..2).unwrap_or("00")),
            k => self.root.join(k.dir()),
        }
    }

    /// The file an object is (or would be) stored in; the name is checked first.
    pub fn object_path(&self, kind: Kind, name: &str) -> Result<PathBuf, StoreError> {
        self.path_of(kind, name)
    }

    fn path_of(&self, kind: Kind, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        if kind == Kind::Config && name != "config" {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        Ok(self.dir_of(kind, name).join(name))
    }
}

thread_local! {
    /// A few open pack files per thread: a restore reads thousands of blobs from each pack, and
    /// opening the file for every blob cost three syscalls each. Objects are write-once, so a
    /// cached handle can never show other bytes than the name stands for.
    static HANDLES: std::cell::RefCell<Vec<(PathBuf, std::sync::Arc<File>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn cached_handle(path: &Path) -> std::io::Result<std::sync::Arc<File>> {
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(i) = h.iter().position(|(p, _)| p == path) {
            let e = h.remove(i);
            let f = e.1.clone();
            h.insert(0, e);
            return Ok(f);
        }
        let f = std::sync::Arc::new(File::open(path)?);
        h.insert(0, (path.to_path_buf(), f.clone()));
        h.truncate(8);
        Ok(f)
    })
}

/// Repositories made before a kind existed lack its directory: make it on first write.
fn ensure_dir(kind: Kind, dir: &Path) -> Result<(), StoreError> {
    if matches!(kind, Kind::Session | Kind::Plan | Kind::Protection | Kind::Receipt | Kind::Trash | Kind::Lineage | Kind::Drill) && !dir.is_dir() {
        fs::create_dir(dir).or_else(|e| if e.kind() == ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
            .map_err(|e| io(Verb::Write, dir.display(), e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn write_temp(tmp: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    f.write_all(data)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(Verb::Write, dir.display(), e))
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    // A failing OS random source only weakens temp-name uniqueness, which O_EXCL still guards.
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Store for LocalStore {
    fn put_new(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(kind, name)?;
        let obj = ObjectName::new(kind, name);
        let dir = self.dir_of(kind, name);
        if path.exists() {
            return Err(StoreError::Exists(obj));
        }
        ensure_dir(kind, &dir)?;
        let tmp = dir.join(format!(".tmp-{}", random_suffix()));
        if let Err(e) = write_temp(&tmp, data) {
            let _ = fs::remove_file(&tmp);
            return Err(io(Verb::Write, obj, e));
        }
        // link() refuses an existing name, so a concurrent writer of the same name cannot be
        // overwritten; rename() would silently replace it.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(&dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(StoreError::Exists(obj)),
            Err(e) => Err(io(Verb::Write, obj, e)),
        }
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(kind, name)?;
        fs::read(&path).map_err(|e| read_error(kind, name, e))
    }

    fn reader(&self, kind: Kind, name: &str) -> Result<ObjectReader<'_>, StoreError> {
        let path = self.path_of(kind, name)?;
        let file = File::open(&path).map_err(|e| read_error(kind, name, e))?;
        Ok(ObjectReader::new(ObjectName::new(kind, name), Box::new(file)))
    }

    fn get_range(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(kind, name)?;
        let obj = || ObjectName::new(kind, name);
        let f = cached_handle(&path).map_err(|e| read_error(kind, name, e))?;
        let end = offset.saturating_add(len);
        let size = f.metadata().map_err(|e| io(Verb::Read, obj(), e))?.len();
        let short = |size: u64| StoreError::Short { name: obj(), offset, end, len: size };
        // Checked before allocating: a range is never larger than the object (a server passes
        // ranges from its clients).
        if end > size {
            return Err(short(size));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| short(size))?];
        match f.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(short(f.metadata().map(|m| m.len()).unwrap_or(0))),
            Err(e) => Err(io(Verb::Read, obj(), e)),
        }
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        let path = self.object_path(kind, name)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(m.len()),
            Ok(_) => Err(StoreError::NotFound(ObjectName::new(kind, name))),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StoreError::NotFound(ObjectName::new(kind, name))),
            Err(e) => Err(io(Verb::Read, path.display(), e)),
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<Listed>, StoreError> {
        let dirs: Vec<PathBuf> = match kind {
            Kind::Config => {
                return Ok(fs::metadata(self.root.join("config"))
                    .map(|m| vec![Listed { name: "config".into(), size: m.len(), modified: m.modified().ok() }])
                    .unwrap_or_default());
            }
            Kind::Pack => {
                let data = self.root.join("data");
                let rd = fs::read_dir(&data).map_err(|e| io(Verb::List, data.display(), e))?;
                let mut dirs = Vec::new();
                for e in rd {
                    let p = e.map_err(|e| io(Verb::List, data.display(), e))?.path();
                    if p.is_dir() {
                        dirs.push(p);
                    }
                }
                dirs
            }
            k => vec![self.root.join(k.dir())],
        };
        let mut out = Vec::new();
        for dir in dirs {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io(Verb::List, dir.display(), e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| io(Verb::List, dir.display(), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if check_name(&name).is_err() {
                    continue; // temporary files of interrupted writes and foreign files
                }
                // An object deleted between readdir and stat (a session ending, a prune
                // sweeping) simply is not there any more.
                let (size, modified) = match entry.metadata() {
                    Ok(m) => (m.len(), m.modified().ok()),
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(Verb::List, dir.display(), e)),
                };
                out.push(Listed { name, size, modified });
            }
        }
        Ok(out)
    }

    fn replace(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if kind != Kind::Session {
            return Err(StoreError::InvalidName(format!("{name} ({} objects are write-once)", kind.dir())));
        }
        let path = self.path_of(kind, name)?;
        let obj = ObjectName::new(kind, name);
        let dir = self.dir_of(kind, name);
        ensure_dir(kind, &dir)?;
        let tmp = dir.join(format!(".tmp-{}", random_suffix()));
        let done = write_temp(&tmp, data).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp);
            return Err(io(Verb::Write, obj, e));
        }
        sync_dir(&dir)
    }

    fn remove_stale_temporaries(&self, age: std::time::Duration) -> Result<(u64, u64), StoreError> {
        let mut dirs = vec![self.root.clone()];
        for k in Kind::ALL.into_iter().filter(|k| !matches!(k, Kind::Config | Kind::Pack)) {
            dirs.push(self.root.join(k.dir()));
        }
        if let Ok(rd) = fs::read_dir(self.root.join("data")) {
            dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            dirs.push(self.root.join("data"));
        }
        let (mut n, mut bytes) = (0, 0);
        for dir in dirs {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if !e.file_name().to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                let Ok(m) = e.metadata() else { continue };
                let old = m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|d| d > age);
                if old && m.is_file() && fs::remove_file(e.path()).is_ok() {
                    n += 1;
                    bytes += m.len();
                }
            }
        }
        Ok((n, bytes))
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(kind, name)?;
        HANDLES.with(|h| h.borrow_mut().retain(|(p, _)| p != &path));
        fs::remove_file(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => StoreError::NotFound(ObjectName::new(kind, name)),
            _ => io(Verb::Delete, ObjectName::new(kind, name), e),
        })?;
        sync_dir(&self.dir_of(kind, name))
    }

    fn stage(&self, kind: Kind) -> Result<Box<dyn Staged>, StoreError> {
        let dir = match kind {
            Kind::Config => self.root.clone(),
            k => self.root.join(k.dir()),
        };
        ensure_dir(kind, &dir)?;
        let tmp = dir.join(format!(".tmp-{}", random_suffix()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io(Verb::Write, tmp.display(), e))?;
        Ok(Box::new(LocalStaged { store: self.clone(), kind, tmp, file: Some(file) }))
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// A staged object: a temporary file in its kind's directory, linked into place on commit.
struct LocalStaged {
    store: LocalStore,
    kind: Kind,
    tmp: PathBuf,
    file: Option<File>,
}

impl Write for LocalStaged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("staged object already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Staged for LocalStaged {
    fn commit(mut self: Box<Self>, name: &str) -> Result<(), StoreError> {
        let path = self.store.path_of(self.kind, name)?;
        let obj = ObjectName::new(self.kind, name);
        let file = self.file.take().ok_or_else(|| StoreError::InvalidName(name.to_string()))?;
        file.sync_all().map_err(|e| io(Verb::Write, &obj, e))?;
        drop(file);
        let linked = fs::hard_link(&self.tmp, &path);
        match linked {
            Ok(()) => sync_dir(&self.store.dir_of(self.kind, name)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(StoreError::Exists(obj)),
            Err(e) => Err(io(Verb::Write, obj, e)),
        }
        // Drop removes the temporary name.
    }
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn put_new_never_overwrites() {
        let (_d, s) = store();
        s.put_new(Kind::Index, "aa11", b"first").unwrap();
        let err = s.put_new(Kind::Index, "aa11", b"second").unwrap_err();
        assert!(matches!(err, StoreError::Exists(_)));
        assert_eq!(s.get(Kind::Index, "aa11").unwrap(), b"first");
    }

    #[test]
    fn temporary_files_are_not_listed() {
        let (d, s) = store();
        s.put_new(Kind::Pack, "ab12", b"x").unwrap();
        fs::write(d.path().join("data/ab/.tmp-dead"), b"half").unwrap();
        let names: Vec<_> = s.list(Kind::Pack).unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec!["ab12".to_string()]);
    }

    #[test]
    fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
        let (d, s) = store();
        s.put_new(Kind::Pack, "ab12", b"x").unwrap();
        let stale = d.path().join("data/ab/.tmp-stale");
        let fresh = d.path().join("index/.tmp-fresh");
        fs::write(&stale, b"half a pack").unwrap();
        fs::write(&fresh, b"being written").unwrap();
        let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        File::options().write(true).open(&stale).unwrap().set_modified(day_ago).unwrap();
        assert_eq!(s.remove_stale_temporaries(std::time::Duration::from_secs(3600)).unwrap(), (1, 11));
        assert!(!stale.exists() && fresh.exists());
        assert_eq!(s.get(Kind::Pack, "ab12").unwrap(), b"x");
    }

    #[test]
    fn range_past_end_is_short_not_a_panic() {
        let (_d, s) = store();
        s.put_new(Kind::Pack, "cd34", b"0123456789").unwrap();
        assert_eq!(s.get_range(Kind::Pack, "cd34", 2, 3).unwrap(), b"234");
        assert!(matches!(s.get_range(Kind::Pack, "cd34", 8, 5), Err(StoreError::Short { .. })));
        assert!(matches!(s.get_range(Kind::Pack, "cd34", u64::MAX, 5), Err(StoreError::Short { .. })));
        assert!(matches!(s.get(Kind::Pack, "ef56"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn staged_objects_appear_only_on_commit_and_vanish_when_dropped() {
        let (d, s) = store();
        let mut st = s.stage(Kind::Pack).unwrap();
        st.write_all(b"pack bytes").unwrap();
        assert!(s.list(Kind::Pack).unwrap().is_empty());
        st.commit("ab99").unwrap();
        assert_eq!(s.get(Kind::Pack, "ab99").unwrap(), b"pack bytes");
        let mut dropped = s.stage(Kind::Pack).unwrap();
        dropped.write_all(b"half").unwrap();
        drop(dropped);
        let leftovers = fs::read_dir(d.path().join("data")).unwrap().filter(|e| e.as_ref().unwrap().path().is_file()).count();
        assert_eq!(leftovers, 0, "an aborted staged write left a file");
        let mut again = s.stage(Kind::Pack).unwrap();
        again.write_all(b"other").unwrap();
        assert!(matches!(again.commit("ab99"), Err(StoreError::Exists(_))));
        assert_eq!(s.get(Kind::Pack, "ab99").unwrap(), b"pack bytes");
    }

    #[test]
    fn open_without_config_is_no_store() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(LocalStore::open(&d.path().join("nope")), Err(StoreError::NoStore(_))));
    }

    proptest::proptest! {
        // Each case creates a store (257 directories, fsynced): keep the count modest.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn any_name_is_either_refused_or_stays_inside(name in ".{0,12}") {
            let (d, s) = store();
            if s.put_new(Kind::Snapshot, &name, b"v").is_ok() {
                proptest::prop_assert!(d.path().join("snapshots").join(&name).is_file());
            }
        }
    }
}
