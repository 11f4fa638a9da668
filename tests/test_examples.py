"""Every example runs and shows the finding it claims, so the examples never rot."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CLAIMS = {
    "accelerate_watch.py": ["[nan] 2.bias", "step 5:", "in 10 optimizer steps"],
    "fabric_watch.py": ["[missing_zero_grad] 2.bias", "step 1:", "in 20 optimizer steps"],
    "first_model.py": ["[missing_zero_grad]", "step 1:", "no gradient problems found in 5"],
    "lightning_callback.py": ["[no_grad] encoder.0.weight", "step 4:", "in 20 optimizer steps"],
    "plain_missing_zero_grad.py": ["[missing_zero_grad]", "step 1:"],
    "plain_nan.py": ["[nan] 2.bias", "step 5:"],
    "plain_exploding.py": ["[exploding]", "step 16:"],
    "plain_vanishing.py": ["[vanishing] 0.weight"],
    "tensorboard_walkthrough.py": [
        "[missing_zero_grad]",
        "step 60:",
        "histograms at steps 0, 10, 20,",
        "tensorboard --logdir runs/tensorboard-walkthrough",
    ],
    "transformers_trainer.py": ["[no_grad] backbone.wte.weight", "step 4:", "in 8 optimizer steps"],
}


def test_every_example_is_covered() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert set(CLAIMS) >= scripts


@pytest.mark.parametrize("script", sorted(CLAIMS))
def test_example_shows_its_finding(script: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for claim in CLAIMS[script]:
        assert claim in result.stdout, f"{script} should print {claim!r}:\n{result.stdout}"
