//! `GET /metrics`: what the server and its engine are doing, in the OpenMetrics text format that
//! Prometheus scrapes. Request counts, generated tokens and latencies are recorded as requests
//! go; queue depth, active sequences, KV memory and the prefix cache are read from the engine at
//! each scrape.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use vl_runtime::engine::EngineStats;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    generated_tokens: Counter,
    time_to_first_token: Histogram,
    time_per_token: Histogram,
    queue_depth: Gauge,
    active_sequences: Gauge,
    kv_bytes_in_use: Gauge,
    kv_bytes_idle: Gauge,
    kv_bytes_budget: Gauge,
    prefix_cached: Gauge,
    prefix_hits: Counter,
    prefix_tokens_reused: Counter,
    evictions: Counter,
    /// Serializes scrapes (the engine's counters are copied into ours by difference).
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The series, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vl");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Chat completion requests, by HTTP status", requests.clone());
        let generated_tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated", generated_tokens.clone());
        let time_to_first_token = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register_with_unit(
            "time_to_first_token",
            "From the request's arrival to its first generated token",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let time_per_token = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register_with_unit(
            "time_per_output_token",
            "Between consecutive generated tokens of a request",
            Unit::Seconds,
            time_per_token.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let queue_depth = gauge(&mut registry, "queue_depth", "Requests waiting for vision or for room");
        let active_sequences = gauge(&mut registry, "active_sequences", "Sequences prefilling or decoding");
        let kv_bytes_in_use =
            gauge(&mut registry, "kv_in_use_bytes", "KV cache bytes held or reserved by active sequences");
        let kv_bytes_idle =
            gauge(&mut registry, "kv_idle_bytes", "KV cache bytes held by idle conversations (the prefix cache)");
        let kv_bytes_budget = gauge(&mut registry, "kv_budget_bytes", "KV cache bytes the engine may hold");
        let prefix_cached = gauge(&mut registry, "prefix_cache_conversations", "Conversations in the prefix cache");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let prefix_hits = counter(&mut registry, "prefix_cache_hits", "Requests continued from a cached conversation");
        let prefix_tokens_reused =
            counter(&mut registry, "prefix_cache_reused_tokens", "Prompt tokens not prefilled thanks to the cache");
        let evictions = counter(&mut registry, "kv_evictions", "Idle conversations evicted from the KV cache for room");
        Self {
            registry,
            requests,
            generated_tokens,
            time_to_first_token,
            time_per_token,
            queue_depth,
            active_sequences,
            kv_bytes_in_use,
            kv_bytes_idle,
            kv_bytes_budget,
            prefix_cached,
            prefix_hits,
            prefix_tokens_reused,
            evictions,
            scrape: Mutex::new(()),
        }
    }

    /// Counts a reply by its status.
    pub fn request(&self, status: u16) {
        self.requests.get_or_create(&vec![("status", status.to_string())]).inc();
    }

    /// Records one generated token of a request that arrived at `arrived`; `last` is the time
    /// of its previous token (`None` for the first).
    pub fn token(&self, arrived: Instant, last: Option<Instant>, now: Instant) {
        self.generated_tokens.inc();
        match last {
            None => self.time_to_first_token.observe(secs(now - arrived)),
            Some(t) => self.time_per_token.observe(secs(now - t)),
        }
    }

    /// The exposition, with the engine's state as of `stats`.
    pub fn render(&self, stats: &EngineStats) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.queue_depth.set(int(stats.waiting as u64));
        self.active_sequences.set(int(stats.active as u64));
        self.kv_bytes_in_use.set(int(stats.kv_bytes_active));
        self.kv_bytes_idle.set(int(stats.kv_bytes_held.saturating_sub(stats.kv_bytes_active)));
        self.kv_bytes_budget.set(int(stats.kv_budget_bytes));
        self.prefix_cached.set(int(stats.prefix_cached as u64));
        for (counter, total) in [
            (&self.prefix_hits, stats.prefix_hits),
            (&self.prefix_tokens_reused, stats.prefix_tokens_reused),
            (&self.evictions, stats.evictions),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_the_engine_state() {
        let m = Metrics::new();
        m.request(200);
        m.request(429);
        m.request(200);
        let t0 = Instant::now();
        m.token(t0, None, t0 + Duration::from_millis(30));
        m.token(t0, Some(t0), t0 + Duration::from_millis(35));
        let stats = EngineStats {
            waiting: 3,
            active: 2,
            kv_bytes_held: 1000,
            kv_bytes_active: 600,
            prefix_hits: 5,
            ..EngineStats::default()
        };
        let text = m.render(&stats);
        for line in [
            "vl_requests_total{status=\"200\"} 2",
            "vl_requests_total{status=\"429\"} 1",
            "vl_generated_tokens_total 2",
            "vl_time_to_first_token_seconds_count 1",
            "vl_time_per_output_token_seconds_count 1",
            "vl_queue_depth 3",
            "vl_active_sequences 2",
            "vl_kv_in_use_bytes 600",
            "vl_kv_idle_bytes 400",
            "vl_prefix_cache_hits_total 5",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        // Counters follow the engine's totals, however often it is scraped.
        let again = m.render(&EngineStats { prefix_hits: 7, ..stats });
        assert!(again.contains("vl_prefix_cache_hits_total 7"), "{again}");
        assert!(text.ends_with("# EOF\n"));
    }
}
