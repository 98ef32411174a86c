"""The vlm_ask console command answers from the shell like the pipeline API."""

import functools
import json
import pathlib
import subprocess

from conftest import installed_executable, tiny_model
import numpy as np
from PIL import Image
import vlm_ros
from vlm_ros.engine import grounding


cached_test_model = functools.partial(tiny_model, 'cached_test_model')


def run(*args, cwd=None):
    exe = installed_executable('vlm_ros', 'vlm_ask')
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def frame_file(tmp_path, seed=4, name='frame.png'):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), np.uint8)).save(
        path)
    return path


def test_answer_and_json_match_the_pipeline(tmp_path):
    model_dir = cached_test_model('a')
    path = tmp_path / 'frame.png'
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (90, 120, 3), np.uint8)).save(path)
    expected = vlm_ros.pipeline(model_dir).generate(str(path), 'What is this?',
                                                    max_new_tokens=10)
    out = run(model_dir, path, '-p', 'What is this?', '--max-new-tokens', '10', '--json')
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer['token_ids'] == expected.token_ids and answer['text'] == expected.text
    assert answer['timings_ms']['vision'] > 0 and answer['prompt_tokens'] > 0
    streamed = run(model_dir, path, '-p', 'What is this?', '--max-new-tokens', '10', '--stream')
    assert streamed.stdout == expected.text + '\n'


def test_several_images_are_asked_about_together(tmp_path):
    model_dir = cached_test_model('a')
    paths = []
    for i, size in enumerate(((90, 120), (64, 64))):
        paths.append(tmp_path / f'view{i}.png')
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), np.uint8)).save(
            paths[-1])
    expected = vlm_ros.pipeline(model_dir).generate([str(p) for p in paths], 'Compare them.',
                                                    max_new_tokens=10)
    out = run(model_dir, *paths, '-p', 'Compare them.', '--max-new-tokens', '10', '--json')
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer['token_ids'] == expected.token_ids
    assert answer['image_tokens'] == expected.image_tokens > 0


def test_errors_exit_1_with_the_reason(tmp_path):
    out = run(cached_test_model('a'), tmp_path / 'missing.png')
    assert out.returncode == 1 and 'image file not found' in out.stderr
    out = run(tmp_path, tmp_path / 'missing.png')
    assert out.returncode == 1 and 'config.json not found' in out.stderr


def test_a_model_folder_relative_to_the_working_directory(tmp_path):
    # The ONNX files found in a relative folder were once joined to it a second time.
    model_dir = pathlib.Path(cached_test_model('a'))
    path = frame_file(tmp_path)
    expected = vlm_ros.pipeline(model_dir).generate(str(path), 'Hi', max_new_tokens=4)
    out = run(model_dir.name, path, '-p', 'Hi', '--max-new-tokens', '4', '--json',
              cwd=model_dir.parent)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)['token_ids'] == expected.token_ids


def test_detect_asks_the_grounding_question_per_label_and_annotates(tmp_path):
    model_dir = cached_test_model('a')
    path = frame_file(tmp_path)
    labels = ['cup', 'red box']
    expected = grounding.detect(vlm_ros.pipeline(model_dir), str(path),
                                grounding.prompts(grounding.INTERNVL_PROMPT, labels),
                                max_new_tokens=10)
    drawn = tmp_path / 'drawn.png'
    out = run(model_dir, path, '--detect', labels[0], '--detect', labels[1],
              '--max-new-tokens', '10', '--json', '--annotate', drawn)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer['text'] == expected.text and answer['token_ids'] == expected.token_ids
    assert answer['detections'] == [
        {'label': b.label, 'score': b.score, 'box': [b.x1, b.y1, b.x2, b.y2]}
        for b in expected.detections]
    # The random model writes no boxes: the annotated image is the image itself.
    assert not expected.detections
    assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(path)))
    plain = run(model_dir, path, '--detect', labels[0], '--max-new-tokens', '10')
    assert plain.returncode == 0 and plain.stdout == 'nothing found\n', plain.stderr


def test_detect_needs_an_image():
    out = run(cached_test_model('a'), '--detect', 'cup')
    assert out.returncode == 2 and '--detect and --annotate need an image' in out.stderr


def test_annotate_refuses_a_name_without_an_image_extension_before_loading(tmp_path):
    out = run(cached_test_model('a'), frame_file(tmp_path), '--detect', 'cup',
              '--annotate', tmp_path / 'drawn.txt')
    assert out.returncode == 2 and 'image extension' in out.stderr
    assert 'Traceback' not in out.stderr


def test_annotate_into_a_missing_folder_is_an_error_not_a_traceback(tmp_path):
    out = run(cached_test_model('a'), frame_file(tmp_path), '--detect', 'cup',
              '--max-new-tokens', '4', '--annotate', tmp_path / 'missing' / 'drawn.png')
    assert out.returncode == 1 and 'cannot write' in out.stderr
    assert 'Traceback' not in out.stderr
