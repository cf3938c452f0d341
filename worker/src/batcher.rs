//! Dynamic batching: one task owns the queue of admitted requests, forms batches and
//! hands them to the engine thread, which owns the model.
//!
//! Admission is bounded: past `max_queue` waiting requests `submit` refuses at once
//! (the HTTP layer answers 429). A batch closes on `max_batch` inputs, `max_batch_tokens`
//! padded tokens, or `max_wait` after its oldest request was admitted (it waits only
//! while fewer inputs are queued than the recent batches held). A request whose
//! client went away before its batch started is dropped, never computed; one past its
//! deadline is answered with a timeout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info};

use crate::engine::{EmbeddingBackend, EngineError, embed_grouped};
use crate::metrics::{Metrics, Outcome};

/// Limits of the batcher.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_queue: usize,
    pub max_batch: usize,
    pub max_batch_tokens: usize,
    pub max_wait: Duration,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the worker is shutting down")]
    Draining,
}

/// Why an admitted request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("the request waited past its deadline")]
    Timeout,
    #[error("inference failed: {0}")]
    Engine(String),
}

pub type JobResult = Result<Vec<Vec<f32>>, JobError>;

/// Token ids of one request's inputs, and where to send its embeddings.
struct Job {
    inputs: Vec<Vec<u32>>,
    admitted: Instant,
    deadline: Instant,
    reply: oneshot::Sender<JobResult>,
}

/// A cloneable handle to submit work; the batcher ends when every handle is dropped
/// and the queue is empty.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    waiting: Arc<AtomicUsize>,
    admitting: Arc<AtomicBool>,
    /// Requests admitted since start (the drain log reports it).
    admitted_total: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the engine thread and the batching task. `pad_id` pads batches.
    pub fn start(
        backend: Box<dyn EmbeddingBackend>,
        pad_id: u32,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let engine = Engine::spawn(backend, pad_id);
        let owner = QueueOwner {
            rx,
            queue: VecDeque::new(),
            waiting: waiting.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
            engine,
            recent: VecDeque::new(),
        };
        let task = tokio::spawn(owner.run());
        let handle = Batcher {
            tx,
            waiting,
            admitting: Arc::new(AtomicBool::new(true)),
            admitted_total: Arc::new(AtomicUsize::new(0)),
            max_queue: limits.max_queue,
            metrics,
        };
        (handle, task)
    }

    /// Admits a request or refuses it at once. The receiver yields its embeddings;
    /// dropping the receiver cancels the request if its batch has not started.
    pub fn submit(
        &self,
        inputs: Vec<Vec<u32>>,
        timeout: Duration,
    ) -> Result<oneshot::Receiver<JobResult>, Refusal> {
        if !self.admitting.load(Ordering::SeqCst) {
            return Err(Refusal::Draining);
        }
        let admitted = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if let Err(n) = admitted {
            return Err(Refusal::QueueFull(n));
        }
        self.metrics.queue_depth.inc();
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Job {
            inputs,
            admitted: now,
            deadline: now + timeout,
            reply,
        };
        if self.tx.send(job).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.dec();
            return Err(Refusal::Draining);
        }
        self.admitted_total.fetch_add(1, Ordering::SeqCst);
        Ok(rx)
    }

    /// Stops admission: later `submit`s are refused; admitted requests still run.
    pub fn stop_admitting(&self) {
        self.admitting.store(false, Ordering::SeqCst);
    }

    /// Requests admitted since start.
    pub fn admitted_total(&self) -> usize {
        self.admitted_total.load(Ordering::SeqCst)
    }

    /// Requests admitted and waiting for a batch.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

type EngineReply = oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>;

/// The engine thread: owns the model, runs one batch at a time.
struct Engine {
    tx: std::sync::mpsc::Sender<(Vec<Vec<u32>>, EngineReply)>,
}

impl Engine {
    fn spawn(mut backend: Box<dyn EmbeddingBackend>, pad_id: u32) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<Vec<u32>>, EngineReply)>();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                while let Ok((batch, reply)) = rx.recv() {
                    let _ = reply.send(embed_grouped(backend.as_mut(), &batch, pad_id));
                }
            })
            .expect("failed to spawn the engine thread");
        Engine { tx }
    }

    async fn run(&self, batch: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((batch, reply))
            .map_err(|_| EngineError::Backend {
                backend: "engine",
                message: "the engine thread has stopped".into(),
            })?;
        rx.await.map_err(|_| EngineError::Backend {
            backend: "engine",
            message: "the engine thread panicked".into(),
        })?
    }
}

struct QueueOwner {
    rx: mpsc::UnboundedReceiver<Job>,
    queue: VecDeque<Job>,
    waiting: Arc<AtomicUsize>,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
    engine: Engine,
    /// Inputs of the last few batches: how many to expect when the next one forms.
    recent: VecDeque<usize>,
}

/// Batches remembered to set the expected size of the next one.
const RECENT_BATCHES: usize = 8;

impl QueueOwner {
    async fn run(mut self) {
        loop {
            if self.queue.is_empty() {
                match self.rx.recv().await {
                    Some(job) => self.queue.push_back(job),
                    None => break,
                }
            }
            self.drain_channel();
            self.wait_for_batch().await;
            let jobs = self.take_batch();
            if !jobs.is_empty() {
                self.execute(jobs).await;
            }
        }
        info!("batcher stopped: no more requests can arrive and the queue is empty");
    }

    fn drain_channel(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            self.queue.push_back(job);
        }
    }

    fn queued_inputs(&self) -> usize {
        self.queue.iter().map(|j| j.inputs.len()).sum()
    }

    /// Waits until the batch is full or the oldest request has waited `max_wait`.
    /// Waits (at most `max_wait` after the oldest request's admission) until as many
    /// inputs are queued as the largest of the recent batches: under steady load the
    /// batch fills, while a lone request at low load runs at once.
    async fn wait_for_batch(&mut self) {
        let Some(oldest) = self.queue.front().map(|j| j.admitted) else {
            return;
        };
        let expected = self
            .recent
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .clamp(1, self.limits.max_batch);
        let close_at = tokio::time::Instant::from_std(oldest + self.limits.max_wait);
        while self.queued_inputs() < expected {
            match tokio::time::timeout_at(close_at, self.rx.recv()).await {
                Ok(Some(job)) => {
                    self.queue.push_back(job);
                    self.drain_channel();
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Leaves the queue: a request that was taken, cancelled or expired.
    fn dequeued(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.dec();
    }

    /// Pops the requests of the next batch, answering cancelled and expired ones.
    fn take_batch(&mut self) -> Vec<Job> {
        let now = Instant::now();
        let mut jobs: Vec<Job> = Vec::new();
        let (mut inputs, mut longest) = (0usize, 0usize);
        while let Some(job) = self.queue.front() {
            if job.reply.is_closed() {
                let _ = self.queue.pop_front();
                self.dequeued();
                self.metrics.count(Outcome::Cancelled);
                debug!("dropped a request whose client went away");
                continue;
            }
            if job.deadline <= now {
                let job = self.queue.pop_front().expect("front exists");
                self.dequeued();
                let _ = job.reply.send(Err(JobError::Timeout));
                continue;
            }
            let n = job.inputs.len();
            let len = job
                .inputs
                .iter()
                .map(Vec::len)
                .max()
                .unwrap_or(0)
                .max(longest);
            let fits = inputs + n <= self.limits.max_batch
                && (inputs + n) * len <= self.limits.max_batch_tokens;
            // An oversized request runs alone (in chunks) rather than never.
            if !jobs.is_empty() && !fits {
                break;
            }
            let job = self.queue.pop_front().expect("front exists");
            self.dequeued();
            inputs += n;
            longest = len;
            jobs.push(job);
            if !fits {
                break;
            }
        }
        jobs
    }

    async fn execute(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        for job in &jobs {
            self.metrics
                .queue_wait
                .observe((started - job.admitted).as_secs_f64());
        }
        let seqs: Vec<&[u32]> = jobs
            .iter()
            .flat_map(|j| j.inputs.iter().map(Vec::as_slice))
            .collect();
        let tokens: usize = seqs.iter().map(|s| s.len()).sum();
        if self.recent.len() == RECENT_BATCHES {
            self.recent.pop_front();
        }
        self.recent.push_back(seqs.len());
        let mut outputs: Vec<Vec<f32>> = Vec::with_capacity(seqs.len());
        let mut failure = None;
        for chunk in seqs.chunks(self.limits.max_batch.max(1)) {
            self.metrics.batch_size.observe(chunk.len() as f64);
            let batch: Vec<Vec<u32>> = chunk.iter().map(|s| s.to_vec()).collect();
            match self.engine.run(batch).await {
                Ok(out) => outputs.extend(out),
                Err(e) => {
                    error!(error = %e, inputs = chunk.len(), "batch failed");
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        self.metrics.tokens.inc_by(tokens as u64);
        debug!(
            requests = jobs.len(),
            inputs = seqs.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "batch done"
        );
        let mut outputs = outputs.into_iter();
        for job in jobs {
            let result = match &failure {
                Some(msg) => Err(JobError::Engine(msg.clone())),
                None => Ok(outputs.by_ref().take(job.inputs.len()).collect()),
            };
            if job.reply.send(result).is_err() {
                // The client left while its batch ran: the work is done but unread.
                self.metrics.count(Outcome::Cancelled);
            }
        }
    }
}
