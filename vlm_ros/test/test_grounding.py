"""Boxes in answers: the three syntaxes, broken boxes, and mapping to original-image pixels."""

import dataclasses
import math

import numpy as np
import pytest
from vlm_ros.engine import grounding
from vlm_ros.engine.answerer import Answerer
from vlm_ros.engine.datatypes import Box, FINISH_CANCELLED, FINISH_STOP, Result, Timings
from vlm_ros.engine.errors import VlmError
from vlm_ros.engine.families import registry
from vlm_ros.engine.remote import RemoteClient

# Answers as the models write them (formats from their published examples).
INTERNVL = ('The red circle is at <ref>red circle</ref><box>[[100, 200, 300, 400]]</box>.')
INTERNVL_TWO = ('<ref>cup</ref><box>[[10, 20, 110, 220], [500, 500, 600, 700]]</box> and '
                '<ref>plate</ref><box>[[0, 0, 1000, 1000]]</box>')
QWEN2 = ('<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(120,340),(560,880)'
         '<|box_end|>')
QWEN25 = ('Here are the objects:\n```json\n[\n  {"bbox_2d": [12, 34, 156, 178], '
          '"label": "cup"},\n  {"bbox_2d": [200, 10, 300, 90], "label": "plate"}\n]\n```\n'
          'Let me know if you need more.')


def boxes(text, **kwargs):
    return grounding.parse(text, **kwargs).boxes


def test_internvl_boxes_with_several_per_label_and_labels():
    assert boxes(INTERNVL) == [Box('red circle', 100, 200, 300, 400)]
    assert boxes(INTERNVL_TWO) == [Box('cup', 10, 20, 110, 220), Box('cup', 500, 500, 600, 700),
                                   Box('plate', 0, 0, 1000, 1000)]


def test_box_without_ref_takes_the_asked_label():
    assert boxes('<box>[[1, 2, 3, 4]]</box>', default_label='mug') == [Box('mug', 1, 2, 3, 4)]


def test_qwen2_box_tokens():
    assert boxes(QWEN2) == [Box('the dog', 120, 340, 560, 880)]


def test_qwen25_json_in_prose_and_fences():
    assert boxes(QWEN25) == [Box('cup', 12, 34, 156, 178), Box('plate', 200, 10, 300, 90)]
    # one object without a list, a score, floats
    assert boxes('{"bbox_2d": [1.5, 2, 3, 4.25], "label": "x", "score": 0.5}') == \
        [Box('x', 1.5, 2, 3, 4.25, 0.5)]


@pytest.mark.parametrize('text, kept, dropped', [
    ('<ref>a</ref><box>[[1, 2, 3]]</box>', 0, 1),                  # three numbers
    ('<ref>a</ref><box>[[1, 2, 3, 4], [oops]]</box>', 1, 1),       # one good, one bad
    ('<ref>a</ref><box></box>', 0, 1),                             # empty
    ('<ref>a</ref><box>[[1, 2, 3, 4]]', 0, 0),                     # never closed: not a box
    ('<|box_start|>(1,2)<|box_end|>', 0, 1),                        # one corner
    ('[{"bbox_2d": [1, 2, 3], "label": "a"}]', 0, 1),               # three coordinates
    ('[{"bbox_2d": ["a", 2, 3, 4], "label": "a"}]', 0, 1),          # not a number
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": null}]', 1, 1),
    ('[{"bbox_2d": [1, 2, 3, 4]', 0, 0),                            # cut-off JSON
    ('no boxes here [1, 2] {"a": 1}', 0, 0),
    ('', 0, 0),
])
def test_malformed_boxes_are_dropped_and_counted(text, kept, dropped):
    parsed = grounding.parse(text)
    assert (len(parsed.boxes), parsed.dropped) == (kept, dropped)


def test_normalized_boxes_map_to_the_original_image_whatever_the_model_saw():
    # 0-1000 of the image: the model's resize or tiling does not enter.
    found = grounding.locate(INTERNVL, grounding.NORMALIZED_1000, (640, 480))
    assert found.boxes == [Box('red circle', 64, 96, 192, 192)]


def test_boxes_are_ordered_clipped_and_empty_ones_dropped():
    text = ('<ref>a</ref><box>[[300, 400, 100, 200]]</box><ref>b</ref><box>[[-50, 900, 1200, '
            '1100]]</box><ref>c</ref><box>[[500, 500, 500, 600]]</box>'
            '<ref>d</ref><box>[[1100, 0, 1200, 10]]</box>')
    found = grounding.locate(text, grounding.NORMALIZED_1000, (1000, 1000))
    assert found.boxes == [Box('a', 100, 200, 300, 400), Box('b', 0, 900, 1000, 1000)]
    assert found.dropped == 2  # zero width, and outside the image


def test_absolute_boxes_scale_from_the_size_the_model_saw():
    found = grounding.locate(QWEN25, grounding.ABSOLUTE, (1280, 960), seen_size=(640, 480))
    assert found.boxes[0] == Box('cup', 24, 68, 312, 356)


@pytest.mark.parametrize('height, width, expected', [
    (480, 640, (476, 644)),      # rounded to multiples of 28
    (28, 28, (56, 56)),          # scaled up to min_pixels
    (4000, 3000, (1148, 840)),   # scaled down into max_pixels
])
def test_smart_resize_matches_the_qwen2_vl_rule(height, width, expected):
    assert grounding.smart_resize(height, width) == expected
    h, w = expected
    assert h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 28 * 28 * 1280
    assert grounding.smart_resize(h, w) == (h, w)  # an image sent at that size stays


def test_smart_resize_equals_the_processor_of_transformers():
    pytest.importorskip('transformers')
    try:  # transformers 5 keeps it beside the Pillow processor, 4.x in the processor module
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as reference
    except ImportError:
        reference = pytest.importorskip(
            'transformers.models.qwen2_vl.image_processing_qwen2_vl')
    rng = np.random.default_rng(0)
    sides = [(int(h), int(w)) for h, w in rng.integers(20, 5000, (300, 2))]
    sides += [(14, 2000), (56, 56), (1080, 1920), (4032, 3024)]
    for height, width in sides:
        if max(height, width) / min(height, width) > 200:
            continue  # the processor refuses such strips
        for budget in (28 * 28 * 1280, 12845056):
            assert grounding.smart_resize(height, width, max_pixels=budget) == \
                tuple(reference.smart_resize(height, width, max_pixels=budget)), (height, width)


def test_remote_absolute_boxes_map_back_through_downscale_and_resize_grid():
    # A 2000x1500 camera image, sent at most 1024 wide, then put on Qwen's 28-pixel grid:
    # the server's boxes are in pixels of what it saw, mapped back to the camera image.
    client = RemoteClient('http://127.0.0.1:9/v1', 'm', image_max_side=1024,
                          box_format=grounding.ABSOLUTE)
    try:
        sent = client.sent_size(2000, 1500)
        assert sent == (1036, 756) and grounding.smart_resize(756, 1036) == (756, 1036)
        picture_url = client.encode_image(np.zeros((1500, 2000, 3), np.uint8))
        assert picture_url.startswith('data:image/jpeg;base64,')
        found = grounding.locate('{"bbox_2d": [518, 378, 1036, 756], "label": "box"}',
                                 client.box_format, (2000, 1500), sent)
        assert found.boxes == [Box('box', 1000, 750, 2000, 1500)]
    finally:
        client.close()
    normalized = RemoteClient('http://127.0.0.1:9/v1', 'm', image_max_side=1024)
    try:
        assert normalized.sent_size(2000, 1500) == (1024, 768)  # no grid: boxes are 0-1000
    finally:
        normalized.close()


def test_prompts_per_label_or_all_at_once():
    assert grounding.prompts(grounding.INTERNVL_PROMPT, ['cup', ' ', 'red ball']) == [
        ('cup', 'Please provide the bounding box coordinate of the region this sentence '
                'describes: <ref>cup</ref>'),
        ('red ball', 'Please provide the bounding box coordinate of the region this '
                     'sentence describes: <ref>red ball</ref>')]
    [(label, question)] = grounding.prompts(grounding.JSON_PROMPT, ['cup', 'plate'])
    assert label == '' and 'cup, plate' in question and 'bbox_2d' in question
    with pytest.raises(ValueError):
        grounding.prompts('Where is it?', ['cup'])


def test_families_declare_their_box_format_and_question():
    for info in registry.infos():
        if info.box_format or info.grounding_prompt:
            assert info.box_format in grounding.BOX_FORMATS
            assert grounding.prompts(info.grounding_prompt, ['cup'])  # a usable template
    internvl = registry.by_key('internvl').info
    assert (internvl.box_format, internvl.grounding_prompt) == (grounding.NORMALIZED_1000,
                                                                grounding.INTERNVL_PROMPT)
    assert grounding.family_template(internvl) == grounding.INTERNVL_PROMPT
    blind = dataclasses.replace(internvl, display_name='Blind', box_format='',
                                grounding_prompt='')
    with pytest.raises(VlmError, match='Blind was not trained to locate objects'):
        grounding.family_template(blind)


class RecordedAnswers(Answerer):
    """Hands back recorded Results in turn, as a model's answers would come."""

    def __init__(self, results):
        self.results = list(results)
        self.asked = []

    def generate(self, images=None, prompt='', system_prompt='', **kwargs):
        self.asked.append(prompt)
        return self.results.pop(0)

    def close(self):
        pass


def _result(text, box=None, finish=FINISH_STOP, ms=10.0):
    found = [box] if box else []
    return Result(text=text, finish_reason=finish, token_ids=[1, 2], prompt_tokens=50,
                  timings=Timings(1, 2, 3, 4, ms), detections=found, backend='local')


def test_detect_asks_each_question_and_merges_the_answers():
    answerer = RecordedAnswers([_result('<box>[[0,0,10,10]]</box>', Box('', 0, 0, 5, 5)),
                                _result('none'), _result('<ref>x</ref>', Box('x', 1, 1, 2, 2))])
    questions = grounding.prompts('find <ref>{label}</ref>', ['cup', 'plate', 'ball'])
    merged = grounding.detect(answerer, None, questions)
    assert answerer.asked == [q for _, q in questions]
    assert merged.text.split('\n') == ['<box>[[0,0,10,10]]</box>', 'none', '<ref>x</ref>']
    assert merged.detections == [Box('cup', 0, 0, 5, 5), Box('x', 1, 1, 2, 2)]
    assert merged.completion_tokens == 6 and merged.prompt_tokens == 150
    assert math.isclose(merged.timings.total_ms, 30.0) and merged.finish_reason == FINISH_STOP


def test_detect_stops_at_a_cancelled_question():
    answerer = RecordedAnswers([_result('a', finish=FINISH_CANCELLED), _result('b')])
    merged = grounding.detect(answerer, None, [('a', 'qa'), ('b', 'qb')])
    assert answerer.asked == ['qa'] and merged.finish_reason == FINISH_CANCELLED
