//! A real HTTP/1.1 file server on 127.0.0.1 that misbehaves on request: drops the connection
//! mid-file, answers 503, or announces more bytes than it sends. Honours `Range: bytes=N-` like
//! any static file server, refuses paths with an empty segment (`//`) as object stores do, and
//! counts requests per path.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Send the headers and this many body bytes, then close the connection.
    DropAfter(usize),
    /// 503 Service Unavailable with Retry-After: 0.
    Unavailable,
    /// Content-Length of the whole file, half the body, then close.
    Truncate,
}

#[derive(Default)]
struct Shared {
    faults: HashMap<String, VecDeque<Fault>>,
    requests: HashMap<String, usize>,
}

pub struct FaultyHttp {
    pub base: String,
    shared: Arc<Mutex<Shared>>,
}

impl FaultyHttp {
    /// Serves the files of `root` under `http://127.0.0.1:PORT/`.
    pub async fn start(root: PathBuf) -> FaultyHttp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}/", listener.local_addr().expect("addr"));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let state = state.clone();
                let root = root.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(socket, root, state).await;
                });
            }
        });
        FaultyHttp { base, shared }
    }

    /// Queue faults for the next requests of `path` (relative, e.g. "model.safetensors").
    pub fn inject(&self, path: &str, faults: &[Fault]) {
        let mut s = self.shared.lock().unwrap();
        s.faults.entry(format!("/{path}")).or_default().extend(faults.iter().copied());
    }

    pub fn requests(&self, path: &str) -> usize {
        self.shared.lock().unwrap().requests.get(&format!("/{path}")).copied().unwrap_or(0)
    }

    /// Requests whose path contains `needle`.
    pub fn requests_matching(&self, needle: &str) -> usize {
        self.shared.lock().unwrap().requests.iter().filter(|(p, _)| p.contains(needle)).map(|(_, n)| n).sum()
    }
}

async fn serve_connection(
    socket: tokio::net::TcpStream,
    root: PathBuf,
    state: Arc<Mutex<Shared>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(socket);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range_start = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("range")
            {
                let spec = value.trim().trim_start_matches("bytes=");
                range_start = spec.split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            }
        }
        let fault = {
            let mut s = state.lock().unwrap();
            *s.requests.entry(path.clone()).or_default() += 1;
            s.faults.get_mut(&path).and_then(VecDeque::pop_front)
        };
        let socket = reader.get_mut();
        // Like S3, GCS and most CDNs: an empty path segment names no object.
        if path.contains("//") {
            socket.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await?;
            continue;
        }
        let file = root.join(path.trim_start_matches('/'));
        let Ok(body) = tokio::fs::read(&file).await else {
            socket.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await?;
            continue;
        };
        if let Some(Fault::Unavailable) = fault {
            socket
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\ncontent-length: 0\r\n\r\n")
                .await?;
            continue;
        }
        let total = body.len();
        let start = range_start.min(total);
        let head = if start > 0 {
            format!(
                "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{total}\r\n\r\n",
                total - start,
                total.saturating_sub(1)
            )
        } else {
            format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\naccept-ranges: bytes\r\n\r\n")
        };
        socket.write_all(head.as_bytes()).await?;
        let rest = &body[start..];
        match fault {
            Some(Fault::DropAfter(n)) => {
                socket.write_all(&rest[..n.min(rest.len())]).await?;
                socket.flush().await?;
                return Ok(()); // connection closed mid-body
            }
            Some(Fault::Truncate) => {
                socket.write_all(&rest[..rest.len() / 2]).await?;
                socket.flush().await?;
                return Ok(());
            }
            _ => socket.write_all(rest).await?,
        }
    }
}
