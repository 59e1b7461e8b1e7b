//! Files: safetensors reading (memory-mapped, validated against hostile headers), atomic writing,
//! and Hugging Face checkpoints that are one file or sharded behind `model.safetensors.index.json`.

pub mod atomic;
pub mod checkpoint;
pub mod dtype;
pub mod safetensors;

pub use atomic::AtomicFile;
pub use checkpoint::Checkpoint;
pub use dtype::Dtype;
pub use safetensors::{SafeTensors, SafetensorsWriter, TensorInfo, TensorSpec};
