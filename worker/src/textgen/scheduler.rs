//! Continuous batching: one engine thread owns the model and every sequence. Between
//! two decode steps it takes waiting requests into free slots (their prompt pass, then
//! their first token); each decode step feeds every running sequence its last token as
//! one batch. A finished or cancelled sequence leaves (its KV cache freed) before the
//! next step; a client that goes away cancels its sequence at the next step.
//!
//! Admission is bounded: past `max_queue` waiting requests `submit` refuses at once
//! (the HTTP layer answers 429).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, error, info};

use super::model::{Gemma3, Sequence, with_values};
use super::sampling::{Sampler, SamplingParams};
use super::tokenizer::{Detokenizer, GemmaTokenizer};
use crate::admission::{Admission, Refusal};
use crate::metrics::{Metrics, Outcome};

#[derive(Debug, Clone)]
pub struct GenLimits {
    /// Requests admitted and waiting for a slot, at most.
    pub max_queue: usize,
    /// Sequences decoded together, at most (each holds a KV cache).
    pub max_running: usize,
    /// A request not started by then is answered with a timeout.
    pub request_timeout: Duration,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request's receiver gets: one `Token` per generated token, then `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Token {
        text: String,
    },
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Timeout,
    Failed(String),
}

/// One generation request.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

struct Admitted {
    req: GenRequest,
    events: UnboundedSender<GenEvent>,
    admitted: Instant,
    deadline: Instant,
}

struct Running {
    seq: Sequence,
    events: UnboundedSender<GenEvent>,
    sampler: Sampler,
    detok: Detokenizer,
    /// The last sampled token, fed at the next step.
    next: u32,
    generated: usize,
    max_tokens: usize,
    prompt_tokens: usize,
    admitted: Instant,
    last_token_at: Instant,
}

/// A cloneable handle; the engine thread ends once every handle is gone and nothing
/// is left to run.
#[derive(Clone)]
pub struct Generator {
    tx: std::sync::mpsc::Sender<Admitted>,
    admission: Admission,
    limits: GenLimits,
    metrics: Arc<Metrics>,
}

impl Generator {
    pub fn start(
        model: Gemma3,
        tokenizer: Arc<GemmaTokenizer>,
        limits: GenLimits,
        metrics: Arc<Metrics>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        // The queue depth and the waiting sequences are the same count.
        let gauges = std::iter::once(metrics.queue_depth.clone())
            .chain(metrics.generation.as_ref().map(|g| g.waiting.clone()));
        let admission = Admission::new(limits.max_queue, gauges);
        let engine = Engine {
            model,
            tokenizer,
            rx,
            queue: VecDeque::new(),
            running: Vec::new(),
            admission: admission.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("generation".into())
            .spawn(move || engine.run())
            .expect("failed to spawn the generation thread");
        let handle = Generator {
            tx,
            admission,
            limits,
            metrics,
        };
        (handle, thread)
    }

    /// Admits a request or refuses it at once. Dropping the receiver cancels it.
    pub fn submit(&self, req: GenRequest) -> Result<UnboundedReceiver<GenEvent>, Refusal> {
        self.admission.reserve()?;
        self.metrics.in_flight.inc();
        let (events, rx) = unbounded_channel();
        let now = Instant::now();
        let job = Admitted {
            req,
            events,
            admitted: now,
            deadline: now + self.limits.request_timeout,
        };
        if self.tx.send(job).is_err() {
            self.admission.unreserve();
            self.metrics.in_flight.dec();
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

struct Engine {
    model: Gemma3,
    tokenizer: Arc<GemmaTokenizer>,
    rx: std::sync::mpsc::Receiver<Admitted>,
    queue: VecDeque<Admitted>,
    running: Vec<Running>,
    admission: Admission,
    limits: GenLimits,
    metrics: Arc<Metrics>,
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => break,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.queue.push_back(job);
            }
            self.admit();
            self.drop_cancelled();
            if !self.running.is_empty() {
                self.step();
            }
            self.update_gauges();
        }
        info!("generation engine stopped: no more requests can arrive and none is left");
    }

    /// Ends a request: counts its outcome and leaves in-flight.
    fn ended(&self, outcome: Outcome, admitted: Instant) {
        self.metrics.count(outcome);
        self.metrics.in_flight.dec();
        if outcome == Outcome::Ok {
            self.metrics
                .request_duration
                .observe(admitted.elapsed().as_secs_f64());
        }
    }

    /// Takes waiting requests into free slots: the prompt pass, then the first token.
    fn admit(&mut self) {
        while self.running.len() < self.limits.max_running {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            self.admission.dequeued();
            if job.events.is_closed() {
                debug!("dropped a request whose client went away");
                self.ended(Outcome::Cancelled, job.admitted);
                continue;
            }
            let now = Instant::now();
            if job.deadline <= now {
                let _ = job.events.send(GenEvent::Timeout);
                self.ended(Outcome::Error, job.admitted);
                continue;
            }
            self.metrics
                .queue_wait
                .observe((now - job.admitted).as_secs_f64());
            let mut seq = self.model.new_sequence();
            let mut sampler = Sampler::new(job.req.sampling);
            // The first token, drawn from the prompt pass's logits in place (as a step's).
            let first = self
                .model
                .prefill(&mut seq, &job.req.prompt)
                .and_then(|l| with_values(&l, |logits| sampler.sample(logits)));
            let first = match first {
                Ok(t) => t,
                Err(e) => {
                    error!(error = %e, "prompt pass failed");
                    let _ = job.events.send(GenEvent::Failed(e.to_string()));
                    self.ended(Outcome::Error, job.admitted);
                    continue;
                }
            };
            let prompt_tokens = job.req.prompt.len();
            self.metrics.tokens.inc_by(prompt_tokens as u64);
            if let Some(g) = &self.metrics.generation {
                g.prompt_tokens.inc_by(prompt_tokens as u64);
            }
            let mut r = Running {
                seq,
                events: job.events,
                sampler,
                detok: Detokenizer::new(job.req.stop),
                next: first,
                generated: 0,
                max_tokens: job.req.max_tokens,
                prompt_tokens,
                admitted: job.admitted,
                last_token_at: job.admitted,
            };
            if self.emit(&mut r, first) {
                self.running.push(r);
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        let metrics = self.metrics.clone();
        self.running.retain(|r| {
            let open = !r.events.is_closed();
            if !open {
                metrics.count(Outcome::Cancelled);
                metrics.in_flight.dec();
            }
            open
        });
        if self.running.len() < before {
            debug!(
                cancelled = before - self.running.len(),
                "sequences cancelled"
            );
        }
    }

    /// One decode step for every running sequence.
    fn step(&mut self) {
        let tokens: Vec<u32> = self.running.iter().map(|r| r.next).collect();
        self.metrics.batch_size.observe(tokens.len() as f64);
        let result = {
            let mut seqs: Vec<&mut Sequence> =
                self.running.iter_mut().map(|r| &mut r.seq).collect();
            self.model.decode(&mut seqs, &tokens)
        };
        // Each sequence draws its next token from its row of the logits, read in place.
        let running = &mut self.running;
        let drawn = result.and_then(|logits| {
            with_values(&logits, |logits| {
                let vocab = logits.len() / tokens.len();
                running
                    .iter_mut()
                    .enumerate()
                    .map(|(i, r)| r.sampler.sample(&logits[i * vocab..(i + 1) * vocab]))
                    .collect::<Vec<u32>>()
            })
        });
        let drawn = match drawn {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, sequences = tokens.len(), "decode step failed");
                for r in self.running.drain(..) {
                    let _ = r.events.send(GenEvent::Failed(e.to_string()));
                    self.metrics.count(Outcome::Error);
                    self.metrics.in_flight.dec();
                }
                return;
            }
        };
        let mut running = std::mem::take(&mut self.running);
        let mut keep = Vec::with_capacity(running.len());
        for (mut r, id) in running.drain(..).zip(drawn) {
            r.next = id;
            if self.emit(&mut r, id) {
                keep.push(r);
            }
        }
        self.running = keep;
    }

    /// Sends one generated token; false when the sequence is finished (or cancelled).
    fn emit(&self, r: &mut Running, id: u32) -> bool {
        let now = Instant::now();
        let g = self.metrics.generation.as_ref();
        if r.generated == 0 {
            g.inspect(|g| {
                g.time_to_first_token
                    .observe((now - r.admitted).as_secs_f64())
            });
        } else {
            g.inspect(|g| {
                g.inter_token_latency
                    .observe((now - r.last_token_at).as_secs_f64())
            });
        }
        r.last_token_at = now;
        let done = |r: &mut Running, reason: FinishReason, this: &Engine| {
            let rest = r.detok.finish();
            let mut sent = true;
            if !rest.is_empty() {
                sent &= r.events.send(GenEvent::Token { text: rest }).is_ok();
            }
            sent &= r
                .events
                .send(GenEvent::Done {
                    reason,
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.generated,
                })
                .is_ok();
            this.ended(
                if sent {
                    Outcome::Ok
                } else {
                    Outcome::Cancelled
                },
                r.admitted,
            );
            false
        };
        if self.tokenizer.is_stop_token(id) {
            return done(r, FinishReason::Stop, self);
        }
        r.generated += 1;
        g.inspect(|g| {
            g.generated_tokens.inc();
        });
        let delta = r.detok.push(&self.tokenizer, id);
        if r.events.send(GenEvent::Token { text: delta.text }).is_err() {
            self.ended(Outcome::Cancelled, r.admitted);
            return false;
        }
        if delta.stopped {
            return done(r, FinishReason::Stop, self);
        }
        if r.generated >= r.max_tokens || r.seq.len() + 1 > self.model.max_positions() {
            return done(r, FinishReason::Length, self);
        }
        true
    }

    fn update_gauges(&self) {
        let Some(g) = &self.metrics.generation else {
            return;
        };
        g.running.set(self.running.len() as i64);
        let held: usize = self.running.iter().map(|r| r.seq.len()).sum();
        let budget = (self.limits.max_running * self.model.max_positions()).max(1);
        g.kv_cache_usage.set(held as f64 / budget as f64);
    }
}
