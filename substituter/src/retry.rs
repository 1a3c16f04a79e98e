//! The one retry loop of the runner's uploads: a request that failed for a transient reason
//! inside a push, and a whole batch of the push daemon.

use std::time::Duration;

use flywheel_core::{Error, ErrorKind, Result};

/// How often, and after which pauses, an operation is tried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all (at least one).
    pub attempts: u32,
    /// The pause before the second try; each later pause is `growth` times the one before.
    pub first_pause: Duration,
    /// Factor between pauses.
    pub growth: u32,
    /// Retry only [`ErrorKind::Unavailable`] (the server unreachable or overloaded); other
    /// errors (a refusal, say) would fail again.
    pub transient_only: bool,
}

impl RetryPolicy {
    /// One request of a push: a few quick tries, for transient failures only.
    pub const REQUEST: RetryPolicy =
        RetryPolicy { attempts: 3, first_pause: Duration::from_millis(200), growth: 3, transient_only: true };

    /// A push daemon's batch, `attempts` tries whatever the failure, 2, 4, 8... seconds apart:
    /// a batch spans many requests, and each has retried its transient failures already.
    pub fn batch(attempts: u32) -> RetryPolicy {
        RetryPolicy { attempts, first_pause: Duration::from_secs(2), growth: 2, transient_only: false }
    }

    fn retries(&self, err: &Error, attempt: u32) -> bool {
        attempt < self.attempts && (!self.transient_only || err.kind() == ErrorKind::Unavailable)
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of tries; `what` names it in
    /// the log.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut pause = self.first_pause;
        let mut attempt = 1;
        loop {
            match op().await {
                Err(err) if self.retries(&err, attempt) => {
                    tracing::warn!(attempt, "{what} failed, retrying in {pause:?}: {err}");
                    tokio::time::sleep(pause).await;
                    pause *= self.growth;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(attempts: u32, transient_only: bool) -> RetryPolicy {
        RetryPolicy { attempts, first_pause: Duration::from_millis(1), growth: 2, transient_only }
    }

    async fn failing(policy: RetryPolicy, kind: ErrorKind, succeed_on: u32) -> (Result<u32>, u32) {
        let tries = AtomicU32::new(0);
        let result = policy
            .run("test", || async {
                let n = tries.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= succeed_on { Ok(n) } else { Err(Error::new(kind, "down")) }
            })
            .await;
        (result, tries.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn transient_failures_are_retried_up_to_the_limit() {
        assert_eq!(failing(quick(3, true), ErrorKind::Unavailable, 3).await.0.unwrap(), 3);
        let (result, tries) = failing(quick(3, true), ErrorKind::Unavailable, 10).await;
        assert!(result.is_err());
        assert_eq!(tries, 3);
    }

    #[tokio::test]
    async fn other_failures_are_retried_only_when_asked() {
        let (result, tries) = failing(quick(3, true), ErrorKind::Forbidden, 2).await;
        assert_eq!(result.unwrap_err().kind(), ErrorKind::Forbidden);
        assert_eq!(tries, 1);
        assert_eq!(failing(quick(3, false), ErrorKind::Forbidden, 2).await.0.unwrap(), 2);
    }
}
