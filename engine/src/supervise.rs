//! Supervision, after Erlang/OTP: the path tree is the supervision tree.
//!
//! An isolate's supervisor is the isolate at its parent path (`/app` supervises
//! `/app/db`); top-level isolates are supervised by the node. Isolates spawned with
//! [`spawn_supervised`](crate::Cluster::spawn_supervised) carry a [`Restart`] policy and a
//! re-runnable entry; when one stops, its supervisor's [`Supervision`] decides:
//!
//! - [`Strategy::OneForOne`] restarts the child alone; [`Strategy::OneForAll`] stops its
//!   supervised siblings (children before parents) and restarts them all in start order;
//!   [`Strategy::RestForOne`] does that for the siblings started after it.
//! - At most `max_restarts` restarts within `within` per supervisor. One more failure and
//!   the supervisor gives up: its children are stopped, it gets
//!   [`Event::SupervisionGaveUp`](crate::Event::SupervisionGaveUp) and is asked to shut
//!   down, and it goes down as [`DownReason::Escalated`] — a failure its own supervisor
//!   handles in turn: restarts it per its [`Restart`] policy if it was spawned with
//!   `spawn_supervised`, or, if it was spawned with plain `spawn` (temporary), only gets
//!   [`Event::ChildFailed`](crate::Event::ChildFailed) for it. When the node gives up, it
//!   shuts down and [`Cluster::failure`](crate::Cluster::failure) says why.
//! - A restart runs the same entry at the same path with the same properties, as a new
//!   incarnation: a new endpoint id and a fresh [`IsolateRef`]. A reference held across
//!   the restart keeps naming the old incarnation, never the new one:
//!   [`IsolateRef::is_alive`] is `false`, sends and transfers to it fail with
//!   [`SendError::Disconnected`](crate::SendError::Disconnected), and a `call` through it
//!   fails with [`CallError::TargetDown`](crate::CallError::TargetDown) and the old
//!   incarnation's reason. Look the path up again for the new one: between the stop and
//!   the restart the lookup fails for a moment
//!   ([`LookupError::NotFound`](crate::LookupError::NotFound)), so retry it (or watch for
//!   [`Event::IsolateUp`](crate::Event::IsolateUp)).
//! - Supervisors receive [`Event::ChildFailed`](crate::Event::ChildFailed) (with the panic
//!   message) and [`Event::ChildRestarted`](crate::Event::ChildRestarted); a supervisor
//!   isolate also gets `ChildFailed` for a failed child it spawned with plain `spawn`.
//!   The node's own events, about supervised top-level isolates, go to every endpoint
//!   watching isolates (filtered by the watch filters); the failure of any top-level
//!   isolate reaches the watchers as [`Event::IsolateDown`](crate::Event::IsolateDown)
//!   with its reason.
//!
//! Whatever stops an isolate — its return, a panic, a restart, an escalation — also stops
//! the isolates below it in the path tree first, deepest first, each getting
//! [`Event::ShutdownRequested`](crate::Event::ShutdownRequested). Node shutdown stops the
//! whole tree that way. Restart decisions and ordered stops run on one supervision thread
//! per node, started with the first job; no isolate ever blocks on them.

use std::sync::{mpsc, Arc, Weak};
use std::time::{Duration, Instant};

use crate::cluster::{ClusterInner, Registry};
use crate::endpoint::{lock, Control};
use crate::inbox::Context;
use crate::isolate::{DownReason, IsolateRef};
use crate::path::Properties;

/// When a supervised isolate is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Always, whatever the reason it stopped.
    Permanent,
    /// Only after a failure: a panic or an escalation (not a normal return or `exit`).
    Transient,
    /// Never (what [`spawn`](crate::Cluster::spawn) gives every isolate).
    Temporary,
}

/// Which children a supervisor restarts when one of them stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Only the one that stopped.
    OneForOne,
    /// All of its supervised children.
    OneForAll,
    /// The one that stopped and those started after it.
    RestForOne,
}

/// A supervisor's strategy and restart intensity.
///
/// ```
/// use std::time::Duration;
/// use isolate_cluster::{Strategy, Supervision};
/// let s = Supervision::one_for_all().intensity(5, Duration::from_secs(10));
/// assert_eq!(s.strategy(), Strategy::OneForAll);
/// assert_eq!(s.max_restarts(), 5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Supervision {
    strategy: Strategy,
    max_restarts: u32,
    within: Duration,
}

impl Default for Supervision {
    /// One-for-one, at most 3 restarts in 5 seconds.
    fn default() -> Self {
        Self::one_for_one()
    }
}

impl Supervision {
    /// One-for-one, at most 3 restarts in 5 seconds.
    pub fn one_for_one() -> Self {
        Self {
            strategy: Strategy::OneForOne,
            max_restarts: 3,
            within: Duration::from_secs(5),
        }
    }

    /// One-for-all, at most 3 restarts in 5 seconds.
    pub fn one_for_all() -> Self {
        Self {
            strategy: Strategy::OneForAll,
            ..Self::one_for_one()
        }
    }

    /// Rest-for-one, at most 3 restarts in 5 seconds.
    pub fn rest_for_one() -> Self {
        Self {
            strategy: Strategy::RestForOne,
            ..Self::one_for_one()
        }
    }

    /// At most `max_restarts` restarts within any `within`; the next failure escalates.
    /// `max_restarts = 0` escalates at the first failure.
    pub fn intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.within = within;
        self
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Restarts allowed per window.
    pub fn max_restarts(&self) -> u32 {
        self.max_restarts
    }

    /// The window.
    pub fn within(&self) -> Duration {
        self.within
    }
}

/// A re-runnable entry function.
pub(crate) type Entry = Arc<dyn Fn(&Context) + Send + Sync>;

/// What the node remembers of a supervised isolate.
pub(crate) struct ChildRecord {
    pub props: Properties,
    pub restart: Restart,
    pub entry: Entry,
    /// The running incarnation.
    pub current: IsolateRef,
    /// Start order among all supervised isolates (siblings compare by it).
    pub order: u64,
    /// Its supervisor is stopping it to restart it (its stop is not a failure).
    pub stopping: bool,
}

/// A supervision event on its way to a supervisor (or, for the node, to watchers).
#[derive(Clone, Debug)]
pub(crate) enum Notice {
    Failed(IsolateRef, DownReason),
    Restarted(IsolateRef),
    GaveUp(String),
}

/// Work for the supervision thread.
pub(crate) enum Job {
    /// A supervised isolate stopped on its own.
    ChildDown {
        path: String,
        id: u32,
        reason: DownReason,
    },
    /// An isolate (path, endpoint id) that is not restarted stopped: stop what lives
    /// below it.
    StopDescendants(String, u32),
    /// Node shutdown: the whole tree, deepest first.
    StopAll,
}

/// The supervisor of `path`: its parent path, `/` for top-level isolates.
pub(crate) fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Whether `path` lies strictly below `ancestor`.
pub(crate) fn is_below(path: &str, ancestor: &str) -> bool {
    path.len() > ancestor.len()
        && path.starts_with(ancestor)
        && path.as_bytes()[ancestor.len()] == b'/'
}

fn depth(path: &str) -> usize {
    path.bytes().filter(|&b| b == b'/').count()
}

impl Registry {
    /// Drops the record of the supervised isolate at `path`. Its entry (a user closure,
    /// whose `Drop` may touch the cluster) is dropped later, outside the registry lock
    /// (see [`ClusterInner::unlock`]).
    pub(crate) fn forget_child(&mut self, path: &str) {
        if let Some(rec) = self.children.remove(path) {
            self.released.push(rec);
        }
    }

    /// Delivers a supervision notice to the supervisor at `sup` (the node's go to
    /// watchers).
    pub(crate) fn notify(&self, sup: &str, notice: Notice) {
        if sup == "/" {
            for w in &self.watchers {
                let _ = w
                    .endpoint()
                    .enqueue(Control::Supervision(notice.clone(), true));
            }
        } else if let Some(s) = self.by_path.get(sup) {
            let _ = s.endpoint().enqueue(Control::Supervision(notice, false));
        }
    }

    /// Live isolates strictly below `path` that belong to its incarnation `going` (which is
    /// going away); their supervision records are dropped. If a newer incarnation of
    /// `path` already runs, what it spawned (ids are never reused and only grow, so
    /// anything spawned after it has a larger id) is left alone.
    fn take_descendants(&mut self, path: &str, going: u32) -> Vec<IsolateRef> {
        let newer = match self.by_path.get(path) {
            Some(r) if r.id() > going => r.id(),
            _ => u32::MAX,
        };
        let gone: Vec<String> = self
            .children
            .iter()
            .filter(|(p, rec)| is_below(p, path) && rec.current.id() <= newer)
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.forget_child(&p);
        }
        self.by_path
            .iter()
            .filter(|(p, r)| is_below(p, path) && r.id() < newer)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl ClusterInner {
    /// Releases the registry lock, then drops the supervision records forgotten under it.
    pub(crate) fn unlock(&self, mut reg: std::sync::MutexGuard<'_, Registry>) {
        let released = std::mem::take(&mut reg.released);
        drop(reg);
        drop(released);
    }

    /// Queues work for the supervision thread, starting it if needed.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        lock(&self.registry).pending_jobs += 1;
        self.enqueue_job(job);
    }

    /// `submit` for a caller that counted the job in `pending_jobs` already (under the
    /// same lock as the change that caused it, so `join` never sees a gap).
    pub(crate) fn enqueue_job(self: &Arc<Self>, job: Job) {
        let mut g = lock(&self.jobs);
        if let Some(tx) = &*g {
            match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => {
                    *g = None;
                    return self.start_supervisor(&mut g, job);
                }
            }
        }
        self.start_supervisor(&mut g, job);
    }

    fn start_supervisor(self: &Arc<Self>, slot: &mut Option<mpsc::Sender<Job>>, job: Job) {
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(self);
        let cores = self.cluster_cores();
        let started = std::thread::Builder::new()
            .name("isolate-cluster-supervisor".into())
            .spawn(move || {
                crate::cluster::unpin_to(&cores);
                supervise(weak, rx)
            });
        if started.is_err() {
            // No thread: do the one thing that must not be lost, inline and unordered.
            let mut reg = lock(&self.registry);
            if let Job::StopAll = job {
                for r in reg.by_id.values() {
                    let _ = r.endpoint().enqueue(Control::Shutdown);
                }
            }
            reg.pending_jobs -= 1;
            self.all_down.notify_all();
            return;
        }
        let _ = tx.send(job);
        *slot = Some(tx);
    }

    /// Asks `targets` to shut down, deepest paths first, waiting (a bounded time) for each
    /// level to stop before asking the next.
    fn stop_in_order(&self, mut targets: Vec<IsolateRef>) {
        targets.sort_by_key(|r| std::cmp::Reverse(depth(r.path())));
        targets.dedup_by_key(|r| r.id());
        let patience = self.config.drop_timeout;
        let mut rest = &targets[..];
        while let Some(first) = rest.first() {
            let d = depth(first.path());
            let n = rest.iter().take_while(|r| depth(r.path()) == d).count();
            let (level, next) = rest.split_at(n);
            for r in level {
                let _ = r.endpoint().enqueue(Control::Shutdown);
            }
            let deadline = Instant::now() + patience;
            for r in level {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = r.wait_down(left);
            }
            rest = next;
        }
    }

    fn handle(self: &Arc<Self>, job: Job) {
        match job {
            Job::ChildDown { path, id, reason } => self.child_down(&path, id, &reason),
            Job::StopDescendants(path, id) => {
                let below = lock(&self.registry).take_descendants(&path, id);
                self.stop_in_order(below);
            }
            Job::StopAll => {
                let all: Vec<IsolateRef> = lock(&self.registry).by_path.values().cloned().collect();
                self.stop_in_order(all);
            }
        }
    }

    /// A supervised isolate stopped on its own: restart it (and siblings, per strategy),
    /// or let it go, or give up.
    fn child_down(self: &Arc<Self>, path: &str, id: u32, reason: &DownReason) {
        let mut reg = lock(&self.registry);
        let (order, restart, old) = match reg.children.get(path) {
            Some(rec) if rec.current.id() == id => (rec.order, rec.restart, rec.current.clone()),
            // A stale report: the record was replaced or dropped meanwhile.
            _ => return,
        };
        let failure = reason.is_failure();
        let sup = parent_of(path).to_owned();
        if failure {
            reg.notify(&sup, Notice::Failed(old, reason.clone()));
        }
        let wanted = match restart {
            Restart::Permanent => true,
            Restart::Transient => failure,
            Restart::Temporary => false,
        };
        let sup_alive = sup == "/" || reg.by_path.contains_key(&sup);
        if !wanted || !sup_alive || reg.shutting_down {
            reg.forget_child(path);
            let below = reg.take_descendants(path, id);
            self.unlock(reg);
            self.stop_in_order(below);
            return;
        }
        let policy = reg
            .supervision
            .get(&sup)
            .copied()
            .unwrap_or(self.config.supervision);
        let now = Instant::now();
        let log = reg.restarts.entry(sup.clone()).or_default();
        while log
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.within)
        {
            log.pop_front();
        }
        if log.len() >= policy.max_restarts as usize {
            let msg = format!(
                "supervisor {sup} gave up: {} restarts within {:?} exceeded when {path} stopped ({reason})",
                policy.max_restarts, policy.within
            );
            log.clear();
            reg.forget_child(path);
            self.unlock(reg);
            self.give_up(&sup, msg);
            return;
        }
        log.push_back(now);
        let mut set: Vec<(u64, String)> = match policy.strategy {
            Strategy::OneForOne => vec![(order, path.to_owned())],
            Strategy::OneForAll | Strategy::RestForOne => reg
                .children
                .iter()
                .filter(|(p, rec)| {
                    parent_of(p) == sup
                        && (policy.strategy == Strategy::OneForAll || rec.order >= order)
                })
                .map(|(p, rec)| (rec.order, p.clone()))
                .collect(),
        };
        set.sort();
        let mut stop = Vec::new();
        for (_, p) in &set {
            let going = if p == path {
                id
            } else {
                reg.children.get(p).map_or(0, |rec| rec.current.id())
            };
            stop.extend(reg.take_descendants(p, going));
            if p != path {
                if let Some(rec) = reg.children.get_mut(p) {
                    rec.stopping = true;
                    if rec.current.is_alive() {
                        stop.push(rec.current.clone());
                    }
                }
            }
        }
        // Temporary siblings are stopped with the others but, as in OTP, not restarted.
        set.retain(|(_, p)| {
            let temporary = p != path
                && reg
                    .children
                    .get(p)
                    .is_some_and(|rec| rec.restart == Restart::Temporary);
            if temporary {
                reg.forget_child(p);
            }
            !temporary
        });
        self.unlock(reg);
        self.stop_in_order(stop);
        for (_, p) in set {
            self.respawn(&p);
        }
    }

    /// Starts a new incarnation of the supervised isolate at `path`.
    fn respawn(self: &Arc<Self>, path: &str) {
        let mut reg = lock(&self.registry);
        let Some(rec) = reg.children.get(path) else {
            return;
        };
        if reg.shutting_down {
            reg.forget_child(path);
            return;
        }
        if reg.by_path.contains_key(path) {
            // The old incarnation did not stop in time: it keeps running as the child.
            if let Some(rec) = reg.children.get_mut(path) {
                rec.stopping = false;
            }
            return;
        }
        let entry = Arc::clone(&rec.entry);
        let props = rec.props.clone();
        match self.spawn_locked(&mut reg, path, props, move |ctx: &Context| entry(ctx)) {
            Ok(new) => {
                if let Some(rec) = reg.children.get_mut(path) {
                    rec.current = new.clone();
                    rec.stopping = false;
                }
                reg.notify(parent_of(path), Notice::Restarted(new));
            }
            Err(e) => {
                reg.forget_child(path);
                let msg = format!("could not restart {path}: {e}");
                self.unlock(reg);
                self.give_up(parent_of(path), msg);
            }
        }
    }

    /// The supervisor at `sup` exceeded its restart intensity: stop its subtree and
    /// escalate (the node shuts down).
    fn give_up(self: &Arc<Self>, sup: &str, msg: String) {
        let mut reg = lock(&self.registry);
        reg.notify(sup, Notice::GaveUp(msg.clone()));
        if sup == "/" {
            reg.failure.get_or_insert(msg);
            self.unlock(reg);
            self.begin_shutdown();
            let all: Vec<IsolateRef> = lock(&self.registry).by_path.values().cloned().collect();
            self.stop_in_order(all);
            return;
        }
        let Some(s) = reg.by_path.get(sup).cloned() else {
            return;
        };
        reg.escalations.insert(s.id(), msg);
        let mut stop = reg.take_descendants(sup, s.id());
        stop.push(s);
        self.unlock(reg);
        self.stop_in_order(stop);
    }
}

/// The supervision thread: runs jobs one at a time until the node is gone.
fn supervise(node: Weak<ClusterInner>, jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let Some(inner) = node.upgrade() else {
            return;
        };
        inner.handle(job);
        lock(&inner.registry).pending_jobs -= 1;
        inner.all_down.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_and_descendants() {
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a/b/c"), "/a/b");
        assert!(is_below("/a/b", "/a"));
        assert!(is_below("/a/b/c", "/a"));
        assert!(!is_below("/ab", "/a"));
        assert!(!is_below("/a", "/a"));
        assert_eq!(depth("/a/b/c"), 3);
    }
}
