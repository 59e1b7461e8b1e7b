"""The model shapes the GPU benchmarks share (random weights; the peer's `hf_peer_gpu.py` uses the
same): Llama-3.1-8B and Llama-3.2-1B, and the LoRA targets of the peer's runs."""

L8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
           rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
L1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
           rms_norm_eps=1e-5, tie_word_embeddings=True)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
