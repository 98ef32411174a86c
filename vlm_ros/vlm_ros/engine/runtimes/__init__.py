"""Runtimes: ONNX Runtime and llama.cpp sessions for vision encoders and decoders."""
