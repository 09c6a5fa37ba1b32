//! Dynamic batching for the encoder models (embeddings, cross-encoders): concurrent
//! requests to one model are merged into one padded forward pass and answered separately.
//!
//! Each model gets one thread (the only one that runs its forward passes) fed by a
//! channel of jobs; a job is one request's items (texts, or query/document pairs) and the
//! sender of its answer. The thread takes the first job, gathers whatever else is queued,
//! and — when the previous pass served more than one request, i.e. under concurrent load —
//! waits up to [`BatchConfig::max_wait`] for more until [`BatchConfig::max_batch`] items
//! are queued. It then fills one batch of at most `max_batch` items round-robin over the
//! queued jobs (one item of each in turn, oldest job first), so a request of thousands of
//! texts advances by sub-batches without starving the single-text requests that arrive
//! behind it, runs [`BatchModel::run`] on it, files each output under its job and answers
//! every job that is complete. A lone client never waits: after a single-request pass the
//! next one starts at once with what is queued.
//!
//! A job whose caller went away (its future dropped) is skipped before the next pass; a
//! failing pass fails the jobs that had items in it, and only them. The thread ends when
//! the model is dropped (the last sender goes).
//!
//! [`Lanes`] runs several such batchers of one model side by side ([`BatchConfig::threads`]
//! of them, sharing the weights), each pass on one thread: a request goes to the lane with
//! the fewest items outstanding, so concurrent requests keep every lane's thread busy with
//! a pass of its own instead of splitting each small pass over threads that wait for each
//! other.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::BackendError;

/// How requests are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Items (texts, pairs) per forward pass at most.
    pub max_batch: usize,
    /// How long a pass waits for more requests under concurrent load.
    pub max_wait: Duration,
    /// Forward passes that run at once, each on its own thread ([`Lanes`]).
    pub threads: usize,
}

impl BatchConfig {
    /// Default items per forward pass.
    pub const DEFAULT_MAX_BATCH: usize = 32;
    /// Default wait for more requests, in milliseconds.
    pub const DEFAULT_MAX_WAIT_MS: u64 = 2;
    /// The default [`BatchConfig::threads`] is the CPU count up to this many.
    pub const MAX_DEFAULT_THREADS: usize = 4;

    /// The default [`BatchConfig::threads`]: the CPU count, at most
    /// [`BatchConfig::MAX_DEFAULT_THREADS`].
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, Self::MAX_DEFAULT_THREADS)
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: Self::DEFAULT_MAX_BATCH,
            max_wait: Duration::from_millis(Self::DEFAULT_MAX_WAIT_MS),
            threads: Self::default_threads(),
        }
    }
}

/// A model that answers a batch of items in one pass.
pub(crate) trait BatchModel: Send + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;
    /// One output per item, in order.
    fn run(&self, items: &[&Self::Item]) -> Result<Vec<Self::Output>, BackendError>;
}

type Answer<O> = oneshot::Sender<Result<Vec<O>, BackendError>>;

struct Job<M: BatchModel> {
    items: Vec<M::Item>,
    outputs: Vec<Option<M::Output>>,
    /// Items handed to a pass so far (the first `scheduled` items).
    scheduled: usize,
    /// Outputs filed so far.
    filled: usize,
    answer: Answer<M::Output>,
}

/// The sending end of a model's batching thread. Dropping it ends the thread.
pub(crate) struct Batcher<M: BatchModel> {
    jobs: mpsc::Sender<Job<M>>,
}

impl<M: BatchModel> Batcher<M> {
    /// Starts the thread `name` running `model`.
    pub fn start(model: M, config: BatchConfig, name: &str) -> Result<Self, BackendError> {
        let (tx, rx) = mpsc::channel();
        let config = BatchConfig {
            max_batch: config.max_batch.max(1),
            ..config
        };
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run_loop(model, config, rx))
            .map_err(|e| {
                BackendError::internal(format!("cannot start the batching thread: {e}"))
            })?;
        Ok(Batcher { jobs: tx })
    }

    /// Queues `items` and answers their outputs, in order. Dropping the future withdraws
    /// the items not yet in a pass.
    pub fn submit(
        &self,
        items: Vec<M::Item>,
    ) -> impl std::future::Future<Output = Result<Vec<M::Output>, BackendError>> + Send + 'static
    {
        let (answer, answered) = oneshot::channel();
        let queued = if items.is_empty() {
            let _ = answer.send(Ok(Vec::new()));
            Ok(())
        } else {
            let n = items.len();
            self.jobs
                .send(Job {
                    items,
                    outputs: (0..n).map(|_| None).collect(),
                    scheduled: 0,
                    filled: 0,
                    answer,
                })
                .map_err(|_| ())
        };
        async move {
            queued
                .map_err(|()| BackendError::internal("the model's batching thread has stopped"))?;
            answered
                .await
                .map_err(|_| BackendError::internal("the model's batching thread has stopped"))?
        }
    }
}

/// Several [`Batcher`]s of one model, one thread each (see the module documentation).
pub(crate) struct Lanes<M: BatchModel> {
    lanes: Vec<(Batcher<M>, Arc<AtomicUsize>)>,
}

impl<M: BatchModel> Lanes<M> {
    /// Starts [`BatchConfig::threads`] batchers (at least one), threads `name-0`, …, each
    /// running a model `make` returns (copies sharing their weights).
    pub fn start(
        config: BatchConfig,
        name: &str,
        mut make: impl FnMut() -> Result<M, BackendError>,
    ) -> Result<Self, BackendError> {
        let lanes = (0..config.threads.max(1))
            .map(|i| {
                Ok((
                    Batcher::start(make()?, config, &format!("{name}-{i}"))?,
                    Arc::new(AtomicUsize::new(0)),
                ))
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(Lanes { lanes })
    }

    /// [`Batcher::submit`] on the lane with the fewest items outstanding (the first of
    /// equals, so a lone client always uses lane 0 and its passes stay warm in one cache).
    /// A request of at least [`SPLIT_ITEMS`] items per lane is cut into one contiguous part
    /// per lane, each part going the same way, and answered in order: a lone large request
    /// uses every lane.
    pub fn submit(
        &self,
        mut items: Vec<M::Item>,
    ) -> impl std::future::Future<Output = Result<Vec<M::Output>, BackendError>> + Send + 'static
    {
        let parts = (items.len() / SPLIT_ITEMS).clamp(1, self.lanes.len());
        let size = items.len().div_ceil(parts);
        let mut answers = Vec::with_capacity(parts);
        while !items.is_empty() {
            let rest = items.split_off(size.min(items.len()));
            answers.push(self.submit_part(std::mem::replace(&mut items, rest)));
        }
        async move {
            let mut out = Vec::new();
            for part in futures::future::join_all(answers).await {
                out.extend(part?);
            }
            Ok(out)
        }
    }

    fn submit_part(
        &self,
        items: Vec<M::Item>,
    ) -> impl std::future::Future<Output = Result<Vec<M::Output>, BackendError>> + Send + 'static
    {
        let (batcher, outstanding) = self
            .lanes
            .iter()
            .min_by_key(|(_, n)| n.load(Ordering::Relaxed))
            .expect("Lanes::start refuses no lanes");
        let held = Outstanding::new(outstanding.clone(), items.len());
        let answer = batcher.submit(items);
        async move {
            let _held = held;
            answer.await
        }
    }
}

/// A request is split over the lanes only when each part gets at least this many items:
/// below it, one pass of the whole request costs less than two half passes.
pub(crate) const SPLIT_ITEMS: usize = 8;

/// A request's items counted in its lane's outstanding items until it is answered or dropped.
struct Outstanding(Arc<AtomicUsize>, usize);

impl Outstanding {
    fn new(count: Arc<AtomicUsize>, n: usize) -> Self {
        count.fetch_add(n, Ordering::Relaxed);
        Outstanding(count, n)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

fn run_loop<M: BatchModel>(model: M, config: BatchConfig, rx: mpsc::Receiver<Job<M>>) {
    let mut queue: VecDeque<Job<M>> = VecDeque::new();
    let mut last_pass_jobs = 0usize;
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
        }
        // Everything already queued, then (under load) up to `max_wait` for more.
        let mut disconnected = false;
        while let Ok(job) = rx.try_recv() {
            queue.push_back(job);
        }
        if last_pass_jobs > 1 {
            let deadline = Instant::now() + config.max_wait;
            while unscheduled(&queue) < config.max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(job) => queue.push_back(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
        }
        // Callers that went away.
        queue.retain(|j| !j.answer.is_closed());
        if queue.is_empty() {
            if disconnected {
                return;
            }
            continue;
        }
        // Round-robin fill: (job index, item index).
        let mut picked: Vec<(usize, usize)> = Vec::with_capacity(config.max_batch);
        let mut cursor: Vec<usize> = queue.iter().map(|j| j.scheduled).collect();
        'fill: loop {
            let mut took = false;
            for (ji, job) in queue.iter().enumerate() {
                if cursor[ji] < job.items.len() {
                    picked.push((ji, cursor[ji]));
                    cursor[ji] += 1;
                    took = true;
                    if picked.len() == config.max_batch {
                        break 'fill;
                    }
                }
            }
            if !took {
                break;
            }
        }
        for (job, c) in queue.iter_mut().zip(&cursor) {
            job.scheduled = *c;
        }
        last_pass_jobs = queue.iter().filter(|j| j.scheduled > j.filled).count();
        let result = {
            let items: Vec<&M::Item> = picked.iter().map(|&(j, i)| &queue[j].items[i]).collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(&items)))
                .unwrap_or_else(|_| Err(BackendError::internal("the model panicked")))
                .and_then(|out| {
                    if out.len() == items.len() {
                        Ok(out)
                    } else {
                        Err(BackendError::internal(format!(
                            "the model answered {} outputs for {} inputs",
                            out.len(),
                            items.len()
                        )))
                    }
                })
        };
        match result {
            Ok(outputs) => {
                for ((j, i), out) in picked.into_iter().zip(outputs) {
                    let job = &mut queue[j];
                    job.outputs[i] = Some(out);
                    job.filled += 1;
                }
                let mut kept = VecDeque::with_capacity(queue.len());
                for job in queue.drain(..) {
                    if job.filled == job.items.len() {
                        let outputs = job.outputs.into_iter().flatten().collect();
                        let _ = job.answer.send(Ok(outputs));
                    } else {
                        kept.push_back(job);
                    }
                }
                queue = kept;
            }
            Err(e) => {
                let mut failed = vec![false; queue.len()];
                for &(j, _) in &picked {
                    failed[j] = true;
                }
                let mut kept = VecDeque::with_capacity(queue.len());
                for (job, failed) in queue.drain(..).zip(failed) {
                    if failed {
                        let _ = job.answer.send(Err(e.clone()));
                    } else {
                        kept.push_back(job);
                    }
                }
                queue = kept;
            }
        }
        if disconnected && queue.is_empty() {
            return;
        }
    }
}

/// Items of `queue` not yet handed to a pass.
fn unscheduled<M: BatchModel>(queue: &VecDeque<Job<M>>) -> usize {
    queue.iter().map(|j| j.items.len() - j.scheduled).sum()
}

#[cfg(test)]
mod tests;
