//! Throughput of `FastBpe::encode_batch` on a JSONL corpus, without Python in the way.
//!
//!     cargo run --release --example bpe_throughput -- /tmp/corpus/raw.jsonl /tmp/corpus/tokenizer.json [reps]
//!
//! Prints wall-clock tokens/s and tokens per CPU-second (user + system time of the process, read
//! from /proc; robust when the machine is shared). RAYON_NUM_THREADS sets the threads.

use std::time::Instant;

use _native::data::bpe::FastBpe;

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, corpus, tokenizer, rest @ ..] = args.as_slice() else {
        return Err("usage: bpe_throughput CORPUS.jsonl TOKENIZER.json [REPS]".into());
    };
    let reps: usize = rest.first().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let texts: Vec<String> = std::fs::read_to_string(corpus)?
        .lines()
        .map(|line| -> Result<String, serde_json::Error> {
            let v: serde_json::Value = serde_json::from_str(line)?;
            Ok(v["text"].as_str().unwrap_or_default().to_string())
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    let bpe = FastBpe::from_tokenizer_json(&std::fs::read_to_string(tokenizer)?)?
        .ok_or("tokenizer not supported by FastBpe")?;
    for rep in 0..reps {
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let ids = bpe.encode_batch(&refs);
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        let tokens: usize = ids.iter().map(Vec::len).sum();
        println!(
            "rep {rep}: {} docs, {:.1} MB, {tokens} tokens: wall {wall:.3} s = {:.2} M tokens/s; cpu {cpu:.2} s = {:.2} M tokens/cpu-s",
            texts.len(),
            bytes as f64 / 1e6,
            tokens as f64 / wall / 1e6,
            tokens as f64 / cpu / 1e6
        );
    }
    Ok(())
}
