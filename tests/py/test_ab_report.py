"""examples/axolotl/ab_report.py: an A/B whose sides start from different trainable parameters (e.g. an
unseeded LoRA init) is flagged instead of being reported as a library difference."""

import json
import os
import subprocess
import sys

REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "axolotl", "ab_report.py")


def _side(path, sha, losses):
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "init", "trainable": 8, "sha256": sha}) + "\n")
        for s, loss in enumerate(losses, 1):
            f.write(json.dumps({"kind": "step", "step": s, "t_begin": float(s), "t_end": s + 0.5}) + "\n")
            f.write(json.dumps({"kind": "log", "step": s, "logs": {"loss": loss}}) + "\n")
    return path


def _report(tmp_path, sha_b):
    a = _side(str(tmp_path / "a.jsonl"), "ab" * 32, [9.0, 8.9])
    b = _side(str(tmp_path / "b.jsonl"), sha_b, [9.0, 8.9001])
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, REPORT, "--a", a, "--b", b, "--name", "t", "--json", str(out)],
                       capture_output=True, text=True, check=True)
    return r.stdout, json.load(open(out))


def test_different_initial_parameters_are_flagged(tmp_path):
    stdout, summary = _report(tmp_path, "cd" * 32)
    assert summary["same_init"] is False and "different trainable parameters" in stdout


def test_same_initial_parameters_are_not_flagged(tmp_path):
    stdout, summary = _report(tmp_path, "ab" * 32)
    assert summary["same_init"] is True and "WARNING" not in stdout
