//! Paths inside a shadowed tree: relative, `/`-separated raw bytes. Everything the standby
//! writes goes through [`check`], so nothing a primary sends can reach outside the mirror.

/// Checks a relative path: non-empty components separated by single `/`, none `.` or `..`,
/// no NUL, not absolute.
pub fn check(p: &[u8]) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.contains(&0) {
        return Err(format!("path {:?} contains NUL", show(p)));
    }
    for c in p.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." || c == b".." {
            return Err(format!("path {:?} is not a plain relative path", show(p)));
        }
    }
    Ok(())
}

/// The path for messages (lossy UTF-8).
pub fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The parent of a relative path (`None` at the top).
pub fn parent(p: &[u8]) -> Option<&[u8]> {
    p.iter().rposition(|&b| b == b'/').map(|i| &p[..i])
}

/// Every ancestor of `p`, outermost first.
pub fn ancestors(p: &[u8]) -> impl Iterator<Item = &[u8]> {
    p.iter().enumerate().filter(|(_, b)| **b == b'/').map(move |(i, _)| &p[..i])
}

/// Whether `p` is `dir` or lies below it.
pub fn within(p: &[u8], dir: &[u8]) -> bool {
    p == dir || (p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/')
}

/// `root` joined with a relative path.
pub fn join(root: &std::path::Path, p: &[u8]) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    root.join(std::ffi::OsStr::from_bytes(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_pass() {
        for ok in [&b"a"[..], b"a/b", b"a b/.c", b"..a/b.."] {
            assert!(check(ok).is_ok(), "{:?}", show(ok));
        }
        for bad in [&b""[..], b"/a", b"a/", b"a//b", b"./a", b"a/../b", b"..", b"a\0b"] {
            assert!(check(bad).is_err(), "{:?}", show(bad));
        }
        assert_eq!(parent(b"a/b/c"), Some(&b"a/b"[..]));
        assert_eq!(ancestors(b"a/b/c").collect::<Vec<_>>(), vec![&b"a"[..], b"a/b"]);
        assert!(within(b"a/b", b"a") && within(b"a", b"a") && !within(b"ab", b"a"));
    }
}
