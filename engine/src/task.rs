//! A task scheduler that runs as an isolate (galileo_task's scheduler, in Rust): one-off
//! tasks with an optional delay, periodic tasks on absolute deadlines, named tasks that
//! take arguments and run by name from any isolate or thread, streams of a task's
//! results, cancellation from inside a task or outside, and broadcast.
//!
//! ## Model
//!
//! - A [`Scheduler`] is a list of task definitions. Nothing runs until
//!   [`start`](Scheduler::start) spawns the scheduler isolate at a path; delays and
//!   periods count from then. Tasks run one at a time on that isolate's thread, so a
//!   long task delays the others (hand heavy work to a [`WorkerPool`](crate::WorkerPool)).
//!   A task must not call its own scheduler and wait for the answer: the scheduler is
//!   busy running that task, so the call times out.
//! - Everything else goes through a [`TaskClient`], which any isolate or thread gets with
//!   [`TaskClient::connect`] (a lookup by path with a timeout, like the seed's
//!   `client.connect(timeout:)`). Its requests and the results it gets back are plain
//!   rkyv data with no pointers or local handles, validated on receipt, so they can
//!   cross to another node unchanged; only [`TaskClient::add`] (a closure) is local.
//! - A run produces a [`TaskResult`]: success flag, value, error message, and on a panic
//!   the panic's backtrace. A panicking task fails its run; the scheduler carries on.
//! - Periodic deadlines are `origin + k × period`, so runs never drift. A deadline missed
//!   because the scheduler was busy is **skipped** by default ([`Missed::Skip`]: the next
//!   run is the next deadline still ahead, and the result counts the skipped ones), or
//!   **caught up** with [`Missed::CatchUp`] (every missed deadline runs, late, at once).
//!
//! ```
//! use std::time::Duration;
//! use isolate_cluster::task::{Scheduler, TaskSpec};
//! use isolate_cluster::{rkyv, Cluster};
//!
//! let cluster = Cluster::single_node();
//! let mut scheduler = Scheduler::new();
//! scheduler
//!     .add(TaskSpec::on_demand("double").run_with::<u64, _, _>(|_t, n: &rkyv::Archived<u64>| {
//!         Ok::<u64, String>(n.to_native() * 2)
//!     }))
//!     .unwrap();
//! let client = scheduler.start(&cluster, "/scheduler").unwrap();
//!
//! let mailbox = cluster.mailbox().unwrap();
//! let result = client.run(&mailbox, "double", &21u64, Duration::from_secs(5)).unwrap();
//! assert!(result.successful);
//! assert_eq!(*result.value::<u64>().unwrap(), 42);
//! cluster.shutdown();
//! cluster.join(Duration::from_secs(5)).unwrap();
//! ```

use std::any::type_name;
use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Once;
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;
use rkyv::{Archive, Portable, Serialize};

use crate::cluster::{panic_message, ClusterInner};
use crate::endpoint::{Mode, Route, Target};
use crate::error::{CallError, PathError, SendError, SpawnError};
use crate::frame::type_tag;
use crate::inbox::{Context, ExitSignal, Inbox};
use crate::isolate::IsolateRef;
use crate::message::{Event, Message, Replier};
use crate::path::Properties;
use crate::{Cluster, Payload};

/// A value that can be a task's arguments or result, here or on another node: any rkyv
/// type whose archive can be validated (derive `rkyv::Archive, rkyv::Serialize`; std
/// types such as integers, `String` and `Vec` work as they are).
pub trait Wire:
    Payload
    + Archive<
        Archived: Portable
                      + for<'b> rkyv::bytecheck::CheckBytes<
            rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
        >,
    >
{
}

impl<T> Wire for T where
    T: Payload
        + Archive<
            Archived: Portable
                          + for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            >,
        >
{
}

/// Bytes in 16-aligned memory, as rkyv archives must be read.
type Aligned = AlignedVec<16>;

fn aligned(bytes: &[u8]) -> Aligned {
    let mut v = Aligned::with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

/// Reads `bytes` (from anywhere: they are validated) as the archive of an `A`.
fn access<A: Wire>(bytes: &Aligned) -> Result<&A::Archived, String> {
    rkyv::access::<A::Archived, rkyv::rancor::Error>(bytes).map_err(|e| e.to_string())
}

fn encode<T: Payload>(value: &T) -> Result<Vec<u8>, TaskError> {
    crate::frame::encode(value).map_err(|e| TaskError::Serialize(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// Errors, handles, results
// ---------------------------------------------------------------------------------------

/// Why a scheduler operation failed. A task that fails is not an error: it is a
/// [`TaskResult`] with `successful == false`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// No task has this name (or id).
    UnknownTask(String),
    /// The arguments are of another type than the task takes.
    WrongArguments {
        /// The task.
        task: String,
        /// The type it takes.
        expected: String,
        /// The type given.
        found: String,
    },
    /// The argument bytes are not a valid archive of the type they claim to be.
    InvalidArguments(String),
    /// A task with this name already exists.
    DuplicateName(String),
    /// A task that only runs on demand needs a name to be asked by.
    Unnamed,
    /// A periodic task needs a period above zero.
    ZeroPeriod,
    /// The scheduler has stopped (or never started at that path).
    Stopped,
    /// No answer before the timeout.
    Timeout,
    /// `connect` found no scheduler at this path before its timeout.
    NotFound(String),
    /// The scheduler path is not a valid path.
    Path(PathError),
    /// A value could not be serialised.
    Serialize(String),
    /// The result carries no value (the task returned `()` or failed).
    NoValue,
    /// The result's value is of another type.
    ValueType {
        /// The type asked for.
        expected: String,
        /// The type of the value.
        found: String,
    },
    /// The result's value bytes are not a valid archive of their type.
    InvalidValue(String),
    /// The isolate at the path answered something a scheduler never sends.
    Protocol(String),
    /// The request failed in the engine.
    Call(CallError),
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownTask(t) => write!(f, "no task named {t:?}"),
            Self::WrongArguments {
                task,
                expected,
                found,
            } => write!(f, "task {task:?} takes {expected}, not {found}"),
            Self::InvalidArguments(e) => write!(f, "invalid task arguments: {e}"),
            Self::DuplicateName(n) => write!(f, "a task named {n:?} already exists"),
            Self::Unnamed => f.write_str("a task run only on demand needs a name"),
            Self::ZeroPeriod => f.write_str("a periodic task needs a period above zero"),
            Self::Stopped => f.write_str("the scheduler has stopped"),
            Self::Timeout => f.write_str("no answer from the scheduler before the timeout"),
            Self::NotFound(p) => write!(f, "no scheduler at {p}"),
            Self::Path(e) => write!(f, "bad scheduler path: {e}"),
            Self::Serialize(e) => write!(f, "could not serialise: {e}"),
            Self::NoValue => f.write_str("the result carries no value"),
            Self::ValueType { expected, found } => {
                write!(f, "the result is a {found}, not a {expected}")
            }
            Self::InvalidValue(e) => write!(f, "invalid result value: {e}"),
            Self::Protocol(e) => write!(f, "not a scheduler: {e}"),
            Self::Call(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TaskError {}

impl From<CallError> for TaskError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Timeout => Self::Timeout,
            CallError::TargetDown(_) | CallError::Send(SendError::Disconnected(())) => {
                Self::Stopped
            }
            other => Self::Call(other),
        }
    }
}

/// A scheduled task: its id (unique per scheduler) and name. Cancel it with
/// [`TaskClient::cancel`], or from inside with [`TaskContext::cancel`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Task {
    /// The id.
    pub id: u64,
    /// The name, if it has one.
    pub name: Option<String>,
}

/// Names a task in a request: by id or by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskKey {
    /// By id.
    Id(u64),
    /// By name.
    Name(String),
}

impl From<&Task> for TaskKey {
    fn from(t: &Task) -> Self {
        Self::Id(t.id)
    }
}

impl From<&str> for TaskKey {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<String> for TaskKey {
    fn from(name: String) -> Self {
        Self::Name(name)
    }
}

impl From<u64> for TaskKey {
    fn from(id: u64) -> Self {
        Self::Id(id)
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "#{id}"),
            Self::Name(n) => f.write_str(n),
        }
    }
}

/// What to do with a periodic deadline the scheduler missed (it was busy past it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Missed {
    /// Skip it: the next run is at the next deadline still ahead; the result's
    /// [`missed`](TaskResult::missed) counts the skipped deadlines.
    #[default]
    Skip,
    /// Run once for every missed deadline, late, one after another.
    CatchUp,
}

/// The outcome of one run of a task.
#[derive(Clone, Debug)]
pub struct TaskResult {
    /// The task's id.
    pub task: u64,
    /// The task's name, if it has one.
    pub name: Option<String>,
    /// Which run this was (1 for the first).
    pub run: u64,
    /// Whether the task returned normally with `Ok` (or `()`).
    pub successful: bool,
    /// The error it returned, or its panic message.
    pub error: Option<String>,
    /// Where it panicked, with the backtrace, if it panicked.
    pub backtrace: Option<String>,
    /// How long after its deadline the run started (zero for runs on demand).
    pub lateness: Duration,
    /// Periodic deadlines skipped just before this run ([`Missed::Skip`]).
    pub missed: u64,
    value: Option<(String, Aligned)>,
}

impl TaskResult {
    /// The value the task returned, read in place after validation. An error if there is
    /// none or it is of another type.
    pub fn value<T: Wire>(&self) -> Result<&T::Archived, TaskError> {
        let (ty, bytes) = self.value.as_ref().ok_or(TaskError::NoValue)?;
        if ty != type_name::<T>() {
            return Err(TaskError::ValueType {
                expected: type_name::<T>().to_owned(),
                found: ty.clone(),
            });
        }
        access::<T>(bytes).map_err(TaskError::InvalidValue)
    }

    /// The type name of the value, if there is one.
    pub fn value_type(&self) -> Option<&str> {
        self.value.as_ref().map(|(t, _)| t.as_str())
    }

    /// The result a message carries, if it is a published result (what subscribers to a
    /// task's results receive). `None` for any other message; an error for a result that
    /// fails validation.
    pub fn from_message(msg: &Message<'_>) -> Option<Result<Self, TaskError>> {
        if msg.tag() != type_tag::<ResultWire>() {
            return None;
        }
        Some(
            msg.get_checked::<ResultWire>()
                .map(Self::from_wire)
                .map_err(|e| TaskError::Protocol(e.to_string())),
        )
    }

    fn from_wire(w: &ArchivedResultWire) -> Self {
        let opt = |s: &rkyv::string::ArchivedString| (!s.is_empty()).then(|| s.as_str().to_owned());
        Self {
            task: w.task.to_native(),
            name: opt(&w.name),
            run: w.run.to_native(),
            successful: w.successful,
            error: opt(&w.error),
            backtrace: opt(&w.backtrace),
            lateness: Duration::from_nanos(w.lateness_ns.to_native()),
            missed: w.missed.to_native(),
            value: (!w.value_type.is_empty())
                .then(|| (w.value_type.as_str().to_owned(), aligned(&w.value))),
        }
    }
}

/// A task as [`TaskClient::tasks`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// The id.
    pub id: u64,
    /// The name, if any.
    pub name: Option<String>,
    /// The type of its arguments (`()` for none).
    pub args_type: String,
    /// `once`, `every` or `on demand`.
    pub kind: String,
    /// Runs so far.
    pub runs: u64,
    /// Time to its next scheduled run, if it has one.
    pub next_in: Option<Duration>,
    /// Isolates subscribed to its results.
    pub subscribers: usize,
}

/// Counters of a running scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerStatus {
    /// Tasks defined.
    pub tasks: u64,
    /// Runs so far, all tasks.
    pub runs: u64,
    /// Runs that failed (error or panic).
    pub failed: u64,
    /// Fire-and-forget runs ([`TaskClient::dispatch`]) refused: unknown task or wrong
    /// arguments (a caller that waits gets the error instead).
    pub rejected: u64,
}

// ---------------------------------------------------------------------------------------
// Task definitions
// ---------------------------------------------------------------------------------------

/// What a task returns: `()`, or `Result<T, E>` where `T` travels as the result's value
/// and `E`'s text as its error.
pub trait TaskOutcome {
    #[doc(hidden)]
    fn into_outcome(self) -> Outcome;
}

/// A run's outcome, type-erased. Not built by users.
#[doc(hidden)]
pub struct Outcome {
    value: Option<(&'static str, Vec<u8>)>,
    error: Option<String>,
}

impl TaskOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome {
            value: None,
            error: None,
        }
    }
}

impl<T: Wire, E: fmt::Display> TaskOutcome for Result<T, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(v) => match crate::frame::encode(&v) {
                Ok(bytes) => Outcome {
                    value: Some((type_name::<T>(), bytes)),
                    error: None,
                },
                Err(e) => Outcome {
                    value: None,
                    error: Some(format!("the result could not be serialised: {e}")),
                },
            },
            Err(e) => Outcome {
                value: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// A task's body, type-erased: gets the argument bytes (16-aligned, not yet validated);
/// `Err` when they are not a valid archive of its argument type.
type Body = Box<dyn FnMut(&mut TaskContext<'_>, &Aligned) -> Result<Outcome, String> + Send>;

#[derive(Clone, Copy, Debug)]
enum Schedule {
    OnDemand,
    Once(Duration),
    Every { first: Duration, period: Duration },
}

/// Describes a task before it is added: when it runs, its name, default arguments and
/// what to do with missed deadlines. Finish with [`run`](Self::run) or
/// [`run_with`](Self::run_with).
#[must_use]
pub struct TaskBuilder {
    name: Option<String>,
    schedule: Schedule,
    missed: Missed,
    args: Option<Result<(&'static str, Vec<u8>), TaskError>>,
}

/// A complete task definition: add it with [`Scheduler::add`] before the start, or
/// [`TaskClient::add`] after.
pub struct TaskSpec {
    name: Option<String>,
    schedule: Schedule,
    missed: Missed,
    args: Option<Result<(&'static str, Vec<u8>), TaskError>>,
    args_type: &'static str,
    body: Body,
}

impl fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSpec")
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("missed", &self.missed)
            .field("args_type", &self.args_type)
            .finish_non_exhaustive()
    }
}

impl TaskSpec {
    /// A task that runs once, `delay` after the start (or after it is added, if the
    /// scheduler runs already). With a name it stays runnable by name afterwards.
    pub fn once(delay: Duration) -> TaskBuilder {
        TaskBuilder::new(Schedule::Once(delay))
    }

    /// A task that runs every `period`, first one period after the start (see
    /// [`TaskBuilder::first_after`]), on absolute deadlines.
    pub fn every(period: Duration) -> TaskBuilder {
        TaskBuilder::new(Schedule::Every {
            first: period,
            period,
        })
    }

    /// A task that runs only when asked by name ([`TaskClient::run`]).
    pub fn on_demand(name: impl Into<String>) -> TaskBuilder {
        TaskBuilder::new(Schedule::OnDemand).name(name)
    }
}

impl TaskBuilder {
    fn new(schedule: Schedule) -> Self {
        Self {
            name: None,
            schedule,
            missed: Missed::Skip,
            args: None,
        }
    }

    /// Names the task: it can then be run, cancelled and subscribed to by name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// For a periodic task: when the first run is, after the start (default: one
    /// period). Later deadlines follow from it.
    pub fn first_after(mut self, delay: Duration) -> Self {
        if let Schedule::Every { period, .. } = self.schedule {
            self.schedule = Schedule::Every {
                first: delay,
                period,
            };
        }
        self
    }

    /// What to do with missed periodic deadlines (default [`Missed::Skip`]).
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// The arguments of the task's scheduled runs (runs on demand bring their own). Their
    /// type must be the one [`run_with`](Self::run_with) takes.
    pub fn args<A: Wire>(mut self, args: &A) -> Self {
        self.args = Some(encode(args).map(|b| (type_name::<A>(), b)));
        self
    }

    /// Finishes with a body that takes no arguments.
    pub fn run<F, O>(self, mut f: F) -> TaskSpec
    where
        F: FnMut(&mut TaskContext<'_>) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.finish(
            type_name::<()>(),
            Box::new(move |t, _args| Ok(f(t).into_outcome())),
        )
    }

    /// Finishes with a body that takes arguments of type `A`, read in place (validated
    /// first: they may come from another node).
    pub fn run_with<A, F, O>(self, mut f: F) -> TaskSpec
    where
        A: Wire,
        F: FnMut(&mut TaskContext<'_>, &A::Archived) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.finish(
            type_name::<A>(),
            Box::new(move |t, args| {
                let a = access::<A>(args)?;
                Ok(f(t, a).into_outcome())
            }),
        )
    }

    fn finish(self, args_type: &'static str, body: Body) -> TaskSpec {
        TaskSpec {
            name: self.name,
            schedule: self.schedule,
            missed: self.missed,
            args: self.args,
            args_type,
            body,
        }
    }
}

/// What a running task sees: which run this is, its deadline, a way to cancel itself,
/// and the scheduler isolate's [`Context`] (to send messages).
pub struct TaskContext<'a> {
    ctx: &'a Context,
    id: u64,
    name: Option<&'a str>,
    run: u64,
    scheduled: Instant,
    started: Instant,
    missed: u64,
    cancel: bool,
}

impl TaskContext<'_> {
    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The task's name, if any.
    pub fn name(&self) -> Option<&str> {
        self.name
    }

    /// Which run this is (1 for the first).
    pub fn run(&self) -> u64 {
        self.run
    }

    /// The deadline of this run (for runs on demand: when the scheduler took the request
    /// up).
    pub fn scheduled_for(&self) -> Instant {
        self.scheduled
    }

    /// Periodic deadlines skipped just before this run ([`Missed::Skip`]).
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// How late this run started.
    pub fn lateness(&self) -> Duration {
        self.started.saturating_duration_since(self.scheduled)
    }

    /// Cancels the task: this run finishes (its result is published), no other follows,
    /// and the task is removed.
    pub fn cancel(&mut self) {
        self.cancel = true;
    }

    /// The scheduler isolate's context: send messages, look isolates up.
    pub fn context(&self) -> &Context {
        self.ctx
    }
}

// ---------------------------------------------------------------------------------------
// The scheduler before its start
// ---------------------------------------------------------------------------------------

/// Task definitions, waiting for [`start`](Self::start). See the [module docs](self).
pub struct Scheduler {
    specs: Vec<(u64, TaskSpec)>,
    names: HashSet<String>,
    next_id: u64,
    precision: Duration,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("tasks", &self.specs.len())
            .field("precision", &self.precision)
            .finish()
    }
}

impl Scheduler {
    /// No tasks yet.
    pub fn new() -> Self {
        Self {
            specs: Vec::new(),
            names: HashSet::new(),
            next_id: 1,
            precision: Duration::ZERO,
        }
    }

    /// How early the scheduler stops sleeping before a deadline and spins up to it
    /// instead (default zero: it sleeps until the deadline, and the OS's wake-up latency
    /// is the run's lateness). Spinning costs CPU for that long before every run.
    pub fn precision(mut self, spin: Duration) -> Self {
        self.precision = spin;
        self
    }

    /// Adds a task; it is checked now (name, period, arguments).
    pub fn add(&mut self, spec: TaskSpec) -> Result<Task, TaskError> {
        validate(&spec)?;
        if let Some(n) = &spec.name {
            if !self.names.insert(n.clone()) {
                return Err(TaskError::DuplicateName(n.clone()));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let task = Task {
            id,
            name: spec.name.clone(),
        };
        self.specs.push((id, spec));
        Ok(task)
    }

    /// A one-off task, `delay` after the start.
    pub fn once<F, O>(&mut self, delay: Duration, f: F) -> Result<Task, TaskError>
    where
        F: FnMut(&mut TaskContext<'_>) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.add(TaskSpec::once(delay).run(f))
    }

    /// A periodic task.
    pub fn every<F, O>(&mut self, period: Duration, f: F) -> Result<Task, TaskError>
    where
        F: FnMut(&mut TaskContext<'_>) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.add(TaskSpec::every(period).run(f))
    }

    /// A task every `n` seconds.
    pub fn seconds<F, O>(&mut self, n: u64, f: F) -> Result<Task, TaskError>
    where
        F: FnMut(&mut TaskContext<'_>) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.every(Duration::from_secs(n), f)
    }

    /// A task every `n` minutes.
    pub fn minutes<F, O>(&mut self, n: u64, f: F) -> Result<Task, TaskError>
    where
        F: FnMut(&mut TaskContext<'_>) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.every(Duration::from_secs(n * 60), f)
    }

    /// A named task with arguments of type `A`, run only when asked by name.
    pub fn named<A, F, O>(&mut self, name: &str, f: F) -> Result<Task, TaskError>
    where
        A: Wire,
        F: FnMut(&mut TaskContext<'_>, &A::Archived) -> O + Send + 'static,
        O: TaskOutcome,
    {
        self.add(TaskSpec::on_demand(name).run_with::<A, F, O>(f))
    }

    /// Starts the scheduler: spawns its isolate at `path` and returns a client for it.
    pub fn start(self, cluster: &Cluster, path: &str) -> Result<TaskClient, SpawnError> {
        self.start_on(cluster.inner(), path)
    }

    /// Starts the scheduler from inside an isolate (see [`start`](Self::start)).
    pub fn start_in(self, ctx: &Context, path: &str) -> Result<TaskClient, SpawnError> {
        self.start_on(ctx.cluster(), path)
    }

    fn start_on(
        self,
        cluster: &std::sync::Arc<ClusterInner>,
        path: &str,
    ) -> Result<TaskClient, SpawnError> {
        let scheduler = ClusterInner::spawn(cluster, path, Properties::new(), move |ctx| {
            scheduler_main(ctx, self)
        })?;
        Ok(TaskClient { scheduler })
    }
}

/// Checks what can be checked before a task is installed.
fn validate(spec: &TaskSpec) -> Result<(), TaskError> {
    let label = || spec.name.clone().unwrap_or_else(|| "(unnamed)".to_owned());
    match spec.schedule {
        Schedule::OnDemand if spec.name.is_none() => return Err(TaskError::Unnamed),
        Schedule::Every { period, .. } if period.is_zero() => return Err(TaskError::ZeroPeriod),
        _ => {}
    }
    match &spec.args {
        Some(Err(e)) => return Err(e.clone()),
        Some(Ok((ty, _))) if *ty != spec.args_type => {
            return Err(TaskError::WrongArguments {
                task: label(),
                expected: spec.args_type.to_owned(),
                found: (*ty).to_owned(),
            })
        }
        None if !matches!(spec.schedule, Schedule::OnDemand)
            && spec.args_type != type_name::<()>() =>
        {
            // Scheduled runs of a task that takes arguments need default ones.
            return Err(TaskError::WrongArguments {
                task: label(),
                expected: spec.args_type.to_owned(),
                found: type_name::<()>().to_owned(),
            });
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Wire messages (plain data: they can cross to another node as they are)
// ---------------------------------------------------------------------------------------

#[derive(Archive, Serialize)]
enum WireKey {
    Id(u64),
    Name(String),
}

impl From<&TaskKey> for WireKey {
    fn from(k: &TaskKey) -> Self {
        match k {
            TaskKey::Id(id) => Self::Id(*id),
            TaskKey::Name(n) => Self::Name(n.clone()),
        }
    }
}

/// A client's request to the scheduler.
#[derive(Archive, Serialize)]
enum Request {
    Ping,
    Run {
        name: String,
        args_type: String,
        args: Vec<u8>,
    },
    Cancel(WireKey),
    Subscribe(WireKey),
    Unsubscribe(WireKey),
    List,
    Stop,
}

/// A published or returned result.
#[derive(Archive, Serialize)]
struct ResultWire {
    task: u64,
    name: String,
    run: u64,
    successful: bool,
    error: String,
    backtrace: String,
    lateness_ns: u64,
    missed: u64,
    value_type: String,
    value: Vec<u8>,
}

#[derive(Archive, Serialize)]
struct InfoWire {
    id: u64,
    name: String,
    args_type: String,
    kind: String,
    runs: u64,
    /// Nanoseconds to the next run; -1 for none.
    next_in_ns: i64,
    subscribers: u64,
}

/// The scheduler's answer to a request.
#[derive(Archive, Serialize)]
enum Reply {
    Pong {
        tasks: u64,
        runs: u64,
        failed: u64,
        rejected: u64,
    },
    Done(ResultWire),
    Unknown(String),
    WrongArgs {
        task: String,
        expected: String,
        found: String,
    },
    InvalidArgs(String),
    Cancelled(bool),
    Subscribed(u64),
    Unsubscribed(bool),
    Tasks(Vec<InfoWire>),
    Added(u64),
    Duplicate(String),
    Refused(String),
    Stopping,
}

/// The scheduler's messages, for the network (copy only): a client on one node can then
/// drive a scheduler on another.
pub(crate) fn wire_types() -> [crate::wire::WireEntry; 4] {
    use crate::wire::wire_entry;
    [
        wire_entry::<Request>(),
        wire_entry::<Reply>(),
        wire_entry::<ResultWire>(),
        wire_entry::<InfoWire>(),
    ]
}

impl ArchivedReply {
    /// The error this reply stands for, if it is one.
    fn error(&self) -> Option<TaskError> {
        Some(match self {
            Self::Unknown(t) => TaskError::UnknownTask(t.as_str().to_owned()),
            Self::WrongArgs {
                task,
                expected,
                found,
            } => TaskError::WrongArguments {
                task: task.as_str().to_owned(),
                expected: expected.as_str().to_owned(),
                found: found.as_str().to_owned(),
            },
            Self::InvalidArgs(e) => TaskError::InvalidArguments(e.as_str().to_owned()),
            Self::Duplicate(n) => TaskError::DuplicateName(n.as_str().to_owned()),
            Self::Refused(e) => TaskError::Protocol(e.as_str().to_owned()),
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// A handle on a running scheduler, usable from any isolate or thread (each call takes
/// the caller's [`Inbox`], through which the answer comes). Cheap to clone.
#[derive(Clone, Debug)]
pub struct TaskClient {
    scheduler: IsolateRef,
}

impl TaskClient {
    /// Finds the scheduler at `path`, waiting up to `timeout` for it to be started, and
    /// checks that it answers (the seed's `client.connect(timeout: ...)`).
    pub fn connect(inbox: &Inbox, path: &str, timeout: Duration) -> Result<Self, TaskError> {
        // `node:/path` names a scheduler on another node.
        let local = match path.split_once(':') {
            Some((node, local)) if !path.starts_with('/') => {
                crate::path::validate_name(node).map_err(TaskError::Path)?;
                local
            }
            _ => path,
        };
        crate::path::validate_path(local).map_err(TaskError::Path)?;
        let deadline = crate::deadline_after(timeout);
        let mut nap = Duration::from_micros(100);
        loop {
            if let Ok(r) = inbox.lookup(path) {
                let client = Self { scheduler: r };
                let left = deadline.saturating_duration_since(Instant::now());
                return match client.status(inbox, left.max(Duration::from_millis(1))) {
                    Ok(_) => Ok(client),
                    Err(TaskError::Timeout | TaskError::Stopped) => {
                        Err(TaskError::NotFound(path.to_owned()))
                    }
                    Err(e) => Err(e),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TaskError::NotFound(path.to_owned()));
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(10));
        }
    }

    /// The scheduler's isolate.
    pub fn scheduler(&self) -> &IsolateRef {
        &self.scheduler
    }

    fn ask<'a>(
        &self,
        inbox: &'a Inbox,
        request: &Request,
        timeout: Duration,
    ) -> Result<Message<'a>, TaskError> {
        Ok(inbox.call(&self.scheduler, request, timeout)?)
    }

    /// Sends `request` and hands the validated reply to `f`; errors the scheduler
    /// reported become `Err`.
    fn exchange<T>(
        &self,
        inbox: &Inbox,
        request: &Request,
        timeout: Duration,
        f: impl FnOnce(&ArchivedReply) -> Option<T>,
    ) -> Result<T, TaskError> {
        let msg = self.ask(inbox, request, timeout)?;
        let reply = msg
            .get_checked::<Reply>()
            .map_err(|e| TaskError::Protocol(e.to_string()))?;
        if let Some(e) = reply.error() {
            return Err(e);
        }
        f(reply).ok_or_else(|| TaskError::Protocol("unexpected reply".into()))
    }

    /// Runs the task `name` now with `args` and waits up to `timeout` for its result. A
    /// task that fails gives `Ok` with `successful == false`; `Err` means it did not run
    /// ([`TaskError::UnknownTask`], [`TaskError::WrongArguments`], [`TaskError::Stopped`],
    /// [`TaskError::Timeout`], ...). Use `&()` for a task without arguments.
    pub fn run<A: Wire>(
        &self,
        inbox: &Inbox,
        name: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<TaskResult, TaskError> {
        let request = run_request(name, args)?;
        self.exchange(inbox, &request, timeout, |r| match r {
            ArchivedReply::Done(w) => Some(TaskResult::from_wire(w)),
            _ => None,
        })
    }

    /// Runs the task `name` without waiting for it. Its result goes only to subscribers;
    /// a refused run (unknown name, wrong arguments) is counted in
    /// [`SchedulerStatus::rejected`].
    pub fn dispatch<A: Wire>(&self, inbox: &Inbox, name: &str, args: &A) -> Result<(), TaskError> {
        let request = run_request(name, args)?;
        match inbox.send(&self.scheduler, &request) {
            Ok(()) => Ok(()),
            Err(SendError::Disconnected(())) => Err(TaskError::Stopped),
            Err(e) => Err(TaskError::Call(CallError::Send(e))),
        }
    }

    /// A request naming a task, answered by `f`.
    fn keyed<T>(
        &self,
        inbox: &Inbox,
        request: fn(WireKey) -> Request,
        task: TaskKey,
        timeout: Duration,
        f: impl FnOnce(&ArchivedReply) -> Option<T>,
    ) -> Result<T, TaskError> {
        self.exchange(inbox, &request((&task).into()), timeout, f)
    }

    /// Cancels a task; `Ok(false)` if there was none (already done or cancelled).
    pub fn cancel(
        &self,
        inbox: &Inbox,
        task: impl Into<TaskKey>,
        timeout: Duration,
    ) -> Result<bool, TaskError> {
        self.keyed(inbox, Request::Cancel, task.into(), timeout, |r| match r {
            ArchivedReply::Cancelled(found) => Some(*found),
            _ => None,
        })
    }

    /// Subscribes the caller (the endpoint behind `inbox`) to a task's results: every
    /// later run's result arrives as a message; read it with
    /// [`TaskResult::from_message`]. A full ring never loses a result: it waits in the
    /// scheduler's memory; a result too large for the ring arrives without its value,
    /// failed, with an error saying so. Returns the task's id.
    pub fn subscribe(
        &self,
        inbox: &Inbox,
        task: impl Into<TaskKey>,
        timeout: Duration,
    ) -> Result<u64, TaskError> {
        self.keyed(
            inbox,
            Request::Subscribe,
            task.into(),
            timeout,
            |r| match r {
                ArchivedReply::Subscribed(id) => Some(id.to_native()),
                _ => None,
            },
        )
    }

    /// Ends a subscription; `Ok(false)` if there was none.
    pub fn unsubscribe(
        &self,
        inbox: &Inbox,
        task: impl Into<TaskKey>,
        timeout: Duration,
    ) -> Result<bool, TaskError> {
        self.keyed(
            inbox,
            Request::Unsubscribe,
            task.into(),
            timeout,
            |r| match r {
                ArchivedReply::Unsubscribed(found) => Some(*found),
                _ => None,
            },
        )
    }

    /// Adds a task to the running scheduler (its delays count from now). The closure
    /// moves to the scheduler's isolate, so this works on the scheduler's own node only.
    pub fn add(&self, inbox: &Inbox, spec: TaskSpec, timeout: Duration) -> Result<Task, TaskError> {
        validate(&spec)?;
        let name = spec.name.clone();
        let (id, deadline) =
            inbox.request_transfer_within(&self.scheduler, Box::new(spec), timeout)?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let msg = inbox.wait_reply(id, left)?;
        let reply = msg
            .get_checked::<Reply>()
            .map_err(|e| TaskError::Protocol(e.to_string()))?;
        match reply {
            ArchivedReply::Added(id) => Ok(Task {
                id: id.to_native(),
                name,
            }),
            other => Err(other
                .error()
                .unwrap_or_else(|| TaskError::Protocol("unexpected reply".into()))),
        }
    }

    /// The tasks defined now, by id.
    pub fn tasks(&self, inbox: &Inbox, timeout: Duration) -> Result<Vec<TaskInfo>, TaskError> {
        self.exchange(inbox, &Request::List, timeout, |r| match r {
            ArchivedReply::Tasks(list) => Some(
                list.iter()
                    .map(|i| TaskInfo {
                        id: i.id.to_native(),
                        name: (!i.name.is_empty()).then(|| i.name.as_str().to_owned()),
                        args_type: i.args_type.as_str().to_owned(),
                        kind: i.kind.as_str().to_owned(),
                        runs: i.runs.to_native(),
                        next_in: u64::try_from(i.next_in_ns.to_native())
                            .ok()
                            .map(Duration::from_nanos),
                        subscribers: i.subscribers.to_native() as usize,
                    })
                    .collect(),
            ),
            _ => None,
        })
    }

    /// The scheduler's counters (and a check that it answers).
    pub fn status(&self, inbox: &Inbox, timeout: Duration) -> Result<SchedulerStatus, TaskError> {
        self.exchange(inbox, &Request::Ping, timeout, |r| match r {
            ArchivedReply::Pong {
                tasks,
                runs,
                failed,
                rejected,
            } => Some(SchedulerStatus {
                tasks: tasks.to_native(),
                runs: runs.to_native(),
                failed: failed.to_native(),
                rejected: rejected.to_native(),
            }),
            _ => None,
        })
    }

    /// Sends a copy of `value` to every live isolate whose properties match `filter`
    /// (every isolate for an empty filter), except the caller; see
    /// [`Inbox::broadcast`].
    pub fn broadcast<T: Payload>(
        &self,
        inbox: &Inbox,
        value: &T,
        filter: &Properties,
    ) -> crate::Broadcast {
        inbox.broadcast(value, |r| r.properties().matches(filter))
    }

    /// Stops the scheduler: scheduled runs not yet due never happen; requests already
    /// waiting in its inbox are still answered (a run asked for then still happens; a
    /// task added then never runs); once it has stopped, requests fail with
    /// [`TaskError::Stopped`].
    pub fn stop(&self, inbox: &Inbox, timeout: Duration) -> Result<(), TaskError> {
        self.exchange(inbox, &Request::Stop, timeout, |r| {
            matches!(r, ArchivedReply::Stopping).then_some(())
        })?;
        self.scheduler
            .wait_down(timeout)
            .map(|_| ())
            .ok_or(TaskError::Timeout)
    }
}

fn run_request<A: Wire>(name: &str, args: &A) -> Result<Request, TaskError> {
    Ok(Request::Run {
        name: name.to_owned(),
        args_type: type_name::<A>().to_owned(),
        args: encode(args)?,
    })
}

// ---------------------------------------------------------------------------------------
// The scheduler isolate
// ---------------------------------------------------------------------------------------

struct Entry {
    name: Option<String>,
    schedule: Schedule,
    missed: Missed,
    args_type: &'static str,
    default_args: Aligned,
    body: Body,
    runs: u64,
    /// The pending deadline and its heap sequence number (stale heap items differ).
    due: Option<(Instant, u64)>,
    /// Periodic: deadline k is `origin + k × period`; `k` is the next one.
    origin: Instant,
    k: u64,
    subscribers: Vec<IsolateRef>,
    /// Deadlines skipped since the last run ([`Missed::Skip`]), reported with the next.
    skipped: u64,
}

struct State<'c> {
    ctx: &'c Context,
    tasks: HashMap<u64, Entry>,
    names: HashMap<String, u64>,
    heap: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    seq: u64,
    next_id: u64,
    runs: u64,
    failed: u64,
    rejected: u64,
    /// Asked to stop: no more scheduled runs; waiting requests are still answered.
    stopping: bool,
}

fn scheduler_main(ctx: &Context, defs: Scheduler) {
    install_panic_hook();
    reduce_timer_slack();
    let precision = defs.precision;
    let mut st = State {
        ctx,
        tasks: HashMap::new(),
        names: HashMap::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        next_id: defs.next_id,
        runs: 0,
        failed: 0,
        rejected: 0,
        stopping: false,
    };
    let now = Instant::now();
    for (id, spec) in defs.specs {
        st.install(id, spec, now);
    }
    loop {
        st.run_due();
        let next = if st.stopping {
            None
        } else {
            st.next_deadline()
        };
        let ev = match next {
            Some(d) => {
                let now = Instant::now();
                let wake = d.checked_sub(precision).unwrap_or(d);
                if wake > now {
                    ctx.recv_timeout(wake - now)
                } else if d > now {
                    // Within `precision` of the deadline: poll without sleeping.
                    ctx.try_recv()
                } else {
                    continue;
                }
            }
            None => ctx.recv(),
        };
        match ev {
            Some(ev) => st.event(ev),
            None if ctx.is_finished() => break,
            None => {}
        }
    }
}

impl State<'_> {
    fn install(&mut self, id: u64, spec: TaskSpec, now: Instant) {
        let default_args = match spec.args {
            Some(Ok((_, bytes))) => aligned(&bytes),
            _ => Aligned::new(),
        };
        let mut e = Entry {
            name: spec.name,
            schedule: spec.schedule,
            missed: spec.missed,
            args_type: spec.args_type,
            default_args,
            body: spec.body,
            runs: 0,
            due: None,
            origin: now,
            k: 0,
            subscribers: Vec::new(),
            skipped: 0,
        };
        match e.schedule {
            Schedule::OnDemand => {}
            Schedule::Once(delay) => self.schedule(&mut e, id, later(now, delay)),
            Schedule::Every { first, .. } => {
                e.origin = later(now, first);
                let at = e.origin;
                self.schedule(&mut e, id, at);
            }
        }
        if let Some(n) = &e.name {
            self.names.insert(n.clone(), id);
        }
        self.tasks.insert(id, e);
    }

    fn schedule(&mut self, e: &mut Entry, id: u64, at: Instant) {
        self.seq += 1;
        e.due = Some((at, self.seq));
        self.heap.push(Reverse((at, self.seq, id)));
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, seq, id))) = self.heap.peek().copied() {
            if self.tasks.get(&id).and_then(|e| e.due) == Some((at, seq)) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Runs every task whose deadline has passed, earliest first (ties in the order they
    /// were scheduled), answering waiting requests between runs.
    fn run_due(&mut self) {
        while let Some(at) = self.next_deadline() {
            if self.stopping || at > Instant::now() {
                return;
            }
            let Some(Reverse((_, _, id))) = self.heap.pop() else {
                return;
            };
            self.run_scheduled(id, at);
            while let Some(ev) = self.ctx.try_recv() {
                self.event(ev);
            }
        }
    }

    fn event(&mut self, ev: Event<'_>) {
        match ev {
            Event::Message(m) => self.handle(m),
            // `Context::recv` has already stopped the isolate (its default handler).
            Event::ShutdownRequested => self.stopping = true,
            _ => {}
        }
    }

    fn run_scheduled(&mut self, id: u64, at: Instant) {
        let Some(mut e) = self.tasks.remove(&id) else {
            return;
        };
        e.due = None;
        let args = std::mem::take(&mut e.default_args);
        let ran = self.execute(id, &mut e, &args, at);
        e.default_args = args;
        // Default arguments were encoded from the right type when the task was added.
        let (wire, cancelled) = ran.unwrap_or_else(|bad| (failed_run(id, &e, bad), false));
        let keep = !cancelled
            && match e.schedule {
                Schedule::OnDemand => true,
                Schedule::Once(_) => e.name.is_some(),
                Schedule::Every { period, .. } => {
                    e.k += 1;
                    let mut next = deadline(e.origin, period, e.k);
                    let now = Instant::now();
                    if e.missed == Missed::Skip && next <= now {
                        // The first deadline strictly ahead of now.
                        let behind = now.duration_since(e.origin).as_nanos() / period.as_nanos();
                        let k = u64::try_from(behind).unwrap_or(u64::MAX - 1) + 1;
                        e.skipped += k - e.k;
                        e.k = k;
                        next = deadline(e.origin, period, k);
                    }
                    self.schedule(&mut e, id, next);
                    true
                }
            };
        self.publish(&mut e, &wire);
        if keep {
            self.tasks.insert(id, e);
        } else {
            self.forget(id, &e);
        }
    }

    fn forget(&mut self, _id: u64, e: &Entry) {
        if let Some(n) = &e.name {
            self.names.remove(n);
        }
    }

    /// Runs a task's body once, catching a panic. Returns the result and whether the
    /// task cancelled itself, or why the arguments were refused (then the run does not
    /// count: the body never started).
    fn execute(
        &mut self,
        id: u64,
        e: &mut Entry,
        args: &Aligned,
        scheduled: Instant,
    ) -> Result<(ResultWire, bool), String> {
        let started = Instant::now();
        let run = e.runs + 1;
        let mut t = TaskContext {
            ctx: self.ctx,
            id,
            name: e.name.as_deref(),
            run,
            scheduled,
            started,
            missed: e.skipped,
            cancel: false,
        };
        CAPTURED.with(|c| c.borrow_mut().take());
        CAPTURE.with(|c| c.set(true));
        let outcome = catch_unwind(AssertUnwindSafe(|| (e.body)(&mut t, args)));
        CAPTURE.with(|c| c.set(false));
        let cancel = t.cancel;
        let mut wire = ResultWire {
            task: id,
            name: e.name.clone().unwrap_or_default(),
            run,
            successful: false,
            error: String::new(),
            backtrace: String::new(),
            lateness_ns: u64::try_from(started.saturating_duration_since(scheduled).as_nanos())
                .unwrap_or(u64::MAX),
            missed: 0,
            value_type: String::new(),
            value: Vec::new(),
        };
        match outcome {
            Ok(Ok(o)) => {
                wire.successful = o.error.is_none();
                wire.error = o.error.unwrap_or_default();
                if let Some((ty, bytes)) = o.value {
                    wire.value_type = ty.to_owned();
                    wire.value = bytes;
                }
            }
            Ok(Err(bad_args)) => return Err(bad_args),
            Err(p) => {
                if p.is::<ExitSignal>() {
                    // `Context::exit` from inside a task ends the scheduler as asked.
                    resume_unwind(p);
                }
                wire.error = format!("panicked: {}", panic_message(&*p));
                wire.backtrace = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
            }
        }
        e.runs = run;
        wire.missed = std::mem::take(&mut e.skipped);
        self.runs += 1;
        if !wire.successful {
            self.failed += 1;
        }
        Ok((wire, cancel))
    }

    /// Sends a result to the task's subscribers, without ever waiting (a full ring keeps
    /// it in memory until there is room). Subscribers that have stopped are dropped.
    fn publish(&mut self, e: &mut Entry, wire: &ResultWire) {
        let ep = self.ctx.ep();
        let route = Route::plain(ep.shared.id);
        e.subscribers.retain(|s| {
            let mut sent = ep.send_copy(Target::Ref(s), wire, route, Mode::Spill);
            if let Err(SendError::TooLarge { capacity, .. }) = sent {
                let why =
                    format!("the result is larger than the subscriber's ring ({capacity} bytes)");
                sent = ep.send_copy(Target::Ref(s), &shrink(wire, &why), route, Mode::Spill);
            }
            !matches!(
                sent,
                Err(SendError::Disconnected(())) | Err(SendError::UnknownTarget(()))
            )
        });
    }

    fn find(&self, key: &ArchivedWireKey) -> Option<u64> {
        match key {
            ArchivedWireKey::Id(id) => {
                let id = id.to_native();
                self.tasks.contains_key(&id).then_some(id)
            }
            ArchivedWireKey::Name(n) => self.names.get(n.as_str()).copied(),
        }
    }

    fn handle(&mut self, mut m: Message<'_>) {
        if let Ok(spec) = m.take::<TaskSpec>() {
            let replier = m.replier();
            drop(m);
            let reply = self.add_running(*spec);
            self.answer(&replier, &reply);
            return;
        }
        let request = match m.get_checked::<Request>() {
            Ok(r) => r,
            Err(e) => {
                if m.is_request() {
                    let _ = m.reply_error(&format!("not a scheduler request: {e}"));
                }
                return;
            }
        };
        let reply = match request {
            ArchivedRequest::Run {
                name,
                args_type,
                args,
            } => {
                let name = name.as_str().to_owned();
                let args_type = args_type.as_str().to_owned();
                let args = aligned(args);
                let replier = m.replier();
                let asked = m.is_request();
                drop(m);
                let reply = self.run_on_demand(&name, &args_type, &args);
                if asked {
                    self.answer(&replier, &reply);
                } else if !matches!(reply, Reply::Done(_)) {
                    self.rejected += 1;
                }
                return;
            }
            ArchivedRequest::Ping => Reply::Pong {
                tasks: self.tasks.len() as u64,
                runs: self.runs,
                failed: self.failed,
                rejected: self.rejected,
            },
            ArchivedRequest::Cancel(key) => Reply::Cancelled(match self.find(key) {
                Some(id) => {
                    if let Some(e) = self.tasks.remove(&id) {
                        self.forget(id, &e);
                    }
                    true
                }
                None => false,
            }),
            ArchivedRequest::Subscribe(key) => match (self.find(key), m.sender()) {
                (Some(id), Some(who)) => {
                    if let Some(e) = self.tasks.get_mut(&id) {
                        e.subscribers.retain(IsolateRef::is_alive);
                        if !e.subscribers.iter().any(|s| s.id() == who.id()) {
                            e.subscribers.push(who);
                        }
                    }
                    Reply::Subscribed(id)
                }
                (None, _) => Reply::Unknown(key_text(key)),
                (_, None) => Reply::Refused("the subscriber is not known here".into()),
            },
            ArchivedRequest::Unsubscribe(key) => {
                let who = m.sender_id();
                Reply::Unsubscribed(
                    match self.find(key).and_then(|id| self.tasks.get_mut(&id)) {
                        Some(e) => {
                            let before = e.subscribers.len();
                            e.subscribers.retain(|s| s.id() != who);
                            e.subscribers.len() < before
                        }
                        None => false,
                    },
                )
            }
            ArchivedRequest::List => Reply::Tasks(self.list()),
            ArchivedRequest::Stop => {
                self.stopping = true;
                self.ctx.shutdown_isolate();
                Reply::Stopping
            }
        };
        if m.is_request() {
            let replier = m.replier();
            drop(m);
            self.answer(&replier, &reply);
        }
    }

    /// Sends an answer without ever waiting (a caller that stopped reading must not stall
    /// the scheduler: the answer waits in memory). An answer too large for the caller's
    /// ring goes as a result without its value, or as an error saying so.
    fn answer(&self, to: &Replier, reply: &Reply) {
        let ep = self.ctx.ep();
        let send = |value: &Reply| {
            ep.send_copy(
                Target::Id(to.reply_to),
                value,
                to.route(ep.shared.id, 0),
                Mode::Spill,
            )
        };
        if let Err(SendError::TooLarge { capacity, .. }) = send(reply) {
            let why = format!("the answer is larger than the caller's ring ({capacity} bytes)");
            let _ = match reply {
                Reply::Done(w) => send(&Reply::Done(shrink(w, &why))),
                _ => ep.send_copy(
                    Target::Id(to.reply_to),
                    &why,
                    to.route(ep.shared.id, crate::frame::FLAG_ERROR),
                    Mode::Spill,
                ),
            };
        }
    }

    fn add_running(&mut self, spec: TaskSpec) -> Reply {
        // Clients check before sending; a spec moved here some other way is checked too.
        if let Err(e) = validate(&spec) {
            return Reply::Refused(e.to_string());
        }
        if let Some(n) = &spec.name {
            if self.names.contains_key(n) {
                return Reply::Duplicate(n.clone());
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.install(id, spec, Instant::now());
        Reply::Added(id)
    }

    fn run_on_demand(&mut self, name: &str, args_type: &str, args: &Aligned) -> Reply {
        let Some(&id) = self.names.get(name) else {
            return Reply::Unknown(name.to_owned());
        };
        let Some(mut e) = self.tasks.remove(&id) else {
            return Reply::Unknown(name.to_owned());
        };
        if e.args_type != args_type {
            let reply = Reply::WrongArgs {
                task: name.to_owned(),
                expected: e.args_type.to_owned(),
                found: args_type.to_owned(),
            };
            self.tasks.insert(id, e);
            return reply;
        }
        let (wire, cancelled) = match self.execute(id, &mut e, args, Instant::now()) {
            Ok(ran) => ran,
            Err(bad) => {
                self.tasks.insert(id, e);
                return Reply::InvalidArgs(bad);
            }
        };
        self.publish(&mut e, &wire);
        if cancelled {
            self.forget(id, &e);
        } else {
            self.tasks.insert(id, e);
        }
        Reply::Done(wire)
    }

    fn list(&self) -> Vec<InfoWire> {
        let now = Instant::now();
        let mut ids: Vec<u64> = self.tasks.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| {
                let e = &self.tasks[&id];
                InfoWire {
                    id,
                    name: e.name.clone().unwrap_or_default(),
                    args_type: e.args_type.to_owned(),
                    kind: match e.schedule {
                        Schedule::OnDemand => "on demand",
                        Schedule::Once(_) => "once",
                        Schedule::Every { .. } => "every",
                    }
                    .to_owned(),
                    runs: e.runs,
                    next_in_ns: e.due.map_or(-1, |(at, _)| {
                        i64::try_from(at.saturating_duration_since(now).as_nanos())
                            .unwrap_or(i64::MAX)
                    }),
                    subscribers: e.subscribers.len() as u64,
                }
            })
            .collect()
    }
}

/// A result that did not fit a ring, without its value and backtrace, saying why.
fn shrink(w: &ResultWire, why: &str) -> ResultWire {
    let mut error: String = w.error.chars().take(1024).collect();
    if !error.is_empty() {
        error.push_str("; ");
    }
    error.push_str(why);
    ResultWire {
        task: w.task,
        name: w.name.chars().take(256).collect(),
        run: w.run,
        successful: false,
        error,
        backtrace: String::new(),
        lateness_ns: w.lateness_ns,
        missed: w.missed,
        value_type: String::new(),
        value: Vec::new(),
    }
}

/// The result of a scheduled run whose stored arguments were refused.
fn failed_run(id: u64, e: &Entry, why: String) -> ResultWire {
    ResultWire {
        task: id,
        name: e.name.clone().unwrap_or_default(),
        run: e.runs,
        successful: false,
        error: format!("invalid arguments: {why}"),
        backtrace: String::new(),
        lateness_ns: 0,
        missed: 0,
        value_type: String::new(),
        value: Vec::new(),
    }
}

fn key_text(key: &ArchivedWireKey) -> String {
    match key {
        ArchivedWireKey::Id(id) => format!("#{}", id.to_native()),
        ArchivedWireKey::Name(n) => n.as_str().to_owned(),
    }
}

/// Deadline `k` of a periodic task (exact: computed in nanoseconds, never wrapping).
fn deadline(origin: Instant, period: Duration, k: u64) -> Instant {
    let nanos = period.as_nanos().saturating_mul(u128::from(k));
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    let offset = Duration::new(secs, (nanos % 1_000_000_000) as u32);
    later(origin, offset)
}

/// `now + d`, or a time so far ahead that it never comes when that does not fit.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(1 << 40)))
        .unwrap_or(now)
}

// ---------------------------------------------------------------------------------------
// Backtraces of panicking tasks
// ---------------------------------------------------------------------------------------

thread_local! {
    /// Set while a task body runs on this thread: its panic is captured, not printed.
    static CAPTURE: Cell<bool> = const { Cell::new(false) };
    /// The location and backtrace of the last captured panic.
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Backtraces are cut to this many bytes, so a result with one fits a ring.
const MAX_BACKTRACE: usize = 16 << 10;

/// Installs (once per process) a panic hook that, on a thread running a task body,
/// records where the panic happened and its backtrace for the task's result instead of
/// printing them; on every other thread it defers to the hook that was there before. A
/// hook set later by the application replaces it: panicking tasks then still fail with
/// their message, without a backtrace.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let capturing = CAPTURE.try_with(Cell::get).unwrap_or(false);
            if !capturing {
                return previous(info);
            }
            let place = info
                .location()
                .map(|l| format!("at {}:{}:{}\n", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            let mut text = format!("{place}{}", Backtrace::force_capture());
            if text.len() > MAX_BACKTRACE {
                let mut end = MAX_BACKTRACE;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push_str("\n... (cut)");
            }
            let _ = CAPTURED.try_with(|c| *c.borrow_mut() = Some(text));
        }));
    });
}

/// Asks the OS to wake the scheduler thread as close to its deadlines as it can (the
/// default timer slack of 50 µs would add to every periodic run's lateness).
fn reduce_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument (nanoseconds) and affects only
    // the calling thread; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
}

/// Validates `data` as each of the scheduler's wire messages and reads every one that
/// passes all the way through, as the scheduler and its clients would (the fuzz target
/// `untrusted`).
#[doc(hidden)]
pub fn check_untrusted(data: &[u8]) {
    let bytes = aligned(data);
    let read = |b: &Aligned| {
        if let Ok(ArchivedRequest::Run { name, args, .. }) =
            rkyv::access::<ArchivedRequest, rkyv::rancor::Error>(b)
        {
            let _ = (name.len(), aligned(args));
        }
        if let Ok(r) = rkyv::access::<ArchivedReply, rkyv::rancor::Error>(b) {
            let _ = r.error();
            if let ArchivedReply::Done(w) = r {
                let result = TaskResult::from_wire(w);
                let _ = result.value::<String>();
            }
        }
        if let Ok(w) = rkyv::access::<ArchivedResultWire, rkyv::rancor::Error>(b) {
            let _ = TaskResult::from_wire(w).value::<u64>();
        }
    };
    read(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_exact_and_never_wrap() {
        let o = Instant::now();
        let p = Duration::from_micros(1);
        assert_eq!(deadline(o, p, 3), o + Duration::from_micros(3));
        // Past 2^32 periods (71 minutes of a 1 µs task), still exact.
        let k = (1u64 << 32) + 5;
        assert_eq!(deadline(o, p, k), o + Duration::from_micros(k));
        assert!(deadline(o, p, k + 1) > deadline(o, p, k));
        // Beyond what an Instant can hold: far ahead, no panic.
        assert!(deadline(o, Duration::MAX, u64::MAX) > o + Duration::from_secs(1 << 30));
        assert!(later(o, Duration::MAX) > o);
    }

    /// Argument bytes that are not what they claim to be (as from a hostile or broken
    /// peer) are refused after validation; the task never runs. Messages that are not
    /// scheduler requests get an error reply.
    #[test]
    fn forged_requests_are_refused() {
        let cluster = Cluster::single_node();
        let mut scheduler = Scheduler::new();
        scheduler
            .named::<String, _, _>("greet", |_t, s: &rkyv::string::ArchivedString| {
                Ok::<u64, String>(s.len() as u64)
            })
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let t = Duration::from_secs(20);
        // An out-of-line string whose length and offset point far past its bytes (0xff
        // would be valid: it pads inline strings).
        let mut bytes = crate::frame::encode(&"x".repeat(40)).unwrap();
        let forged = Request::Run {
            name: "greet".into(),
            args_type: type_name::<String>().into(),
            args: {
                bytes.iter_mut().for_each(|b| *b = 0x80);
                bytes
            },
        };
        let err = client
            .exchange(&mailbox, &forged, t, |r| match r {
                ArchivedReply::Done(w) => Some(format!("ran: {}", w.error)),
                _ => Some("other".to_string()),
            })
            .unwrap_err();
        assert!(matches!(err, TaskError::InvalidArguments(_)), "{err}");
        let status = client.status(&mailbox, t).unwrap();
        assert_eq!((status.runs, status.failed), (0, 0));

        let e = mailbox.call(client.scheduler(), &3u64, t).unwrap_err();
        assert!(
            matches!(e, CallError::Remote(ref m) if m.starts_with("not a scheduler request")),
            "{e}"
        );
        // Still serving.
        let r = client
            .run(&mailbox, "greet", &"abc".to_string(), t)
            .unwrap();
        assert_eq!(*r.value::<u64>().unwrap(), 3);
        cluster.shutdown();
        cluster.join(t).unwrap();
    }
}
