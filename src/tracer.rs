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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use chrono::NaiveDate;
use serde::Serialize;
use tracing::{info, warn};

use crate::types::{LocalOffsets, Timestamp};

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

// ---------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------

/// Up to `N` ASCII hex digits, kept exactly as received (or generated lowercase).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Hex<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> Hex<N> {
    /// The low `4 * N` bits of `v` as `N` lowercase digits (`secrets.token_hex`).
    fn from_bits(mut v: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [b'0'; N];
        for b in buf.iter_mut().rev() {
            *b = DIGITS[(v & 0xf) as usize];
            v >>= 4;
        }
        Hex { len: N as u8, buf }
    }

    /// 1 to `N` hex digits.
    fn parse(s: &[u8]) -> Option<Self> {
        if s.is_empty() || s.len() > N || !s.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut buf = [b'0'; N];
        buf[..s.len()].copy_from_slice(s);
        Some(Hex {
            len: s.len() as u8,
            buf,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    fn is_zero(&self) -> bool {
        self.as_bytes().iter().all(|&b| b == b'0')
    }
}

/// A span's identity: DB-GPT's `trace_id` (32 hex digits) and `span_id`, which DB-GPT
/// spells `<trace_id>:<16 hex digits>`. `Copy`, no heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SpanCtx {
    trace: Hex<32>,
    span: Hex<16>,
}

impl SpanCtx {
    /// A span of a new trace.
    fn new_trace() -> Self {
        let mut trace: u128 = rand::random();
        while trace == 0 {
            trace = rand::random();
        }
        SpanCtx {
            trace: Hex::from_bits(trace),
            span: Hex::from_bits(rand::random::<u64>() as u128),
        }
    }

    /// A new span in `parent`'s trace.
    fn child_of(parent: &SpanCtx) -> Self {
        SpanCtx {
            trace: parent.trace,
            span: Hex::from_bits(rand::random::<u64>() as u128),
        }
    }

    /// Parses `<trace_id>:<span_id>` as DB-GPT accepts it (hex parts, a non-zero trace).
    /// Anything else is ignored (the request then starts a new trace).
    pub fn parse(s: &[u8]) -> Option<Self> {
        let s = s.trim_ascii();
        let colon = s.iter().position(|&b| b == b':')?;
        let trace = Hex::<32>::parse(&s[..colon])?;
        let span = Hex::<16>::parse(&s[colon + 1..])?;
        (!trace.is_zero()).then_some(SpanCtx { trace, span })
    }

    /// `<trace_id>:<span_id>` from a JSON body's `span_id` (DB-GPT's clients send it in
    /// `PromptRequest` and `EmbeddingsRequest`).
    pub fn from_body(v: &serde_json::Value) -> Option<Self> {
        v.get("span_id")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| SpanCtx::parse(s.as_bytes()))
    }

    /// The trace id.
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(self.trace.as_bytes()).unwrap_or_default()
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.trace.as_bytes());
        out.push(b':');
        out.extend_from_slice(self.span.as_bytes());
    }

    /// The value of [`TRACE_HEADER`] naming this span as the parent.
    pub fn header_value(&self) -> HeaderValue {
        let mut b = Vec::with_capacity(49);
        self.write(&mut b);
        HeaderValue::from_bytes(&b).expect("hex digits and ':' are a valid header value")
    }
}

impl std::fmt::Display for SpanCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = Vec::with_capacity(49);
        self.write(&mut b);
        f.write_str(std::str::from_utf8(&b).unwrap_or_default())
    }
}

impl std::fmt::Debug for SpanCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpanCtx({self})")
    }
}

// ---------------------------------------------------------------------------------------
// Metadata and the line format
// ---------------------------------------------------------------------------------------

/// A span's `metadata`, written identically on its start and end lines.
pub enum Meta {
    /// `null` (DB-GPT writes `null` for empty metadata).
    None,
    /// `{"path": …}` of a root span, borrowed from the route (no allocation).
    Route(MatchedPath),
    /// `{"path": …}` of a root span on a path no route matched.
    Path(String),
    /// A JSON object already rendered in `json.dumps` spacing ([`Meta::json`]).
    Json(String),
}

impl Meta {
    /// Renders `v` (a struct or map: skip `None` fields, as DB-GPT drops them).
    pub fn json<T: Serialize + ?Sized>(v: &T) -> Meta {
        Meta::Json(py_json(v))
    }

    fn write(&self, out: &mut Vec<u8>) {
        let path = match self {
            Meta::None => return out.extend_from_slice(b"null"),
            Meta::Json(s) => return out.extend_from_slice(s.as_bytes()),
            Meta::Route(m) => m.as_str(),
            Meta::Path(p) => p.as_str(),
        };
        out.extend_from_slice(b"{\"path\": ");
        write_json_str(out, path);
        out.push(b'}');
    }
}

/// serde_json with Python's `json.dumps` separators (`", "` and `": "`); strings are
/// escaped like `ensure_ascii=False` (UTF-8 as is, control characters escaped).
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `json.dumps(v, ensure_ascii=False)`.
pub fn py_json<T: Serialize + ?Sized>(v: &T) -> String {
    let mut out = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    if v.serialize(&mut ser).is_err() {
        return "null".into();
    }
    String::from_utf8(out).unwrap_or_else(|_| "null".into())
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// One line of the tracer file, in the key order of DB-GPT's `Span.to_dict()`.
#[allow(clippy::too_many_arguments)]
fn write_line(
    out: &mut Vec<u8>,
    offsets: &mut LocalOffsets,
    ctx: &SpanCtx,
    parent: Option<&SpanCtx>,
    operation: &str,
    start: Timestamp,
    end: Option<Timestamp>,
    meta: &Meta,
) {
    out.extend_from_slice(b"{\"span_type\": \"base\", \"trace_id\": \"");
    out.extend_from_slice(ctx.trace.as_bytes());
    out.extend_from_slice(b"\", \"span_id\": \"");
    ctx.write(out);
    out.extend_from_slice(b"\", \"parent_span_id\": ");
    match parent {
        None => out.extend_from_slice(b"null"),
        Some(p) => {
            out.push(b'"');
            p.write(out);
            out.push(b'"');
        }
    }
    out.extend_from_slice(b", \"operation_name\": ");
    write_json_str(out, operation);
    out.extend_from_slice(b", \"start_time\": \"");
    start.write_local_millis(out, offsets);
    out.extend_from_slice(b"\", \"end_time\": ");
    match end {
        None => out.extend_from_slice(b"null"),
        Some(t) => {
            out.push(b'"');
            t.write_local_millis(out, offsets);
            out.push(b'"');
        }
    }
    out.extend_from_slice(b", \"metadata\": ");
    meta.write(out);
    out.extend_from_slice(b"}\n");
}

// ---------------------------------------------------------------------------------------
// Tracer and spans
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------

/// The writer thread's handle: [`Flusher::finish`] writes what is buffered and stops it.
pub struct Flusher {
    inner: Option<(Arc<Shared>, JoinHandle<()>)>,
}

impl Flusher {
    /// Writes every buffered span and stops the writer (blocking; see [`Flusher::finish`]).
    pub fn close(&mut self) {
        if let Some((shared, thread)) = self.inner.take() {
            shared.lock().closed = true;
            shared.wake.notify_one();
            let _ = thread.join();
        }
    }

    /// [`Flusher::close`] off the async workers: the last step of a graceful stop.
    pub async fn finish(mut self) {
        if self.inner.is_some() {
            let _ = tokio::task::spawn_blocking(move || self.close()).await;
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(shared: Arc<Shared>, mut sink: FileSink, interval: Duration) {
    let mut batch = Vec::with_capacity(16 << 10);
    loop {
        let (closing, dropped) = {
            let mut p = shared.lock();
            let deadline = Instant::now() + interval;
            while !p.closed && p.lines < shared.batch {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                p = shared
                    .wake
                    .wait_timeout(p, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut p.buf, &mut batch);
            p.lines = 0;
            (p.closed, std::mem::take(&mut p.dropped))
        };
        sink.write(&batch, dropped, chrono::Local::now().date_naive());
        batch.clear();
        if batch.capacity() > 4 << 20 {
            batch.shrink_to(16 << 10);
        }
        if closing {
            break;
        }
    }
}

/// Python's `os.path.splitext` of the file name: `(prefix, ".ext")`; a name without an
/// extension gets DB-GPT's `.log` for its dated copies.
fn split_ext(path: &Path) -> (String, String) {
    let full = path.to_string_lossy().into_owned();
    let name_start = full.rfind('/').map_or(0, |i| i + 1);
    if let Some(dot) = full.rfind('.').filter(|&d| d > name_start)
        && full[name_start..dot].bytes().any(|b| b != b'.')
    {
        return (full[..dot].to_string(), full[dot..].to_string());
    }
    (full, ".log".into())
}

/// The file and its daily rotation; only the writer thread touches it.
struct FileSink {
    path: PathBuf,
    prefix: String,
    ext: String,
    file: Option<File>,
    date: NaiveDate,
    /// A write failed and was reported; the next success says so.
    failing: bool,
}

impl FileSink {
    fn new(path: PathBuf) -> Self {
        let (prefix, ext) = split_ext(&path);
        FileSink {
            path,
            prefix,
            ext,
            file: None,
            date: chrono::Local::now().date_naive(),
            failing: false,
        }
    }

    fn dated(&self, date: NaiveDate) -> PathBuf {
        PathBuf::from(format!(
            "{}_{}{}",
            self.prefix,
            date.format("%Y-%m-%d"),
            self.ext
        ))
    }

    fn fail(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if !self.failing {
            warn!(file = %self.path.display(), error = %e, "tracer file: {what}; spans are dropped until it works");
            self.failing = true;
        }
    }

    fn ensure_open(&mut self) -> bool {
        if self.file.is_some() {
            return true;
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = crate::daemon::ensure_private_dir(dir)
        {
            self.fail("cannot create its directory", &format!("{e:#}"));
            return false;
        }
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .create(true)
            .append(true)
            // Group-readable (the systemd units' group; their UMask=0027 keeps others out).
            .mode(0o640)
            .open(&self.path)
        {
            Ok(f) => {
                self.file = Some(f);
                true
            }
            Err(e) => {
                self.fail("cannot open it", &e);
                false
            }
        }
    }

    /// DB-GPT's roll-over: on the first write of a new local day, the file is renamed
    /// `<prefix>_<previous day><ext>` and a new one started. If that name exists (another
    /// process sharing the file renamed it first), the current file is kept.
    fn roll_over(&mut self, today: NaiveDate) {
        if today == self.date {
            return;
        }
        let dated = self.dated(self.date);
        self.file = None;
        if self.path.exists()
            && !dated.exists()
            && let Err(e) = std::fs::rename(&self.path, &dated)
        {
            warn!(file = %self.path.display(), error = %e, "cannot rename the tracer file for the new day");
        }
        self.date = today;
    }

    fn write(&mut self, batch: &[u8], dropped: u64, today: NaiveDate) {
        if dropped > 0 {
            warn!(
                dropped,
                file = %self.path.display(),
                "tracer file writes fall behind: spans dropped"
            );
        }
        self.roll_over(today);
        if !self.ensure_open() {
            return;
        }
        if batch.is_empty() {
            return;
        }
        let res = self.file.as_mut().map_or(Ok(()), |f| f.write_all(batch));
        match res {
            Ok(()) => {
                if self.failing {
                    info!(file = %self.path.display(), "tracer file is writable again");
                    self.failing = false;
                }
            }
            Err(e) => {
                self.fail("cannot write it", &e);
                // Reopen next time (the file may have been removed or the disk fixed).
                self.file = None;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Current span and the root-span middleware
// ---------------------------------------------------------------------------------------

/// Marks a periodic poll (the apiserver's instance-list refresh): no root span, like
/// heartbeats. Anything else (a `dbgpt model list`, DB-GPT's own clients) is traced.
pub const POLL_HEADER: &str = "dbgpt-poll";

tokio::task_local! {
    static CURRENT: SpanCtx;
}

/// The current request's root span (DB-GPT's `root_tracer.get_current_span_id()`), if
/// any: children started in a handler name it as their parent.
pub fn current() -> Option<SpanCtx> {
    CURRENT.try_with(|c| *c).ok()
}

/// Adds the request middleware to `router` (to its routes only with `routes_only`, as
/// axum's `route_layer`): [`root_span`] when tracing is on, else plain request logging
/// ([`crate::http::trace_requests`]). Every service's router uses this.
pub fn with_request_middleware<S>(
    router: axum::Router<S>,
    tracer: &Tracer,
    routes_only: bool,
) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    use crate::http::trace_requests;
    use axum::middleware::{from_fn, from_fn_with_state};
    match (tracer.is_enabled(), routes_only) {
        (true, true) => router.route_layer(from_fn_with_state(tracer.clone(), root_span)),
        (true, false) => router.layer(from_fn_with_state(tracer.clone(), root_span)),
        (false, true) => router.route_layer(from_fn(trace_requests)),
        (false, false) => router.layer(from_fn(trace_requests)),
    }
}

/// Middleware used instead of [`crate::http::trace_requests`] when tracing is on (one
/// layer, not two: each `from_fn` layer costs allocations on every request). It adds
/// DB-GPT's `TraceIDMiddleware`: a root span per request under `/api`, except heartbeats
/// and health checks, continuing the trace named by [`TRACE_HEADER`]; metadata
/// `{"path": …}`.
pub async fn root_span(State(tracer): State<Tracer>, req: Request, next: Next) -> Response {
    traced(&tracer, req, |req| next.run(req)).await
}

/// [`root_span`] around any continuation `next`.
async fn traced<F, Fut>(tracer: &Tracer, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let path = req.uri().path();
    if !path.starts_with("/api")
        || crate::http::is_quiet(path)
        || req.headers().contains_key(POLL_HEADER)
    {
        return crate::http::logged(req, next).await;
    }
    let parent = req
        .headers()
        .get(&TRACE_HEADER)
        .and_then(|v| SpanCtx::parse(v.as_bytes()));
    let meta = match req.extensions().get::<MatchedPath>() {
        Some(m) if m.as_str() == path => Meta::Route(m.clone()),
        _ => Meta::Path(path.to_string()),
    };
    let span = tracer.root(parent, meta);
    let resp = match span.ctx() {
        Some(ctx) => CURRENT.scope(ctx, crate::http::logged(req, next)).await,
        None => crate::http::logged(req, next).await,
    };
    drop(span);
    resp
}

/// The request middleware of [`with_request_middleware`] as a tower layer around a whole
/// service (a router) rather than around each route: `Router::layer` wraps every route
/// in it and `from_fn` boxes and clones on each call, which the apiserver's hot path cannot
/// afford. Root spans name the request path (the route is not known outside the router).
#[derive(Clone)]
pub struct RequestSpans(pub Tracer);

impl<S> tower::Layer<S> for RequestSpans {
    type Service = RequestSpansService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpansService {
            tracer: self.0.clone(),
            inner,
        }
    }
}

/// See [`RequestSpans`].
#[derive(Clone)]
pub struct RequestSpansService<S> {
    tracer: Tracer,
    inner: S,
}

impl<S> tower::Service<Request> for RequestSpansService<S>
where
    S: crate::http::AppService,
    S::Future: Send,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request (tower's contract).
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let tracer = self.tracer.clone();
        Box::pin(async move {
            let next = move |req| async move {
                match inner.call(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            };
            Ok(if tracer.is_enabled() {
                traced(&tracer, req, next).await
            } else {
                crate::http::logged(req, next).await
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Local, NaiveDateTime, TimeZone};

    fn local_micros(s: &str) -> Timestamp {
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap();
        Timestamp(
            Local
                .from_local_datetime(&naive)
                .earliest()
                .unwrap()
                .timestamp_micros(),
        )
    }

    fn ctx(s: &str) -> SpanCtx {
        SpanCtx::parse(s.as_bytes()).unwrap()
    }

    /// The same spans as DB-GPT writes them: the fixture lines are Python 3.11's
    /// `json.dumps(d, ensure_ascii=False)` of dicts in `Span.to_dict()`'s key order (a root
    /// span, and a finished child with metadata that needs escaping).
    #[test]
    fn lines_match_dbgpt_byte_for_byte() {
        let fixture_start = r#"{"span_type": "base", "trace_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f", "span_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:0123456789abcdef", "parent_span_id": null, "operation_name": "DB-GPT-ModelController", "start_time": "2026-11-22 02:40:05.996", "end_time": null, "metadata": {"path": "/api/controller/models"}}"#;
        let fixture_end = r#"{"span_type": "base", "trace_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f", "span_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:fedcba9876543210", "parent_span_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:0123456789abcdef", "operation_name": "dbgpt.model.controller.register_instance", "start_time": "2026-11-22 02:40:05.997", "end_time": "2026-11-22 02:40:06.010", "metadata": {"model_name": "smollm2@llm", "host": "127.0.0.1", "port": 8001, "weight": 1.0, "check_healthy": true, "enabled": true, "prompt_template": "q\"uoé\n\u0001"}}"#;
        let root = ctx("6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:0123456789abcdef");
        let child = ctx("6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:fedcba9876543210");
        let mut out = Vec::new();
        let mut off = LocalOffsets::default();
        write_line(
            &mut out,
            &mut off,
            &root,
            None,
            CONTROLLER_ROOT,
            local_micros("2026-11-22 02:40:05.996999"),
            None,
            &Meta::Path("/api/controller/models".into()),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{fixture_start}\n")
        );

        #[derive(Serialize)]
        struct M<'a> {
            model_name: &'a str,
            host: &'a str,
            port: u16,
            weight: f64,
            check_healthy: bool,
            enabled: bool,
            prompt_template: &'a str,
        }
        let meta = Meta::json(&M {
            model_name: "smollm2@llm",
            host: "127.0.0.1",
            port: 8001,
            weight: 1.0,
            check_healthy: true,
            enabled: true,
            prompt_template: "q\"uo\u{e9}\n\u{1}",
        });
        let mut out = Vec::new();
        write_line(
            &mut out,
            &mut off,
            &child,
            Some(&root),
            "dbgpt.model.controller.register_instance",
            local_micros("2026-11-22 02:40:05.997000"),
            Some(local_micros("2026-11-22 02:40:06.010500")),
            &meta,
        );
        // ensure_ascii=False: "é" as UTF-8, control characters escaped.
        assert_eq!(String::from_utf8(out).unwrap(), format!("{fixture_end}\n"));
    }

    #[test]
    fn python_separators_for_nested_values() {
        let v = serde_json::json!({"a": [1, 2.5, "x"], "b": {"c": null, "d": false}, "e": []});
        assert_eq!(
            py_json(&v),
            r#"{"a": [1, 2.5, "x"], "b": {"c": null, "d": false}, "e": []}"#
        );
    }

    #[test]
    fn span_ids_parse_and_propagate() {
        let c = ctx(" 00ab:1 ");
        assert_eq!(c.to_string(), "00ab:1");
        assert_eq!(c.trace_id(), "00ab");
        for bad in [
            "",
            "abc",
            "0000:1",
            "xyz:1",
            "ab:",
            ":ab",
            "ab:cd:ef",
            "0123456789abcdef0123456789abcdef0:1",
            "ab:0123456789abcdef0",
        ] {
            assert!(SpanCtx::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
        let fresh = SpanCtx::new_trace();
        let s = fresh.to_string();
        assert_eq!(s.len(), 49);
        assert!(
            s[..32]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(&s[32..33], ":");
        let kid = SpanCtx::child_of(&fresh);
        assert_eq!(kid.trace_id(), fresh.trace_id());
        assert_ne!(kid, fresh);
        assert_eq!(SpanCtx::parse(s.as_bytes()), Some(fresh));
        assert_eq!(fresh.header_value().to_str().unwrap(), s);
        assert_eq!(
            SpanCtx::from_body(&serde_json::json!({"span_id": s})),
            Some(fresh)
        );
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn spans_are_written_twice_and_flushed_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/dir/t.jsonl");
        // A long interval and a large batch: only close() can flush.
        let (t, mut f) = Tracer::open_with(&file, "Root", Duration::from_secs(3600), 1000);
        assert!(file.is_file(), "the file is created at start-up");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(file.parent().unwrap())
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        let root = t.root(None, Meta::Path("/api/x".into()));
        let child = t.start("Child.op", root.ctx());
        let (rc, cc) = (root.ctx().unwrap(), child.ctx().unwrap());
        child.end();
        drop(root);
        assert_eq!(lines(&file).len(), 0, "buffered, not written yet");
        f.close();
        let l = lines(&file);
        assert_eq!(l.len(), 4);
        let ops: Vec<_> = l
            .iter()
            .map(|v| v["operation_name"].as_str().unwrap())
            .collect();
        assert_eq!(ops, ["Root", "Child.op", "Child.op", "Root"]);
        assert!(l[0]["end_time"].is_null() && l[1]["end_time"].is_null());
        assert!(l[2]["end_time"].is_string() && l[3]["end_time"].is_string());
        assert_eq!(l[1]["parent_span_id"], rc.to_string());
        assert_eq!(l[2]["span_id"], cc.to_string());
        assert_eq!(l[0]["trace_id"], l[2]["trace_id"]);
        assert!(l[0]["parent_span_id"].is_null());
        assert!(l[1]["metadata"].is_null());
        assert_eq!(l[3]["metadata"], serde_json::json!({"path": "/api/x"}));
        // After close, spans are dropped silently.
        drop(t.start("Late", None));
        assert_eq!(lines(&file).len(), 4);
    }

    #[test]
    fn a_full_batch_wakes_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jsonl");
        let (t, _f) = Tracer::open_with(&file, "Root", Duration::from_secs(3600), 4);
        drop(t.start("a", None));
        drop(t.start("b", None));
        assert!(
            wait(|| lines(&file).len() == 4),
            "4 lines = one batch, written without waiting for the interval"
        );
        drop(t.start("c", None));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(lines(&file).len(), 4, "2 lines stay buffered");
    }

    #[test]
    fn the_interval_flushes_a_partial_batch() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jsonl");
        let (t, _f) = Tracer::open_with(&file, "Root", Duration::from_millis(50), 1000);
        drop(t.start("a", None));
        assert!(wait(|| lines(&file).len() == 2));
    }

    fn wait(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn date_change_renames_like_dbgpt() {
        assert_eq!(
            split_ext(Path::new("/l/dbgpt_model_controller_tracer.jsonl")),
            ("/l/dbgpt_model_controller_tracer".into(), ".jsonl".into())
        );
        assert_eq!(
            split_ext(Path::new("/l/a.b/trace")),
            ("/l/a.b/trace".into(), ".log".into())
        );
        assert_eq!(
            split_ext(Path::new("/l/.trace")),
            ("/l/.trace".into(), ".log".into())
        );
        assert_eq!(
            split_ext(Path::new("t.x.jsonl")),
            ("t.x".into(), ".jsonl".into())
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut sink = FileSink::new(path.clone());
        let d1 = NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
        let d2 = d1.succ_opt().unwrap();
        sink.date = d1;
        sink.write(b"day1\n", 0, d1);
        sink.write(b"day1 again\n", 0, d1);
        sink.write(b"day2\n", 0, d2);
        let dated = dir.path().join("t_2026-11-21.jsonl");
        assert_eq!(
            std::fs::read_to_string(&dated).unwrap(),
            "day1\nday1 again\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "day2\n");
        // An empty flush on a new day still rolls over (DB-GPT checks on every flush).
        sink.write(b"", 0, d2.succ_opt().unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("t_2026-11-22.jsonl")).unwrap(),
            "day2\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        // A dated file that already exists (another process rotated first) is kept.
        let mut other = FileSink::new(path.clone());
        other.date = d1;
        other.write(b"late\n", 0, d2);
        assert_eq!(
            std::fs::read_to_string(&dated).unwrap(),
            "day1\nday1 again\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "late\n");
    }

    #[test]
    fn an_unwritable_file_drops_spans_without_failing() {
        let dir = tempfile::tempdir().unwrap();
        // The "directory" is a regular file: nothing can be created below it.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let (t, mut f) = Tracer::open_with(
            &blocker.join("t.jsonl"),
            "Root",
            Duration::from_millis(10),
            1,
        );
        for _ in 0..20 {
            drop(t.start("x", None));
        }
        f.close();
    }

    #[test]
    fn disabled_tracer_is_a_no_op() {
        let t = Tracer::disabled();
        let s = t.start_with("x", None, || panic!("metadata is not built when off"));
        assert!(s.ctx().is_none());
        let (t, f) = Tracer::open(None, "Root");
        assert!(!t.is_enabled());
        drop(f);
    }

    #[tokio::test]
    async fn current_span_is_task_local() {
        assert!(current().is_none());
        let c = ctx("ab:cd");
        CURRENT
            .scope(c, async {
                assert_eq!(current(), Some(c));
            })
            .await;
        assert!(current().is_none());
    }
}
