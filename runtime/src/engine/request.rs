//! What a service hands the engine and what it gets back: requests, the stream of events of
//! each, and the handle that cancels it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::generate::{Answer, Flow, GenerateOptions, TokenEvent};
use crate::model::Media;
use crate::prompt::Exchange;

/// A conversation the engine keeps (KV cache and history) for follow-up questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConversationId(pub(crate) u64);

/// How a request's tokens are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pace {
    /// The sequence decodes at the engine's pace; its events queue up in the channel.
    #[default]
    Free,
    /// After each token the sequence waits until the receiver says [`Handle::ack`] (or
    /// cancels), so a callback can stop the answer after exactly that token.
    Lockstep,
}

/// A first question about `media` (or a text-only one with [`Media::Text`]).
#[derive(Debug, Clone)]
pub struct Request {
    /// What the question is about.
    pub media: Media,
    /// The user's question.
    pub question: String,
    /// Earlier questions and answers of this conversation, oldest first, when the caller keeps
    /// the history itself (a stateless API): the first of them shows `media`, and `question`
    /// comes after the last.
    pub earlier: Vec<Exchange>,
    /// Identity of `media`'s content (e.g. a hash of its bytes; any fixed string for text).
    /// With it, the conversation goes to the prefix cache when its answer is done, and the
    /// request itself continues from a cached conversation with the same key whose tokens
    /// start its prompt (see [`crate::engine::EngineOptions::prefix_cache`]). Such a
    /// conversation belongs to the cache: [`Done::conversation`] is `None`, and `keep` is
    /// ignored.
    pub cache_key: Option<String>,
    /// Sampling, length and stop conditions.
    pub options: GenerateOptions,
    /// Keep the conversation (its KV cache) for [`FollowUp`]s; it is held until
    /// [`crate::engine::Engine::close`], or evicted when room is needed (see the engine docs).
    pub keep: bool,
    /// Token pacing.
    pub pace: Pace,
    /// Send each step's logits with its token (tests and evaluation).
    pub logits: bool,
}

impl Request {
    /// A request with default options, not kept, freely paced.
    pub fn new(media: Media, question: impl Into<String>) -> Self {
        Self {
            media,
            question: question.into(),
            earlier: Vec::new(),
            cache_key: None,
            options: GenerateOptions::default(),
            keep: false,
            pace: Pace::Free,
            logits: false,
        }
    }
}

/// The next question of a kept conversation.
#[derive(Debug, Clone)]
pub struct FollowUp {
    /// The conversation.
    pub conversation: ConversationId,
    /// The user's question.
    pub question: String,
    /// Sampling, length and stop conditions.
    pub options: GenerateOptions,
    /// Token pacing.
    pub pace: Pace,
    /// Send each step's logits with its token.
    pub logits: bool,
}

/// What a request's channel carries, in order: tokens, then one `Done` or one `Failed`.
#[derive(Debug)]
pub enum Event {
    /// A generated token (`id: None`: text flushed at the end of the answer).
    Token {
        /// The token's id.
        id: Option<u32>,
        /// Text that became final with it.
        text: String,
        /// The logits it was sampled from, when the request asked for them.
        logits: Option<Vec<f32>>,
    },
    /// The answer is complete.
    Done(Done),
    /// The request failed; nothing more follows.
    Failed(Error),
}

/// A finished answer and the state of its conversation.
#[derive(Debug)]
pub struct Done {
    /// The answer.
    pub answer: Answer,
    /// The conversation, when it is kept for follow-ups.
    pub conversation: Option<ConversationId>,
    /// Positions its KV cache holds now.
    pub context_len: usize,
}

/// State shared by a request's handle and the scheduler.
pub(crate) struct Control {
    pub(crate) cancelled: AtomicBool,
    pub(crate) acked: AtomicBool,
    /// The scheduler's wake-up, so an ack or a cancel is seen at once.
    pub(crate) wake: Arc<(Mutex<bool>, Condvar)>,
}

impl Control {
    pub(crate) fn new(wake: Arc<(Mutex<bool>, Condvar)>) -> Arc<Self> {
        Arc::new(Self { cancelled: AtomicBool::new(false), acked: AtomicBool::new(false), wake })
    }

    fn notify(&self) {
        let (flag, cv) = &*self.wake;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// A submitted request: its events, and the way to cancel it. Dropping the handle cancels it.
pub struct Handle {
    pub(crate) events: Receiver<Event>,
    pub(crate) control: Arc<Control>,
    pub(crate) conversation: Option<ConversationId>,
}

impl Handle {
    /// The next event, blocking; `None` once the request is over.
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// The next event if one is there, without blocking.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// The conversation the request belongs to, when it is kept.
    pub fn conversation(&self) -> Option<ConversationId> {
        self.conversation
    }

    /// Lets a [`Pace::Lockstep`] request decode its next token.
    pub fn ack(&self) {
        self.control.acked.store(true, Ordering::Release);
        self.control.notify();
    }

    /// Ends the request at the engine's next step: its slot is freed (or kept, for a kept
    /// conversation) and it finishes with [`crate::FinishReason::Cancelled`].
    pub fn cancel(&self) {
        self.control.cancelled.store(true, Ordering::Release);
        self.control.notify();
    }

    /// Streams the tokens to `on_token` until the answer is complete; [`Flow::Stop`] ends it
    /// after that token (exactly so for [`Pace::Lockstep`] requests).
    pub fn wait(self, on_token: &mut dyn FnMut(TokenEvent<'_>) -> Flow) -> Result<Done> {
        loop {
            match self.events.recv() {
                Ok(Event::Token { id, text, .. }) => {
                    if on_token(TokenEvent { id, text: &text }) == Flow::Stop {
                        self.cancel();
                    } else if id.is_some() {
                        self.ack();
                    }
                }
                Ok(Event::Done(done)) => return Ok(done),
                Ok(Event::Failed(e)) => return Err(e),
                Err(_) => return Err(Error::EngineStopped),
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.cancel();
    }
}
