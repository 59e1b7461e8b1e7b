//! 4-bit quantization.
