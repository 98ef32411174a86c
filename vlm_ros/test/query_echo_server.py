"""
A separate process serving vlm_ros_interfaces/srv/Query by echoing the request.

Used by test_interfaces.py so the request and response cross DDS between two processes.
"""

import json
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from vlm_ros_interfaces.srv import Query


def echo(request, response):
    """Describe the request in the response so the caller can check every field arrived."""
    response.success = True
    response.text = json.dumps({
        'prompt': request.prompt,
        'system_prompt': request.system_prompt,
        'max_new_tokens': request.max_new_tokens,
        'temperature': request.temperature,
        'top_p': request.top_p,
        'top_k': request.top_k,
        'seed': request.seed,
        'repetition_penalty': request.repetition_penalty,
        'image': [request.image.height, request.image.width, request.image.encoding,
                  request.image.step, len(request.image.data), request.image.header.frame_id],
        'compressed': [request.compressed_image.format, len(request.compressed_image.data)],
        'checksum': sum(request.image.data) % 65521,
    })
    response.error = ''
    response.finish_reason = Query.Response.FINISH_LENGTH
    response.prompt_tokens = 123
    response.completion_tokens = 45
    response.preprocess_ms = 0.5
    response.vision_ms = 1.25
    response.prefill_ms = 2.5
    response.decode_ms = 5.0
    response.total_ms = 9.25
    return response


def main():
    rclpy.init()
    node = rclpy.create_node('query_echo_server')
    node.create_service(Query, 'echo_query', echo)
    print('echo server ready', flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
