"""Data for the demo model: synthetic scenes written as LLaVA-JSON, and the demo tokenizer."""
from .questions import (OPEN_KINDS, QA, Kind, ObjectStats, PopeSplit, caption, existence_question,
                        pope_negatives, pope_questions, questions)
from .scene import COLORS, GROUPS, POSITIONS, SHAPES, Scene, SceneObject, draw_scene, sample_scene
from .synthetic import SyntheticDataset, generate_dataset, load_scenes
from .tokenizer import conversation_texts, save_hf_tokenizer, train_demo_tokenizer

__all__ = [
    "COLORS", "GROUPS", "OPEN_KINDS", "POSITIONS", "QA", "SHAPES", "Kind", "ObjectStats", "PopeSplit", "Scene",
    "SceneObject", "SyntheticDataset", "caption", "conversation_texts", "draw_scene", "existence_question",
    "generate_dataset", "load_scenes", "pope_negatives", "pope_questions", "questions", "sample_scene",
    "save_hf_tokenizer", "train_demo_tokenizer",
]
