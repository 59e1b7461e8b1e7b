//! Data preparation: JSONL in, packed token shards out (`ferrotune prepare`).
//!
//! ```text
//! jsonl (read, batch) ─> mask (template + tokenizer, every core) ─> pack (BFD) ─> shard (safetensors)
//! ```
//!
//! [`mix`] samples several sources into one folder with per-token task ids.
//! [`prepare::prepare`] runs the whole pipeline with bounded memory; the shard layout is documented
//! in [`shard`] and in `docs/data.md`.

pub mod bpe;
pub mod jsonl;
pub mod mask;
pub mod mix;
pub mod pack;
pub mod prepare;
pub mod shard;
pub mod template;
pub mod tokenize;

pub use prepare::{prepare, PrepareConfig, Progress, Summary};
pub use tokenize::Tokenizer;

/// Lower-case hex sha256 of `bytes` (tokenizer and template hashes in manifests).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
