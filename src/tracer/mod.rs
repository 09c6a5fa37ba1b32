//! DB-GPT's tracer file: spans as JSON lines in `LOGDIR/dbgpt_model_<service>_tracer.jsonl`,
//! byte-compatible with what DB-GPT's `dbgpt/util/tracer` writes, so `dbgpt trace
//! list/tree/chat` read ours. This module owns the span ids and their propagation (the
//! `DB-GPT-Trace-Span-Id: <trace_id>:<span_id>` header and a task-local "current span"),
//! the line format (`json.dumps` spacing, local times with milliseconds, each span written
//! at its start with `end_time: null` and again at its end), the per-request root-span
//! middleware, and the writer: request tasks only format a line into a shared in-memory
//! buffer under a short mutex (no I/O, no allocation once the buffer has grown); one
//! background thread writes the buffer every [`FLUSH_INTERVAL`] or [`FLUSH_LINES`] lines
//! and on [`Flusher::finish`] (the services' graceful stop), renames the file to
//! `<prefix>_YYYY-MM-DD<ext>` when the local date changes, and, if the file cannot be
//! written, logs one warning and drops spans instead of holding up a request.
//!
//! [`Tracer`] and [`Span`] live here, with the buffer they share with the writer; the
//! parts are `ids` (span ids), `format` (the line), `writer` (the thread and the file)
//! and `middleware` (root spans and the current span). Every public item is
//! reachable as `crate::tracer::…`.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::HeaderName;
use tracing::{info, warn};

use crate::wire::controller::{LocalOffsets, Timestamp};

mod format;
mod ids;
mod middleware;
mod writer;

pub use format::{Meta, py_json};
pub use ids::SpanCtx;
pub use middleware::{
    POLL_HEADER, RequestSpans, RequestSpansService, current, root_span, with_request_middleware,
};
pub use writer::Flusher;

use format::write_line;
use writer::{FileSink, write_loop};

/// The header that carries `<trace_id>:<span_id>` of the caller's span (DB-GPT's
/// `DBGPT_TRACER_SPAN_ID`).
pub static TRACE_HEADER: HeaderName = HeaderName::from_static("db-gpt-trace-span-id");

/// Root operation names (DB-GPT's `root_operation_name` defaults).
pub const CONTROLLER_ROOT: &str = "DB-GPT-ModelController";
pub const WORKER_ROOT: &str = "DB-GPT-ModelWorker";
pub const APISERVER_ROOT: &str = "DB-GPT-APIServer";

/// Default file names inside the log directory (DB-GPT's `tracer_file` defaults).
pub const CONTROLLER_FILE: &str = "dbgpt_model_controller_tracer.jsonl";
pub const WORKER_FILE: &str = "dbgpt_model_worker_manager_tracer.jsonl";
pub const APISERVER_FILE: &str = "dbgpt_model_apiserver_tracer.jsonl";

/// The writer wakes at least this often (DB-GPT: 10 s; sooner here, so `tail -f` and
/// `dbgpt trace` see a request within a second)…
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// …or as soon as this many lines are waiting (DB-GPT: 10). Waking the writer costs a
/// futex wake and a context switch, ~10–20 µs of CPU in a VM: every 10 lines that was
/// 4–8 µs per apiserver request (4 lines each); every 256 lines it is noise.
pub const FLUSH_LINES: usize = 256;
/// Above this much unwritten text (a stuck disk), new lines are dropped and counted.
const MAX_PENDING_BYTES: usize = 16 << 20;

struct Pending {
    buf: Vec<u8>,
    lines: usize,
    dropped: u64,
    offsets: LocalOffsets,
    closed: bool,
}

struct Shared {
    root_name: Box<str>,
    batch: usize,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Lines that never reached the file: dropped above [`MAX_PENDING_BYTES`], or written
    /// while the file could not be.
    lost: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Formats one line into the buffer; never does I/O.
    fn append(&self, s: &Live, end: Option<Timestamp>) {
        let op: &str = match s.op {
            Some(op) => op,
            None => &self.root_name,
        };
        let mut p = self.lock();
        if p.closed {
            return;
        }
        if p.buf.len() >= MAX_PENDING_BYTES {
            p.dropped += 1;
            return;
        }
        let Pending { buf, offsets, .. } = &mut *p;
        write_line(
            buf,
            offsets,
            &s.ctx,
            s.parent.as_ref(),
            op,
            s.start,
            end,
            &s.meta,
        );
        p.lines += 1;
        let wake = p.lines == self.batch;
        drop(p);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// Where spans go: a cheap handle (clone freely) to one process's tracer file, or a no-op.
#[derive(Clone, Default)]
pub struct Tracer {
    shared: Option<Arc<Shared>>,
}

struct Live {
    shared: Arc<Shared>,
    ctx: SpanCtx,
    parent: Option<SpanCtx>,
    /// `None`: the root operation name.
    op: Option<&'static str>,
    start: Timestamp,
    meta: Meta,
}

/// An open span: its start line is written; its end line is written when it is dropped
/// (or [`Span::end`]ed), whichever way the request finishes.
#[must_use = "a span ends when it is dropped"]
pub struct Span {
    live: Option<Live>,
}

impl Span {
    /// The span's ids, to pass on as a parent (`None` when tracing is off).
    pub fn ctx(&self) -> Option<SpanCtx> {
        self.live.as_ref().map(|l| l.ctx)
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(l) = self.live.take() {
            l.shared.append(&l, Some(Timestamp::now()));
        }
    }
}

impl Tracer {
    /// Tracing off: every span is a no-op.
    pub fn disabled() -> Self {
        Tracer { shared: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// How many span lines never reached the file (see `Shared::lost`).
    #[cfg(test)]
    fn lost_lines(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.lost.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Starts writing spans to `file` (`None`: tracing off). Never fails: a file that
    /// cannot be created is reported once and retried on every flush.
    pub fn open(file: Option<&Path>, root_name: &str) -> (Tracer, Flusher) {
        match file {
            None => (Tracer::disabled(), Flusher { inner: None }),
            Some(f) => Self::open_with(f, root_name, FLUSH_INTERVAL, FLUSH_LINES),
        }
    }

    fn open_with(
        file: &Path,
        root_name: &str,
        interval: Duration,
        batch: usize,
    ) -> (Tracer, Flusher) {
        let shared = Arc::new(Shared {
            root_name: root_name.into(),
            batch: batch.max(1),
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(16 << 10),
                lines: 0,
                dropped: 0,
                offsets: LocalOffsets::default(),
                closed: false,
            }),
            wake: Condvar::new(),
            lost: AtomicU64::new(0),
        });
        info!(file = %file.display(), "writing spans to the tracer file");
        let mut sink = FileSink::new(file.to_path_buf());
        // Create the file (and its directory) now, as DB-GPT does, so a problem shows in
        // the start-up log rather than at the first flush.
        sink.ensure_open();
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dbgpt-tracer".into())
            .spawn(move || write_loop(s2, sink, interval));
        match thread {
            Ok(t) => (
                Tracer {
                    shared: Some(shared.clone()),
                },
                Flusher {
                    inner: Some((shared, t)),
                },
            ),
            Err(e) => {
                warn!(error = %e, "cannot start the tracer thread: tracing is off");
                (Tracer::disabled(), Flusher { inner: None })
            }
        }
    }

    fn begin(&self, op: Option<&'static str>, parent: Option<SpanCtx>, meta: Meta) -> Span {
        let Some(shared) = &self.shared else {
            return Span { live: None };
        };
        let ctx = match &parent {
            Some(p) => SpanCtx::child_of(p),
            None => SpanCtx::new_trace(),
        };
        let live = Live {
            shared: shared.clone(),
            ctx,
            parent,
            op,
            start: Timestamp::now(),
            meta,
        };
        shared.append(&live, None);
        Span { live: Some(live) }
    }

    /// A request's root span (the root operation name), continuing `parent`'s trace.
    pub fn root(&self, parent: Option<SpanCtx>, meta: Meta) -> Span {
        self.begin(None, parent, meta)
    }

    /// A span without metadata.
    pub fn start(&self, op: &'static str, parent: Option<SpanCtx>) -> Span {
        self.begin(Some(op), parent, Meta::None)
    }

    /// A span whose metadata is built only when tracing is on.
    pub fn start_with(
        &self,
        op: &'static str,
        parent: Option<SpanCtx>,
        meta: impl FnOnce() -> Meta,
    ) -> Span {
        if self.shared.is_none() {
            return Span { live: None };
        }
        self.begin(Some(op), parent, meta())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_tracer_is_a_no_op() {
        let t = Tracer::disabled();
        let s = t.start_with("x", None, || panic!("metadata is not built when off"));
        assert!(s.ctx().is_none());
        let (t, f) = Tracer::open(None, "Root");
        assert!(!t.is_enabled());
        drop(f);
    }
}
