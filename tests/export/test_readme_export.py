"""README.md's "Use the model elsewhere" runs as written: its ``deltamask export`` lines through the CLI and
its Python blocks, on a tiny DINOv2 run standing in for ``runs/dinov2`` (the preset's 56 px)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Use the model elsewhere"


def _blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)


@pytest.mark.slow  # 10-20 s on the 2-core machine; scripts/test.sh runs tests/export/ with -m slow
def test_the_readme_export_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    from deltamask.app.cli import main
    from deltamask.config import build_config
    from deltamask.engines.local import run_local

    blocks = _blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"]
    hf = tmp_path / "dinov2-tiny"
    torch.manual_seed(1)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14)
    transformers.AutoModel.from_config(cfg).save_pretrained(hf)
    monkeypatch.chdir(tmp_path)
    run_local(build_config(dict(
        model=f"hf:{hf}", dataset="digits", image_size=56, rounds=1, head_warmup_rounds=0, num_clients=2, clients_per_round=2,
        train_samples=20, test_samples=16, masked_blocks=2, batch_size=10, min_partition_size=4, head_epochs=1, progress=False,
    )), tmp_path / "runs" / "dinov2")
    ran = 0
    for line in blocks[0][1].splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] == ["deltamask", "export"]:
            assert main(argv[1:]) == 0, line
            ran += 1
        else:
            assert argv[:2] == ["deltamask", "run"], line  # the tiny run above stands in for it
    assert ran == 3 and (tmp_path / "runs/dinov2/export-hf/config.json").is_file()
    for _lang, code in blocks[1:]:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
