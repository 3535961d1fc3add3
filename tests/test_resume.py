"""Resume: a run killed (SIGKILL) after a checkpoint continues to the identical loss trajectory."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsvl2.training.loop import latest_checkpoint, train

from training_helpers import make_examples, make_model, make_processor, sources, stage

STEPS = 6
CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from dsvl2.processing.processor import Processor, ProcessorConfig
from dsvl2.processing.tokenizer import Tokenizer
from dsvl2.config import PRESETS
from dsvl2.training.data import ConversationDataset, load_jsonl
from dsvl2.training.loop import train
from training_helpers import make_model, stage

class Slow(ConversationDataset):
    def __getitem__(self, i):
        time.sleep(0.2)
        return super().__getitem__(i)

root = Path({root!r})
processor = Processor(Tokenizer.from_dir(root / "tok"),
                      ProcessorConfig(candidate_resolutions=PRESETS["toy"].candidate_resolutions, patch_size=14))
examples, _ = load_jsonl(root / "data" / "conversations.jsonl")
train(make_model(), stage(3, steps={steps}, checkpoint_every=2), {{"demo": Slow(examples[:4], processor)}},
      root / "killed", pad_id=processor.tokenizer.pad_id, progress=False)
"""


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    torch.set_num_threads(1)
    processor = make_processor(tmp_path / "tok")
    examples = make_examples(tmp_path / "data", n_per_task=2)[:4]
    reference = train(make_model(), stage(3, steps=STEPS, checkpoint_every=2), sources(examples, processor),
                      tmp_path / "straight", pad_id=processor.tokenizer.pad_id, progress=False)

    script = CHILD.format(tests=str(Path(__file__).parent), root=str(tmp_path), steps=STEPS)
    child = subprocess.Popen([sys.executable, "-c", script])
    out = tmp_path / "killed"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            ckpt = latest_checkpoint(out) if (out / "checkpoints" / "latest").is_file() else None
            if ckpt is not None:
                break
            assert child.poll() is None, "the child ended before its first checkpoint"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = latest_checkpoint(out).name
    assert killed_at != f"step-{STEPS:08d}", "the child finished before it was killed"

    resumed = train(make_model(seed=123), stage(3, steps=STEPS, checkpoint_every=2), sources(examples, processor),
                    out, pad_id=processor.tokenizer.pad_id, progress=False)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-identical trajectory
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # rows of the killed tail replaced
