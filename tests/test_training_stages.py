"""Stages as data, the shared loop: loss falls, frozen weights stay bit-identical, schedules, options."""

import json

import pytest
import torch

from dsvl2.errors import ConfigError
from dsvl2.training.loop import forward_loss, latest_checkpoint, train
from dsvl2.training.stages import StageConfig, apply_freezing, default_stage, load_recipe, param_groups

from training_helpers import make_examples, make_model, make_processor, sources, stage


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    processor = make_processor(root / "tok")
    examples = make_examples(root / "data", n_per_task=2)[:4]  # batch 4 = the whole set every step
    return processor, examples


@pytest.mark.parametrize("n", [1, 2, 3])
def test_three_steps_lower_the_loss_and_frozen_weights_stay(setup, tmp_path, n):
    processor, examples = setup
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = stage(n, mask_prompt=(n == 3))
    rows = train(model, st, sources(examples, processor, st.mask_prompt), tmp_path, pad_id=processor.tokenizer.pad_id,
                 progress=False)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 3 and losses[2] < losses[0], losses
    assert all(r["aux"] > 0 for r in rows)  # the MoE layer's balance loss is on
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    if n == 1:
        assert changed and all(k.startswith(("vision.", "projector.", "image_newline", "view_separator")) for k in changed)
        assert "vision.blocks.0.attn.qkv.weight" in changed and "projector.layers.0.weight" in changed
    else:
        assert "language.model.layers.1.mlp.experts.gate_proj" in changed and "vision.patch_embed.proj.weight" in changed
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert (tmp_path / "loss.png").stat().st_size > 0 and latest_checkpoint(tmp_path).name == "step-00000003"


def test_noaux_tc_router_trains_and_moves_its_bias(setup, tmp_path):
    processor, examples = setup
    model = make_model(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0)
    gate = model.language.model.layers[1].mlp.gate
    bias0, weight0 = gate.e_score_correction_bias.clone(), gate.weight.clone()
    train(model, stage(3, bias_update_rate=0.01), sources(examples, processor), tmp_path,
          pad_id=processor.tokenizer.pad_id, progress=False)
    assert not gate.e_score_correction_bias.requires_grad
    assert not torch.equal(gate.e_score_correction_bias, bias0)  # balance step after every update
    assert not torch.equal(gate.weight, weight0)  # the gathered sigmoid weights carry a gradient


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    processor, examples = setup
    src = sources(examples, processor)["demo"]
    from dsvl2.training.data import collate, pack

    batch = collate(pack([src[i] for i in range(2)], 256), processor.tokenizer.pad_id)
    grads = []
    for ckpt in (False, True):
        model = make_model()
        st = stage(3, gradient_checkpointing=ckpt)
        apply_freezing(model, st)
        model.train()
        model.vision.gradient_checkpointing = model.language.model.gradient_checkpointing = ckpt
        n = int((batch.labels[:, 1:] != -100).sum())
        loss, _, _ = forward_loss(model, batch, st, n)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs(setup):
    processor, examples = setup
    src = sources(examples, processor)["demo"]
    from dsvl2.training.data import collate, pack

    batch = collate(pack([src[0]], 256), processor.tokenizer.pad_id)
    model = make_model()
    model.train()
    loss, ce, _ = forward_loss(model, batch, stage(3, bf16=True), int((batch.labels[:, 1:] != -100).sum()))
    loss.backward()
    assert torch.isfinite(loss) and model.language.lm_head.weight.grad.dtype == torch.float32


def test_schedules_by_hand():
    cos = StageConfig(steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
    assert [cos.lr_factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert cos.lr_factor(2) == pytest.approx(1.0) and cos.lr_factor(6) == pytest.approx(0.5)
    assert cos.lr_factor(10) == pytest.approx(0.0)
    step = StageConfig(steps=100, schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert [step.lr_factor(s) for s in (0, 49, 50, 74, 75)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert StageConfig(steps=5, warmup_steps=0, schedule="constant").lr_factor(4) == 1.0


def test_vision_gets_the_lower_rate_and_adamw_betas():
    model = make_model()
    st = stage(2, lr=1e-3, vision_lr_mult=0.1)
    apply_freezing(model, st)
    groups = {g["name"]: g for g in param_groups(model, st)}
    assert groups["vision"]["lr"] == pytest.approx(1e-4) and groups["main"]["lr"] == pytest.approx(1e-3)
    assert groups["projector"]["lr"] == pytest.approx(1e-3)  # default multiplier 1
    assert groups["main_nodecay"]["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    for g in groups.values():  # every trainable parameter in exactly one group, by its prefix
        for p in g["params"]:
            (name,) = [n for n, q in named.items() if q is p]
            kind = "vision" if name.startswith("vision.") else (
                "projector" if name.startswith(("projector.", "image_newline", "view_separator")) else "main")
            assert g["name"].split("_")[0] == kind, (name, g["name"])
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in named.values())


def test_projector_multiplier_sets_the_adaptor_rate():
    model = make_model()
    st = stage(2, lr=2e-3, vision_lr_mult=0.1, projector_lr_mult=0.25)
    apply_freezing(model, st)
    groups = {g["name"]: g for g in param_groups(model, st)}
    assert groups["projector"]["lr"] == pytest.approx(5e-4)
    assert groups["projector_nodecay"]["lr"] == pytest.approx(5e-4)  # biases, newline / separator
    assert groups["vision"]["lr"] == pytest.approx(2e-4) and groups["main"]["lr"] == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="projector_lr_mult"):
        StageConfig(projector_lr_mult=-1)
    assert default_stage(1).betas == (0.9, 0.95) and default_stage(3).grad_clip == 1.0
    assert [default_stage(n).schedule for n in (1, 2, 3)] == ["cosine", "step", "constant"]


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[stage2]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(path)
    path.write_text("[stage3]\nschedule = \"linear\"\n")
    with pytest.raises(ConfigError, match="schedule"):
        load_recipe(path)
    path.write_text("[stage1]\nsteps = 7\nwarmup_steps = 1\n[sources]\nsft = \"data/x.jsonl\"\n")
    recipe = load_recipe(path)
    assert recipe["stages"][1].steps == 7 and recipe["sources"]["sft"] == str(tmp_path / "data" / "x.jsonl")


def test_shipped_recipes_parse():
    from pathlib import Path

    import dsvl2.training

    for path in sorted(Path(dsvl2.training.__file__).parent.joinpath("recipes").glob("*.toml")):
        assert load_recipe(path)["stages"], path


def test_balance_loss_ignores_padding_and_matches_the_official_formula():
    from dsvl2.model.moe import MoE

    model = make_model()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    moe.train()
    x = torch.randn(1, 5, 64)
    moe(x)
    plain, counts = moe.last_aux_loss.clone(), moe.last_expert_counts.clone()
    idx, _, scores = moe.gate(x.view(-1, 64))  # official seq_aux by hand (spec §7.6)
    e, k = 8, 2
    ce = torch.bincount(idx.reshape(-1), minlength=e).float() / (5 * k / e)
    torch.testing.assert_close(plain, moe.cfg.aux_loss_alpha * (ce * scores.mean(0)).sum())
    moe.balance_mask = torch.tensor([[True] * 5 + [False] * 3])
    moe(torch.cat([x, torch.randn(1, 3, 64)], dim=1))  # three padding positions, masked out
    torch.testing.assert_close(moe.last_aux_loss, plain)
    torch.testing.assert_close(moe.last_expert_counts, counts)


def test_a_packed_sample_sees_only_itself(setup):
    """Block-causal mask + restarting positions: sample 2 of a packed row == sample 2 alone."""
    from dsvl2.training.data import collate, concat
    from dsvl2.training.loop import additive_mask

    processor, examples = setup
    src = sources(examples, processor)["demo"]
    a, b = src[0], src[1]
    model = make_model().eval()

    def run(batch):
        with torch.no_grad():
            return model(batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                         batch.images_spatial_crop, positions=batch.position_ids,
                         mask=additive_mask(batch.seq_ids, torch.float32), expanded=True)

    both = run(collate([concat([a, b])], processor.tokenizer.pad_id))
    alone = run(collate([b], processor.tokenizer.pad_id))
    torch.testing.assert_close(both[0, len(a):], alone[0], rtol=1e-5, atol=1e-5)


def test_denormals_flushed_zeroes_float32_denormals_inside_and_restores_the_mode():
    """Sharpening softmaxes make denormals, which x86 computes slowly; training flushes them."""
    from dsvl2.training.loop import denormals_flushed

    tiny = torch.full((8,), 3e-39)  # below float32's smallest normal, 1.18e-38
    assert (tiny * 1).sum().item() > 0
    with denormals_flushed():
        assert (tiny * 1).sum().item() == 0.0 and (tiny * 1e6).sum().item() == 0.0  # read and written as 0
        with denormals_flushed():
            pass
        assert (tiny * 1).sum().item() == 0.0  # a nested exit restores the outer mode, not "off"
    assert (tiny * 1).sum().item() > 0
