//! `parley-operator run` as a process: it says within seconds when it cannot reach the API
//! server (naming the server), and stops within 5 s of SIGTERM or SIGINT in every state:
//! before any API call succeeded (refused, or a server that never answers), while it
//! leads, and after the API server went away.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The bound of the issue: exit within this long after the signal.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// A running `parley-operator run` and the lines of its stderr.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Run {
    fn start(kubeconfig: &Path, args: &[&str]) -> Run {
        Self::start_as(kubeconfig, args, "parley-operator-test")
    }

    /// With `POD_NAME=identity` (the holder identity of the leader Lease).
    fn start_as(kubeconfig: &Path, args: &[&str], identity: &str) -> Run {
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley-operator"))
            .arg("run")
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env("POD_NAME", identity)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting parley-operator run");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Run {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to `within` for a stderr line that contains every one of `parts`.
    fn expect_line(&mut self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        if let Some(line) = self
            .seen
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return line.clone();
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "no stderr line with {parts:?} within {within:?}; stderr so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// Sends `signal` (TERM, INT) and returns how long the process took to exit; fails if
    /// it does not exit, successfully, within [`STOP_WITHIN`].
    fn stop(mut self, signal: &str) -> Duration {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
        let sent = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = sent.elapsed();
                // Whatever it logged on the way out, for a failure message.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(line);
                }
                assert!(
                    status.success(),
                    "exit status {status} after SIG{signal}; stderr:\n{}",
                    self.seen.join("\n")
                );
                return took;
            }
            if sent.elapsed() > STOP_WITHIN {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "still running {STOP_WITHIN:?} after SIG{signal}; stderr:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A kubeconfig for `server` with a token that no server will ever see.
fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}
users:
- name: u
  user: {{token: not-a-real-token}}
contexts:
- name: x
  context: {{cluster: c, user: u}}
current-context: x
"
        ),
    )
    .unwrap();
    path
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

#[test]
fn refused_api_server_is_named_and_a_signal_stops_run_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = format!("https://127.0.0.1:{}", closed_port());
    let config = kubeconfig(dir.path(), &server);
    for (args, signal) in [
        (&["--leader-election=false"][..], "TERM"),
        (&["--leader-election-namespace", "default"][..], "TERM"),
        (&["--leader-election=false"][..], "INT"),
    ] {
        let started = Instant::now();
        let mut run = Run::start(&config, args);
        let line = run.expect_line(
            &["cannot reach the Kubernetes API server", &server],
            Duration::from_secs(3),
        );
        assert!(line.contains("Connection refused"), "{line}");
        // Still retrying, and says so again.
        run.expect_line(&["\"attempt\":2"], Duration::from_secs(5));
        let took = run.stop(signal);
        eprintln!(
            "{args:?}: reported at once, stopped {took:?} after SIG{signal} (ran {:?})",
            started.elapsed()
        );
    }
}

/// A server that accepts connections and never answers: each attempt times out, is
/// reported, and a SIGTERM in the middle of one still stops the process.
#[test]
fn silent_api_server_is_named_and_sigterm_stops_run() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = std::sync::Arc::clone(&held);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                // Kept open, never read or written.
                held.lock().unwrap().push(stream);
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let server = format!("https://127.0.0.1:{port}");
    let config = kubeconfig(dir.path(), &server);
    let mut run = Run::start(&config, &["--leader-election=false"]);
    let line = run.expect_line(
        &["cannot reach the Kubernetes API server", &server],
        Duration::from_secs(7),
    );
    assert!(line.contains("no answer within"), "{line}");
    // The next attempt is in flight (3 s pause, then up to 4 s): stop in the middle.
    std::thread::sleep(Duration::from_secs(4));
    let took = run.stop("TERM");
    eprintln!("stopped {took:?} after SIGTERM during an attempt");
    assert!(
        !held.lock().unwrap().is_empty(),
        "the operator never connected"
    );
}

/// With a real API server: a standby waiting for the Lease and a leader stop within 5 s
/// of SIGTERM, and so does a leader whose API server went away.
#[test]
fn a_leader_stops_on_sigterm_with_its_api_server_and_after_it_went_away() {
    use parley_e2e::controlplane::{self, ControlPlane, Unavailable};
    if controlplane::external_cluster_requested() {
        eprintln!("SKIPPED: stops its own control plane; not with an external cluster");
        return;
    }
    let cp = match ControlPlane::start() {
        Ok(cp) => cp,
        Err(e) => match e.downcast_ref::<Unavailable>() {
            Some(u) => return controlplane::skip_or_fail(u).unwrap(),
            None => panic!("{e:#}"),
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = cp.client().await.unwrap();
        let crds = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/crd/parley-crds.yaml"),
        )
        .unwrap();
        controlplane::apply_crds(&client, &crds).await.unwrap();
    });
    let args = ["--leader-election-namespace", "default"];

    let mut leader = Run::start_as(cp.kubeconfig(), &args, "op-a");
    leader.expect_line(
        &["connected to the Kubernetes API"],
        Duration::from_secs(10),
    );
    leader.expect_line(&["acquired the leader Lease"], Duration::from_secs(20));
    let mut standby = Run::start_as(cp.kubeconfig(), &args, "op-b");
    standby.expect_line(&["waiting for the leader Lease"], Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let took = standby.stop("TERM");
    eprintln!("a standby stopped {took:?} after SIGTERM");
    let took = leader.stop("TERM");
    eprintln!("a connected leader stopped {took:?} after SIGTERM");

    let mut run = Run::start_as(cp.kubeconfig(), &args, "op-c");
    // Leads once the Lease is free (released on the way out, or expired: 15 s).
    run.expect_line(&["acquired the leader Lease"], Duration::from_secs(25));
    cp.stop();
    std::thread::sleep(Duration::from_secs(2));
    let took = run.stop("TERM");
    eprintln!("a leader without its API server stopped {took:?} after SIGTERM");
}
