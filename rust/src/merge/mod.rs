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
pub mod stream;
pub mod svd;

pub use adapter::{Adapter, LoraConfig, TargetModules};
pub use apply::{merge_adapter, MergeOptions, MergeSummary};
