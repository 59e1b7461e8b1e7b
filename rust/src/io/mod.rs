//! Files: safetensors reading (memory-mapped, validated against hostile headers), atomic writing
//! (appended, or filled in place through a shared map),
//! and Hugging Face checkpoints that are one file or sharded behind `model.safetensors.index.json`.

pub mod atomic;
pub mod checkpoint;
pub mod dtype;
pub mod mapped;
pub mod safetensors;

pub use atomic::AtomicFile;
pub use checkpoint::Checkpoint;
pub use dtype::Dtype;
pub use mapped::{MappedSafetensorsWriter, MappedTensor};
pub use safetensors::{SafeTensors, SafetensorsWriter, TensorInfo, TensorSpec};
