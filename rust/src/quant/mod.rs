//! 4-bit quantization: blockwise NF4/FP4 with double-quantized scales, bit for bit as
//! bitsandbytes' CUDA kernels produce them (`nf4`), and whole checkpoints streamed into the
//! transformers + bitsandbytes 4-bit layout (`checkpoint`).

pub mod checkpoint;
pub mod nf4;

pub use checkpoint::{quantize_checkpoint, QuantizeOptions, QuantizeSummary};
pub use nf4::{
    dequantize_4bit, dequantize_4bit_into, dequantize_nested, dynamic_map_signed, quantize_4bit,
    quantize_nested, NestedAbsmax, QuantType, Quantized4bit,
};
