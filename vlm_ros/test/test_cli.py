"""The vlm_ask console command answers from the shell like the pipeline API."""

import functools
import json
import subprocess

from conftest import installed_executable, tiny_model
import numpy as np
from PIL import Image
import vlm_ros


cached_test_model = functools.partial(tiny_model, 'cached_test_model')


def run(*args):
    exe = installed_executable('vlm_ros', 'vlm_ask')
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


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
