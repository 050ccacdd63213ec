"""Checkpoints whose tokenizer.json ships truncation and padding settings (some hub tokenizers do)."""

import json
import shutil


def with_shipped_tokenizer_settings(ckpt, out):
    """A copy of ckpt whose tokenizer.json ships truncation and padding settings, as some hub tokenizers do."""
    shutil.copytree(ckpt, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return str(out)
