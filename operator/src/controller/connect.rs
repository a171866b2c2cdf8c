//! Reaching the API server at start, and stopping on time whatever state the operator is
//! in.
//!
//! `parley-operator run` first asks the API server for `/version` (at most
//! [`PROBE_TIMEOUT`] per attempt). Until it answers, every attempt that fails is logged
//! with the server's URL and the reason, and retried every [`PROBE_INTERVAL`]: a pod
//! whose API server is away says so within seconds instead of hanging silently, and
//! recovers by itself when the server comes back (no crash-loop backoff to wait out).
//! A stop (SIGTERM, SIGINT) ends the wait at once.

use std::future::Future;
use std::time::Duration;

use kube::Client;

/// How long one `/version` request may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);
/// The pause between two attempts.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(3);

/// How [`wait_for_api`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reached {
    /// The API server answered; its version (`gitVersion`).
    Connected(String),
    /// The stop came first.
    Stopped,
}

/// An error and its sources, `a: b: c`, for a log line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper and kube repeat their cause in their own text now and then.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Asks `server` (the URL `client` talks to, for the log lines) for its version until it
/// answers, logging each failed attempt; returns [`Reached::Stopped`] as soon as `stop`
/// resolves.
pub async fn wait_for_api(
    client: &Client,
    server: &str,
    stop: impl Future<Output = ()>,
) -> Reached {
    let mut stop = std::pin::pin!(stop);
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let why = tokio::select! {
            () = &mut stop => return Reached::Stopped,
            answer = tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()) => match answer {
                Ok(Ok(info)) => return Reached::Connected(info.git_version),
                Ok(Err(e)) => error_chain(&e),
                Err(_) => format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            },
        };
        tracing::error!(
            server,
            attempt,
            error = %why,
            "cannot reach the Kubernetes API server at {server}: {why}; retrying in {} s",
            PROBE_INTERVAL.as_secs()
        );
        tokio::select! {
            () = &mut stop => return Reached::Stopped,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

/// Runs `work` to its end, or, once `stop` has resolved, for at most `deadline` more;
/// `None` when the deadline cut it short.
pub async fn within_deadline_of_stop<T>(
    work: impl Future<Output = T>,
    stop: impl Future<Output = ()>,
    deadline: Duration,
) -> Option<T> {
    tokio::select! {
        out = work => Some(out),
        () = async {
            stop.await;
            tokio::time::sleep(deadline).await;
        } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|e| e as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        let e = Layer(
            "client error (Connect)",
            Some(Box::new(Layer(
                "tcp connect error",
                Some(Box::new(Layer("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
        let repeated = Layer("a: b", Some(Box::new(Layer("b", None))));
        assert_eq!(error_chain(&repeated), "a: b");
    }

    #[tokio::test]
    async fn the_deadline_counts_from_the_stop() {
        let never = std::future::pending::<()>();
        let started = tokio::time::Instant::now();
        let out = within_deadline_of_stop(
            never,
            tokio::time::sleep(Duration::from_millis(50)),
            Duration::from_millis(50),
        )
        .await;
        assert_eq!(out, None);
        assert!(started.elapsed() >= Duration::from_millis(100));
        let out = within_deadline_of_stop(
            async { 7 },
            std::future::pending::<()>(),
            Duration::from_millis(1),
        )
        .await;
        assert_eq!(out, Some(7));
    }
}
