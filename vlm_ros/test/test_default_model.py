"""
The embedded default model: shipped files, runtime paths, correct answers and the node.

The model in models/default is a tiny SmolVLM trained on synthetic shape scenes
(tools/vlm_ros_tools/train_default.py; training is not part of the suite). These tests
check the shipped files against checksums.json, ask held-out scenes (seed 1; training used
seed 0) on every shipped runtime format, ask scenes of a renderer it never trained on
(drawn_scenes), answer the bundled sample image with the default prompt, and run the
installed node on the embedded default over topics and through ~/detect.
"""

import json
import os
import time

from conftest import REPO
import numpy as np
from PIL import Image as PilImage
import pytest
from vlm_ros_tools import drawn_scenes, eval_default, scenes
import yaml

MODEL_DIR = REPO / 'vlm_ros' / 'models' / 'default'
SAMPLE = REPO / 'vlm_ros' / 'samples' / 'scene.png'
DEFAULT_YAML = REPO / 'vlm_ros' / 'config' / 'default.yaml'
SAMPLE_ANSWER = ('a red square on the left, a blue triangle at the bottom and an orange star '
                 'at the bottom right.')
HELD_OUT_SEED = 1
NUM_SCENES = 12  # x 7 question kinds
DRAWN_SCENES = 24  # x 5 question kinds
LONE_SCENES = 10
REQUIRED = ('config.json', 'generation_config.json', 'preprocessor_config.json',
            'processor_config.json', 'chat_template.json', 'tokenizer.json',
            'tokenizer_config.json', 'special_tokens_map.json', 'vlm_ros.json',
            'MODEL_CARD.md', 'onnx/vision_encoder.onnx', 'onnx/embed_tokens.onnx',
            'onnx/decoder_model_merged.onnx', 'onnx/vision_encoder_int8.onnx',
            'onnx/embed_tokens_int8.onnx', 'onnx/decoder_model_merged_int8.onnx',
            'gguf/model-f16.gguf', 'gguf/model-q8_0.gguf', 'gguf/mmproj-f16.gguf')
MAX_TOTAL_BYTES = 25 * 1024 * 1024


def _files(root):
    out = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            out.add(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, '/'))
    return out


def _sha256(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_files_match_checksums():
    sums = json.loads((MODEL_DIR / 'checksums.json').read_text())
    assert sums['algorithm'] == 'sha256'
    listed = sums['files']
    assert set(listed) == _files(MODEL_DIR) - {'checksums.json'}
    for rel, digest in listed.items():
        assert _sha256(MODEL_DIR / rel) == digest, f'{rel} differs from checksums.json'


def test_layout_size_and_label():
    present = _files(MODEL_DIR)
    assert set(REQUIRED) <= present, sorted(set(REQUIRED) - present)
    assert 'model.safetensors' not in present
    total = sum((MODEL_DIR / rel).stat().st_size for rel in present)
    assert total < MAX_TOTAL_BYTES, f'{total / 1e6:.1f} MB shipped'
    label = json.loads((MODEL_DIR / 'vlm_ros.json').read_text())['label']
    assert label == ('a demonstration model trained on synthetic shape scenes, '
                     'not a general model')


def test_preprocessing_is_one_tile_without_splitting():
    pre = json.loads((MODEL_DIR / 'preprocessor_config.json').read_text())
    config = json.loads((MODEL_DIR / 'config.json').read_text())
    tile = config['vision_config']['image_size']
    assert pre['do_image_splitting'] is False
    assert pre['size'] == {'longest_edge': tile}
    assert pre['max_image_size'] == {'longest_edge': tile}


def test_libmtmd_lays_the_image_out_as_trained():
    """llama.cpp's projector path gets the layout training used for it (a tile + global)."""
    import vlm_ros
    from vlm_ros_tools.train_default import Examples

    pipe = vlm_ros.pipeline(str(MODEL_DIR), n_threads=1,
                            **eval_default.PATHS['llama.cpp f16 + mtmd'])
    examples = Examples(str(MODEL_DIR))
    question = 'Where is the red square?'
    plain = examples.family.prepare(np.zeros((96, 96, 3), np.uint8), question).input_ids
    trained = examples.mtmd_prompt(plain.tolist())
    assert len(trained) == len(plain) + examples.family.image_seq_len + 3
    try:
        for side in (48, 200, 640):
            image = np.zeros((side, side + 30, 3), np.uint8)
            request, features = pipe.vision.encode(pipe.family.prepare(image, question))
            assert request.input_ids.tolist() == trained, side
            assert len(features) == 2 * examples.family.image_seq_len
    finally:
        pipe.close()


@pytest.fixture(scope='module')
def held_out():
    """Greedy answers of every runtime path to the held-out sample."""
    results, items = eval_default.evaluate(str(MODEL_DIR), HELD_OUT_SEED, NUM_SCENES)
    return results, items


@pytest.fixture(scope='module')
def drawn():
    """Greedy answers of ONNX fp32 and llama.cpp Q8_0 to scenes of the other renderer."""
    return eval_default.evaluate(str(MODEL_DIR), HELD_OUT_SEED, DRAWN_SCENES,
                                 ('ONNX fp32', 'llama.cpp Q8_0'), set_name='drawn')


def _flat(answers):
    return [scenes.normalise(a) for row in answers for a in row]


def test_fp32_answers_are_correct(held_out):
    # The model card's held-out figure is 94.8% ("is there" and boxes among three shapes
    # are its weak points): a drop below 85% here is a broken path, not sampling noise.
    results, items = held_out
    correct, total = results['ONNX fp32']['scores']['overall']
    assert total == NUM_SCENES * len(scenes.KINDS)
    assert correct / total >= 0.85, eval_default.markdown_table(results)
    # Its strong kinds (98.5-100% in the model card); 12 questions each leave room for a
    # JPEG decoder or runtime version turning one or two answers.
    for kind in ('colour', 'shape', 'count', 'where'):
        correct, total = results['ONNX fp32']['scores'][kind]
        assert correct / total >= 0.8, eval_default.markdown_table(results)


def test_every_path_locates_a_lone_shape():
    # One shape per scene: the model card's 97%. Among three shapes it gives another
    # shape's box about one time in three (its documented limit): measured there.
    rng = scenes.scene_rng(HELD_OUT_SEED, 9)
    items = []
    for _ in range(LONE_SCENES):
        scene = scenes.random_scene(rng, count=1)
        items.append((scenes.render(scene, scenes.DEFAULT_SIZE), scene,
                      [scenes.ask(scene, 'detect', rng)]))
    for path in eval_default.PATHS:
        pipe = eval_default.load(str(MODEL_DIR), path)
        verdicts = eval_default.judge_all(items, eval_default.answer(pipe, items))
        pipe.close()
        hits = [correct for row in verdicts for correct, _ in row]
        ious = [value for row in verdicts for _, value in row]
        assert sum(hits) >= LONE_SCENES - 1, (path, ious)
        assert sum(ious) / len(ious) >= 0.7, (path, ious)


def test_scenes_of_another_renderer_are_answered(drawn):
    results, _ = drawn
    for path, res in results.items():
        correct, total = res['scores']['overall']
        assert total == DRAWN_SCENES * len(drawn_scenes.KINDS)
        assert correct / total >= 0.8, f'{path}\n' + eval_default.markdown_table(results)
        for kind in ('colour', 'shape', 'count'):
            correct, total = res['scores'][kind]
            assert correct / total >= 0.8, f'{path}\n' + eval_default.markdown_table(results)


def test_every_path_answers_correctly(held_out):
    results, _ = held_out
    for path, res in results.items():
        correct, total = res['scores']['overall']
        assert correct / total >= 0.85, f'{path}\n' + eval_default.markdown_table(results)


def test_fp32_and_f16_give_the_same_answers(held_out):
    results, _ = held_out
    fp32 = _flat(results['ONNX fp32']['answers'])
    assert _flat(results['llama.cpp f16']['answers']) == fp32


def test_quantized_paths_agree_with_fp32(held_out):
    results, _ = held_out
    fp32 = _flat(results['ONNX fp32']['answers'])
    for path in ('ONNX int8', 'llama.cpp Q8_0'):
        answers = _flat(results[path]['answers'])
        same = sum(a == b for a, b in zip(answers, fp32, strict=True)) / len(fp32)
        assert same >= 0.9, f'{path} agrees with fp32 on {same:.0%}'


def test_bundled_sample_is_the_known_scene_and_answered_with_the_default_prompt():
    import vlm_ros

    expected = scenes.render(scenes.sample_scene(), scenes.SAMPLE_SIZE)
    assert np.array_equal(np.asarray(PilImage.open(SAMPLE).convert('RGB')), expected)
    assert scenes.describe(scenes.sample_scene()) == SAMPLE_ANSWER
    params = yaml.safe_load(DEFAULT_YAML.read_text())['/**']['ros__parameters']
    pipe = vlm_ros.pipeline(str(MODEL_DIR), n_threads=1)
    assert pipe.generate(str(SAMPLE), params['user_prompt']).text.strip() == SAMPLE_ANSWER


# The node on the embedded default -----------------------------------------------------------

NODE_SCENE_SEED = 5


def _image_msg(rgb):
    from sensor_msgs.msg import Image
    h, w = rgb.shape[:2]
    msg = Image(height=h, width=w, encoding='rgb8', step=w * 3, data=rgb.tobytes())
    msg.header.frame_id = 'camera'
    return msg


@pytest.mark.ros
def test_node_answers_about_a_scene_with_the_embedded_default(node_process, ros_client):
    import rclpy
    from std_msgs.msg import String

    scene = scenes.random_scene(scenes.scene_rng(NODE_SCENE_SEED, 6), count=2)
    item = scene.items[0]
    node = node_process('-p', 'feed_type:=1', '-p', 'max_new_tokens:=32')
    assert node.wait_for_output('synthetic shape scenes', timeout=60), node.output()
    assert node.wait_for_output('sessions created', timeout=60), node.output()
    results = []
    ros_client.node.create_subscription(String, 'result', lambda m: results.append(m.data), 10)
    image_pub = ros_client.node.create_publisher(_image_msg_type(), 'image',
                                                 rclpy.qos.qos_profile_sensor_data)
    prompt_pub = ros_client.node.create_publisher(String, 'prompt', 10)
    # Discovery first (a fixed 1 s was not always enough on a busy machine: frame and first
    # prompt lost), then the frame three times, as a camera keeps sending (best effort).
    _wait(lambda: image_pub.get_subscription_count() > 0 and
          prompt_pub.get_subscription_count() > 0 and
          ros_client.node.count_publishers('/result') > 0, timeout=30)
    time.sleep(0.5)
    for _ in range(3):
        image_pub.publish(_image_msg(scenes.render(scene, 160)))
        time.sleep(0.2)
    prompt_pub.publish(String(data=f'What colour is the {item.shape}?'))
    _wait(lambda: len(results) >= 1)
    prompt_pub.publish(String(data=f'What shape is the {item.colour} object?'))
    _wait(lambda: len(results) >= 2)
    assert len(results) == 2, node.output()
    assert item.colour in results[0] and item.shape in results[1], results


def _image_msg_type():
    from sensor_msgs.msg import Image
    return Image


def _wait(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.ros
def test_node_detects_a_shape_with_the_embedded_default(node_process, ros_client):
    from vlm_ros_interfaces.srv import Detect

    # Two lone shapes, then the last of the bundled sample's three (not the first one a
    # model ignoring the label would box).
    rng = scenes.scene_rng(NODE_SCENE_SEED, 7)
    side = 200
    node = node_process('-p', 'max_new_tokens:=40')
    assert node.wait_for_output('sessions created', timeout=60), node.output()
    cases = [(scenes.random_scene(rng, count=1), form, side)
             for form in ('{colour} {shape}', '{shape}')]
    cases.append((scenes.sample_scene(), '{colour} {shape}', scenes.SAMPLE_SIZE))
    for scene, form, side in cases:
        item = scene.items[-1]
        label = form.format(colour=item.colour, shape=item.shape)
        request = Detect.Request(image=_image_msg(scenes.render(scene, side)), labels=[label])
        response = ros_client.call(Detect, '/vlm_node/detect', request, timeout=120)
        assert response.success, response.error
        assert response.detections.header.frame_id == 'camera'
        [found] = response.detections.detections
        assert found.label == label and found.score == 1.0
        box = (found.center_x - found.size_x / 2, found.center_y - found.size_y / 2,
               found.center_x + found.size_x / 2, found.center_y + found.size_y / 2)
        truth = tuple(v * side for v in item.box)
        assert eval_default.iou(box, truth) >= 0.5, (response.text, truth)
