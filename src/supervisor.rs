//! The monitor's long-running tasks, watched: a task that panics takes the process down.
//!
//! A panic in a tokio task ends only that task. The rest of the monitor would go on half
//! alive: with the applier gone, heartbeats pile up unapplied while `/readyz` still says 200;
//! with the MQTT task gone, nothing is published. A restart (systemd, Kubernetes) is the
//! honest answer, so `run` stops the others and exits 1, naming the task.
//!
//! This relies on panics unwinding (Cargo's default; with `panic = "abort"` a panic would end
//! the process at once, which is not half alive either, but skips the orderly stop).
//!
//! It must not know what the tasks do, nor the order they stop in (that is `run`'s: two
//! supervisors, the HTTP server's stopped last).

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A task panicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task '{task}' panicked: {message}")]
pub(crate) struct TaskPanicked {
    pub(crate) task: &'static str,
    pub(crate) message: String,
}

/// How [`Supervisor::stop`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Every task ended within the grace.
    Clean,
    /// These tasks were still running at the end of the grace and were aborted.
    TimedOut { running: Vec<&'static str> },
}

/// Named tasks sharing one cancellation token.
pub(crate) struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    token: CancellationToken,
    /// Tasks that tasks spawn (the outbox's republishing): waited for at stop, but not
    /// watched (their handles are theirs).
    helpers: TaskTracker,
}

impl Supervisor {
    pub(crate) fn new() -> Supervisor {
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            token: CancellationToken::new(),
            helpers: TaskTracker::new(),
        }
    }

    /// Cancelled when the tasks should stop; give each task a child of it.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    #[cfg(test)]
    pub(crate) fn helpers(&self) -> TaskTracker {
        self.helpers.clone()
    }

    pub(crate) fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Completes with the first task that panics; pending while none has (tasks that end
    /// normally are forgotten). Cancel-safe: meant for a `select!`.
    pub(crate) async fn panicked(&mut self) -> TaskPanicked {
        loop {
            match self.tasks.join_next_with_id().await {
                None => std::future::pending::<()>().await,
                Some(Ok((id, ()))) => {
                    self.names.remove(&id);
                }
                Some(Err(e)) => {
                    if let Some(p) = self.panic_of(e) {
                        return p;
                    }
                }
            }
        }
    }

    /// Cancels every task and waits for them (and their helpers) for up to `grace`, then
    /// aborts what is left. A panic seen meanwhile is returned (the first one): a shutdown
    /// that lost a task is not clean.
    pub(crate) async fn stop(mut self, grace: Duration) -> Result<Stopped, TaskPanicked> {
        self.token.cancel();
        self.helpers.close();
        let mut first_panic = None;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                match joined {
                    Ok((id, ())) => {
                        self.names.remove(&id);
                    }
                    Err(e) => {
                        if let Some(p) = self.panic_of(e) {
                            first_panic.get_or_insert(p);
                        }
                    }
                }
            }
            self.helpers.wait().await;
        })
        .await;
        let stopped = match drained {
            Ok(()) => Stopped::Clean,
            Err(_) => {
                let mut running: Vec<_> = self.names.values().copied().collect();
                running.sort_unstable();
                self.tasks.abort_all();
                Stopped::TimedOut { running }
            }
        };
        match first_panic {
            Some(p) => Err(p),
            None => Ok(stopped),
        }
    }

    /// The panic in `e`, with its task's name; `None` for a task we aborted.
    fn panic_of(&mut self, e: JoinError) -> Option<TaskPanicked> {
        let task = self.names.remove(&e.id()).unwrap_or("unnamed");
        e.try_into_panic().ok().map(|payload| TaskPanicked {
            task,
            message: panic_message(payload.as_ref()),
        })
    }
}

/// What `panic!` was given: a `&str` or a `String` in practice.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A task that runs until cancelled and records that it saw the cancellation.
    fn worker(sup: &mut Supervisor, name: &'static str) -> Arc<AtomicBool> {
        let stopped = Arc::new(AtomicBool::new(false));
        let (token, s) = (sup.token().child_token(), stopped.clone());
        sup.spawn(name, async move {
            token.cancelled().await;
            s.store(true, Ordering::SeqCst);
        });
        stopped
    }

    /// The panic is reported with its task's name and message, and stopping then cancels
    /// the other tasks, which end cleanly.
    #[tokio::test]
    async fn a_panic_names_its_task_and_the_others_are_stopped() {
        let mut sup = Supervisor::new();
        let mqtt = worker(&mut sup, "mqtt");
        let expirer = worker(&mut sup, "expirer");
        sup.spawn("applier", async {
            tokio::task::yield_now().await;
            panic!("applied {} heartbeats, then this", 3);
        });
        let p = sup.panicked().await;
        assert_eq!(
            p,
            TaskPanicked {
                task: "applier",
                message: "applied 3 heartbeats, then this".into(),
            }
        );
        assert_eq!(
            p.to_string(),
            "task 'applier' panicked: applied 3 heartbeats, then this"
        );
        assert!(!mqtt.load(Ordering::SeqCst));
        assert_eq!(sup.stop(Duration::from_secs(10)).await, Ok(Stopped::Clean));
        assert!(mqtt.load(Ordering::SeqCst) && expirer.load(Ordering::SeqCst));
    }

    /// Tasks that end normally are not panics: `panicked` stays pending.
    #[tokio::test]
    async fn tasks_that_end_are_not_panics() {
        let mut sup = Supervisor::new();
        sup.spawn("listener", async {});
        let _outbox = worker(&mut sup, "outbox");
        let waited = tokio::time::timeout(Duration::from_millis(200), sup.panicked()).await;
        assert!(waited.is_err(), "{waited:?}");
        assert_eq!(sup.stop(Duration::from_secs(1)).await, Ok(Stopped::Clean));
    }

    /// A task that ignores the cancellation is aborted after the grace and named.
    #[tokio::test]
    async fn stop_is_bounded_and_names_what_hung() {
        let mut sup = Supervisor::new();
        let _mqtt = worker(&mut sup, "mqtt");
        sup.spawn("applier", std::future::pending());
        let helper_done = Arc::new(AtomicBool::new(false));
        let h = helper_done.clone();
        sup.helpers().spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            h.store(true, Ordering::SeqCst);
        });
        let started = tokio::time::Instant::now();
        let grace = Duration::from_millis(300);
        assert_eq!(
            sup.stop(grace).await,
            Ok(Stopped::TimedOut {
                running: vec!["applier"]
            })
        );
        let took = started.elapsed();
        assert!(took >= grace && took < grace * 10, "{took:?}");
        assert!(helper_done.load(Ordering::SeqCst));
    }

    /// A panic during the shutdown itself is reported too: that shutdown was not clean.
    #[tokio::test]
    async fn a_panic_while_stopping_is_reported() {
        let mut sup = Supervisor::new();
        let token = sup.token().child_token();
        sup.spawn("outbox", async move {
            token.cancelled().await;
            panic!("flushing acks");
        });
        let _http = worker(&mut sup, "http");
        let stopped = sup.stop(Duration::from_secs(10)).await;
        assert_eq!(
            stopped,
            Err(TaskPanicked {
                task: "outbox",
                message: "flushing acks".into()
            })
        );
    }

    #[test]
    fn panic_payloads_become_messages() {
        assert_eq!(panic_message(&"literal"), "literal");
        assert_eq!(panic_message(&String::from("formatted")), "formatted");
        assert_eq!(
            panic_message(&42u32),
            "(a panic payload that is not a string)"
        );
    }
}
