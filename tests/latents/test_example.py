"""docs/latents_example.py runs as documented: encode the embedded clips, load them, a toy denoising step and a
bf16 decode inside jitted steps on a 2-device mesh, each compiled once."""
import os
import re
import sys

import pytest

from tests.latents.conftest import REPO, run_command

pytestmark = pytest.mark.slow  # an encode job, a train step and a decode compiled (1-2 minutes here)


def test_the_latents_example_runs(tiny_model, tmp_path):
  done = run_command([sys.executable, os.path.join(REPO, "docs", "latents_example.py"), f"--model={tiny_model}",
                      f"--out={tmp_path / 'latents'}", "--steps=3"])
  assert "10 stored, 0 skipped" not in done.stdout and "5 stored, 0 skipped" in done.stdout  # 5 videos, 1 clip each
  steps = re.findall(r"step (\d): loss ([0-9.]+), clips \[([0-9, ]+)\], preview \((\d+), 9, 32, 48, 3\) (\w+) on 2 "
                     r"devices", done.stdout)
  assert [s[0] for s in steps] == ["0", "1", "2"] and all(s[3] == "4" for s in steps), done.stdout
  assert all(float(s[1]) > 0 for s in steps)
  assert "compilations: train_step 1, preview 1; loader at step 3" in done.stdout
