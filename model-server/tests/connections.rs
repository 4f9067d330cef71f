//! Slow, idle and too many clients against the real server over raw TCP: a slowloris
//! connection is closed at its header deadline, an idle keep-alive connection at its idle
//! timeout, a body that trickles in gets 408, connections beyond the limit wait, and none of
//! them can hold the process past its shutdown deadline.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use kiln_model_server::listener::ConnectionLimits;
use kiln_model_server::manifest::{Batching, Family, Warmup};
use kiln_model_server::serve::{ServeOptions, ServePlan};
use kiln_model_server::state::Limits;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn plan() -> ServePlan {
    ServePlan::from_args(
        Family::TextEmbedding,
        &[format!("minilm:v2={}", common::minilm_dir().display())],
        Warmup { iterations: 0, ..Warmup::default() },
        Batching::default(),
    )
    .expect("plan")
}

async fn server(connections: ConnectionLimits, body_read_timeout: Duration) -> TestServer {
    let options = ServeOptions {
        limits: Limits { body_read_timeout, ..Limits::default() },
        connections,
        ..ServeOptions::default()
    };
    let server = TestServer::with_options(plan(), options).await;
    server.wait_ready().await;
    server
}

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection; returns what it sent and how long it took.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
}

fn embed_request(body: &str, keep_alive: bool) -> String {
    format!(
        "POST /embed/text HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
}

fn limits(header: u64, idle: u64, max: usize) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: max,
        header_read_timeout: Duration::from_secs(header),
        idle_timeout: Duration::from_secs(idle),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_silent_connections_are_closed_at_the_header_deadline() {
    let server = server(limits(1, 30, 64), Duration::from_secs(30)).await;
    // Half a request line, then nothing: closed about a second later, without an answer.
    let mut slow = TcpStream::connect(addr(&server)).await.expect("connect");
    slow.write_all(b"POST /embed/text HTTP/1.1\r\nHost: ki").await.expect("write");
    let (sent, took) = read_to_close(&mut slow, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
    assert!(took < Duration::from_secs(5), "closed late: {took:?}");
    assert!(sent.is_empty(), "nothing is answered to half a request: {sent:?}");
    // A connection that never sends a byte is closed the same way.
    let mut silent = TcpStream::connect(addr(&server)).await.expect("connect");
    let (_, took) = read_to_close(&mut silent, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "a silent connection stayed {took:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_during_a_request() {
    let server = server(limits(5, 1, 64), Duration::from_secs(30)).await;
    let mut conn = TcpStream::connect(addr(&server)).await.expect("connect");
    conn.write_all(embed_request(r#"{"text": "kept alive"}"#, true).as_bytes()).await.expect("write");
    // The answer arrives and the connection stays usable for a second request at once.
    let mut buf = vec![0u8; 65536];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "first answer");
    // Drain the rest of the first response before the idle clock matters.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rest = vec![0u8; 65536];
    let _ = tokio::time::timeout(Duration::from_millis(50), conn.read(&mut rest)).await;
    let (_, took) = read_to_close(&mut conn, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(4), "an idle connection stayed open {took:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_gets_408_with_a_json_error() {
    let server = server(limits(5, 30, 64), Duration::from_secs(1)).await;
    let mut conn = TcpStream::connect(addr(&server)).await.expect("connect");
    let head = "POST /v1/embeddings HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n";
    conn.write_all(head.as_bytes()).await.expect("write");
    conn.write_all(br#"{"input": "#).await.expect("write");
    let (sent, took) = read_to_close(&mut conn, Duration::from_secs(10)).await;
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let body = sent.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(json["error"]["code"], "body_timeout", "{json}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let server = server(limits(3, 30, 2), Duration::from_secs(30)).await;
    // Two silent connections hold both slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        holders.push(TcpStream::connect(addr(&server)).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third client is accepted by the kernel but not served while both slots are taken...
    let started = Instant::now();
    let mut third = TcpStream::connect(addr(&server)).await.expect("connect");
    third.write_all(embed_request(r#"{"text": "third"}"#, false).as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 65536];
    let early = tokio::time::timeout(Duration::from_millis(1500), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the connection limit");
    // ...and is served once the holders are closed at their header deadline.
    let (sent, _) = read_to_close(&mut third, Duration::from_secs(15)).await;
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    drop(holders);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_slow_clients_beyond_its_deadline() {
    // Long client deadlines, a short shutdown timeout: the deadline is what bounds shutdown.
    let options = ServeOptions {
        limits: Limits { body_read_timeout: Duration::from_secs(120), ..Limits::default() },
        connections: limits(120, 120, 64),
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(1),
        ..ServeOptions::default()
    };
    let server = TestServer::with_options(plan(), options).await;
    server.wait_ready().await;
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(addr(&server)).await.expect("connect"));
    }
    // One request stuck in its body: it is running, so only the deadline ends it.
    let mut stuck = TcpStream::connect(addr(&server)).await.expect("connect");
    let head = "POST /v1/embeddings HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    stuck.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown finished within its deadline, slow clients or not");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
