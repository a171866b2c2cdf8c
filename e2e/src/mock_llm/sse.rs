//! A pre-computed, paced streaming body.
//!
//! A stream is planned in full when the request arrives: a list of frames, each with
//! the time (from the response headers) at which it is due and the number of tokens
//! sent once it is out. Frames due at the same time are coalesced into one write, so
//! an unpaced stream costs a single write.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::stats::{Recorder, StreamEnd};

/// How a planned stream ends after its last frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Normal end of the body.
    Complete,
    /// Normal end of the body, after an injected error event.
    ErrorEvent,
    /// Abrupt close of the connection.
    Drop,
}

struct Item {
    due: Duration,
    bytes: Bytes,
    tokens_after: u64,
}

/// Builds the frame list of a stream.
pub struct Plan {
    items: Vec<Item>,
    buf: Vec<u8>,
    due: Duration,
    tokens: u64,
}

impl Plan {
    pub fn new() -> Plan {
        Plan {
            items: Vec::new(),
            buf: Vec::with_capacity(1024),
            due: Duration::ZERO,
            tokens: 0,
        }
    }

    /// Appends `text`, due at `due` (never earlier than what is already planned),
    /// carrying `tokens` tokens.
    pub fn push(&mut self, due: Duration, text: &[u8], tokens: u64) {
        let due = due.max(self.due);
        if due != self.due && !self.buf.is_empty() {
            self.flush();
        }
        self.due = due;
        self.buf.extend_from_slice(text);
        self.tokens += tokens;
    }

    fn flush(&mut self) {
        let bytes = Bytes::from(std::mem::take(&mut self.buf));
        self.items.push(Item {
            due: self.due,
            bytes,
            tokens_after: self.tokens,
        });
    }

    /// Finishes the plan into a body that reports to `stats`.
    pub fn into_body(
        mut self,
        ending: Ending,
        stats: Arc<Recorder>,
        drop_due: Duration,
    ) -> SseBody {
        if !self.buf.is_empty() {
            self.flush();
        }
        SseBody {
            items: self.items.into_iter(),
            next: None,
            start: Instant::now(),
            sleep: None,
            ending,
            drop_due,
            drop_armed: false,
            guard: Guard {
                stats,
                tokens: 0,
                ended: false,
            },
        }
    }
}

impl Default for Plan {
    fn default() -> Self {
        Plan::new()
    }
}

struct Guard {
    stats: Arc<Recorder>,
    tokens: u64,
    ended: bool,
}

impl Guard {
    fn end(&mut self, how: StreamEnd) {
        if !self.ended {
            self.ended = true;
            self.stats.stream_ended(how, self.tokens);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.ended {
            tracing::debug!(tokens = self.tokens, "stream cancelled by the client");
            self.end(StreamEnd::Cancelled);
        }
    }
}

/// The streaming body (`text/event-stream`).
pub struct SseBody {
    items: std::vec::IntoIter<Item>,
    next: Option<Item>,
    start: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    ending: Ending,
    drop_due: Duration,
    drop_armed: bool,
    guard: Guard,
}

impl SseBody {
    /// Waits until `due` (relative to the start); `Ready` when it has passed.
    fn wait(&mut self, cx: &mut Context<'_>, due: Duration) -> Poll<()> {
        let deadline = self.start + due;
        if Instant::now() >= deadline {
            self.sleep = None;
            return Poll::Ready(());
        }
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() != deadline {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.sleep = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.next.is_none() {
            this.next = this.items.next();
        }
        if let Some(item) = &this.next {
            let due = item.due;
            if due > Duration::ZERO && this.wait(cx, due).is_pending() {
                return Poll::Pending;
            }
            let Some(item) = this.next.take() else {
                return Poll::Ready(None);
            };
            this.guard.tokens = item.tokens_after;
            return Poll::Ready(Some(Ok(Frame::data(item.bytes))));
        }
        if this.guard.ended {
            return Poll::Ready(None);
        }
        match this.ending {
            Ending::Complete => {
                this.guard.end(StreamEnd::Completed);
                Poll::Ready(None)
            }
            Ending::ErrorEvent => {
                this.guard.end(StreamEnd::ErrorEvent);
                Poll::Ready(None)
            }
            Ending::Drop => {
                // Let the connection flush what was sent before cutting it: the drop
                // is due at least 2 ms from now, so this returns Pending once.
                if !this.drop_armed {
                    this.drop_armed = true;
                    this.drop_due = this
                        .drop_due
                        .max(this.start.elapsed() + Duration::from_millis(2));
                }
                if this.wait(cx, this.drop_due).is_pending() {
                    return Poll::Pending;
                }
                this.guard.end(StreamEnd::Dropped);
                tracing::debug!("dropping the connection mid-stream (drop_after_tokens)");
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "parley-mock-llm: drop_after_tokens",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
