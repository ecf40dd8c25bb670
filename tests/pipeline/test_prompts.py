"""Plain template: exact token layout, label masking, multi-image prompts, errors naming the sample."""

import pytest
from PIL import Image

from pipeline.processing import process_image
from pipeline.prompts import IGNORE_INDEX, PROMPTS, build_example, get_prompt
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ALPHABET)


def views(mode="debug", size=(100, 60)):
    return process_image(Image.new("RGB", size, (10, 20, 30)), mode)


def test_prompt_set_from_spec():
    assert PROMPTS["free_ocr"] == "<image>\nFree OCR."
    assert PROMPTS["grounding_markdown"] == "<image>\n<|grounding|>Convert the document to markdown."
    assert PROMPTS["grounding_ocr"] == "<image>\n<|grounding|>OCR this image."
    assert PROMPTS["parse_figure"] == "<image>\nParse the figure."
    assert PROMPTS["describe"] == "<image>\nDescribe this image in detail."
    assert get_prompt("locate", ref="the cat") == "<image>\nLocate <|ref|>the cat<|/ref|> in the image."
    assert get_prompt("free_ocr") == PROMPTS["free_ocr"]
    assert get_prompt("custom <image> prompt") == "custom <image> prompt"
    with pytest.raises(ValueError, match="ref="):
        get_prompt("locate")


def test_training_example_layout(tok):
    image = views()
    assert image.num_placeholders == 7  # debug: 2x2 grid + 2 newlines + separator
    ex = build_example(tok, PROMPTS["free_ocr"], "Hi 42", [image], source="s", key="k")
    prompt_text = tok.encode("\nFree OCR.")
    answer = tok.encode("Hi 42")
    expected = [tok.bos_id] + [tok.image_id] * 7 + prompt_text + answer + [tok.eos_id]
    assert ex.input_ids == expected
    assert ex.labels == [IGNORE_INDEX] * (1 + 7 + len(prompt_text)) + answer + [tok.eos_id]
    assert ex.images == [image] and (ex.source, ex.key) == ("s", "k")
    assert tok.decode(ex.input_ids) == "\nFree OCR.Hi 42"


def test_inference_prompt_has_no_answer_or_eos(tok):
    ex = build_example(tok, PROMPTS["free_ocr"], None, [views()])
    assert ex.input_ids[-1] != tok.eos_id
    assert all(label == IGNORE_INDEX for label in ex.labels)


def test_two_images_and_gundam_counts(tok):
    a, b = views("debug-gundam", (120, 60)), views("debug-pad")  # 7200 px: no 4x2 tie-break
    ex = build_example(tok, "<image>a<image>b", "c", [a, b])
    n_a, n_b = a.num_placeholders, b.num_placeholders
    assert a.grid == (2, 1) and n_a == 7 + (2 + 1) * 1
    assert ex.input_ids == (
        [tok.bos_id]
        + [tok.image_id] * n_a
        + tok.encode("a")
        + [tok.image_id] * n_b
        + tok.encode("b")
        + tok.encode("c")
        + [tok.eos_id]
    )


def test_text_only_example(tok):
    ex = build_example(tok, PROMPTS["text_only"], "plain text", [])
    assert ex.input_ids == [tok.bos_id] + tok.encode("plain text") + [tok.eos_id]
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def test_errors_name_the_sample(tok):
    with pytest.raises(ValueError, match=r"shard3/key9.*1 <image> tag.*0 image"):
        build_example(tok, PROMPTS["free_ocr"], "x", [], source="shard3", key="key9")
    with pytest.raises(ValueError, match=r"shard3/key9.*0 <image> tag.*1 image"):
        build_example(tok, "no tag", "x", [views()], source="shard3", key="key9")
    with pytest.raises(ValueError, match=r"shard3/key9.*exceed max_length=10"):
        build_example(
            tok, PROMPTS["free_ocr"], "long answer", [views()], max_length=10, source="shard3", key="key9"
        )
    with pytest.raises(ValueError, match="answer contains"):
        build_example(tok, "", "x <image>", [])


def test_prompt_is_stripped_like_the_release(tok):
    # the release's format_messages strips the message and the formatted prompt: its example
    # "<image>\n<|grounding|>Convert the document to markdown. " encodes without the final space
    image = views()
    clean = build_example(tok, PROMPTS["free_ocr"], None, [image]).input_ids
    for padded in (PROMPTS["free_ocr"] + " ", " \n" + PROMPTS["free_ocr"] + " \n\t"):
        assert build_example(tok, padded, None, [image]).input_ids == clean
    inner = build_example(tok, "<image>\nFree  OCR.", None, [image]).input_ids
    assert len(inner) == len(clean) + 1  # whitespace inside the prompt is kept
    trained = build_example(tok, PROMPTS["free_ocr"] + " ", "Hi", [image])
    assert trained.input_ids == clean + tok.encode("Hi") + [tok.eos_id]
