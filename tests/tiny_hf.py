"""A tiny Hugging Face text model and tokenizer, made offline and saved as a user's local folders would be."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LABELS = [str(i) for i in range(10)]


def save_tiny_text_model(root: Path) -> tuple[Path, Path]:
    """A tiny BERT and a word-level tokenizer, saved with save_pretrained -> (model dir, tokenizer dir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                                intermediate_size=32, max_position_embeddings=16))
    bert.save_pretrained(root / "bert")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]",
                                                                                          "[CLS]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            cls_token="[CLS]").save_pretrained(root / "tok")
    return root / "bert", root / "tok"


def hf_text_config(bert: Path | str, tok: Path | str) -> dict:
    return {"data": {"path": "unused", "modalities": ["text"],
                     "text": {"tokenizer": str(tok), "max_length": 6}},
            "model": {"encoders": {"text": {"name": "hf", "pretrained": str(bert), "freeze": True, "dim": 8}},
                      "fusion": {"name": "concat", "dim": 8, "hidden": 16}}}
