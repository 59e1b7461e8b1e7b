//! Adapter merging and export: PEFT LoRA adapters merged into Hugging Face checkpoints
//! (streamed, bounded memory), adapters combined and extracted, models exported to GGUF.

pub mod adapter;
pub mod apply;
pub mod convert;
pub mod lora;
pub mod stream;

pub use adapter::{Adapter, LoraConfig, TargetModules};
pub use apply::{merge_adapter, MergeOptions, MergeSummary};
