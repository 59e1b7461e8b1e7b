//! Data preparation: JSONL in, packed token shards out.

pub mod bpe;
