"""How a decoder model's tensors are named: which belong to a layer, which are the head.

One definition for both sides: the service finds a model's layers from its headers
(``service.model_headers``) and the workers from its loaded tensor names
(``workers.architecture``); the two must agree on what a layer is.
"""

from __future__ import annotations

import re

LAYER_RE = re.compile(r"^(?P<prefix>(?:[\w.]*\.)?(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
"""A tensor of decoder layer ``idx`` under ``prefix`` (``model.layers.3.mlp.up_proj.weight``)."""

HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
"""Name endings of the output head (absent when tied to the input embedding)."""

EMBED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
"""Name endings of the input embedding (which a tied head reads)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files of a model folder any one of which means the folder has a tokenizer."""

COMPANION_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
"""Files copied beside merged weights from the model that gives the tokenizer."""
