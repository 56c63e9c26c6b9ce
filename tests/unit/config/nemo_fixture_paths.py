"""Paths of the NeMo RL style fixture configs used by the config tests."""

from __future__ import annotations

from pathlib import Path

NEMO_CONFIGS = Path(__file__).resolve().parents[2] / "fixtures" / "nemo_configs"
NEMO_BASE = NEMO_CONFIGS / "sft.yaml"
NEMO_RECIPES = sorted((NEMO_CONFIGS / "recipes" / "llm").glob("*.yaml"))
