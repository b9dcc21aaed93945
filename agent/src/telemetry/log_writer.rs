//! The access log's writer: lines gathered in memory and written to stderr
//! by a thread of their own every few milliseconds, in one `write(2)`.
//!
//! A line per connection and per request written straight to stderr costs
//! a system call each. Handing each line to a writer thread does not help
//! either: waking that thread per line costs as much (measured both ways
//! with `cargo xtask bench http`). Here a proxy thread only appends the
//! formatted line to a buffer under a lock, and wakes the writer only for a
//! batch's first line; the writer then waits [`INTERVAL`] for more.
//! Nothing is dropped: past [`MAX_PENDING`] the appending thread writes the
//! batch itself, as a slow stderr made it wait before. A line can reach
//! stderr up to [`INTERVAL`] after it was logged; the agent's other lines
//! are written at once (see `main.rs`).
use std::{
    io::Write as _,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

/// How often the writer thread writes what has gathered.
pub const INTERVAL: Duration = Duration::from_millis(20);
/// Bytes gathered at most before a logging thread writes them itself.
const MAX_PENDING: usize = 1 << 20;
/// Capacity the writer keeps between batches: a burst's larger buffer goes
/// back to the allocator once written, so an idle agent does not hold it.
const KEPT_CAPACITY: usize = 64 << 10;

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
}

/// Where gathered lines go: stderr ([`write_out`]), or a test's sink.
type Out = Box<dyn Fn(&[u8]) + Send + Sync>;

struct Shared {
    pending: Mutex<Pending>,
    /// The first line of a batch, or the guard's end.
    wake: Condvar,
    out: Out,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while appending leaves whole lines behind: keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes `lines` to stderr whole, under stderr's lock, so that no other
/// thread's line lands inside one even when a pipe takes it in parts.
fn write_out(lines: &[u8]) {
    let mut stderr = std::io::stderr().lock();
    // Nowhere to report a failing stderr: the lines are lost, as they
    // would have been written straight.
    let _ = stderr.write_all(lines);
    let _ = stderr.flush();
}

/// A `MakeWriter` for the access log's events ([`super::access_log::TARGETS`]).
#[derive(Clone)]
pub struct BatchedLog {
    shared: Arc<Shared>,
}

/// Writes what is pending and stops the writer thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedLog {
    /// The writer and the guard that flushes it; the thread is named
    /// `weir-log`.
    pub fn start() -> std::io::Result<(BatchedLog, FlushGuard)> {
        BatchedLog::start_with(INTERVAL, Box::new(write_out))
    }

    /// Without a writer thread: every line is written at once.
    pub fn unbatched() -> BatchedLog {
        BatchedLog {
            shared: Arc::new(Shared {
                pending: Mutex::new(Pending {
                    lines: Vec::new(),
                    closed: true,
                }),
                wake: Condvar::new(),
                out: Box::new(write_out),
            }),
        }
    }

    fn start_with(interval: Duration, out: Out) -> std::io::Result<(BatchedLog, FlushGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            wake: Condvar::new(),
            out,
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("weir-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let mut pending = writer.lock();
                    // Asleep while there is nothing to write (an idle agent
                    // is not woken), then `interval` to gather more.
                    while pending.lines.is_empty() && !pending.closed {
                        pending = writer.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
                    }
                    if !pending.closed {
                        pending = writer
                            .wake
                            .wait_timeout(pending, interval)
                            .map_or_else(|e| e.into_inner().0, |(pending, _)| pending);
                    }
                    let closed = pending.closed;
                    std::mem::swap(&mut pending.lines, &mut spare);
                    drop(pending);
                    if !spare.is_empty() {
                        (writer.out)(&spare);
                    }
                    spare.clear();
                    spare.shrink_to(KEPT_CAPACITY);
                    if closed {
                        return;
                    }
                }
            })?;
        Ok((
            BatchedLog {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl std::io::Write for BatchedLog {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.closed {
            // After the guard: straight out.
            drop(pending);
            (self.shared.out)(line);
            return Ok(line.len());
        }
        let first = pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        if first {
            self.shared.wake.notify_one();
        }
        if pending.lines.len() >= MAX_PENDING {
            let lines = std::mem::take(&mut pending.lines);
            drop(pending);
            (self.shared.out)(&lines);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedLog {
    type Writer = BatchedLog;

    fn make_writer(&'a self) -> BatchedLog {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps what reached it.
    fn sink() -> (Arc<Mutex<Vec<u8>>>, Out) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let out = written.clone();
        let sink: Out = Box::new(move |lines: &[u8]| {
            out.lock().expect("sink").extend_from_slice(lines);
        });
        (written, sink)
    }

    /// Lines are gathered, whole and in order, until the writer's turn or
    /// the guard; after the guard they go straight out.
    #[test]
    fn gathers_lines_and_flushes_them_at_the_end() {
        let (written, out) = sink();
        // A long interval: nothing leaves before the guard is dropped.
        let (log, guard) = BatchedLog::start_with(Duration::from_secs(3600), out).expect("thread");
        let mut writer = tracing_subscriber::fmt::MakeWriter::make_writer(&log);
        writer.write_all(b"one\n").expect("write");
        writer.write_all(b"two\n").expect("write");
        assert!(written.lock().expect("sink").is_empty());
        drop(guard);
        assert_eq!(*written.lock().expect("sink"), b"one\ntwo\n");
        writer.write_all(b"late\n").expect("write");
        assert_eq!(*written.lock().expect("sink"), b"one\ntwo\nlate\n");
    }

    /// The writer thread writes on its own, without a guard.
    #[test]
    fn lines_leave_on_the_writers_turn() {
        let (written, out) = sink();
        let (log, _guard) = BatchedLog::start_with(Duration::from_millis(5), out).expect("thread");
        log.clone().write_all(b"line\n").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while written.lock().expect("sink").is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::yield_now();
        }
        assert_eq!(*written.lock().expect("sink"), b"line\n");
    }

    /// A writer that falls behind makes the logging thread write, instead
    /// of holding more than the bound; nothing is lost.
    #[test]
    fn the_pending_lines_stay_bounded() {
        let (written, out) = sink();
        let (log, guard) = BatchedLog::start_with(Duration::from_secs(3600), out).expect("thread");
        let mut writer = log.clone();
        let line = vec![b'x'; 4096];
        let lines = 2 * MAX_PENDING / line.len() + 1;
        for _ in 0..lines {
            writer.write_all(&line).expect("write");
            assert!(log.shared.lock().lines.len() < MAX_PENDING);
        }
        drop(guard);
        assert_eq!(written.lock().expect("sink").len(), lines * line.len());
    }
}
