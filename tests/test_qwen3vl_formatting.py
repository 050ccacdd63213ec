"""Contract rules that need no model: instructions, message layout, content order, pixel settings."""

import numpy as np
import pytest
from PIL import Image

from operators.qwen3vl.formatting import (DEFAULT_EMBED_INSTRUCTION, RERANK_SYSTEM_PROMPT, VisionSettings,
                                          check_input, embed_conversation, normalize_instruction, rerank_conversation,
                                          sample_frames, split_videos)

VS = VisionSettings()


def test_instruction_gets_final_punctuation_only_when_missing():
    assert normalize_instruction("  Find the image  ", "d") == "Find the image."
    assert normalize_instruction("Find the image?", "d") == "Find the image?"
    assert normalize_instruction("Trouve l'image。", "d") == "Trouve l'image。"  # CJK full stop is Po
    assert normalize_instruction("ends with a quote'", "d") == "ends with a quote'"
    assert normalize_instruction(None, "Default without dot") == "Default without dot"
    assert normalize_instruction("   ", "Default") == "Default"


def test_embed_conversation_layout_videos_then_images_then_texts():
    frames = [Image.new("RGB", (8, 8))] * 3
    conv = embed_conversation({"text": ["a", "b"], "image": ["x.png", "y.png"], "video": frames,
                               "instruction": "Find it"}, VS)
    assert conv[0] == {"role": "system", "content": [{"type": "text", "text": "Find it."}]}
    types = [c["type"] for c in conv[1]["content"]]
    assert types == ["video", "image", "image", "text", "text"]
    video, image = conv[1]["content"][0], conv[1]["content"][1]
    assert video == {"type": "video", "video": frames, "total_pixels": 7864320}
    assert image == {"type": "image", "image": "x.png", "min_pixels": 4096, "max_pixels": 1843200}


def test_video_file_carries_fps_max_frames_and_total_pixels():
    conv = embed_conversation({"video": "clip.mp4", "fps": 2.0, "video_start": 1, "video_end": 3}, VS)
    assert conv[1]["content"] == [{"type": "video", "video": "clip.mp4", "fps": 2.0, "max_frames": 64,
                                   "total_pixels": 7864320, "video_start": 1.0, "video_end": 3.0}]


def test_empty_input_is_null_with_default_instruction():
    for item in ({}, {"text": None, "image": None}, {"text": [], "image": []}):
        conv = embed_conversation(item, VS)
        assert conv[0]["content"][0]["text"] == DEFAULT_EMBED_INSTRUCTION
        assert conv[1]["content"] == [{"type": "text", "text": "NULL"}]


def test_an_empty_string_is_a_text_not_a_missing_one():
    """As the reference (texts = [""] is not empty): an empty user message, not "NULL"."""
    assert embed_conversation({"text": ""}, VS)[1]["content"] == [{"type": "text", "text": ""}]
    assert embed_conversation({"text": ["", ""]}, VS)[1]["content"] == [{"type": "text", "text": ""}] * 2
    conv = rerank_conversation({"text": ""}, {"text": "d"}, "i", VS)
    assert [c.get("text") for c in conv[1]["content"]] == ["<Instruct>: i", "<Query>:", "", "\n<Document>:", "d"]


def test_frame_lists_are_subsampled_like_the_reference():
    frames = list(range(100))
    assert sample_frames(frames, 64) == np.linspace(0, 99, 64, dtype=int).tolist()
    assert sample_frames(frames[:10], 64) == frames[:10]


def test_split_videos_tells_frame_lists_from_video_lists():
    assert split_videos("a.mp4") == ["a.mp4"]
    assert split_videos(["f1.jpg", "f2.jpg"]) == [["f1.jpg", "f2.jpg"]]
    assert split_videos(["a.mp4", "b.mp4"]) == ["a.mp4", "b.mp4"]
    assert split_videos([b"\x89PNG", b"\x89PNG"]) == [[b"\x89PNG", b"\x89PNG"]]


def test_rerank_conversation_literals_and_verbatim_instruction():
    conv = rerank_conversation({"text": "q"}, {"image": "d.png", "text": "doc"}, "no dot here", VS)
    assert conv[0]["content"][0]["text"] == RERANK_SYSTEM_PROMPT
    texts = [c.get("text") for c in conv[1]["content"]]
    assert texts == ["<Instruct>: no dot here", "<Query>:", "q", "\n<Document>:", None, "doc"]
    empty = rerank_conversation({}, {}, "i", VS)
    assert [c.get("text") for c in empty[1]["content"]] == ["<Instruct>: i", "<Query>:", "NULL",
                                                             "\n<Document>:", "NULL"]


@pytest.mark.parametrize("item, error, match", [
    ({"txt": "a"}, ValueError, "unknown key 'txt'"),
    ({"text": "a", "images": "x.png", "id": 3}, ValueError, "unknown keys 'images', 'id'"),
    ({"text": 5}, TypeError, "got int"),
    ({"text": ("a", b"b")}, TypeError, "a tuple holding bytes"),
    ({"text": "a", "instruction": ["x"]}, TypeError, "instruction must be a string"),
    ({"video": "v.mp4", "video_start": "1"}, TypeError, "video_start must be a number"),
    ({"video": "v.mp4", "fps": True}, TypeError, "fps must be a number"),
    ({"video": "v.mp4", "fps": -1}, ValueError, r"fps must be > 0 \(or 0 for the default\)"),
    ({"video": "v.mp4", "fps": float("nan")}, ValueError, "fps must be > 0"),
    ({"video": "v.mp4", "max_frames": -3}, ValueError, "max_frames must be an integer >= 2"),
    ({"video": "v.mp4", "max_frames": 2.5}, ValueError, "max_frames must be an integer >= 2"),
    ({"video": "v.mp4", "max_frames": 1}, ValueError, r"max_frames must be an integer >= 2 \(the video reader"),
])
def test_malformed_inputs_are_named(item, error, match):
    with pytest.raises(error, match=match):
        embed_conversation(item, VisionSettings())


def test_well_formed_inputs_pass_the_checks():
    for item in ({}, {"text": []}, {"text": ["a", "b"]}, {"text": np.str_("a")}, {"video": "v.mp4", "fps": 0},
                 {"video": "v.mp4", "max_frames": 0},
                 {"video": "v.mp4", "fps": np.float32(2), "max_frames": np.int64(8), "video_start": 0, "video_end": 1.5},
                 {"text": "a", "instruction": None}):
        check_input(item)
        embed_conversation(item, VisionSettings())


def test_vision_settings_refuse_a_frame_count_no_video_could_be_read_with():
    from operators.qwen3vl.formatting import VisionSettings

    with pytest.raises(ValueError, match="max_frames must be an integer >= 2"):
        VisionSettings(max_frames=1)
    with pytest.raises(ValueError, match="fps must be > 0"):
        VisionSettings(fps=0)
    with pytest.raises(ValueError, match="max_frames an integer >= 2 for the defaults"):
        VisionSettings(max_frames=0)
