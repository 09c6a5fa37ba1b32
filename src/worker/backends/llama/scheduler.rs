//! The scheduler of one llama.cpp model: continuous batching over sequence slots, the
//! prefix cache, and the bounded wait queue.
//!
//! One dedicated thread owns the model's single `LlamaContext` (`parallel` sequences, the KV
//! cache split evenly among them) and runs the loop:
//!
//! 1. **Admit.** Requests wait in a FIFO queue ([`Scheduler::submit`]). Each step, waiting
//!    requests whose client is gone are dropped, those that waited past `queue_timeout` are
//!    answered [`BackendError::Overloaded`], and the others take free slots in order. A
//!    request takes the free slot whose cached tokens share the longest prefix with its
//!    prompt (the least recently used one when none shares anything): the KV cells of that
//!    prefix are kept, the rest of the slot's cells are removed, and only the new tokens are
//!    decoded (llama-server's `cache_prompt`). At least the prompt's last token is always
//!    decoded again, for its logits. A full queue refuses a request at once (`submit`).
//! 2. **Batch.** One `llama_batch` holds every generating sequence's next token, then prompt
//!    chunks of the sequences still reading their prompt (oldest admission first) up to
//!    `n_batch` tokens in all, so running streams keep flowing while a long prompt is read.
//! 3. **Decode** once for the whole batch.
//! 4. **Sample** each sequence whose logits were produced with its own sampler chain
//!    (penalties, grammar, temperature, top-k/top-p, seed), check the stop strings and the
//!    length limit, and send its text (and log-probabilities) to its client through an
//!    unbounded channel, so a slow client never stalls the others.
//!
//! A sequence whose client has gone (its receiver dropped) leaves its slot at the next
//! step. A finished or cancelled sequence's slot is free at once; its KV cells stay, with
//! the tokens they hold, as the prefix cache until the slot is taken by another request
//! (with the per-slot split no other sequence could use those cells anyway).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use tokio::sync::mpsc;

use super::super::{
    BackendError, EngineStatus, FinishReason, GenerateEvent, GenerateParams, TokenLogprob, Usage,
};
use super::sampling::{
    build_sampler, effective_temperature, grammar_sampler, sample_with_grammar, token_logprob,
};
use super::text::{StopMatcher, Utf8Stream};
use super::{CONTEXT_CREATION, Inner, llama_runtime};

/// Where a sequence's events go.
pub(super) type Events = mpsc::UnboundedSender<Result<GenerateEvent, BackendError>>;

/// Seconds an overloaded client is told to wait before trying again.
const RETRY_AFTER_SECS: u32 = 1;

/// A prepared request waiting for a slot.
pub(super) struct Job {
    /// The prompt's tokens (fits the slot's window with room for one generated token).
    pub tokens: Vec<LlamaToken>,
    /// Sampling parameters (messages and prompt already consumed).
    pub params: GenerateParams,
    /// Most tokens to generate (the request's limit, capped by the slot's room).
    pub max_new: usize,
    pub tx: Events,
    pub enqueued: Instant,
}

/// The scheduler's settings.
#[derive(Debug, Clone)]
pub(super) struct SchedulerConfig {
    pub parallel: usize,
    pub slot_ctx: u32,
    pub n_batch: u32,
    pub n_threads: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
}

/// State shared by the submitters and the scheduler thread.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the idle scheduler thread (a request arrived, or shutdown).
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Job>,
    /// Slots holding a sequence (updated as soon as a slot is taken or freed).
    busy: usize,
    /// Idle slots holding cached tokens, and how many tokens they hold.
    cached_slots: usize,
    cached_tokens: usize,
    /// Counters since load.
    generated: u64,
    prompt_tokens: u64,
    reused_tokens: u64,
    /// Set when the last handle is dropped: finish the work, then end the thread.
    shutdown: bool,
}

/// Handle of a model's scheduler thread.
pub(super) struct Scheduler {
    shared: Arc<Shared>,
    cfg: SchedulerConfig,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    /// Creates the model's context on a new thread and starts the loop there. Fails (with
    /// llama.cpp's reason) when the context cannot be created.
    pub fn start(inner: Arc<Inner>, cfg: SchedulerConfig) -> Result<Scheduler, String> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (thread_shared, thread_cfg) = (shared.clone(), cfg.clone());
        std::thread::Builder::new()
            .name("llama-scheduler".into())
            .spawn(move || run(inner, thread_shared, thread_cfg, ready_tx))
            .map_err(|e| format!("cannot spawn the scheduler thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Scheduler { shared, cfg }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the scheduler thread ended while creating its context".into()),
        }
    }

    /// Queues a job, or refuses it as overloaded when every slot is taken and
    /// `max_queue` requests already wait.
    pub fn submit(&self, job: Job) -> Result<(), BackendError> {
        let mut q = lock(&self.shared.queue);
        let free = self.cfg.parallel.saturating_sub(q.busy);
        if q.waiting.len() >= self.cfg.max_queue + free {
            return Err(BackendError::Overloaded {
                message: format!(
                    "all {} sequence slots are busy and {} requests are already waiting \
                     (--max_queue {}); try again shortly or another instance",
                    self.cfg.parallel,
                    q.waiting.len(),
                    self.cfg.max_queue
                ),
                retry_after_secs: RETRY_AFTER_SECS,
            });
        }
        q.waiting.push_back(job);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Slot and queue usage now.
    pub fn status(&self) -> EngineStatus {
        let q = lock(&self.shared.queue);
        EngineStatus {
            slots: self.cfg.parallel,
            busy: q.busy,
            queued: q.waiting.len(),
            max_queue: self.cfg.max_queue,
            slot_context: self.cfg.slot_ctx as usize,
            cached_slots: q.cached_slots,
            cached_tokens: q.cached_tokens,
            generated_tokens: q.generated,
            prompt_tokens: q.prompt_tokens,
            reused_prompt_tokens: q.reused_tokens,
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
    }
}

/// The scheduler thread: creates the context, reports whether that worked, runs the loop.
fn run(
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    cfg: SchedulerConfig,
    ready: std::sync::mpsc::SyncSender<Result<(), String>>,
) {
    let threads = cfg.n_threads as i32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(cfg.slot_ctx * cfg.parallel as u32))
        .with_n_batch(cfg.n_batch)
        .with_n_ubatch(cfg.n_batch)
        .with_n_seq_max(cfg.parallel as u32)
        .with_kv_unified(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = llama_runtime().map_err(|e| e.to_string()).and_then(|rt| {
        let _lock = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .model
            .new_context(rt, params)
            .map_err(|e| format!("cannot create the llama.cpp context: {e}"))
    });
    let ctx = match ctx {
        Ok(ctx) => {
            let _ = ready.send(Ok(()));
            ctx
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut engine = Engine {
        inner: &inner,
        shared: &shared,
        ctx,
        batch: LlamaBatch::new(cfg.n_batch as usize, cfg.parallel as i32),
        slots: (0..cfg.parallel)
            .map(|i| Slot {
                seq: i as i32,
                cached: Vec::new(),
                last_used: 0,
                seq_state: None,
            })
            .collect(),
        cfg,
        step: 0,
        admissions: 0,
        generated: 0,
        prompt_tokens: 0,
        reused_tokens: 0,
    };
    engine.run();
}

/// One sequence slot.
struct Slot {
    seq: i32,
    /// The tokens whose KV cells sequence `seq` holds: `cached[i]` at position `i`.
    cached: Vec<LlamaToken>,
    /// Step of the last admission (least recently used slots are reused first).
    last_used: u64,
    seq_state: Option<Sequence>,
}

/// A request running in a slot.
struct Sequence {
    job: Job,
    /// Admission order (prompt chunks go oldest first).
    admitted: u64,
    /// Index of the next prompt token to decode.
    next: usize,
    /// Prompt tokens found in the prefix cache.
    reused: usize,
    sampler: LlamaSampler,
    /// With a grammar, tokens are sampled by hand into this reused buffer.
    candidates: Option<Vec<LlamaTokenData>>,
    temperature: f32,
    top_logprobs: Option<usize>,
    /// The token sampled last, to decode in the next step.
    to_feed: Option<LlamaToken>,
    /// Prompt tokens put in the current batch.
    feeding: usize,
    /// Index of this sequence's logits in the current batch.
    logits_at: Option<i32>,
    utf8: Utf8Stream,
    stops: StopMatcher,
    /// Log-probabilities of tokens whose text has not been sent yet.
    pending: Vec<TokenLogprob>,
    completion: usize,
    started: Instant,
    first_token: Option<Instant>,
}

struct Engine<'a> {
    inner: &'a Inner,
    shared: &'a Shared,
    ctx: LlamaContext<'a>,
    batch: LlamaBatch<'a>,
    slots: Vec<Slot>,
    cfg: SchedulerConfig,
    step: u64,
    admissions: u64,
    generated: u64,
    prompt_tokens: u64,
    reused_tokens: u64,
}

/// How a sequence ended.
enum End {
    Finished(FinishReason),
    /// The client went away: nothing more to send.
    Gone,
    Failed(BackendError),
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Engine<'_> {
    fn run(&mut self) {
        while self.admit() {
            self.drop_gone();
            if self.slots.iter().all(|s| s.seq_state.is_none()) {
                continue;
            }
            self.step += 1;
            match self.fill_batch() {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    self.fail_batch(e);
                    continue;
                }
            }
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                self.fail_batch(BackendError::internal(format!(
                    "llama.cpp decode failed: {e}"
                )));
                continue;
            }
            self.after_decode();
        }
    }

    /// Publishes the counters, drops and expires waiting requests, admits requests into
    /// free slots. Blocks while there is nothing to do. `false`: shut down and idle.
    fn admit(&mut self) -> bool {
        let shared = self.shared;
        let mut q = lock(&shared.queue);
        loop {
            let now = Instant::now();
            let timeout = self.cfg.queue_timeout;
            let parallel = self.cfg.parallel;
            q.waiting.retain(|j| {
                if j.tx.is_closed() {
                    return false;
                }
                if now.duration_since(j.enqueued) >= timeout {
                    let _ = j.tx.send(Err(BackendError::Overloaded {
                        message: format!(
                            "no sequence slot came free within the queue timeout \
                             ({:.1} s, --queue_timeout); all {parallel} slots are busy",
                            timeout.as_secs_f64()
                        ),
                        retry_after_secs: RETRY_AFTER_SECS,
                    }));
                    return false;
                }
                true
            });
            while !q.waiting.is_empty() {
                let Some(slot) = self.pick_slot(&q.waiting[0].tokens) else {
                    break;
                };
                let job = q.waiting.pop_front().expect("not empty");
                self.start(slot, job);
            }
            self.publish(&mut q);
            if q.busy > 0 {
                return true;
            }
            if q.shutdown && q.waiting.is_empty() {
                return false;
            }
            // Idle: every slot is free, so the queue is empty too.
            q = shared
                .wake
                .wait_timeout(q, Duration::from_secs(60))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn publish(&self, q: &mut Queue) {
        q.busy = self.slots.iter().filter(|s| s.seq_state.is_some()).count();
        let idle_cached = self
            .slots
            .iter()
            .filter(|s| s.seq_state.is_none() && !s.cached.is_empty());
        q.cached_slots = idle_cached.clone().count();
        q.cached_tokens = idle_cached.map(|s| s.cached.len()).sum();
        q.generated = self.generated;
        q.prompt_tokens = self.prompt_tokens;
        q.reused_tokens = self.reused_tokens;
    }

    /// The free slot for a prompt: the longest cached prefix, then the least recently used.
    fn pick_slot(&self, prompt: &[LlamaToken]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq_state.is_none())
            .max_by_key(|(_, s)| (common_prefix(&s.cached, prompt), u64::MAX - s.last_used))
            .map(|(i, _)| i)
    }

    /// Puts `job` in slot `i`: keeps the cached prefix, builds the sampler chain.
    fn start(&mut self, i: usize, job: Job) {
        let n_prompt = job.tokens.len();
        let slot = &mut self.slots[i];
        // At least the last prompt token is decoded again, for its logits.
        let mut keep = common_prefix(&slot.cached, &job.tokens).min(n_prompt - 1);
        if keep < slot.cached.len() {
            let removed = self
                .ctx
                .clear_kv_cache_seq(Some(slot.seq as u32), Some(keep as u32), None)
                .unwrap_or(false);
            if !removed {
                // A model whose cache cannot drop a tail (recurrent state): start over.
                let _ = self
                    .ctx
                    .clear_kv_cache_seq(Some(slot.seq as u32), None, None);
                keep = 0;
            }
            slot.cached.truncate(keep);
        }
        let params = &job.params;
        let grammar = match params.grammar.as_deref() {
            None => None,
            Some(g) => match grammar_sampler(&self.inner.model, g) {
                Ok(s) => Some(s),
                Err(e) => {
                    let _ = job.tx.send(Err(e));
                    return;
                }
            },
        };
        let candidates = grammar.is_some().then(Vec::new);
        let sampler = build_sampler(
            params,
            grammar,
            self.inner.model.n_vocab(),
            self.cfg.slot_ctx,
        );
        self.admissions += 1;
        self.prompt_tokens += n_prompt as u64;
        self.reused_tokens += keep as u64;
        slot.last_used = self.step;
        slot.seq_state = Some(Sequence {
            temperature: effective_temperature(params),
            top_logprobs: params.logprobs.map(usize::from),
            stops: StopMatcher::new(&params.stop),
            admitted: self.admissions,
            next: keep,
            reused: keep,
            sampler,
            candidates,
            to_feed: None,
            feeding: 0,
            logits_at: None,
            utf8: Utf8Stream::default(),
            pending: Vec::new(),
            completion: 0,
            started: job.enqueued,
            first_token: None,
            job,
        });
    }

    /// Frees the slots of sequences whose client has gone.
    fn drop_gone(&mut self) {
        let mut freed = false;
        for slot in &mut self.slots {
            if slot
                .seq_state
                .as_ref()
                .is_some_and(|s| s.job.tx.is_closed())
            {
                slot.seq_state = None;
                freed = true;
            }
        }
        if freed {
            self.publish_busy();
        }
    }

    /// Tells submitters at once how many slots are taken. Called whenever a slot is freed,
    /// before the sequence's last event is sent: a client that sends its next request as
    /// soon as it has the answer must find the slot free, not be refused as overloaded.
    fn publish_busy(&self) {
        lock(&self.shared.queue).busy = self.slots.iter().filter(|s| s.seq_state.is_some()).count();
    }

    /// Fills the batch: generating sequences' next tokens, then prompt chunks within
    /// `n_batch`. `Ok(false)` when there is nothing to decode.
    fn fill_batch(&mut self) -> Result<bool, BackendError> {
        let batch_err = |e: llama_cpp_2::llama_batch::BatchAddError| {
            BackendError::internal(format!("llama.cpp batch error: {e}"))
        };
        self.batch.clear();
        let mut budget = self.cfg.n_batch as usize;
        for slot in &mut self.slots {
            let Some(s) = slot.seq_state.as_mut() else {
                continue;
            };
            s.feeding = 0;
            s.logits_at = None;
            if let Some(t) = s.to_feed {
                self.batch
                    .add(t, slot.cached.len() as i32, &[slot.seq], true)
                    .map_err(batch_err)?;
                s.logits_at = Some(self.batch.n_tokens() - 1);
                budget -= 1;
            }
        }
        let mut reading: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s_ = s.seq_state.as_ref()?;
                (s_.to_feed.is_none() && s_.next < s_.job.tokens.len()).then_some((s_.admitted, i))
            })
            .collect();
        reading.sort_unstable();
        for (_, i) in reading {
            if budget == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let s = slot.seq_state.as_mut().expect("reading");
            let n_prompt = s.job.tokens.len();
            let take = budget.min(n_prompt - s.next);
            let base = slot.cached.len();
            for k in 0..take {
                let idx = s.next + k;
                let last = idx + 1 == n_prompt;
                self.batch
                    .add(s.job.tokens[idx], (base + k) as i32, &[slot.seq], last)
                    .map_err(batch_err)?;
                if last {
                    s.logits_at = Some(self.batch.n_tokens() - 1);
                }
            }
            s.feeding = take;
            budget -= take;
        }
        Ok(self.batch.n_tokens() > 0)
    }

    /// Ends every sequence in the failed batch with `e` and drops their cells.
    fn fail_batch(&mut self, e: BackendError) {
        tracing::error!(error = %e, "llama.cpp step failed; its sequences end with an error");
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.seq_state.is_some() {
                let seq = slot.seq as u32;
                let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
                self.slots[i].cached.clear();
                self.finish(i, End::Failed(e.clone()));
            }
        }
    }

    /// Records what the batch put into each sequence's cells, then samples.
    fn after_decode(&mut self) {
        for slot in &mut self.slots {
            let Some(s) = slot.seq_state.as_mut() else {
                continue;
            };
            if s.logits_at.is_some()
                && let Some(t) = s.to_feed.take()
            {
                slot.cached.push(t);
            }
            if s.feeding > 0 {
                slot.cached
                    .extend_from_slice(&s.job.tokens[s.next..s.next + s.feeding]);
                s.next += s.feeding;
                s.feeding = 0;
            }
        }
        for i in 0..self.slots.len() {
            let Some(idx) = self.slots[i].seq_state.as_ref().and_then(|s| s.logits_at) else {
                continue;
            };
            if let Some(end) = self.sample(i, idx) {
                self.finish(i, end);
            }
        }
    }

    /// Samples slot `i`'s next token from the logits at batch index `idx` and sends its
    /// text; `Some` when the sequence ends.
    fn sample(&mut self, i: usize, idx: i32) -> Option<End> {
        let vocab = self.inner.model.vocab();
        let ctx = &self.ctx;
        let s = self.slots[i].seq_state.as_mut().expect("sampled slot runs");
        let token = match s.candidates.as_mut() {
            None => s.sampler.sample(ctx, idx),
            Some(buf) => match sample_with_grammar(&mut s.sampler, ctx.get_logits_ith(idx), buf) {
                Ok(t) => t,
                Err(e) => return Some(End::Failed(e)),
            },
        };
        s.first_token.get_or_insert_with(Instant::now);
        if vocab.is_eog(token) {
            return Some(End::Finished(FinishReason::Stop));
        }
        s.completion += 1;
        self.generated += 1;
        let piece = vocab.token_to_piece(token, false, None);
        if let Some(k) = s.top_logprobs {
            let logits = ctx.get_logits_ith(idx);
            s.pending.push(token_logprob(
                &vocab,
                logits,
                token,
                &piece,
                s.temperature,
                k,
            ));
        }
        let text = s.utf8.push(&piece);
        let (emit, stopped) = s.stops.push(&text);
        if !send(&s.job.tx, emit, &mut s.pending) {
            return Some(End::Gone);
        }
        if stopped {
            return Some(End::Finished(FinishReason::Stop));
        }
        if s.completion >= s.job.max_new {
            return Some(End::Finished(FinishReason::Length));
        }
        s.to_feed = Some(token);
        None
    }

    /// Ends slot `i`'s sequence: flushes held text, sends the finish (or the error), frees
    /// the slot (its cells stay as the prefix cache).
    fn finish(&mut self, i: usize, end: End) {
        let Some(mut s) = self.slots[i].seq_state.take() else {
            return;
        };
        self.publish_busy();
        let reason = match end {
            End::Gone => return,
            End::Failed(e) => {
                let _ = s.job.tx.send(Err(e));
                return;
            }
            End::Finished(r) => r,
        };
        if !s.stops.stopped {
            // Flush what was held back (incomplete UTF-8, possible stop prefix).
            let tail = s.utf8.finish();
            let (mut emit, stopped) = s.stops.push(&tail);
            if !stopped {
                emit.push_str(&s.stops.flush());
            }
            if !send(&s.job.tx, emit, &mut s.pending) {
                return;
            }
        }
        let n_prompt = s.job.tokens.len();
        let now = Instant::now();
        tracing::debug!(
            slot = i,
            prompt_tokens = n_prompt,
            cached_tokens = s.reused,
            completion_tokens = s.completion,
            ttft_ms = s.first_token.map(|t| (t - s.started).as_secs_f64() * 1e3),
            decode_tok_s = s.first_token.map(|t| s.completion as f64 / (now - t).as_secs_f64().max(1e-9)),
            finish_reason = %reason,
            "generation finished"
        );
        let _ = s.job.tx.send(Ok(GenerateEvent::Finish {
            finish_reason: reason,
            usage: Some(
                Usage::new(n_prompt as u32, s.completion as u32).with_cached(s.reused as u32),
            ),
        }));
    }
}

/// Sends `text` (after the log-probabilities of its tokens); `false` when the client has
/// gone. Empty text sends nothing.
fn send(tx: &Events, text: String, pending: &mut Vec<TokenLogprob>) -> bool {
    if text.is_empty() {
        return !tx.is_closed();
    }
    if !pending.is_empty() {
        let tokens = std::mem::take(pending);
        if tx.send(Ok(GenerateEvent::Logprobs { tokens })).is_err() {
            return false;
        }
    }
    tx.send(Ok(GenerateEvent::Delta { text })).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        let t = |v: &[i32]| v.iter().map(|&i| LlamaToken(i)).collect::<Vec<_>>();
        assert_eq!(common_prefix(&t(&[1, 2, 3]), &t(&[1, 2, 4])), 2);
        assert_eq!(common_prefix(&t(&[]), &t(&[1])), 0);
        assert_eq!(common_prefix(&t(&[1, 2]), &t(&[1, 2, 3])), 2);
        assert_eq!(common_prefix(&t(&[5]), &t(&[1])), 0);
    }
}
