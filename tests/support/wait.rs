//! Waiting without sleeping-and-hoping: polls bounded by the harness's patience, or by progress.

use std::time::Duration;

use tokio::time::Instant;

/// How long `eventually` waits; `PRESENCED_TEST_PATIENCE_MS` overrides it for slow machines.
pub fn patience() -> Duration {
    std::env::var("PRESENCED_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(20))
}

/// Polls `check` until it returns `Some`, or panics with `what` after [`patience`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` (how far along, and whether done) until done; panics with `what` only
/// after [`patience`] passed with no progress: for work whose length is the machine's
/// speed (a backlog, a mass expiry), not a promise of the product.
pub async fn while_progressing<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (u64, bool)>,
{
    let mut best = 0;
    let mut moved = Instant::now();
    loop {
        let (now, done) = check().await;
        if done {
            return;
        }
        if now > best {
            best = now;
            moved = Instant::now();
        } else if moved.elapsed() > patience() {
            panic!(
                "no progress for {:?} (at {best}) waiting for: {what}",
                patience()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
