"""4-bit quantization: bitsandbytes-exact NF4/FP4 (Rust), NF4Linear, GPTQ bases, QLoRA."""
