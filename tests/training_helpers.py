"""Shared set-up of the training tests: a small tokenizer, the toy model and a few demo rows."""

import dataclasses
from pathlib import Path

import torch

from dsvl2.config import PRESETS
from dsvl2.demo.build import train_tokenizer
from dsvl2.demo.tasks import write_dataset
from dsvl2.model.init import init_params_
from dsvl2.model.vlm import DSVL2
from dsvl2.processing.processor import Processor, ProcessorConfig
from dsvl2.training.data import ConversationDataset, load_jsonl
from dsvl2.training.stages import StageConfig

VOCAB = 384


def toy_config(**lang):
    toy = PRESETS["toy"]
    return dataclasses.replace(toy, language_config=dataclasses.replace(toy.language_config, vocab_size=VOCAB, **lang))


def make_processor(directory: Path) -> Processor:
    tok = train_tokenizer(directory, VOCAB, corpus_size=30)
    cfg = PRESETS["toy"]
    return Processor(tok, ProcessorConfig(candidate_resolutions=cfg.candidate_resolutions, patch_size=14))


def make_model(seed: int = 0, **lang) -> DSVL2:
    torch.manual_seed(seed)
    model = DSVL2(toy_config(**lang))
    init_params_(model, seed, std=0.02)
    return model


def make_examples(directory: Path, n_per_task: int = 2, seed: int = 1):
    write_dataset(directory, n_per_task, seed)
    examples, bad = load_jsonl(directory / "conversations.jsonl")
    assert not bad
    return examples


def sources(examples, processor: Processor, mask_prompt: bool = True) -> dict:
    return {"demo": ConversationDataset(examples, processor, mask_prompt=mask_prompt)}


def stage(n: int, **kw) -> StageConfig:
    base = dict(stage=n, steps=3, warmup_steps=0, batch_size=4, seq_len=256, lr=3e-3, vision_lr_mult=1.0,
                schedule="constant", mixture={"demo": 1.0}, log_every=1)
    if n == 1:
        base["train"] = ("vision", "projector")
    base.update(kw)
    return StageConfig(**base)
