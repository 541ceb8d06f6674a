//! Decode latency at a long context, for comparing KV layouts: prefills `CONTEXT` filler tokens
//! (text only), then times `STEPS` single-token decode steps.
//!
//! `cargo run --release -p vl-runtime --example kv_decode -- ENGINE_DIR [CONTEXT] [STEPS] [THREADS]`
use std::hint::black_box;
use std::time::Instant;

use vl_runtime::kv_cache::KvCache;
use vl_runtime::{Pipeline, PipelineOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let engine = args.get(1).ok_or("usage: kv_decode ENGINE_DIR [CONTEXT] [STEPS] [THREADS]")?;
    let context: usize = args.get(2).map_or(Ok(2000), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let mut options = PipelineOptions::default();
    options.session.threads = args.get(4).map(|s| s.parse()).transpose()?;
    let p = Pipeline::load(engine, options)?;
    let m = p.manifest();
    let vocab = m.model.vocab_size as u32;
    let ids: Vec<u32> = (0..context as u32).map(|i| 3 + (i * 7919) % (vocab - 3)).collect();
    let lm = p.language_model();
    let mut kv = KvCache::new(&m.model)?;
    kv.reserve(context + steps);
    let t = Instant::now();
    let mut logits = lm.forward(&mut kv, &ids, None)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let next = logits.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        let t = Instant::now();
        logits = black_box(lm.forward(&mut kv, &[next as u32], None)?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / steps as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{engine} layout {:?}: prefill {context} tokens {prefill_ms:.0} ms; decode {steps} steps mean {mean:.1} ms/token, \
         median {:.1}, min {:.1}; kv capacity {}",
        kv.layout(),
        sorted[steps / 2],
        sorted[0],
        kv.capacity()
    );
    Ok(())
}
