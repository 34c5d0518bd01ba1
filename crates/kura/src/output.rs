//! Output: human or JSON printing, byte sizes, and the progress bar (only on a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use kura_ops::Progress;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Standard output is closed or failing: results are no longer written.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Writes one line of results to standard output. When the reader has gone (`| head` had all it
/// wanted) the rest is dropped and the command goes on to its end: `println!` would panic, and
/// dying of SIGPIPE could cut a `forget` or a `prune` short. Any other failure (a full disk
/// under a redirection) is said once on stderr.
pub fn line(args: std::fmt::Arguments<'_>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("kura: cannot write to standard output: {e}; the command goes on without printing");
        }
    }
}

/// Formats bytes as B/KiB/MiB/GiB.
pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", U[i]) }
}

/// The first `n` characters of an id for display (the whole string when shorter).
pub fn short(s: &str, n: usize) -> &str {
    s.get(..n).unwrap_or(s)
}

/// Prints a value as pretty JSON on stdout.
pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A progress bar on stderr when it is a terminal; warnings always go to stderr.
pub struct Bar {
    bar: Option<ProgressBar>,
    files: AtomicU64,
    total: AtomicU64,
    quiet: bool,
}

impl Bar {
    /// A bar if stderr is a terminal and output is neither quiet nor JSON.
    pub fn new(quiet: bool, json: bool) -> Self {
        let bar = (!quiet && !json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Bar { bar, files: AtomicU64::new(0), total: AtomicU64::new(0), quiet }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn add_total(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc_length(bytes);
            let total = self.total.fetch_add(files, Ordering::Relaxed) + files;
            b.set_message(format!("{}/{total} files", self.files.load(Ordering::Relaxed)));
        }
    }
    fn advance(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
            if files > 0 {
                let done = self.files.fetch_add(files, Ordering::Relaxed) + files;
                b.set_message(format!("{done}/{} files", self.total.load(Ordering::Relaxed)));
            }
        }
    }
    fn warn(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("kura: warning: {msg}")),
            None if !self.quiet => eprintln!("kura: warning: {msg}"),
            None => eprintln!("kura: warning: {msg}"),
        }
    }
}
