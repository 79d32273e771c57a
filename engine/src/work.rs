//! Short-lived and pooled work: `run`/`compute` (Dart's `Isolate.run` and Flutter's
//! `compute`), a [`WorkerPool`] of long-lived isolates, and the robust [`Worker`].

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::ClusterInner;
use crate::error::{CallError, ExitError, RunError, SpawnError};
use crate::inbox::{Context, Inbox};
use crate::isolate::{DownReason, IsolateRef};
use crate::message::{Event, Message};
use crate::path::Properties;
use crate::Payload;

/// Runs `f` on a new, short-lived isolate and returns its result, moved (never copied)
/// out of the isolate with `exit`. A panic in `f` comes back as [`RunError::Panicked`].
pub(crate) fn run<T, F>(cluster: &Arc<ClusterInner>, f: F) -> Result<Box<T>, RunError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = format!("/$run/{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let isolate = ClusterInner::spawn(cluster, &path, Properties::new(), move |ctx| {
        ctx.exit(Box::new(f()))
    })
    .map_err(RunError::Spawn)?;
    loop {
        match isolate.join_exit::<T>(Duration::from_secs(3600)) {
            Ok(value) => return Ok(value),
            Err(ExitError::Timeout) => continue,
            Err(ExitError::NoValue(DownReason::Panicked(m))) => return Err(RunError::Panicked(m)),
            Err(e) => return Err(RunError::Panicked(format!("no result: {e}"))),
        }
    }
}

/// A job for a pool worker: runs the closure, boxes its result.
type Job = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;

/// Long-lived isolates that run closures, so repeated work does not pay a thread spawn
/// per job. Jobs and results move by transfer (no copy); jobs go round-robin; a job that
/// panics fails with [`CallError::Remote`] and the worker carries on.
///
/// Dropping the pool asks its isolates to stop: jobs already sent still run (their
/// results are dropped if nobody waits for them), then the isolates end.
pub struct WorkerPool {
    workers: Vec<IsolateRef>,
    next: AtomicUsize,
}

impl WorkerPool {
    pub(crate) fn spawn(
        cluster: &Arc<ClusterInner>,
        path: &str,
        size: usize,
    ) -> Result<Self, SpawnError> {
        let mut pool = Self {
            workers: Vec::with_capacity(size.max(1)),
            next: AtomicUsize::new(0),
        };
        for i in 0..size.max(1) {
            // On an error the pool is dropped, which stops the workers already started.
            let w = ClusterInner::spawn(
                cluster,
                &format!("{path}/{i}"),
                Properties::new(),
                pool_worker,
            )?;
            pool.workers.push(w);
        }
        Ok(pool)
    }

    /// The pool's isolates.
    pub fn workers(&self) -> &[IsolateRef] {
        &self.workers
    }

    /// Runs `f` on the next worker and waits (through `inbox`, the caller's receive side)
    /// up to `timeout` for its result.
    pub fn run<T, F>(&self, inbox: &Inbox, f: F, timeout: Duration) -> Result<Box<T>, CallError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let job: Job = Box::new(move || Box::new(f()) as Box<dyn Any + Send>);
        let (id, deadline) =
            inbox.request_transfer_within(&self.workers[k], Box::new(job), timeout)?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut reply = inbox.wait_reply(id, left)?;
        let any = reply
            .take::<Box<dyn Any + Send>>()
            .map_err(CallError::Access)?;
        any.downcast::<T>()
            .map_err(|_| CallError::Access(crate::AccessError::AlreadyTaken))
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for w in &self.workers {
            ask_to_stop(w);
        }
    }
}

/// Asks a local isolate to stop, as node shutdown does: it gets
/// [`Event::ShutdownRequested`], reads what was sent to it before, then ends. Never
/// waits (the request goes through its control queue, not a ring).
fn ask_to_stop(isolate: &IsolateRef) {
    let _ = isolate
        .endpoint()
        .enqueue(crate::endpoint::Control::Shutdown);
}

fn pool_worker(ctx: &Context) {
    while let Some(ev) = ctx.recv() {
        let Event::Message(mut m) = ev else { continue };
        let job = match m.take::<Job>() {
            Ok(job) => job,
            Err(e) => {
                let _ = m.reply_error(&format!("not a pool job: {e}"));
                continue;
            }
        };
        match catch_unwind(AssertUnwindSafe(|| (*job)())) {
            Ok(result) => {
                let _ = m.reply_transfer(Box::new(result));
            }
            Err(p) => {
                let _ = m.reply_error(&format!(
                    "job panicked: {}",
                    crate::cluster::panic_message(&*p)
                ));
            }
        }
    }
}

/// The end-of-work marker a [`Worker`] sends on `close`.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct CloseWorker;

/// A long-lived worker isolate answering requests of type `Req` with `Resp` (the robust
/// worker of Dart's isolate documentation): many requests may be outstanding, each with
/// its id; [`close`](Self::close) lets every request already sent finish and makes later
/// ones fail with [`CallError::Closed`]; a handler error or panic fails only its request.
///
/// A `Worker` may be shared between threads (each calls through its own inbox). A
/// request that races `close` on another thread is either answered or fails with
/// `Closed`. Dropping the worker closes it.
pub struct Worker<Req, Resp> {
    isolate: IsolateRef,
    closed: Arc<AtomicBool>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Payload + rkyv::Archive, Resp: Payload> Worker<Req, Resp>
where
    Req::Archived: rkyv::Portable,
{
    pub(crate) fn spawn<H>(
        cluster: &Arc<ClusterInner>,
        path: &str,
        mut handler: H,
    ) -> Result<Self, SpawnError>
    where
        H: FnMut(&Req::Archived) -> Result<Resp, String> + Send + 'static,
    {
        let isolate = ClusterInner::spawn(cluster, path, Properties::new(), move |ctx| {
            while let Some(ev) = ctx.recv() {
                let Event::Message(m) = ev else { continue };
                if m.get::<CloseWorker>().is_ok() {
                    // Everything sent before `close` is still delivered, then we stop.
                    ctx.shutdown_isolate();
                    continue;
                }
                answer::<Req, Resp, H>(&m, &mut handler);
            }
        })?;
        Ok(Self {
            isolate,
            closed: Arc::new(AtomicBool::new(false)),
            _types: PhantomData,
        })
    }

    /// The worker's isolate.
    pub fn isolate(&self) -> &IsolateRef {
        &self.isolate
    }

    /// Sends a request without waiting (collect it with `inbox.wait_reply`).
    pub fn request(&self, inbox: &Inbox, request: &Req) -> Result<crate::RequestId, CallError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(CallError::Closed);
        }
        inbox
            .request(&self.isolate, request)
            .map_err(|e| self.after_close(e.into()))
    }

    /// Sends a request and waits up to `timeout` for the reply (the whole call, including
    /// a wait for room in a full ring, is bounded by `timeout`).
    pub fn call<'a>(
        &self,
        inbox: &'a Inbox,
        request: &Req,
        timeout: Duration,
    ) -> Result<Message<'a>, CallError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(CallError::Closed);
        }
        inbox
            .call(&self.isolate, request, timeout)
            .map_err(|e| self.after_close(e))
    }

    /// A request that failed because the worker stopped after `close` (called on another
    /// thread while it was being sent) failed because of the close.
    fn after_close(&self, e: CallError) -> CallError {
        let stopped = matches!(
            e,
            CallError::Send(crate::SendError::Disconnected(())) | CallError::TargetDown(_)
        );
        if stopped && self.closed.load(Ordering::Acquire) {
            CallError::Closed
        } else {
            e
        }
    }

    /// Stops taking requests: requests already sent are answered, later ones fail with
    /// [`CallError::Closed`], then the worker's isolate ends.
    pub fn close(&self, inbox: &Inbox) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = inbox.send(&self.isolate, &CloseWorker);
        }
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl<Req, Resp> Drop for Worker<Req, Resp> {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            ask_to_stop(&self.isolate);
        }
    }
}

fn answer<Req, Resp, H>(m: &Message<'_>, handler: &mut H)
where
    Req: rkyv::Archive + 'static,
    Req::Archived: rkyv::Portable,
    Resp: Payload,
    H: FnMut(&Req::Archived) -> Result<Resp, String>,
{
    let request = match m.get::<Req>() {
        Ok(r) => r,
        Err(e) => {
            let _ = m.reply_error(&format!("bad request: {e}"));
            return;
        }
    };
    match catch_unwind(AssertUnwindSafe(|| handler(request))) {
        Ok(Ok(resp)) => {
            let _ = m.reply(&resp);
        }
        Ok(Err(text)) => {
            let _ = m.reply_error(&text);
        }
        Err(p) => {
            let _ = m.reply_error(&format!(
                "handler panicked: {}",
                crate::cluster::panic_message(&*p)
            ));
        }
    }
}
