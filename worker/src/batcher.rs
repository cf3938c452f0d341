//! Dynamic batching: one task owns the queue of admitted requests, forms batches and
//! hands them to the engine thread, which owns the model.
//!
//! Admission is bounded: past `max_queue` waiting requests `submit` refuses at once
//! (the HTTP layer answers 429). A batch closes on `max_batch` inputs, `max_batch_tokens`
//! padded tokens, or `max_wait` after its oldest request was admitted or the engine
//! became free, whichever is later (it waits only while fewer inputs are queued than
//! recent batches saw demanded). A request whose
//! client went away before its batch started is dropped, never computed; one past its
//! deadline is answered with a timeout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info};

use crate::admission::Admission;
pub use crate::admission::Refusal;
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
    admission: Admission,
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
        let admission = Admission::new(limits.max_queue, [metrics.queue_depth.clone()]);
        let engine = Engine::spawn(backend, pad_id);
        let owner = QueueOwner {
            rx,
            queue: VecDeque::new(),
            admission: admission.clone(),
            limits: limits.clone(),
            metrics,
            engine,
            recent: VecDeque::new(),
            engine_free_at: Instant::now(),
        };
        let task = tokio::spawn(owner.run());
        let handle = Batcher { tx, admission };
        (handle, task)
    }

    /// Admits a request or refuses it at once. The receiver yields its embeddings;
    /// dropping the receiver cancels the request if its batch has not started.
    pub fn submit(
        &self,
        inputs: Vec<Vec<u32>>,
        timeout: Duration,
    ) -> Result<oneshot::Receiver<JobResult>, Refusal> {
        self.admission.reserve()?;
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Job {
            inputs,
            admitted: now,
            deadline: now + timeout,
            reply,
        };
        if self.tx.send(job).is_err() {
            self.admission.unreserve();
            return Err(Refusal::Draining);
        }
        self.admission.admitted();
        Ok(rx)
    }

    /// This queue's admission (the drain log reads its counts).
    pub fn admission(&self) -> &Admission {
        &self.admission
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
    admission: Admission,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
    engine: Engine,
    /// Demand seen by the last few batches (their inputs plus those that queued while
    /// they ran): how many to expect when the next one forms.
    recent: VecDeque<usize>,
    /// When the engine finished its last batch.
    engine_free_at: Instant,
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

    fn remember_demand(&mut self, inputs: usize) {
        if self.recent.len() == RECENT_BATCHES {
            self.recent.pop_front();
        }
        self.recent.push_back(inputs);
    }

    /// Waits until as many inputs are queued as the largest recent demand (at most
    /// `max_batch`), for at most `max_wait` after the oldest request's admission or the
    /// end of the last batch, whichever is later: under steady load the batch fills,
    /// while a lone request at low load runs at once.
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
        let close_at =
            tokio::time::Instant::from_std(oldest.max(self.engine_free_at) + self.limits.max_wait);
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

    /// Pops the requests of the next batch, answering cancelled and expired ones.
    fn take_batch(&mut self) -> Vec<Job> {
        let now = Instant::now();
        let mut jobs: Vec<Job> = Vec::new();
        let (mut inputs, mut longest) = (0usize, 0usize);
        while let Some(job) = self.queue.front() {
            if job.reply.is_closed() {
                let _ = self.queue.pop_front();
                self.admission.dequeued();
                self.metrics.count(Outcome::Cancelled);
                debug!("dropped a request whose client went away");
                continue;
            }
            if job.deadline <= now {
                let job = self.queue.pop_front().expect("front exists");
                self.admission.dequeued();
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
            self.admission.dequeued();
            inputs += n;
            longest = len;
            jobs.push(job);
            if !fits {
                break;
            }
        }
        jobs
    }

    /// Runs one batch and answers its requests.
    async fn execute(&mut self, mut jobs: Vec<Job>) {
        let started = Instant::now();
        for job in &jobs {
            self.metrics
                .queue_wait
                .observe((started - job.admitted).as_secs_f64());
        }
        // The token ids move to the engine thread; each job keeps its count of inputs.
        let counts: Vec<usize> = jobs.iter().map(|j| j.inputs.len()).collect();
        let mut seqs: Vec<Vec<u32>> = jobs
            .iter_mut()
            .flat_map(|j| std::mem::take(&mut j.inputs))
            .collect();
        let tokens: usize = seqs.iter().map(Vec::len).sum();
        let inputs = seqs.len();
        let mut outputs: Vec<Vec<f32>> = Vec::with_capacity(inputs);
        let mut failure = None;
        while !seqs.is_empty() {
            let rest = seqs.split_off(seqs.len().min(self.limits.max_batch.max(1)));
            let batch = std::mem::replace(&mut seqs, rest);
            let n = batch.len();
            self.metrics.batch_size.observe(n as f64);
            match self.engine.run(batch).await {
                Ok(out) => outputs.extend(out),
                Err(e) => {
                    error!(error = %e, inputs = n, "batch failed");
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        self.metrics.tokens.inc_by(tokens as u64);
        debug!(
            requests = jobs.len(),
            inputs,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "batch done"
        );
        self.engine_free_at = Instant::now();
        // Demand: this batch's inputs plus those that queued while it ran, counted
        // before the answers go out (answered clients may be back at once). It lets the
        // next batch wait for the clients it answers instead of settling into
        // alternating half-full batches under closed-loop load.
        self.drain_channel();
        self.remember_demand(inputs + self.queued_inputs());
        let mut outputs = outputs.into_iter();
        for (job, count) in jobs.into_iter().zip(counts) {
            let result = match &failure {
                Some(msg) => Err(JobError::Engine(msg.clone())),
                None => Ok(outputs.by_ref().take(count).collect()),
            };
            if job.reply.send(result).is_err() {
                // The client left while its batch ran: the work is done but unread.
                self.metrics.count(Outcome::Cancelled);
            }
        }
    }
}
