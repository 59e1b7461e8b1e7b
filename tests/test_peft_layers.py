"""LoRA / rsLoRA / DoRA / PiSSA / IA3 layer math and PEFT file I/O on a small torch module,
against HF PEFT's own layers (peft as a test-only oracle)."""

from __future__ import annotations

import copy
import json
import warnings

import ferrotune.peft as fp
import pytest
import torch
from ferrotune.errors import ConfigError, FormatError
from ferrotune.peft.lora import LoraLinear
from torch import nn

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")


class Tiny(nn.Module):
    """A few named linears, like one transformer block, plus an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 12)
        self.k_proj = nn.Linear(8, 6, bias=False)
        self.v_proj = nn.Linear(8, 6)
        self.down_proj = nn.Linear(12, 8)
        self.lm_head = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8) -> (B, 5)
        h = self.down_proj(torch.relu(self.q_proj(x)))
        h = h + torch.cat([self.k_proj(x), self.v_proj(x)], dim=-1)[..., :8]
        return self.lm_head(h)


def make_pair(seed: int = 0) -> tuple[Tiny, Tiny]:
    torch.manual_seed(seed)
    ours = Tiny()
    return ours, copy.deepcopy(ours)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial adapter values (LoRA's B starts at 0, IA3 at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def peft_lora(model: nn.Module, **kwargs: object) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def to_peft(ours: nn.Module, theirs: nn.Module, name: str = "default") -> None:
    """Copies our adapter into the PEFT model through PEFT's own key names."""
    state = fp.adapter_state_dict(ours, name)
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not [k for k in result.unexpected_keys if "lora" in k or "ia3" in k], result.unexpected_keys


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))

LORA_CASES = {
    "lora": ({}, {}),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "rslora_dora": ({"use_dora": True, "use_rslora": True}, {"use_dora": True, "use_rslora": True}),
    "patterns": (
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.0}},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.0}},
    ),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_forward_and_grads_match_peft(case: str) -> None:
    ours_kw, peft_kw = LORA_CASES[case]
    ours, base = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], **ours_kw))
    randomize(ours)
    theirs = peft_lora(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **peft_kw)
    to_peft(ours, theirs)
    if case == "patterns":
        q = ours.q_proj
        assert (
            isinstance(q, LoraLinear) and q.rank["default"] == 2 and ours.v_proj.scaling["default"] == 3.0 / 4
        )

    out, ref = ours(X), theirs(X)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    theirs_params = dict(theirs.named_parameters())
    trained = [(k, p) for k, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == len([p for p in theirs_params.values() if p.requires_grad])
    for key, param in trained:
        # q_proj.lora_A.default.weight is PEFT's base_model.model.q_proj.lora_A.default.weight;
        # PEFT keeps the DoRA magnitude in a module (`lora_magnitude_vector.default.weight`)
        peft_key = f"base_model.model.{key}" + (".weight" if "magnitude" in key else "")
        torch.testing.assert_close(param.grad, theirs_params[peft_key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_dropout_paths_match_peft_in_train_mode() -> None:
    for dora in (False, True):
        ours, base = make_pair()
        ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, dropout=0.3, use_dora=dora))
        randomize(ours)
        theirs = peft_lora(
            base, r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"], use_dora=dora
        )
        to_peft(ours, theirs)
        ours.train(), theirs.train()
        torch.manual_seed(3)
        out = ours(X)
        torch.manual_seed(3)
        ref = theirs(X)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_default_init_is_kaiming_a_and_zero_b_and_starts_at_base() -> None:
    ours, base = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, use_dora=True))
    torch.testing.assert_close(ours(X), base(X))
    q = ours.q_proj
    assert torch.count_nonzero(q.lora_B["default"].weight) == 0
    bound = 1 / 8**0.5  # kaiming_uniform(a=√5) on fan_in 8
    a = q.lora_A["default"].weight
    assert a.abs().max() <= bound and a.std() > bound / 4
    # DoRA magnitude starts at the row norms of W
    torch.testing.assert_close(q.lora_magnitude_vector["default"], base.q_proj.weight.norm(dim=1))


def test_gaussian_init_std() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(512, 64))
    layer.add_adapter("g", r=8, alpha=8, init="gaussian")
    assert abs(layer.lora_A["g"].weight.std().item() - 1 / 8) < 0.01


def test_pissa_matches_peft_residual_and_saves_as_lora() -> None:
    ours, base = make_pair()
    original = copy.deepcopy(base)
    ours = fp.apply_peft(ours, fp.LoraConfig(r=3, alpha=6, init="pissa"))
    theirs = peft_lora(
        base, r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    )
    # the residual base weight and the adapter's product agree (singular vector signs may differ)
    q, tq = ours.q_proj, theirs.base_model.model.q_proj
    torch.testing.assert_close(q.base_layer.weight, tq.base_layer.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        q.delta_weight("default"), tq.get_delta_weight("default"), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(ours(X), original(X), rtol=1e-4, atol=1e-5)  # starts at the base model


def test_pissa_saved_as_rank_2r_lora_over_the_original_weights(tmp_path) -> None:
    ours, base = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=3, alpha=6, init="pissa", use_rslora=True))
    randomize(ours)
    fp.save_adapter(ours, str(tmp_path / "a"))
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["r"] == 6 and raw["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "a"))
    torch.testing.assert_close(theirs(X), ours(X), rtol=1e-4, atol=1e-5)


def test_ia3_matches_peft_forward_merge_and_keys() -> None:
    ours, base = make_pair()
    ours = fp.apply_peft(ours, fp.IA3Config())
    randomize(ours)
    theirs = peft.get_peft_model(
        base,
        peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    state = fp.adapter_state_dict(ours)
    assert state["base_model.model.down_proj.ia3_l"].shape == (1, 12)
    assert state["base_model.model.v_proj.ia3_l"].shape == (6, 1)
    to_peft(ours, theirs)
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-6)
    before = ours(X)
    fp.merge(ours)
    theirs.merge_adapter()
    torch.testing.assert_close(
        ours.v_proj.base_layer.weight, theirs.base_model.model.v_proj.base_layer.weight
    )
    torch.testing.assert_close(ours.v_proj.base_layer.bias, theirs.base_model.model.v_proj.base_layer.bias)
    torch.testing.assert_close(ours(X), before, rtol=1e-5, atol=1e-6)
    fp.unmerge(ours)
    torch.testing.assert_close(ours(X), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_matches_peft_and_unmerge_restores(dora: bool) -> None:
    ours, base = make_pair()
    original_q = base.q_proj.weight.detach().clone()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, use_dora=dora))
    randomize(ours)
    theirs = peft_lora(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=dora)
    to_peft(ours, theirs)
    before = ours(X)
    fp.merge(ours)
    merged_theirs = theirs.merge_and_unload()
    torch.testing.assert_close(
        ours.q_proj.base_layer.weight, merged_theirs.q_proj.weight, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(ours(X), before, rtol=1e-5, atol=1e-5)
    fp.unmerge(ours)
    torch.testing.assert_close(ours.q_proj.base_layer.weight, original_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(X), before, rtol=1e-5, atol=1e-6)


def test_disable_adapter_serves_the_frozen_base_even_when_merged() -> None:
    ours, base = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"]))
    randomize(ours)
    adapted = ours(X)
    with fp.disable_adapter(ours):
        torch.testing.assert_close(ours(X), base(X))
    fp.merge(ours)
    with fp.disable_adapter(ours):
        torch.testing.assert_close(ours(X), base(X), rtol=1e-5, atol=1e-6)
    assert ours.q_proj.merged
    torch.testing.assert_close(ours(X), adapted, rtol=1e-5, atol=1e-5)


def test_modules_to_save_roundtrip_with_peft(tmp_path) -> None:
    ours, base = make_pair()
    ours = fp.apply_peft(
        ours, fp.LoraConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    )
    assert not isinstance(ours.lm_head.original_module, LoraLinear)  # all-linear skips lm_head
    randomize(ours)
    assert "base_model.model.lm_head.weight" in fp.adapter_state_dict(ours)
    fp.save_adapter(ours, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(X), ours(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "ia3"])
def test_peft_saved_adapter_loads_here(kind: str, tmp_path) -> None:
    ours, base = make_pair()
    if kind == "ia3":
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        )
    else:
        theirs = peft_lora(
            copy.deepcopy(base),
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=kind == "rslora",
            use_dora=kind == "dora",
            rank_pattern={"down_proj": 2},
            modules_to_save=["lm_head"],
        )
    randomize(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    loaded = fp.load_adapter(ours, str(tmp_path / "p"))
    torch.testing.assert_close(loaded(X), theirs(X), rtol=1e-5, atol=1e-6)
    assert fp.trainable_parameters(loaded).trainable == 0  # loaded for inference
    # and back out: identical tensors and a config PEFT reads back to the same adapter
    fp.save_adapter(loaded, str(tmp_path / "again"))
    again = peft.PeftModel.from_pretrained(base, str(tmp_path / "again"))
    torch.testing.assert_close(again(X), theirs(X), rtol=1e-5, atol=1e-6)


def test_several_adapters_switch_and_combine() -> None:
    ours, _ = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8), "a")
    randomize(ours, seed=1)
    ours = fp.apply_peft(ours, fp.LoraConfig(r=2, alpha=2, use_dora=True), "b")
    randomize(ours, seed=2)
    # the new adapter alone trains; the first is frozen
    assert not ours.q_proj.lora_A["a"].weight.requires_grad and ours.q_proj.lora_A["b"].weight.requires_grad
    with fp.disable_adapter(ours):
        base = ours(X)
    fp.set_active(ours, "a")
    only_a = ours(X)
    fp.set_active(ours, "b")
    only_b = ours(X)
    assert not torch.allclose(only_a, only_b)
    fp.set_active(ours, {"a": 0.25, "b": 0.5})
    q_in = X
    q = ours.q_proj
    expected_q = (
        q.base_layer(q_in)
        + 0.25 * q.lora_B["a"](q.lora_A["a"](q_in)) * q.scaling["a"]
        + 0.5 * q._dora_delta("b", q_in, q.base_layer(q_in), nn.Identity(), q.scaling["b"])
    )
    torch.testing.assert_close(q(q_in), expected_q)
    combined = ours(X)
    fp.merge(ours)  # the weighted combination folds too
    torch.testing.assert_close(ours(X), combined, rtol=1e-5, atol=1e-5)
    fp.set_active(ours, {"a": 0.0})
    torch.testing.assert_close(ours(X), base, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="no adapter named"):
        fp.set_active(ours, "c")


def test_targets_follow_peft_rules() -> None:
    model = Tiny()
    fp.apply_peft(model, fp.LoraConfig(target_modules=r".*_proj", exclude_modules=["k_proj"]))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert wrapped == ["down_proj", "q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="matches no module"):
        fp.apply_peft(Tiny(), fp.LoraConfig(target_modules=["o_proj"]))
    with pytest.raises(ConfigError, match="not one of"):
        fp.config_from_dict("loha")
    with pytest.raises(ConfigError, match=r"peft\.options\.rank"):
        fp.config_from_dict("lora", {"rank": 4})
    assert fp.config_from_dict("dora", {"r": 4}).use_dora


def test_adapter_layers_are_recognised_by_class() -> None:
    """Every adapter kind is found (and nothing else), decided once per class."""
    from ferrotune.peft.adapter import BottleneckAdapter
    from ferrotune.peft.common import ModulesToSave, adapter_layers, is_adapter_layer
    from ferrotune.peft.ia3 import IA3Linear

    model = fp.apply_peft(Tiny(), fp.LoraConfig(r=2, modules_to_save=["lm_head"]))
    model = fp.apply_peft(model, fp.IA3Config(target_modules=["down_proj"], feedforward_modules=[]), "s")
    kinds = {name: type(layer) for name, layer in adapter_layers(model)}
    assert kinds == {
        "q_proj": LoraLinear,
        "v_proj": LoraLinear,
        "down_proj": IA3Linear,
        "lm_head": ModulesToSave,
    }
    assert is_adapter_layer(BottleneckAdapter(4)) and not is_adapter_layer(nn.Linear(2, 2))
    assert not is_adapter_layer(model)


def test_trainable_parameter_report_matches_peft(capsys) -> None:
    ours, base = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"]))
    theirs = peft_lora(
        base,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_dora=True,
        modules_to_save=["lm_head"],
    )
    report = fp.trainable_parameters(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    print(report)
    assert "trainable%" in capsys.readouterr().out


def test_bad_adapter_files_name_file_and_key(tmp_path) -> None:
    ours, _ = make_pair()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8))
    folder = tmp_path / "a"
    fp.save_adapter(ours, str(folder))
    state = fp.adapter_state_dict(ours)

    def rewrite(tensors: dict, config: dict | None = None) -> None:
        raw = json.loads((folder / "adapter_config.json").read_text()) if config is None else config
        fp.formats.write_adapter(folder, raw, tensors)

    extra = {**state, "base_model.model.k_proj.lora_A.weight": torch.zeros(4, 8)}
    rewrite(extra)
    with pytest.raises(FormatError, match=r"k_proj.lora_A.weight.*matches no adapter"):
        fp.load_adapter(Tiny(), str(folder))
    missing = {k: v for k, v in state.items() if "v_proj.lora_B" not in k}
    rewrite(missing)
    with pytest.raises(FormatError, match=r"missing key .base_model\.model\.v_proj\.lora_B\.weight."):
        fp.load_adapter(Tiny(), str(folder))
    wrong = {**state, "base_model.model.q_proj.lora_A.weight": torch.zeros(4, 9)}
    rewrite(wrong)
    with pytest.raises(FormatError, match=r"q_proj.lora_A.weight has shape \(4, 9\)"):
        fp.load_adapter(Tiny(), str(folder))
    rewrite(state, {"peft_type": "LOHA"})
    with pytest.raises(FormatError, match="peft_type 'LOHA'"):
        fp.load_adapter(Tiny(), str(folder))
    rewrite(state, {"peft_type": "LORA", "r": "4", "lora_alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(FormatError, match="field 'r' must be int"):
        fp.load_adapter(Tiny(), str(folder))
    (folder / "adapter_config.json").write_text('{\n "peft_type": "LORA",\n oops\n}')
    with pytest.raises(FormatError, match=r"adapter_config.json:3"):
        fp.load_adapter(Tiny(), str(folder))
