//! The scheduling decisions, kept free of ONNX Runtime so that fixed schedules can be tested:
//! which running sequences decode this step, how much prompt each prefilling one feeds, how
//! decode rows group into calls, and which idle conversations make room.
use std::ops::Range;

/// A running sequence as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqState {
    /// Prompt tokens still to feed.
    Prefill { remaining: usize },
    /// Has a token to feed (decode).
    Ready,
    /// Waits for its receiver (lockstep pacing).
    Waiting,
}

/// What one step runs.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StepPlan {
    /// Indices (into the running list) that decode one token each, in one or a few calls.
    pub decode: Vec<usize>,
    /// `(index, tokens)`: prefill chunks, one call each, after the decode calls.
    pub prefill: Vec<(usize, usize)>,
}

/// Decode first: every ready sequence decodes. Then prefill chunks, first come first served
/// (the running list is in admission order), within `chunk_budget` prompt tokens per step. A
/// step that has nothing to decode still prefills at least one chunk.
pub(crate) fn plan_step(states: &[SeqState], chunk_budget: usize) -> StepPlan {
    let mut plan = StepPlan::default();
    let mut budget = chunk_budget.max(1);
    for (i, s) in states.iter().enumerate() {
        match *s {
            SeqState::Ready => plan.decode.push(i),
            SeqState::Prefill { remaining } if budget > 0 && remaining > 0 => {
                let n = remaining.min(budget);
                budget -= n;
                plan.prefill.push((i, n));
            }
            _ => {}
        }
    }
    plan
}

/// Idle slots a decode call may carry along rather than splitting in two.
const MAX_GAP: usize = 2;

/// Groups sorted, distinct slot numbers into runs of consecutive slots for decode calls: a run
/// continues over a gap of at most [`MAX_GAP`] slots that do not decode (they ride along as
/// idle rows: a little compute for a short gap costs less than reading all weights again).
pub(crate) fn decode_runs(slots: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &s in slots {
        match runs.last_mut() {
            Some(r) if s >= r.end && s - r.end <= MAX_GAP => r.end = s + 1,
            _ => runs.push(s..s + 1),
        }
    }
    runs
}

/// An idle conversation that holds a slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idle {
    /// Its key (an index the caller understands).
    pub key: u64,
    /// When it was last used (larger is more recent).
    pub last_used: u64,
    /// Positions it holds.
    pub held: usize,
}

/// The room a request needs and what is free.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Whether the request needs a slot (it has none of its own).
    pub needs_slot: bool,
    /// Free slots.
    pub free_slots: usize,
    /// Positions the request needs beyond what it holds.
    pub needs_positions: usize,
    /// Positions left in the budget.
    pub free_positions: usize,
}

/// The idle conversations to evict, least recently used first, so that the request fits; `None`
/// if even evicting all of them would not make room.
pub(crate) fn evictions(room: Room, idle: &[Idle]) -> Option<Vec<u64>> {
    let mut order: Vec<Idle> = idle.to_vec();
    order.sort_by_key(|i| i.last_used);
    let (mut slots, mut positions) = (room.free_slots, room.free_positions);
    let mut chosen = Vec::new();
    let fits = |slots: usize, positions: usize| (!room.needs_slot || slots > 0) && positions >= room.needs_positions;
    for i in order {
        if fits(slots, positions) {
            break;
        }
        slots += 1;
        positions += i.held;
        chosen.push(i.key);
    }
    fits(slots, positions).then_some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_comes_first_and_prefill_shares_the_budget_in_arrival_order() {
        use SeqState::*;
        let states = [Prefill { remaining: 700 }, Ready, Waiting, Prefill { remaining: 100 }, Ready];
        let plan = plan_step(&states, 512);
        assert_eq!(plan.decode, vec![1, 4]);
        assert_eq!(plan.prefill, vec![(0, 512)]);
        let plan =
            plan_step(&[Prefill { remaining: 300 }, Prefill { remaining: 100 }, Prefill { remaining: 900 }], 512);
        assert_eq!(plan.prefill, vec![(0, 300), (1, 100), (2, 112)]);
    }

    #[test]
    fn a_zero_budget_still_prefills_one_token() {
        let plan = plan_step(&[SeqState::Prefill { remaining: 10 }], 0);
        assert_eq!(plan.prefill, vec![(0, 1)]);
    }

    #[test]
    fn runs_bridge_short_gaps_only() {
        assert_eq!(decode_runs(&[0, 1, 2]), vec![0..3]);
        assert_eq!(decode_runs(&[0, 2, 5]), vec![0..6]);
        assert_eq!(decode_runs(&[0, 4, 5, 9]), vec![0..1, 4..6, 9..10]);
        assert!(decode_runs(&[]).is_empty());
    }

    #[test]
    fn eviction_takes_the_least_recently_used_until_the_request_fits() {
        let idle = [
            Idle { key: 1, last_used: 30, held: 100 },
            Idle { key: 2, last_used: 10, held: 50 },
            Idle { key: 3, last_used: 20, held: 400 },
        ];
        let room = Room { needs_slot: true, free_slots: 0, needs_positions: 300, free_positions: 0 };
        assert_eq!(evictions(room, &idle), Some(vec![2, 3]));
        let room = Room { needs_slot: true, free_slots: 1, needs_positions: 10, free_positions: 10 };
        assert_eq!(evictions(room, &idle), Some(vec![]));
        let room = Room { needs_slot: false, free_slots: 0, needs_positions: 10_000, free_positions: 0 };
        assert_eq!(evictions(room, &idle), None);
    }
}
