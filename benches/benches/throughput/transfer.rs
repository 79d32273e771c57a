//! The transfer pipelines: ownership of `size`-byte buffers moved one way, and handed back
//! to the producer through the same return path (an `rtrb` ring) for every peer, so that
//! the runs measure the move and not the allocator.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use isolate_cluster::{Cluster, CorePolicy, Mailbox, Properties, WaitStrategy};

use super::{channel_consumer, rtrb_consumer, sink_loop, Cores, Pipeline, Progress};

/// A buffer the transfer pipelines move: what `transfer` takes (the peers move the
/// `Vec<u8>` inside it).
type Buffer = Box<Vec<u8>>;

/// Buffers of one size lent to each transfer pipeline in turn and given back when it
/// drops: allocated once (zeroed, so untouched pages cost no memory), never in a timed
/// loop.
pub(crate) struct Bank {
    size: usize,
    free: RefCell<Vec<Buffer>>,
}

/// Buffers a transfer pipeline circulates beyond its ring's slots: the producer can
/// then fill the ring while the consumer holds one and the return path some more.
const SPARE_BUFFERS: usize = 8;

impl Bank {
    pub(crate) fn new(size: usize) -> Rc<Self> {
        Rc::new(Self {
            size,
            free: RefCell::new(Vec::new()),
        })
    }

    /// The return path of a pipeline of `slots` slots: a ring holding all its buffers,
    /// `wrap`ped as the pipeline moves them. The consumer pushes each buffer it received
    /// into the producer end; the producer pops the next one to send from the other.
    fn lend<T>(
        &self,
        slots: usize,
        wrap: fn(Buffer) -> T,
    ) -> (rtrb::Producer<T>, rtrb::Consumer<T>) {
        let count = slots + SPARE_BUFFERS;
        let (mut tx, rx) = rtrb::RingBuffer::new(count);
        let mut free = self.free.borrow_mut();
        for _ in 0..count {
            let b = free.pop().unwrap_or_else(|| Box::new(vec![0u8; self.size]));
            debug_assert_eq!(b.len(), self.size);
            if tx.push(wrap(b)).is_err() {
                unreachable!("the return ring holds every buffer");
            }
        }
        (tx, rx)
    }

    /// Takes back what the return path holds (every buffer, once the consumer has
    /// received all that was sent).
    fn repay<T>(&self, rx: &mut rtrb::Consumer<T>, unwrap: fn(T) -> Buffer) {
        let mut free = self.free.borrow_mut();
        while let Ok(b) = rx.pop() {
            free.push(unwrap(b));
        }
    }
}

/// The next free buffer, spinning until the consumer has returned one.
#[inline]
fn next_buffer<T>(back: &mut rtrb::Consumer<T>) -> T {
    loop {
        if let Ok(b) = back.pop() {
            return b;
        }
        std::hint::spin_loop();
    }
}

/// Hands a received buffer back to the producer (the return ring has room for all).
#[inline]
fn give_back<T>(back: &mut rtrb::Producer<T>, b: T) {
    if back.push(b).is_err() {
        unreachable!("the return ring holds every buffer");
    }
}

/// Raw `rtrb` moving `Vec<u8>`s: a ring of `slots` one way, the return path the other.
pub(crate) struct TransferRtrb {
    tx: rtrb::Producer<Vec<u8>>,
    back: rtrb::Consumer<Vec<u8>>,
    bank: Rc<Bank>,
    progress: Arc<Progress>,
    sent: u64,
    consumer: Option<thread::JoinHandle<()>>,
}

impl TransferRtrb {
    pub(crate) fn new(cores: Cores, slots: usize, bank: &Rc<Bank>) -> Self {
        let (tx, rx) = rtrb::RingBuffer::<Vec<u8>>::new(slots);
        let (mut returns, back) = bank.lend(slots, |b| *b);
        let progress = Progress::new();
        let consumer = rtrb_consumer(cores[0], rx, progress.clone(), move |v: Vec<u8>| {
            std::hint::black_box(v[0]);
            give_back(&mut returns, v);
        });
        Self {
            tx,
            back,
            bank: bank.clone(),
            progress,
            sent: 0,
            consumer: Some(consumer),
        }
    }
}

impl Pipeline for TransferRtrb {
    fn run(&mut self, n: u64) -> Duration {
        let t = Instant::now();
        for i in 0..n {
            let mut v = next_buffer(&mut self.back);
            v[0] = i as u8;
            while let Err(rtrb::PushError::Full(back)) = self.tx.push(v) {
                v = back;
                std::hint::spin_loop();
            }
        }
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl Drop for TransferRtrb {
    fn drop(&mut self) {
        self.progress.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
        self.bank.repay(&mut self.back, Box::new);
    }
}

/// `crossbeam-channel` bounded to `slots`, moving `Vec<u8>`s, with the same return path.
pub(crate) struct TransferCrossbeam {
    tx: Option<crossbeam_channel::Sender<Vec<u8>>>,
    back: rtrb::Consumer<Vec<u8>>,
    bank: Rc<Bank>,
    progress: Arc<Progress>,
    sent: u64,
    consumer: Option<thread::JoinHandle<()>>,
}

impl TransferCrossbeam {
    pub(crate) fn new(cores: Cores, slots: usize, bank: &Rc<Bank>) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(slots);
        let (mut returns, back) = bank.lend(slots, |b| *b);
        let progress = Progress::new();
        let consumer = channel_consumer(cores[0], rx, progress.clone(), move |v: Vec<u8>| {
            std::hint::black_box(v[0]);
            give_back(&mut returns, v);
        });
        Self {
            tx: Some(tx),
            back,
            bank: bank.clone(),
            progress,
            sent: 0,
            consumer: Some(consumer),
        }
    }
}

impl Pipeline for TransferCrossbeam {
    fn run(&mut self, n: u64) -> Duration {
        let t = Instant::now();
        let tx = self.tx.as_ref().expect("open");
        for i in 0..n {
            let mut v = next_buffer(&mut self.back);
            v[0] = i as u8;
            tx.send(v).expect("consumer alive");
        }
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl Drop for TransferCrossbeam {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
        self.bank.repay(&mut self.back, Box::new);
    }
}

/// isolate-cluster `transfer` of `Box<Vec<u8>>`s from a mailbox to a spinning isolate
/// through a ring of `slots` one-cell frames, with the same return path; `batch`
/// receives with `try_recv_batch` (there is no batched transfer send).
pub(crate) struct TransferIsolates {
    cluster: Option<Cluster>,
    mailbox: Option<Mailbox>,
    sink: isolate_cluster::IsolateRef,
    back: rtrb::Consumer<Buffer>,
    bank: Rc<Bank>,
    progress: Arc<Progress>,
    sent: u64,
}

impl TransferIsolates {
    pub(crate) fn new(cores: Cores, slots: usize, bank: &Rc<Bank>, batch: bool) -> Self {
        // A transfer frame (32-byte header, 16-byte pointer and drop function) takes one
        // 64-byte cell.
        let cluster = Cluster::builder()
            .ring_capacity(slots * 64)
            .wait_strategy(WaitStrategy::BusySpin)
            .core_policy(CorePolicy::Dedicated)
            .cores(vec![cores[0].id])
            .build();
        let (mut returns, back) = bank.lend(slots, |b| b);
        let progress = Progress::new();
        let p = progress.clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                sink_loop(ctx, &p, batch, |m| {
                    let b = m.take::<Vec<u8>>().expect("a buffer");
                    std::hint::black_box(b[0]);
                    give_back(&mut returns, b);
                });
            })
            .expect("spawn sink");
        let mailbox = cluster.mailbox().expect("mailbox");
        Self {
            cluster: Some(cluster),
            mailbox: Some(mailbox),
            sink,
            back,
            bank: bank.clone(),
            progress,
            sent: 0,
        }
    }
}

impl Pipeline for TransferIsolates {
    fn run(&mut self, n: u64) -> Duration {
        let mailbox = self.mailbox.as_ref().expect("open");
        let t = Instant::now();
        for i in 0..n {
            let mut b = next_buffer(&mut self.back);
            b[0] = i as u8;
            mailbox.transfer(&self.sink, b).expect("transfer");
        }
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl Drop for TransferIsolates {
    fn drop(&mut self) {
        self.mailbox = None;
        if let Some(c) = self.cluster.take() {
            c.shutdown();
            let _ = c.join(Duration::from_secs(10));
        }
        self.bank.repay(&mut self.back, |b| b);
    }
}
