"""The demo model: the build runs end to end (smoke), and the shipped model loads and answers."""

import json
from random import Random

import numpy as np
import pytest
import torch

import dsvl2
from dsvl2.demo import MODEL_DIR
from dsvl2.demo.build import build
from dsvl2.demo.tasks import load_words, make_sample


def test_smoke_build_writes_a_loadable_model_with_card(tmp_path, monkeypatch):
    from dsvl2.training import loop

    flushing = []  # the stages train with float32 denormals flushed (denormals_flushed), then it is restored
    real = loop.run_stages
    monkeypatch.setattr(loop, "run_stages", lambda *a, **k: flushing.append(torch.tensor([1e-39]).item() == 0.0)
                        or real(*a, **k))
    torch.set_num_threads(1)
    card = build(tmp_path / "model", tmp_path / "work", smoke=True, workers=0, eval_n=1)
    assert flushing == [True, True, True] and torch.tensor([1e-39]).item() != 0.0
    out = tmp_path / "model"
    for name in ("config.json", "tokenizer.json", "processor_config.json", "README.md", "loss.png", "recipe.toml",
                 "scores.json"):
        assert (out / name).is_file(), name
    assert set(card["scores"]["accuracy"]) == {"grounding", "reading", "charts"}
    assert "Held-out scores" in (out / "README.md").read_text()
    for n in (1, 2, 3):  # every stage ran through the shared loop
        assert (tmp_path / "work" / f"stage{n}" / "metrics.jsonl").is_file()
    pipe = dsvl2.load(out, dtype="fp32", device="cpu")
    assert pipe.model.cfg.vision_config.image_size == 112


def test_build_cli_names_a_missing_recipe_and_an_absent_gpu(tmp_path, capsys, monkeypatch):
    from dsvl2.demo.build import main

    assert main(["--out", str(tmp_path / "m"), "--recipe", str(tmp_path / "nope.toml"), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "cannot read recipe" in err and "nope.toml" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "m"), "--device", "cuda"])
    assert exit_.value.code == 2 and "torch.cuda.is_available() is False" in capsys.readouterr().err
    from dsvl2.demo.build import RECIPE  # a misspelt source of stage 3 stops the build before stage 1 trains

    bad = tmp_path / "bad.toml"
    bad.write_text(RECIPE.read_text().replace("qa_charts = 0.35", "qa_chart = 0.35"))
    assert main(["--out", str(tmp_path / "m"), "--recipe", str(bad), "--smoke"]) == 2
    assert "unknown synthetic source 'qa_chart'" in capsys.readouterr().err
    assert not (tmp_path / "m.work" / "stage1").exists()
    assert not (tmp_path / "m").exists()


shipped = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="demo model not built")


@shipped
def test_shipped_model_is_small_and_documented():
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size < 50 * 2 ** 20
    card = json.loads((MODEL_DIR / "scores.json").read_text())
    assert not card["smoke"] and set(card["scores"]["accuracy"]) == {"grounding", "reading", "charts"}
    readme = (MODEL_DIR / "README.md").read_text()
    assert (MODEL_DIR / "loss.png").is_file() and "python -m dsvl2.demo.build" in readme
    for task, value in card["scores"]["accuracy"].items():  # the card states the measured scores
        assert f"| {task} |" in readme and f"{value:.3f}" in readme


@shipped
def test_default_model_answers_demo_images_in_the_task_format():
    from dsvl2.processing.grounding import parse_grounding

    torch.set_num_threads(1)
    pipe = dsvl2.load(dtype="fp32", device="cpu")  # no directory: the shipped demo model
    assert pipe.model_dir == MODEL_DIR
    rng, words = Random("dsvl2-test-demo-model"), load_words()
    samples = [make_sample(task, rng, words) for task in ("grounding", "reading", "charts")]
    answers = pipe.generate_batch([[{"role": "user", "content": s.prompt, "images": [s.image]}] for s in samples],
                                  max_new_tokens=40, skip_special_tokens=False)
    grounding, reading, charts = (a.replace(pipe.tokenizer.eos_token, "").strip() for a in answers)
    assert len(parse_grounding(grounding).boxes) == 1, grounding
    assert reading in words, reading
    assert charts in [str(v) for v in range(1, 10)], charts


def test_zoom_crops_around_the_word_at_every_scale():
    from dsvl2.demo.build import zoom

    words = load_words()
    sides = []
    for i in range(40):
        rng = Random(i)
        sample = make_sample("reading", rng, words)
        zoomed = zoom(sample, rng)
        x1, y1, x2, y2 = sample.meta["text_box"]
        # the crop keeps every ink pixel of the word: the same dark pixel count as the whole image
        dark = lambda im: int((np.asarray(im.convert("L")) < 128).sum())  # noqa: E731
        assert dark(zoomed.image) == dark(sample.image) > 0
        assert zoomed.answer == sample.answer and zoomed.prompt == sample.prompt
        assert zoomed.image.width >= min(x2 - x1, sample.image.width) and zoomed.image.width <= sample.image.width
        sides.append(zoomed.image.width / sample.image.width)
    assert min(sides) < 0.5 and max(sides) > 0.9  # from a tight crop up to nearly the whole image


def test_synthetic_sources_name_the_known_ones(tmp_path):
    from dsvl2.demo.build import SyntheticSource

    with pytest.raises(ValueError, match="qa_grounding_zoom.*qa_reading_zoom"):
        SyntheticSource("qa_grounding_zoom", processor=None, mask_prompt=True)
    src = SyntheticSource("qa_reading_zoom", processor=None, mask_prompt=True)
    conv = src.conversation(3)
    assert conv[1]["content"] in load_words() and conv[0]["images"][0].width <= 512


def test_sincos_position_table_matches_the_formula_and_starts_the_vit():
    import math

    from dsvl2.demo.build import demo_config
    from dsvl2.model.init import init_params_, sincos_2d
    from dsvl2.model.vlm import DSVL2

    grid, width = 3, 8  # two frequencies per axis: 1 and 1 / 10000 ** 0.5 = 0.01
    table = sincos_2d(grid, width)
    assert table.shape == (9, 8)
    row, col = 2, 1  # patch 7 in row-major order
    expected = [math.sin(row), math.sin(row * 0.01), math.cos(row), math.cos(row * 0.01),
                math.sin(col), math.sin(col * 0.01), math.cos(col), math.cos(col * 0.01)]
    assert torch.allclose(table[row * grid + col], torch.tensor(expected), atol=1e-6)
    assert len({tuple(r) for r in table.tolist()}) == 9  # every position distinct

    m = {"tile": 56, "patch": 14, "vision_width": 16, "vision_layers": 1, "vision_heads": 2, "vision_mlp_ratio": 2.0,
         "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "moe_intermediate": 16, "experts": 4,
         "top_k": 2, "shared_experts": 1, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
         "v_head_dim": 8}
    model = DSVL2(demo_config(m, 64, 1, 2))
    init_params_(model, 0, std=0.02, pos_init="sincos", pos_scale=0.5)
    assert torch.equal(model.vision.pos_embed[0], 0.5 * sincos_2d(4, 16))
    init_params_(model, 0, std=0.02)  # default: N(0, std) like every other tensor
    assert model.vision.pos_embed.std() < 0.05
    with pytest.raises(dsvl2.errors.DSVL2Error, match="pos_init = 'learned'"):
        init_params_(model, 0, std=0.02, pos_init="learned")


def test_recipe_candidates_become_tile_layouts_and_bad_ones_are_named():
    from dsvl2.demo.build import demo_config, smoke_recipe

    m = {"tile": 168, "patch": 14, "vision_width": 16, "vision_layers": 1, "vision_heads": 2, "vision_mlp_ratio": 2.0,
         "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "moe_intermediate": 16, "experts": 4,
         "top_k": 2, "shared_experts": 1, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
         "v_head_dim": 8}
    assert demo_config(m, 64, 1, 2).candidate_resolutions == ((168, 168),)  # default: one local tile
    cfg = demo_config(dict(m, candidates=[[168, 168], [336, 168]]), 64, 1, 2)
    assert cfg.candidate_resolutions == ((168, 168), (336, 168))
    with pytest.raises(dsvl2.errors.DSVL2Error, match=r"candidates \[\[168, 168\], \[200, 168\]\].*tile = 168"):
        demo_config(dict(m, candidates=[[168, 168], [200, 168]]), 64, 1, 2)
    smoke = smoke_recipe({"model": dict(m, candidates=[[168, 168], [336, 168]]), "stages": {}})
    assert smoke["model"]["candidates"] == [[112, 112], [224, 112]]


def test_split_letters_tokenizer_spells_words_and_round_trips(tmp_path):
    from dsvl2.demo.build import train_tokenizer

    text = "<|ref|>the purple triangle<|/ref|><|det|>[[340, 13, 512, 228]]<|/det|>"
    letters = train_tokenizer(tmp_path / "letters", 512, corpus_size=30, split_letters=True)
    ids = letters.encode("olive")
    assert [letters.decode([i]) for i in ids] == list("olive")
    assert letters.decode(letters.encode(text)) == text
    words = train_tokenizer(tmp_path / "words", 512, corpus_size=30)  # default: BPE merges whole words
    assert len(words.encode("olive")) < 5 and words.decode(words.encode(text)) == text


def _by_line(page):
    it = iter(page.meta["boxes"])
    return [[next(it) for _ in line] for line in page.meta["lines"]]


def test_page_source_draws_every_word_it_answers_in_reading_order():
    """``qa_page``: lines of the task's words, answered top to bottom; each answered word is drawn where
    the line puts it (ink inside every word's box) and the one-word reading prompt is reused."""
    from random import Random

    from dsvl2.demo.build import READ_PROMPT, SyntheticSource, make_page

    words, counts = load_words(), []
    for i in range(30):
        page = make_page(Random(i), words)
        if page.task == "reading":  # nothing fitted: the one-word sample instead
            continue
        assert page.prompt == READ_PROMPT and 200 <= page.image.width <= 512 and 200 <= page.image.height <= 512
        assert page.answer == "\n".join(" ".join(line) for line in page.meta["lines"])
        assert all(w in words for line in page.meta["lines"] for w in line)
        counts.append(len(page.answer.split()))
        ink = np.asarray(page.image.convert("L")) < 128
        inside = np.zeros_like(ink)
        boxes = page.meta["boxes"]
        assert len(boxes) == counts[-1]
        for x1, y1, x2, y2 in boxes:
            assert ink[y1:y2, x1:x2].any()  # every answered word is drawn
            inside[y1:y2, x1:x2] = True
        assert not (ink & ~inside).any()  # and nothing else is
        tops = [min(b[1] for b in boxes if b in line_boxes) for line_boxes in _by_line(page)]
        assert tops == sorted(tops)  # lines answered top to bottom
    assert len(counts) >= 25 and sum(counts) / len(counts) > 4  # several words a page, not one
    conv = SyntheticSource("qa_page", processor=None, mask_prompt=True).conversation(0)
    assert conv[0]["content"] == READ_PROMPT and conv[1]["content"].split()[0] in words


def test_mimetic_attention_init_gives_the_target_products():
    """``attn_init = "mimetic"``: per head W_q^T W_k is the rank-d part of a Z + b I (so its trace is
    mostly b's), and W_proj W_v equals a' Z' - b' I exactly (full rank)."""
    from dsvl2.demo.build import demo_config
    from dsvl2.model.init import init_params_
    from dsvl2.model.vlm import DSVL2

    m = {"tile": 56, "patch": 14, "vision_width": 32, "vision_layers": 2, "vision_heads": 2, "vision_mlp_ratio": 2.0,
         "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "moe_intermediate": 16, "experts": 4,
         "top_k": 2, "shared_experts": 1, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
         "v_head_dim": 8}
    model = DSVL2(demo_config(m, 64, 1, 2))
    init_params_(model, 0, std=0.02, pos_init="sincos", attn_init="mimetic")
    c, d = 32, 16
    for block in model.vision.blocks:
        w = block.attn.qkv.weight.detach()
        for h in range(2):
            qk = w[h * d:(h + 1) * d].T @ w[c + h * d:c + (h + 1) * d]  # (C, C), rank d
            assert torch.linalg.matrix_rank(qk) == d
            assert qk.trace() > 0.5 * 2.0 * c / 2  # at least half of b I's trace survives the rank-d cut
        vo = block.attn.proj.weight.detach() @ w[2 * c:]
        off = vo + 0.4 * torch.eye(c)  # what is left is a' Z': mean ~0, std ~a' / sqrt(C)
        assert abs(off.mean()) < 0.02 and 0.5 < off.std() * c ** 0.5 / 0.4 < 1.5
    with pytest.raises(dsvl2.errors.DSVL2Error, match="attn_init = 'conv'"):
        init_params_(model, 0, std=0.02, attn_init="conv")


def test_build_scores_held_out_answers_by_the_evaluation_tasks_rule():
    """The build's held-out scores: a right answer (with the EOS and spaces the build strips) scores 1, a
    wrong one 0, on every task; the same answers score the same through the evaluation task."""
    from types import SimpleNamespace

    from dsvl2.demo.build import evaluate
    from dsvl2.demo.tasks import eval_row, generate
    from dsvl2.evaluation.tasks.demo import Demo, example

    n, seed = 3, 4242
    samples = generate(n, seed)
    right = [i % 2 == 0 for i in range(len(samples))]
    said = [f" {s.answer}</s>" if ok else "0 nothing</s>" for s, ok in zip(samples, right)]
    asked: list[list] = []

    def generate_batch(convs, max_new_tokens, skip_special_tokens):
        start = sum(len(c) for c in asked)
        asked.append(convs)
        assert [c[0]["content"] for c in convs] == [s.prompt for s in samples[start:start + len(convs)]]
        return said[start:start + len(convs)]

    pipe = SimpleNamespace(generate_batch=generate_batch, tokenizer=SimpleNamespace(eos_token="</s>"))
    out = evaluate(pipe, n, seed=seed, batch=4)
    for task in ("grounding", "reading", "charts"):
        hits = [ok for s, ok in zip(samples, right) if s.task == task]
        assert out["accuracy"][task] == sum(hits) / len(hits), task
    demo = Demo()
    for s, ok, a in zip(samples, right, said):
        assert demo.score(example(eval_row(s)), a.replace("</s>", "").strip()) == float(ok)
