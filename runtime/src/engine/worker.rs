//! The scheduler thread: owns the KV memory, admits requests, and runs every decoder call.
//!
//! Each step: take what arrived (new requests, follow-ups, closes), drop cancelled requests,
//! admit waiting ones first come first served while a sequence slot and the KV budget allow
//! (evicting idle conversations, least recently used first), then run one decode call per run
//! of consecutive slots over every sequence with a token to feed, then prefill chunks within
//! the step's prompt-token budget.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::plan::{self, Idle, Room, SeqState};
use super::pool::{DecodeRow, Fetch, Fetched, SlotPool};
use super::prefix::{self, PrefixIndex};
use super::request::{Control, ConversationId, Done, Event, Pace};
use super::{EngineOptions, EngineStats, VisionJob, WhenFull};
use crate::error::{Error, Overload, Result};
use crate::features::{Features, Splice};
use crate::generate::{Decoding, FinishReason, Flow, Next, ms};
use crate::kv_cache::KvCache;
use crate::manifest::{KvLayout, ModelDims};
use crate::model::{Media, Model, Visual};
use crate::prompt::PromptBuilder;

/// How long a step waits for lockstep receivers to acknowledge their last token before it runs
/// without them (they join the next step).
const ACK_WAIT: Duration = Duration::from_millis(2);

/// Who receives a request's events.
pub(crate) struct Client {
    pub(crate) events: Sender<Event>,
    pub(crate) control: Arc<Control>,
    pub(crate) pace: Pace,
    pub(crate) logits: bool,
}

/// A first question, its prompt built and its features computed.
pub(crate) struct Start {
    pub(crate) conv: ConversationId,
    pub(crate) keep: bool,
    /// The media's identity, for the prefix cache.
    pub(crate) cache: Option<String>,
    pub(crate) prompt: Vec<u32>,
    pub(crate) visual: Option<Visual>,
    pub(crate) max_new: usize,
    pub(crate) decoding: Decoding,
    pub(crate) client: Client,
}

/// A follow-up question; its prompt is built here, where the conversation lives.
pub(crate) struct Continue {
    pub(crate) conv: ConversationId,
    pub(crate) question: String,
    pub(crate) max_new: usize,
    pub(crate) decoding: Decoding,
    pub(crate) client: Client,
}

/// A first request with a cache key: its prompt built, its media not yet seen.
pub(crate) struct Lookup {
    pub(crate) media: Media,
    pub(crate) start: Box<Start>,
}

/// What the scheduler is told.
pub(crate) enum Msg {
    Start(Box<Start>),
    Lookup(Box<Lookup>),
    Continue(Box<Continue>),
    Close(ConversationId),
}

/// What the engine's handles share with the scheduler thread.
pub(crate) struct Shared {
    pub(crate) inbox: Mutex<VecDeque<Msg>>,
    /// Set and notified whenever something arrives (messages, acks, cancels, shutdown).
    pub(crate) wake: Arc<(Mutex<bool>, Condvar)>,
    /// Requests submitted and neither admitted nor failed yet.
    pub(crate) waiting: AtomicUsize,
    pub(crate) stop: AtomicBool,
    pub(crate) stats: Mutex<EngineStats>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            inbox: Mutex::new(VecDeque::new()),
            wake: Arc::new((Mutex::new(false), Condvar::new())),
            waiting: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            stats: Mutex::new(EngineStats::default()),
        }
    }

    pub(crate) fn send(&self, msg: Msg) {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).push_back(msg);
        self.notify();
    }

    pub(crate) fn notify(&self) {
        let (flag, cv) = &*self.wake;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Sleeps until notified, or at most `limit`.
    fn sleep(&self, limit: Option<Duration>) {
        let (flag, cv) = &*self.wake;
        let mut woken = flag.lock().unwrap_or_else(|p| p.into_inner());
        if !*woken {
            woken = match limit {
                Some(d) => cv.wait_timeout(woken, d).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0),
                None => cv.wait(woken).unwrap_or_else(|p| p.into_inner()),
            };
        }
        *woken = false;
    }
}

/// One row of a decode call: its logits, or the decoder's argmax id.
#[derive(Clone)]
enum RowOut {
    Logits(Vec<f32>),
    Token(u32),
}

/// How a request's next token is chosen.
enum Chosen {
    /// By its sampler, from the logits.
    Sample(Vec<f32>),
    /// Already, by the decoder's `ArgMax`.
    Argmax(u32),
}

/// Where conversations keep their keys and values.
enum Backend {
    /// Slots of the in-place decoder, batched.
    Pool(SlotPool),
    /// One concatenating cache per conversation (the standard-ONNX decoder), one call each.
    PerSequence,
}

/// A conversation the scheduler knows.
struct Conv {
    slot: Option<usize>,
    /// The cache, for [`Backend::PerSequence`].
    kv: Option<KvCache>,
    /// Positions its cache holds: the first `len` ids of `history`.
    len: usize,
    /// Every id fed (or being fed) in order, for the repetition penalty and re-prefill.
    history: Vec<u32>,
    /// The last answer's final token, fed with the next turn.
    unfed: Option<u32>,
    /// The placeholder id and the features spliced at its positions.
    visual: Option<(u32, Arc<Features>)>,
    keep: bool,
    /// Its media's identity, when it belongs to the prefix cache.
    cache: Option<String>,
    busy: bool,
    /// Positions counted against the budget: held, or reserved while answering.
    reserved: usize,
    last_used: u64,
}

/// An admitted request.
struct Running {
    conv: ConversationId,
    /// Ids to prefill: the part of the history the cache lacks, then the new turn.
    feed: Vec<u32>,
    fed: usize,
    /// The new turn's ids (appended to the history when the prefill completes).
    appended: Vec<u32>,
    /// State to restore if the request fails or is cancelled before its prefill completes.
    history_before: usize,
    unfed_before: Option<u32>,
    phase: Phase,
    decoding: Decoding,
    client: Client,
    preprocess_ms: f64,
    vision_ms: f64,
    /// Ended this step; removed at its end (so indices into the running list stay valid).
    finished: bool,
}

impl Running {
    /// Whether its prompt was fed to the end (the KV of every id of it is in the cache), even
    /// if the answer ended at the first token, sampled from the last chunk's logits.
    fn prefilled(&self) -> bool {
        self.fed == self.feed.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefill,
    /// A token to feed, waiting for the receiver's ack (lockstep).
    Waiting(u32),
    /// A token to feed.
    Ready(u32),
}

/// A request waiting for room.
enum Queued {
    Start(Box<Start>),
    Continue { msg: Box<Continue>, ids: Vec<u32> },
}

impl Queued {
    fn conv(&self) -> ConversationId {
        match self {
            Queued::Start(s) => s.conv,
            Queued::Continue { msg, .. } => msg.conv,
        }
    }
}

/// The scheduler's state.
pub(crate) struct Worker {
    model: Arc<Model>,
    shared: Arc<Shared>,
    options: EngineOptions,
    backend: Backend,
    context: usize,
    budget_positions: usize,
    bytes_per_position: u64,
    slots: Vec<Option<ConversationId>>,
    convs: HashMap<ConversationId, Conv>,
    queue: VecDeque<Queued>,
    running: Vec<Running>,
    tick: u64,
    stats: EngineStats,
    vision: Sender<VisionJob>,
    prefix: PrefixIndex,
    /// Whether the decoder has the `next_token` output (engines exported before it do not).
    next_token_output: bool,
}

/// The KV slots, where [`super::KvPlacement`] puts them.
fn slot_pool(model: &Model, dims: &ModelDims, options: &EngineOptions, context: usize) -> Result<SlotPool> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    let gpu = model.device().device.gpu();
    let allocated = match options.kv_placement {
        super::KvPlacement::Auto => gpu.is_some(),
        super::KvPlacement::Host => false,
        super::KvPlacement::Allocated => true,
    };
    if !allocated {
        return SlotPool::new(dims, options.slots, context);
    }
    let info = match gpu {
        Some(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?,
        None => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?,
    };
    let session = model.decoder().lock();
    SlotPool::with_allocator(dims, options.slots, context, &session, info)
}

impl Worker {
    pub(crate) fn new(
        model: Arc<Model>,
        shared: Arc<Shared>,
        options: EngineOptions,
        vision: Sender<VisionJob>,
    ) -> Result<Self> {
        let dims = model.manifest().model.clone();
        let context = model.manifest().max_sequence_length;
        let bytes_per_position = super::pool::bytes_per_position(&dims);
        let budget_positions = super::budget_positions(&options, context, bytes_per_position);
        let backend = match dims.kv_layout {
            KvLayout::SharedBuffer => Backend::Pool(slot_pool(&model, &dims, &options, context)?),
            KvLayout::Concat => Backend::PerSequence,
        };
        let next_token_output = model.manifest().graphs.decoder.outputs.iter().any(|o| o.name == "next_token");
        let stats = EngineStats {
            kv_budget_bytes: budget_positions as u64 * bytes_per_position,
            batched: matches!(backend, Backend::Pool(_)),
            ..EngineStats::default()
        };
        Ok(Self {
            model,
            shared,
            slots: vec![None; options.slots],
            options,
            backend,
            context,
            budget_positions,
            bytes_per_position,
            convs: HashMap::new(),
            queue: VecDeque::new(),
            running: Vec::new(),
            tick: 0,
            stats,
            vision,
            prefix: PrefixIndex::default(),
            next_token_output,
        })
    }

    /// The most positions one request may take: the context, or the KV budget if smaller.
    pub(crate) fn limit(&self) -> usize {
        self.context.min(self.budget_positions)
    }

    /// Runs until the engine stops.
    pub(crate) fn run(mut self) {
        loop {
            self.take_messages();
            if self.shared.stop.load(Ordering::Acquire) {
                self.stop_all();
                return;
            }
            self.reap_cancelled();
            self.admit();
            if self.running.iter().any(|r| matches!(r.phase, Phase::Waiting(_))) {
                self.wait_for_acks();
            }
            let states: Vec<SeqState> = self.running.iter().map(|r| self.state(r)).collect();
            let plan = plan::plan_step(&states, self.options.prefill_chunk_tokens);
            self.publish();
            if plan.decode.is_empty() && plan.prefill.is_empty() {
                // A wake-up consumed by an earlier wait must not be slept through.
                if !self.has_news() {
                    self.shared.sleep(None);
                }
                continue;
            }
            self.tick += 1;
            self.decode(&plan.decode);
            // Indices stay valid: decode only marks finished requests, removed below.
            for &(i, n) in &plan.prefill {
                self.prefill(i, n);
            }
            self.remove_finished();
        }
    }

    /// Whether something arrived that the next round must handle: a message, an ack or a
    /// cancel.
    fn has_news(&self) -> bool {
        let control = |c: &Arc<Control>| c.cancelled.load(Ordering::Acquire);
        !self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
            || self.running.iter().any(|r| {
                control(&r.client.control)
                    || (matches!(r.phase, Phase::Waiting(_)) && r.client.control.acked.load(Ordering::Acquire))
            })
            || self.queue.iter().any(|q| match q {
                Queued::Start(s) => control(&s.client.control),
                Queued::Continue { msg, .. } => control(&msg.client.control),
            })
    }

    fn state(&self, r: &Running) -> SeqState {
        match r.phase {
            Phase::Prefill => SeqState::Prefill { remaining: r.feed.len() - r.fed },
            Phase::Ready(_) => SeqState::Ready,
            Phase::Waiting(_) => SeqState::Waiting,
        }
    }

    fn take_messages(&mut self) {
        let msgs: Vec<Msg> = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for msg in msgs {
            match msg {
                Msg::Start(start) => self.queue.push_back(Queued::Start(start)),
                Msg::Lookup(l) => self.lookup(*l),
                Msg::Continue(c) => match self.follow_up_ids(&c) {
                    Ok(ids) => {
                        if let Some(conv) = self.convs.get_mut(&c.conv) {
                            conv.busy = true;
                        }
                        self.queue.push_back(Queued::Continue { msg: c, ids });
                    }
                    Err(e) => self.refuse(&c.client, e),
                },
                Msg::Close(id) => self.close(id),
            }
        }
    }

    fn follow_up_ids(&self, c: &Continue) -> Result<Vec<u32>> {
        let conv = self.convs.get(&c.conv).ok_or(Error::Conversation("unknown or closed conversation"))?;
        if conv.busy {
            return Err(Error::Conversation("the previous answer of this conversation is still running"));
        }
        let m = self.model.manifest();
        PromptBuilder::new(self.model.tokenizer(), &m.chat_template, &m.tokens).next_turn(&c.question)
    }

    /// Continues a request from the cached conversation about the same media that shares the
    /// most of its prompt, if one is worth it; else starts it afresh (through vision).
    fn lookup(&mut self, l: Lookup) {
        // A follow-up sent as soon as its previous answer's `Done` arrived can get here before
        // the step that would put that conversation back in the index.
        self.sync_prefix();
        let Lookup { media, mut start } = l;
        let key = start.cache.as_deref();
        let best = self
            .prefix
            .recent_first()
            .filter_map(|id| {
                let c = self.convs.get(&id)?;
                if c.busy || c.cache.as_deref() != key {
                    return None;
                }
                let shared = prefix::shared_len(&c.history, c.unfed, &start.prompt);
                let held = c.history.len() + usize::from(c.unfed.is_some());
                // The positions whose KV the request would not prefill again.
                let reusable = c.len.min(shared);
                prefix::worth_taking(shared, held, reusable, c.visual.is_some()).then_some((id, reusable, shared))
            })
            .max_by_key(|&(_, reusable, shared)| (reusable, shared));
        let Some((id, _, shared)) = best else {
            match media {
                Media::Text => self.queue.push_back(Queued::Start(start)),
                media => {
                    if let Err(job) = self.vision.send(VisionJob { media, start }) {
                        self.refuse(&job.0.start.client, Error::EngineStopped);
                    }
                }
            }
            return;
        };
        self.prefix.take(id);
        let Some(conv) = self.convs.get_mut(&id) else { return };
        // Keep the shared ids: the history's, and the unfed token when it is shared too.
        if shared <= conv.history.len() {
            conv.history.truncate(shared);
            conv.unfed = None;
        }
        match &self.backend {
            Backend::Pool(_) => conv.len = conv.len.min(conv.history.len()),
            Backend::PerSequence => {
                let keep = conv.history.len();
                if conv.len > keep {
                    match conv.kv.as_mut().map(|kv| kv.truncate(keep)) {
                        Some(Ok(())) => conv.len = keep,
                        // Nothing lost but time: the history is prefilled again.
                        _ => {
                            conv.kv = None;
                            conv.len = 0;
                        }
                    }
                }
            }
        }
        conv.reserved = if conv.slot.is_some() { conv.len } else { 0 };
        conv.busy = true;
        self.stats.prefix_hits += 1;
        // What the cache holds after the cut: the prompt's ids it does not prefill again.
        self.stats.prefix_tokens_reused += conv.len as u64;
        let ids = start.prompt.split_off(shared);
        let Start { max_new, decoding, client, .. } = *start;
        let msg = Continue { conv: id, question: String::new(), max_new, decoding, client };
        self.queue.push_back(Queued::Continue { msg: Box::new(msg), ids });
    }

    /// Brings the prefix cache up to date: finished cached conversations go back in (most
    /// recently used last), and the least recently used beyond its capacity are dropped.
    fn sync_prefix(&mut self) {
        let convs = &self.convs;
        self.prefix.retain(|id| convs.get(id).is_some_and(|c| !c.busy));
        let mut back: Vec<(u64, ConversationId)> = convs
            .iter()
            .filter(|(id, c)| c.cache.is_some() && !c.busy && !self.prefix.contains(**id))
            .map(|(id, c)| (c.last_used, *id))
            .collect();
        back.sort_unstable_by_key(|&(used, id)| (used, id.0));
        for (_, id) in back {
            self.prefix.push(id);
        }
        for id in self.prefix.overflow(self.options.prefix_cache) {
            self.drop_conv(id);
        }
    }

    /// Fails a request that was never admitted.
    fn refuse(&self, client: &Client, e: Error) {
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        let _ = client.events.send(Event::Failed(e));
    }

    fn close(&mut self, id: ConversationId) {
        let Some(conv) = self.convs.get_mut(&id) else { return };
        if conv.busy {
            conv.keep = false;
            return;
        }
        self.drop_conv(id);
    }

    fn drop_conv(&mut self, id: ConversationId) {
        if let Some(conv) = self.convs.remove(&id)
            && let Some(slot) = conv.slot
        {
            self.free_slot(slot);
        }
    }

    fn free_slot(&mut self, slot: usize) {
        self.slots[slot] = None;
        if let Backend::Pool(pool) = &mut self.backend {
            pool.release(slot);
        }
    }

    fn evict(&mut self, id: ConversationId) {
        let Some(conv) = self.convs.get_mut(&id) else { return };
        let slot = conv.slot.take();
        conv.kv = None;
        conv.len = 0;
        conv.reserved = 0;
        if let Some(slot) = slot {
            self.free_slot(slot);
        }
        self.stats.evictions += 1;
    }

    fn reap_cancelled(&mut self) {
        for i in 0..self.running.len() {
            if self.running[i].client.control.cancelled.load(Ordering::Acquire) {
                self.finish(i, FinishReason::Cancelled);
            }
        }
        self.remove_finished();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for q in std::mem::take(&mut self.queue) {
            let client = match &q {
                Queued::Start(s) => &s.client,
                Queued::Continue { msg, .. } => &msg.client,
            };
            if client.control.cancelled.load(Ordering::Acquire) {
                self.cancel_queued(q);
            } else {
                kept.push_back(q);
            }
        }
        self.queue = kept;
    }

    /// Ends a request cancelled before it started: an empty answer, nothing changed.
    fn cancel_queued(&mut self, q: Queued) {
        let (conv, keep, mut decoding, client) = match q {
            Queued::Start(s) => {
                let s = *s;
                (s.conv, false, s.decoding, s.client)
            }
            Queued::Continue { msg, .. } => {
                let msg = *msg;
                (msg.conv, true, msg.decoding, msg.client)
            }
        };
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        let (keep, context_len) = match self.convs.get_mut(&conv) {
            Some(c) => {
                c.busy = false;
                (keep && c.cache.is_none(), c.len)
            }
            None => (false, 0),
        };
        let event = match decoding.finish(self.model.tokenizer(), FinishReason::Cancelled, &mut |_| Flow::Continue) {
            Ok((answer, _)) => Event::Done(Done { answer, conversation: keep.then_some(conv), context_len }),
            Err(e) => Event::Failed(e),
        };
        let _ = client.events.send(event);
    }

    fn held_positions(&self) -> usize {
        self.convs.values().filter(|c| c.slot.is_some()).map(|c| c.reserved).sum()
    }

    /// Admits waiting requests, first come first served, while they fit.
    fn admit(&mut self) {
        while let Some(q) = self.queue.front() {
            let id = q.conv();
            let (appended_len, max_new) = match q {
                Queued::Start(s) => (s.prompt.len(), s.max_new),
                Queued::Continue { msg, ids } => {
                    let unfed = self.convs.get(&id).and_then(|c| c.unfed).is_some();
                    (ids.len() + usize::from(unfed), msg.max_new)
                }
            };
            let (held, history, has_slot) = match self.convs.get(&id) {
                Some(c) => (c.len, c.history.len(), c.slot.is_some()),
                None => (0, 0, false),
            };
            let total = history.saturating_add(appended_len).saturating_add(max_new);
            let limit = self.limit();
            if total > limit {
                let Some(q) = self.queue.pop_front() else { break };
                let err = Error::ContextOverflow { needed: total, max_new, limit };
                self.unqueue(q, err);
                continue;
            }
            let room = Room {
                needs_slot: !has_slot,
                free_slots: self.slots.iter().filter(|s| s.is_none()).count(),
                needs_positions: total - if has_slot { held } else { 0 },
                free_positions: self.budget_positions.saturating_sub(self.held_positions()),
            };
            let idle: Vec<Idle> = self
                .convs
                .iter()
                .filter(|(k, c)| **k != id && c.slot.is_some() && !c.busy)
                .map(|(k, c)| Idle { key: k.0, last_used: c.last_used, held: c.reserved })
                .collect();
            let evict = match plan::evictions(room, &idle) {
                Some(list) if self.running.len() < self.options.max_active => list,
                _ => {
                    if self.options.when_full == WhenFull::Reject {
                        let Some(q) = self.queue.pop_front() else { break };
                        self.unqueue(q, Error::Overloaded(Overload::NoRoom));
                        continue;
                    }
                    break;
                }
            };
            for key in evict {
                self.evict(ConversationId(key));
            }
            let Some(q) = self.queue.pop_front() else { break };
            if let Err((q, e)) = self.start(q, total) {
                self.unqueue(q, e);
            }
        }
    }

    fn unqueue(&mut self, q: Queued, e: Error) {
        match q {
            Queued::Start(s) => self.refuse(&s.client, e),
            Queued::Continue { msg, .. } => {
                if let Some(conv) = self.convs.get_mut(&msg.conv) {
                    conv.busy = false;
                }
                self.refuse(&msg.client, e);
            }
        }
    }

    /// Gives the request a slot and starts its prefill; `total` positions are reserved.
    fn start(&mut self, q: Queued, total: usize) -> std::result::Result<(), (Queued, Error)> {
        let id = q.conv();
        let slot = match self.convs.get(&id).and_then(|c| c.slot) {
            Some(s) => s,
            None => match self.slots.iter().position(Option::is_none) {
                Some(s) => s,
                None => return Err((q, Error::Overloaded(Overload::NoRoom))),
            },
        };
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        let (appended, decoding, client, preprocess_ms, vision_ms, unfed_before) = match q {
            Queued::Start(s) => {
                let s = *s;
                let visual = s.visual.as_ref().map(|v| {
                    let m = self.model.manifest();
                    (if v.is_video { m.tokens.video } else { m.tokens.image }, v.features.clone())
                });
                let (pre, vis) = s.visual.as_ref().map_or((0.0, 0.0), |v| (v.preprocess_ms, v.vision_ms));
                self.convs.insert(
                    id,
                    Conv {
                        slot: None,
                        kv: None,
                        len: 0,
                        history: Vec::new(),
                        unfed: None,
                        visual,
                        keep: s.keep || s.cache.is_some(),
                        cache: s.cache,
                        busy: true,
                        reserved: 0,
                        last_used: self.tick,
                    },
                );
                (s.prompt, s.decoding, s.client, pre, vis, None)
            }
            Queued::Continue { msg, ids } => {
                let msg = *msg;
                let unfed = self.convs.get_mut(&id).and_then(|c| c.unfed.take());
                let mut appended: Vec<u32> = unfed.into_iter().collect();
                appended.extend(ids);
                (appended, msg.decoding, msg.client, 0.0, 0.0, unfed)
            }
        };
        let Some(conv) = self.convs.get_mut(&id) else {
            let _ = client.events.send(Event::Failed(Error::Conversation("closed while its follow-up waited")));
            return Ok(());
        };
        if conv.slot.is_none() {
            conv.slot = Some(slot);
            self.slots[slot] = Some(id);
        }
        if matches!(self.backend, Backend::PerSequence) {
            if conv.kv.is_none() {
                match KvCache::new(&self.model.manifest().model) {
                    Ok(kv) => {
                        conv.kv = Some(kv);
                        conv.len = 0;
                    }
                    Err(e) => {
                        let _ = client.events.send(Event::Failed(e));
                        return Ok(());
                    }
                }
            }
            if let Some(kv) = conv.kv.as_mut() {
                kv.reserve(total);
            }
        }
        conv.reserved = total;
        conv.last_used = self.tick;
        let mut feed = conv.history[conv.len..].to_vec();
        feed.extend_from_slice(&appended);
        let history_before = conv.history.len();
        self.running.push(Running {
            conv: id,
            feed,
            fed: 0,
            appended,
            history_before,
            unfed_before,
            phase: Phase::Prefill,
            decoding,
            client,
            preprocess_ms,
            vision_ms,
            finished: false,
        });
        Ok(())
    }

    fn wait_for_acks(&mut self) {
        let deadline = Instant::now() + ACK_WAIT;
        loop {
            for r in &mut self.running {
                if let Phase::Waiting(id) = r.phase
                    && r.client.control.acked.load(Ordering::Acquire)
                {
                    r.phase = Phase::Ready(id);
                }
            }
            let ready = self.running.iter().any(|r| matches!(r.phase, Phase::Ready(_) | Phase::Prefill));
            let waiting = self.running.iter().any(|r| matches!(r.phase, Phase::Waiting(_)));
            let now = Instant::now();
            if !waiting || now >= deadline {
                if !ready && waiting && !self.has_news() {
                    // Nothing else to do: sleep until an ack, a cancel or a message comes.
                    self.shared.sleep(None);
                }
                return;
            }
            self.shared.sleep(Some(deadline - now));
            if self.running.iter().any(|r| r.client.control.cancelled.load(Ordering::Acquire)) {
                return;
            }
        }
    }

    /// Runs the decode calls for the running requests at `indices`.
    fn decode(&mut self, indices: &[usize]) {
        if indices.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let outcome = self.decode_logits(indices);
        let elapsed = ms(t0.elapsed());
        match outcome {
            Ok(rows) => {
                self.stats.decode_calls += 1;
                self.stats.decode_rows += indices.len() as u64;
                for (&i, logits) in indices.iter().zip(rows) {
                    let r = &mut self.running[i];
                    let Phase::Ready(id) = r.phase else { continue };
                    if r.finished {
                        continue;
                    }
                    r.decoding.timings.decode_ms += elapsed;
                    r.decoding.timings.decode_steps += 1;
                    if let Some(conv) = self.convs.get_mut(&r.conv) {
                        conv.len += 1;
                        conv.history.push(id);
                    }
                    match logits {
                        RowOut::Logits(logits) => self.sample(i, logits),
                        RowOut::Token(id) => {
                            self.stats.argmax_rows += 1;
                            self.take(i, id);
                        }
                    }
                }
            }
            Err(e) => {
                let shared = Arc::new(e);
                for &i in indices {
                    self.fail(i, Error::SharedStep(shared.clone()));
                }
            }
        }
    }

    fn decode_logits(&mut self, indices: &[usize]) -> Result<Vec<RowOut>> {
        let ids: Vec<u32> = indices
            .iter()
            .map(|&i| match self.running[i].phase {
                Phase::Ready(id) => id,
                _ => 0,
            })
            .collect();
        let lm = self.model.language_model();
        let vocab = lm.vocab;
        match &mut self.backend {
            Backend::PerSequence => {
                let mut out = Vec::with_capacity(indices.len());
                for (&i, &id) in indices.iter().zip(&ids) {
                    let conv = self.convs.get_mut(&self.running[i].conv).ok_or(Error::Conversation("lost"))?;
                    let kv = conv.kv.as_mut().ok_or(Error::Conversation("lost its cache"))?;
                    out.push(RowOut::Logits(lm.forward(kv, &[id], None)?));
                }
                Ok(out)
            }
            Backend::Pool(pool) => {
                let mut by_slot: Vec<(usize, usize)> = Vec::with_capacity(indices.len());
                for (k, &i) in indices.iter().enumerate() {
                    let slot = self.convs.get(&self.running[i].conv).and_then(|c| c.slot);
                    by_slot.push((slot.ok_or(Error::Conversation("lost its slot"))?, k));
                }
                by_slot.sort_unstable();
                let slots: Vec<usize> = by_slot.iter().map(|(s, _)| *s).collect();
                // Every row greedy and no client asking for logits: the decoder's ArgMax stands
                // for them.
                let fetch = if self.next_token_output
                    && indices
                        .iter()
                        .all(|&i| self.running[i].decoding.takes_argmax() && !self.running[i].client.logits)
                {
                    Fetch::NextToken
                } else {
                    Fetch::Logits
                };
                let mut out = vec![RowOut::Token(0); indices.len()];
                let mut decoder = self.model.decoder().lock();
                for run in plan::decode_runs(&slots) {
                    let mut rows = Vec::with_capacity(run.len());
                    // Idle rows take token 0: their output is discarded.
                    let mut run_ids = vec![0u32; run.len()];
                    let mut members = Vec::new();
                    for (r, slot) in run.clone().enumerate() {
                        let held = self.slots[slot].and_then(|c| self.convs.get(&c)).map_or(0, |c| c.len);
                        match by_slot.binary_search_by_key(&slot, |(s, _)| *s) {
                            Ok(pos) => {
                                let k = by_slot[pos].1;
                                run_ids[r] = ids[k];
                                rows.push(DecodeRow::Decode { held });
                                members.push((r, k));
                            }
                            Err(_) => rows.push(DecodeRow::Idle { held }),
                        }
                    }
                    let embeds = lm.embed(&run_ids, run.len(), None)?;
                    match pool.decode(&mut decoder, run.start, &rows, embeds, fetch)? {
                        Fetched::Logits(logits) => {
                            for (r, k) in members {
                                out[k] = RowOut::Logits(logits[r * vocab..(r + 1) * vocab].to_vec());
                            }
                        }
                        Fetched::Tokens(ids) => {
                            for (r, k) in members {
                                let id = ids.get(r).copied().unwrap_or(-1);
                                let id =
                                    u32::try_from(id).ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                                        Error::Request(format!("the decoder chose token {id} of {vocab}"))
                                    })?;
                                out[k] = RowOut::Token(id);
                            }
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Feeds `n` more prompt tokens of running request `i`.
    fn prefill(&mut self, i: usize, n: usize) {
        if self.running[i].phase != Phase::Prefill || self.running[i].finished {
            return;
        }
        let t0 = Instant::now();
        match self.prefill_logits(i, n) {
            Ok(logits) => {
                let r = &mut self.running[i];
                r.decoding.timings.prefill_ms += ms(t0.elapsed());
                r.fed += n;
                self.stats.prefill_tokens += n as u64;
                let Some(conv) = self.convs.get_mut(&r.conv) else { return };
                conv.len += n;
                if r.fed == r.feed.len() {
                    conv.history.extend_from_slice(&r.appended);
                    self.sample(i, logits);
                }
            }
            Err(e) => self.fail(i, e),
        }
    }

    fn prefill_logits(&mut self, i: usize, n: usize) -> Result<Vec<f32>> {
        let r = &self.running[i];
        let conv = self.convs.get_mut(&r.conv).ok_or(Error::Conversation("lost"))?;
        let ids = &r.feed[r.fed..r.fed + n];
        // The feed began at position `start`: the history's ids before it are in the cache
        // already, so the features of this chunk's placeholders are numbered after theirs
        // (a feed may start inside the visual span: a prefix cut there, a partial roll-back).
        let start = conv.len.checked_sub(r.fed).ok_or(Error::Conversation("fed more than its cache holds"))?;
        let earlier = conv.history.get(..start).ok_or(Error::Conversation("its cache runs past its history"))?;
        let splice = match conv.visual.as_ref() {
            Some((token, features)) => {
                let count = |ids: &[u32]| ids.iter().filter(|t| *t == token).count();
                let before = count(earlier) + count(&r.feed[..r.fed]);
                let here = count(ids);
                if before + here > features.rows() {
                    return Err(Error::Request(format!(
                        "{} visual placeholders for {} feature rows",
                        before + here,
                        features.rows()
                    )));
                }
                (here > 0).then(|| Splice { token: *token, features, first: before })
            }
            None => None,
        };
        let lm = self.model.language_model();
        match &mut self.backend {
            Backend::PerSequence => {
                let kv = conv.kv.as_mut().ok_or(Error::Conversation("lost its cache"))?;
                lm.forward_logits(kv, ids, splice.as_ref(), 1)
            }
            Backend::Pool(pool) => {
                let slot = conv.slot.ok_or(Error::Conversation("lost its slot"))?;
                let embeds = lm.embed(ids, 1, splice.as_ref())?;
                let mut decoder = self.model.decoder().lock();
                pool.prefill(&mut decoder, slot, conv.len, embeds)
            }
        }
    }

    /// Samples running request `i`'s next token from `logits` and streams it.
    fn sample(&mut self, i: usize, logits: Vec<f32>) {
        self.advance(i, Chosen::Sample(logits));
    }

    /// Streams `id`, the decoder's own argmax, as running request `i`'s next token.
    fn take(&mut self, i: usize, id: u32) {
        self.advance(i, Chosen::Argmax(id));
    }

    fn advance(&mut self, i: usize, chosen: Chosen) {
        let tokenizer = self.model.tokenizer();
        let r = &mut self.running[i];
        let Some(conv) = self.convs.get(&r.conv) else { return };
        let mut delivered = true;
        if r.client.pace == Pace::Lockstep {
            r.client.control.acked.store(false, Ordering::Release);
        }
        let events = &r.client.events;
        let next = match chosen {
            Chosen::Sample(mut logits) => {
                let mut copy = r.client.logits.then(|| logits.clone());
                r.decoding.step(tokenizer, &mut logits, &conv.history, &mut |t| {
                    let event = Event::Token { id: t.id, text: t.text.to_string(), logits: copy.take() };
                    delivered = events.send(event).is_ok();
                    Flow::Continue
                })
            }
            Chosen::Argmax(id) => r.decoding.step_chosen(tokenizer, id, &mut |t| {
                delivered = events.send(Event::Token { id: t.id, text: t.text.to_string(), logits: None }).is_ok();
                Flow::Continue
            }),
        };
        match next {
            Ok(Next::Feed(id)) if delivered => {
                r.phase = if r.client.pace == Pace::Lockstep { Phase::Waiting(id) } else { Phase::Ready(id) };
            }
            Ok(Next::Feed(_)) => self.finish(i, FinishReason::Cancelled),
            Ok(Next::Finished(reason)) => self.finish(i, reason),
            Err(e) => self.fail(i, e),
        }
    }

    /// Restores the conversation of running request `i` to what it was before the request.
    fn roll_back(&mut self, i: usize) {
        let r = &self.running[i];
        let Some(conv) = self.convs.get_mut(&r.conv) else { return };
        conv.history.truncate(r.history_before);
        if r.unfed_before.is_some() {
            conv.unfed = r.unfed_before;
        }
        match &self.backend {
            // Positions past `len` are never read: the slot's earlier contents stay valid.
            Backend::Pool(_) => conv.len = conv.len.min(conv.history.len()),
            // A concatenated cache cannot be cut: the next turn prefills from the history.
            Backend::PerSequence => {
                if conv.len != conv.history.len() {
                    conv.kv = None;
                    conv.len = 0;
                }
            }
        }
    }

    /// Ends running request `i` with an error.
    fn fail(&mut self, i: usize, e: Error) {
        self.roll_back(i);
        let r = &mut self.running[i];
        let id = r.conv;
        let first = r.history_before == 0;
        let _ = r.client.events.send(Event::Failed(e));
        self.mark_finished(i);
        if first {
            self.drop_conv(id);
        }
    }

    /// Ends running request `i` with an answer.
    fn finish(&mut self, i: usize, reason: FinishReason) {
        // Cancelled before its prompt was fed to the end: the part fed does not count. A prompt
        // fed to the end stays (its KV is valid), whenever the answer ended.
        let prefilled = self.running[i].prefilled();
        if !prefilled {
            self.roll_back(i);
        }
        let tokenizer = self.model.tokenizer();
        let r = &mut self.running[i];
        let events = &r.client.events;
        let result = r.decoding.finish(tokenizer, reason, &mut |t| {
            let _ = events.send(Event::Token { id: t.id, text: t.text.to_string(), logits: None });
            Flow::Continue
        });
        let (mut answer, unfed) = match result {
            Ok(done) => done,
            Err(e) => {
                let _ = events.send(Event::Failed(e));
                self.mark_finished(i);
                return;
            }
        };
        answer.timings.preprocess_ms = r.preprocess_ms;
        answer.timings.vision_ms = r.vision_ms;
        let id = r.conv;
        let (keep, context_len) = match self.convs.get_mut(&id) {
            Some(conv) => {
                if prefilled {
                    conv.unfed = unfed;
                }
                conv.busy = false;
                conv.reserved = conv.len;
                conv.last_used = self.tick;
                (conv.keep, conv.len)
            }
            None => (false, 0),
        };
        let exposed = keep && self.convs.get(&id).is_some_and(|c| c.cache.is_none());
        let done = Done { answer, conversation: exposed.then_some(id), context_len };
        let _ = r.client.events.send(Event::Done(done));
        self.mark_finished(i);
        // A cached conversation with neither KV nor visual features (a text prompt cancelled
        // before it was fed) would only take a place in the cache.
        let empty = self.convs.get(&id).is_some_and(|c| c.cache.is_some() && c.len == 0 && c.visual.is_none());
        if !keep || empty {
            self.drop_conv(id);
        }
    }

    /// Marks running request `i` for removal at the end of the step (indices stay valid).
    fn mark_finished(&mut self, i: usize) {
        let r = &mut self.running[i];
        r.finished = true;
        if let Some(conv) = self.convs.get_mut(&r.conv) {
            conv.busy = false;
            conv.reserved = conv.len;
        }
    }

    fn remove_finished(&mut self) {
        self.running.retain(|r| !r.finished);
    }

    fn publish(&mut self) {
        self.sync_prefix();
        self.stats.prefix_cached = self.prefix.len();
        let active: usize = self.convs.values().filter(|c| c.slot.is_some() && c.busy).map(|c| c.reserved).sum();
        self.stats.kv_bytes_active = active as u64 * self.bytes_per_position;
        self.stats.waiting = self.shared.waiting.load(Ordering::Acquire);
        self.stats.active = self.running.len();
        self.stats.conversations = self.convs.len();
        self.stats.kv_bytes_held = self.held_positions() as u64 * self.bytes_per_position;
        self.stats.kv_bytes_peak = self.stats.kv_bytes_peak.max(self.stats.kv_bytes_held);
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.stats.clone();
    }

    fn stop_all(&mut self) {
        for r in self.running.drain(..) {
            let _ = r.client.events.send(Event::Failed(Error::EngineStopped));
        }
        for q in std::mem::take(&mut self.queue) {
            self.unqueue(q, Error::EngineStopped);
        }
        let msgs: Vec<Msg> = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for msg in msgs {
            match msg {
                Msg::Start(s) => self.refuse(&s.client, Error::EngineStopped),
                Msg::Lookup(l) => self.refuse(&l.start.client, Error::EngineStopped),
                Msg::Continue(c) => self.refuse(&c.client, Error::EngineStopped),
                Msg::Close(_) => {}
            }
        }
    }
}
