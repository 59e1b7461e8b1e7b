"""The native merge probe (`rust/src/merge/forward.rs`, `probe.rs`) against its references:
transformers' logits for every supported family (random-init tiny checkpoints made here), PEFT's
unmerged logits for adapters of every kind, our torch probe (`ferrotune.probe_reference`) for the
report; a deliberately corrupted merge must be flagged; `ferrotune merge` must not import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ferrotune import _native
from ferrotune.io import load_checkpoint, save_safetensors, to_torch
from ferrotune.merge import merge_adapter
from ferrotune.models import load_model
from ferrotune.probe import probe_inputs, probe_merge
from ferrotune.probe_reference import probe_merge_reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# family -> (config class, overrides, adapter settings exercising that family's parts)
FAMILIES = {
    "llama3": (
        transformers.LlamaConfig,
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        dict(
            r=8,
            lora_alpha=16,
            target_modules=[*LINEARS, "embed_tokens"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 4},
            alpha_pattern={"v_proj": 5},
            modules_to_save=["lm_head"],
        ),
    ),
    "llama2_tied": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, num_key_value_heads=4),
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    ),
    "mistral_window": (
        transformers.MistralConfig,
        dict(sliding_window=7, head_dim=16),
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=LINEARS),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(rope_theta=1000000.0, tie_word_embeddings=False),
        dict(
            r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"]
        ),  # biased layers
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(head_dim=32, tie_word_embeddings=True),
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"]),
    ),
}


def make_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random transformers model whose every parameter (biases, norms included) is non-trivial."""
    config_cls, overrides, _ = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def make_adapter(model, folder, seed=1, **lora_kwargs):
    """A PEFT adapter on `model` with every LoRA part random (PEFT starts B at zero)."""
    config = peft.LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return peft_model.eval()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, transformers model, base folder, PEFT model, adapter folder)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = make_hf_model(name)
    hf.save_pretrained(root / "base", safe_serialization=True)
    reference = make_hf_model(name)  # the same weights: PEFT wraps this copy in place
    peft_model = make_adapter(reference, root / "adapter", **FAMILIES[name][2])
    return name, hf, root / "base", peft_model, root / "adapter"


def native_logits(model, ids, adapter=None) -> torch.Tensor:
    return to_torch(_native.probe_logits(str(model), ids, adapter=None if adapter is None else str(adapter)))


def test_native_logits_match_transformers_and_ours(family):
    name, hf, base, _, _ = family
    ids = probe_inputs(TINY["vocab_size"], 2, 40, seed=5)  # 40 > llama3's original context, > window
    got = native_logits(base, ids)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids)).logits
        ours = load_model(base, dtype=torch.float32).eval()(torch.tensor(ids))
    assert got.shape == expected.shape == (2, 40, TINY["vocab_size"])
    assert relative_error(got, expected) < 1e-5, name
    assert relative_error(got, ours) < 1e-5, name


def test_native_unmerged_logits_match_peft(family):
    name, _, base, peft_model, adapter = family
    ids = probe_inputs(TINY["vocab_size"], 2, 12, seed=6)
    got = native_logits(base, ids, adapter)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(ids)).logits
        plain = native_logits(base, ids)
    assert relative_error(got, expected) < 1e-5, name
    assert relative_error(plain, expected) > 1e-2, name  # the adapter changes the logits


def test_native_probe_report_matches_the_torch_reference(family, tmp_path):
    name, _, base, peft_model, adapter = family
    summary = merge_adapter(base, adapter, tmp_path / "out")
    native = summary["probe"]
    reference = probe_merge_reference(base, adapter, tmp_path / "out")
    assert native.engine == "native" and reference.engine == "torch"
    assert native.ok and reference.ok, name
    # f32 checkpoints: the merge only reorders sums, both probes see the same model
    assert native.divergence < 1e-4 * native.max_logit and reference.divergence < 1e-4 * reference.max_logit
    assert native.adapter_effect == pytest.approx(reference.adapter_effect, rel=1e-4)
    assert native.max_logit == pytest.approx(reference.max_logit, rel=1e-4)
    # and the merged model is PEFT's merge_and_unload, as transformers runs it
    ids = probe_inputs(TINY["vocab_size"], 2, 12, seed=7)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(ids)).logits
    assert relative_error(native_logits(tmp_path / "out", ids), expected) < 1e-5, name


def corrupt(out, base, names, how):
    """Rewrites tensors `names` of the merged folder `out` with `how(merged, base)`."""
    merged = {k: v.clone() for k, v in load_checkpoint(out).items()}
    base_tensors = load_checkpoint(base)
    for n in names:
        merged[n] = how(merged[n], base_tensors[n])
    save_safetensors(merged, out / "model.safetensors")


def test_a_corrupted_merge_triggers_the_warning(tmp_path):
    hf = make_hf_model("llama3")
    hf.save_pretrained(tmp_path / "base")
    make_adapter(hf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LINEARS)
    out = tmp_path / "out"
    assert merge_adapter(tmp_path / "base", tmp_path / "adapter", out)["probe"].ok
    targets = [
        f"model.layers.{i}.{part}.weight" for i in range(2) for part in ("self_attn.q_proj", "mlp.up_proj")
    ]
    # the update subtracted instead of added: W - s·BA
    corrupt(out, tmp_path / "base", targets, lambda merged, base: 2 * base - merged)
    report = probe_merge(tmp_path / "base", tmp_path / "adapter", out)
    assert not report.ok and report.relative_divergence > 0.5
    assert "WARNING" in report.summary()
    # a weight gone to NaN is flagged too
    corrupt(out, tmp_path / "base", targets[:1], lambda merged, base: merged * float("nan"))
    report = probe_merge(tmp_path / "base", tmp_path / "adapter", out)
    assert not report.ok and "WARNING" in report.summary()


def test_a_4bit_base_runs_on_its_dequantized_weights(tmp_path):
    hf = make_hf_model("qwen2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "base")
    _native.quantize_checkpoint_dir(
        str(tmp_path / "base"),
        str(tmp_path / "nf4"),
        blocksize=64,
        quant_type="nf4",
        double_quant=True,
        skip=None,
        progress=False,
    )
    make_adapter(hf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LINEARS)
    # the same model with the dequantized weights stored plainly in bf16
    plain = tmp_path / "dequantized"
    plain.mkdir()
    tensors = {
        n: to_torch(t).clone()
        for n, t in _native.read_dequantized(str(tmp_path / "nf4/model.safetensors"), "")
    }
    save_safetensors(tensors, plain / "model.safetensors")
    (plain / "config.json").write_text((tmp_path / "base/config.json").read_text())
    ids = probe_inputs(TINY["vocab_size"], 2, 8)
    for adapter in (None, tmp_path / "adapter"):
        torch.testing.assert_close(
            native_logits(tmp_path / "nf4", ids, adapter), native_logits(plain, ids, adapter), rtol=0, atol=0
        )
    assert not torch.equal(native_logits(tmp_path / "nf4", ids), native_logits(tmp_path / "base", ids))


def test_merge_cli_never_imports_torch(tmp_path):
    hf = make_hf_model("qwen3")
    hf.save_pretrained(tmp_path / "base")
    make_adapter(hf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LINEARS)
    script = (
        "import json, sys\n"
        "from ferrotune.cli import main\n"
        f"rc = main(['merge', {str(tmp_path / 'base')!r}, {str(tmp_path / 'adapter')!r}, {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps({'rc': rc, 'torch': sorted(m for m in sys.modules if m.split('.')[0] == 'torch')}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "torch": []}
    assert "probe (2 inputs x 8 tokens)" in run.stdout and ": ok" in run.stdout


def test_the_torch_reference_runs_where_the_native_probe_declines(tmp_path, monkeypatch):
    hf = make_hf_model("llama2_tied")
    hf.save_pretrained(tmp_path / "base")
    make_adapter(hf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LINEARS)
    summary = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", probe=False)
    assert "probe" not in summary

    def declines(*args, inputs, tokens, **kwargs):
        return {"supported": False, "reason": "a test case", "inputs": inputs, "tokens": tokens}

    monkeypatch.setattr(_native, "probe_merge", declines)
    report = probe_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.engine == "torch" and report.ok
    assert "does not cover a test case" in report.summary()


def test_an_architecture_no_probe_covers_is_merged_with_a_warning(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config)
    gpt2.save_pretrained(tmp_path / "base")
    make_adapter(
        gpt2, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    summary = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert summary["probe"] is None
    assert any("probe not run" in w and "gpt2" in w for w in summary["warnings"])
