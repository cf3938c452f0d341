//! Bounded admission, shared by both tasks' queues (the embeddings batcher and the
//! text-generation scheduler): the count of requests waiting (bounded by `max_queue`, mirrored in the queue-depth gauges), and the
//! total admitted since start that the drain log reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The queue's consumer is gone: the worker is shutting down.
    #[error("the worker is shutting down")]
    Draining,
}

/// A cloneable view of one queue's admission; every clone sees the same counts.
#[derive(Clone)]
pub struct Admission {
    waiting: Arc<AtomicUsize>,
    admitted_total: Arc<AtomicUsize>,
    max_queue: usize,
    /// Gauges that show the waiting count (queue depth; waiting sequences).
    gauges: Arc<[Gauge]>,
}

impl Admission {
    /// Nothing waiting; each of `gauges` follows the waiting count.
    pub fn new(max_queue: usize, gauges: impl IntoIterator<Item = Gauge>) -> Self {
        Admission {
            waiting: Arc::new(AtomicUsize::new(0)),
            admitted_total: Arc::new(AtomicUsize::new(0)),
            max_queue,
            gauges: gauges.into_iter().collect(),
        }
    }

    /// Takes a waiting slot, or says why there is none. A taken slot is returned by
    /// [`Admission::dequeued`] once the request leaves the queue, or by
    /// [`Admission::unreserve`] if it never reached it.
    pub fn reserve(&self) -> Result<(), Refusal> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_queue).then_some(n + 1)
            })
            .map_err(Refusal::QueueFull)?;
        self.gauges.iter().for_each(|g| {
            g.inc();
        });
        Ok(())
    }

    /// Returns a slot whose request could not be queued.
    pub fn unreserve(&self) {
        self.dequeued();
    }

    /// Counts a reserved request that reached the queue.
    pub fn admitted(&self) {
        self.admitted_total.fetch_add(1, Ordering::SeqCst);
    }

    /// A queued request left the queue: taken into a batch, cancelled or expired.
    pub fn dequeued(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.gauges.iter().for_each(|g| {
            g.dec();
        });
    }

    /// Requests admitted since start.
    pub fn admitted_total(&self) -> usize {
        self.admitted_total.load(Ordering::SeqCst)
    }

    /// Requests admitted and waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_is_bounded_and_counted() {
        let depth = Gauge::default();
        let a = Admission::new(2, [depth.clone()]);
        assert_eq!(a.reserve(), Ok(()));
        a.admitted();
        assert_eq!(a.reserve(), Ok(()));
        assert_eq!(a.reserve(), Err(Refusal::QueueFull(2)));
        assert_eq!((a.waiting(), depth.get()), (2, 2));
        a.unreserve(); // the second never reached the queue
        assert_eq!((a.waiting(), a.admitted_total(), depth.get()), (1, 1, 1));
        assert_eq!(a.clone().waiting(), 1, "clones share the counts");
        a.dequeued();
        assert_eq!((a.waiting(), depth.get()), (0, 0));
    }
}
