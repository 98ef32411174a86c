"""The vlm_ask console command answers from the shell like the pipeline API."""

import json
import subprocess

from conftest import installed_executable
import numpy as np
from PIL import Image
import pytest
import vlm_ros

pytest.importorskip('torch')
from vlm_ros_tools.export_onnx import cached_test_model  # noqa: E402


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


def test_errors_exit_1_with_the_reason(tmp_path):
    out = run(cached_test_model('a'), tmp_path / 'missing.png')
    assert out.returncode == 1 and 'image file not found' in out.stderr
    out = run(tmp_path, tmp_path / 'missing.png')
    assert out.returncode == 1 and 'config.json not found' in out.stderr
