//! The prefix cache: finished conversations kept so that a later request about the same media
//! whose prompt starts with the same tokens (a stateless API's follow-up, or another question
//! about the same video) continues from their KV cache instead of running vision and prefill
//! again.
//!
//! Entries are conversations the scheduler owns; this index holds their order (least recently
//! used first) and decides what a match is worth. A request takes its entry out while it runs
//! (no two requests share one cache), and the entry comes back when the answer is done.
use std::collections::VecDeque;

use super::request::ConversationId;

/// Shared tokens worth truncating a cached conversation for, when they are not the whole of
/// it: below this, a fresh prefill costs about as much as the re-feed, and the cached
/// conversation is worth more kept whole.
pub(crate) const MIN_SHARED: usize = 32;

/// How many leading ids of `prompt` a cached conversation holds (its history, then the last
/// answer's unfed token), leaving at least one id of `prompt` to feed.
pub(crate) fn shared_len(history: &[u32], unfed: Option<u32>, prompt: &[u32]) -> usize {
    let held = history.iter().copied().chain(unfed);
    let common = held.zip(prompt).take_while(|(a, b)| a == *b).count();
    common.min(prompt.len().saturating_sub(1))
}

/// Whether a cached conversation of `held` ids, sharing `shared` of them with a new prompt and
/// holding the KV of `reusable` of those, is worth taking: all of it continues, or enough of
/// it, or its visual features (a conversation with media skips the vision graph whatever it
/// shares). Shared ids without their KV (an evicted conversation) are prefilled again: they
/// alone are worth nothing.
pub(crate) fn worth_taking(shared: usize, held: usize, reusable: usize, has_visual: bool) -> bool {
    has_visual || (reusable > 0 && (shared == held || reusable >= MIN_SHARED))
}

/// The cached conversations, least recently used first.
#[derive(Debug, Default)]
pub(crate) struct PrefixIndex {
    order: VecDeque<ConversationId>,
}

impl PrefixIndex {
    /// Cached conversations, most recently used first.
    pub(crate) fn recent_first(&self) -> impl Iterator<Item = ConversationId> + '_ {
        self.order.iter().rev().copied()
    }

    pub(crate) fn contains(&self, id: ConversationId) -> bool {
        self.order.contains(&id)
    }

    /// Takes `id` out (a request now runs on it).
    pub(crate) fn take(&mut self, id: ConversationId) {
        self.order.retain(|&c| c != id);
    }

    /// Puts `id` back as the most recently used.
    pub(crate) fn push(&mut self, id: ConversationId) {
        self.take(id);
        self.order.push_back(id);
    }

    /// Keeps only the conversations `keep` accepts.
    pub(crate) fn retain(&mut self, keep: impl FnMut(&ConversationId) -> bool) {
        self.order.retain(keep);
    }

    /// Removes and returns the least recently used entries beyond `capacity`.
    pub(crate) fn overflow(&mut self, capacity: usize) -> Vec<ConversationId> {
        let n = self.order.len().saturating_sub(capacity);
        self.order.drain(..n).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_len_counts_history_then_unfed_and_leaves_one_to_feed() {
        assert_eq!(shared_len(&[1, 2, 3], None, &[1, 2, 3, 4, 5]), 3);
        assert_eq!(shared_len(&[1, 2, 3], Some(4), &[1, 2, 3, 4, 5]), 4);
        assert_eq!(shared_len(&[1, 2, 3], Some(9), &[1, 2, 3, 4, 5]), 3);
        assert_eq!(shared_len(&[1, 7, 3], None, &[1, 2, 3, 4]), 1);
        // The same prompt again: one id is fed anyway, for its logits.
        assert_eq!(shared_len(&[1, 2, 3], None, &[1, 2, 3]), 2);
        assert_eq!(shared_len(&[1, 2, 3], None, &[]), 0);
    }

    #[test]
    fn worth_taking_whole_conversations_long_prefixes_or_media() {
        assert!(worth_taking(10, 10, 10, false));
        assert!(!worth_taking(10, 40, 10, false));
        assert!(worth_taking(MIN_SHARED, 400, MIN_SHARED, false));
        assert!(worth_taking(0, 400, 0, true));
        assert!(!worth_taking(0, 0, 0, false));
    }

    #[test]
    fn shared_ids_without_their_kv_are_not_worth_taking() {
        // Evicted (or never filled): the shared ids would all be prefilled again.
        assert!(!worth_taking(10, 10, 0, false));
        assert!(!worth_taking(400, 400, 0, false));
        // A long share of which little KV is left is not worth cutting the conversation for.
        assert!(!worth_taking(400, 500, MIN_SHARED - 1, false));
        // Its visual features still skip the vision graph.
        assert!(worth_taking(400, 400, 0, true));
    }

    #[test]
    fn index_orders_by_use_and_overflows_oldest_first() {
        let c = ConversationId;
        let mut ix = PrefixIndex::default();
        for i in 1..=4 {
            ix.push(c(i));
        }
        ix.push(c(1));
        assert_eq!(ix.recent_first().collect::<Vec<_>>(), vec![c(1), c(4), c(3), c(2)]);
        ix.take(c(4));
        assert!(!ix.contains(c(4)));
        assert_eq!(ix.overflow(2), vec![c(2)]);
        assert_eq!(ix.recent_first().collect::<Vec<_>>(), vec![c(1), c(3)]);
        ix.retain(|&id| id != c(3));
        assert_eq!(ix.len(), 1);
    }
}
