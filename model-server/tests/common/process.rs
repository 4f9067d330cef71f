//! The real `kiln-model-server` binary as a child process: started on a free port, waited for,
//! measured, killed when dropped.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free port that no other server of this test binary was given. The kernel may hand the
/// same just-released port to two binds in a row, and two tests starting servers at once then
/// shared it: one server failed to bind and its test talked to the other test's server.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        if GIVEN.lock().unwrap_or_else(PoisonError::into_inner).insert(port) {
            return port;
        }
    }
}

/// The real binary serving `models` (NAME:VERSION=DIR) with `extra` flags and environment.
pub fn spawn_with(port: u16, models: &[String], extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-model-server"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--warmup-iterations", "1"]);
    for m in models {
        cmd.arg("--model").arg(m);
    }
    let child = cmd
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln-model-server");
    Proc(child)
}

pub async fn wait_ready(base: &str) {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} never became ready");
}

/// How the process ended, once it has (at most `within` from now).
pub async fn exit_status(server: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}
