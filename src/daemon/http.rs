//! The daemon's HTTP listener (`--metrics-listen ADDR`, off by default): a small
//! HTTP/1.1 server on `std::net`, read-only, one request per connection
//! (`Connection: close`). The daemon gives it the routes: `GET /metrics` (the Prometheus
//! text) and `GET /` (the status page, `obs::page`); other paths are 404; the
//! listener itself knows none. No request can change anything.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::{At, Error, Result};

/// What a path serves: (content type, body), or None for 404.
pub type Route = Arc<dyn Fn(&str) -> Option<(&'static str, String)> + Send + Sync>;

/// Requests served at once; more get 503.
const MAX_CONNS: usize = 8;
/// Longest request head read.
const MAX_HEAD: usize = 16 << 10;

/// Binds `addr` (`127.0.0.1:9811`, `[::1]:9811`); an address in use or not this host's
/// is a one-line error.
pub fn bind(addr: &str) -> Result<TcpListener> {
    let a: std::net::SocketAddr = addr.parse().map_err(|_| {
        Error::Invalid(format!(
            "--metrics-listen {addr:?}: give an address and a port, e.g. 127.0.0.1:9811"
        ))
    })?;
    TcpListener::bind(a).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::Invalid(format!(
            "--metrics-listen {addr}: the address is in use (another daemon or program listens there)"
        )),
        _ => Error::Invalid(format!("--metrics-listen {addr}: {e}")),
    })
}

/// Serves `listener` from a thread of its own until the process ends.
pub fn serve(listener: TcpListener, route: Route) -> Result<()> {
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNS {
                    let _ = reply(&conn, "503 Service Unavailable", "text/plain", "busy\n");
                    busy.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (route, busy) = (route.clone(), busy.clone());
                let r = std::thread::Builder::new()
                    .name("http-req".into())
                    .spawn(move || {
                        if let Err(e) = answer(&conn, &*route) {
                            tracing::debug!("http request: {e}");
                        }
                        busy.fetch_sub(1, Ordering::AcqRel);
                    });
                if r.is_err() {
                    tracing::warn!("http: cannot start a thread for a request");
                }
            }
        })
        .at(Path::new("http thread"))?;
    Ok(())
}

fn answer(
    conn: &TcpStream,
    route: &dyn Fn(&str) -> Option<(&'static str, String)>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(conn);
    let mut first = String::new();
    r.read_line(&mut first)?;
    // The rest of the head: read and ignore (bounded).
    let mut seen = first.len();
    loop {
        let mut l = String::new();
        let n = r.read_line(&mut l)?;
        seen += n;
        if n == 0 || l == "\r\n" || l == "\n" || seen > MAX_HEAD {
            break;
        }
    }
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return reply(conn, "405 Method Not Allowed", "text/plain", "only GET\n");
    }
    match route(path) {
        Some((ct, body)) if method == "HEAD" => head(conn, "200 OK", ct, body.len()),
        Some((ct, body)) => reply(conn, "200 OK", ct, &body),
        None => reply(conn, "404 Not Found", "text/plain", "not found\n"),
    }
}

fn head(mut conn: &TcpStream, status: &str, ct: &str, len: usize) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {len}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
}

fn reply(mut conn: &TcpStream, status: &str, ct: &str, body: &str) -> std::io::Result<()> {
    head(conn, status, ct, body.len())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}
