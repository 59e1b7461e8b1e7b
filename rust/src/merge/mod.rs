//! Adapter merging and export: PEFT LoRA adapters merged into Hugging Face checkpoints
//! (streamed, bounded memory) and probed (a native f32 forward pass, merged vs unmerged logits),
//! adapters combined and extracted, models exported to GGUF.

pub mod adapter;
pub mod apply;
pub mod combine;
pub mod convert;
pub mod dense;
pub mod extract;
pub mod forward;
pub mod gguf;
pub mod lora;
pub mod probe;
pub mod quantized;
pub mod spm;
pub mod stream;
pub mod svd;

pub use adapter::{Adapter, LoraConfig, TargetModules};
pub use apply::{merge_adapter, MergeOptions, MergeSummary};

/// Deterministic test data shared by the merge module's tests.
#[cfg(test)]
pub(crate) mod test_data {
    /// `n` values in [-0.5, 0.5) from a xorshift stream fixed by `seed`.
    pub fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }
}
