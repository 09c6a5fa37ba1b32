//! The writer thread and the file: [`Flusher`] (stop and final flush), the loop that
//! swaps the shared buffer out every [`FLUSH_INTERVAL`](super::FLUSH_INTERVAL) or
//! [`FLUSH_LINES`](super::FLUSH_LINES) lines and writes it, and the file itself with
//! DB-GPT's daily roll-over. A file that cannot be written is reported once and its spans
//! are dropped (and counted), never holding up a request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tracing::{info, warn};

use super::Shared;

/// The writer thread's handle: [`Flusher::finish`] writes what is buffered and stops it.
pub struct Flusher {
    pub(super) inner: Option<(Arc<Shared>, JoinHandle<()>)>,
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

/// The writer thread: waits for a full batch, the interval or [`Flusher::close`], writes
/// what is buffered, and counts in `Shared::lost` the lines that did not reach the file.
pub(super) fn write_loop(shared: Arc<Shared>, mut sink: FileSink, interval: Duration) {
    let mut batch = Vec::with_capacity(16 << 10);
    loop {
        let (closing, dropped, lines) = {
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
            (
                p.closed,
                std::mem::take(&mut p.dropped),
                std::mem::take(&mut p.lines),
            )
        };
        let written = sink.write(&batch, dropped, chrono::Local::now().date_naive());
        let lost = dropped + if written { 0 } else { lines as u64 };
        if lost > 0 {
            shared.lost.fetch_add(lost, Ordering::Relaxed);
        }
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
pub(super) struct FileSink {
    path: PathBuf,
    prefix: String,
    ext: String,
    file: Option<File>,
    date: NaiveDate,
    /// A write failed and was reported; the next success says so.
    failing: bool,
}

impl FileSink {
    pub(super) fn new(path: PathBuf) -> Self {
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

    pub(super) fn ensure_open(&mut self) -> bool {
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

    /// Writes `batch` (reporting `dropped` lines first); false when it did not reach the
    /// file.
    fn write(&mut self, batch: &[u8], dropped: u64, today: NaiveDate) -> bool {
        if dropped > 0 {
            warn!(
                dropped,
                file = %self.path.display(),
                "tracer file writes fall behind: spans dropped"
            );
        }
        self.roll_over(today);
        if !self.ensure_open() {
            return batch.is_empty();
        }
        if batch.is_empty() {
            return true;
        }
        let res = self.file.as_mut().map_or(Ok(()), |f| f.write_all(batch));
        match res {
            Ok(()) => {
                if self.failing {
                    info!(file = %self.path.display(), "tracer file is writable again");
                    self.failing = false;
                }
                true
            }
            Err(e) => {
                self.fail("cannot write it", &e);
                // Reopen next time (the file may have been removed or the disk fixed).
                self.file = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracer::{Meta, Tracer};

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
        // Each span's start and end line, none written, every one counted.
        assert_eq!(t.lost_lines(), 40);
    }
}
