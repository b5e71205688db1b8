//! Plugins' output: what a worker's plugins write to stdout or stderr
//! (both reach the supervisor on the worker's stdout: the worker logs
//! through a descriptor of its own, see the binary's `logging`), logged
//! as `worker output`, never parsed.
//!
//! Bounded, so that a chatty or hostile plugin cannot fill the disk: a
//! line is cut at [`MAX_OUTPUT_LINE`] bytes (the rest is read and
//! dropped), and at most [`LINES_PER_WINDOW`] lines per [`WINDOW`] are
//! logged per worker; the others are counted, and one line says how many
//! were left out.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _};

/// The longest line of plugin output logged; a longer one is cut.
pub const MAX_OUTPUT_LINE: usize = 4096;
/// Lines of plugin output logged per worker and [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 100;
/// The throttle's window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Which lines of a worker's output are logged: a pure function of the
/// lines' times, tested without sleeping.
#[derive(Debug)]
pub(super) struct OutputThrottle {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl OutputThrottle {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            logged: 0,
            suppressed: 0,
        }
    }

    /// A line came at `now`: whether to log it, and the count of lines
    /// left out to report first (a window ended).
    pub(super) fn line(&mut self, now: Instant) -> (Option<u64>, bool) {
        let ended = self.tick(now);
        if self.logged < LINES_PER_WINDOW {
            self.logged += 1;
            (ended, true)
        } else {
            self.suppressed += 1;
            (ended, false)
        }
    }

    /// When the window has ended at `now`: a new one starts, and the lines
    /// left out in the last one, if any, are to be reported.
    pub(super) fn tick(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.window_start) < WINDOW {
            return None;
        }
        self.window_start = now;
        self.logged = 0;
        self.finish()
    }

    /// The lines left out and not yet reported (the output ended).
    pub(super) fn finish(&mut self) -> Option<u64> {
        (self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
    }
}

/// One line of output: its start, and its whole length when it was cut.
async fn read_output_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
) -> std::io::Result<Option<(String, Option<u64>)>> {
    let mut buf = Vec::new();
    let n = (&mut *input)
        .take(MAX_OUTPUT_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some((String::from_utf8_lossy(&buf).into_owned(), None)));
    }
    if buf.len() < MAX_OUTPUT_LINE {
        // The end of output, with no newline.
        return Ok(Some((String::from_utf8_lossy(&buf).into_owned(), None)));
    }
    // Read the rest of the line and drop it, a buffer at a time.
    let mut total = buf.len() as u64;
    loop {
        let chunk = input.fill_buf().await?;
        if chunk.is_empty() {
            break;
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(at) => {
                total += at as u64;
                input.consume(at + 1);
                break;
            }
            None => {
                let len = chunk.len();
                total += len as u64;
                input.consume(len);
            }
        }
    }
    // A line of exactly the limit, its newline read after it, was whole.
    let cut = (total > MAX_OUTPUT_LINE as u64).then_some(total);
    Ok(Some((String::from_utf8_lossy(&buf).into_owned(), cut)))
}

fn report(service: &str, pid: u32, suppressed: u64) {
    tracing::warn!(
        %service,
        pid,
        suppressed,
        "worker output: lines left out (over {LINES_PER_WINDOW} a second)"
    );
}

/// Logs worker `pid`'s output until it ends.
pub(super) async fn log_output<R: AsyncRead + Unpin + Send + 'static>(
    output: R,
    service: String,
    pid: u32,
) {
    let throttle = Arc::new(Mutex::new(OutputThrottle::new(Instant::now())));
    let ticking = throttle.clone();
    let name = service.clone();
    // Reports the lines left out when the output stops in a burst's
    // window, without waiting for its next line.
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(WINDOW);
        loop {
            tick.tick().await;
            let ended = ticking
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .tick(Instant::now());
            if let Some(n) = ended {
                report(&name, pid, n);
            }
        }
    });
    let mut input = tokio::io::BufReader::new(output);
    while let Ok(Some((line, cut))) = read_output_line(&mut input).await {
        let (ended, log) = throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .line(Instant::now());
        if let Some(n) = ended {
            report(&service, pid, n);
        }
        if !log {
            continue;
        }
        match cut {
            None => tracing::info!(%service, pid, output = %line, "worker output"),
            Some(bytes) => tracing::info!(
                %service, pid, output = %line, bytes,
                "worker output (a long line, cut at {MAX_OUTPUT_LINE} bytes)"
            ),
        }
    }
    ticker.abort();
    let left = throttle
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .finish();
    if let Some(n) = left {
        report(&service, pid, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_at_the_limit_and_reported_once_per_window() {
        let t0 = Instant::now();
        let mut t = OutputThrottle::new(t0);
        let logged = (0..1000)
            .filter(|i| t.line(t0 + Duration::from_micros(*i)).1)
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        assert_eq!(t.tick(t0 + Duration::from_millis(500)), None);
        assert_eq!(t.tick(t0 + WINDOW), Some(900));
        assert_eq!(t.tick(t0 + WINDOW * 3), None, "nothing more left out");
        let (ended, logged) = t.line(t0 + WINDOW * 3);
        assert_eq!((ended, logged), (None, true), "a new window logs again");
    }

    #[test]
    fn the_count_left_out_comes_with_the_next_window_s_first_line_or_at_the_end() {
        let t0 = Instant::now();
        let mut t = OutputThrottle::new(t0);
        for _ in 0..LINES_PER_WINDOW + 5 {
            t.line(t0);
        }
        assert_eq!(t.line(t0 + WINDOW), (Some(5), true));
        for _ in 0..LINES_PER_WINDOW + 2 {
            t.line(t0 + WINDOW);
        }
        assert_eq!(t.finish(), Some(3));
        assert_eq!(t.finish(), None);
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_of_them_skipped() {
        let long = "y".repeat(MAX_OUTPUT_LINE * 3);
        let exact = "x".repeat(MAX_OUTPUT_LINE);
        let input = format!("short\n{long}\n{exact}\nafter\ntail");
        let mut r = tokio::io::BufReader::with_capacity(64, input.as_bytes());
        let mut lines = Vec::new();
        while let Ok(Some(line)) = read_output_line(&mut r).await {
            lines.push(line);
        }
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], ("short".to_owned(), None));
        assert_eq!(lines[1].0.len(), MAX_OUTPUT_LINE);
        assert_eq!(lines[1].1, Some((MAX_OUTPUT_LINE * 3) as u64));
        assert_eq!(
            lines[2],
            (exact, None),
            "a line of exactly the limit is whole"
        );
        assert_eq!(lines[3], ("after".to_owned(), None));
        assert_eq!(lines[4], ("tail".to_owned(), None));
    }
}
