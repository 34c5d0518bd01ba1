//! A TCP proxy in front of a real S3 server that misbehaves on request: answers 503 Slow Down,
//! cuts an upload's connection halfway through its body, or stalls without answering. Every
//! request gets `Connection: close` on the way in, so each arrives on a connection of its own
//! and can be singled out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Faults still to inject, and what was injected.
#[derive(Default)]
pub struct Faults {
    /// Answer this many next requests with 503 Slow Down.
    pub slow_down: AtomicU32,
    /// Cut this many next uploads (PUT bodies over 1 MiB) after 64 KiB.
    pub cut_uploads: AtomicU32,
    /// Hold this many next requests open without ever answering.
    pub stall: AtomicU32,
    /// Injected so far: 503s, cut uploads, stalls.
    pub answered_503: AtomicU32,
    pub cut: AtomicU32,
    pub stalled: AtomicU32,
}

pub struct Proxy {
    pub port: u16,
    pub faults: Arc<Faults>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (faults.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (f, st) = (f.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &f, &st);
                });
            }
        });
        Proxy { port, faults, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Takes one from a fault counter, if any is left.
fn take(c: &AtomicU32) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

fn serve(client: TcpStream, upstream: u16, f: &Faults, stop: &AtomicBool) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let before = head.len();
        reader.read_until(b'\n', &mut head)?;
        if head.len() == before {
            return Ok(()); // closed before a whole request
        }
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let method = text.split(' ').next().unwrap_or("").to_string();
    let length: u64 = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    let mut client_w = client;
    if take(&f.slow_down) {
        std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        write!(client_w, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
        f.answered_503.fetch_add(1, Ordering::SeqCst);
        return client_w.shutdown(Shutdown::Both);
    }
    if take(&f.stall) {
        f.stalled.fetch_add(1, Ordering::SeqCst);
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        return Ok(());
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    // One request per connection: the next one passes through here again.
    let kept: Vec<&str> = text.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
    let head = kept.join("\r\n").replacen("\r\n", "\r\nConnection: close\r\n", 1);
    up.write_all(head.as_bytes())?;
    if method == "PUT" && length > 1 << 20 && take(&f.cut_uploads) {
        std::io::copy(&mut (&mut reader).take(64 << 10), &mut up)?;
        f.cut.fetch_add(1, Ordering::SeqCst);
        let _ = up.shutdown(Shutdown::Both);
        return client_w.shutdown(Shutdown::Both);
    }
    let mut up_r = up.try_clone()?;
    let pump = std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut up);
    });
    std::io::copy(&mut up_r, &mut client_w)?;
    let _ = client_w.shutdown(Shutdown::Both);
    let _ = up_r.shutdown(Shutdown::Both);
    let _ = pump.join();
    Ok(())
}
