//! Files: safetensors reading (memory-mapped, validated against hostile headers), atomic writing
//! (appended, or written piece by piece into a reserved file),
//! and Hugging Face checkpoints that are one file or sharded behind `model.safetensors.index.json`.

pub mod atomic;
pub mod checkpoint;
pub mod dtype;
pub mod reserved;
pub mod safetensors;

pub use atomic::AtomicFile;
pub use checkpoint::Checkpoint;
pub use dtype::Dtype;
pub use reserved::{ReservedSafetensorsWriter, ReservedTensor};
pub use safetensors::{SafeTensors, SafetensorsWriter, TensorInfo, TensorSpec};
